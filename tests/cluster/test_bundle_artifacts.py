"""The bundle against the real tools it carries (no VMs): what kubeadm, helm and the manifests will ask for is
exactly what the bundle holds, and what we render is accepted by the real kubeadm and the real chart."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from lab.bundle.manifest import verify
from lab.render import render_cluster
from lab.spec import load_lab

from clusterlab import SPEC

IMAGE_LINE = re.compile(r"^\s*(?:-\s+)?image:\s*\"?([^\"\s]+)\"?\s*$", re.M)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def refs(manifest) -> set[str]:
    return {e.ref for e in manifest.of_kind("image")}


def test_bundle_verifies_and_names_every_component(bundle):
    path, manifest = bundle
    assert verify(path) == manifest
    components = {e.component for e in manifest.entries}
    assert {"kubernetes", "etcd", "coredns", "pause", "helm", "cilium", "metallb", "netprobe"} <= components


def test_binaries_carry_their_release_versions(bundle):
    path, _ = bundle
    assert run(str(path / "bin/kubeadm"), "version", "-o", "short").stdout.strip() == "v1.37.2"
    assert run(str(path / "bin/kubelet"), "--version").stdout.strip() == "Kubernetes v1.37.2"
    assert "v1.37.2" in run(str(path / "bin/kubectl"), "version", "--client").stdout
    assert run(str(path / "bin/helm"), "version", "--template", "{{.Version}}").stdout.strip().startswith("v4.")


def test_every_image_kubeadm_wants_is_in_the_bundle(bundle):
    path, manifest = bundle
    out = run(str(path / "bin/kubeadm"), "config", "images", "list", "--kubernetes-version", "v1.37.2")
    assert out.returncode == 0, out.stderr
    wanted = set(out.stdout.split())
    assert wanted and wanted <= refs(manifest), wanted - refs(manifest)


def test_rendered_kubeadm_config_passes_the_real_kubeadm(bundle, tmp_path):
    path, _ = bundle
    kubeadm_yaml = tmp_path / "kubeadm.yaml"
    kubeadm_yaml.write_text(render_cluster(load_lab(SPEC))["kubeadm.yaml"])
    out = run(str(path / "bin/kubeadm"), "config", "validate", "--config", str(kubeadm_yaml))
    assert out.returncode == 0, out.stdout + out.stderr


def test_cilium_chart_renders_only_bundle_images(bundle, tmp_path):
    """helm template of the bundle's chart with our values: accepted by the chart's schema, and every image the
    manifests name is one the bundle carries (else a pod would sit in ErrImageNeverPull)."""
    path, manifest = bundle
    values = tmp_path / "values.yaml"
    values.write_text(render_cluster(load_lab(SPEC))["cilium-values.yaml"])
    chart = next(e for e in manifest.of_kind("chart") if e.component == "cilium")
    out = run(str(path / "bin/helm"), "template", "cilium", str(path / chart.path), "--namespace", "kube-system",
              "--values", str(values))
    assert out.returncode == 0, out.stderr
    images = set(IMAGE_LINE.findall(out.stdout))
    assert images, "no image in the rendered chart"
    assert images <= refs(manifest), images - refs(manifest)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("DaemonSet", "cilium") in kinds and ("Deployment", "hubble-relay") in kinds
    assert not any(kind == "DaemonSet" and name == "cilium-envoy" for kind, name in kinds)


def test_a_cilium_values_change_rolls_the_agents_and_the_operator(bundle, tmp_path):
    """The real chart with our values stamps cilium-config's checksum into the agent DaemonSet's and the operator
    Deployment's pod templates, and another MTU gives another checksum: an upgrade that changes the config restarts
    them (without it the agents kept MTU 1450 after an upgrade to 1510 on the CI cluster)."""
    path, manifest = bundle
    chart = next(e for e in manifest.of_kind("chart") if e.component == "cilium")
    rendered = yaml.safe_load(render_cluster(load_lab(SPEC))["cilium-values.yaml"])

    def checksums(values: dict) -> dict[str, str]:
        file = tmp_path / "values.yaml"
        file.write_text(yaml.safe_dump(values))
        out = run(str(path / "bin/helm"), "template", "cilium", str(path / chart.path), "--namespace", "kube-system",
                  "--values", str(file))
        assert out.returncode == 0, out.stderr
        found = {}
        for d in yaml.safe_load_all(out.stdout):
            if d and (d["kind"], d["metadata"]["name"]) in (("DaemonSet", "cilium"), ("Deployment", "cilium-operator")):
                found[d["kind"]] = d["spec"]["template"]["metadata"].get("annotations", {}).get(
                    "cilium.io/cilium-configmap-checksum")
        return found

    before, after = checksums(rendered), checksums({**rendered, "MTU": rendered["MTU"] + 10})
    assert set(before) == {"DaemonSet", "Deployment"} and all(before.values()), before
    assert all(after[k] != before[k] for k in before), (before, after)
    assert checksums(rendered) == before  # the same values keep the pods: a re-run of `lab up` restarts nothing


def test_metallb_manifest_names_only_bundle_images(bundle):
    path, manifest = bundle
    entry = next(e for e in manifest.of_kind("manifest") if e.component == "metallb")
    images = set(IMAGE_LINE.findall(Path(path / entry.path).read_text()))
    assert images and images <= refs(manifest), images - refs(manifest)


def test_real_kubeadm_applies_the_emulation_patches(bundle, tmp_path):
    """kubeadm's own control-plane phase (--dry-run into a temporary directory: nothing on this host changes)
    renders the API server's static pod with our probe patches applied."""
    path, _ = bundle
    files = render_cluster(load_lab(SPEC))
    patches = tmp_path / "patches"
    patches.mkdir()
    for name, text in files.items():
        if name.startswith("kubeadm-patches/"):
            (patches / name.split("/", 1)[1]).write_text(text)
    config = yaml.safe_load_all(files["kubeadm.yaml"])
    docs = list(config)
    docs[0]["patches"]["directory"] = str(patches)
    (tmp_path / "kubeadm.yaml").write_text(yaml.safe_dump_all(docs))
    dry = tmp_path / "dry"
    dry.mkdir()
    out = subprocess.run([str(path / "bin/kubeadm"), "init", "phase", "control-plane", "apiserver", "--config",
                          str(tmp_path / "kubeadm.yaml"), "--dry-run"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KUBEADM_INIT_DRYRUN_DIR": str(dry)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'Applied patch of type "application/strategic-merge-patch+json" to target "kube-apiserver"' in out.stdout
    container = yaml.safe_load((dry / "kube-apiserver.yaml").read_text())["spec"]["containers"][0]
    assert container["livenessProbe"]["failureThreshold"] == 60
    assert container["readinessProbe"]["periodSeconds"] == 10
    # merged into kubeadm's probe, not replacing it: host, port and scheme stay kubeadm's
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez?exclude=etcd"
    liveness, readiness = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert {k: liveness[k] for k in ("host", "port", "scheme")} == {k: readiness[k] for k in ("host", "port", "scheme")}
    assert liveness["scheme"] == "HTTPS" and readiness["path"] == "/readyz"
    assert container["resources"]["requests"]["cpu"] == "300m"
