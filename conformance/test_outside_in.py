"""Outside in: the runner (this host, outside the cluster, on the lab's L2) through a LoadBalancer VIP to backends
under NetworkPolicy, and the LB datapath under load from outside.

Only traffic from outside exercises ARP, the announcing node, kube-proxy replacement's nodeport path, its SNAT and
the BPF NAT map: inside pods Cilium's socket LB translates the VIP at connect(). Two Services select one backend
each (`netprobe serve --http 8080 --tcp 9090`) in one namespace:

- `oi-local`, externalTrafficPolicy Local: its backend on a node that may announce (MetalLB announces Local only
  from a node holding an endpoint, so that node is the announcer and the backend sees the client's address);
- `oi-cluster`, externalTrafficPolicy Cluster: its backend pinned to another node than the one announcing the VIP
  (a node that may not announce when there is one, else moved once away from the announcer found from the runner's
  neighbour entry and the nodes' MACs), so the path crosses nodes: ARP -> announcing node -> nodeport (DNAT, SNAT)
  -> overlay -> backend.

The policy checks run through conformance.check.run_policy_check (remove policies, barrier, BASELINE in which both
VIPs answer, apply, barrier, K consecutive whole-table matches). The runner asks both VIPs with
`netprobe connect VIP:80/http`; "denied" is no HTTP answer within the probe timeout.

1. default-deny ingress: the runner is denied at both VIPs.
2. default-deny + an ipBlock of the runner's network: the runner reaches the Local VIP and its backend sees the
   runner's own address. What the Cluster VIP does under this policy is implementation-defined (the backend sees a
   node's address after SNAT; Cilium in tunnel mode enforces it with the `world` identity, which an ipBlock short
   of 0.0.0.0/0 does not select): its verdict is recorded, never judged (see the README).
3. default-deny + ipBlock 0.0.0.0/0 (every outside address; Cilium's `world`): the runner reaches both VIPs, the
   Cluster backend runs on another node than the announcer and sees a node's address (SNAT), not the runner's;
   which node and address is recorded.
4. Load: `netprobe load` from the runner to the Cluster VIP (--lb-load-connections at --lb-load-rate, held
   --conntrack-hold seconds, each verified end to end); the announcing node's datapath tables (BPF CT map, and the
   BPF NAT map with BPF masquerading; nf_conntrack without Cilium) must rise by at least the load while it is held;
   open rate and p99 connect time are judged against --lb-min-open-rate and --lb-max-connect-p99-ms.
"""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from conformance import cilium
from conformance import kube as k8s
from conformance.check import FlowKey, PolicyCheck, measure_policy_result, run_policy_check
from conformance.conftest import netprobe_on_runner
from conformance.expect import Expect, Target, TruthTable, observed_table
from conformance.hypervisor import TapDrops
from conformance.judge import (NotMeasured, judge_cross_node, judge_load, judge_open_rate, judge_snat_source,
                               judge_source_preserved, judge_table_rises, node_ips_from_facts)
from conformance.policies import allow_ingress_from_cidr, default_deny, replace_policies
from conformance.test_conntrack import OPEN_SLACK_SECONDS, VERIFY_SECONDS, ct_readings, read_while_held
from conformance.test_loadbalancer import (announcing_node, eligible_announcers, http_answer, http_get, neighbour_mac,
                                          node_macs, wait_http)
from lab.wait import wait_for

pytestmark = pytest.mark.xdist_group("metallb")  # with the other LB checks: failover disturbs the speakers

HTTP_PORT, TCP_PORT, LOAD_PORT = 8080, 9090, 81  # backend ports; the Services' port 81 -> TCP_PORT (load)
RUNNER = "outside/runner"
PROBE_TIMEOUT = 2.0
ROLES = ("local", "cluster")


@dataclass
class OutsideWorld:
    ns: str
    runner_ip: str
    runner_net: str                          # the ipBlock the runner is allowed from
    vips: dict[str, str]                     # role -> LoadBalancer IP
    backend_pods: dict[str, str]             # role -> pod name (its hostname: the `host` of its answers)
    pod_nodes: dict[str, str]                # pod name -> node
    pod_ips: dict[str, str]                  # role -> pod IP
    announcer: str | None                    # the node answering ARP for the Cluster VIP (as last read)
    node_ips: dict[str, list[str]] = field(default_factory=dict)
    macs: dict[str, set[str]] = field(default_factory=dict)     # node -> its link MACs (who owns a neighbour entry)
    announcer_moves: list[str] = field(default_factory=list)   # "cp1 -> w1": MetalLB moved the Cluster VIP

    @property
    def targets(self) -> dict[str, Target]:
        return {role: Target(f"{self.ns}/oi-{role}", 80, "TCP") for role in ROLES}

    def address_of(self) -> dict[Target, str]:
        return {t: f"{self.vips[role]}:80/http" for role, t in self.targets.items()}

    def flow_keys(self) -> dict:
        """The Local cell's packets reach its backend from the runner itself; the Cluster cell's come SNATed from
        an address known only once observed: no key (its drop reason is "unavailable")."""
        local = self.targets["local"]
        return {(RUNNER, local): FlowKey(self.runner_ip, frozenset([self.pod_ips["local"]]), HTTP_PORT, "TCP")}


def runner_network(settings, runner_ip: str) -> str:
    """The runner's network for the ipBlock: the lab network when it holds the runner, else the runner's /32."""
    if settings.lab is not None:
        net = ipaddress.ip_network(str(settings.lab.network.cidr), strict=False)
        if ipaddress.ip_address(runner_ip) in net:
            return str(net)
    return f"{runner_ip}/32"


# ---------------------------------------------------------------------------------------------- observation and checks
# (pure enough for the fault matrix: it runs them on netns stand-ins with its own probe)


def observe_from_runner(address_of: dict[Target, str], probe: Callable[[list[str], float], list],
                        timeout: float = PROBE_TIMEOUT) -> tuple[TruthTable, dict[Target, dict | None]]:
    """One observation: the runner asks every VIP at once (`netprobe connect VIP:80/http`). Returns the table
    and, per target, what its backend answered (`serve --http` JSON: host, peer) or None."""
    args = ["connect", "--timeout", str(timeout)]
    for address in address_of.values():
        args += ["--to", address]
    rows = probe(args, timeout * 2 + 30)
    table = observed_table([RUNNER], list(address_of), {RUNNER: rows}, address_of)
    by_to = {str(r.get("to")): r for r in rows}
    return table, {t: (http_answer(by_to[a]) if a in by_to else None) for t, a in address_of.items()}


class RunnerObservation:
    """The observe() run_policy_check polls; keeps the last answers, to judge what the backends saw, and with
    ``where`` the node announcing the Cluster VIP right after them (the runner's neighbour entry its probe just
    used): the node that handled that observation."""

    def __init__(self, address_of: dict[Target, str], probe: Callable[[list[str], float], list],
                 where: Callable[[], str | None] | None = None):
        self.address_of, self.probe, self.where = address_of, probe, where
        self.answers: dict[Target, dict | None] = {}
        self.announcer: str | None = None

    def __call__(self) -> TruthTable:
        table, self.answers = observe_from_runner(self.address_of, self.probe)
        if self.where is not None:
            self.announcer = self.where()
        return table


def outside_check(name: str, targets: dict[str, Target], expect: dict[str, Expect], manifests: list[dict],
                  flow_keys: dict | None = None) -> PolicyCheck:
    """The runner's row: ``expect`` per role (a role left out is observed and recorded, never judged); the
    baseline wants every VIP answering without policy."""
    expected, baseline = TruthTable([RUNNER], list(targets.values())), TruthTable([RUNNER], list(targets.values()))
    for role, target in targets.items():
        baseline.set(RUNNER, target, Expect.CONNECTED)
        if role in expect:
            expected.set(RUNNER, target, expect[role])
    return PolicyCheck(name, [RUNNER], list(targets.values()), manifests, expected, baseline, flow_keys or {})


def deny_policies(ns: str) -> list[dict]:
    return [default_deny(ns, ("Ingress",))]


def runner_allowed_policies(ns: str, runner_net: str) -> list[dict]:
    return deny_policies(ns) + [allow_ingress_from_cidr(ns, "allow-runner-network", runner_net, HTTP_PORT)]


def world_allowed_policies(ns: str) -> list[dict]:
    return deny_policies(ns) + [allow_ingress_from_cidr(ns, "allow-world", "0.0.0.0/0", HTTP_PORT)]


#: report name -> judge_load total (the names test_conntrack reports, so `lab report` compares them alike)
LOAD_MEASURES = {"connections_requested": "requested", "connections_held": "held", "connections_verified": "verified",
                 "connections_failed": "failed", "connection_resets": "resets", "open_rate_per_s": "open_rate_per_s",
                 "connect_ms_p99": "connect_ms_p99"}
DENIED = {"local": Expect.BLOCKED, "cluster": Expect.BLOCKED}
RUNNER_ALLOWED = {"local": Expect.CONNECTED}  # the Cluster cell: implementation-defined, recorded
WORLD_ALLOWED = {"local": Expect.CONNECTED, "cluster": Expect.CONNECTED}


def local_source_findings(world: OutsideWorld, seen: RunnerObservation) -> tuple[dict, list[str]]:
    """The Local backend's last answer under an allow: it saw the runner's own address (no SNAT)."""
    answer = seen.answers.get(world.targets["local"])
    problem = judge_source_preserved(answer, world.runner_ip)
    return {"peer_seen_by_local_backend": (answer or {}).get("peer")}, [problem] if problem else []


def cluster_path_findings(world: OutsideWorld, seen: RunnerObservation) -> tuple[dict, list[str]]:
    """The Cluster backend's last answer: it runs on another node than the announcer, and saw a node's address
    (SNAT by the announcing node), not the runner's. The record names the node, its address and the announcer."""
    answer = seen.answers.get(world.targets["cluster"])
    backend_node = world.pod_nodes.get(str((answer or {}).get("host")))
    announcer = getattr(seen, "announcer", None) or world.announcer  # who handled that last observation
    record, snat = judge_snat_source(answer, world.runner_ip, world.node_ips, announcer)
    record.update(announcing_node=announcer, cluster_backend_node=backend_node)
    if announcer != world.announcer:
        record["announcer_before_the_check"] = world.announcer
    if world.announcer_moves:
        record["announcer_moves"] = list(world.announcer_moves)
    return record, [p for p in (judge_cross_node(announcer, backend_node), snat) if p]


def load_args(vip: str, connections: int, rate: float, hold: float, verify: float = VERIFY_SECONDS,
              slack: float = OPEN_SLACK_SECONDS) -> list[str]:
    """`netprobe load` from the runner to the Cluster VIP's TCP port (its backend's `serve --tcp` echoes the
    verify byte); a 5 s connect timeout (judged: never scaled); ``verify`` (the echo's wait) and ``slack`` (how far
    the opening may run late) are the caller's, scaled by --time-scale."""
    return ["load", "--to", f"{vip}:{LOAD_PORT}", "--connections", str(connections), "--rate", f"{rate:g}",
            "--hold", f"{hold:g}", "--timeout", "5", "--verify-timeout", f"{verify:g}", "--open-slack", f"{slack:g}"]


def judge_outside_load(node: str, before: dict, result: dict, during: dict, connections: int, min_rate: float,
                       max_p99_ms: float) -> tuple[dict, list[str]]:
    """The load's totals and problems: every connection established, held and verified (judge_load); every table
    read on the announcing node rose by the load (judge_table_rises); open rate and p99 within the bounds."""
    total, problems = judge_load([result])
    problems += judge_table_rises(node, before, during, connections)
    problems += judge_open_rate(total, min_rate, max_p99_ms)
    return total, problems


def datapath_tables(kube, session, node_facts, agents: dict[str, str], node: str, nat: bool) -> dict:
    """table -> CtReading on ``node``: Cilium's BPF CT map (or nf_conntrack without Cilium) and, with ``nat``, the
    BPF NAT map. Any failed read is NotMeasured."""
    if agents and node not in agents:
        raise NotMeasured(f"no Cilium agent on {node} (agents on {sorted(agents)})")
    # In the BPF CT map only the load's own entries (the nodeport path's service entries, to the VIP's LOAD_PORT):
    # the whole map also holds the closed flows of the checks before, whose garbage collection while the load runs
    # made the rise negative on the CI cluster (-199 with 1000 connections held, the NAT map +2012)
    tables = {r.table: r for r in ct_readings(kube, session, node_facts, agents, only=node,
                                              dport=LOAD_PORT).values()}
    if nat:
        tables["bpf-nat"] = cilium.nat_reading(session, node, agents[node])
    return tables


# ---------------------------------------------------------------------------------------------- the world


def _backend(session, ns: str, role: str, node: str, generation: int = 0) -> str:
    name = (f"oi-{role}-{node}" + (f"-{generation}" if generation else ""))[:63]
    spec = session.probe_pod_spec(tcp=[TCP_PORT], http=[HTTP_PORT], node=node)
    session.create_pod(ns, {"metadata": {"name": name, "labels": {"app": f"oi-{role}", k8s.OWNER_LABEL: "true"}},
                            "spec": spec})
    return name


def _service(role: str) -> dict:
    svc = k8s.load_balancer_service(f"oi-{role}", f"oi-{role}", HTTP_PORT, local=role == "local")
    svc["spec"]["ports"].append({"name": "tcp", "port": LOAD_PORT, "targetPort": TCP_PORT, "protocol": "TCP"})
    return svc


def _wait_answer_from(ip: str, host: str, seconds: float) -> None:
    def check():
        answer = http_get(ip)
        return (True, answer) if answer and answer.get("host") == host else (False, f"answer {answer}")
    wait_for(f"http://{ip}/ to be answered by {host}", seconds, check, interval=0.5, hint=k8s.WAIT_HINT)


@pytest.fixture(scope="module")
def outside(session, kube, settings, runner_ip, node_facts) -> OutsideWorld:
    if not settings.lb_pool:
        pytest.skip("needs the MetalLB pool: pass --lab SPEC or --lb-pool CIDR|FIRST-LAST")
    nodes = sorted(k8s.node_addresses(kube))
    eligible, why_not = eligible_announcers(kube)
    if len(nodes) < 2 or not eligible:
        pytest.skip(f"outside-in needs a node that may announce and another node for the Cluster backend; nodes "
                    f"{nodes}, may announce {eligible} (others: {why_not or 'none'})")
    ns = session.namespace("oi")
    local_node = eligible[-1]
    never_announce = [n for n in nodes if n not in eligible]
    pods = {"local": _backend(session, ns, "local", local_node),
            "cluster": _backend(session, ns, "cluster", (never_announce or eligible)[0])}
    pod_nodes = {pods["local"]: local_node, pods["cluster"]: (never_announce or eligible)[0]}
    for role in ROLES:
        session.wait_pods_ready(ns, f"app=oi-{role}", 1, f"outside-in {role} backend")
        kube.core.create_namespaced_service(ns, _service(role))
    vips = {role: k8s.wait_ingress(kube, ns, f"oi-{role}", settings.wait_seconds) for role in ROLES}
    for role in ROLES:
        wait_http(vips[role], 60)
    macs = node_macs(node_facts)
    announcer, _, _ = announcing_node(vips["cluster"], macs)
    ready = {p.metadata.name: p.status.pod_ip for p in kube.core.list_namespaced_pod(ns).items}
    world = OutsideWorld(ns, runner_ip, runner_network(settings, runner_ip), vips, pods, pod_nodes,
                         {role: ready.get(pods[role], "") for role in ROLES}, announcer,
                         node_ips_from_facts(node_facts.facts()), macs)
    if announcer and announcer == pod_nodes[pods["cluster"]]:  # move the Cluster backend away from it
        _move_cluster_backend(session, kube, world, nodes)
    return world


def _move_cluster_backend(session, kube, world: OutsideWorld, nodes: list[str]) -> None:
    """Start the Cluster backend on a node other than the announcer, then remove the old one."""
    other = next(n for n in nodes if n != world.announcer)
    old = world.backend_pods["cluster"]
    new = _backend(session, world.ns, "cluster", other, generation=len(world.pod_nodes))
    world.backend_pods["cluster"], world.pod_nodes[new] = new, other
    session.wait_pods_ready(world.ns, "app=oi-cluster", 2, "outside-in cluster backend (moved)")
    kube.core.delete_namespaced_pod(old, world.ns, grace_period_seconds=0)
    _wait_answer_from(world.vips["cluster"], new, 60)
    world.pod_ips["cluster"] = kube.core.read_namespaced_pod(new, world.ns).status.pod_ip
    read_announcer(world)


def read_announcer(world: OutsideWorld) -> str | None:
    """The node announcing the Cluster VIP now: the runner asks the VIP (refreshing its neighbour entry), then
    reads whose MAC the entry holds. A change since the last read is recorded in ``world.announcer_moves``."""
    http_get(world.vips["cluster"])
    now, _, _ = announcing_node(world.vips["cluster"], world.macs)
    if now != world.announcer:
        world.announcer_moves.append(f"{world.announcer} -> {now}")
        world.announcer = now
    return now


class NeighbourWatch:
    """Reads the runner's neighbour entry for ``ip`` every ``interval`` seconds while a load runs: every node
    whose MAC it held (a gratuitous ARP from another speaker moves it, and with it the flows). Bounded: it stops
    when told or after ``seconds``."""

    def __init__(self, ip: str, macs: dict[str, set[str]], interval: float = 0.5, seconds: float = 3600.0,
                 neighbour: Callable[[str], str | None] = neighbour_mac):
        import threading
        self.ip, self.macs, self.interval, self.seconds = ip, macs, interval, seconds
        self.neighbour = neighbour
        self.seen: list[str] = []          # nodes in the order the entry named them (changes only)
        self.unknown: set[str] = set()     # MACs of no node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            node, mac, owners = announcing_node(self.ip, self.macs, self.neighbour)
            if mac and not owners:
                self.unknown.add(mac)
            if node and (not self.seen or self.seen[-1] != node):
                self.seen.append(node)
            self._stop.wait(self.interval)

    def __enter__(self) -> "NeighbourWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def judge_announcer_held(vip: str, node: str, seen: list[str], unknown: set[str]) -> list[str]:
    """The runner's neighbour entry for the VIP named ``node`` and only it while the load ran (``seen``: the
    nodes it named, in order)."""
    path = [node]
    for n in seen:
        if n != path[-1]:
            path.append(n)
    problems = []
    if len(path) > 1:
        problems.append(f"the runner's neighbour entry for {vip} moved while the load was held: {' -> '.join(path)} "
                        "(MetalLB moved or split the announcement; held flows cannot survive a move)")
    if unknown:
        problems.append(f"the runner's neighbour entry for {vip} held {sorted(unknown)}, no node's MAC")
    return problems


def keep_cluster_path_across_nodes(session, kube, world: OutsideWorld) -> None:
    """MetalLB may move an announcement while the suite runs (a speaker that missed its memberlist probes on a
    loaded node). Before a check whose path must cross nodes, the announcer is read again and the Cluster backend
    moved off it if it is there now; the move is recorded (announcer_moves), the path is judged as observed."""
    announcer = read_announcer(world)
    if announcer and announcer == world.pod_nodes[world.backend_pods["cluster"]]:
        _move_cluster_backend(session, kube, world, sorted(k8s.node_addresses(kube)))


@pytest.fixture(scope="module")
def enforcement(session, kube):
    return cilium.enforcement(session, kube)


def _policy_step(outside: OutsideWorld, kube, settings, measure, enforcement, name: str, manifests: list[dict],
                 expect: dict[str, Expect]) -> tuple:
    barrier, drops, why = enforcement
    check = outside_check(name, outside.targets, expect, manifests, outside.flow_keys())
    seen = RunnerObservation(outside.address_of(), netprobe_on_runner,
                             lambda: announcing_node(outside.vips["cluster"], outside.macs)[0])
    result = run_policy_check(check, lambda m: replace_policies(kube, [outside.ns], m), seen, barrier, drops,
                              settings.policy_seconds, consecutive=settings.policy_consecutive,
                              transport_errors=(k8s.ProbeFailed,), unavailable=why)
    measure_policy_result(measure, check, result)
    measure("runner", outside.runner_ip)
    measure("vips", outside.vips)
    return check, result, seen


def _report(measure, record: dict, problems: list[str]) -> None:
    """Findings into the JSON report, then the verdict."""
    for key, value in record.items():
        measure(key, value)
    assert not problems, "\n".join(problems)


@pytest.mark.datapath("observe")
def test_default_deny_denies_the_runner(outside, kube, settings, measure, enforcement):
    _, result, _ = _policy_step(outside, kube, settings, measure, enforcement, "outside-in default deny",
                                deny_policies(outside.ns), DENIED)
    assert result.passed, result.text


@pytest.mark.datapath("observe")
def test_ipblock_allows_the_runner_and_keeps_its_address(outside, kube, settings, measure, enforcement):
    _, result, seen = _policy_step(outside, kube, settings, measure, enforcement,
                                   f"outside-in ipBlock {outside.runner_net}",
                                   runner_allowed_policies(outside.ns, outside.runner_net), RUNNER_ALLOWED)
    measure("runner_network", outside.runner_net)
    last = result.enforced.last if result.enforced else None
    cluster = last.get(RUNNER, outside.targets["cluster"]) if last is not None else None
    measure("cluster_vip_under_runner_ipblock", cluster.value if cluster is not None else None)  # not judged
    assert result.passed, result.text
    _report(measure, *local_source_findings(outside, seen))


@pytest.mark.datapath("observe")
def test_cluster_traffic_crosses_nodes_and_is_snated(outside, session, kube, settings, measure, enforcement):
    keep_cluster_path_across_nodes(session, kube, outside)
    _, result, seen = _policy_step(outside, kube, settings, measure, enforcement, "outside-in ipBlock 0.0.0.0/0",
                                   world_allowed_policies(outside.ns), WORLD_ALLOWED)
    assert result.passed, result.text
    _report(measure, *cluster_path_findings(outside, seen))


@pytest.mark.datapath("load")
def test_lb_datapath_under_load_from_outside(outside, kube, session, node_facts, settings, measure, enforcement):
    barrier = enforcement[0]
    mark = barrier.mark()
    barrier.wait(mark, replace_policies(kube, [outside.ns], []), settings.policy_seconds)  # no policy left over
    keep_cluster_path_across_nodes(session, kube, outside)
    node = outside.announcer
    if not node:
        raise NotMeasured(f"cannot tell which node announces {outside.vips['cluster']}: the load's datapath "
                          "tables cannot be read")
    n, rate, hold = settings.lb_load_connections, settings.lb_load_rate, settings.conntrack_hold
    agents = cilium.agents(kube)
    nat = bool(agents) and settings.datapath.masquerading == "BPF"

    def read():
        return datapath_tables(kube, session, node_facts, agents, node, nat)
    before = read()
    taps = TapDrops(settings.lab)
    opening = n / rate if rate else n / 5000
    args = load_args(outside.vips["cluster"], n, rate, hold, session.deadline(VERIFY_SECONDS),
                     session.deadline(OPEN_SLACK_SECONDS))
    started = time.monotonic()
    with NeighbourWatch(outside.vips["cluster"], outside.macs) as watch:
        result, during = read_while_held(read, opening + min(hold / 2, 5),
                                         lambda: netprobe_on_runner(args, hold + opening + 120))
    total, problems = judge_outside_load(node, before, result, during, n, settings.lb_min_open_rate,
                                         settings.lb_max_connect_p99_ms)
    taps.stop()
    after = read_announcer(outside)
    problems[:0] = judge_announcer_held(outside.vips["cluster"], node, watch.seen + [after] if after else watch.seen,
                                        watch.unknown)
    measure("announcer_during_load", watch.seen)
    measure("announcing_node", node)
    measure("announcer_moves", list(outside.announcer_moves))
    measure("tables", sorted(before))
    for table in sorted(before):
        measure(f"{table.replace('-', '_')}_rise", during[table].entries - before[table].entries)
    for name, key in LOAD_MEASURES.items():
        measure(name, total[key])
    measure("min_open_rate_per_s", settings.lb_min_open_rate)
    measure("max_connect_ms_p99", settings.lb_max_connect_p99_ms)
    measure("load_seconds", round(time.monotonic() - started, 1))
    taps.report(measure, problems)
    assert not problems, (f"{n} connections from the runner to {outside.vips['cluster']}:{LOAD_PORT} "
                          f"(announced by {node}), held {hold}s:\n  " + "\n  ".join(problems))
