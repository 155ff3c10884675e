"""The default-deny world of issue 13 (conformance/world.py): two pods per namespace pinned to two nodes, nodes as
targets and (hostNetwork probes) as sources, two outside hosts at distinct addresses, kube-dns; the four policy
steps. Every expected cell set is derived BY HAND from the NetworkPolicy spec and the model's stated Cilium defaults
(ipBlock matches neither pods nor nodes; a pod's own node always gets in), not from the oracle."""
from __future__ import annotations

import pytest

from conformance.check import NoBarrier, run_policy_check
from conformance.expect import Expect, Target, TruthTable, Verdict
from conformance.oracle import CROSS_NODE, EITHER, OUTSIDE, SAME_NODE, External, Node, Pod, service_placement
from conformance.world import (DNS_ID, NAMED_PORTS, Dns, World, pin_nodes, placement_counts, placement_gaps,
                               step2_policies, step3_policies, step4_policies)

CP1, W1 = Node("cp1", "192.168.1.10", control_plane=True), Node("w1", "192.168.1.11")
ROLES = {"frontend": "a", "backend": "b", "client": "c"}
IP = {("a", 0): "10.0.1.10", ("a", 1): "10.0.0.10", ("b", 0): "10.0.1.20", ("b", 1): "10.0.0.20",
      ("c", 0): "10.0.1.30", ("c", 1): "10.0.0.30"}


def make_world(nodes=(CP1, W1), externals=None, named=True, dns_nodes=("cp1",)) -> World:
    pinned = pin_nodes(list(nodes))
    pods = [Pod(ns, f"{role}-{i}", {"app": role}, IP[(ns, i)], NAMED_PORTS if named else {}, node=pinned[i])
            for role, ns in ROLES.items() for i in range(2)]
    dns = Dns(Pod("kube-system", "kube-dns", {"k8s-app": "kube-dns"}, "10.0.0.5"), "10.96.0.10",
              frozenset({"10.0.0.5"}), frozenset(dns_nodes))
    if externals is None:
        externals = [External("web", "10.232.0.1"), External("c2", "192.0.2.66")]
    sources = [n for n in nodes if n.name in pinned]
    return World(dict(ROLES), {"a": {}, "b": {}, "c": {}}, pods, list(nodes), sources, externals,
                 handles={}, dns=dns)


WORLD = make_world()
PODS = {ns: [f"{ns}/{role}-{i}" for i in range(2)] for role, ns in ROLES.items()}
ON = {"w1": ["a/frontend-0", "b/backend-0", "c/client-0"], "cp1": ["a/frontend-1", "b/backend-1", "c/client-1"]}
NODE_SRC = ["node/cp1", "node/w1"]
PORT_T = {pod: [Target(pod, p, proto) for p in (8080, 9090) for proto in ("TCP", "UDP")]
          for pods in PODS.values() for pod in pods}
DNS_T = [Target(DNS_ID, 53, "UDP"), Target(DNS_ID, 53, "TCP")]
WEB_T = [Target("ext/web", 18080, "TCP"), Target("ext/web", 18080, "UDP")]
C2_T = [Target("ext/c2", 18081, "TCP"), Target("ext/c2", 18081, "UDP")]
NODE_T = [Target("node/cp1", p) for p in (22, 2379, 6443, 10250)] + [Target("node/w1", p) for p in (22, 10250)]


def into(*pods):
    return [t for pod in pods for t in PORT_T[pod]]


def cells(sources, targets) -> set[str]:
    return {f"{s}->{t}" for s in sources for t in targets if t.id != s}


ALL_PODS = [p for pods in PODS.values() for p in pods]
ALL = cells(ALL_PODS, into(*ALL_PODS) + DNS_T + WEB_T + C2_T + NODE_T) | cells(NODE_SRC, into(*ALL_PODS))
PROTECTED = PODS["a"] + PODS["b"]
OPEN = PODS["c"]


def allowed(table: TruthTable) -> set[str]:
    return {k for k, v in table.by_id().items() if v is Expect.CONNECTED}


def step2_allowed() -> set[str]:
    """Default deny in a and b: nothing leaves a or b; only the pod's own node gets into a or b."""
    return (cells(OPEN, into(*OPEN) + DNS_T + WEB_T + C2_T + NODE_T) | cells(NODE_SRC, into(*OPEN))
            | cells(["node/w1"], into(*[p for p in ON["w1"] if p not in OPEN]))
            | cells(["node/cp1"], into(*[p for p in ON["cp1"] if p not in OPEN])))


def test_every_cell_is_probed_once_and_nothing_probes_itself():
    table = WORLD.expected([])
    assert {f"{s}->{t}" for s, t in table.cells} == ALL and allowed(table) == ALL and len(ALL) == 6 * 32 + 2 * 24


def test_step2_default_deny_with_nodes_as_peers():
    assert allowed(WORLD.expected(step2_policies(WORLD))) == step2_allowed()


def test_step3_allows_dns_and_frontend_to_backend_on_the_named_port():
    fe_to_be_8080 = cells(PODS["a"], [t for t in into(*PODS["b"]) if (t.port, t.proto) == (8080, "TCP")])
    want = step2_allowed() | cells(PROTECTED, DNS_T) | fe_to_be_8080
    assert allowed(WORLD.expected(step3_policies(WORLD))) == want
    # a CNI that cannot resolve `port: http` (no named ports on the pods) blocks frontend -> backend
    unnamed = make_world(named=False)
    assert allowed(unnamed.expected(step3_policies(unnamed))) == want - fe_to_be_8080


def test_step3_names_the_port_on_ingress():
    ingress = [p for p in step3_policies(WORLD) if p["metadata"]["name"] == "backend-from-frontend"][0]
    assert ingress["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}]


def test_step4_ipblock_except_tells_web_from_c2_and_does_not_open_nodes_or_pods():
    base = step2_allowed() | cells(PROTECTED, DNS_T)
    policies_ = step4_policies(WORLD)
    assert policies_[-1]["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                                                    "except": ["192.0.2.66/32"]}}]}]
    assert allowed(WORLD.expected(policies_)) == base | cells(PODS["a"], WEB_T)
    # policy-cidr-match-mode=nodes: the same allow-list reaches kubelet, API server, etcd and SSH
    assert allowed(WORLD.expected(policies_, ipblock_matches_nodes=True)) == \
        base | cells(PODS["a"], WEB_T + NODE_T)
    # a CNI matching pod IPs by ipBlock: a reaches the open namespace c (b's ingress still denies)
    assert allowed(WORLD.expected(policies_, ipblock_matches_pods=True)) == \
        base | cells(PODS["a"], WEB_T + into(*OPEN))


def test_step4_needs_c2_at_its_own_address():
    with pytest.raises(ValueError, match="ext/c2, ext/web share 10.232.0.1"):
        make_world(externals=[External("web", "10.232.0.1"), External("c2", "10.232.0.1")])
    with pytest.raises(ValueError, match="step 4 needs ext/c2"):
        step4_policies(make_world(externals=[External("web", "10.232.0.1")]))


def test_cells_are_labelled_and_both_kinds_exist_for_every_pair_of_classes():
    table = WORLD.expected([])
    by_id = {f"{s}->{t}": v for (s, t), v in table.labels.items()}
    assert by_id["a/frontend-0->b/backend-0:8080/TCP"] == SAME_NODE
    assert by_id["a/frontend-0->b/backend-1:8080/TCP"] == CROSS_NODE
    assert by_id["a/frontend-0->a/frontend-1:9090/UDP"] == CROSS_NODE
    assert by_id["a/frontend-0->node/w1:10250/TCP"] == SAME_NODE
    assert by_id["a/frontend-0->node/cp1:6443/TCP"] == CROSS_NODE
    assert by_id["node/cp1->c/client-0:8080/UDP"] == CROSS_NODE
    assert by_id["c/client-1->ext/c2:18081/TCP"] == OUTSIDE
    assert by_id["a/frontend-0->kube-system/kube-dns:53/UDP"] == CROSS_NODE  # kube-dns runs on cp1 only
    assert by_id["a/frontend-1->kube-system/kube-dns:53/UDP"] == SAME_NODE
    assert placement_gaps(WORLD, table) == []
    counts = placement_counts(table)
    assert set(counts) == {SAME_NODE, CROSS_NODE, OUTSIDE} and sum(counts.values()) == len(ALL)


def test_one_node_every_cell_same_node_and_the_gaps_are_named():
    one = make_world(nodes=(CP1,))
    table = one.expected([])
    assert set(table.labels.values()) == {SAME_NODE, OUTSIDE}
    gaps = placement_gaps(one, table)
    assert "frontend->backend: no cross-node cell" in gaps and "node->client: no cross-node cell" in gaps
    assert not any("same-node" in g for g in gaps)


def test_service_placement():
    assert service_placement("w1", ["w1"]) == SAME_NODE and service_placement("w1", ["cp1"]) == CROSS_NODE
    assert service_placement("w1", ["w1", "cp1"]) == EITHER and service_placement(None, ["w1"]) == "unknown"


def test_pin_nodes_prefers_workers_and_distinct_nodes():
    w2 = Node("w2", "192.168.1.12")
    assert pin_nodes([CP1, W1]) == ["w1", "cp1"] and pin_nodes([CP1, W1, w2]) == ["w1", "w2"]
    assert pin_nodes([CP1]) == ["cp1", "cp1"]


def test_connect_args_nodes_probe_pods_only_and_node_ports_are_tcp():
    node_args = WORLD.connect_args("node/w1")
    assert node_args.count("--to") == 24 and not any(a.startswith("192.168.") for a in node_args)
    pod_args = WORLD.connect_args("a/frontend-0", 2, "--udp-tries", "2")
    assert pod_args[:7] == ["connect", "--timeout", "2", "--parallel", "64", "--udp-tries", "2"]
    assert pod_args.count("--to") == 32 and "10.0.1.10:8080/tcp" not in pod_args
    assert "10.96.0.10:53/dns" in pod_args and "192.0.2.66:18081/udp" in pod_args
    assert [a for a in pod_args if a.startswith("192.168.1.10:")] == [
        "192.168.1.10:22/tcp", "192.168.1.10:2379/tcp", "192.168.1.10:6443/tcp", "192.168.1.10:10250/tcp"]


def test_observed_table_reads_each_source_and_flow_keys_name_the_addresses():
    rows = [{"to": "192.168.1.10:6443/tcp", "proto": "tcp", "verdict": "connected"},
            {"to": "192.0.2.66:18081/udp", "proto": "udp", "verdict": "timeout"}]
    table = WORLD.observed({"a/frontend-0": rows})
    assert table.get("a/frontend-0", Target("node/cp1", 6443)) is Verdict.CONNECTED
    assert table.get("a/frontend-0", Target("ext/c2", 18081, "UDP")) is Verdict.TIMEOUT
    keys = WORLD.flow_keys()
    assert keys[("a/frontend-0", DNS_T[0])].dst_ips == {"10.96.0.10", "10.0.0.5"}
    assert keys[("node/w1", PORT_T["a/frontend-1"][0])].src_ip == "192.168.1.11"
    assert ("node/w1", NODE_T[0]) not in keys


def test_a_failing_step_names_each_cell_with_its_placement():
    """A cross-node-only leak: the runner's message labels every leaking cell [cross-node]."""
    check = WORLD.check("default deny", step2_policies(WORLD))
    expected = check.expected

    def observe():
        table = TruthTable(check.sources, check.targets)
        for (s, t), exp in expected.cells.items():
            leak = exp is Expect.BLOCKED and expected.labels[(s, t)] == CROSS_NODE
            table.set(s, t, Verdict.CONNECTED if exp is Expect.CONNECTED or leak else Verdict.TIMEOUT)
        return table

    def baseline():
        table = TruthTable(check.sources, check.targets)
        for cell in expected.cells:
            table.set(*cell, Verdict.CONNECTED)
        return table

    observations = iter([baseline()])
    result = run_policy_check(check, lambda m: len(m), lambda: next(observations, None) or observe(),
                              NoBarrier("unit test"), None, 5, consecutive=2, interval=0, sleep=lambda s: None)
    assert not result.passed
    leaks = [line for line in result.text.splitlines() if "expected blocked, observed connected" in line]
    assert leaks and all("[cross-node]" in line for line in leaks)
    assert "c/client-0->b/backend-1:8080/TCP [cross-node]" in result.text
