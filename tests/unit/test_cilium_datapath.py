"""lab.cilium_status datapath modes and cilium-health, on status outputs shaped exactly as Cilium 1.20.2's API
models (tests/fixtures/cilium/README.md says how they were built; they are to be replaced by real captures).
A silent fallback (Host Routing: Legacy, masquerading by iptables) is a failure naming the mode."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.cilium_status import (DatapathModes, ExpectedDatapath, datapath_modes, health_problems, judge_datapath,
                               judge_health)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cilium"
NODES = ["cp1", "w1", "w2"]


def read(name):
    return (FIX / name).read_text()


HEALTHY = DatapathModes("True", "BPF", "BPF", "Tunnel", "vxlan", "Ok")


@pytest.mark.parametrize("name", ["status_bpf.json", "status_bpf.txt"])
def test_healthy_status_reports_every_mode_and_passes(name):
    modes = datapath_modes(read(name))
    assert modes == HEALTHY
    assert judge_datapath(modes) == []


@pytest.mark.parametrize("name", ["status_legacy.json", "status_legacy.txt"])
def test_silent_fallbacks_are_failures_naming_the_mode(name):
    modes = datapath_modes(read(name))
    assert (modes.host_routing, modes.masquerading) == ("Legacy", "iptables")
    problems = judge_datapath(modes, node="w1")
    assert len(problems) == 2
    assert problems[0].startswith("w1: Masquerading: iptables (expected BPF)")
    assert problems[1].startswith("w1: Host Routing: Legacy (expected BPF)")


def test_masquerading_disabled_and_kpr_false_and_geneve():
    doc = json.loads(read("status_bpf.json"))
    doc["masquerading"]["enabledProtocols"] = {}
    doc["kube-proxy-replacement"]["mode"] = "False"
    doc["routing"]["tunnel-protocol"] = "geneve"
    doc["hubble"] = {"state": "Disabled"}
    problems = judge_datapath(datapath_modes(json.dumps(doc)))
    assert [p.split(" (")[0] for p in problems] == ["KubeProxyReplacement: False", "Masquerading: Disabled",
                                                   "Tunnel protocol: geneve", "Hubble: Disabled"]


def test_native_routing_has_no_tunnel_and_can_be_expected():
    doc = json.loads(read("status_bpf.json"))
    doc["routing"] = {"inter-host-routing-mode": "Native", "intra-host-routing-mode": "BPF", "tunnel-protocol": "vxlan"}
    modes = datapath_modes(json.dumps(doc))
    assert (modes.network_routing, modes.tunnel_protocol) == ("Native", None)
    assert judge_datapath(modes, ExpectedDatapath(tunnel_protocol=None)) == []
    assert "Tunnel protocol not reported" in judge_datapath(modes)[0]


def test_output_without_the_modes_fails_rather_than_passing():
    problems = judge_datapath(datapath_modes("Error: cannot reach agent"))
    assert len(problems) == 5 and all("not reported by cilium status" in p for p in problems)


def test_hubble_not_expected_is_not_judged():
    modes = DatapathModes("True", "BPF", "BPF", "Tunnel", "vxlan", "Disabled")
    assert judge_datapath(modes, ExpectedDatapath(hubble=False)) == []


def test_health_all_reachable():
    assert health_problems(read("health_ok.json")) == (3, [])
    assert judge_health(read("health_ok.json"), NODES) == []


def test_health_names_every_failing_and_unprobed_path():
    seen, problems = health_problems(read("health_one_down.json"))
    assert seen == 3
    assert problems == [
        "default/w1 health endpoint 10.0.1.10 ICMP: unknown (never probed)",
        "default/w1 health endpoint 10.0.1.10 HTTP: unknown (never probed)",
        "default/w2 node 192.168.100.12 ICMP: Connection timed out",
        'default/w2 health endpoint 10.0.2.10 HTTP: Get "http://10.0.2.10:4240/hello": dial tcp 10.0.2.10:4240: '
        "connect: no route to host"]


def test_health_missing_node_is_named():
    assert judge_health(read("health_ok.json"), NODES + ["w3"]) == ["cilium-health does not list node(s) w3"]


def test_health_text_counts():
    assert judge_health(read("status_bpf.txt"), NODES) == []
    assert judge_health(read("status_legacy.txt"), NODES) == ["cilium-health: only 2/3 nodes reachable"]
    assert health_problems("garbage")[1] == ["no 'Cluster health:' line and no JSON in the cilium-health output"]


def test_captured_status_of_the_real_ci_cluster_parses_and_passes():
    """Output of the real agent (tests/fixtures/cilium/README.md says where it was captured): the parser, written
    from the Go models' JSON tags, reads it, and the healthy datapath passes."""
    from pathlib import Path

    from lab.cilium_status import ExpectedDatapath, cilium_kpr, datapath_modes, judge_datapath

    text = (Path(__file__).parents[1] / "fixtures/cilium/captured_cik8s_w1_status.json").read_text()
    modes = datapath_modes(text)
    assert (modes.kube_proxy_replacement, modes.masquerading, modes.host_routing, modes.tunnel_protocol) == \
        ("True", "BPF", "BPF", "vxlan")
    assert judge_datapath(modes, ExpectedDatapath()) == []
    assert cilium_kpr(text) == (True, "True")
