"""lab.images against a real HTTP server on 127.0.0.1 (with Range support and injected faults),
and the shipped catalog's schema."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lab import images
from lab.errors import ImageError
from lab.images import CatalogEntry, resolve_image

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = images.QCOW2_MAGIC + bytes(range(256)) * 4000  # ~1 MB, starts like a qcow2


class Handler(BaseHTTPRequestHandler):
    """Serves server.files {path: bytes} with single-range support; faults from server.faults."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        fault = srv.faults.get(self.path, [])
        action = fault.pop(0) if fault else None
        if isinstance(action, int):
            self.send_response(action)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and action != "ignore-range":
            start = int(re.match(r"bytes=(\d+)-$", rng).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if action == "cut":  # promise everything, send half, drop the connection
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.faults, srv.requests = {}, {}, []
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(images, "DOWNLOAD_ATTEMPTS", 3)
    monkeypatch.setattr(images, "RETRY_WAIT_MAX_S", 0.2)
    monkeypatch.setattr(images, "TIMEOUT_S", 5.0)


def publish(server, name="disk.qcow2", body=PAYLOAD, algorithm="sha256", fmt="gnu", digest=None):
    """Put body and its checksum file on the server; return a catalog entry for it."""
    server.files[f"/rel/{name}"] = body
    hexd = digest or hashlib.new(algorithm, body).hexdigest()
    sums = "SHA256SUMS" if algorithm == "sha256" else "SHA512SUMS"
    line = f"{hexd} *{name}" if fmt == "gnu" else f"{algorithm.upper()} ({name}) = {hexd}"
    server.files[f"/rel/{sums}"] = f"{'0' * len(hexd)}  other.img\n{line}\n".encode()
    return CatalogEntry("test-img", "download", "qcow2", url=f"{server.base}/rel/{name}",
                        checksum_url=f"{server.base}/rel/{sums}", checksum_algorithm=algorithm)


def resolve(entry, tmp_path):
    return resolve_image(entry.name, catalog={entry.name: entry}, cache=tmp_path)


# ---------------------------------------------------------------- download, resume, checksum

def test_download_verifies_and_caches(server, tmp_path):
    entry = publish(server)
    img = resolve(entry, tmp_path)
    assert img.format == "qcow2" and img.cmdline is None and img.kernel is None
    assert img.disk == tmp_path / "test-img" / "disk.qcow2"
    assert img.disk.read_bytes() == PAYLOAD
    assert img.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert not img.disk.with_name("disk.qcow2.part").exists()
    assert [r for r in server.requests if r[0].endswith(".qcow2")] == [("/rel/disk.qcow2", None)]
    n = len(server.requests)
    assert resolve(entry, tmp_path) == img  # cached: no network at all
    assert len(server.requests) == n


def test_resume_from_existing_part_uses_range(server, tmp_path):
    entry = publish(server)
    part = tmp_path / "test-img" / "disk.qcow2.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:300_000])
    img = resolve(entry, tmp_path)
    assert img.disk.read_bytes() == PAYLOAD
    assert ("/rel/disk.qcow2", "bytes=300000-") in server.requests
    assert ("/rel/disk.qcow2", None) not in server.requests


def test_dropped_transfer_is_retried_and_resumed(server, tmp_path):
    entry = publish(server)
    server.faults["/rel/disk.qcow2"] = ["cut"]
    img = resolve(entry, tmp_path)
    assert img.disk.read_bytes() == PAYLOAD
    gets = [r for r in server.requests if r[0] == "/rel/disk.qcow2"]
    assert gets[0] == ("/rel/disk.qcow2", None)
    assert gets[1] == ("/rel/disk.qcow2", f"bytes={len(PAYLOAD) // 2}-")


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    entry = publish(server)
    part = tmp_path / "test-img" / "disk.qcow2.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage" * 1000)
    server.faults["/rel/disk.qcow2"] = ["ignore-range"]
    assert resolve(entry, tmp_path).disk.read_bytes() == PAYLOAD


def test_complete_part_answered_416_is_used(server, tmp_path):
    entry = publish(server)
    part = tmp_path / "test-img" / "disk.qcow2.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)
    assert resolve(entry, tmp_path).disk.read_bytes() == PAYLOAD
    assert ("/rel/disk.qcow2", f"bytes={len(PAYLOAD)}-") in server.requests


def test_transient_503_is_retried(server, tmp_path):
    entry = publish(server)
    server.faults["/rel/disk.qcow2"] = [503, 503]
    assert resolve(entry, tmp_path).disk.read_bytes() == PAYLOAD
    assert len([r for r in server.requests if r[0] == "/rel/disk.qcow2"]) == 3


@pytest.mark.parametrize("fmt", ["gnu", "bsd"])
def test_sha512_checksum_file(server, tmp_path, fmt):
    entry = publish(server, algorithm="sha512", fmt=fmt)
    img = resolve(entry, tmp_path)
    assert img.sha256 == hashlib.sha256(PAYLOAD).hexdigest()  # sha256 of the disk, whatever was verified
    record = json.loads((tmp_path / "test-img" / "disk.qcow2.verified.json").read_text())
    assert record["algorithm"] == "sha512" and record["digest"] == hashlib.sha512(PAYLOAD).hexdigest()


def test_checksum_mismatch_names_url_and_cache_path(server, tmp_path):
    entry = publish(server, digest=hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(ImageError) as err:
        resolve(entry, tmp_path)
    dest = tmp_path / "test-img" / "disk.qcow2"
    msg = str(err.value)
    assert "checksum mismatch" in msg and entry.url in msg and str(dest) in msg
    assert "download it yourself" in err.value.hint
    assert not dest.exists() and dest.with_name("disk.qcow2.bad").exists()


def test_pinned_digest_disagreeing_with_checksum_file(server, tmp_path):
    entry = publish(server)
    entry = CatalogEntry(**{**entry.__dict__, "checksum_digest": "ab" * 32})
    with pytest.raises(ImageError, match="pins"):
        resolve(entry, tmp_path)
    assert not any(r[0].endswith(".qcow2") for r in server.requests)  # refused before downloading


def test_hand_downloaded_file_with_pinned_digest_needs_no_network(tmp_path):
    entry = CatalogEntry("test-img", "download", "qcow2", url="https://example.invalid/rel/disk.qcow2",
                         checksum_url="https://example.invalid/rel/SHA256SUMS", checksum_algorithm="sha256",
                         checksum_digest=hashlib.sha256(PAYLOAD).hexdigest())
    (tmp_path / "test-img").mkdir()
    (tmp_path / "test-img" / "disk.qcow2").write_bytes(PAYLOAD)
    assert resolve(entry, tmp_path).sha256 == hashlib.sha256(PAYLOAD).hexdigest()


def test_checksum_file_without_the_line(server, tmp_path):
    entry = publish(server)
    server.files["/rel/SHA256SUMS"] = b"00  unrelated.img\n"
    with pytest.raises(ImageError, match="no sha256 line for disk.qcow2"):
        resolve(entry, tmp_path)


def test_http_404_is_not_retried_and_names_url_and_part(server, tmp_path):
    entry = publish(server)
    del server.files["/rel/disk.qcow2"]
    with pytest.raises(ImageError) as err:
        resolve(entry, tmp_path)
    msg = str(err.value)
    assert "HTTP 404" in msg and entry.url in msg and str(tmp_path / "test-img" / "disk.qcow2.part") in msg
    assert len([r for r in server.requests if r[0] == "/rel/disk.qcow2"]) == 1


def test_mirror_is_tried_when_the_primary_folder_fails(server, tmp_path):
    entry = publish(server)
    server.files["/archive/disk.qcow2"] = server.files.pop("/rel/disk.qcow2")
    server.files["/archive/SHA256SUMS"] = server.files["/rel/SHA256SUMS"]
    entry = CatalogEntry(**{**entry.__dict__, "mirrors": (f"{server.base}/archive/",)})
    assert resolve(entry, tmp_path).disk.read_bytes() == PAYLOAD
    assert ("/archive/disk.qcow2", None) in server.requests


def test_offline_gives_url_cache_path_and_hint(tmp_path):
    with socket.socket() as s:  # a port on loopback that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = CatalogEntry("test-img", "download", "qcow2", url=f"http://127.0.0.1:{port}/rel/disk.qcow2",
                         checksum_url=f"http://127.0.0.1:{port}/rel/SHA256SUMS", checksum_algorithm="sha256")
    with pytest.raises(ImageError) as err:
        resolve(entry, tmp_path)
    msg = str(err.value)
    assert entry.checksum_url in msg and str(tmp_path / "test-img" / "disk.qcow2") in msg
    assert "refused" in msg.lower()
    assert "download the image yourself" in err.value.hint


def test_download_offline_mid_way_names_part(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    part = tmp_path / "x.qcow2.part"
    part.write_bytes(b"12345")
    with pytest.raises(ImageError) as err:
        images.download(f"http://127.0.0.1:{port}/x.qcow2", part)
    assert "5 bytes so far" in str(err.value) and str(part) in str(err.value)
    assert f"download it yourself to {tmp_path / 'x.qcow2'}" in err.value.hint


# ---------------------------------------------------------------- local images

def test_offline_image_not_built_says_make_image(tmp_path):
    with pytest.raises(ImageError) as err:
        resolve_image("debian-12-offline", cache=tmp_path)
    assert str(tmp_path / "debian-12-offline" / "manifest.json") in str(err.value)
    assert "make image" in err.value.hint


def test_offline_image_from_manifest(tmp_path):
    folder = tmp_path / "debian-12-offline"
    folder.mkdir()
    for f in ("vmlinuz", "initrd.img", "rootfs.qcow2"):
        (folder / f).write_bytes(f.encode())
    manifest = {"name": "debian-12-offline", "format": "kernel", "kernel": "vmlinuz", "initrd": "initrd.img",
                "rootfs": "rootfs.qcow2", "cmdline": "root=/dev/vda rw console=ttyS0,115200n8",
                "sha256": {"rootfs.qcow2": "c0ffee"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    img = resolve_image("debian-12-offline", cache=tmp_path)
    assert (img.format, img.disk, img.kernel, img.initrd) == ("kernel", folder / "rootfs.qcow2",
                                                              folder / "vmlinuz", folder / "initrd.img")
    assert img.cmdline.startswith("root=/dev/vda") and img.sha256 == "c0ffee"
    (folder / "initrd.img").unlink()
    with pytest.raises(ImageError, match="incomplete"):
        resolve_image("debian-12-offline", cache=tmp_path)


def test_local_qcow2_and_kernel_specs(tmp_path):
    disk = tmp_path / "my.qcow2"
    disk.write_bytes(PAYLOAD)
    img = resolve_image({"path": str(disk)}, cache=tmp_path)
    assert (img.format, img.disk, img.sha256) == ("qcow2", disk, hashlib.sha256(PAYLOAD).hexdigest())
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageError, match="not a qcow2"):
        resolve_image({"path": str(raw)}, cache=tmp_path)
    with pytest.raises(ImageError, match="does not exist"):
        resolve_image({"path": str(tmp_path / "nope.qcow2")}, cache=tmp_path)
    k = resolve_image({"kernel": str(raw), "initrd": str(raw), "rootfs": str(disk), "cmdline": "root=/dev/vda"},
                      cache=tmp_path)
    assert (k.format, k.kernel, k.disk, k.cmdline) == ("kernel", raw, disk, "root=/dev/vda")


def test_unknown_name_lists_catalog():
    with pytest.raises(ImageError, match="ubuntu-24.04"):
        resolve_image("fedora-40")


# ---------------------------------------------------------------- the shipped catalog

def test_catalog_schema():
    raw = yaml.safe_load((REPO / "images" / "catalog.yaml").read_text())["images"]
    catalog = images.load_catalog()
    assert {"ubuntu-24.04", "debian-12", "debian-12-offline"} <= catalog.keys()
    assert set(raw) == set(catalog)
    for name, e in catalog.items():
        assert raw[name]["os"] in ("ubuntu", "debian") and raw[name]["arch"] == "amd64", name
        assert e.user, name
        if e.kind == "local":
            assert e.format == "kernel" and e.build == "make image" and raw[name]["recipe"] == "images/offline/"
            assert (REPO / "images" / "offline" / "build.sh").is_file()
            continue
        assert e.format == "qcow2"
        for url in (e.url, e.checksum_url, *e.mirrors):
            assert url.startswith("https://"), (name, url)
            assert not re.search(r"/(current|latest|daily)/", url), (name, url)
            assert re.search(r"/(release-)?\d{8}(-\d+)?/", url), f"{name}: {url} is not a dated release path"
        assert e.checksum_url.rsplit("/", 1)[0] == e.url.rsplit("/", 1)[0], name
        assert e.checksum_url.endswith({"sha256": "/SHA256SUMS", "sha512": "/SHA512SUMS"}[e.checksum_algorithm])
        assert e.filename.endswith((".img", ".qcow2"))
        if e.checksum_digest:
            assert re.fullmatch(r"[0-9a-f]+", e.checksum_digest)
            assert len(e.checksum_digest) == hashlib.new(e.checksum_algorithm).digest_size * 2, name


def test_catalog_rejects_bad_entries(tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text("images:\n  x:\n    kind: download\n    format: qcow2\n    url: https://a/b.img\n"
                   "    checksum: {url: https://a/MD5SUMS, algorithm: md5}\n  y:\n    kind: local\n")
    with pytest.raises(ImageError) as err:
        images.load_catalog(bad)
    assert "images.x" in str(err.value) and "md5" in str(err.value) and "images.y" in str(err.value)


def test_lab_specs_name_catalog_images():
    catalog = images.load_catalog()
    for spec in (REPO / "labs").glob("*.yaml"):
        image = yaml.safe_load(spec.read_text()).get("image")
        if isinstance(image, str):
            assert image in catalog, f"{spec.name}: image {image!r} is not in images/catalog.yaml"


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert images.cache_dir() == tmp_path / "kvmlab" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert images.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "kvmlab" / "images"
