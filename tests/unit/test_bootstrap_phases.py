"""Bootstrap phases: order, skip logic, and the retry / deadline / error-surfacing helpers they are built on,
driven with real subprocesses on LocalHost (scripted commands that fail N times, then succeed)."""
from __future__ import annotations

import shutil
import subprocess
import textwrap
import types
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from lab.cilium_status import kpr_mode
from lab.errors import LabError, RemoteError, WaitTimeout
from lab.kubeconfig import rewrite_server
from lab.kubectl import (api_client, daemonset_rolled_out, deployment_rolled_out, deployment_serving, node_ready,
                         not_ready, pod_ready)
from lab.phases.cilium import Cilium
from lab.phases.join import Join, api_not_ready, parse_join_command
from lab.phases.kubeadm import Kubeadm, init_failure
from lab.phases.kubeconfig import Kubeconfig
from lab.phases.metallb import Metallb, endpoint_slices_ready, webhook_not_ready
from lab.phases.ready import PODNET_LABEL, Ready, podnet_pod, podnet_state
from lab.phases.runtime import (SANDBOX_IMAGE, Runtime, containerd_settings, edit_containerd_config,
                                fstab_without_swap, k8s_repo_line, system_slice_weight_problem)
from lab.phase import Context, Log, run_on_nodes
from lab.pipeline import phase_names, run_phases, up_phases
from lab.remote.host import CommandResult, LocalHost
from lab.spec import load_lab, parse_lab
from lab.state import LabState
from lab.status import kubernetes_status
from lab.wait import matches_any, retry_command, wait_for

REPO = Path(__file__).resolve().parents[2]
CLUSTER_PHASES = [Kubeadm, Join, Cilium, Metallb, Ready, Kubeconfig]


def ctx_for(lab, tmp_path) -> Context:
    return Context(lab=lab, state=LabState(lab.name, root=tmp_path / ".lab"), log=Log(quiet=True))


def ci_lab():
    return load_lab(REPO / "labs" / "ci.yaml")


def default_lab():
    return load_lab(REPO / "labs" / "default.yaml")


# ---------------------------------------------------------------------------------------------- order and skips


def test_bootstrap_phases_follow_tune_in_order():
    names = phase_names(up_phases())
    tail = ["tune", "runtime", "kubeadm", "cilium", "join", "metallb", "ready", "kubeconfig"]
    assert names[names.index("tune"):] == tail


def test_cluster_phases_skip_when_kubernetes_disabled(tmp_path):
    ctx = ctx_for(ci_lab(), tmp_path)
    for phase in CLUSTER_PHASES:
        assert phase().skip_reason(ctx) == "kubernetes.enabled is false", phase.name
    assert Runtime().skip_reason(ctx) is None  # the runtime is prepared even without Kubernetes


def test_cluster_phases_apply_when_kubernetes_enabled(tmp_path):
    ctx = ctx_for(default_lab(), tmp_path)
    assert [p().skip_reason(ctx) for p in CLUSTER_PHASES] == [None] * len(CLUSTER_PHASES)


def test_join_skips_a_lab_without_workers(tmp_path):
    data = yaml.safe_load((REPO / "labs" / "default.yaml").read_text())
    data["nodes"] = data["nodes"][:1]
    assert Join().skip_reason(ctx_for(parse_lab(data), tmp_path)) == "no worker nodes"


def test_run_phases_records_skips_without_touching_nodes(tmp_path):
    ctx = ctx_for(ci_lab(), tmp_path)  # no hosts recorded: any node contact would raise
    record = run_phases(ctx, [p() for p in CLUSTER_PHASES])
    assert {name: r["status"] for name, r in record.items() if name != "_total"} == \
        {p.name: "skipped" for p in CLUSTER_PHASES}


# ---------------------------------------------------------------------------------------------- scripted commands


def scripted_command(tmp_path: Path, failures: int, message: str, rc: int = 1) -> str:
    """A script that fails ``failures`` times (printing ``message`` to stderr), then succeeds; counts calls."""
    script = tmp_path / "scripted-command"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        n=$(cat {tmp_path}/calls 2>/dev/null || echo 0); n=$((n+1)); echo $n > {tmp_path}/calls
        if [ $n -le {failures} ]; then echo "attempt $n" ; echo "{message}" >&2; exit {rc}; fi
        echo "done after $n calls"
        """))
    script.chmod(0o755)
    return str(script)


def calls(tmp_path: Path) -> int:
    return int((tmp_path / "calls").read_text())


def test_retry_succeeds_after_transient_failures(tmp_path):
    cmd = scripted_command(tmp_path, 3, "dial tcp 10.0.0.1:6443: connect: connection refused")
    result = retry_command(LocalHost(), cmd, what="scripted join", deadline_s=30,
                                   transient=api_not_ready, interval=0.05)
    assert result.ok and "done after 4 calls" in result.stdout and calls(tmp_path) == 4


def test_retry_runs_cleanup_between_attempts(tmp_path):
    cmd = scripted_command(tmp_path, 2, "could not find a JWS signature in the cluster-info ConfigMap")
    cleanups = []
    retry_command(LocalHost(), cmd, what="scripted join", deadline_s=30, transient=api_not_ready,
                          interval=0.05, before_retry=lambda: cleanups.append(1))
    assert len(cleanups) == 2


def test_real_error_is_not_retried_and_surfaces_its_lines(tmp_path):
    cmd = scripted_command(tmp_path, 5, "[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: already exists")
    with pytest.raises(RemoteError) as err:
        retry_command(LocalHost(), cmd, what="scripted join", deadline_s=30, transient=api_not_ready,
                              interval=0.05)
    assert calls(tmp_path) == 1
    assert "FileAvailable--etc-kubernetes-kubelet.conf" in err.value.message
    assert err.value.hint and "lab ssh" in err.value.hint


def test_retry_gives_up_at_the_deadline_with_the_last_output(tmp_path):
    cmd = scripted_command(tmp_path, 10_000, "Internal error occurred: failed calling webhook "
                                             "\"ipaddresspoolvalidationwebhook.metallb.io\": connection refused")
    start = time.monotonic()
    with pytest.raises(WaitTimeout) as err:
        retry_command(LocalHost(), cmd, what="applying scripted pool", deadline_s=1.5,
                              transient=webhook_not_ready, interval=0.2)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 5
    assert "applying scripted pool" in err.value.message and "(deadline 2s)" in err.value.message
    assert "failed calling webhook" in err.value.message and calls(tmp_path) >= 3


def test_a_hung_attempt_is_bounded_by_the_deadline(tmp_path):
    start = time.monotonic()
    with pytest.raises(WaitTimeout):
        retry_command(LocalHost(), "sleep 30", what="scripted hang", deadline_s=1.0,
                              transient=lambda r: True, interval=0.1)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("text, transient", [
    ('error execution phase preflight: couldn\'t validate the identity of the API Server: Get '
     '"https://192.168.150.10:6443/api/v1/namespaces/kube-public/configmaps/cluster-info?timeout=10s": '
     'dial tcp 192.168.150.10:6443: connect: connection refused', True),
    ("could not find a JWS signature in the cluster-info ConfigMap for token ID \"abcdef\"", True),
    ("net/http: TLS handshake timeout", True),
    ("[ERROR Swap]: swap is supported for cgroup v2 only", False),
    ("[ERROR FileContent--proc-sys-net-ipv4-ip_forward]: /proc/sys/net/ipv4/ip_forward contents are not set to 1",
     False),
])
def test_join_transient_classification(text, transient):
    assert api_not_ready(CommandResult("kubeadm join", 1, "", text)) is transient


@pytest.mark.parametrize("text, transient", [
    ('Error from server (InternalError): error when creating "metallb.yaml": Internal error occurred: failed '
     'calling webhook "ipaddresspoolvalidationwebhook.metallb.io": failed to call webhook: Post '
     '"https://metallb-webhook-service.metallb-system.svc:443/validate-metallb-io-v1beta1-ipaddresspool?'
     'timeout=10s": dial tcp 10.101.0.3:443: connect: connection refused', True),
    ('no endpoints available for service "metallb-webhook-service"', True),
    ('The IPAddressPool "default-pool" is invalid: spec.addresses[0]: Invalid value', False),
])
def test_webhook_transient_classification(text, transient):
    assert webhook_not_ready(CommandResult("kubectl apply", 1, "", text)) is transient


def test_kubeadm_failure_shows_its_own_last_lines(tmp_path):
    script = tmp_path / "scripted-init"
    script.write_text("#!/bin/sh\nfor i in $(seq 1 40); do echo \"line $i\" >&2; done\n"
                      "echo 'error execution phase wait-control-plane: could not initialize a Kubernetes cluster' >&2\n"
                      "exit 1\n")
    script.chmod(0o755)
    result = LocalHost().run(str(script), check=False)
    err = init_failure("cp1", result, tmp_path / "kubeadm-init.log")
    assert "could not initialize a Kubernetes cluster" in err.message
    assert "line 40" in err.message and "line 2\n" not in err.message
    assert str(tmp_path / "kubeadm-init.log") in err.message and "lab logs" in err.hint


def test_parse_join_command():
    out = ("kubeadm join 192.168.150.10:6443 --token abcdef.0123456789abcdef \\\n"
           "  --discovery-token-ca-cert-hash sha256:" + "b" * 64 + " \n")
    assert parse_join_command(out) == ("abcdef.0123456789abcdef", "sha256:" + "b" * 64)
    with pytest.raises(LabError):
        parse_join_command("error: timed out waiting for the condition")


# ---------------------------------------------------------------------------------------------- waits, threads


def test_wait_for_returns_when_the_probe_passes():
    seen = iter([(False, "0/3"), (False, "2/3"), (True, "3/3")])
    assert wait_for("three of three", 5, lambda: next(seen), interval=0.01) == "3/3"


def test_wait_for_times_out_with_what_and_last_detail():
    def probe():
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(WaitTimeout) as err:
        wait_for("Cilium agent DaemonSet rolled out", 0.3, probe, interval=0.05)
    assert "Cilium agent DaemonSet rolled out" in err.value.message and "connection refused" in err.value.message


def test_wait_for_does_not_swallow_lab_errors():
    def probe():
        raise LabError("spec says no", hint="x")  # not a transport failure: never "not yet"

    with pytest.raises(LabError):
        wait_for("x", 5, probe, interval=0.01)


@pytest.mark.parametrize("exc", [RemoteError("ssh: connection lost"), ConnectionResetError("reset by peer"),
                                 TimeoutError("timed out"), k8s.ApiException(status=503, reason="Unavailable"),
                                 k8s.ApiException(status=0, reason="no response")],
                         ids=["RemoteError", "ConnectionReset", "timeout", "api-503", "api-0"])
def test_wait_for_counts_transport_errors_as_not_yet(exc):
    calls = []

    def probe():
        calls.append(1)
        if len(calls) < 3:
            raise exc
        return True, "up"

    assert wait_for("the API server", 5, probe, interval=0.01) == "up" and len(calls) == 3
    with pytest.raises(WaitTimeout) as err:
        wait_for("the API server", 0.1, lambda: (_ for _ in ()).throw(exc), interval=0.02)
    assert "the API server" in err.value.message and type(exc).__name__ in err.value.message


@pytest.mark.parametrize("exc", [KeyError("status"), ValueError("bad JSON"), TypeError("None is not iterable"),
                                 k8s.ApiException(status=404, reason="Not Found"),
                                 k8s.ApiException(status=403, reason="Forbidden")],
                         ids=["KeyError", "ValueError", "TypeError", "api-404", "api-403"])
def test_wait_for_propagates_what_is_not_transport(exc):
    calls = []

    def probe():
        calls.append(1)
        raise exc

    started = time.monotonic()
    with pytest.raises(type(exc)):
        wait_for("x", 5, probe, interval=0.01)
    assert len(calls) == 1 and time.monotonic() - started < 1


def test_run_on_nodes_is_concurrent_and_reports_every_failure():
    start = time.monotonic()
    run_on_nodes(["a", "b", "c"], lambda n: time.sleep(0.5))
    assert time.monotonic() - start < 1.2

    def work(name):
        if name != "a":
            raise RemoteError(f"{name} broke", hint="fix it")

    with pytest.raises(RemoteError) as err:
        run_on_nodes(["a", "b", "c"], work)
    assert "2 of 3" in err.value.message and "b broke" in err.value.message and "c broke" in err.value.message


# ---------------------------------------------------------------------------------------------- predicates


def meta(name, generation=1):
    return k8s.V1ObjectMeta(name=name, generation=generation)


def test_daemonset_rollout_predicate():
    spec = k8s.V1DaemonSetSpec(selector=k8s.V1LabelSelector(), template=k8s.V1PodTemplateSpec())
    ds = k8s.V1DaemonSet(metadata=meta("cilium", 2), spec=spec, status=k8s.V1DaemonSetStatus(
        current_number_scheduled=3, desired_number_scheduled=3, number_misscheduled=0, number_ready=3,
        number_available=3, updated_number_scheduled=3, observed_generation=2))
    assert daemonset_rolled_out(ds)[0]
    ds.status.updated_number_scheduled = 2
    ok, detail = daemonset_rolled_out(ds)
    assert not ok and "3/3 available, 2 updated" in detail
    ds.status.updated_number_scheduled, ds.status.observed_generation = 3, 1
    assert not daemonset_rolled_out(ds)[0]


def test_deployment_rollout_predicate():
    dep = k8s.V1Deployment(metadata=meta("cilium-operator"), spec=k8s.V1DeploymentSpec(
        replicas=2, selector=k8s.V1LabelSelector(), template=k8s.V1PodTemplateSpec()),
        status=k8s.V1DeploymentStatus(replicas=2, updated_replicas=2, available_replicas=1, observed_generation=1))
    assert not deployment_rolled_out(dep)[0]
    dep.status.available_replicas = 2
    assert deployment_rolled_out(dep)[0]


def test_an_operator_serves_before_the_workers_join():
    """The cilium phase runs before join: one of two anti-affine operator replicas is all one node can hold."""
    dep = k8s.V1Deployment(metadata=meta("cilium-operator", generation=2), spec=k8s.V1DeploymentSpec(
        replicas=2, selector=k8s.V1LabelSelector(), template=k8s.V1PodTemplateSpec()),
        status=k8s.V1DeploymentStatus(replicas=2, updated_replicas=2, available_replicas=0, observed_generation=2))
    assert deployment_serving(dep) == (False, "deployment cilium-operator: 0/2 available")
    dep.status.available_replicas = 1
    assert deployment_serving(dep) == (True, "deployment cilium-operator: 1/2 available")
    dep.status.observed_generation = 1  # the one available replica is of the old spec
    assert not deployment_serving(dep)[0]


def test_node_and_pod_readiness():
    node = k8s.V1Node(metadata=meta("w1"), status=k8s.V1NodeStatus(conditions=[
        k8s.V1NodeCondition(type="Ready", status="False")]))
    assert not_ready([node], node_ready) == ["w1"]
    done = k8s.V1Pod(metadata=meta("job"), status=k8s.V1PodStatus(phase="Succeeded"))
    running = k8s.V1Pod(metadata=meta("coredns"), status=k8s.V1PodStatus(phase="Running", conditions=[
        k8s.V1PodCondition(type="Ready", status="True")]))
    assert not_ready([done, running], pod_ready) == []


def test_pod_network_probe_is_a_valid_pinned_pause_pod():
    import kubernetes_validate

    from lab.spec import KUBERNETES_VERSION
    pod = podnet_pod("cp1")
    kubernetes_validate.validate(pod, f"{KUBERNETES_VERSION}.0", strict=True)
    assert pod["spec"]["nodeName"] == "cp1" and pod["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert pod["spec"]["containers"][0]["image"] == SANDBOX_IMAGE and pod["metadata"]["labels"][PODNET_LABEL] == "cp1"
    assert "hostNetwork" not in pod["spec"]  # on the pod network: Cilium must build an endpoint for it


def test_pod_network_probe_state_names_each_node_that_waits():
    def pod(node, phase, ready=False, waiting=None):
        return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=f"lab-podnet-{node}", labels={PODNET_LABEL: node}),
                         status=k8s.V1PodStatus(phase=phase, conditions=[k8s.V1PodCondition(
                             type="Ready", status="True" if ready else "False")], container_statuses=[
                             k8s.V1ContainerStatus(name="pause", image=SANDBOX_IMAGE, image_id="", ready=ready,
                                                   restart_count=0, state=k8s.V1ContainerState(
                                                       waiting=k8s.V1ContainerStateWaiting(reason=waiting)))]))

    pods = [pod("w1", "Running", ready=True), pod("cp1", "Pending", waiting="ContainerCreating")]
    assert podnet_state(pods, ["cp1", "w1"]) == (False, "cp1: Pending (ContainerCreating); w1: Ready")
    assert podnet_state(pods[:1], ["cp1", "w1"]) == (False, "cp1: no probe pod; w1: Ready")
    assert podnet_state([pods[0], pod("cp1", "Running", ready=True)], ["cp1", "w1"]) == (True, "cp1: Ready; w1: Ready")


def agent_pod(name, node, waiting=None):
    state = k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason=waiting)) if waiting else \
        k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name), spec=k8s.V1PodSpec(node_name=node, containers=[]),
                     status=k8s.V1PodStatus(container_statuses=[k8s.V1ContainerStatus(
                         name="cilium-agent", image="", image_id="", ready=False, restart_count=9, state=state)]))


FATAL_LOG = (Path(__file__).resolve().parents[1] / "fixtures/cilium/agent_log_fatal_nat_size.txt").read_text()


def test_an_agent_that_refuses_its_configuration_stops_the_rollout_in_its_own_words(monkeypatch):
    import lab.phases.cilium as cilium_phase
    asked = []

    def fake_kubectl(host, *args, **kw):
        asked.append(args)
        return CommandResult(args, 0, FATAL_LOG if args[3] == "cilium-7zg5z" else "level=info msg=\"up\"\n", "")

    monkeypatch.setattr(cilium_phase, "kubectl", fake_kubectl)
    monkeypatch.setattr(cilium_phase, "cp_host", lambda ctx: None)
    pods = [agent_pod("cilium-nc9gh", "w1", "CrashLoopBackOff"), agent_pod("cilium-abcde", "w2")]
    assert cilium_phase.fatal_agents(None, pods) == []  # crash-looping without a fatal line: the wait goes on
    assert [a[3] for a in asked] == ["cilium-nc9gh"] and "--previous" in asked[0]
    with pytest.raises(LabError) as err:
        cilium_phase.fatal_agents(None, [agent_pod("cilium-7zg5z", "cp1", "CrashLoopBackOff")])
    assert str(err.value).startswith(
        "the Cilium agent cilium-7zg5z on cp1 refuses its configuration: invalid daemon configuration: specified NAT "
        "tables size 1000000 must not exceed maximum CT table size 24576")
    assert "cilium.values" in err.value.hint


def test_other_fatal_exits_are_reported_not_acted_on(monkeypatch):
    """Under TCG a datapath compile killed at its fixed limit ends fatally too, and a restart gets further."""
    import lab.phases.cilium as cilium_phase
    log = 'level=fatal msg="Failed to compile bpf_sock.o: signal: killed" subsys=daemon\n'
    monkeypatch.setattr(cilium_phase, "kubectl", lambda host, *a, **kw: CommandResult(a, 0, log, ""))
    monkeypatch.setattr(cilium_phase, "cp_host", lambda ctx: None)
    assert cilium_phase.fatal_agents(None, [agent_pod("cilium-x", "cp1", "CrashLoopBackOff")]) == [
        "cilium-x on cp1 exited: Failed to compile bpf_sock.o: signal: killed"]
    assert cilium_phase.agent_fatal('level=fatal msg="a \\"quoted\\" word" x') == 'a "quoted" word'
    assert cilium_phase.agent_fatal("level=info msg=\"fine\"") is None


def test_webhook_endpoint_readiness():
    def slice_(ready):
        return k8s.V1EndpointSlice(address_type="IPv4", endpoints=[k8s.V1Endpoint(
            addresses=["10.244.1.5"], conditions=k8s.V1EndpointConditions(ready=ready))])

    assert endpoint_slices_ready([slice_(False)])[0] is False
    assert endpoint_slices_ready([])[0] is False
    assert endpoint_slices_ready([slice_(False), slice_(True)]) == (True, "webhook endpoints ready: 10.244.1.5")


def test_kpr_mode_from_cilium_status():
    assert kpr_mode('{"kube-proxy-replacement": {"mode": "True", "devices": []}}') == "True"
    assert kpr_mode('{"kube-proxy-replacement": {"mode": "False"}}') == "False"
    assert kpr_mode("not json") is None


# ---------------------------------------------------------------------------------------------- kubeconfig, status


ADMIN_CONF = """\
apiVersion: v1
kind: Config
clusters:
- cluster: {certificate-authority-data: Q0E=, server: 'https://192.168.150.10:6443'}
  name: default
contexts:
- context: {cluster: default, user: kubernetes-admin}
  name: kubernetes-admin@default
current-context: kubernetes-admin@default
users:
- name: kubernetes-admin
  user: {client-certificate-data: Q0VSVA==, client-key-data: S0VZ}
"""


def test_rewrite_server_keeps_credentials():
    out = yaml.safe_load(rewrite_server(ADMIN_CONF.replace("192.168.150.10", "cp1.internal"),
                                                "https://192.168.150.10:6443"))
    assert out["clusters"][0]["cluster"]["server"] == "https://192.168.150.10:6443"
    assert out["users"][0]["user"]["client-key-data"] == "S0VZ"
    api_client(yaml.safe_dump(out))  # the kubernetes client accepts it
    with pytest.raises(LabError):
        rewrite_server("apiVersion: v1\nkind: Config\n", "https://x:6443")


def test_cluster_status_without_kubernetes_or_kubeconfig(tmp_path):
    assert kubernetes_status(ctx_for(ci_lab(), tmp_path)) == {"cluster": "none",
                                                                   "reason": "kubernetes.enabled is false"}
    status = kubernetes_status(ctx_for(default_lab(), tmp_path))
    assert status["cluster"] == "absent" and "lab up" in status["hint"]


def test_cluster_status_reports_an_unreachable_api(tmp_path):
    ctx = ctx_for(default_lab(), tmp_path)
    ctx.state.kubeconfig.parent.mkdir(parents=True)
    ctx.state.kubeconfig.write_text(ADMIN_CONF.replace("192.168.150.10:6443", "127.0.0.1:9"))
    assert kubernetes_status(ctx)["cluster"] == "unreachable"


# ---------------------------------------------------------------------------------------------- runtime pieces


def containerd_default() -> str:
    exe = shutil.which("containerd")
    assert exe, "containerd is needed for this test (apt-get install containerd): it checks our edit against " \
                "the real default config of Debian's containerd, the one on the e2e image"
    return subprocess.run([exe, "config", "default"], capture_output=True, text=True, check=True).stdout


def test_containerd_edit_reads_back_through_containerd(tmp_path):
    edited = edit_containerd_config(containerd_default())
    config = tmp_path / "config.toml"
    config.write_text(edited)
    dump = subprocess.run(["containerd", "--config", str(config), "config", "dump"], capture_output=True,
                          text=True, check=True).stdout
    assert containerd_settings(dump) == {"SystemdCgroup": True, "sandbox_image": SANDBOX_IMAGE}
    assert containerd_settings(containerd_default())["SystemdCgroup"] is False  # the edit did something


def test_containerd_edit_handles_the_v3_layout_and_refuses_unknown_ones():
    # containerd 2.x (config version 3) spells the sandbox image differently; lines as that layout writes them
    v3 = ("version = 3\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = 'registry.k8s.io/pause:3.10'\n"
          "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n  SystemdCgroup = false\n")
    assert containerd_settings(edit_containerd_config(v3)) == {"SystemdCgroup": True, "sandbox_image": SANDBOX_IMAGE}
    with pytest.raises(ValueError):
        edit_containerd_config("version = 2\n")


def test_fstab_swap_entries_commented_once():
    fstab = "UUID=1 / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n# /old none swap sw 0 0\n"
    fixed = fstab_without_swap(fstab)
    assert "\n/swapfile" not in fixed and "UUID=1 / ext4" in fixed and fstab_without_swap(fixed) == fixed


def test_kubernetes_repo_is_the_specs_minor():
    assert k8s_repo_line(default_lab()).startswith(
        "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/v1.37/deb/")


def test_cluster_waits_retry_forbidden_while_the_api_server_starts():
    """Seen on the real CI cluster: a restarting API server refused kubernetes-admin with 403 until its RBAC
    cache synced. Cluster waits (api_starting) retry 401/403/429; the default wait propagates a 403 at once."""
    from kubernetes.client.exceptions import ApiException

    from lab.errors import WaitTimeout
    from lab.wait import api_starting, wait_for

    answers = iter([ApiException(status=403, reason="Forbidden"), ApiException(status=429), (True, "rolled out")])

    def probe():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for("rollout", 30, probe, interval=0, transient=api_starting) == "rolled out"
    with pytest.raises(ApiException):
        wait_for("rollout", 30, lambda: (_ for _ in ()).throw(ApiException(status=403)), interval=0)
    with pytest.raises(WaitTimeout, match="Forbidden"):
        wait_for("rollout", 0.2, lambda: (_ for _ in ()).throw(ApiException(status=403, reason="Forbidden")),
                 interval=0.05, transient=api_starting)
    assert not api_starting(ApiException(status=404))


@pytest.mark.parametrize("output, version, too_old", [
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", "1.37.2", False),  # Debian 12
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", "1.38.0", True),
    ("containerd containerd.io v2.2.0 1c4457e00facac03ce1d75f7b6777a7a851e5c41", "1.38.0", False),
])
def test_containerd_too_old_for_the_kubernetes_version(output, version, too_old):
    from lab.phases.runtime import containerd_too_old

    why = containerd_too_old(output, version)
    assert (why is not None) == too_old, why
    if too_old:
        assert "containerd 1.6.20 is too old for Kubernetes 1.38.0" in why and "2.x" in why


def test_a_busy_api_server_is_retried_but_a_rejected_object_is_not():
    """Seen on the CI cluster under TCG: MetalLB's manifest failed on a starved etcd. That is retried; an invalid
    object is not (it would never pass)."""
    from types import SimpleNamespace

    from lab.kubectl import API_BUSY

    busy = matches_any(API_BUSY)
    starved = ('Error from server (Invalid): error when creating "metallb-native.yaml": Service '
               '"metallb-webhook-service" is invalid: spec.clusterIPs: Invalid value: [""]: failed to allocate IP: '
               'etcdserver: request timed out')
    assert busy(SimpleNamespace(stdout="", stderr=starved))
    assert busy(SimpleNamespace(stdout="", stderr="Unable to connect to the server: net/http: TLS handshake timeout"))
    # the sixth fresh up's metallb phase stopped on this one, 29 minutes in, while the API server restarted
    assert busy(SimpleNamespace(stdout="", stderr=(
        'error: error validating "/var/lib/lab/bundle/manifests/metallb-native.yaml": error validating data: '
        'failed to download openapi: unknown; if you choose to ignore these errors, turn validation off with '
        '--validate=false')))
    assert busy(SimpleNamespace(stdout="", stderr=(
        'Error from server (Forbidden): pods is forbidden: User "kubernetes-admin" cannot list resource "pods" in '
        'API group "" at the cluster scope')))
    invalid = ('The IPAddressPool "lab-pool" is invalid: spec.addresses[0]: Invalid value: "10.0.0.300": '
               'invalid CIDR')
    assert not busy(SimpleNamespace(stdout="", stderr=invalid))


def test_control_plane_announce_label_matches_the_spec(monkeypatch):
    """metallb.controlPlanesAnnounce: a control plane with kubeadm's exclusion label is wrong when it should
    announce, and one without it is wrong when it should not."""
    import types

    import kubernetes.client

    from lab.phases import metallb as phase
    from lab.spec import Lab

    labels = {"cp1": {phase.EXCLUDE_LB_LABEL: ""}, "w1": {}}

    class Core:
        def __init__(self, api):
            pass

        def read_node(self, name, _request_timeout=None):
            return types.SimpleNamespace(metadata=types.SimpleNamespace(labels=labels[name]))

    monkeypatch.setattr(phase, "api_client", lambda kubeconfig: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", Core)
    doc = {"name": "t", "nodes": [{"name": "cp1", "role": "control-plane"}, {"name": "w1", "role": "worker"}]}
    assert phase.announce_labels_wrong("kc", Lab.model_validate(doc)) == []
    announcing = Lab.model_validate({**doc, "metallb": {"controlPlanesAnnounce": True}})
    assert announcing.metallb.control_planes_announce is True
    assert phase.announce_labels_wrong("kc", announcing) == ["cp1"]
    labels["cp1"] = {}
    assert phase.announce_labels_wrong("kc", announcing) == []
    assert phase.announce_labels_wrong("kc", Lab.model_validate(doc)) == ["cp1"]


def test_memberlist_timing_is_done_only_once_the_speakers_restarted_with_it(monkeypatch):
    """On a TCG lab the phase is done when the ConfigMap holds the rendered file AND the speaker template carries
    its checksum: a file written but never read (speakers not restarted) is not done."""
    import types

    import kubernetes.client

    from lab.phases import metallb as phase
    from lab.render.metallb import emulated_memberlist_configmap, memberlist_checksum
    from lab.spec import Lab

    doc = {"name": "t", "libvirt": {"accel": "tcg"},
           "nodes": [{"name": "cp1", "role": "control-plane"}, {"name": "w1", "role": "worker"}]}
    lab = Lab.model_validate(doc)
    want = emulated_memberlist_configmap(lab)
    state = {"data": dict(want["data"]), "annotations": {}}

    class Core:
        def __init__(self, api):
            pass

        def read_namespaced_config_map(self, name, namespace, _request_timeout=None):
            assert (name, namespace) == ("metallb-memberlist-config", "metallb-system")
            return types.SimpleNamespace(data=state["data"])

    class Apps:
        def __init__(self, api):
            pass

        def read_namespaced_daemon_set(self, name, namespace, _request_timeout=None):
            meta = types.SimpleNamespace(annotations=state["annotations"])
            return types.SimpleNamespace(spec=types.SimpleNamespace(template=types.SimpleNamespace(metadata=meta)))

    monkeypatch.setattr(phase, "api_client", lambda kubeconfig: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", Core)
    monkeypatch.setattr(kubernetes.client, "AppsV1Api", Apps)
    assert not phase.memberlist_applied("kc", lab)  # written, speakers not restarted with it
    state["annotations"] = {phase.MEMBERLIST_ANNOTATION: memberlist_checksum(want)}
    assert phase.memberlist_applied("kc", lab)
    state["data"] = {"config.json": "{}"}
    assert not phase.memberlist_applied("kc", lab)  # a file someone changed
    assert phase.memberlist_applied("kc", Lab.model_validate({**doc, "libvirt": {}}))  # KVM: MetalLB's defaults


# `systemctl show <slice> -p CPUWeight` as systemd 252 (Debian 12, the lab image) printed it on a CI cluster node:
# system.slice after the runtime phase, and user.slice, which nothing sets.
SHOW_SET = "CPUWeight=25\n"
SHOW_UNSET = "CPUWeight=[not set]\n"


def test_system_slice_weight_is_read_back_from_systemctl():
    assert system_slice_weight_problem(SHOW_SET) is None
    assert system_slice_weight_problem(SHOW_UNSET) == \
        "system.slice CPUWeight is [not set], want 25 on an emulated (TCG) node"
    assert "want 40" in system_slice_weight_problem(SHOW_SET, want=40)
    assert "cannot read" in system_slice_weight_problem("")


def test_only_emulated_kubernetes_nodes_lower_system_slice():
    from types import SimpleNamespace

    from lab.phases.runtime import emulated

    def lab(accel, enabled=True):
        return SimpleNamespace(libvirt=SimpleNamespace(accel=accel), kubernetes=SimpleNamespace(enabled=enabled))
    assert emulated(lab("tcg"))
    assert not emulated(lab("kvm")) and not emulated(lab("auto")) and not emulated(lab("tcg", enabled=False))
    assert not emulated(None)


def test_failure_logs_add_the_cluster_view_only_where_it_exists(tmp_path):
    from lab.logs import CLUSTER_COMMANDS, NODE_COMMANDS, POD_LOG_COMMANDS, node_commands

    cluster = ctx_for(load_lab(REPO / "labs/ci-cluster.yaml"), tmp_path)
    assert node_commands(cluster, "cp1") == NODE_COMMANDS | POD_LOG_COMMANDS | CLUSTER_COMMANDS
    assert node_commands(cluster, "w1") == NODE_COMMANDS | POD_LOG_COMMANDS
    plain = ctx_for(load_lab(REPO / "labs/ci.yaml"), tmp_path)
    assert not plain.lab.kubernetes.enabled
    assert node_commands(plain, plain.lab.nodes[0].name) == NODE_COMMANDS


def test_process_snapshot_lists_processes_by_cpu_time():
    import os

    from lab.logs import NODE_COMMANDS

    out = subprocess.run(["sh", "-c", NODE_COMMANDS["processes.txt"]], capture_output=True, text=True, check=True)
    header, *rows = out.stdout.splitlines()
    assert header.split()[:5] == ["PID", "PPID", "ELAPSED", "TIME", "%CPU"]
    assert str(os.getpid()) in {row.split()[0] for row in rows}


# ---------------------------------------------------------------------------------------------- no reset of a live cluster


class ScriptedNode:
    """A node whose commands answer from a script: ``answers`` maps a command's first words to CommandResults (a
    list is consumed in order, its last answer repeated). Every command run is recorded."""

    def __init__(self, name: str, answers: dict[str, object]):
        self.name, self.answers, self.ran = name, answers, []

    def run(self, cmd: str, *args: str, check: bool = True, **_) -> CommandResult:
        line = " ".join([cmd, *args])
        self.ran.append(line)
        for prefix, answer in self.answers.items():
            if line.startswith(prefix):
                if isinstance(answer, list):
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                return answer
        return CommandResult(line, 0, "", "")

    def put(self, path: str, data: str, mode: int = 0o644, sudo: bool = True) -> None:
        self.ran.append(f"put {path}")


def ok(text: str = "") -> CommandResult:
    return CommandResult("", 0, text, "")


def failed(text: str) -> CommandResult:
    return CommandResult("", 1, "", text)


GET_KUBEADM_CONFIG = "kubectl --kubeconfig=/etc/kubernetes/admin.conf -n kube-system get configmap kubeadm-config"


def test_an_initialised_control_plane_whose_api_server_restarts_is_waited_for_not_reset(tmp_path, monkeypatch):
    """Seen under TCG: `lab up` ran again while the API server restarted, found no kubeadm-config, and reset the
    whole cluster. With init's mark on the node, it waits for the API server instead."""
    from lab.phases import kubeadm as phase

    node = ScriptedNode("cp1", {"test -e /etc/lab/kubeadm-init.done": ok(), GET_KUBEADM_CONFIG: [
        failed("The connection to the server 10.232.0.10:6443 was refused - did you specify the right host or port?"),
        failed('Error from server (Forbidden): configmaps "kubeadm-config" is forbidden: User "kubernetes-admin" '
               'cannot get resource "configmaps"'),
        ok("configmap/kubeadm-config")]})
    monkeypatch.setattr(phase, "cp_host", lambda ctx: node)
    monkeypatch.setattr("lab.wait.time.sleep", lambda s: None)
    assert Kubeadm().done(ctx_for(default_lab(), tmp_path))
    assert [line for line in node.ran if line.startswith("kubectl")] == [GET_KUBEADM_CONFIG] * 3
    assert not any("reset" in line for line in node.ran)


def test_an_initialised_control_plane_that_never_answers_is_an_error_not_a_reset(tmp_path, monkeypatch):
    from lab.phases import kubeadm as phase

    node = ScriptedNode("cp1", {"test -e /etc/lab/kubeadm-init.done": ok(), GET_KUBEADM_CONFIG: [
        failed('Error from server (NotFound): configmaps "kubeadm-config" not found')]})
    monkeypatch.setattr(phase, "cp_host", lambda ctx: node)
    with pytest.raises(LabError) as err:
        Kubeadm().done(ctx_for(default_lab(), tmp_path))
    assert "initialised by an earlier `lab up`" in err.value.message and "not found" in err.value.message
    assert "lab down" in err.value.hint
    assert not any("reset" in line for line in node.ran)


def test_a_control_plane_without_init_mark_and_config_is_half_initialised(tmp_path, monkeypatch):
    """No mark: init never finished on this node; done() says no, and run() resets it before init."""
    from lab.phases import kubeadm as phase

    node = ScriptedNode("cp1", {"test -e /etc/lab/kubeadm-init.done": failed(""),
                                GET_KUBEADM_CONFIG: failed('configmaps "kubeadm-config" not found')})
    monkeypatch.setattr(phase, "cp_host", lambda ctx: node)
    assert not Kubeadm().done(ctx_for(default_lab(), tmp_path))
    monkeypatch.setattr(phase, "save_log", lambda ctx, name, text: tmp_path / name)
    Kubeadm().run(ctx_for(default_lab(), tmp_path))
    order = [line.split()[0] + (" " + line.split()[1] if len(line.split()) > 1 else "") for line in node.ran]
    assert order.index("kubeadm reset") < order.index("kubeadm init")
    assert "put /etc/lab/kubeadm-init.done" in node.ran  # marked only after init succeeded
    assert node.ran.index("put /etc/lab/kubeadm-init.done") > order.index("kubeadm init")


def test_a_worker_joined_to_an_earlier_control_plane_is_reset_before_it_joins(tmp_path, monkeypatch):
    from lab.phases import join as phase

    lab = default_lab()
    cp = ScriptedNode("cp1", {"kubectl --kubeconfig=/etc/kubernetes/admin.conf get nodes": ok("node/cp1\n"),
                              "kubeadm token create": ok(
                                  "kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef "
                                  "--discovery-token-ca-cert-hash sha256:" + "b" * 64)})
    workers = {w.name: ScriptedNode(w.name, {}) for w in lab.workers}
    monkeypatch.setattr(phase, "cp_host", lambda ctx: cp)
    ctx = ctx_for(lab, tmp_path)
    monkeypatch.setattr(ctx, "host", lambda name: workers[name])
    Join().run(ctx)
    for node in workers.values():  # `test -e kubelet.conf` answered 0: each was joined before
        join_line = "kubeadm join --config /run/lab/kubeadm-join.yaml"
        assert node.ran.index("kubeadm reset --force") < node.ran.index(join_line)


def test_cilium_phase_waits_for_coredns_on_the_pod_network(monkeypatch):
    """An agent is Ready before its datapath compiles; on the CI cluster a worker joining during that compile had it
    killed at Cilium's 300 s limit in a loop. The cilium phase's wait includes CoreDNS serving (its pods are the
    first on the pod network), and says which of the three it is waiting for."""
    import kubernetes.client

    from lab.phases import cilium as phase

    ds = k8s.V1DaemonSet(metadata=meta("cilium"), spec=k8s.V1DaemonSetSpec(
        selector=k8s.V1LabelSelector(), template=k8s.V1PodTemplateSpec()), status=k8s.V1DaemonSetStatus(
        current_number_scheduled=1, desired_number_scheduled=1, number_misscheduled=0, number_ready=1,
        number_available=1, updated_number_scheduled=1, observed_generation=1))

    def deployment(name, available):
        return k8s.V1Deployment(metadata=meta(name), spec=k8s.V1DeploymentSpec(
            replicas=2, selector=k8s.V1LabelSelector(), template=k8s.V1PodTemplateSpec()),
            status=k8s.V1DeploymentStatus(replicas=2, available_replicas=available, observed_generation=1))

    coredns = {"available": 0}
    asked = []

    class Apps:
        def __init__(self, api):
            pass

        def read_namespaced_daemon_set(self, name, namespace, _request_timeout=None):
            return ds

        def read_namespaced_deployment(self, name, namespace, _request_timeout=None):
            asked.append((namespace, name))
            return deployment(name, coredns["available"] if name == "coredns" else 1)

    class Core:
        def __init__(self, api):
            pass

        def list_namespaced_pod(self, namespace, label_selector=None, _request_timeout=None):
            asked.append((namespace, label_selector))
            return k8s.V1PodList(items=[])

    monkeypatch.setattr(phase, "api_client", lambda kubeconfig: None)
    monkeypatch.setattr(kubernetes.client, "AppsV1Api", Apps)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", Core)
    ctx = types.SimpleNamespace(log=types.SimpleNamespace(info=lambda *a, **k: None))
    with pytest.raises(LabError) as err:
        phase.wait_rollout(ctx, "kc", 0.01)
    # crash-looping agents are looked for among the current spec's pods only (old ones are being replaced)
    assert ("kube-system", "k8s-app=cilium,pod-template-generation=%d" % ds.metadata.generation) in asked
    assert "CoreDNS" in str(err.value) and "deployment coredns: 0/2 available" in str(err.value)
    assert ("kube-system", "coredns") in asked
    coredns["available"] = 1
    phase.wait_rollout(ctx, "kc", 5)


def test_an_installed_cilium_not_serving_this_second_is_waited_for_not_upgraded(tmp_path, monkeypatch):
    """Seen on the CI cluster: a second `up` found the release deployed with the same values, but the operator was
    restarting at that second; done() said no and run() ran `helm upgrade` again (285 s under TCG). Now run() only
    waits. A release with other values is upgraded."""
    import json

    from lab.phases import cilium as phase
    from lab.render.cilium import cilium_values

    lab = default_lab()
    release = ok(json.dumps([{"name": "cilium", "chart": f"cilium-{lab.cilium.version}", "status": "deployed"}]))
    waits = []

    def wait(ctx, kubeconfig, deadline_s):
        waits.append(deadline_s)
        if deadline_s == 1:
            raise WaitTimeout("Cilium agent DaemonSet rolled out", 1, "deployment cilium-operator: 0/1 available")

    monkeypatch.setattr(phase, "wait_rollout", wait)
    monkeypatch.setattr(phase, "fetch_kubeconfig", lambda ctx: "kc")
    for values, upgraded in ((cilium_values(lab), False), ({**cilium_values(lab), "MTU": 9000}, True)):
        node = ScriptedNode("cp1", {"env KUBECONFIG=/etc/kubernetes/admin.conf helm list": release,
                                    "env KUBECONFIG=/etc/kubernetes/admin.conf helm get values": ok(json.dumps(values))})
        monkeypatch.setattr(phase, "cp_host", lambda ctx: node)
        monkeypatch.setattr(phase, "bundle_chart", lambda host: "/bundle/cilium.tgz")
        ctx = ctx_for(lab, tmp_path)
        assert not Cilium().done(ctx)
        Cilium().run(ctx)
        assert any(" helm upgrade " in f" {line} " for line in node.ran) is upgraded, node.ran
        # the operator's TCG probe patch owns two fields; Helm 4's server-side apply must take them back
        assert all("--force-conflicts" in line for line in node.ran if " helm upgrade " in f" {line} "), node.ran
        assert waits[-1] == lab.timeouts.rollout


def test_cilium_operator_probes_get_tcg_timeouts_once(tmp_path, monkeypatch):
    """The chart probes the operator with a fixed 3 s timeout; under TCG it restarted 13 times in 70 minutes on the
    CI cluster. On an emulated lab done() says no until the Deployment carries the longer timeouts, run() patches
    it once (a patched Deployment is left alone), and a KVM lab is never patched."""
    import json

    from lab.phases import cilium as phase
    from lab.render.cilium import EMULATED_OPERATOR_PROBES, cilium_values

    tcg = load_lab(REPO / "labs" / "ci-cluster.yaml")
    stock = {"spec": {"template": {"spec": {"containers": [
        {"name": "cilium-operator", "livenessProbe": {"timeoutSeconds": 3, "failureThreshold": 3},
         "readinessProbe": {"timeoutSeconds": 3, "failureThreshold": 5}}]}}}}
    patched = json.loads(json.dumps(stock))
    for probe, want in EMULATED_OPERATOR_PROBES.items():
        patched["spec"]["template"]["spec"]["containers"][0][probe].update(want)
    monkeypatch.setattr(phase, "wait_rollout", lambda ctx, kubeconfig, deadline_s: None)
    monkeypatch.setattr(phase, "fetch_kubeconfig", lambda ctx: "kc")
    monkeypatch.setattr(phase, "bundle_chart", lambda host: "/bundle/cilium.tgz")
    get = "kubectl --kubeconfig=/etc/kubernetes/admin.conf -n kube-system get deployment cilium-operator"
    for lab, deployment, patches in ((tcg, stock, 1), (tcg, patched, 0), (default_lab(), stock, 0)):
        release = ok(json.dumps([{"name": "cilium", "chart": f"cilium-{lab.cilium.version}", "status": "deployed"}]))
        node = ScriptedNode("cp1", {"env KUBECONFIG=/etc/kubernetes/admin.conf helm list": release,
                                    "env KUBECONFIG=/etc/kubernetes/admin.conf helm get values":
                                        ok(json.dumps(cilium_values(lab))),
                                    get: ok(json.dumps(deployment))})
        monkeypatch.setattr(phase, "cp_host", lambda ctx: node)
        ctx = ctx_for(lab, tmp_path)
        assert Cilium().done(ctx) is (patches == 0)
        Cilium().run(ctx)
        done = [line for line in node.ran if " patch deployment cilium-operator " in f" {line} "]
        assert len(done) == patches, node.ran
        if patches:
            patch = json.loads(done[0].split(" -p ", 1)[1])
            operator = patch["spec"]["template"]["spec"]["containers"][0]
            assert operator["name"] == "cilium-operator" and operator["livenessProbe"]["timeoutSeconds"] >= 10
        assert not any(" helm upgrade " in f" {line} " for line in node.ran)


def test_a_release_left_pending_by_an_interrupted_up_is_rolled_back_first(tmp_path):
    """Seen on the CI cluster: a `lab up` killed during `helm upgrade` left revision 3 pending-upgrade, and the next
    up failed with "another operation (install/upgrade/rollback) is in progress". The history is the one captured
    there. With no helm process left, the release rolls back to its last deployed revision before the upgrade; with
    one running, `up` stops and says so; a settled release is left alone."""
    import json

    from lab.errors import LabError
    from lab.phases.cilium import Cilium

    history = (REPO / "tests/fixtures/helm/history_cilium_pending_upgrade.json").read_text()
    hist = "env KUBECONFIG=/etc/kubernetes/admin.conf helm history cilium"
    ctx = ctx_for(default_lab(), tmp_path)
    node = ScriptedNode("cp1", {hist: ok(history), "pgrep -x helm": failed("")})
    Cilium().recover_interrupted(ctx, node)
    [rollback] = [line for line in node.ran if " helm rollback " in f" {line} "]
    assert rollback.endswith("helm rollback cilium 1 --namespace kube-system --force-conflicts"), rollback

    busy = ScriptedNode("cp1", {hist: ok(history), "pgrep -x helm": ok("4242 helm")})
    with pytest.raises(LabError, match=r"pending-upgrade \(revision 3\) and a helm process is running on cp1"):
        Cilium().recover_interrupted(ctx, busy)
    assert not any("rollback" in line for line in busy.ran)

    settled = json.dumps(json.loads(history)[:2])  # deployed, then a failed upgrade: nothing to recover
    calm = ScriptedNode("cp1", {hist: ok(settled)})
    Cilium().recover_interrupted(ctx, calm)
    assert calm.ran == [line for line in calm.ran if "helm history" in line]
