"""The bundle's recipe, manifest, disk image and cache, without building anything (tests/cluster uses the real
bundle)."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from lab.bundle import build as bundle_build
from lab.bundle.disk import bundle_disk
from lab.bundle.manifest import BundleError, Entry, Manifest, now, sha256_file, verify, write_manifest
from lab.bundle.recipe import (RECIPE_FILE, image_component, image_ref, load_recipe, parse_source, recipe_hash)
from lab.errors import SpecError


def test_recipe_loads_and_names_what_kubeadm_and_the_lab_need():
    recipe = load_recipe()
    assert recipe.kubernetes == "v1.37.2"
    for ref in ("registry.k8s.io/kube-apiserver:v1.37.2", "registry.k8s.io/etcd:3.7.0-0",
                "registry.k8s.io/coredns/coredns:v1.14.6", "registry.k8s.io/pause:3.10.2",
                "quay.io/cilium/cilium:v1.20.2", "quay.io/cilium/operator-generic:v1.20.2",
                "quay.io/cilium/hubble-relay:v1.20.2", "quay.io/metallb/controller:v0.16.1",
                "quay.io/metallb/speaker:v0.16.1", "kvmlab.dev/netprobe:1"):
        assert ref in recipe.images
    assert image_ref(recipe, "quay.io/cilium/cilium") == ("quay.io/cilium/cilium", "v1.20.2")
    assert image_component(recipe, "quay.io/cilium/operator-generic:v1.20.2") == ("cilium", "v1.20.2")
    assert image_component(recipe, "kvmlab.dev/netprobe:1") == ("netprobe", "1")


def test_kubernetes_programs_are_version_stamped():
    flags = load_recipe().builds["kubernetes"].stamped_ldflags("2026-11-30T00:00:00Z")
    for var in ("k8s.io/component-base/version.gitVersion=v1.37.2", "k8s.io/component-base/version.gitMajor=1",
                "k8s.io/component-base/version.gitMinor=37", "k8s.io/client-go/pkg/version.gitVersion=v1.37.2"):
        assert f"-X {var}" in flags
    assert flags.startswith("-s -w ")


@pytest.mark.parametrize("ref, parsed", [("kubernetes/kubeadm", ("program", "kubernetes", "kubeadm")),
                                         ("cilium:install/kubernetes/cilium", ("module", "cilium",
                                                                               "install/kubernetes/cilium")),
                                         ("repo:conformance/probes/netprobe.py", ("repo", "",
                                                                                  "conformance/probes/netprobe.py"))])
def test_sources_parse(ref, parsed):
    assert parse_source(ref) == parsed


def test_bad_recipe_names_every_problem(tmp_path):
    data = yaml.safe_load(RECIPE_FILE.read_text())
    data["node_binaries"].append("kubernetes/kubeletz")
    data["images"]["registry.k8s.io/pause:3.10.2"]["root"] = "alpine"
    data["charts"]["cilium"] = "nosuchmodule:chart"
    bad = tmp_path / "recipe.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_recipe(bad)
    text = str(err.value)
    assert "no program 'kubeletz' in builds.kubernetes" in text
    assert "'alpine' is neither 'static' nor one of roots" in text
    assert "no build uses module 'nosuchmodule'" in text


def test_recipe_hash_follows_the_recipe_directory(tmp_path):
    recipe = load_recipe()
    assert recipe_hash(recipe) == recipe_hash(recipe)
    (tmp_path / "recipe.yaml").write_text(RECIPE_FILE.read_text())
    other = recipe_hash(recipe, tmp_path)
    (tmp_path / "recipe.yaml").write_text(RECIPE_FILE.read_text() + "\n# changed\n")
    assert recipe_hash(recipe, tmp_path) != other


def small_bundle(directory):
    (directory / "bin").mkdir(parents=True)
    (directory / "bin/kubeadm").write_bytes(b"#!/bin/sh\necho v1.37.2\n")
    (directory / "images").mkdir()
    (directory / "images/pause.tar").write_bytes(b"not really a tar" * 100)
    entries = [Entry(path="bin/kubeadm", component="kubernetes", kind="binary", version="v1.37.2", source="test",
                     sha256=sha256_file(directory / "bin/kubeadm")),
               Entry(path="images/pause.tar", component="pause", kind="image", version="3.10.2", source="test",
                     sha256=sha256_file(directory / "images/pause.tar"), ref="registry.k8s.io/pause:3.10.2")]
    manifest = Manifest(producer="source", recipe_sha256="a" * 64, kubernetes="v1.37.2", built_at=now(),
                        entries=entries)
    write_manifest(directory, manifest)
    return manifest


def test_verify_refuses_a_changed_missing_or_extra_file(tmp_path):
    manifest = small_bundle(tmp_path)
    assert verify(tmp_path) == manifest
    assert manifest.find("image", "registry.k8s.io/pause:3.10.2").component == "pause"
    (tmp_path / "bin/kubeadm").write_bytes(b"tampered")
    (tmp_path / "stray").write_text("x")
    with pytest.raises(BundleError) as err:
        verify(tmp_path)
    assert "bin/kubeadm: sha256 differs" in err.value.message and "stray: not in the manifest" in err.value.message
    (tmp_path / "bin/kubeadm").unlink()
    with pytest.raises(BundleError, match="bin/kubeadm: missing"):
        verify(tmp_path)


def test_bundle_disk_is_an_ext4_image_of_the_bundle_made_once(tmp_path):
    small_bundle(tmp_path / "b")
    image = bundle_disk(tmp_path / "b")
    label = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    assert "Filesystem volume name:   kvmlab-bundle" in label
    assert "has_journal" not in label  # mounted read-only by several nodes at once
    listed = subprocess.run(["debugfs", "-R", "cat /bin/kubeadm", str(image)], capture_output=True).stdout
    assert listed == b"#!/bin/sh\necho v1.37.2\n"
    mtime = image.stat().st_mtime_ns
    assert bundle_disk(tmp_path / "b") == image and image.stat().st_mtime_ns == mtime  # cached


def test_missing_bundle_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLAB_BUNDLE_CACHE", str(tmp_path))
    with pytest.raises(BundleError) as err:
        bundle_build.current_bundle()
    assert "make bundle" in err.value.hint


def test_prune_keeps_the_current_bundle_only(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLAB_BUNDLE_CACHE", str(tmp_path))
    keep, old = "a" * 64, "b" * 64
    for name in (keep, old):
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.ext4").write_text("x")
    (tmp_path / "work").mkdir()
    bundle_build.prune_other_bundles(keep, say=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([keep, f"{keep}.ext4", "work"])


def test_hubble_relay_keeps_gops_state_where_the_chart_lets_it_write():
    """The chart runs the relay with a read-only root and an emptyDir at /tmp (templates/hubble-relay); without
    GOPS_CONFIG_DIR there, gops fails to create $HOME/.config and the relay exits (seen on the CI cluster)."""
    recipe = load_recipe()
    [relay] = [img for ref, img in recipe.images.items() if ref.startswith("quay.io/cilium/hubble-relay:")]
    assert relay.env.get("GOPS_CONFIG_DIR", "").startswith("/tmp/")
