"""LoadBalancer (MetalLB L2): IP from the pool within a deadline, HTTP from the runner reaches a backend, the runner's
neighbour entry maps the IP to exactly one node, a requested IP is honoured, a request beyond the pool stays Pending
with an event saying why, externalTrafficPolicy Local keeps the client's source IP, and failover: with the
announcing node's speaker gone, the seconds until the IP answers again from another node, judged against a bound
(--failover-seconds, default 30). Failover is `disruptive`: it runs in the serial stage after every other check.

Backends are `netprobe serve --http` (JSON {"host": pod name, "peer": client address as the pod sees it}); the
runner asks with `netprobe connect IP:80/http` (raw sockets: no http_proxy from the environment applies).
"""
from __future__ import annotations

import json
import subprocess
import time
from typing import Callable

import pytest

from conformance import kube as k8s
from conformance.conftest import netprobe_on_runner
from conformance.judge import (NotMeasured, ip_in_pool, judge_announcer, judge_backend_answer, judge_failover,
                               judge_requested_ip, judge_source_preserved, outside_pool_address, parse_link_macs,
                               parse_neighbour)
from conformance.l2 import failover_skip_reason, may_announce
from lab.errors import WaitTimeout
from lab.wait import wait_for

pytestmark = pytest.mark.xdist_group("metallb")  # failover disturbs the speakers: keep LB checks on one worker

HTTP_PORT = 8080
FAILOVER_TAINT = k8s.SUITE_TAINTS[0]  # `--cleanup-only` removes it if a killed run left it


def http_get(ip: str, port: int = 80, timeout: float = 2.0) -> dict | None:
    """GET / from the runner with netprobe (`connect IP:PORT/http`: raw sockets, no proxy from the environment);
    the backend's JSON ({"host", "peer", ...} from `netprobe serve --http`), or None when nothing answered.
    A netprobe that could not run is a ProbeFailed, never "no answer"."""
    [row] = netprobe_on_runner(["connect", "--timeout", str(timeout), "--to", f"{ip}:{port}/http"], timeout + 30)
    return http_answer(row)


def http_answer(row: dict) -> dict | None:
    """One `netprobe connect .../http` row -> the backend's JSON body, or None when nothing answered."""
    if row["verdict"] != "connected":
        return None
    try:
        return json.loads(row["http"]["body"])
    except (KeyError, ValueError):
        return None


def lb_service(name: str, annotations: dict | None = None, local: bool = False) -> dict:
    return k8s.load_balancer_service(name, "lb-backend", HTTP_PORT, annotations=annotations, local=local)


wait_ingress = k8s.wait_ingress


def neighbour_mac(ip: str) -> str | None:
    res = subprocess.run(["ip", "neigh", "show", "to", ip], capture_output=True, text=True, timeout=10)
    return parse_neighbour(res.stdout, ip)


@pytest.fixture(scope="module")
def lb(session, kube, settings, runner_ip):
    if not settings.lb_pool:
        pytest.skip("needs the MetalLB pool: pass --lab SPEC or --lb-pool CIDR|FIRST-LAST")
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("lb")
    for node in nodes:  # netprobe serve --http: answers {"host": pod name, "peer": client address}
        spec = session.probe_pod_spec(node=node)
        spec["containers"][0].update(command=["python3", k8s.NETPROBE, "serve", "--http", str(HTTP_PORT)],
                                     ports=[{"containerPort": HTTP_PORT, "name": "http"}])
        session.create_pod(ns, {"metadata": {"name": f"backend-{node}", "labels": {
            "app": "lb-backend", k8s.OWNER_LABEL: "true"}}, "spec": spec})
    session.wait_pods_ready(ns, "app=lb-backend", len(nodes), "HTTP backends (one per node)")
    started = time.monotonic()
    kube.core.create_namespaced_service(ns, lb_service("lb-auto"))
    ip = wait_ingress(kube, ns, "lb-auto", settings.wait_seconds)
    return {"ns": ns, "ip": ip, "seconds": time.monotonic() - started, "nodes": nodes}


def test_ip_from_pool_within_deadline(lb, settings, measure):
    measure("lb_ip_seconds", round(lb["seconds"], 1))
    measure("lb_ip", lb["ip"])
    assert ip_in_pool(lb["ip"], settings.lb_pool), f"LoadBalancer IP {lb['ip']} is outside the pool {settings.lb_pool}"


def wait_http(ip: str, seconds: float) -> dict:
    def check():
        answer = http_get(ip)
        return (True, answer) if answer is not None else (False, "no HTTP answer")
    return wait_for(f"HTTP GET http://{ip}/ from the runner to be answered", seconds, check, interval=0.5,
                    hint=k8s.WAIT_HINT)


def test_http_from_runner_reaches_a_backend(lb, measure):
    answer = wait_http(lb["ip"], 60)
    measure("backend", answer["host"])
    problem = judge_backend_answer(answer)
    assert not problem, problem


def node_macs(node_facts) -> dict[str, set[str]]:
    return {node: parse_link_macs(node_facts.host(node, "ip -o link").stdout) for node in node_facts.pods}


def announcing_node(ip: str, macs: dict[str, set[str]],
                    neighbour: Callable[[str], str | None] = neighbour_mac) -> tuple[str | None, str | None, list[str]]:
    """(the node whose MAC the neighbour entry for ip holds, that MAC, every node owning it); ``neighbour`` reads
    the entry (the runner's own table here; a test reads its namespace's)."""
    mac = neighbour(ip)
    owners = [n for n, m in macs.items() if mac and mac in m]
    return judge_announcer(ip, mac, macs)[0], mac, owners


def test_neighbour_entry_maps_to_exactly_one_node(lb, node_facts, measure):
    wait_http(lb["ip"], 60)
    node, problem = judge_announcer(lb["ip"], neighbour_mac(lb["ip"]), node_macs(node_facts))
    measure("announcing_node", node)
    assert not problem, problem


def test_requested_ip_is_honoured(lb, kube, settings, measure):
    from lab.spec import pool_ranges
    first, last = pool_ranges(settings.lb_pool[-1])
    want = str(last) if str(last) != lb["ip"] else str(last - 1)
    kube.core.create_namespaced_service(lb["ns"], lb_service("lb-requested", {"metallb.io/loadBalancerIPs": want}))
    got = wait_ingress(kube, lb["ns"], "lb-requested", settings.wait_seconds)
    measure("requested_ip", want)
    problem = judge_requested_ip(want, got)
    assert not problem, problem


def test_request_beyond_pool_stays_pending_with_event(lb, kube, settings, measure):
    network = str(settings.lab.network.cidr) if settings.lab else None
    beyond = outside_pool_address(settings.lb_pool, network)
    ns = lb["ns"]
    kube.core.create_namespaced_service(ns, lb_service("lb-beyond", {"metallb.io/loadBalancerIPs": beyond}))

    def check():
        events = kube.core.list_namespaced_event(ns, field_selector="involvedObject.name=lb-beyond").items
        failed = [e for e in events if e.reason == "AllocationFailed"]
        return (True, failed) if failed else (False, f"events: {[(e.reason, e.message) for e in events] or 'none'}")
    events = wait_for(f"an AllocationFailed event for {ns}/lb-beyond ({beyond} is outside the pool)", 120, check,
                      interval=1.0, hint=k8s.WAIT_HINT)
    svc = kube.core.read_namespaced_service("lb-beyond", ns)
    ingress = svc.status.load_balancer.ingress if svc.status and svc.status.load_balancer else None
    measure("event", events[0].message)
    assert not ingress, f"{beyond} is outside the pool {settings.lb_pool} but the Service got {ingress}"


def test_external_traffic_policy_local_preserves_source_ip(lb, kube, settings, runner_ip, measure):
    kube.core.create_namespaced_service(lb["ns"], lb_service("lb-local", local=True))
    ip = wait_ingress(kube, lb["ns"], "lb-local", settings.wait_seconds)
    answer = wait_http(ip, 60)
    measure("peer_seen_by_backend", answer["peer"])
    problem = judge_source_preserved(answer, runner_ip)
    assert not problem, problem


def eligible_announcers(kube) -> tuple[list[str], dict[str, str]]:
    """Nodes that may announce the Service (conformance.l2.may_announce: Ready, no exclusion label, a MetalLB
    speaker running where speakers are found) and why the others may not."""
    from conformance.l2 import ready_nodes
    nodes = kube.core.list_node().items
    speakers = kube.core.list_namespaced_pod("metallb-system", label_selector="component=speaker").items
    return may_announce({n.metadata.name: dict(n.metadata.labels or {}) for n in nodes}, ready_nodes(nodes),
                        speaker_nodes=[p.spec.node_name for p in speakers if k8s._pod_ready(p)] if speakers else None)


CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"


def vip_announced_off_the_control_plane(lb, kube, settings, macs) -> tuple[str, str]:
    """(VIP, announcer) of a Service announced by a node that is not a control plane: suspending or unplugging the
    only API server would take the cluster away with the announcer. The lb fixture's VIP when a worker announces
    it, else extra Services with other requested pool addresses until one is (MetalLB picks the announcer per
    address); NotMeasured naming the addresses tried when none is."""
    from lab.spec import pool_ranges
    control_planes = {n.metadata.name for n in kube.core.list_node().items
                      if CONTROL_PLANE_LABEL in (n.metadata.labels or {})}
    wait_http(lb["ip"], 60)
    node, mac, _ = announcing_node(lb["ip"], macs)
    if node and node not in control_planes:
        return lb["ip"], node
    tried = [f"{lb['ip']} ({node})"]
    first, last = pool_ranges(settings.lb_pool[0])
    for i, address in enumerate(a for a in (first + k for k in range(int(last) - int(first) + 1))
                                if str(a) != lb["ip"]):
        if i >= 6:
            break
        name = f"lb-failover-{i}"
        kube.core.create_namespaced_service(lb["ns"], lb_service(name, {"metallb.io/loadBalancerIPs": str(address)}))
        ip = wait_ingress(kube, lb["ns"], name, settings.wait_seconds)
        wait_http(ip, 60)
        node, mac, _ = announcing_node(ip, macs)
        if node and node not in control_planes:
            return ip, node
        tried.append(f"{ip} ({node})")
    raise NotMeasured("every VIP tried is announced by a control plane, which --failover-by "
                      f"{settings.failover_by} would take away with the API server: {', '.join(tried)}")


def wait_node_ready(kube, node: str, seconds: float) -> None:
    from conformance.l2 import ready_nodes

    def check():
        ready = node in ready_nodes(kube.core.list_node().items)
        return (True, None) if ready else (False, f"{node} not Ready")
    wait_for(f"node {node} to be Ready again after the failover check restored it", seconds, check, interval=2.0,
             hint=k8s.WAIT_HINT)


@pytest.mark.disruptive
def test_failover_to_another_node(lb, kube, node_facts, settings, measure):
    """Take the announcing node away (--failover-by: its speaker evicted by a NoExecute taint, its VM suspended,
    or its NIC set down through libvirt); time until the IP answers HTTP from another node."""
    from conformance.failover import HYPERVISOR_METHODS, take_down
    skip = failover_skip_reason(*eligible_announcers(kube))
    if skip:  # a skip, reported as one (never a pass)
        pytest.skip(skip)
    method = settings.failover_by
    macs = node_macs(node_facts)
    if method in HYPERVISOR_METHODS:
        ip, before = vip_announced_off_the_control_plane(lb, kube, settings, macs)
    else:
        ip = lb["ip"]
        wait_http(ip, 60)
        before, mac, owners = announcing_node(ip, macs)
        assert before, f"cannot tell the announcing node ({ip} at {mac}, owners {owners})"
    restore = take_down(kube, settings.lab, before, method, FAILOVER_TAINT)
    started = time.monotonic()
    try:
        def check():
            answer = http_get(ip, timeout=1.0)
            now, mac_now, _ = announcing_node(ip, macs)
            done = answer is not None and now is not None and now != before
            state = f"HTTP {'ok' if answer else 'no answer'}, {ip} at {mac_now} ({now})"
            return (True, now) if done else (False, state)
        bound = settings.failover_seconds
        seconds, after, waited = None, None, ""
        try:
            after = wait_for(f"{ip} to answer from a node other than {before} ({method})", bound, check,
                             interval=0.2,
                             hint="raise --failover-seconds only if this failover time is acceptable in production")
            seconds = time.monotonic() - started
        except WaitTimeout as exc:
            waited = str(exc)
        record, problem = judge_failover(seconds, bound, time.monotonic() - started)
    finally:
        restore()
    wait_node_ready(kube, before, max(settings.wait_seconds, 300))
    for key, value in record.items():  # measured time against the bound, in the JSON report either way
        measure(key, value)
    measure("failover", f"{before} -> {after}")
    measure("failover_by", method)
    assert not problem, problem + (f": {waited}" if waited else "")
