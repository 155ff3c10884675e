"""The datapath-modes checks (conformance/test_datapath_modes.py) end to end through `pytest conformance` against
the API double: Cilium agent pods in kube-system answer `cilium-dbg status -o json` / `cilium-health status -o
json` over the websocket exec with captured-shape output (tests/fixtures/cilium), the relay is a Deployment.
A silent fallback fails naming the mode; a failed exec is an error, never a verdict; the expectations follow the
lab spec or the options."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from apidouble.kubelet import NODES, run_suite

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cilium"
REPO = Path(__file__).resolve().parents[2]


def agents(double, relay_ready: int | None = 1):
    for node in NODES:
        double.put("pods", {"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": f"cilium-{node}", "namespace": "kube-system",
                                         "labels": {"k8s-app": "cilium"}},
                            "spec": {"nodeName": node, "containers": [{"name": "cilium-agent", "image": "x"}]},
                            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    if relay_ready is not None:
        double.put("deployments", {"apiVersion": "apps/v1", "kind": "Deployment",
                                   "metadata": {"name": "hubble-relay", "namespace": "kube-system",
                                                "labels": {"k8s-app": "hubble-relay"}},
                                   "spec": {"replicas": 1, "selector": {"matchLabels": {"k8s-app": "hubble-relay"}},
                                            "template": {"metadata": {"labels": {"k8s-app": "hubble-relay"}},
                                                         "spec": {"containers": [{"name": "r", "image": "x"}]}}},
                                   "status": {"replicas": 1, "readyReplicas": relay_ready}})


def agent_exec(status_by_node=None, health="health_ok.json", broken=None):
    status_by_node = status_by_node or {}

    def handler(ns, pod, container, command):
        node = pod.split("-", 1)[1]
        assert (ns, container) == ("kube-system", "cilium-agent"), (ns, container)
        if node == broken:
            return 1, b"", b"Error: cannot reach the agent's API: dial unix /var/run/cilium/cilium.sock\n"
        if command[:2] == ["cilium-dbg", "status"] and command[2:] == ["-o", "json"]:
            return 0, (FIX / status_by_node.get(node, "status_bpf.json")).read_bytes(), b""
        if command == ["cilium-health", "status", "-o", "json"]:
            return 0, (FIX / health).read_bytes(), b""
        return 127, b"", f"unexpected command {command}\n".encode()
    return handler


def run(kubeconfig, tmp_path, *extra):
    proc = run_suite(["conformance/test_datapath_modes.py", "--kubeconfig", kubeconfig,
                      "--results-dir", str(tmp_path / "r"), *extra], tmp_path)
    out, _ = proc.communicate(timeout=120)
    checks = {c["check"]: c for c in json.loads((tmp_path / "r" / "conformance-latest.json").read_text())["checks"]}
    return proc.returncode, out, checks


def test_healthy_agents_pass_every_datapath_check(double, kubeconfig, tmp_path):
    agents(double)
    double.exec_handler = agent_exec()
    rc, out, checks = run(kubeconfig, tmp_path)
    assert rc == 0, out
    assert {c: v["verdict"] for c, v in checks.items()} == {
        "test_cilium_datapath_modes": "pass", "test_cilium_health_reaches_every_node": "pass",
        "test_hubble_relay_ready": "pass"}
    assert checks["test_cilium_datapath_modes"]["measured"]["datapath_modes"]["w1"] == {
        "kpr": "True", "masquerading": "BPF", "host_routing": "BPF", "tunnel": "vxlan", "hubble": "Ok"}


def test_silent_fallback_fails_naming_the_mode_and_a_down_path_fails_health(double, kubeconfig, tmp_path):
    agents(double, relay_ready=0)
    double.exec_handler = agent_exec({"w1": "status_legacy.json"}, health="health_one_down.json")
    rc, out, checks = run(kubeconfig, tmp_path)
    assert rc == 1, out
    modes = checks["test_cilium_datapath_modes"]
    assert modes["verdict"] == "fail" and "w1: Masquerading: iptables (expected BPF)" in out
    assert "w1: Host Routing: Legacy (expected BPF)" in out and "cp1: Host Routing" not in out
    assert checks["test_cilium_health_reaches_every_node"]["verdict"] == "fail"
    assert checks["test_hubble_relay_ready"]["verdict"] == "fail"
    assert "kube-system/hubble-relay: 0/1 replicas ready" in checks["test_hubble_relay_ready"]["message"]


def test_failed_exec_is_an_error_never_a_verdict(double, kubeconfig, tmp_path):
    agents(double)
    double.exec_handler = agent_exec(broken="w2")
    rc, out, checks = run(kubeconfig, tmp_path)
    assert checks["test_cilium_datapath_modes"]["verdict"] == "error", out
    assert "w2: `cilium-dbg status -o json` in kube-system/cilium-w2 failed (exit 1)" in \
        checks["test_cilium_datapath_modes"]["message"]
    assert checks["test_cilium_health_reaches_every_node"]["verdict"] == "error"


def test_options_set_the_expectation_and_relay_not_expected_is_a_skip(double, kubeconfig, tmp_path):
    agents(double, relay_ready=None)
    double.exec_handler = agent_exec({n: "status_legacy.json" for n in NODES})
    rc, out, checks = run(kubeconfig, tmp_path, "--expect-masquerading", "iptables", "--expect-hubble-relay", "no")
    assert checks["test_cilium_datapath_modes"]["verdict"] == "pass", out  # iptables masq => Legacy host routing
    relay = checks["test_hubble_relay_ready"]
    assert relay["verdict"] == "skip" and relay["message"].startswith("Hubble Relay is not expected (")
    assert "1 skipped (a skip is not a pass)" in out


@pytest.mark.parametrize("cilium, want", [
    ({}, ("True", "BPF", "BPF", "vxlan", True)),
    ({"bpfMasquerade": False, "tunnelProtocol": "geneve", "hubble": {"relay": False}},
     ("True", "iptables", "Legacy", "geneve", False)),
    ({"kubeProxyReplacement": False}, ("False", "BPF", "BPF", "vxlan", True)),
])
def test_expectation_from_the_lab_spec(cilium, want, tmp_path):
    import yaml

    from conformance.conftest import _datapath_expectation
    from lab.spec import load_lab
    doc = yaml.safe_load((REPO / "labs" / "default.yaml").read_text())
    doc.setdefault("cilium", {}).update(cilium)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(doc))
    expected, relay = _datapath_expectation(lambda name: None, load_lab(str(path)))
    assert (expected.kube_proxy_replacement, expected.masquerading, expected.host_routing,
            expected.tunnel_protocol, relay) == want
