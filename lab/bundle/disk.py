"""The bundle as a read-only ext4 disk image: how it reaches the nodes.

An SSH copy into an emulated (TCG) guest runs at 4-7 MB/s (the guest's sshd decrypts in emulation), so a 1.5 GB
bundle would take minutes per node; the same bytes arrive through a virtio disk at disk speed. The image sits
beside the bundle, is made once per bundle with ``mkfs.ext4 -d`` (no mount, no root needed), and is uploaded into
the lab's pool through libvirt like the base image.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from lab.bundle.manifest import MANIFEST, BundleError

LABEL = "kvmlab-bundle"
SLACK = 64 * 2**20  # file system metadata on top of the files


def disk_path(directory: Path) -> Path:
    return directory.parent / f"{directory.name}.ext4"


def bundle_disk(directory: Path) -> Path:
    """The ext4 image of ``directory`` (a verified bundle), made if missing or made from another bundle.json."""
    out = disk_path(directory)
    stamp = out.with_name(out.name + ".manifest-sha256")
    want = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    if out.is_file() and stamp.is_file() and stamp.read_text() == want:
        return out
    if shutil.which("mkfs.ext4") is None:
        raise BundleError("making the bundle disk needs mkfs.ext4", hint="apt-get install e2fsprogs")
    files = [p for p in directory.rglob("*") if p.is_file()]
    size = int(sum(p.stat().st_size for p in files) * 1.05) + SLACK + 4096 * len(files)
    size = (size + 2**20 - 1) // 2**20 * 2**20
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with tmp.open("wb") as fh:
        fh.truncate(size)
    proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-m", "0", "-O", "^has_journal",
                           "-E", "root_owner=0:0", "-d", str(directory), str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"mkfs.ext4 of the bundle disk failed: {proc.stderr.strip()[-500:]}",
                          hint="check free space in the bundle cache")
    os.replace(tmp, out)
    stamp.write_text(want)
    return out
