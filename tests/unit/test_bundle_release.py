"""``lab bundle build --from release`` against a fake release tree on 127.0.0.1: an HTTP server (with Range, as
lab.images uses it) for binaries, checksums, the chart repository and the MetalLB manifest, and a tiny read-only
OCI distribution registry that serves an image made with umoci, so that skopeo really copies over HTTP.
Nothing here leaves 127.0.0.1: every source is rebased (--release-base) and every image mirrored (registry)."""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lab import images
from lab.bundle import release as rel
from lab.bundle.build import build_bundle
from lab.bundle.manifest import BundleError, verify
from lab.bundle.recipe import load_recipe
from lab.bundle.release import ReleaseFetch, fill, rebase

pytestmark = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")),
                                reason="needs skopeo and umoci (make sysdeps-test)")
RECIPE = load_recipe()
METALLB = b"apiVersion: v1\nkind: Namespace\nmetadata: {name: metallb-system}\n"
PREFIX = "/mirror"  # the release base has a path: every source lives under it


class Handler(BaseHTTPRequestHandler):
    """Files from server.files {path: bytes} (single Range), and the registry API over server.layout."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        srv = self.server
        srv.requests.append(self.path)
        if self.headers.get("Range"):
            srv.ranges.append((self.path, self.headers["Range"]))
        if self.path.startswith("/v2/"):
            return self.registry(head)
        body = srv.files.get(self.path)
        if body is None:
            return self.reply(404, b"")
        start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
        extra = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if start else {}
        self.reply(206 if start else 200, body[start:], extra, head)

    def registry(self, head):
        if self.path == "/v2/":
            return self.reply(200, b"{}", {"Content-Type": "application/json"}, head)
        m = re.match(r"^/v2/(?P<name>.+)/(?P<what>manifests|blobs)/(?P<ref>[^/]+)$", self.path)
        layout, (mdigest, mtype) = self.server.layout, self.server.manifest
        if not m:
            return self.reply(404, b"")
        self.server.pulled.append(m.group("name"))
        ref = m.group("ref")
        digest = ref if ref.startswith("sha256:") else mdigest  # every tag is our one image
        blob = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        if not blob.is_file():
            return self.reply(404, b"")
        ctype = mtype if digest == mdigest else "application/octet-stream"
        self.reply(200, blob.read_bytes(), {"Content-Type": ctype, "Docker-Content-Digest": digest}, head)

    def reply(self, status, body, headers=None, head=False):
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A one-layer OCI image made with umoci from a tiny directory."""
    d = tmp_path_factory.mktemp("oci")
    (d / "root" / "etc").mkdir(parents=True)
    (d / "root" / "etc" / "hello").write_text("hello\n")
    img = f"{d / 'layout'}:img"
    for cmd in (["init", "--layout", str(d / "layout")], ["new", "--image", img],
                ["insert", "--image", img, str(d / "root"), "/"], ["config", "--image", img, "--config.cmd", "sh"]):
        subprocess.run(["umoci", *cmd], check=True, capture_output=True)
    return d / "layout"


@pytest.fixture
def server(layout):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.ranges, srv.pulled, srv.layout = {}, [], [], [], layout
    desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    srv.manifest = (desc["digest"], desc["mediaType"])
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(autouse=True)
def fast(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "DOWNLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(images, "RETRY_WAIT_MAX_S", 0.1)
    monkeypatch.setenv("KVMLAB_BUNDLE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def module_copy(monkeypatch, tmp_path):
    """The Go module's directory, without Go: a temp dir holding the module's copy of the MetalLB manifest."""
    d = tmp_path / "metallb-module"
    path = d / "config" / "manifests" / "metallb-native.yaml"
    path.parent.mkdir(parents=True)
    path.write_bytes(METALLB)
    monkeypatch.setattr(ReleaseFetch, "module_dir", lambda self, module, version: d)
    return path


def url_path(official: str) -> str:
    return PREFIX + urllib.parse.urlsplit(official).path


def tarball(members: dict[str, bytes], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), 0o755
            tar.addfile(info, io.BytesIO(body))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def publish(server) -> dict[str, bytes]:
    """The recipe's release sources, as the official hosts lay them out, under PREFIX; returns what was served."""
    release, served = RECIPE.release, {}
    for name, src in release.binaries.items():
        build = RECIPE.builds[src.build]
        official = fill(src.url, build, name=name)
        filename = official.rsplit("/", 1)[-1]
        body = served[name] = f"fake {name} {build.version}\n".encode()
        if src.member:
            body = tarball({src.member: body, "linux-amd64/LICENSE": b"Apache-2.0\n"}, link="linux-amd64/evil")
        server.files[url_path(official)] = body
        digest = hashlib.sha256(body).hexdigest()
        line = f"{digest}  {filename}\n" if src.member else f"{digest}\n"  # .sha256sum names the file
        server.files[url_path(fill(src.checksum, build, name=name, url=official))] = line.encode()
    for name, src in release.charts.items():
        version = fill(src.version, RECIPE.builds[src.build])
        tgz = served[name] = tarball({f"{name}/Chart.yaml": f"name: {name}\nversion: {version}\n".encode()})
        index = {"apiVersion": "v1", "entries": {name: [
            {"version": "1.19.7", "digest": "0" * 64, "urls": [f"{name}-1.19.7.tgz"]},
            {"version": version, "digest": hashlib.sha256(tgz).hexdigest(),
             "urls": [urllib.parse.urljoin(src.repo, f"{name}-{version}.tgz")]}]}}
        server.files[url_path(urllib.parse.urljoin(src.repo, "index.yaml"))] = yaml.safe_dump(index).encode()
        server.files[url_path(urllib.parse.urljoin(src.repo, f"{name}-{version}.tgz"))] = tgz
    for name, src in release.manifests.items():
        server.files[url_path(fill(src.url, RECIPE.builds[src.build], name=name))] = served[name] = METALLB
    return served


def fetcher(server, tmp_path) -> ReleaseFetch:
    return ReleaseFetch(RECIPE, "0" * 64, tmp_path / "work", lambda m: None, base=server.base + PREFIX,
                        registry=server.base)


def out_dir(tmp_path) -> Path:
    out = tmp_path / "out"
    for d in ("bin", "images", "charts", "manifests"):
        (out / d).mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------- the whole bundle

def test_release_fetch_builds_a_bundle_that_verifies(server, module_copy, tmp_path):
    served = publish(server)
    out, manifest, _ = build_bundle("release", release_base=server.base + PREFIX, release_registry=server.base,
                                    say=lambda m: None)
    assert verify(out) == manifest and manifest.producer == "release"
    by_path = {e.path: e for e in manifest.entries}
    for name in ("kubeadm", "kubelet", "kubectl", "helm"):
        assert (out / "bin" / name).read_bytes() == served[name]
    assert by_path["bin/kubeadm"].source == f"{server.base}{PREFIX}/release/v1.37.2/bin/linux/amd64/kubeadm"
    assert by_path["bin/kubeadm"].component == "kubernetes" and by_path["bin/kubeadm"].version == "v1.37.2"
    assert by_path["bin/helm"].source.endswith("/helm-v4.3.2-linux-amd64.tar.gz#linux-amd64/helm")
    assert not (out / "bin" / "evil").exists() and not (out / "linux-amd64").exists()
    chart = by_path["charts/cilium-1.20.2.tgz"]
    assert chart.source == f"{server.base}{PREFIX}/cilium-1.20.2.tgz" and chart.version == "1.20.2"
    assert (out / "manifests" / "metallb-native.yaml").read_bytes() == METALLB
    # Every image of the recipe, each an archive under the name containerd imports, with its manifest digest.
    digest = server.manifest[0]
    imgs = {e.ref: e for e in manifest.of_kind("image")}
    assert set(imgs) == set(RECIPE.images)
    api = imgs["registry.k8s.io/kube-apiserver:v1.37.2"]
    assert api.path == "images/registry.k8s.io_kube-apiserver_v1.37.2.tar" and api.component == "kubernetes"
    host = server.base.removeprefix("http://")
    assert api.source == f"docker://{host}/kube-apiserver:v1.37.2@{digest}"
    with tarfile.open(out / api.path) as tar:
        assert json.load(tar.extractfile("manifest.json"))[0]["RepoTags"] == ["registry.k8s.io/kube-apiserver:v1.37.2"]
    assert imgs["quay.io/cilium/operator-generic:v1.20.2"].component == "cilium"
    assert {"kube-apiserver", "cilium/cilium", "metallb/speaker", "library/python"} <= set(server.pulled)
    # Our probe: the official python base with the recipe's command and user; netprobe.py comes from a ConfigMap.
    probe = imgs["kvmlab.dev/netprobe:1"]
    assert probe.component == "netprobe" and probe.version == "1"
    base = f"docker://{host}/library/python:3.12-slim@{digest}"
    assert probe.source == f"built:{base}"
    with tarfile.open(out / probe.path) as tar:
        top = json.load(tar.extractfile("manifest.json"))[0]
        config = json.load(tar.extractfile(top["Config"]))["config"]
        assert config["Cmd"] == ["python3"] and config["User"] == "65534"
        assert top["RepoTags"] == ["kvmlab.dev/netprobe:1"]
    assert all(r.startswith(PREFIX) or r.startswith("/v2/") for r in server.requests)


def test_wrong_sha256_fails_the_build_and_leaves_no_bundle(server, module_copy, tmp_path):
    publish(server)
    server.files[f"{PREFIX}/release/v1.37.2/bin/linux/amd64/kubelet.sha256"] = b"ab" * 32 + b"\n"
    with pytest.raises(BundleError) as err:
        build_bundle("release", release_base=server.base + PREFIX, release_registry=server.base, say=lambda m: None)
    msg = err.value.message
    assert "bin/kubelet" in msg and "ab" * 32 in msg and hashlib.sha256(b"fake kubelet v1.37.2\n").hexdigest() in msg
    assert f"{server.base}{PREFIX}/release/v1.37.2/bin/linux/amd64/kubelet" in msg
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["work"]  # no bundle, no .tmp
    assert not [p for p in (cache / "work").rglob("kubelet*")]  # the bad download is gone too


def test_missing_checksum_line_is_an_error(server, tmp_path):
    publish(server)
    server.files[f"{PREFIX}/helm-v4.3.2-linux-amd64.tar.gz.sha256sum"] = f"{'1' * 64}  other.tar.gz\n".encode()
    with pytest.raises(BundleError, match="gives no sha256 for helm-v4.3.2-linux-amd64.tar.gz"):
        fetcher(server, tmp_path).binary("helm", RECIPE.release.binaries["helm"], out_dir(tmp_path))


def test_tampered_chart_is_refused(server, tmp_path):
    publish(server)
    server.files[f"{PREFIX}/cilium-1.20.2.tgz"] += b"tampered"
    out = out_dir(tmp_path)
    with pytest.raises(BundleError, match=r"charts/cilium-1\.20\.2\.tgz.*digest in http://127"):
        fetcher(server, tmp_path).chart("cilium", RECIPE.release.charts["cilium"], out)
    assert not list((out / "charts").iterdir())


def test_chart_version_missing_from_index(server, tmp_path):
    publish(server)
    index = f"{PREFIX}/index.yaml"
    server.files[index] = server.files[index].replace(b"version: 1.20.2", b"version: 1.20.1")
    with pytest.raises(BundleError, match="has no chart cilium 1.20.2"):
        fetcher(server, tmp_path).chart("cilium", RECIPE.release.charts["cilium"], out_dir(tmp_path))


def test_metallb_manifest_must_equal_the_module_copy(server, module_copy, tmp_path):
    publish(server)
    module_copy.write_bytes(METALLB + b"# the module's copy differs\n")
    out = out_dir(tmp_path)
    with pytest.raises(BundleError) as err:
        fetcher(server, tmp_path).manifest("metallb-native.yaml", RECIPE.release.manifests["metallb-native.yaml"],
                                           out)
    assert "manifests/metallb-native.yaml" in err.value.message
    assert "go.universe.tf/metallb@v0.16.1" in err.value.message
    assert not (out / "manifests" / "metallb-native.yaml").exists()


def test_without_go_the_module_check_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(rel.shutil, "which", lambda name: None)
    with pytest.raises(BundleError, match="needs Go") as err:
        rel.go_module_dir("go.universe.tf/metallb", "v0.16.1", tmp_path)
    assert "go.dev" in err.value.hint


def test_helm_takes_only_its_member(tmp_path):
    archive = tmp_path / "helm.tar.gz"
    archive.write_bytes(tarball({"linux-amd64/README.md": b"x"}, link="linux-amd64/helm"))
    with pytest.raises(BundleError, match="not a regular file"):
        ReleaseFetch.extract(archive, "linux-amd64/helm", tmp_path / "helm", "helm.tar.gz")
    with pytest.raises(BundleError, match="has no linux-amd64/kubectl"):
        ReleaseFetch.extract(archive, "linux-amd64/kubectl", tmp_path / "kubectl", "helm.tar.gz")


def test_rebase_and_registry_mirror(tmp_path):
    url = "https://dl.k8s.io/release/v1.37.2/bin/linux/amd64/kubeadm"
    assert rebase(url, None) == url
    assert rebase(url, "http://127.0.0.1:8080") == "http://127.0.0.1:8080/release/v1.37.2/bin/linux/amd64/kubeadm"
    assert rebase(url, "https://mirror.lan/k8s/") == "https://mirror.lan/k8s/release/v1.37.2/bin/linux/amd64/kubeadm"
    f = ReleaseFetch(RECIPE, "0" * 64, tmp_path, lambda m: None, registry="http://127.0.0.1:5000")
    assert f.pull_ref("registry.k8s.io/coredns/coredns:v1.14.6") == ("127.0.0.1:5000/coredns/coredns:v1.14.6", False)
    f = ReleaseFetch(RECIPE, "0" * 64, tmp_path, lambda m: None, registry="mirror.lan:5000")
    assert f.pull_ref("quay.io/cilium/cilium:v1.20.2") == ("mirror.lan:5000/cilium/cilium:v1.20.2", True)
    f = ReleaseFetch(RECIPE, "0" * 64, tmp_path, lambda m: None)
    assert f.pull_ref("quay.io/cilium/cilium:v1.20.2") == ("quay.io/cilium/cilium:v1.20.2", True)
    with pytest.raises(BundleError, match="does not name its registry"):
        f.pull_ref("python:3.12-slim")


def test_release_section_checks(tmp_path):
    raw = yaml.safe_load((rel.REPO_ROOT / "bundle" / "recipe.yaml").read_text())
    del raw["release"]["binaries"]["kubectl"]
    raw["release"]["manifests"]["metallb-native.yaml"]["checksum"] = "{url}.sha256"
    raw["release"]["build"]["quay.io/metallb/speaker:v0.16.1"] = {"base": "docker.io/library/debian:12"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    from lab.errors import SpecError
    with pytest.raises(SpecError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "no source for 'kubectl'" in text
    assert "exactly one of checksum" in text
    assert "release.build.quay.io/metallb/speaker:v0.16.1" in text


def test_a_rerun_reuses_verified_downloads_and_resumes_partial_ones(server, tmp_path):
    served = publish(server)
    fetch, src, out = fetcher(server, tmp_path), RECIPE.release.binaries["kubeadm"], out_dir(tmp_path)
    binary = f"{PREFIX}/release/v1.37.2/bin/linux/amd64/kubeadm"
    fetch.binary("kubeadm", src, out)
    part = fetch._dl(server.base + binary)
    part = part.with_name(part.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    fetch.binary("kubeadm", src, out)  # verified copy in the work directory: only the checksum is fetched again
    assert server.requests.count(binary) == 1 and server.requests.count(binary + ".sha256") == 2
    fetch._dl(server.base + binary).unlink()
    part.write_bytes(served["kubeadm"][:5])  # an interrupted download
    entry = fetch.binary("kubeadm", src, out)
    assert server.requests.count(binary) == 2 and server.ranges == [(binary, "bytes=5-")]
    assert (out / "bin" / "kubeadm").read_bytes() == served["kubeadm"]
    assert entry.sha256 == hashlib.sha256(served["kubeadm"]).hexdigest()
