"""Where things are named and put: libvirt volume names and the serial console log of each node.

Pure functions of the spec and the image name, shared by ``lab render`` and the phases that create the objects
(storage, nodes, wait) and by ``lab logs``: render and up agree on every name because there is one place.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lab.spec import Lab, NodeSpec

if TYPE_CHECKING:
    from lab.images import ResolvedImage


def base_volumes(image: "ResolvedImage") -> dict[str, str]:
    """role -> volume name for the image's files (by image name: ``render`` knows it without a download)."""
    tag = re.sub(r"[^A-Za-z0-9.-]", "-", re.sub(r"\.qcow2$", "", image.name))
    if image.format == "kernel":
        return {"disk": f"base-{tag}-rootfs", "kernel": f"base-{tag}-vmlinuz", "initrd": f"base-{tag}-initrd"}
    return {"disk": f"base-{tag}.qcow2"}


def node_volumes(node: NodeSpec | str) -> dict[str, str]:
    name = node if isinstance(node, str) else node.name
    return {"disk": f"{name}.qcow2", "seed": f"{name}-cidata.img"}


def console_log_path(lab: Lab, node: NodeSpec | str) -> str:
    return f"/var/log/libvirt/qemu/{lab.domain_name(node)}-serial.log"


#: virtio serial of the read-only disk that carries the offline bundle into nodes (/dev/disk/by-id/virtio-<serial>).
BUNDLE_SERIAL = "kvmlab-bundle"


def bundle_volume(recipe_sha256: str) -> str:
    """The pool volume holding the bundle's file system, named by recipe so a new bundle never hides under an old."""
    return f"bundle-{recipe_sha256[:16]}.img"
