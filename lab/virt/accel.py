"""KVM or TCG? Pure decision logic over facts, so it is testable with injected facts and usable by ``render``
without a libvirt connection (:func:`local_accel`). ``Hypervisor.detect_accel`` gathers the facts through libvirt.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lab.errors import VirtError

TCG_WARNING = "falling back to TCG software emulation (domain type qemu): it works, but is roughly 5-20x slower"


def is_local_uri(uri: str) -> bool:
    """No host part and no network transport: the hypervisor runs on this machine."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return not parts.hostname and transport in ("", "unix")


@dataclass(frozen=True)
class AccelFacts:
    """What decides KVM vs TCG. ``kvm_device``/``kvm_offered`` carry a reason string when unusable."""

    uri: str
    local: bool
    cpu_flags: frozenset[str]
    kvm_device: str | None    # None: /dev/kvm opened read-write (or not checked: remote); else why not
    kvm_offered: str | None   # None: libvirt offers domain type kvm; else why not


def decide_accel(requested: str, facts: AccelFacts) -> tuple[str, str | None]:
    """('kvm'|'qemu', warning or None). Raises VirtError when 'kvm' is requested but unusable."""
    if requested not in ("auto", "kvm", "tcg"):
        raise VirtError(f"libvirt.accel {requested!r} is not known", hint="use auto, kvm or tcg", exit_code=2)
    reasons = []
    if not facts.cpu_flags & {"vmx", "svm"}:
        reasons.append("the host CPU shows neither vmx nor svm (no VT-x/AMD-V, disabled in firmware, or "
                       "nested virtualization off)")
    if facts.local and facts.kvm_device:
        reasons.append(f"/dev/kvm {facts.kvm_device}")
    if facts.kvm_offered:
        reasons.append(f"libvirt does not offer domain type kvm: {facts.kvm_offered}")
    if requested == "tcg":
        return "qemu", None
    if not reasons:
        return "kvm", None
    why = "; ".join(reasons)
    if requested == "kvm":
        raise VirtError(f"libvirt.accel is kvm but KVM is unusable on {facts.uri}: {why}",
                        hint="set libvirt.accel: auto (or tcg) to run under TCG, or enable VT-x/AMD-V (firmware, "
                             "nested virtualization) and load kvm_intel/kvm_amd")
    return "qemu", f"KVM is unusable on {facts.uri}: {why}; {TCG_WARNING}"


def open_kvm_device(path: str = "/dev/kvm") -> str | None:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        return None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "does not exist (kvm_intel/kvm_amd not loaded, or no hardware virtualization)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "cannot be opened read-write by this user (add it to group kvm)"
        return f"cannot be opened: {exc.strerror}"


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if re.match(r"flags\s*:", line) for flag in line.split(":")[1].split()}


def local_facts(uri: str = "this machine") -> AccelFacts:
    """Facts from this machine alone (no libvirt): CPU flags and /dev/kvm; libvirt's kvm offer is assumed."""
    return AccelFacts(uri=uri, local=True, cpu_flags=frozenset(cpuinfo_flags()), kvm_device=open_kvm_device(),
                      kvm_offered=None)


def local_accel(requested: str = "auto", uri: str = "this machine") -> tuple[str, str | None]:
    """The accelerator this machine would get, without asking libvirt (for ``lab render``)."""
    return decide_accel(requested, local_facts(uri))


