"""How the failover check takes the announcing node away (``--failover-by``).

* ``taint`` (default, any cluster): a NoExecute taint on the announcer evicts its MetalLB speaker -- the
  Kubernetes-level loss a drain produces.
* ``suspend`` (needs ``--lab``): the announcer's VM paused through libvirt -- a hung host: no ARP, no memberlist, no
  kubelet, nothing said on the way out.
* ``link-down`` (needs ``--lab``): the announcer's virtual NIC set down through libvirt -- a pulled cable: the node
  runs on, unreachable.

The two libvirt ways are what only a lab that owns its hypervisor can do. Each returns a ``restore`` callable; the
check calls it in ``finally`` and then waits for the node to be Ready again.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Callable

from conformance.judge import NotMeasured

METHODS = ("taint", "suspend", "link-down")
HYPERVISOR_METHODS = ("suspend", "link-down")


def usage_problem(method: str, lab) -> str | None:
    """Why ``--failover-by METHOD`` cannot run with these options, or None."""
    if method not in METHODS:
        return f"--failover-by {method!r}: use one of {', '.join(METHODS)}"
    if method in HYPERVISOR_METHODS and lab is None:
        return (f"--failover-by {method} acts on the node's VM through libvirt: pass --lab SPEC (the lab that "
                "created the nodes), or use --failover-by taint")
    return None


def taint_node(kube, node: str, key: str) -> Callable[[], None]:
    def plain(t):  # as read, without the None fields (a control plane's taint has no value)
        return {k: v for k, v in (("key", t.key), ("value", t.value), ("effect", t.effect)) if v is not None}

    taints = [plain(t) for t in (kube.core.read_node(node).spec.taints or [])]
    kube.core.patch_node(node, {"spec": {"taints": taints + [{"key": key, "value": "true", "effect": "NoExecute"}]}})

    def restore() -> None:
        current = kube.core.read_node(node).spec.taints or []
        kube.core.patch_node(node, {"spec": {"taints": [plain(t) for t in current if t.key != key]}})
    return restore


def set_link(dom, mac: str, state: str) -> None:
    """Set the live state of the domain's interface with ``mac`` ('up' or 'down'), as `virsh domif-setlink`."""
    import libvirt

    root = ET.fromstring(dom.XMLDesc(0))
    for iface in root.findall("./devices/interface"):
        found = iface.find("mac")
        if found is not None and found.get("address", "").lower() == mac.lower():
            link = iface.find("link")
            if link is None:
                link = ET.SubElement(iface, "link")
            link.set("state", state)
            dom.updateDeviceFlags(ET.tostring(iface, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return
    raise NotMeasured(f"domain {dom.name()} has no interface with MAC {mac}: is --lab the lab that made the nodes?")


def hypervisor_down(lab, node: str, method: str) -> Callable[[], None]:
    """Suspend the node's domain or set its lab NIC down; returns the restore."""
    import libvirt

    try:
        conn = libvirt.open(lab.libvirt.uri)
    except libvirt.libvirtError as exc:
        raise NotMeasured(f"--failover-by {method}: cannot connect to libvirt at {lab.libvirt.uri}: {exc}") from None
    try:
        dom = conn.lookupByName(lab.domain_name(node))
    except libvirt.libvirtError as exc:
        conn.close()
        raise NotMeasured(f"--failover-by {method}: no domain {lab.domain_name(node)} for node {node} ({exc})"
                          ) from None
    if method == "suspend":
        dom.suspend()

        def restore() -> None:
            try:
                dom.resume()
            finally:
                conn.close()
        return restore
    mac = lab.mac(node)
    set_link(dom, mac, "down")

    def restore_link() -> None:
        try:
            set_link(dom, mac, "up")
        finally:
            conn.close()
    return restore_link


def take_down(kube, lab, node: str, method: str, taint_key: str) -> Callable[[], None]:
    if method == "taint":
        return taint_node(kube, node, taint_key)
    return hypervisor_down(lab, node, method)
