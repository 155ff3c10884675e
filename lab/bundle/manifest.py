"""bundle.json: what a bundle holds. Both producers (from source, from release) write this one format.

Every entry names its component, kind (binary, image, chart, manifest), version, where it came from, and the
sha256 of its file. ``verify`` recomputes every digest, so a bundle copied to an air-gapped host can be checked.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from lab.errors import LabError

MANIFEST = "bundle.json"
FORMAT = 1
Kind = Literal["binary", "image", "chart", "manifest"]


class BundleError(LabError):
    """A bundle cannot be built, found or verified."""


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str          # relative to the bundle directory
    component: str     # kubernetes, etcd, coredns, pause, helm, cilium, metallb, cni, netprobe
    kind: Kind
    version: str
    source: str        # e.g. go:k8s.io/kubernetes/cmd/kubeadm@v1.37.2, or the release URL
    sha256: str
    ref: str = ""      # image reference, for images
    preload: bool = True  # images: imported into every node by the runtime phase


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: int = FORMAT
    producer: Literal["source", "release"]
    recipe_sha256: str
    kubernetes: str
    built_at: str
    entries: list[Entry]

    def of_kind(self, kind: Kind) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def find(self, kind: Kind, name: str) -> Entry:
        """The entry of ``kind`` whose file name (binaries, charts, manifests) or ref (images) is ``name``."""
        for e in self.of_kind(kind):
            if (e.ref or Path(e.path).name) == name:
                return e
        raise BundleError(f"the bundle has no {kind} {name!r}", hint="rebuild it: `lab bundle build`")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory} is not a bundle: {MANIFEST} is missing",
                          hint="build one with `lab bundle build` (or `make bundle`)")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path} is not a valid bundle manifest: {exc}",
                          hint="rebuild the bundle: `lab bundle build --force`") from None


def verify(directory: Path) -> Manifest:
    """Check that every entry's file exists with its recorded sha256 and that no other file is there."""
    manifest = read_manifest(directory)
    problems = []
    for e in manifest.entries:
        f = directory / e.path
        if not f.is_file():
            problems.append(f"{e.path}: missing")
        elif sha256_file(f) != e.sha256:
            problems.append(f"{e.path}: sha256 differs from the manifest")
    listed = {e.path for e in manifest.entries} | {MANIFEST}
    extra = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                   if p.is_file() and str(p.relative_to(directory)) not in listed)
    problems += [f"{p}: not in the manifest" for p in extra]
    if problems:
        raise BundleError(f"bundle {directory} failed verification:\n  " + "\n  ".join(problems),
                          hint="rebuild it: `lab bundle build --force`")
    return manifest


def summary(manifest: Manifest) -> str:
    return json.dumps({k: len(manifest.of_kind(k)) for k in ("binary", "image", "chart", "manifest")})
