"""Pure ElementTree builders for libvirt XML: network, pool, volume, domain. No libvirt import here.

Every network and domain we create carries an ownership element in our own XML namespace::

    <metadata><lab:owner xmlns:lab="https://kvmlab.invalid/xmlns/owner/1" lab="ci" node="cp1" role="worker"/></metadata>

``lab down`` finds its objects by that element (:func:`parse_owner`), never by name patterns alone.

Bridge mode has **no libvirt network**: nodes get ``<interface type='bridge'>`` on the existing host bridge.
A ``<forward mode='bridge'>`` network would add an object to own and remove while offering nothing (libvirt
refuses ``<ip>``/DHCP on such networks); addressing in bridge mode is static (see ``seed.network_config``).
So :func:`network_xml` returns ``None`` for bridge labs.
"""
from __future__ import annotations

import ipaddress
import platform
import xml.etree.ElementTree as ET
from pathlib import PurePosixPath

from lab.layout import BUNDLE_SERIAL
from lab.spec import Lab, NodeSpec

NS = "https://kvmlab.invalid/xmlns/owner/1"
NS_PREFIX = "lab"
ET.register_namespace(NS_PREFIX, NS)
OWNER = f"{{{NS}}}owner"

#: TCG cannot pass the host CPU through; Nehalem is x86-64-v2 (SSE4.2, POPCNT: RHEL 9 and newer glibc
#: need it) and qemu 7.2's TCG implements every one of its features (checked with ``-cpu Nehalem,enforce``).
TCG_CPU_MODEL = "Nehalem"
#: cgroup cpu shares of an emulated control plane (workers keep libvirt's default, 1024). libvirt enforces them only
#: with a cgroup CPU controller of its own; without one it keeps them in the XML silently, and the nodes phase warns
#: (Hypervisor.unapplied_cpu_shares). The CI host's libvirtd, run without systemd, has none.
TCG_CONTROL_PLANE_SHARES = 4096
#: Appended to a TCG guest's kernel command line (direct kernel boot). Under TCG the kernel's clocksource watchdog
#: finds the TSC "unstable" during boot (emulation jitter against jiffies) and falls back to acpi_pm: every clock
#: read is then a port I/O emulated by qemu under its big lock, with no vDSO, and Go programs read the clock all the
#: time (measured on the CI cluster: acpi_pm on both nodes). TCG's TSC follows the host's clock, so trusting it is
#: safe; KVM guests keep kvm-clock.
TCG_KERNEL_ARGS = "clocksource=tsc tsc=reliable"
#: qemu TCG's translation cache of an emulated node, in MiB, unless the spec sets libvirt.tcgCacheMiB. qemu 7.2's
#: default, 1 GiB, filled within the first minutes of a CI cluster node's boot; qemu then flushes every translation
#: and retranslates all hot code. The cache is host memory that grows as it fills, on top of the guest's.
TCG_TB_CACHE_MIB = 2048
#: The largest translation cache qemu takes on a host CPU, in MiB: on x86_64 its translated blocks jump to each other
#: with 32-bit displacements, so qemu silently cuts a larger tb-cache to 2 GiB (`info jit` on a CI cluster node given
#: 4096 showed 2147401728 bytes). Hosts not listed take what is asked.
TCG_TB_CACHE_HOST_CAP_MIB = {"x86_64": 2048}
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def tcg_cache_mib(lab: Lab, machine: str | None = None) -> int:
    """The translation cache an emulated node of ``lab`` gets on this host (``machine``: platform.machine()), in MiB:
    the spec's or TCG_TB_CACHE_MIB, no more than qemu takes on the host's CPU."""
    want = lab.libvirt.tcg_cache_mib or TCG_TB_CACHE_MIB
    cap = TCG_TB_CACHE_HOST_CAP_MIB.get(machine or platform.machine())
    return min(want, cap) if cap else want


def dns_domain(lab: Lab) -> str:
    """The DNS domain of the lab: ``<lab>.internal`` (``.internal`` is reserved for private use)."""
    return f"{lab.name}.internal"


def fqdn(lab: Lab, node: NodeSpec) -> str:
    return f"{node.name}.{dns_domain(lab)}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str | int) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _tostring(root: ET.Element) -> str:
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _owner(parent: ET.Element, lab: Lab, node: NodeSpec | None = None) -> None:
    attrs = {"lab": lab.name}
    if node is not None:
        attrs |= {"node": node.name, "role": node.role}
    ET.SubElement(_sub(parent, "metadata"), OWNER, attrs)


def parse_owner(xml_string: str) -> tuple[str, str | None] | None:
    """(lab name, node name or None) from a network's or domain's XML; None if it carries no owner of ours."""
    try:
        root = ET.fromstring(xml_string)
    except ET.ParseError:
        return None
    owner = root.find(f"metadata/{OWNER}")
    if owner is None or not owner.get("lab"):
        return None
    return owner.get("lab"), owner.get("node")


# ---------------------------------------------------------------------------------------------- network


def network_xml(lab: Lab) -> str | None:
    """The lab's nat/isolated network with MTU, DHCP range and one reservation per node; None in bridge mode."""
    if lab.network.mode == "bridge":
        return None
    net = ET.Element("network")
    _sub(net, "name", lab.network_name)
    _owner(net, lab)
    if lab.network.mode == "nat":
        _sub(_sub(net, "forward", mode="nat"), "nat")
    _sub(net, "bridge", name=lab.bridge_name, stp="on", delay=0)
    _sub(net, "mtu", size=lab.network.mtu)
    _sub(net, "domain", name=dns_domain(lab), localOnly="yes")
    cidr = lab.network.cidr
    ip = _sub(net, "ip", address=str(lab.gateway), netmask=str(cidr.netmask))
    dhcp = _sub(ip, "dhcp")
    first, last = lab.dhcp_range
    _sub(dhcp, "range", start=str(first), end=str(last))
    for node in lab.nodes:
        _sub(dhcp, "host", mac=lab.mac(node), name=node.name, ip=str(node.ip))
    return _tostring(net)


def dhcp_host_xml(mac: str, ip: str, name: str) -> str:
    """One ``<host>`` element, as ``virNetworkUpdate`` wants it."""
    return ET.tostring(ET.Element("host", {"mac": mac.lower(), "name": name, "ip": str(ipaddress.IPv4Address(ip))}),
                       encoding="unicode")


# ---------------------------------------------------------------------------------------------- storage


def pool_xml(lab: Lab) -> str:
    """A directory pool at ``lab.pool_path``; 0711 so other users cannot list the seeds (host keys)."""
    pool = ET.Element("pool", type="dir")
    _sub(pool, "name", lab.pool_name)
    target = _sub(pool, "target")
    _sub(target, "path", lab.pool_path)
    _sub(_sub(target, "permissions"), "mode", "0711")
    return _tostring(pool)


def volume_xml(name: str, capacity_bytes: int, fmt: str = "qcow2",
               backing: str | tuple[str, str] | None = None) -> str:
    """A file volume. ``backing`` (path, or (path, format); qcow2 assumed) makes a copy-on-write overlay.

    Volume files get libvirt's default mode 0600 (a seed holds the node's private host key).
    """
    if fmt not in ("qcow2", "raw"):
        raise ValueError(f"volume format {fmt!r}: use qcow2 or raw")
    if capacity_bytes <= 0:
        raise ValueError(f"volume {name}: capacity must be positive (got {capacity_bytes})")
    vol = ET.Element("volume", type="file")
    _sub(vol, "name", name)
    _sub(vol, "capacity", str(int(capacity_bytes)), unit="bytes")
    _sub(vol, "allocation", "0", unit="bytes")
    _sub(_sub(vol, "target"), "format", type=fmt)
    if backing is not None:
        path, backing_fmt = (backing, "qcow2") if isinstance(backing, str) else backing
        if fmt != "qcow2":
            raise ValueError(f"volume {name}: only a qcow2 volume can have a backing store")
        store = _sub(vol, "backingStore")
        _sub(store, "path", str(path))
        _sub(store, "format", type=backing_fmt)
    return _tostring(vol)


# ---------------------------------------------------------------------------------------------- domain


def _disk(devices: ET.Element, path: str, fmt: str, dev: str, *, readonly: bool = False,
          serial: str | None = None, cache: str = "default") -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    driver = {"name": "qemu", "type": fmt}
    if cache != "default":
        driver["cache"] = cache
    if not readonly:
        driver["discard"] = "unmap"
    _sub(disk, "driver", **driver)
    _sub(disk, "source", file=str(path))
    _sub(disk, "target", dev=dev, bus="virtio")
    if serial:
        _sub(disk, "serial", serial)
    if readonly:
        _sub(disk, "readonly")


def _interface(devices: ET.Element, lab: Lab, node: NodeSpec) -> None:
    if lab.network.mode == "bridge":
        iface = _sub(devices, "interface", type="bridge")
        _sub(iface, "mac", address=lab.mac(node))
        _sub(iface, "source", bridge=lab.bridge_name)
    else:
        iface = _sub(devices, "interface", type="network")
        _sub(iface, "mac", address=lab.mac(node))
        _sub(iface, "source", network=lab.network_name)
    _sub(iface, "model", type="virtio")
    _sub(iface, "mtu", size=lab.network.mtu)  # also tells the guest (virtio host_mtu)


def _cpu(dom: ET.Element, virt_type: str, cpus: int) -> None:
    if virt_type == "kvm":
        cpu = _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="on")
    else:
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", TCG_CPU_MODEL, fallback="forbid")
    _sub(cpu, "topology", sockets=1, dies=1, cores=cpus, threads=1)


def domain_xml(lab: Lab, node: NodeSpec, *, virt_type: str, disk_path: str, seed_path: str, console_log: str,
               kernel: str | None = None, initrd: str | None = None, cmdline: str | None = None,
               bundle_path: str | None = None) -> str:
    """A VirtIO node: disk vda, seed vdb (readonly raw), the offline bundle vdc (readonly raw, serial
    kvmlab-bundle) when the lab side-loads one, virtio net/rng/balloon, serial log, guest agent."""
    if virt_type not in ("kvm", "qemu"):
        raise ValueError(f"virt_type {virt_type!r}: use 'kvm' or 'qemu' (TCG)")
    if kernel is None and (initrd or cmdline):
        raise ValueError("initrd/cmdline given without a kernel: direct kernel boot needs the kernel path")
    dom = ET.Element("domain", type=virt_type)
    _sub(dom, "name", lab.domain_name(node))
    _sub(dom, "title", f"lab {lab.name}: {node.name} ({node.role})")
    _owner(dom, lab, node)
    _sub(dom, "memory", str(node.memory), unit="MiB")
    _sub(dom, "currentMemory", str(node.memory), unit="MiB")
    _sub(dom, "vcpu", str(node.cpus), placement="static")
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    if kernel is not None:
        _sub(os_, "kernel", str(kernel))
        if initrd:
            _sub(os_, "initrd", str(initrd))
        if virt_type == "qemu" and cmdline and "clocksource=" not in cmdline:
            cmdline = f"{cmdline} {TCG_KERNEL_ARGS}"
        if cmdline:
            _sub(os_, "cmdline", cmdline)
    else:
        _sub(os_, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if virt_type == "qemu":
        _sub(_sub(features, "tcg"), "tb-cache", str(tcg_cache_mib(lab)), unit="MiB")
    _cpu(dom, virt_type, node.cpus)
    if virt_type == "qemu" and node.role == "control-plane":
        # Each TCG vCPU is a busy host thread. When the host's cores are fewer than the lab's vCPUs, the control
        # plane gets the larger share: starved, its probes and leases failed and everything restarted (CI cluster).
        _sub(_sub(dom, "cputune"), "shares", str(TCG_CONTROL_PLANE_SHARES))
    clock = _sub(dom, "clock", offset="utc")
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(clock, "timer", name="hpet", present="no")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    _disk(devices, disk_path, "qcow2", "vda", cache=lab.libvirt.disk_cache)
    _disk(devices, seed_path, "raw", "vdb", readonly=True)  # the cloud kernel has no SATA/CD-ROM driver
    if bundle_path is not None:
        _disk(devices, bundle_path, "raw", "vdc", readonly=True, serial=BUNDLE_SERIAL)
    _interface(devices, lab, node)
    _sub(devices, "controller", type="usb", model="none")
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=str(PurePosixPath(console_log)), append="on")
    _sub(serial, "target", port=0)
    _sub(_sub(devices, "console", type="pty"), "target", type="serial", port=0)
    _sub(_sub(devices, "channel", type="unix"), "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    _sub(_sub(devices, "rng", model="virtio"), "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="virtio")
    return _tostring(dom)
