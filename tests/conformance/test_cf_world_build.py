"""The default-deny world built through the REAL kubernetes client against the API double: two probe pods per
namespace pinned to two nodes (a worker first, a control plane tolerated), each container declaring the named port
`http`, one hostNetwork probe pod per pinned node in a namespace labelled privileged, every node a target (API
server and etcd on the control plane only), kube-dns, and ext/c2 left out with the reason when this host has no
second address. Not exercised here (needs a cluster): scheduling, pod networking, Cilium."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from apidouble.kubelet import NODES

from conformance import kube as k8s
from conformance.conftest import second_outside_address
from conformance.oracle import CROSS_NODE, SAME_NODE
from conformance.test_default_deny import _build_world
from conformance.world import placement_gaps


@pytest.fixture
def cluster(double, kubelet):
    double.add_node("cp1", NODES["cp1"], {k8s.CONTROL_PLANE_LABEL: ""})
    double.put("services", {"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53}]}})
    double.put("pods", {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "coredns-1", "namespace": "kube-system",
                                     "labels": {"k8s-app": "kube-dns"}},
                        "spec": {"nodeName": "cp1", "containers": []},
                        "status": {"phase": "Running", "podIP": "10.244.9.9"}})
    return double


def test_world_pins_two_pods_per_namespace_and_probes_from_each_pinned_node(cluster, kubeconfig):
    kube = k8s.connect(kubeconfig)
    session = k8s.Session(kube, k8s.StreamExecutor(kube), wait_seconds=10)
    world = _build_world(session, kube, "192.168.150.1", None, "no second address (test)", False)
    assert [p.node for p in world.pods] == ["w1", "w2"] * 3  # workers first; cp1 only as a target
    fe = cluster.get("pods", world.roles["frontend"], "frontend-0")["spec"]
    assert fe["nodeSelector"] == {"kubernetes.io/hostname": "w1"}
    assert {"containerPort": 8080, "protocol": "TCP", "name": "http"} in fe["containers"][0]["ports"]
    hosts = sorted(n for n in world.handles if n.startswith("node/"))
    assert hosts == ["node/w1", "node/w2"] and [n.id for n in world.node_sources] == hosts
    ns, name = world.handles["node/w1"]
    assert cluster.get("namespaces", "", ns)["metadata"]["labels"][k8s.PSA_LABEL] == "privileged"
    assert cluster.get("pods", ns, name)["spec"]["hostNetwork"]
    node_targets = sorted(str(t) for t in world.targets if t.id.startswith("node/"))
    assert node_targets == ["node/cp1:10250/TCP", "node/cp1:22/TCP", "node/cp1:2379/TCP", "node/cp1:6443/TCP",
                            "node/w1:10250/TCP", "node/w1:22/TCP", "node/w2:10250/TCP", "node/w2:22/TCP"]
    assert [e.id for e in world.externals] == ["ext/web"]
    assert world.unavailable == {"ext/c2": "no second address (test)"} and world.notes == []
    table = world.expected([])
    assert placement_gaps(world, table) == [] and {SAME_NODE, CROSS_NODE} <= set(table.labels.values())
    assert world.dns.backend_nodes == {"cp1"} and world.dns.service_ip == "10.96.0.10"


def settings(outside_ip=None):
    return SimpleNamespace(outside_ip=outside_ip)


def unreachable(ip):
    raise OSError(101, "Network is unreachable")


def test_second_outside_address():
    assert second_outside_address(settings("10.9.9.9"), "10.232.0.1") == ("10.9.9.9", "")
    with pytest.raises(pytest.UsageError, match="is the runner IP"):
        second_outside_address(settings("10.232.0.1"), "10.232.0.1")
    assert second_outside_address(settings(), "10.232.0.1", towards=lambda ip: "192.168.1.5") == ("192.168.1.5", "")
    ip, why = second_outside_address(settings(), "10.232.0.1", towards=lambda ip: "10.232.0.1")
    assert ip is None and "default-route address is the runner IP 10.232.0.1; pass --outside-ip" in why
    ip, why = second_outside_address(settings(), "10.232.0.1", towards=unreachable)
    assert ip is None and "no default route (Network is unreachable)" in why
