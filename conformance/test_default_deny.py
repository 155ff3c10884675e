"""Default deny: a truth table over pods, nodes, kube-dns and two hosts outside the cluster (conformance/world.py).

The world: three namespaces (frontend and backend protected, client open) with two probe pods each, pinned to two
nodes so that every pair of namespaces has same-node and cross-node cells (identity carried over the overlay is
exercised every run); a hostNetwork probe pod on each of those nodes (node -> pod flows); every node's SSH 22 and
kubelet 10250, API server 6443 and etcd 2379 on control planes (TCP connect only); kube-dns (a real DNS query);
ext/web at the runner IP and ext/c2 at a second address of the runner (--outside-ip). Every cell is labelled
same-node / cross-node / outside in the report and in failure messages.

Step 1, no policy: everything connects (proves the probes). Step 2, default-deny ingress and egress in the
protected namespaces: everything out of them is blocked, DNS and node ports included, and only each pod's own node
gets in. Step 3: DNS egress, and frontend -> backend on 8080/TCP with the ingress side naming the port (`http`).
Step 4: an egress allow-list, ipBlock 0.0.0.0/0 except ext/c2: ext/web connects, ext/c2 does not, and neither do
node ports (Cilium's ipBlock does not select node addresses unless policy-cidr-match-mode includes nodes).
Expected tables come from conformance/oracle.py.

Each step is one self-contained check run by conformance.check.run_policy_check: in the same check, with the same
pods, a baseline without any policy must show every flow the step blocks connecting (else the step fails naming
those cells); then the policies are applied, the Cilium enforcement barrier is awaited, and the WHOLE table must
match K times in a row (--policy-consecutive); a blocked cell that connects once is a failure. Where Hubble relay
is enabled every blocked cell's drop reason is recorded, and a drop for any reason but policy fails the step.
"""
from __future__ import annotations

import pytest

from conformance import cilium
from conformance import kube as k8s
from conformance import policies
from conformance.check import measure_policy_result, run_policy_check
from conformance.conftest import second_outside_address, serve_on_runner
from conformance.expect import TruthTable, cell_id
from conformance.oracle import CROSS_NODE, SAME_NODE, External, Node, Pod
from conformance.world import (EXTERNAL_PORTS, NAMED_PORTS, PODS_PER_NAMESPACE, PORTS, ROLES, Dns, World, pin_nodes,
                               placement_counts, placement_gaps, step2_policies, step3_policies, step4_policies)

pytestmark = [pytest.mark.xdist_group("default_deny"), pytest.mark.datapath("observe")]

CONNECT_SECONDS = 2.0  # netprobe connect's wait per cell, times --time-scale
NAMESPACE_PREFIX = {"frontend": "dd-a", "backend": "dd-b", "client": "dd-c"}


@pytest.fixture(scope="module")
def world(session, kube, runner_ip, settings):
    servers = [serve_on_runner(runner_ip, {"web": EXTERNAL_PORTS["web"]})]
    try:
        c2_ip, why = second_outside_address(settings, runner_ip)
        if c2_ip:
            servers.append(serve_on_runner(c2_ip, {"c2": EXTERNAL_PORTS["c2"]}, option="--outside-ip"))
        yield _build_world(session, kube, runner_ip, c2_ip, why, bool(settings.outside_ip))
    finally:
        for server in servers:
            server.stop()


def _cluster_nodes(kube) -> list[Node]:
    control = k8s.control_plane_nodes(kube)
    return [Node(name, ip, name in control) for name, ip in sorted(k8s.node_addresses(kube).items())]


def _build_world(session, kube, runner_ip, c2_ip, c2_why, c2_explicit) -> World:
    nodes = _cluster_nodes(kube)
    pinned = pin_nodes(nodes)
    roles = {role: session.namespace(NAMESPACE_PREFIX[role], {"kvmlab.io/role": (
        "protected" if role != "client" else "open")}) for role in ROLES}
    hosts = session.namespace("dd-nodes", {k8s.PSA_LABEL: "privileged"})  # hostNetwork probe pods
    for role, ns in roles.items():
        for i, node in enumerate(pinned):
            session.probe_pod(ns, f"{role}-{i}", {"app": role}, tcp=PORTS, udp=PORTS, named_ports=NAMED_PORTS,
                              node=node)
    host_nodes = list(dict.fromkeys(pinned))
    for node in host_nodes:
        session.probe_pod(hosts, f"host-{node}"[:63], {"app": "host"}, node=node, host_network=True)
    pods, handles = [], {}
    for role, ns in roles.items():
        for ready in session.wait_pods_ready(ns, f"app={role}", PODS_PER_NAMESPACE, role):
            pod = Pod(ns, ready.metadata.name, {"app": role}, ready.status.pod_ip, NAMED_PORTS,
                      node=ready.spec.node_name)
            pods.append(pod)
            handles[pod.id] = (ns, pod.name)
    for ready in session.wait_pods_ready(hosts, "app=host", len(host_nodes), "hostNetwork probes (one per node)"):
        handles[f"node/{ready.spec.node_name}"] = (hosts, ready.metadata.name)
    dns_svc = kube.core.read_namespaced_service("kube-dns", "kube-system")
    dns_pods = kube.core.list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns").items
    assert dns_pods, "no kube-dns pods (kube-system, k8s-app=kube-dns)"
    dns = Dns(Pod("kube-system", "kube-dns", dict(dns_pods[0].metadata.labels), dns_pods[0].status.pod_ip or ""),
              dns_svc.spec.cluster_ip, frozenset(p.status.pod_ip for p in dns_pods if p.status.pod_ip),
              frozenset(p.spec.node_name for p in dns_pods if p.spec.node_name))
    namespaces = {ns.metadata.name: dict(ns.metadata.labels or {}) for ns in kube.core.list_namespace().items
                  if ns.metadata.name in (*roles.values(), "kube-system")}
    externals, unavailable = [External("web", runner_ip)], {}
    if c2_ip:
        c2_why = _reach(session, handles[pods[0].id], c2_ip, EXTERNAL_PORTS["c2"], c2_explicit)
    if c2_ip and not c2_why:
        externals.append(External("c2", c2_ip))
    else:
        unavailable["ext/c2"] = c2_why
    notes = [] if len(host_nodes) > 1 else [
        f"one node ({host_nodes[0]}): every pod cell is same-node; cross-node flows (identity over the overlay) are "
        "not exercised"]
    return World(roles, namespaces, pods, nodes, [n for n in nodes if n.name in host_nodes], externals, handles,
                 dns=dns, notes=notes, unavailable=unavailable)


def _reach(session, handle, ip: str, port: int, explicit: bool) -> str:
    """"" when a probe pod connects to ext/c2's address; else why it is left out (an explicit --outside-ip that pods
    cannot reach is an error, not a skip)."""
    ns, pod = handle
    [row] = session.netprobe(ns, pod, ["connect", "--timeout", f"{session.deadline(3):g}",
                                       "--to", f"{ip}:{port}/tcp"])
    if row.get("verdict") == "connected":
        return ""
    why = (f"a pod cannot reach {ip}:{port} ({row.get('verdict')}): this host's firewall drops pod traffic to that "
           "address, or pods have no route to it")
    if explicit:
        raise k8s.ConformanceError(f"--outside-ip: {why}", "pass an address of this host that pods reach")
    return f"ext/c2 at this host's default-route address {ip}: {why}; pass --outside-ip"


def observe(session, world: World) -> TruthTable:
    """One complete observation: every source probes its targets at the same time (netprobe connect; kube-dns
    with a real DNS query, ``/dns`` and ``/dns-tcp``). Any probe that could not run fails the whole observation."""
    return _connect(session, world)


def reprobe(session, world: World, cells: list) -> TruthTable:
    """Those cells probed again, each source at once for its cells (poll_table's re-probe of lost allowed cells);
    cells not probed stay unset."""
    by_source: dict[str, set] = {}
    for source, target in cells:
        by_source.setdefault(source, set()).add(target)
    return _connect(session, world, by_source)


def _connect(session, world: World, targets_of: dict[str, set] | None = None) -> TruthTable:
    """Every source (``targets_of``: those sources, each for those targets) probes at the same time."""
    # Each connect's wait grows with --time-scale: on the TCG cluster under load a probe in a pod reported its 2 s
    # timeouts 3-5.7 s late, so a reachable cell could be judged "timeout".
    connect_seconds = session.deadline(CONNECT_SECONDS)
    sources = world.sources if targets_of is None else list(targets_of)

    def probe(source):
        ns, pod = world.handles[source]
        only = None if targets_of is None else targets_of[source]
        return source, session.netprobe(ns, pod, world.connect_args(source, connect_seconds, only=only), timeout=60)

    return world.observed(dict(k8s.in_parallel([lambda s=s: probe(s) for s in sources])))


def apply(kube, world: World, manifests: list[dict]) -> int:
    """Replace the policies in the protected namespaces; returns how many objects were deleted or created."""
    return policies.replace_policies(kube, world.protected, manifests)


@pytest.fixture(scope="module")
def enforcement(session, kube):
    """The barrier and the drop source for this cluster: Cilium's agents, Hubble where relay is enabled."""
    return cilium.enforcement(session, kube)


def _run_step(session, kube, world, settings, measure, warn, enforcement, name, manifests):
    barrier, drops, why = enforcement
    check = world.check(name, manifests)
    for note in world.notes + [f"placement gap: {g}" for g in placement_gaps(world, check.expected)
                               if not world.notes]:
        warn(note)
    result = run_policy_check(check, lambda m: apply(kube, world, m), lambda: observe(session, world), barrier,
                              drops, settings.policy_seconds, consecutive=settings.policy_consecutive,
                              transport_errors=(k8s.ProbeFailed,), unavailable=why,
                              reprobe=lambda cells: reprobe(session, world, cells))
    counts = placement_counts(check.expected)
    measure("cells_same_node", counts.get(SAME_NODE, 0))
    measure("cells_cross_node", counts.get(CROSS_NODE, 0))
    measure_policy_result(measure, check, result, record={"placements": {
        cell_id(s, t): label for (s, t), label in sorted(check.expected.labels.items())}})
    assert result.passed, result.text


def test_step1_no_policy_everything_connects(session, kube, world, settings, measure, warn, enforcement):
    _run_step(session, kube, world, settings, measure, warn, enforcement, "no policy", [])


def test_step2_default_deny_blocks_everything_in_and_out(session, kube, world, settings, measure, warn, enforcement):
    _run_step(session, kube, world, settings, measure, warn, enforcement, "default deny", step2_policies(world))


def test_step3_only_dns_and_frontend_to_backend_pass(session, kube, world, settings, measure, warn, enforcement):
    _run_step(session, kube, world, settings, measure, warn, enforcement,
              "allow DNS and frontend->backend (ingress by named port http)", step3_policies(world))


def test_step4_egress_allow_list_with_except(session, kube, world, settings, measure, warn, enforcement):
    if "ext/c2" in world.unavailable:
        pytest.skip(f"needs ext/c2 at a second address of this host: {world.unavailable['ext/c2']}")
    _run_step(session, kube, world, settings, measure, warn, enforcement,
              "egress allow-list 0.0.0.0/0 except ext/c2", step4_policies(world))
