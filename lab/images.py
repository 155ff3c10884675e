"""Images: catalog lookup, download with resume, checksum verification, the local cache.

A lab spec's ``image`` is a catalog name (``images/catalog.yaml``), a local qcow2 ``{path}``, or a
local direct-kernel-boot image ``{kernel, initrd, rootfs, cmdline}``. Downloads go to
``${XDG_CACHE_HOME:-~/.cache}/kvmlab/images/<name>/<file>.part`` and resume with an HTTP Range
request; the file gets its final name only after its digest matched the distribution's checksum
file. A ``<file>.verified.json`` beside it records the verification, so later runs need no network.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tenacity
import yaml

from lab.errors import ImageError

log = logging.getLogger(__name__)

CATALOG_PATH = Path(__file__).resolve().parent.parent / "images" / "catalog.yaml"
DOWNLOAD_ATTEMPTS = 4
RETRY_WAIT_MAX_S = 8.0
TIMEOUT_S = 30.0
CHUNK = 1 << 20
RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    format: Literal["qcow2", "kernel"]
    disk: Path                      # the qcow2 disk, or the rootfs for direct kernel boot
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None             # None for qcow2
    sha256: str                     # of disk


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: Literal["download", "local"]
    format: Literal["qcow2", "kernel"]
    url: str | None = None
    mirrors: tuple[str, ...] = ()
    checksum_url: str | None = None
    checksum_algorithm: str | None = None
    checksum_digest: str | None = None
    build: str | None = None
    manifest: str = "manifest.json"
    user: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmlab" / "images"


# ---------------------------------------------------------------- catalog

def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    path = Path(path or os.environ.get("KVMLAB_CATALOG") or CATALOG_PATH)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ImageError(f"cannot read the image catalog {path}: {e}", hint="restore images/catalog.yaml from git")
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), dict):
        raise ImageError(f"image catalog {path}: no `images:` mapping", hint="see the header of images/catalog.yaml")
    entries, problems = {}, []
    for name, e in raw["images"].items():
        try:
            entries[name] = _entry(name, e)
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"images.{name}: {err}")
    if problems:
        raise ImageError(f"image catalog {path}: " + "; ".join(problems), hint="see the header of images/catalog.yaml")
    return entries


def _entry(name: str, e: dict[str, Any]) -> CatalogEntry:
    kind, fmt = e["kind"], e["format"]
    if kind not in ("download", "local") or fmt not in ("qcow2", "kernel"):
        raise ValueError(f"kind must be download|local and format qcow2|kernel, got {kind}/{fmt}")
    if kind == "local":
        return CatalogEntry(name, kind, fmt, build=e["build"], manifest=e.get("manifest", "manifest.json"),
                            user=e.get("user"))
    ck = e["checksum"]
    if ck["algorithm"] not in ("sha256", "sha512"):
        raise ValueError(f"checksum.algorithm must be sha256 or sha512, got {ck['algorithm']}")
    return CatalogEntry(name, kind, fmt, url=e["url"], mirrors=tuple(e.get("mirrors", ())),
                        checksum_url=ck["url"], checksum_algorithm=ck["algorithm"],
                        checksum_digest=(ck.get("digest") or None), user=e.get("user"))


# ---------------------------------------------------------------- resolve

def resolve_image(ref: Any, *, catalog: dict[str, CatalogEntry] | None = None,
                  cache: Path | None = None) -> ResolvedImage:
    """A catalog name, {path: qcow2} or {kernel, initrd, rootfs[, cmdline]} -> a ResolvedImage on disk."""
    if hasattr(ref, "model_dump"):
        ref = ref.model_dump()
    cache = Path(cache or cache_dir())
    if isinstance(ref, str):
        catalog = catalog if catalog is not None else load_catalog()
        if ref not in catalog:
            raise ImageError(f"unknown image {ref!r}; the catalog has: {', '.join(sorted(catalog))}",
                             hint="use a catalog name, or {path: disk.qcow2}, or {kernel, initrd, rootfs}")
        entry = catalog[ref]
        return _resolve_local(entry, cache) if entry.kind == "local" else _resolve_download(entry, cache)
    if isinstance(ref, dict) and "path" in ref:
        disk = _existing(ref["path"], "image.path")
        with open(disk, "rb") as f:
            if f.read(4) != QCOW2_MAGIC:
                raise ImageError(f"image.path {disk} is not a qcow2 file",
                                 hint=f"convert it: qemu-img convert -O qcow2 {disk} {disk}.qcow2")
        return ResolvedImage(disk.name, "qcow2", disk, None, None, None, file_digests(disk, "sha256")[0])
    if isinstance(ref, dict) and {"kernel", "initrd", "rootfs"} <= ref.keys():
        kernel, initrd = _existing(ref["kernel"], "image.kernel"), _existing(ref["initrd"], "image.initrd")
        rootfs = _existing(ref["rootfs"], "image.rootfs")
        cmdline = ref.get("cmdline") or "root=/dev/vda rw console=ttyS0,115200n8"
        return ResolvedImage(rootfs.name, "kernel", rootfs, kernel, initrd, cmdline,
                             file_digests(rootfs, "sha256")[0])
    raise ImageError(f"image: cannot use {ref!r}",
                     hint="use a catalog name, or {path: disk.qcow2}, or {kernel, initrd, rootfs, cmdline}")


def _existing(path: str | Path, field: str) -> Path:
    p = Path(path).expanduser().resolve()
    if not p.is_file() or not os.access(p, os.R_OK):
        raise ImageError(f"{field}: {p} does not exist or is not readable", hint="fix the path in the lab spec")
    return p


def _resolve_local(entry: CatalogEntry, cache: Path) -> ResolvedImage:
    folder = cache / entry.name
    manifest_path = folder / entry.manifest
    hint = f"run `{entry.build}` to build it into {folder}"
    try:
        m = json.loads(manifest_path.read_text())
        files = {role: folder / m[role] for role in ("kernel", "initrd", "rootfs")}
        sha256 = m["sha256"][m["rootfs"]]
    except FileNotFoundError:
        raise ImageError(f"image {entry.name} is not built: {manifest_path} is missing", hint=hint)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImageError(f"image {entry.name}: bad manifest {manifest_path}: {e}", hint=hint)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ImageError(f"image {entry.name} is incomplete: missing {', '.join(missing)}", hint=hint)
    return ResolvedImage(entry.name, "kernel", files["rootfs"], files["kernel"], files["initrd"], m["cmdline"], sha256)


def _resolve_download(entry: CatalogEntry, cache: Path) -> ResolvedImage:
    dest = cache / entry.name / entry.filename
    marker = dest.with_name(dest.name + ".verified.json")
    record = _read_marker(marker, entry)
    if record is None or not dest.is_file() or dest.stat().st_size != record["size"]:
        record = fetch_verified(entry, dest)
        marker.write_text(json.dumps(record, indent=2) + "\n")
    return ResolvedImage(entry.name, "qcow2", dest, None, None, None, record["sha256"])


def _read_marker(marker: Path, entry: CatalogEntry) -> dict | None:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    expected = (entry.checksum_algorithm, entry.checksum_digest)
    if record.get("algorithm") != expected[0] or (expected[1] and record.get("digest") != expected[1]):
        return None
    return record


# ---------------------------------------------------------------- download and verify

def fetch_verified(entry: CatalogEntry, dest: Path) -> dict:
    """Download entry's file to dest (resuming dest.part), verify it, return the verification record."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    folders = [entry.url.rsplit("/", 1)[0] + "/"] + [m if m.endswith("/") else m + "/" for m in entry.mirrors]
    checksum_name = entry.checksum_url.rsplit("/", 1)[-1]
    if dest.is_file() and entry.checksum_digest:
        # Downloaded by hand (or verified before): the pinned digest needs no network.
        return verify(dest, entry.url, entry.checksum_algorithm, entry.checksum_digest)
    errors: list[ImageError] = []
    for i, folder in enumerate(folders):
        url = entry.url if i == 0 else folder + entry.filename
        checksum_url = entry.checksum_url if i == 0 else folder + checksum_name
        try:
            expected = expected_digest(checksum_url, entry.filename, entry.checksum_algorithm)
            if entry.checksum_digest and expected != entry.checksum_digest:
                raise ImageError(f"{checksum_url} gives {entry.checksum_algorithm} {expected} for {entry.filename}, "
                                 f"but images/catalog.yaml pins {entry.checksum_digest}",
                                 hint="the release was changed upstream: check it and update the catalog")
            if not dest.is_file():
                download(url, dest.with_name(dest.name + ".part"))
                dest.with_name(dest.name + ".part").replace(dest)
            return verify(dest, url, entry.checksum_algorithm, expected)
        except ImageError as e:
            errors.append(e)
            log.warning("%s", e.message)
    raise ImageError(f"cannot get image {entry.name} into the cache at {dest}: "
                     + "; ".join(e.message for e in errors), hint=errors[-1].hint)


def verify(path: Path, url: str, algorithm: str, expected: str) -> dict:
    digest, sha256 = file_digests(path, algorithm)
    if digest != expected:
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        raise ImageError(f"checksum mismatch for {url}: {algorithm} of {path} is {digest}, expected {expected}; "
                         f"moved it to {bad}",
                         hint=f"run again to download it afresh, or download it yourself to {path}")
    return {"url": url, "algorithm": algorithm, "digest": digest, "sha256": sha256, "size": path.stat().st_size}


def file_digests(path: Path, algorithm: str) -> tuple[str, str]:
    """(algorithm digest, sha256) of path, in one pass."""
    h, h256 = hashlib.new(algorithm), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if algorithm != "sha256":
                h256.update(chunk)
    return h.hexdigest(), (h if algorithm == "sha256" else h256).hexdigest()


_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]{64,128})\s+\*?(?P<name>\S.*)$")
_BSD = re.compile(r"^(?P<alg>\w+) \((?P<name>.+)\) = (?P<hex>[0-9a-fA-F]{64,128})$")


def expected_digest(checksum_url: str, filename: str, algorithm: str) -> str:
    text = _fetch_text(checksum_url)
    want_len = hashlib.new(algorithm).digest_size * 2
    for line in text.splitlines():
        m = _LINE.match(line.strip()) or _BSD.match(line.strip())
        if m and m.group("name").lstrip("./") == filename and len(m.group("hex")) == want_len:
            return m.group("hex").lower()
    raise ImageError(f"{checksum_url} has no {algorithm} line for {filename}",
                     hint="the checksum file or the file name in images/catalog.yaml is wrong")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRYABLE_HTTP
    return isinstance(exc, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError))


def _retrying() -> tenacity.Retrying:
    return tenacity.Retrying(retry=tenacity.retry_if_exception(_is_transient), reraise=True,
                             stop=tenacity.stop_after_attempt(DOWNLOAD_ATTEMPTS),
                             wait=tenacity.wait_exponential(multiplier=0.5, max=RETRY_WAIT_MAX_S))


def _fetch_text(url: str) -> str:
    def once() -> str:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return resp.read().decode("utf-8", "replace")
    try:
        return _retrying()(once)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise ImageError(f"cannot fetch checksum file {url}: {_reason(e)}",
                         hint="check the network (offline?) and run again; or download the image yourself "
                              "into the cache path above and pin its digest in images/catalog.yaml")


def download(url: str, part: Path) -> None:
    """Download url into part, resuming from part's current size. Raises ImageError."""
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        _retrying()(_download_once, url, part)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        final = part.with_name(part.name.removesuffix(".part"))
        raise ImageError(f"cannot download {url} to {part} ({part.stat().st_size if part.exists() else 0} bytes "
                         f"so far): {_reason(e)}",
                         hint=f"run again to resume, or download it yourself to {final}")


def _download_once(url: str, part: Path) -> None:
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset and _total_from_range(e.headers.get("Content-Range")) == offset:
            return  # the .part is already complete
        raise
    with resp:
        if resp.status == 206:
            start = _start_from_range(resp.headers.get("Content-Range"))
            if start != offset:
                raise http.client.HTTPException(f"server resumed at byte {start}, asked for {offset}")
            mode = "ab"
        else:
            mode = "wb"  # the server ignored Range: start over
        length = resp.headers.get("Content-Length")
        written = 0
        with open(part, mode) as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                written += len(chunk)
        if length is not None and written != int(length):
            raise http.client.IncompleteRead(b"", int(length) - written)
    log.info("downloaded %s (%d bytes%s)", url, written, f", resumed at {offset}" if mode == "ab" else "")


def _start_from_range(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _total_from_range(value: str | None) -> int | None:
    m = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}"
