"""The oracle in the richer world of issue 13: two pods per namespace pinned to two nodes (every cell labelled
same-node / cross-node), two outside targets with distinct addresses, named ports, and nodes as peers (SSH 22 and
kubelet 10250 on every node, API server 6443 and etcd 2379 on the control plane; node -> pod and a hostNetwork
pod as sources).

Every expected cell set below is derived BY HAND from the NetworkPolicy spec (the concept page and the
networking.k8s.io/v1 API reference), not from the oracle: a pod isolated for ingress admits only its own node and
what some ingress rule allows; egress isolation admits only what some egress rule allows; policies never police
traffic into nodes or from nodes/hostNetwork pods; pod/namespace selectors never match node traffic; ipBlock
matching node addresses is the model option ``ipblock_matches_nodes`` (Cilium default: no). The upstream e2e cases
reuse the names of test/e2e/network/netpol (namespaces x, y, z; pods a, b; ports 80/81).
"""
from __future__ import annotations

import pytest

from conformance.expect import Expect, Target
from conformance.oracle import (CROSS_NODE, OUTSIDE, SAME_NODE, External, Node, Pod, PolicyModel, expected_table,
                                indistinct_externals, node_targets, placement, placements)

NODES = [Node("cp1", "192.168.100.10", control_plane=True), Node("w1", "192.168.100.11"),
         Node("w2", "192.168.100.12")]
NAMESPACES = {"x": {"ns": "x"}, "y": {"ns": "y"}, "z": {"ns": "z"}, "kube-system": {}}
NAMED = {"serve-80-tcp": (80, "TCP"), "serve-81-tcp": (81, "TCP")}
PODS = [Pod(ns, name, {"pod": name}, f"10.244.{1 + i}.{10 + j}", NAMED, node=("w1", "w2")[j])
        for i, ns in enumerate("xyz") for j, name in enumerate("ab")]
PODS.append(Pod("kube-system", "hostnet", {"app": "hostnet"}, "192.168.100.11", node="w1", host_network=True))
EXTERNALS = [External("web", "203.0.113.10"), External("c2", "198.51.100.66")]

XA80, XB80, XB81, YA80 = (Target("x/a", 80), Target("x/b", 80), Target("x/b", 81), Target("y/a", 80))
WEB, C2 = Target("ext/web", 443), Target("ext/c2", 443)
NODE_T = node_targets(NODES)
CP_API, CP_ETCD = Target("node/cp1", 6443), Target("node/cp1", 2379)
TARGETS = [XA80, XB80, XB81, YA80, WEB, C2] + NODE_T
POD_SOURCES = ["x/a", "x/b", "y/a", "z/b"]
NODE_SOURCES = ["node/w1", "node/w2", "kube-system/hostnet"]  # hostnet runs on w1 with w1's address
SOURCES = POD_SOURCES + NODE_SOURCES
INTO_X = [XA80, XB80, XB81]
TO_PODS = [XA80, XB80, XB81, YA80]


def cells(sources, targets) -> set[str]:
    return {f"{s}->{t}" for s in sources for t in targets}


ALL = cells(SOURCES, TARGETS)


def pol(ns, name, spec):
    return {"metadata": {"namespace": ns, "name": name}, "spec": spec}


DENY_X_IN = pol("x", "deny-in", {"podSelector": {}, "policyTypes": ["Ingress"]})
DENY_X_OUT = pol("x", "deny-out", {"podSelector": {}, "policyTypes": ["Egress"]})
FROM_NODES = pol("x", "from-nodes", {"podSelector": {},
                                     "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.100.0/24"}}]}]})
TO_INTERNET_NOT_C2 = pol("x", "internet", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["198.51.100.0/24"]}}]}]})
# Remote nodes and the hostNetwork pod on w1 reach x/b (on w2) only through an allow; each node reaches its own pods.
REMOTE_INTO_X = cells(["node/w1", "kube-system/hostnet"], [XB80, XB81]) | cells(["node/w2"], [XA80])
X_SOURCES = ["x/a", "x/b"]

CASES = {
    "no policy: every cell connects, nodes included": ([], {}, ALL),
    # Ingress isolation of x: pods are shut out; each node (and the hostNetwork pod on w1) still reaches the pod on
    # its own node (spec: "the only allowed connections into the pod are those from the pod's node and ...").
    "default-deny ingress in x: the pod's own node still gets in, remote nodes do not": (
        [DENY_X_IN], {}, ALL - cells(POD_SOURCES, INTO_X) - REMOTE_INTO_X),
    # An ipBlock of the node network: with Cilium's default the remote-node identity is not matched by it.
    "ipBlock of the node network does not admit remote nodes by default (Cilium: remote-node identity)": (
        [DENY_X_IN, FROM_NODES], {}, ALL - cells(POD_SOURCES, INTO_X) - REMOTE_INTO_X),
    "ipBlock of the node network admits remote nodes with ipblock_matches_nodes": (
        [DENY_X_IN, FROM_NODES], {"ipblock_matches_nodes": True}, ALL - cells(POD_SOURCES, INTO_X)),
    # Egress allow-list 0.0.0.0/0 except the C2 range: web yes, c2 no; pods are not matched by ipBlock
    # (ipblock_matches_pods=False) and, by default, neither are nodes (kubelet, API server, etcd, SSH).
    "egress ipBlock with except tells ext/web from ext/c2; node ports stay shut by default": (
        [TO_INTERNET_NOT_C2], {}, ALL - cells(X_SOURCES, TO_PODS + [C2] + NODE_T)),
    "egress ipBlock 0.0.0.0/0 reaches node ports with ipblock_matches_nodes": (
        [TO_INTERNET_NOT_C2], {"ipblock_matches_nodes": True}, ALL - cells(X_SOURCES, TO_PODS + [C2])),
    # A rule with ports and no `to` allows every destination on those ports, nodes included: the usual way to let
    # pods reach the API server. etcd (2379) stays shut.
    "egress by port only (6443) reaches the API server on the control-plane node": (
        [DENY_X_OUT, pol("x", "api", {"podSelector": {}, "policyTypes": ["Egress"],
                                      "egress": [{"ports": [{"port": 6443}]}]})],
        {}, ALL - cells(X_SOURCES, TARGETS) | cells(X_SOURCES, [CP_API])),
    # Named port on egress resolves against each destination pod's container ports (serve-80-tcp = 80/TCP);
    # outside hosts and nodes have no named ports, so nothing else matches.
    "egress to a named port: pods on 80 only, never outside hosts or nodes": (
        [pol("x", "named", {"podSelector": {}, "policyTypes": ["Egress"],
                            "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
        {}, ALL - cells(X_SOURCES, TARGETS) | cells(X_SOURCES, [XA80, XB80, YA80])),
    "ingress on a named port: 81 closed to pods, the own node still reaches it": (
        [pol("x", "named-in", {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
        {}, ALL - cells(POD_SOURCES, [XB81]) - cells(["node/w1", "kube-system/hostnet"], [XB81])),
    # namespaceSelector {} selects every pod of every namespace but not hostNetwork pods (node traffic).
    "namespaceSelector {} admits every pod but not a hostNetwork pod from another node": (
        [DENY_X_IN, pol("x", "all-ns", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})],
        {}, ALL - REMOTE_INTO_X),
    # Upstream e2e (network_policy.go) "should support a 'default-deny-ingress' policy": x's pods unreachable
    # from pods on 80 and 81 -- the same cells as the default-deny case above, for the pod sources.
    "upstream: default-deny-ingress": ([DENY_X_IN], {}, ALL - cells(POD_SOURCES, INTO_X) - REMOTE_INTO_X),
    # Upstream "should enforce policy to allow traffic from pods within server namespace based on PodSelector":
    # x/a admits only x/b (and its own node w1); everything else is untouched.
    "upstream: allow into x/a from pod b of x only": (
        [pol("x", "allow-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                              "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
        {}, ALL - cells(["x/a", "y/a", "z/b", "node/w2"], [XA80])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_world_catalogue(name):
    policies_, options, allowed = CASES[name]
    model = PolicyModel(NAMESPACES, PODS, EXTERNALS, policies_, nodes=NODES, **options)
    table = expected_table(model, SOURCES, TARGETS)
    got = {cid for cid, v in table.by_id().items() if v is Expect.CONNECTED}
    assert got == allowed, (f"wrongly allowed: {sorted(got - allowed)}\nwrongly blocked: {sorted(allowed - got)}\n"
                            + table.render())


def test_without_the_local_node_rule_a_node_is_shut_out_of_its_own_pods():
    model = PolicyModel(NAMESPACES, PODS, EXTERNALS, [DENY_X_IN], nodes=NODES, local_node_always_allowed=False)
    table = expected_table(model, NODE_SOURCES, INTO_X)
    assert set(table.by_id().values()) == {Expect.BLOCKED}


def test_node_targets_listen_where_kubeadm_runs_them():
    assert [str(t) for t in NODE_T] == [
        "node/cp1:22/TCP", "node/cp1:2379/TCP", "node/cp1:6443/TCP", "node/cp1:10250/TCP",
        "node/w1:22/TCP", "node/w1:10250/TCP", "node/w2:22/TCP", "node/w2:10250/TCP"]


def test_every_cell_is_labelled_and_both_kinds_are_present():
    model = PolicyModel(NAMESPACES, PODS, EXTERNALS, nodes=NODES)
    labels = placements(model, expected_table(model, SOURCES, TARGETS))
    assert set(labels) == ALL and set(labels.values()) == {SAME_NODE, CROSS_NODE, OUTSIDE}
    assert labels["x/a->y/a:80/TCP"] == SAME_NODE and labels["x/a->x/b:80/TCP"] == CROSS_NODE
    assert labels["kube-system/hostnet->x/a:80/TCP"] == SAME_NODE and labels["x/b->ext/c2:443/TCP"] == OUTSIDE
    assert placement(model, "node/w2", CP_ETCD) == CROSS_NODE


def test_unpinned_pod_is_unknown_placement():
    model = PolicyModel({}, [Pod("x", "a"), Pod("x", "b", node="w1")])
    assert placement(model, "x/a", Target("x/b", 80)) == "unknown"


def test_outside_targets_sharing_an_address_are_reported():
    shared = PolicyModel({}, [], [External("web", "10.0.0.1"), External("c2", "10.0.0.1")])
    assert indistinct_externals(shared) == ["ext/c2, ext/web share 10.0.0.1: give each outside target its own address"]
    assert indistinct_externals(PolicyModel({}, [], EXTERNALS)) == []
