"""Cilium's datapath modes: every agent reports the modes the lab asks for, cilium-health sees every node, and
Hubble Relay is ready. A silent fallback (Host Routing: Legacy, masquerading by iptables, KPR off) fails naming
the mode as `cilium-dbg status` prints it.

Expected modes come from the lab spec with --lab (cilium.kubeProxyReplacement -> KubeProxyReplacement True,
bpfMasquerade -> Masquerading BPF and Host Routing BPF, tunnelProtocol, hubble.relay -> the relay Deployment
ready), else from --expect-kpr, --expect-masquerading, --expect-host-routing, --tunnel and --expect-hubble-relay
(defaults: True, BPF, BPF, vxlan, yes). Each agent is read through the suite's exec (`cilium-dbg status -o json`,
`cilium-health status -o json` in its cilium-agent container); a failed exec or output that is not JSON is an
error (NotMeasured), never a verdict.
"""
from __future__ import annotations

import pytest

from conformance import cilium
from conformance import kube as k8s
from lab.cilium_status import datapath_modes, judge_datapath, judge_health


@pytest.fixture(scope="module")
def agents(kube) -> dict[str, str]:
    found = cilium.agents(kube)
    assert found, (f"no Cilium agent pods ({cilium.AGENT_NS}, {cilium.AGENT_SELECTOR}): is Cilium the CNI?")
    return found


def test_cilium_datapath_modes(session, settings, agents, measure):
    problems, seen = [], {}
    for node, pod in sorted(agents.items()):
        text, _ = cilium.agent_json(session, node, pod, ["cilium-dbg", "status", "-o", "json"])
        modes = datapath_modes(text)
        seen[node] = {"kpr": modes.kube_proxy_replacement, "masquerading": modes.masquerading,
                      "host_routing": modes.host_routing, "tunnel": modes.tunnel_protocol, "hubble": modes.hubble}
        problems += judge_datapath(modes, settings.datapath, node=node)
    measure("datapath_modes", seen)
    measure("agents", len(agents))
    assert not problems, "Cilium's datapath is not in the expected modes:\n  " + "\n  ".join(problems)


def test_cilium_health_reaches_every_node(session, kube, agents, measure):
    nodes = sorted(k8s.node_addresses(kube))
    problems = []
    for node, pod in sorted(agents.items()):
        text, doc = cilium.agent_json(session, node, pod, ["cilium-health", "status", "-o", "json"])
        problems += [f"{node}: {p}" for p in judge_health(text, nodes)]
    measure("nodes", len(nodes))
    assert not problems, "cilium-health does not reach every node on every path:\n  " + "\n  ".join(problems)


def test_hubble_relay_ready(kube, settings, measure):
    if not settings.hubble_relay:
        pytest.skip("Hubble Relay is not expected (the lab's cilium.hubble.relay is false, or "
                    "--expect-hubble-relay no)")
    deployments = kube.apps.list_namespaced_deployment(cilium.AGENT_NS).items
    problem = cilium.judge_relay(deployments)
    measure("relay_deployments", len([d for d in deployments if d.metadata.name == cilium.RELAY_NAME]))
    assert not problem, problem
