"""MTU: pod route MTU = underlay MTU - overlay overhead; the path between pods on every ordered pair of nodes (both
directions), and between a hostNetwork pod and a pod on another node (both directions), carries exactly that; a TCP
bulk transfer works each way; the nodes' fragmentation counters do not rise while a path is measured.

Cilium keeps the pod's eth0 at the base MTU and lowers the ROUTE MTU, so the pod's default route is what counts.
Overheads (Cilium pkg/mtu): VXLAN and Geneve 50 over IPv4, 70 over IPv6.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import pytest

from conformance import kube as k8s
from conformance.judge import (MtuFinding, expected_pod_mtu, judge_paths, judge_route_mtu, judge_underlay,
                               measure_paths, ordered_pairs, path_id, render_path_failures, route_mtu)

pytestmark = pytest.mark.datapath("observe")  # never while load is held on the nodes

PORT = 8080
HOST_PORT = 18080  # served by the hostNetwork pod in the node's own namespace: clear of NodePorts and node agents
BULK_MIB = "8"


@pytest.fixture(scope="module")
def mtu_pods(session, kube):
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("mtu")
    return ns, session.pods_per_node(ns, "mtu", nodes, tcp=[PORT], udp=[PORT])


def _underlay(node_facts_by_node: dict, settings) -> dict[str, int]:
    """node -> the MTU the kernel uses on the node's default route; NotMeasured (the check errors) when unread."""
    return {node: route_mtu(f, node) for node, f in node_facts_by_node.items()}


class MtuPath(NamedTuple):
    """One direction: netprobe in ``namespace/pod`` on node ``src`` probes ``target`` (IP:PORT) on node ``dst``."""

    src: str
    dst: str
    namespace: str
    pod: str
    target: str


def _check_paths(paths: dict[str, MtuPath], node_facts, session, settings, measure) -> None:
    """Measure each path in turn (fragment counters read around each), record every path and the worst values,
    and fail naming every failing path with its direction; a path that could not be measured errors the check."""
    probes = {pid: functools.partial(session.netprobe, p.namespace, p.pod,
                                     ["mtu", "--to", p.target, "--bulk-mib", BULK_MIB], timeout=120)
              for pid, p in paths.items()}
    run = measure_paths(probes, node_facts.facts, (k8s.ProbeFailed,))
    measure("paths", run.record())
    for name, value in run.worst().items():
        measure(name, value)

    def underlay(node: str) -> int:
        return settings.underlay_mtu or route_mtu(run.before[node], node)
    # a path carries what the smaller underlay of its two ends leaves after the overlay
    pod_mtu = {pid: expected_pod_mtu(min(underlay(p.src), underlay(p.dst)), settings.tunnel)
               for pid, p in paths.items()}
    failing = judge_paths(run, pod_mtu)
    assert not failing, render_path_failures(failing, len(paths))


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
    """Every ordered pair of nodes, both directions: a pod on A probes a pod on B (path MTU + TCP bulk A->B)."""
    ns, pods = mtu_pods
    if len(pods) < 2:
        pytest.skip(f"needs two nodes to measure a path through the overlay; the cluster has {len(pods)}")
    paths = {path_id(a, b): MtuPath(a, b, ns, pods[a][0], f"{pods[b][1]}:{PORT}") for a, b in ordered_pairs(pods)}
    _check_paths(paths, node_facts, session, settings, measure)


@pytest.fixture(scope="module")
def host_pod(session, kube):
    """A hostNetwork probe pod serving TCP and UDP on the first node: (namespace, node, pod, node IP)."""
    nodes = sorted(k8s.node_addresses(kube))
    if len(nodes) < 2:
        pytest.skip(f"needs two nodes: a hostNetwork pod on one and a pod on another; the cluster has "
                    f"{len(nodes)} ({', '.join(nodes) or 'none'})")
    ns = session.namespace("mtu-host", {k8s.PSA_LABEL: "privileged"})
    [(node, (pod, ip))] = session.pods_per_node(ns, "mtu-host", nodes[:1], tcp=[HOST_PORT], udp=[HOST_PORT],
                                                host_network=True).items()
    return ns, node, pod, ip


def test_path_mtu_between_host_network_and_pod(host_pod, node_facts, mtu_pods, session, settings, measure):
    """A hostNetwork pod on one node -> a pod on another node, and back: the host's route to remote pods goes
    through the overlay too, so both directions carry the pod MTU."""
    host_ns, host_node, host, host_ip = host_pod
    ns, pods = mtu_pods
    pod_node = next(node for node in sorted(pods) if node != host_node)
    pod, pod_ip = pods[pod_node]
    host_end, pod_end = f"host@{host_node}", f"pod@{pod_node}"
    paths = {path_id(host_end, pod_end): MtuPath(host_node, pod_node, host_ns, host, f"{pod_ip}:{PORT}"),
             path_id(pod_end, host_end): MtuPath(pod_node, host_node, ns, pod, f"{host_ip}:{HOST_PORT}")}
    _check_paths(paths, node_facts, session, settings, measure)
