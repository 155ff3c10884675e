"""Cilium's kube-proxy replacement status, read from ``cilium-dbg status`` (text) or ``cilium-dbg status -o json``:
the one parser, used by the lab's ready phase and by the conformance check."""
from __future__ import annotations

import json
import re

KPR_LINE = re.compile(r"^\s*KubeProxyReplacement:\s+(\S+)", re.M)


def kpr_mode(status_output: str) -> str | None:
    """The reported mode ("True", "False", "Strict", ...): ``kube-proxy-replacement.mode`` of the JSON form, or the
    ``KubeProxyReplacement:`` line of the text form; None when the output has neither."""
    try:
        doc = json.loads(status_output)
    except ValueError:
        match = KPR_LINE.search(status_output or "")
        return match.group(1) if match else None
    if not isinstance(doc, dict):
        return None
    section = doc.get("kube-proxy-replacement") or {}
    return section.get("mode") if isinstance(section, dict) else None


def cilium_kpr(status_output: str) -> tuple[bool, str]:
    """(active, the reported value); the value explains itself when the output has no KPR status."""
    mode = kpr_mode(status_output)
    if mode is None:
        return False, "no KubeProxyReplacement line in cilium status"
    return mode.lower() in ("true", "strict"), mode
