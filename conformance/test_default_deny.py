"""Default deny: a truth table over pods in three namespaces, kube-dns and two hosts outside the cluster.

Step 1, no policy: everything connects (proves the probes). Step 2, default-deny ingress and egress in the
protected namespaces: everything into and out of them is blocked, DNS included. Step 3, allow DNS egress to kube-dns
and frontend -> backend on one port: exactly those flows pass. Expected tables come from conformance/oracle.py; the
observed table is polled as a WHOLE until it matches or the deadline passes (policy enforcement lag); a mismatch
prints both tables with the differing cells marked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from conformance import kube as k8s
from conformance import policies
from conformance.conftest import serve_on_runner
from conformance.expect import Target, TruthTable, observed_table
from conformance.oracle import PolicyModel, External, Pod, expected_table
from conformance.judge import poll_table

pytestmark = pytest.mark.xdist_group("default_deny")

PORTS = (8080, 9090)
EXTERNAL_PORTS = {"web": 18080, "c2": 18081}  # "the Internet" and "a command-and-control server", on the runner
ALLOWED_PORT = 8080

# A DNS query over UDP: netprobe's UDP verdict needs an echo, which a DNS server does not give.
DNS_UDP_PROBE = r'''
import json, socket, struct, sys
ip, timeout = sys.argv[1], float(sys.argv[2])
name = b"".join(bytes([len(p)]) + p.encode() for p in "kubernetes.default.svc.cluster.local".split(".")) + b"\0"
query = struct.pack("!HHHHHH", 0x4B1D, 0x100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(timeout / 3)
verdict, tries = "timeout", 0
for tries in range(1, 4):
    try:
        sock.sendto(query, (ip, 53))
        data, _ = sock.recvfrom(4096)
        if data[:2] == query[:2]:
            verdict = "connected"
            break
    except socket.timeout:
        continue
    except OSError as exc:
        verdict = {111: "refused", 113: "unreachable", 101: "unreachable"}.get(exc.errno, "error")
        break
print(json.dumps([{"to": "%s:53/udp" % ip, "proto": "udp", "verdict": verdict, "tries": tries}]))
'''


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
    for proto in ("UDP", "TCP"):
        t = Target("kube-system/kube-dns", 53, proto)
        targets.append(t)
        address_of[t] = f"{dns_svc.spec.cluster_ip}:53"
    for name, port in EXTERNAL_PORTS.items():
        for proto in ("TCP", "UDP"):
            t = Target(f"ext/{name}", port, proto)
            targets.append(t)
            address_of[t] = f"{runner_ip}:{port}"
    return World([a, b], sources, targets, address_of, namespaces, pods, externals, dns_svc.spec.cluster_ip)


def expected(world: World, applied: list[dict]) -> TruthTable:
    model = PolicyModel(world.model_namespaces, world.model_pods, world.externals, applied)
    table = expected_table(model, list(world.sources), world.targets)
    for source in world.sources:  # a pod probing itself is not a policy question
        for t in world.targets:
            if t.id == source:
                table.cells.pop((source, t))
    return table


def observe(session, world: World) -> TruthTable:
    results = {}
    dns_udp = Target("kube-system/kube-dns", 53, "UDP")

    def probe(source, ns, pod):
        args = ["connect", "--timeout", "2", "--parallel", "64"]
        for t in world.targets:
            if t != dns_udp and t.id != source:
                args += ["--to", f"{world.address_of[t]}/{t.proto.lower()}"]
        out = session.netprobe(ns, pod, args, timeout=60)
        dns = session.exec(ns, pod, ["python3", "-c", DNS_UDP_PROBE, world.dns_ip, "3"], 30)
        if dns.rc != 0:
            raise k8s.ProbeFailed(f"DNS probe in {ns}/{pod} failed (exit {dns.rc}): {dns.stderr[:200]}")
        results[source] = out + json.loads(dns.stdout)

    # any error fails the whole observation (a transport failure), after every probe has finished
    k8s.in_parallel([lambda s=s, ns=ns, pod=pod: probe(s, ns, pod) for s, (ns, pod) in world.sources.items()])
    return observed_table(list(world.sources), world.targets, results, world.address_of)


def apply(kube, world: World, manifests: list[dict]) -> None:
    for ns in world.protected:
        kube.net.delete_collection_namespaced_network_policy(ns)
    for m in manifests:
        kube.net.create_namespaced_network_policy(m["metadata"]["namespace"], m)


def step2_policies(world):
    return [policies.default_deny(ns) for ns in world.protected]


def step3_policies(world):
    a, b = world.protected
    return step2_policies(world) + [policies.allow_dns(ns) for ns in world.protected] + [
        policies.allow_egress_to(a, "frontend-to-backend", {"app": "frontend"}, b, {"app": "backend"}, ALLOWED_PORT),
        policies.allow_ingress_from(b, "backend-from-frontend", {"app": "backend"}, a, {"app": "frontend"},
                                    ALLOWED_PORT)]


def _run_step(session, kube, world, settings, measure, manifests):
    apply(kube, world, manifests)
    want = expected(world, manifests)
    result = poll_table(want, lambda: observe(session, world), settings.policy_seconds,
                        transport_errors=(k8s.ProbeFailed,))
    measure("policy_converge_seconds", round(result.seconds, 1))
    measure("cells", len(want.cells))
    measure("transport_failures_retried", result.transport_failures)
    assert result.matched, result.text


def test_step1_no_policy_everything_connects(session, kube, world, settings, measure):
    _run_step(session, kube, world, settings, measure, [])


def test_step2_default_deny_blocks_everything_in_and_out(session, kube, world, settings, measure):
    _run_step(session, kube, world, settings, measure, step2_policies(world))


def test_step3_only_dns_and_frontend_to_backend_pass(session, kube, world, settings, measure):
    _run_step(session, kube, world, settings, measure, step3_policies(world))
