"""Conformance orchestration through the REAL kubernetes client against the API double (tests/apidouble).

Exercised: preflight (reachability, credentials, permissions, nodes), namespaces labelled as ours with the netprobe
ConfigMap, probe pods and the facts DaemonSet, waits with deadlines that name what they wait for, exec over the
websocket subprotocol with exit codes kept, cleanup on success, failure and interrupt, the --cleanup-only sweep, and
the whole harness (`pytest conformance ...` in a subprocess) end to end for the tuning check.
Not exercised here (needs a cluster): scheduling, image pulls, real pod networking, Cilium, MetalLB.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from apidouble.kubelet import NETPROBE, NODES, run_netprobe_locally, run_suite

from conformance import kube as k8s
from lab.spec import PRODUCTION_SYSCTLS

PROD = {name: int(v) if v.isdigit() else v for name, v in PRODUCTION_SYSCTLS.items()}  # as netprobe prints them


def session_for(kubeconfig, **kw) -> k8s.Session:
    kube = k8s.connect(kubeconfig)
    return k8s.Session(kube, k8s.StreamExecutor(kube), **kw)


# ---------------------------------------------------------------------------------------------- preflight


def test_preflight_passes_and_names_the_cluster(double, kubeconfig):
    assert k8s.preflight(k8s.connect(kubeconfig)) == "v1.37.0-apidouble (3 nodes)"


def test_preflight_wrong_credentials(double, tmp_path):
    path = double.kubeconfig(tmp_path / "bad", token="wrong")
    with pytest.raises(k8s.PreflightError, match=r"rejected our credentials \(401"):
        k8s.preflight(k8s.connect(path))


def test_preflight_unreachable(tmp_path, double):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    path = double.kubeconfig(tmp_path / "gone", server=f"http://127.0.0.1:{port}")
    with pytest.raises(k8s.PreflightError, match=r"cannot reach the API server at http://127.0.0.1:\d+: .*refused"):
        k8s.preflight(k8s.connect(path))


def test_preflight_api_server_stalling_after_its_version_is_a_preflight_error(double, kubeconfig):
    """Seen on the CI cluster: /version answered, an access review then timed out (urllib3 ReadTimeoutError) and
    pytest ended in an INTERNALERROR instead of the preflight's one clear error."""
    double.stalls["/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"] = 1.5
    with pytest.raises(k8s.PreflightError, match=r"answered its version, then not within 1s: .*timed out"):
        k8s.preflight(k8s.connect(kubeconfig), timeout=1.0)


def test_preflight_missing_permissions_listed(double, kubeconfig):
    double.deny("create", "pods/exec")
    double.deny("patch", "nodes")
    with pytest.raises(k8s.PreflightError, match="missing permissions .*: patch nodes, create pods/exec"):
        k8s.preflight(k8s.connect(kubeconfig))


def test_preflight_no_nodes(double, kubeconfig):
    for name in NODES:
        double.objects.pop(("nodes", "", name))
    with pytest.raises(k8s.PreflightError, match="has no nodes"):
        k8s.preflight(k8s.connect(kubeconfig))


def test_connect_missing_and_broken_kubeconfig(tmp_path):
    with pytest.raises(k8s.PreflightError, match="does not exist"):
        k8s.connect(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.write_text("this: is: not: a kubeconfig")
    with pytest.raises(k8s.PreflightError, match="cannot be used"):
        k8s.connect(str(broken))
    with pytest.raises(k8s.PreflightError, match="no kubeconfig"):
        k8s.connect(None)


# ---------------------------------------------------------------------------------------------- workloads


def test_namespace_labelled_with_configmap_and_cleanup(double, kubeconfig, kubelet):
    s = session_for(kubeconfig)
    ns = s.namespace("mtu")
    obj = double.get("namespaces", "", ns)
    assert obj["metadata"]["labels"][k8s.OWNER_LABEL] == "true"
    assert obj["metadata"]["labels"][k8s.RUN_LABEL] == s.run_id
    cm = double.get("configmaps", ns, "netprobe")
    assert cm["data"]["netprobe.py"] == NETPROBE.read_text()
    assert s.cleanup() == []
    assert double.get("namespaces", "", ns) is None and double.list("configmaps", ns) == []


def test_pods_per_node_pinned_and_waited(double, kubeconfig, kubelet):
    s = session_for(kubeconfig, probe_image="mirror.local/python:3.12-slim")
    ns = s.namespace("x")
    pods = s.pods_per_node(ns, "mtu", sorted(NODES), tcp=[8080], udp=[8080])
    assert sorted(pods) == sorted(NODES)
    name, ip = pods["w1"]
    spec = double.get("pods", ns, name)["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "w1"}
    c = spec["containers"][0]
    assert c["image"] == "mirror.local/python:3.12-slim"
    assert c["command"] == ["python3", "/netprobe/netprobe.py", "serve", "--tcp", "8080", "--udp", "8080"]
    assert spec["volumes"][0] == {"name": "netprobe", "configMap": {"name": "netprobe"}}
    assert ip.startswith("10.244.")


def test_host_network_serving_pod_is_bound_to_its_node_ip(double, kubeconfig, kubelet):
    """Bound to all of a node's addresses, serve would echo UDP from the route's source (cilium_host's address on
    Cilium's routes to pods), which the probing pod's connected socket drops."""
    s = session_for(kubeconfig)
    ns = s.namespace("mtu-host", {k8s.PSA_LABEL: "privileged"})
    pods = s.pods_per_node(ns, "mtu-host", ["cp1"], tcp=[18080], udp=[18080], host_network=True)
    assert pods == {"cp1": ("mtu-host-cp1", NODES["cp1"])}
    spec = double.get("pods", ns, "mtu-host-cp1")["spec"]
    container = spec["containers"][0]
    assert spec["hostNetwork"] and container["command"][-2:] == ["--bind", "$(HOST_IP)"]
    assert container["env"] == [{"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]


def test_facts_daemonset_is_privileged_host_network(double, kubeconfig, kubelet):
    s = session_for(kubeconfig)
    ns = s.namespace("facts")
    s.facts_daemonset(ns)
    pods = s.wait_pods_ready(ns, "app=netprobe-facts", 3, "of the facts DaemonSet", seconds=5)
    assert sorted(p.spec.node_name for p in pods) == sorted(NODES)
    tpl = double.get("daemonsets", ns, "netprobe-facts")["spec"]["template"]["spec"]
    assert tpl["hostNetwork"] and tpl["hostPID"] and tpl["containers"][0]["securityContext"]["privileged"]
    assert {"name": "host", "hostPath": {"path": "/"}} in tpl["volumes"]


def test_wait_deadline_says_what_and_last_state(double, kubeconfig, kubelet):
    kubelet.running = False
    s = session_for(kubeconfig)
    ns = s.namespace("x")
    s.probe_pod(ns, "client", {"app": "client"})
    started = time.monotonic()
    with pytest.raises(k8s.WaitTimeout) as err:
        s.wait_pods_ready(ns, "app=client", 1, "client", seconds=1.5)
    assert 1.5 <= time.monotonic() - started < 4
    text = str(err.value)
    assert "gave up after 2s waiting for 1 pod(s) client" in text
    assert "last state: 0/1 ready; client: Pending" in text


def test_image_pull_failure_fails_fast_naming_the_option(double, kubeconfig, kubelet):
    kubelet.waiting_reason = "ImagePullBackOff"
    s = session_for(kubeconfig)
    ns = s.namespace("x")
    s.probe_pod(ns, "client", {"app": "client"})
    started = time.monotonic()
    with pytest.raises(k8s.ConformanceError, match=r"cannot start: ImagePullBackOff(.|\n)*--probe-image"):
        s.wait_pods_ready(ns, "app=client", 1, "client", seconds=30)
    assert time.monotonic() - started < 5


def test_cleanup_after_a_failing_step_removes_everything(double, kubeconfig, kubelet):
    s = session_for(kubeconfig)
    try:
        s.namespace("a")
        s.namespace("b")
        raise RuntimeError("a check failed")
    except RuntimeError:
        pass
    finally:
        assert s.cleanup() == []
    assert double.list("namespaces") == []


def test_sweep_deletes_only_our_namespaces(double, kubeconfig):
    double.put("namespaces", {"metadata": {"name": "left-over", "labels": {k8s.OWNER_LABEL: "true"}}})
    double.put("namespaces", {"metadata": {"name": "kube-system", "labels": {}}})
    assert k8s.sweep(k8s.connect(kubeconfig)) == ["left-over"]
    assert [n["metadata"]["name"] for n in double.list("namespaces")] == ["kube-system"]


# ---------------------------------------------------------------------------------------------- exec


def test_netprobe_exec_over_websocket_real_probe(double, kubeconfig, kubelet):
    """Exec goes through the client's websocket stream; the double runs the real netprobe on loopback."""
    calls = []

    def handler(ns, pod, container, command):
        calls.append((ns, pod, container, command))
        return run_netprobe_locally(command)
    double.exec_handler = handler
    with socket.socket() as listener, socket.socket() as closed:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        s = session_for(kubeconfig)
        ns = s.namespace("x")
        s.probe_pod(ns, "client", {"app": "client"})
        s.wait_pods_ready(ns, "app=client", 1, "client", seconds=5)
        out = s.netprobe(ns, "client", ["connect", "--timeout", "1", "--to",
                                        f"127.0.0.1:{listener.getsockname()[1]}/tcp",
                                        "--to", f"127.0.0.1:{closed.getsockname()[1]}/tcp"])
    assert [r["verdict"] for r in out] == ["connected", "refused"]
    assert calls[0][:3] == (ns, "client", "probe")
    assert calls[0][3][:2] == ["python3", "/netprobe/netprobe.py"]


@pytest.mark.parametrize("rc,err,expected", [
    (1, b"cannot bind", k8s.ProbeFailed),
    (2, b"bad args", k8s.ConformanceError),
    (0, b"", k8s.ProbeFailed),  # exit 0 but no JSON on stdout
])
def test_exit_codes_survive_exec(double, kubeconfig, kubelet, rc, err, expected):
    double.exec_handler = lambda *a: (rc, b"not json" if rc == 0 else b"", err)
    s = session_for(kubeconfig)
    ns = s.namespace("x")
    s.probe_pod(ns, "p", {"app": "p"})
    with pytest.raises(expected) as info:
        s.netprobe(ns, "p", ["facts"])
    assert type(info.value) is expected
    if rc == 1:
        assert "exit 1" in str(info.value) and "cannot bind" in str(info.value)


def test_exec_into_a_pod_that_is_not_running_is_a_transport_failure(double, kubeconfig, kubelet):
    kubelet.running = False
    s = session_for(kubeconfig)
    ns = s.namespace("x")
    s.probe_pod(ns, "p", {"app": "p"})
    with pytest.raises(k8s.ProbeFailed, match=f"exec in {ns}/p failed"):
        s.netprobe(ns, "p", ["facts"])


# ---------------------------------------------------------------------------------------------- the harness


def facts_for(node: str, overrides: dict | None = None) -> bytes:
    """A real `netprobe facts` document from this machine, with the tuning a node would have."""
    doc = json.loads(subprocess.run([sys.executable, str(NETPROBE), "facts"], capture_output=True, check=True).stdout)
    doc["hostname"] = node
    doc["sysctls"].update(PROD, **(overrides or {}))
    return json.dumps(doc).encode()


def tuning_exec(bad_node: str | None = None):
    facts = {n: facts_for(n, {"net.core.somaxconn": 4096} if n == bad_node else None) for n in NODES}

    def handler(ns, pod, container, command):
        node = pod.rsplit("-", 1)[-1]
        if command[-1] == "facts":
            return 0, facts[node], b""
        raise AssertionError(f"unexpected exec {command}")
    return handler


TUNING_ARGS = ["conformance/test_tuning.py"]  # expected: the production set (the default without --lab)


@pytest.mark.parametrize("parallel", [[], ["-n", "2", "--dist", "loadgroup"]], ids=["serial", "xdist"])
def test_harness_tuning_check_passes_end_to_end(double, kubeconfig, kubelet, tmp_path, parallel):
    """With xdist the report is assembled on the controller from the workers' reports."""
    double.exec_handler = tuning_exec()
    proc = run_suite(TUNING_ARGS + parallel + ["--kubeconfig", kubeconfig, "--results-dir", str(tmp_path / "r")],
                     tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "conformance summary" in out and "PASS" in out
    doc = json.loads((tmp_path / "r" / "conformance-latest.json").read_text())
    [check] = doc["checks"]
    assert check["verdict"] == "pass" and check["measured"] == {"sysctl_mismatches": 0, "nodes": 3}
    assert double.list("namespaces") == []  # cleaned up on success


def test_harness_tuning_mismatch_prints_the_table_and_cleans_up(double, kubeconfig, kubelet, tmp_path):
    double.exec_handler = tuning_exec(bad_node="w2")
    proc = run_suite(TUNING_ARGS + ["--kubeconfig", kubeconfig, "--results-dir", str(tmp_path / "r")], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "net.core.somaxconn" in out and "*4096*" in out and "1 mismatch(es) marked" in out
    doc = json.loads((tmp_path / "r" / "conformance-latest.json").read_text())
    assert doc["checks"][0]["verdict"] == "fail" and doc["checks"][0]["measured"]["sysctl_mismatches"] == 1
    assert double.list("namespaces") == []  # cleaned up on failure


def test_harness_bad_credentials_one_error_before_any_check(double, tmp_path):
    path = double.kubeconfig(tmp_path / "bad", token="wrong")
    proc = run_suite(["conformance", "--kubeconfig", path], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert out.count("ERROR: conformance preflight failed, no check was run") == 1
    assert "rejected our credentials" in out
    assert not re.search(r"\b\d+ (passed|failed|errors?)\b|::test_", out), out  # no check ran
    assert [m for m, p in double.requests if m != "GET"] == []  # nothing was created


def test_harness_interrupt_cleans_up(double, kubeconfig, kubelet, tmp_path):
    kubelet.running = False  # the DaemonSet never becomes ready: the run blocks in a wait
    proc = run_suite(TUNING_ARGS + ["--kubeconfig", kubeconfig, "--wait-timeout", "120"], tmp_path)
    deadline = time.monotonic() + 30
    while not double.list("daemonsets") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert double.list("daemonsets"), "the run never created its DaemonSet"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out  # pytest: interrupted
    assert double.list("namespaces") == [], out


def test_harness_cleanup_only_sweeps(double, kubeconfig, tmp_path):
    double.put("namespaces", {"metadata": {"name": "cf-mtu-abc123", "labels": {k8s.OWNER_LABEL: "true"}}})
    double.put("namespaces", {"metadata": {"name": "default", "labels": {}}})
    proc = run_suite(["conformance", "--kubeconfig", kubeconfig, "--cleanup-only"], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "deleted 1 namespace(s)" in out and "cf-mtu-abc123" in out
    assert [n["metadata"]["name"] for n in double.list("namespaces")] == ["default"]


def test_collect_only_lists_every_check_without_a_cluster(tmp_path):
    proc = run_suite(["conformance", "--collect-only", "--kubeconfig", str(tmp_path / "none")], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for check in ["test_tuning.py::test_node_sysctls_match_expected",
                  "test_kube_proxy_replacement.py::test_no_kube_proxy_daemonset",
                  "test_kube_proxy_replacement.py::test_no_kube_proxy_process_or_rules",
                  "test_kube_proxy_replacement.py::test_cilium_reports_kube_proxy_replacement",
                  "test_loadbalancer.py::test_ip_from_pool_within_deadline",
                  "test_loadbalancer.py::test_http_from_runner_reaches_a_backend",
                  "test_loadbalancer.py::test_neighbour_entry_maps_to_exactly_one_node",
                  "test_loadbalancer.py::test_failover_to_another_node",
                  "test_loadbalancer.py::test_requested_ip_is_honoured",
                  "test_loadbalancer.py::test_request_beyond_pool_stays_pending_with_event",
                  "test_loadbalancer.py::test_external_traffic_policy_local_preserves_source_ip",
                  "test_default_deny.py::test_step1_no_policy_everything_connects",
                  "test_default_deny.py::test_step2_default_deny_blocks_everything_in_and_out",
                  "test_default_deny.py::test_step3_only_dns_and_frontend_to_backend_pass",
                  "test_default_deny.py::test_step4_egress_allow_list_with_except",
                  "test_mtu.py::test_pod_route_mtu", "test_mtu.py::test_path_mtu_between_nodes",
                  "test_conntrack.py::test_connections_held_without_loss[clusterip]",
                  "test_conntrack.py::test_connections_held_without_loss[loadbalancer]"]:
        assert check in out, f"{check} not collected:\n{out}"
