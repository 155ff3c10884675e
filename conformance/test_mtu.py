"""MTU: pod route MTU = underlay MTU - overlay overhead; the path between pods on different nodes carries exactly
that; a TCP bulk transfer works; the nodes' fragmentation counters do not rise.

Cilium keeps the pod's eth0 at the base MTU and lowers the ROUTE MTU, so the pod's default route is what counts.
Overheads (Cilium pkg/mtu): VXLAN and Geneve 50 over IPv4, 70 over IPv6.
"""
from __future__ import annotations

import pytest

from conformance import kube as k8s
from conformance.judge import (MtuFinding, expected_pod_mtu, fragment_deltas, judge_path_mtu, judge_route_mtu,
                               judge_underlay, route_mtu)

pytestmark = pytest.mark.datapath("observe")  # never while load is held on the nodes

PORT = 8080


@pytest.fixture(scope="module")
def mtu_pods(session, kube):
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("mtu")
    return ns, session.pods_per_node(ns, "mtu", nodes, tcp=[PORT], udp=[PORT])


def _underlay(node_facts_by_node: dict, settings) -> dict[str, int]:
    """node -> the MTU the kernel uses on the node's default route; NotMeasured (the check errors) when unread."""
    return {node: route_mtu(f, node) for node, f in node_facts_by_node.items()}


def test_node_underlay_mtu(node_facts, settings, measure):
    underlay = _underlay(node_facts.facts(), settings)
    measure("underlay_mtu", underlay)
    problems = judge_underlay(underlay, settings.underlay_mtu)
    assert not problems, "\n".join(problems)


def test_pod_route_mtu(node_facts, mtu_pods, session, settings, measure, warn):
    ns, pods = mtu_pods
    underlay = _underlay(node_facts.facts(), settings)
    findings, measured = [], {}
    for node, (pod, _ip) in sorted(pods.items()):
        expected = expected_pod_mtu(settings.underlay_mtu or underlay[node], settings.tunnel)
        got = route_mtu(session.netprobe(ns, pod, ["facts"]), f"{node}: {ns}/{pod}")
        measured[node] = got
        finding, text = judge_route_mtu(got, expected)
        if finding is MtuFinding.WASTEFUL:
            warn(f"{node}: {text}")
        elif finding is MtuFinding.TOO_LARGE:
            findings.append(f"{node}: {text}")
    measure("pod_route_mtu", measured)
    assert not findings, ("\n".join(findings) + f"\nexpected = underlay - {settings.tunnel} overhead; "
                          "likely cause: cilium mtu set by hand (1460 is the TCP MSS, not a Geneve MTU)")


def test_path_mtu_between_nodes(node_facts, mtu_pods, session, settings, measure):
    ns, pods = mtu_pods
    if len(pods) < 2:
        pytest.skip("needs two nodes to measure a path through the overlay")
    (node_a, (pod_a, _)), (node_b, (_, ip_b)) = sorted(pods.items())[:2]
    before = node_facts.facts()
    result = session.netprobe(ns, pod_a, ["mtu", "--to", f"{ip_b}:{PORT}", "--bulk-mib", "8"], timeout=120)
    after = node_facts.facts()
    underlay = settings.underlay_mtu or route_mtu(before[node_a], node_a)
    pod_mtu = expected_pod_mtu(underlay, settings.tunnel)
    measure("path_mtu", result.get("path_mtu"))
    measure("largest_udp_payload", result.get("largest_udp_payload"))
    bulk = result.get("tcp_bulk") or {}
    if bulk.get("seconds"):
        measure("tcp_bulk_mib_per_s", round(bulk["bytes"] / 1048576 / bulk["seconds"], 1))
    problems = judge_path_mtu(result, pod_mtu)
    frags = fragment_deltas(before, after)
    if frags:
        problems.append(f"fragmentation counters rose during the run (silent fragmentation of outer packets): {frags}")
    measure("fragments_created", sum(d.get("FragCreates", 0) for d in frags.values()))
    assert not problems, f"{node_a} -> {node_b}: " + "\n".join(problems)
