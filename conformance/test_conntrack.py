"""Conntrack under load: N concurrent connections from client pods through a ClusterIP Service and through the
LoadBalancer IP, held S seconds: zero failed, zero resets; the nodes' drop / early_drop / insert_failed counters
unchanged; with Cilium, its BPF conntrack map keeps headroom (with kube-proxy replacement the Service NAT lives in
BPF maps, so a clean nf_conntrack is not proof on its own).

N defaults to a quarter of the expected nf_conntrack_max, at most 20,000 per path (--conntrack-connections).
"""
from __future__ import annotations

import re
import threading

import pytest

from conformance import kube as k8s
from conformance.judge import conntrack_deltas, default_connections, judge_load

pytestmark = pytest.mark.xdist_group("metallb")  # shares the LoadBalancer speakers with test_loadbalancer

PORT = 8080
BPF_CT_HEADROOM = 0.2


@pytest.fixture(scope="module")
def load_world(session, kube, settings):
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("ct")
    servers = session.pods_per_node(ns, "ct-server", nodes, tcp=[PORT])
    clients = session.pods_per_node(ns, "ct-client", nodes)
    ports = [{"name": "tcp", "port": 80, "targetPort": PORT, "protocol": "TCP"}]
    for name, kind in (("ct-clusterip", "ClusterIP"), ("ct-lb", "LoadBalancer")):
        kube.core.create_namespaced_service(ns, {"metadata": {"name": name}, "spec": {
            "type": kind, "selector": {"app": "ct-server"}, "ports": ports}})
    cluster_ip = kube.core.read_namespaced_service("ct-clusterip", ns).spec.cluster_ip
    return {"ns": ns, "servers": servers, "clients": clients, "cluster_ip": cluster_ip}


def _lb_ip(kube, ns, settings):
    from conformance.test_loadbalancer import wait_ingress
    return wait_ingress(kube, ns, "ct-lb", settings.wait_seconds)


def connections(settings, clients: int) -> int:
    if settings.conntrack_connections:
        return settings.conntrack_connections
    expected_max = settings.expect_sysctls.get("net.netfilter.nf_conntrack_max")
    return default_connections(int(expected_max) if expected_max else None, clients)


def run_load(session, ns, clients: dict, address: str, total: int, hold: float) -> list[dict]:
    """Split ``total`` over the client pods; all hold at the same time."""
    share = [total // len(clients) + (1 if i < total % len(clients) else 0) for i in range(len(clients))]

    def one(pod, n):
        return session.netprobe(ns, pod, ["load", "--to", address, "--connections", str(n), "--rate", "5000",
                                          "--hold", str(hold), "--timeout", "5"], timeout=hold + n / 1000 + 120)

    return k8s.in_parallel([lambda pod=pod, n=n: one(pod, n)
                            for (pod, _), n in zip(clients.values(), share) if n])


def bpf_ct_headroom(kube, session) -> dict[str, float]:
    """Per Cilium agent: 1 - entries / max_entries of the global TCP CT map (read while the load is held)."""
    out = {}
    script = ("n=$(cilium-dbg bpf ct list global 2>/dev/null | grep -c TCP); "
              "m=$(bpftool map show name cilium_ct4_glob 2>/dev/null | grep -o 'max_entries [0-9]*' | head -1); "
              "echo \"$n ${m#max_entries }\"")
    for pod in kube.core.list_namespaced_pod("kube-system", label_selector="k8s-app=cilium").items:
        res = session.exec("kube-system", pod.metadata.name, ["sh", "-c", script], 120, container="cilium-agent")
        m = re.match(r"\s*(\d+)\s+(\d+)", res.stdout)
        if m and int(m.group(2)):
            out[pod.spec.node_name] = round(1 - int(m.group(1)) / int(m.group(2)), 3)
    return out


@pytest.mark.parametrize("path", ["clusterip", "loadbalancer"])
def test_connections_held_without_loss(path, load_world, session, kube, node_facts, settings, measure):
    ns = load_world["ns"]
    address = (f"{load_world['cluster_ip']}:80" if path == "clusterip" else f"{_lb_ip(kube, ns, settings)}:80")
    n = connections(settings, len(load_world["clients"]))
    before = node_facts.facts()
    headroom: dict = {}
    cilium = bool(kube.core.list_namespaced_pod("kube-system", label_selector="k8s-app=cilium").items)
    reader = None
    if cilium:  # sample the BPF CT map while the connections are held
        def sample():
            import time
            time.sleep(min(settings.conntrack_hold / 2, 5) + n / 5000)
            headroom.update(bpf_ct_headroom(kube, session))
        reader = threading.Thread(target=sample)
        reader.start()
    results = run_load(session, ns, load_world["clients"], address, n, settings.conntrack_hold)
    if reader:
        reader.join()
    after = node_facts.facts()
    total, problems = judge_load(results)
    drops = conntrack_deltas(before, after)
    if drops:
        problems.append(f"nf_conntrack counters rose (table full or races): {drops}")
    if cilium:
        low = {node: h for node, h in headroom.items() if h < BPF_CT_HEADROOM}
        if not headroom:
            problems.append("could not read Cilium's BPF conntrack map (cilium-dbg/bpftool in the agent)")
        elif low:
            problems.append(f"Cilium BPF conntrack map headroom below {BPF_CT_HEADROOM:.0%}: {low}")
        measure("bpf_ct_headroom", min(headroom.values()) if headroom else None)
    measure("connections_requested", total["requested"])
    measure("connections_held", total["held"] if "held" in total else total["established"])
    measure("connections_failed", total["failed"])
    measure("connection_resets", total["resets"])
    measure("open_rate_per_s", total["open_rate_per_s"])
    measure("connect_ms_p99", total["connect_ms_p99"])
    measure("conntrack_drops", sum(sum(d.values()) for d in drops.values()))
    assert not problems, f"{n} connections via {path} {address}, held {settings.conntrack_hold}s:\n  " + \
        "\n  ".join(problems)
