"""The lab spec: typed, strict, frozen models; defaults filled in one place; all problems reported at once.

Load with :func:`load_lab` (a path) or :func:`parse_lab` (a mapping). Both raise
:class:`lab.errors.SpecError` listing every problem with its path (``nodes[1].ip``) and the accepted form.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lab.errors import SpecError

# ---------------------------------------------------------------------------------------------- constants

#: The production tuning set (issue "Lab provisioner"). Values are strings, exactly as sysctl prints them.
PRODUCTION_SYSCTLS: dict[str, str] = {
    "net.netfilter.nf_conntrack_max": "1000000",
    # 86400 LOWERS the kernel default of 432000 (5 days): established flows idle for a day are reclaimed.
    "net.netfilter.nf_conntrack_tcp_timeout_established": "86400",
    "net.core.somaxconn": "32768",
    "net.ipv4.tcp_max_syn_backlog": "8192",
    "net.ipv4.ip_forward": "1",
    "net.ipv4.neigh.default.gc_thresh1": "4096",
    "net.ipv4.neigh.default.gc_thresh2": "8192",
    "net.ipv4.neigh.default.gc_thresh3": "16384",
    "net.bridge.bridge-nf-call-iptables": "1",
}
DEFAULT_MODULES = ("br_netfilter", "overlay", "nf_conntrack")

#: Overlay overhead in bytes over an IPv4 underlay (Cilium pkg/mtu; see DESIGN.md section 4).
OVERLAY_OVERHEAD_IPV4 = {"vxlan": 50, "geneve": 50}
OVERLAY_OVERHEAD_IPV6 = {"vxlan": 70, "geneve": 70}

# Kept in one place so the README, render, validation and the bundle recipe (bundle/recipe.yaml) agree.
# Checked 2026-11-30 against what the Go module proxy serves: k8s.io/kubernetes v1.37.2 (newest 1.37 patch);
# github.com/cilium/cilium v1.20.2 (newest served 1.20 patch; 1.20.4 does not exist); MetalLB v0.16.1 (v0.16.2 is
# served but requires github.com/metallb/frr-k8s v0.0.27, which the proxy refuses, so it cannot be built here).
KUBERNETES_VERSION = "1.37.2"
CILIUM_VERSION = "1.20.2"
METALLB_VERSION = "0.16.1"

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
IFNAME_MAX = 15  # IFNAMSIZ - 1
SYSCTL_NAME = re.compile(r"^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$")
MODULE_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
K8S_VERSION = re.compile(r"^1\.(\d+)\.(\d+)$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")

MIN_RESOURCES = {  # role -> (cpus, memory MiB) when Kubernetes is bootstrapped (kubeadm preflight)
    "control-plane": (2, 2048),
    "worker": (1, 1024),
}
MIN_RESOURCES_NO_K8S = (1, 512)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------- models


class LibvirtSpec(Model):
    uri: str = "qemu:///system"
    pool_path: str | None = Field(default=None, alias="poolPath")
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    #: qemu's cache mode for the nodes' own disks. "default" leaves it to libvirt (writeback with flushes honoured).
    #: "unsafe" ignores the guests' flushes: fastest, and a host crash loses the lab's disks. For disposable CI labs
    #: under TCG, where every etcd fdatasync took 1.4-1.5 s on the CI cluster and starved the API server.
    disk_cache: Literal["default", "none", "writeback", "writethrough", "directsync", "unsafe"] = Field(
        default="default", alias="diskCache")
    #: qemu TCG's translation cache per node, in MiB (libvirt ``<features><tcg><tb-cache>``); emulated nodes only,
    #: ignored under KVM. Unset: lab.virt.xml.TCG_TB_CACHE_MIB. When the cache is full qemu throws away every
    #: translation and retranslates all hot code (docs/bootstrap.md has the CI cluster's figures). qemu on an x86_64
    #: host takes at most 2048 (lab.virt.xml.TCG_TB_CACHE_HOST_CAP_MIB); a larger value is rendered as that.
    tcg_cache_mib: int | None = Field(default=None, alias="tcgCacheMiB", ge=64, le=65536)


class NetworkSpec(Model):
    mode: Literal["nat", "isolated", "bridge"] = "nat"
    cidr: ipaddress.IPv4Network = ipaddress.IPv4Network("192.168.150.0/24")
    mtu: int = 1500
    bridge: str | None = None
    gateway: ipaddress.IPv4Address | None = None
    dhcp_range: str | None = Field(default=None, alias="dhcpRange")
    dns: list[ipaddress.IPv4Address] = Field(default_factory=list)


class LocalQcow2(Model):
    path: str


class LocalKernel(Model):
    kernel: str
    initrd: str
    rootfs: str
    cmdline: str = "root=/dev/vda rw console=ttyS0,115200n8"


ImageRef = Union[str, LocalQcow2, LocalKernel]


class NodeSpec(Model):
    name: str
    role: Literal["control-plane", "worker"]
    cpus: int = 2
    memory: int = Field(default=2048, description="MiB")
    disk: int = Field(default=20, description="GiB")
    ip: ipaddress.IPv4Address | None = None


class TuningSpec(Model):
    sysctls: dict[str, str] = Field(default_factory=lambda: dict(PRODUCTION_SYSCTLS))
    modules: list[str] = Field(default_factory=lambda: list(DEFAULT_MODULES))

    @field_validator("sysctls", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (str(int(v)) if isinstance(v, bool) else str(v)) if isinstance(v, (int, float, str, bool))
                    else v for k, v in value.items()}
        return value


class SshSpec(Model):
    user: str = "lab"


class TimeoutsSpec(Model):
    """Deadlines in seconds for every external wait."""

    boot: int = 300        # domain start -> IP address known
    ssh: int = 300         # IP -> SSH port answers with the pinned host key
    cloud_init: int = Field(default=900, alias="cloudInit")
    command: int = 600     # any single remote command
    kubeadm: int = 900
    join: int = 900
    rollout: int = 900
    webhook: int = 300
    ready: int = 900


class KubernetesSpec(Model):
    enabled: bool = True
    # packages: kubeadm/kubelet/kubectl from pkgs.k8s.io, images pulled (a host with internet);
    # bundle: everything from the offline bundle (`lab bundle build`), imported into containerd, nothing pulled.
    source: Literal["packages", "bundle"] = "packages"
    version: str = KUBERNETES_VERSION
    pod_subnet: ipaddress.IPv4Network = Field(default=ipaddress.IPv4Network("10.244.0.0/16"), alias="podSubnet")
    service_subnet: ipaddress.IPv4Network = Field(default=ipaddress.IPv4Network("10.96.0.0/12"),
                                                  alias="serviceSubnet")


class HubbleSpec(Model):
    relay: bool = True
    ui: bool = True


class CiliumSpec(Model):
    version: str = CILIUM_VERSION
    tunnel_protocol: Literal["vxlan", "geneve"] = Field(default="vxlan", alias="tunnelProtocol")
    mtu: Union[Literal["auto"], int] = "auto"
    kube_proxy_replacement: bool = Field(default=True, alias="kubeProxyReplacement")
    bpf_masquerade: bool = Field(default=True, alias="bpfMasquerade")
    hubble: HubbleSpec = Field(default_factory=HubbleSpec)
    values: dict[str, Any] = Field(default_factory=dict)


class MetallbSpec(Model):
    version: str = METALLB_VERSION
    addresses: list[str] = Field(default_factory=list)
    #: kubeadm labels control planes node.kubernetes.io/exclude-from-external-load-balancers, so MetalLB never
    #: announces from them. True lifts the label (a small lab whose one worker would be the only announcer, with
    #: nowhere to fail over to); False keeps kubeadm's label. `lab up` makes the nodes match either way.
    control_planes_announce: bool = Field(default=False, alias="controlPlanesAnnounce")


class Lab(Model):
    name: str
    libvirt: LibvirtSpec = Field(default_factory=LibvirtSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    image: ImageRef = "ubuntu-24.04"
    nodes: list[NodeSpec]
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    ssh: SshSpec = Field(default_factory=SshSpec)
    timeouts: TimeoutsSpec = Field(default_factory=TimeoutsSpec)
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)
    cilium: CiliumSpec = Field(default_factory=CiliumSpec)
    metallb: MetallbSpec = Field(default_factory=MetallbSpec)

    # ---- derived facts, one place for every consumer

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.gateway or next(self.network.cidr.hosts())

    @property
    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        if self.network.dhcp_range:
            return parse_range(self.network.dhcp_range)
        return default_dhcp_range(self.network.cidr)

    @property
    def bridge_name(self) -> str:
        return self.network.bridge or f"lab-{self.name}"

    @property
    def network_name(self) -> str:
        return f"lab-{self.name}"

    @property
    def pool_name(self) -> str:
        return f"lab-{self.name}"

    @property
    def pool_path(self) -> str:
        return self.libvirt.pool_path or f"/var/lib/libvirt/images/lab-{self.name}"

    def domain_name(self, node: NodeSpec | str) -> str:
        return f"{self.name}-{node if isinstance(node, str) else node.name}"

    def mac(self, node: NodeSpec | str) -> str:
        """A deterministic, locally administered MAC in qemu's 52:54:00 prefix, from lab and node name."""
        node_name = node if isinstance(node, str) else node.name
        digest = hashlib.sha256(f"{self.name}/{node_name}".encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def control_planes(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role == "control-plane"]

    @property
    def workers(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role == "worker"]

    @property
    def overlay_overhead(self) -> int:
        return OVERLAY_OVERHEAD_IPV4[self.cilium.tunnel_protocol]

    @property
    def pod_mtu(self) -> int:
        """The MTU Cilium is given: explicit, or the network MTU minus the overlay overhead."""
        if self.cilium.mtu == "auto":
            return self.network.mtu - self.overlay_overhead
        return int(self.cilium.mtu)


# ---------------------------------------------------------------------------------------------- helpers


def default_dhcp_range(cidr: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The third quarter of the network (.128-.191 in a /24): node IPs sit below, pools above."""
    size = cidr.num_addresses
    base = int(cidr.network_address)
    return ipaddress.IPv4Address(base + size // 2), ipaddress.IPv4Address(base + size * 3 // 4 - 1)


def parse_range(text: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """``a.b.c.d-e.f.g.h`` -> (first, last). Raises ValueError with the accepted form."""
    parts = [p.strip() for p in str(text).split("-")]
    if len(parts) != 2:
        raise ValueError(f"{text!r} is not a range; use FIRST-LAST, e.g. 192.168.150.128-192.168.150.191")
    first, last = (ipaddress.IPv4Address(p) for p in parts)
    if int(last) < int(first):
        raise ValueError(f"range {text!r} ends before it starts")
    return first, last


def pool_ranges(entry: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """A MetalLB address entry (CIDR or FIRST-LAST) as (first, last)."""
    if "/" in entry:
        net = ipaddress.IPv4Network(entry, strict=True)
        return net.network_address, net.broadcast_address
    return parse_range(entry)


def _overlaps(a: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address],
              b: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]) -> bool:
    return int(a[0]) <= int(b[1]) and int(b[0]) <= int(a[1])


def _inside(ip: ipaddress.IPv4Address, rng: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]) -> bool:
    return int(rng[0]) <= int(ip) <= int(rng[1])


# ---------------------------------------------------------------------------------------------- defaults


def fill_defaults(lab: Lab) -> Lab:
    """Assign node IPs that were left out: the lowest free addresses from gateway+9 upward, below DHCP."""
    taken = {n.ip for n in lab.nodes if n.ip is not None} | {lab.gateway}
    try:
        dhcp = lab.dhcp_range
    except ValueError:
        return lab  # reported by validate()
    candidate = int(lab.gateway) + 9
    nodes = []
    for node in lab.nodes:
        if node.ip is None:
            while ipaddress.IPv4Address(candidate) in taken or _inside(ipaddress.IPv4Address(candidate), dhcp):
                candidate += 1
            ip = ipaddress.IPv4Address(candidate)
            taken.add(ip)
            node = node.model_copy(update={"ip": ip})
        nodes.append(node)
    metallb = lab.metallb
    if lab.kubernetes.enabled and not metallb.addresses:
        cidr = lab.network.cidr
        base = int(cidr.network_address) + cidr.num_addresses * 3 // 4
        first, last = ipaddress.IPv4Address(base + 8), ipaddress.IPv4Address(base + 8 + 15)
        if last in cidr:
            metallb = metallb.model_copy(update={"addresses": [f"{first}-{last}"]})
    return lab.model_copy(update={"nodes": nodes, "metallb": metallb})


# ---------------------------------------------------------------------------------------------- validation


def validate(lab: Lab) -> list[tuple[str, str]]:
    """Cross-field checks. Returns every problem as (path, message naming the accepted form)."""
    problems: list[tuple[str, str]] = []
    add = lambda path, msg: problems.append((path, msg))  # noqa: E731
    net = lab.network
    cidr = net.cidr

    if not DNS_LABEL.match(lab.name):
        add("name", f"{lab.name!r} is not a DNS label; use lowercase letters, digits and '-', at most 63 characters")
    if lab.network_name and len(lab.bridge_name) > IFNAME_MAX:
        add("network.bridge", f"bridge name {lab.bridge_name!r} is longer than {IFNAME_MAX} characters (the kernel's "
                              f"limit); set network.bridge to a shorter name or shorten name")
    if net.mode == "bridge" and not net.bridge:
        add("network.bridge", "mode 'bridge' attaches to an existing host bridge: name it, e.g. bridge: br0")
    if not 1280 <= net.mtu <= 9216:
        add("network.mtu", f"{net.mtu} is out of range; use 1280..9216 (1500 for a standard Ethernet)")
    if cidr.prefixlen > 28:
        add("network.cidr", f"{cidr} is too small for a lab; use a /28 or larger, e.g. 192.168.150.0/24")
    gateway = lab.gateway
    if gateway not in cidr or gateway in (cidr.network_address, cidr.broadcast_address):
        add("network.gateway", f"{gateway} is not a host address of network.cidr {cidr}")
    dhcp = None
    try:
        dhcp = lab.dhcp_range
        if dhcp[0] not in cidr or dhcp[1] not in cidr:
            add("network.dhcpRange", f"{net.dhcp_range} is not inside network.cidr {cidr}")
            dhcp = None
        elif _inside(gateway, dhcp):
            add("network.dhcpRange", f"{net.dhcp_range} contains the gateway {gateway}")
    except ValueError as exc:
        add("network.dhcpRange", str(exc))

    _validate_nodes(lab, dhcp, add)
    _validate_tuning(lab, add)
    if not DNS_LABEL.match(lab.ssh.user) or lab.ssh.user == "root":
        add("ssh.user", f"{lab.ssh.user!r}: use an ordinary login name (lowercase, not root), e.g. lab")
    for field, value in lab.timeouts.model_dump(by_alias=True).items():
        if value <= 0:
            add(f"timeouts.{field}", f"{value} must be a positive number of seconds")
    if lab.kubernetes.enabled:
        _validate_cluster(lab, dhcp, add)
    return problems


def _validate_nodes(lab: Lab, dhcp, add) -> None:
    cidr, gateway = lab.network.cidr, lab.gateway
    if not lab.nodes:
        add("nodes", "at least one node is required (one with role: control-plane)")
    elif not lab.control_planes:
        add("nodes", "no node has role: control-plane; make one of them the control plane")
    seen_names: dict[str, int] = {}
    seen_ips: dict[ipaddress.IPv4Address, int] = {}
    for i, node in enumerate(lab.nodes):
        path = f"nodes[{i}]"
        if not DNS_LABEL.match(node.name):
            add(f"{path}.name", f"{node.name!r} is not a DNS label; use lowercase letters, digits and '-'")
        if node.name in seen_names:
            add(f"{path}.name", f"{node.name!r} is already used by nodes[{seen_names[node.name]}]; names must be unique")
        seen_names.setdefault(node.name, i)
        if lab.kubernetes.enabled:
            min_cpus, min_mem = MIN_RESOURCES[node.role]
            why = f"a Kubernetes {node.role} node"
        else:
            (min_cpus, min_mem), why = MIN_RESOURCES_NO_K8S, "a node"
        if node.cpus < min_cpus:
            add(f"{path}.cpus", f"{node.cpus} is too few for {why}; use at least {min_cpus}")
        if node.memory < min_mem:
            add(f"{path}.memory", f"{node.memory} MiB is too little for {why}; use at least {min_mem}")
        if node.disk < 4:
            add(f"{path}.disk", f"{node.disk} GiB is too small; use at least 4 (GiB)")
        if node.ip is None:
            continue
        if node.ip not in cidr or node.ip in (cidr.network_address, cidr.broadcast_address):
            add(f"{path}.ip", f"{node.ip} is not a host address of network.cidr {cidr}; pick one inside it or omit ip")
        elif node.ip == gateway:
            add(f"{path}.ip", f"{node.ip} is the gateway; pick another address or omit ip")
        elif dhcp and _inside(node.ip, dhcp):
            add(f"{path}.ip", f"{node.ip} is inside the DHCP range {dhcp[0]}-{dhcp[1]}; pick one outside it or omit ip")
        if node.ip in seen_ips:
            add(f"{path}.ip", f"{node.ip} is already used by nodes[{seen_ips[node.ip]}]; node IPs must be unique")
        seen_ips.setdefault(node.ip, i)


def _validate_tuning(lab: Lab, add) -> None:
    for name, value in lab.tuning.sysctls.items():
        if not SYSCTL_NAME.match(name):
            add(f"tuning.sysctls.{name}", "not a sysctl name; use the dotted form, e.g. net.core.somaxconn")
        if not value.strip() or "\n" in value:
            add(f"tuning.sysctls.{name}", f"{value!r} is not a sysctl value; use a number or a single-line string")
    for i, module in enumerate(lab.tuning.modules):
        if not MODULE_NAME.match(module):
            add(f"tuning.modules[{i}]", f"{module!r} is not a kernel module name, e.g. br_netfilter")


CONNTRACK_SYSCTL = "net.netfilter.nf_conntrack_max"


def bpf_map_sizes(lab: Lab) -> dict[str, int]:
    """The lab's conntrack budget (tuning ``nf_conntrack_max``) for the tables the datapath really uses.

    With kube-proxy replacement, Service and pod flows are tracked in Cilium's BPF CT maps, not in nf_conntrack,
    and with BPF masquerading their translations live in its NAT map. Left alone, Cilium sizes them from memory
    (bpf-map-dynamic-size-ratio): 131072 entries on the CI cluster's 4 GiB nodes, which the conformance conntrack
    check failed against its 200000 peak while nf_conntrack_max said 1000000. Non-TCP flows get half."""
    raw = lab.tuning.sysctls.get(CONNTRACK_SYSCTL)
    if not lab.cilium.kube_proxy_replacement or raw is None or not str(raw).isdigit():
        return {}
    entries = int(raw)
    sizes = {"ctTcpMax": entries, "ctAnyMax": max(entries // 2, 65536)}
    if lab.cilium.bpf_masquerade:
        sizes["natMax"] = entries
    return sizes


BPF_MAP_KEYS = ("ctTcpMax", "ctAnyMax", "natMax")


def _validate_bpf_map_sizes(lab: Lab, add) -> None:
    """Cilium refuses to start when its NAT map is larger than its two CT maps together ("invalid daemon
    configuration: specified NAT tables size 1000000 must not exceed maximum CT table size 24576", seen on the CI
    cluster: both agents crash-looped). The sizes are the lab's (from nf_conntrack_max) with cilium.values over them."""
    user = lab.cilium.values.get("bpf")
    user = {k: v for k, v in user.items() if k in BPF_MAP_KEYS} if isinstance(user, dict) else {}
    sizes = {**bpf_map_sizes(lab), **user}
    try:
        nat, tcp, other = (int(sizes[k]) for k in ("natMax", "ctTcpMax", "ctAnyMax"))
    except (KeyError, TypeError, ValueError):
        return  # a size left to Cilium (memory-based): nothing to compare; the chart's schema checks the types

    def origin(key: str) -> str:
        return "cilium.values" if key in user else "the lab's, from tuning.sysctls net.netfilter.nf_conntrack_max"

    if nat > tcp + other:
        add("cilium.values.bpf.natMax", f"{nat} ({origin('natMax')}) exceeds bpf.ctTcpMax {tcp} ({origin('ctTcpMax')})"
                                        f" + bpf.ctAnyMax {other} ({origin('ctAnyMax')}) = {tcp + other}: the Cilium "
                                        "agent refuses to start with a NAT map larger than its CT maps. Set "
                                        f"cilium.values.bpf.natMax to at most {tcp + other}, or raise the CT sizes")


def _validate_cluster(lab: Lab, dhcp, add) -> None:
    k8s, cil, mlb = lab.kubernetes, lab.cilium, lab.metallb
    cidr = lab.network.cidr
    if not K8S_VERSION.match(k8s.version):
        add("kubernetes.version", f"{k8s.version!r}: use an exact release such as {KUBERNETES_VERSION} (kubeadm "
                                  "needs kubernetesVersion, or it asks dl.k8s.io for stable-1)")
    for path, subnet in (("kubernetes.podSubnet", k8s.pod_subnet), ("kubernetes.serviceSubnet", k8s.service_subnet)):
        if subnet.overlaps(cidr):
            add(path, f"{subnet} overlaps the lab network {cidr}; pick a disjoint range")
    if k8s.pod_subnet.overlaps(k8s.service_subnet):
        add("kubernetes.serviceSubnet", f"{k8s.service_subnet} overlaps kubernetes.podSubnet {k8s.pod_subnet}; "
                                        "pick disjoint ranges, e.g. 10.244.0.0/16 and 10.96.0.0/12")
    if not SEMVER.match(cil.version):
        add("cilium.version", f"{cil.version!r}: use an exact chart version such as {CILIUM_VERSION}")
    if not SEMVER.match(mlb.version.lstrip("v")):
        add("metallb.version", f"{mlb.version!r}: use an exact release such as {METALLB_VERSION}")
    overhead = lab.overlay_overhead
    limit = lab.network.mtu - overhead
    if cil.mtu != "auto":
        if int(cil.mtu) > limit:
            add("cilium.mtu", f"{cil.mtu} is too large: network.mtu {lab.network.mtu} - {overhead} bytes of "
                              f"{cil.tunnel_protocol.upper()} overhead (outer IPv4 20 + UDP 8 + {cil.tunnel_protocol} "
                              f"header 8 + inner Ethernet 14) = {limit}; a larger pod MTU makes "
                              f"{int(cil.mtu) + overhead}-byte outer packets that fragment or vanish. Use {limit} or "
                              "'auto'" + (" (1460 is the TCP MSS of a 1500 MTU, not a Geneve MTU)"
                                          if int(cil.mtu) == 1460 else ""))
        elif int(cil.mtu) < 1280:
            add("cilium.mtu", f"{cil.mtu} is below the IPv6 minimum of 1280; use 'auto' ({limit})")
    _validate_bpf_map_sizes(lab, add)
    if k8s.source == "bundle":
        _validate_bundle_versions(lab, add)
    if not mlb.addresses:
        add("metallb.addresses", "no address pool; give one or more CIDRs or FIRST-LAST ranges inside network.cidr")
    node_ips = {n.ip for n in lab.nodes if n.ip is not None}
    seen: list[tuple[int, tuple]] = []
    for i, entry in enumerate(mlb.addresses):
        path = f"metallb.addresses[{i}]"
        try:
            rng = pool_ranges(entry)
        except ValueError as exc:
            add(path, f"{exc}; use a CIDR (192.168.150.224/28) or FIRST-LAST range")
            continue
        if rng[0] not in cidr or rng[1] not in cidr:
            add(path, f"{entry} is not inside network.cidr {cidr}; LoadBalancer IPs must be on the lab's L2")
            continue
        if _inside(lab.gateway, rng):
            add(path, f"{entry} contains the gateway {lab.gateway}")
        if dhcp and _overlaps(rng, dhcp):
            add(path, f"{entry} overlaps the DHCP range {dhcp[0]}-{dhcp[1]}")
        clash = sorted(str(ip) for ip in node_ips if _inside(ip, rng))
        if clash:
            add(path, f"{entry} contains node IP(s) {', '.join(clash)}")
        for j, other in seen:
            if _overlaps(rng, other):
                add(path, f"{entry} overlaps metallb.addresses[{j}]")
        seen.append((i, rng))


def _validate_bundle_versions(lab: Lab, add) -> None:
    """With ``kubernetes.source: bundle`` the versions are the bundle's: anything else would need a download."""
    from lab.bundle.recipe import load_recipe

    recipe = load_recipe()
    have = {"kubernetes.version": recipe.kubernetes, "cilium.version": recipe.builds["cilium"].version,
            "metallb.version": recipe.builds["metallb"].version}
    want = {"kubernetes.version": lab.kubernetes.version, "cilium.version": lab.cilium.version,
            "metallb.version": lab.metallb.version}
    for path, version in have.items():
        if want[path].lstrip("v") != version.lstrip("v"):
            add(path, f"{want[path]!r}: the offline bundle (bundle/recipe.yaml) carries {version.lstrip('v')}; use "
                      f"that, or kubernetes.source: packages on a host with internet")
    if lab.cilium.hubble.ui:
        add("cilium.hubble.ui", "the offline bundle has no Hubble UI images; set cilium.hubble.ui: false, or "
                                "kubernetes.source: packages on a host with internet")


# ---------------------------------------------------------------------------------------------- loading


def _loc_to_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "LocalQcow2", "LocalKernel", "int", "literal['auto']",
                      "function-after[_stringify(), dict[str,str]]"):
            continue  # union branch names: not part of the user's path
        else:
            out += ("." if out else "") + str(part)
    return out


def _accepted_keys(loc: tuple) -> list[str]:
    model: Any = Lab
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if n == part or f.alias == part), None)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if inner and not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            ann = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(f.alias or n for n, f in model.model_fields.items())


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    seen = set()
    for e in err.errors():
        loc = e["loc"]
        path = _loc_to_path(loc)
        if e["type"] == "extra_forbidden":
            keys = _accepted_keys(loc)
            msg = "unknown key" + (f"; accepted keys here: {', '.join(keys)}" if keys else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        if (path, msg) not in seen:
            seen.add((path, msg))
            problems.append((path, msg))
    return problems


def parse_lab(data: Any, source: str = "lab spec") -> Lab:
    """Mapping -> validated, defaults-filled Lab. Raises SpecError with every problem."""
    if not isinstance(data, dict):
        raise SpecError([("", f"the spec must be a mapping at the top level (got {type(data).__name__})")], source)
    try:
        lab = Lab.model_validate(data)
    except ValidationError as err:
        raise SpecError(_pydantic_problems(err), source) from None
    lab = fill_defaults(lab)
    problems = validate(lab)
    if problems:
        raise SpecError(problems, source)
    return lab


def load_lab(path: str | Path) -> Lab:
    """Read a YAML spec file and return the validated Lab."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([("", f"cannot read {path}: {exc.strerror}; pass an existing spec with -c, "
                              "e.g. -c labs/default.yaml")], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"not valid YAML: {exc}")], str(path)) from None
    return parse_lab(data, str(path))
