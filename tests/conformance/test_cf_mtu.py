"""The MTU checks (conformance/test_mtu.py) end to end through `pytest conformance` against the API double: the
facts DaemonSet answers `netprobe facts` with a node's captured counters (underlay route MTU 1500), probe pods with
the captured Cilium pod facts (route MTU 1450), and `netprobe mtu` answers with the captured Cilium outputs
(tests/fixtures/netprobe): healthy, or a black hole on the paths a test names. Every ordered pair of nodes is probed,
the hostNetwork pod is probed both ways, a failing direction is named, an unmeasured path is an error and a
one-node cluster skips both path checks with the reason."""
from __future__ import annotations

import json
from pathlib import Path

from apidouble.kubelet import NODES, run_suite

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "netprobe"
PATH_CHECKS = ("test_path_mtu_between_nodes", "test_path_mtu_between_host_network_and_pod")


def fixture(name: str) -> dict:
    return json.loads((FIX / f"{name}.json").read_text())


def netprobe(double, black_holes=(), broken=(), seen=None):
    """exec handler: facts and mtu as a cluster's pods would answer; paths are named as the checks name them."""
    def end(ip: str) -> str:
        for pod in double.list("pods"):
            if (pod.get("status") or {}).get("podIP") == ip and not pod["metadata"]["namespace"].startswith("cf-facts"):
                kind = "host" if pod["spec"].get("hostNetwork") else "pod"
                return f"{kind}@{pod['spec']['nodeName']}"
        raise AssertionError(f"no pod has IP {ip}")

    def handler(ns, pod_name, container, command):
        pod = double.get("pods", ns, pod_name)
        src = f"{'host' if pod['spec'].get('hostNetwork') else 'pod'}@{pod['spec']['nodeName']}"
        if command[2:] == ["facts"]:
            if ns.startswith("cf-facts"):
                doc = fixture("facts_node1_before_fragmentation_vxlan")
                doc["default_route"] = {"effective_mtu": 1500}
                return 0, json.dumps(doc).encode(), b""
            return 0, (FIX / "facts_cilium_pod_route_mtu_1450.json").read_bytes(), b""
        if command[2:3] == ["mtu"]:
            ip, port = command[command.index("--to") + 1].rsplit(":", 1)
            path = f"{src}->{end(ip)}"
            if seen is not None:
                seen.append((path, port))
            if path in broken:
                return 1, b"", b"mtu probe failed: [Errno 101] Network is unreachable\n"
            doc = fixture("mtu_cilium_black_hole" if path in black_holes else "mtu_cilium_healthy")
            return 0, json.dumps({**doc, "to": f"{ip}:{port}"}).encode(), b""
        return 127, b"", f"unexpected command {command}\n".encode()
    return handler


def run(kubeconfig, tmp_path):
    proc = run_suite(["conformance/test_mtu.py", "--kubeconfig", kubeconfig, "--results-dir", str(tmp_path / "r")],
                     tmp_path)
    out, _ = proc.communicate(timeout=120)
    checks = {c["check"]: c for c in json.loads((tmp_path / "r" / "conformance-latest.json").read_text())["checks"]}
    return out, checks


def test_every_ordered_pair_and_the_host_network_pod_both_ways(double, kubeconfig, kubelet, tmp_path):
    seen = []
    double.exec_handler = netprobe(double, seen=seen)
    out, checks = run(kubeconfig, tmp_path)
    assert {c: v["verdict"] for c, v in checks.items()} == {
        "test_node_underlay_mtu": "pass", "test_pod_route_mtu": "pass", "test_path_mtu_between_nodes": "pass",
        "test_path_mtu_between_host_network_and_pod": "pass"}, out
    pairs = [f"pod@{a}->pod@{b}" for a in sorted(NODES) for b in sorted(NODES) if a != b]
    assert seen == [(p, "8080") for p in pairs] + [("host@cp1->pod@w1", "8080"), ("pod@w1->host@cp1", "18080")]
    between = checks["test_path_mtu_between_nodes"]["measured"]
    assert list(between["paths"]) == [p.replace("pod@", "") for p in pairs]
    assert between["paths"]["w1->cp1"] == {"verdict": "ok", "path_mtu": 1450, "largest_udp_payload": 1422,
                                           "tcp_bulk_mib_per_s": 500.0, "fragments": {}}
    assert (between["path_mtu"], between["largest_udp_payload"], between["fragments_created"]) == (1450, 1422, 0)
    host = checks["test_path_mtu_between_host_network_and_pod"]["measured"]["paths"]
    assert list(host) == ["host@cp1->pod@w1", "pod@w1->host@cp1"]


def test_a_fault_on_the_return_path_only_fails_naming_that_direction(double, kubeconfig, kubelet, tmp_path):
    double.exec_handler = netprobe(double, black_holes={"pod@w1->pod@cp1", "pod@w1->host@cp1"})
    out, checks = run(kubeconfig, tmp_path)
    between, host = (checks[name] for name in PATH_CHECKS)
    assert between["verdict"] == "fail" and host["verdict"] == "fail", out
    assert between["message"].splitlines()[0].endswith("1 of 6 path(s) fail: w1->cp1"), between["message"]
    assert "w1->cp1: netprobe mtu verdict 'black_hole'" in between["message"] and "cp1->w1:" not in between["message"]
    assert between["measured"]["paths"]["cp1->w1"]["verdict"] == "ok"
    assert host["message"].splitlines()[0].endswith("1 of 2 path(s) fail: pod@w1->host@cp1"), host["message"]


def test_a_path_that_cannot_be_measured_is_an_error(double, kubeconfig, kubelet, tmp_path):
    double.exec_handler = netprobe(double, broken={"pod@w2->pod@cp1"})
    out, checks = run(kubeconfig, tmp_path)
    check = checks["test_path_mtu_between_nodes"]
    assert check["verdict"] == "error", out
    assert "could not measure 1 of 6 path(s): w2->cp1: netprobe mtu in cf-mtu-" in check["message"]
    assert check["measured"]["paths"]["w2->cp1"]["error"].startswith("netprobe mtu in ")
    assert checks["test_path_mtu_between_host_network_and_pod"]["verdict"] == "pass"


def test_one_node_skips_both_path_checks_with_the_reason(double, kubeconfig, kubelet, tmp_path):
    for node in ("w1", "w2"):
        with double.lock:
            del double.objects[("nodes", "", node)]
    double.exec_handler = netprobe(double)
    out, checks = run(kubeconfig, tmp_path)
    between, host = (checks[name] for name in PATH_CHECKS)
    assert between["verdict"] == "skip" and host["verdict"] == "skip", out
    assert between["message"] == "needs two nodes to measure a path through the overlay; the cluster has 1"
    assert host["message"] == ("needs two nodes: a hostNetwork pod on one and a pod on another; "
                               "the cluster has 1 (cp1)")
