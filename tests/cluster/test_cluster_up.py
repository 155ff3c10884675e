"""`lab up` of labs/ci-cluster.yaml in TCG VMs to a Ready kubeadm + Cilium (KPR, BPF masquerading, VXLAN, Hubble
relay) + MetalLB cluster, everything side-loaded from the bundle; then `lab status`, `lab kubeconfig`, and a
second `up` that changes nothing. Phase times are recorded in results/cluster-phases.json."""
from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from clusterlab import RESULTS, ROOT, SPEC, kubectl, kubectl_json
from labrun import lab_cli, phases_of

from lab.pipeline import UP

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.smoke]

K8S_PHASES = ("runtime", "kubeadm", "cilium", "join", "metallb", "ready", "kubeconfig")


@pytest.fixture(scope="module")
def kubeconfig(cluster, cluster_lab, cluster_state) -> Path:
    proc = lab_cli(cluster_state, "kubeconfig", "-c", str(SPEC))
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def test_up_runs_every_phase_and_records_times(cluster, cluster_lab, cluster_state):
    phases = phases_of(cluster_state, cluster_lab)
    for name in K8S_PHASES:  # "unchanged" when KVMLAB_KEEP_CLUSTER kept the lab of an earlier run
        assert phases[name]["status"] in ("done", "unchanged"), phases
    seconds = {k: v.get("seconds") for k, v in phases.items()}
    print("cluster phase seconds:", seconds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster-phases.json").write_text(json.dumps(
        {"spec": str(SPEC.relative_to(ROOT)), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "phases": phases}, indent=2))


def test_kubeconfig_is_private(kubeconfig):
    assert stat.S_IMODE(kubeconfig.stat().st_mode) & 0o077 == 0


def test_every_node_is_ready(bundle, kubeconfig, cluster_lab):
    nodes = kubectl_json(bundle[0], kubeconfig, "get", "nodes")["items"]
    ready = {n["metadata"]["name"]: next(c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready")
             for n in nodes}
    assert ready == {n.name: "True" for n in cluster_lab.nodes}
    versions = {n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes}
    assert versions == {"v1.37.2"}


def test_no_kube_proxy_and_nothing_pulled(bundle, kubeconfig):
    pods = kubectl_json(bundle[0], kubeconfig, "get", "pods", "-A")["items"]
    assert not [p for p in pods if p["metadata"]["name"].startswith("kube-proxy")]
    bundle_refs = {e.ref for e in bundle[1].of_kind("image")}
    images = {c["image"] for p in pods for c in p["spec"]["containers"] + p["spec"].get("initContainers", [])}
    assert images <= bundle_refs, images - bundle_refs
    events = kubectl(bundle[0], kubeconfig, "get", "events", "-A", "--field-selector", "reason=Pulling")
    assert events.returncode == 0 and "Pulling" not in events.stdout, events.stdout


def test_cilium_status_kpr_bpf_masquerade_vxlan(bundle, kubeconfig, cluster_lab):
    proc = kubectl(bundle[0], kubeconfig, "-n", "kube-system", "exec", "ds/cilium", "-c", "cilium-agent", "--",
                   "cilium-dbg", "status", "-o", "json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    print(json.dumps({k: status.get(k) for k in ("kube-proxy-replacement", "masquerading", "routing",
                                                  "cluster-mesh")}, indent=1)[:3000])
    assert status["kube-proxy-replacement"]["mode"] == "True"
    assert status["masquerading"]["mode"] == "BPF"
    assert status["routing"]["tunnel-protocol"].lower() == "vxlan"
    relay = kubectl_json(bundle[0], kubeconfig, "-n", "kube-system", "get", "deployment", "hubble-relay")
    assert relay["status"].get("readyReplicas") == 1, relay["status"]


def test_status_shows_the_cluster(cluster, cluster_lab, cluster_state):
    proc = lab_cli(cluster_state, "status", "-c", str(SPEC), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert {n["name"]: n["ssh"] for n in status["nodes"]} == {n.name: "ok" for n in cluster_lab.nodes}
    cluster = status["cluster"]
    assert cluster["cluster"] == "up", cluster
    assert cluster["nodes"] == {n.name: "Ready" for n in cluster_lab.nodes}, cluster
    assert cluster["cilium"]["ready"] and cluster["metallb"]["controller"]["ready"], cluster
    assert cluster["metallb"]["speaker"]["ready"], cluster


def test_second_up_changes_nothing(cluster, cluster_lab, cluster_state, bundle, kubeconfig):
    def pod_uids() -> dict[str, str]:
        pods = kubectl_json(bundle[0], kubeconfig, "get", "pods", "-A")["items"]
        return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["metadata"]["uid"] for p in pods
                if p["metadata"]["namespace"] in ("kube-system", "metallb-system")}

    uids_before = pod_uids()
    started = time.monotonic()
    proc = lab_cli(cluster_state, "up", "-c", str(SPEC), timeout=3600)
    assert proc.returncode == 0, proc.stderr
    print(f"no-op up: {time.monotonic() - started:.1f}s")
    phases = phases_of(cluster_state, cluster_lab)
    checks = {p.name for p in UP if p.every_up}  # preflight, image, ready: they only check, on every up
    ran = [name for name, p in phases.items() if not name.startswith("_") and p["status"] != "unchanged"
           and name not in checks]
    assert not ran, f"a second up ran {ran}:\n{proc.stderr[-3000:]}"
    assert {name for name in checks if phases[name]["status"] != "done"} == set(), phases
    assert uids_before == pod_uids(), "a second up replaced kube-system or metallb-system pods"
