"""Default deny: a truth table over pods in three namespaces, kube-dns and two hosts outside the cluster.

Step 1, no policy: everything connects (proves the probes). Step 2, default-deny ingress and egress in the
protected namespaces: everything into and out of them is blocked, DNS included. Step 3, allow DNS egress to kube-dns
and frontend -> backend on one port: exactly those flows pass. Expected tables come from conformance/oracle.py.

Each step is one self-contained check run by conformance.check.run_policy_check: in the same check, with the same
pods, a baseline without any policy must show every flow the step blocks connecting (else the step fails naming
those cells); then the policies are applied, the Cilium enforcement barrier is awaited, and the WHOLE table must
match K times in a row (--policy-consecutive); a blocked cell that connects once is a failure. Where Hubble relay
is enabled every blocked cell's drop reason is recorded, and a drop for any reason but policy fails the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from conformance import cilium
from conformance import kube as k8s
from conformance import policies
from conformance.check import FlowKey, PolicyCheck, measure_policy_result, run_policy_check
from conformance.conftest import serve_on_runner
from conformance.expect import Target, TruthTable, observed_table
from conformance.oracle import PolicyModel, External, Pod, expected_table

pytestmark = [pytest.mark.xdist_group("default_deny"), pytest.mark.datapath("observe")]

PORTS = (8080, 9090)
EXTERNAL_PORTS = {"web": 18080, "c2": 18081}  # "the Internet" and "a command-and-control server", on the runner
ALLOWED_PORT = 8080

@dataclass
class World:
    protected: list[str]
    sources: dict[str, tuple[str, str]]  # id -> (namespace, pod)
    targets: list[Target]
    address_of: dict[Target, str]
    model_namespaces: dict
    model_pods: list
    externals: list
    dns_ip: str
    flow_keys: dict  # (source, Target) -> FlowKey


@pytest.fixture(scope="module")
def world(session, kube, runner_ip, settings):
    runner = serve_on_runner(runner_ip, EXTERNAL_PORTS)
    try:
        yield _build_world(session, kube, runner_ip, settings)
    finally:
        runner.stop()


def _build_world(session, kube, runner_ip, settings) -> World:
    a, b, c = (session.namespace(n, {"kvmlab.io/role": r}) for n, r in
               (("dd-a", "protected"), ("dd-b", "protected"), ("dd-c", "open")))
    roles = {a: ("frontend", {"app": "frontend"}), b: ("backend", {"app": "backend"}), c: ("client", {"app": "client"})}
    for ns, (name, labels) in roles.items():
        session.probe_pod(ns, name, labels, tcp=PORTS, udp=PORTS, named_ports={"http": (ALLOWED_PORT, "TCP")})
    pods, sources = [], {}
    for ns, (name, labels) in roles.items():
        ready = session.wait_pods_ready(ns, f"app={labels['app']}", 1, name)[0]
        pods.append(Pod(ns, name, labels, ready.status.pod_ip, {"http": (ALLOWED_PORT, "TCP")}))
        sources[f"{ns}/{name}"] = (ns, name)
    dns_svc = kube.core.read_namespaced_service("kube-dns", "kube-system")
    dns_pods = kube.core.list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns").items
    assert dns_pods, "no kube-dns pods (kube-system, k8s-app=kube-dns)"
    pods.append(Pod("kube-system", "kube-dns", dict(dns_pods[0].metadata.labels), dns_pods[0].status.pod_ip))
    namespaces = {ns.metadata.name: dict(ns.metadata.labels or {}) for ns in kube.core.list_namespace().items
                  if ns.metadata.name in (a, b, c, "kube-system")}
    externals = [External(name, runner_ip) for name in EXTERNAL_PORTS]
    targets, address_of = [], {}
    for pod in pods[:3]:
        for port in PORTS:
            for proto in ("TCP", "UDP"):
                t = Target(pod.id, port, proto)
                targets.append(t)
                address_of[t] = f"{pod.ip}:{port}"
    for proto, probe in (("UDP", "dns"), ("TCP", "dns-tcp")):  # a real DNS query: netprobe connect .../dns
        t = Target("kube-system/kube-dns", 53, proto)
        targets.append(t)
        address_of[t] = f"{dns_svc.spec.cluster_ip}:53/{probe}"
    for name, port in EXTERNAL_PORTS.items():
        for proto in ("TCP", "UDP"):
            t = Target(f"ext/{name}", port, proto)
            targets.append(t)
            address_of[t] = f"{runner_ip}:{port}"
    ip_of = {p.id: p.ip for p in pods[:3]}
    dns_ips = frozenset([dns_svc.spec.cluster_ip] + [p.status.pod_ip for p in dns_pods if p.status.pod_ip])
    keys = {}
    for source in sources:
        for t in targets:
            dst = dns_ips if t.id == "kube-system/kube-dns" else frozenset(
                [runner_ip] if t.id.startswith("ext/") else [ip_of[t.id]])
            keys[(source, t)] = FlowKey(ip_of[source], dst, t.port, t.proto)
    return World([a, b], sources, targets, address_of, namespaces, pods, externals, dns_svc.spec.cluster_ip, keys)


def expected(world: World, applied: list[dict]) -> TruthTable:
    model = PolicyModel(world.model_namespaces, world.model_pods, world.externals, applied)
    table = expected_table(model, list(world.sources), world.targets)
    for source in world.sources:  # a pod probing itself is not a policy question
        for t in world.targets:
            if t.id == source:
                table.cells.pop((source, t))
    return table


def observe(session, world: World) -> TruthTable:
    """One complete observation: every source probes every target at the same time (netprobe connect; kube-dns
    with a real DNS query, ``/dns`` and ``/dns-tcp``). Any probe that could not run fails the whole observation."""
    def probe(source, ns, pod):
        args = ["connect", "--timeout", "2", "--parallel", "64"]
        for t in world.targets:
            if t.id != source:
                to = world.address_of[t]
                args += ["--to", to if "/" in to else f"{to}/{t.proto.lower()}"]
        return source, session.netprobe(ns, pod, args, timeout=60)

    results = dict(k8s.in_parallel([lambda s=s, ns=ns, pod=pod: probe(s, ns, pod)
                                    for s, (ns, pod) in world.sources.items()]))
    return observed_table(list(world.sources), world.targets, results, world.address_of)


def apply(kube, world: World, manifests: list[dict]) -> int:
    """Replace the policies in the protected namespaces; returns how many objects were deleted or created."""
    return policies.replace_policies(kube, world.protected, manifests)


def make_check(world: World, name: str, manifests: list[dict]) -> PolicyCheck:
    return PolicyCheck(name, list(world.sources), world.targets, manifests, expected(world, manifests),
                       expected(world, []), world.flow_keys)


@pytest.fixture(scope="module")
def enforcement(session, kube):
    """The barrier and the drop source for this cluster: Cilium's agents, Hubble where relay is enabled."""
    return cilium.enforcement(session, kube)


def step2_policies(world):
    return [policies.default_deny(ns) for ns in world.protected]


def step3_policies(world):
    a, b = world.protected
    return step2_policies(world) + [policies.allow_dns(ns) for ns in world.protected] + [
        policies.allow_egress_to(a, "frontend-to-backend", {"app": "frontend"}, b, {"app": "backend"}, ALLOWED_PORT),
        policies.allow_ingress_from(b, "backend-from-frontend", {"app": "backend"}, a, {"app": "frontend"},
                                    ALLOWED_PORT)]


def _run_step(session, kube, world, settings, measure, enforcement, name, manifests):
    barrier, drops, why = enforcement
    check = make_check(world, name, manifests)
    result = run_policy_check(check, lambda m: apply(kube, world, m), lambda: observe(session, world), barrier,
                              drops, settings.policy_seconds, consecutive=settings.policy_consecutive,
                              transport_errors=(k8s.ProbeFailed,), unavailable=why)
    measure_policy_result(measure, check, result)
    assert result.passed, result.text


def test_step1_no_policy_everything_connects(session, kube, world, settings, measure, enforcement):
    _run_step(session, kube, world, settings, measure, enforcement, "no policy", [])


def test_step2_default_deny_blocks_everything_in_and_out(session, kube, world, settings, measure, enforcement):
    _run_step(session, kube, world, settings, measure, enforcement, "default deny", step2_policies(world))


def test_step3_only_dns_and_frontend_to_backend_pass(session, kube, world, settings, measure, enforcement):
    _run_step(session, kube, world, settings, measure, enforcement, "allow DNS and frontend->backend",
              step3_policies(world))
