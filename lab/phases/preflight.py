"""Preflight: is this host fit for the lab, before anything is created? Each failure names the fix.

Checks (each a function returning a Problem or None, with its facts injectable for tests):
libvirtd reachable, KVM usable (a failure only when ``libvirt.accel: kvm``; ``auto`` falls back to TCG with a warning),
a QEMU that runs multi-vCPU TCG guests safely (8.1 or newer; check_tcg_smp),
free memory and disk for the spec, the lab CIDR not already routed, the host bridge present (bridge mode), and no
netfilter forward chain with policy drop that would drop the lab bridge's traffic (Docker's iptables FORWARD DROP,
an nftables ``forward`` chain with ``policy drop``). ``check_host(ctx)`` runs them all; ``lab up`` refuses on any
problem, listing every one with its fix.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lab.errors import LabError, VirtError
from lab.phase import Context, Phase
from lab.virt.xml import parse_owner, tcg_cache_mib

GIB = 1024 ** 3


@dataclass(frozen=True)
class Problem:
    check: str
    message: str
    fix: str


def local_qemu(uri: str) -> bool:
    """VMs will run on THIS machine (a local qemu URI), so its memory, disk and firewall matter. Unlike
    lab.virt.accel.is_local_uri, libvirt's in-process test:///default driver does not count: it runs nothing."""
    return uri.startswith(("qemu:///", "qemu+unix:///"))


def _run(argv: list[str]) -> str:
    """stdout of a host command, or "" when the tool is missing or fails (a fact we cannot read is no problem)."""
    if not shutil.which(argv[0]):
        return ""
    proc = subprocess.run(argv, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


# ---------------------------------------------------------------------------------------------- libvirt, KVM


def check_libvirt(ctx: Context, connect: Callable[[], object] | None = None) -> Problem | None:
    """libvirtd answers on the spec's URI (the connection is kept in the Context for the other checks)."""
    try:
        (connect or (lambda: ctx.hv))()
    except VirtError as exc:
        fix = exc.hint or f"check `virsh -c {ctx.lab.libvirt.uri} version`"
        if "ermission denied" in exc.message:
            fix = ("run as root, or add this user to group libvirt (`sudo usermod -aG libvirt $USER`, then log in "
                   f"again); then check `virsh -c {ctx.lab.libvirt.uri} version`")
        return Problem("libvirt", f"libvirtd is not reachable: {exc.message}", fix)
    return None


def check_accel(ctx: Context, detect: Callable[[str], tuple[str, str | None]] | None = None) -> Problem | None:
    """KVM or TCG; sets ``ctx.virt_type``. With ``libvirt.accel: kvm`` an unusable KVM is a problem."""
    try:
        virt_type, warning = (detect or ctx.hv.detect_accel)(ctx.lab.libvirt.accel)
    except VirtError as exc:
        return Problem("kvm", exc.message, exc.hint or "set libvirt.accel: auto to fall back to TCG")
    if warning:
        ctx.log.warn(warning)
    ctx.virt_type = virt_type
    return None


#: The first QEMU whose multi-threaded TCG locks a guest page before translating it (commit deba78709ae8 "Always
#: lock pages before translation", QEMU 8.1.0; Red Hat bug 2216496). Before it a vCPU could keep running a stale
#: translation of kernel text another vCPU had just patched: an int3 that text_poke left at a static key. On the CI
#: cluster under QEMU 7.2 the 2-vCPU control plane livelocked in exc_int3 at hrtimer_start_range_ns while Cilium
#: loaded its datapath, and stopped answering ARP. One vCPU per guest cannot race.
TCG_SMP_SAFE_QEMU = (8, 1, 0)


def check_tcg_smp(ctx: Context, version: Callable[[], tuple[int, int, int] | None] | None = None) -> Problem | None:
    """TCG guests with more than one vCPU need QEMU 8.1 or newer (TCG_SMP_SAFE_QEMU)."""
    smp = [f"{n.name} ({n.cpus})" for n in ctx.lab.nodes if n.cpus > 1]
    if ctx.virt_type != "qemu" or not smp:
        return None
    found = (version or ctx.hv.qemu_version)()
    if found is None or found >= TCG_SMP_SAFE_QEMU:
        return None
    have, need = ".".join(map(str, found)), ".".join(map(str, TCG_SMP_SAFE_QEMU))
    return Problem("qemu", f"QEMU {have} runs these TCG (no KVM) guests with more than one vCPU: nodes[].cpus of "
                   f"{', '.join(smp)}. Before QEMU {need} multi-threaded TCG can run a stale translation of kernel "
                   "code the guest has just patched; the guest then hangs (seen here under QEMU 7.2 when Cilium "
                   "loaded its datapath; QEMU commit deba78709ae8)",
                   f"install QEMU {need} or newer (Debian 12: `apt-get install -t bookworm-backports "
                   "qemu-system-x86 libvirt-daemon-system`, as `make sysdeps` does), or set cpus: 1 on every node")


# ---------------------------------------------------------------------------------------------- memory, disk


def meminfo_available_mib(path: str = "/proc/meminfo") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def check_memory(ctx: Context, available_mib: Callable[[], int] = meminfo_available_mib,
                 running: set[str] | None = None) -> Problem | None:
    running = set(_existing_domains(ctx)) if running is None else running
    starting = [n for n in ctx.lab.nodes if ctx.lab.domain_name(n) not in running]
    need = sum(n.memory for n in starting)
    # an emulated node's translation cache is host memory too, and a busy node fills it
    cache = tcg_cache_mib(ctx.lab) * len(starting) if ctx.virt_type == "qemu" else 0
    have = available_mib()
    if need and have < need + cache + 512:
        cached = f" plus {cache} MiB of TCG translation cache" if cache else ""
        return Problem("memory", f"the nodes still to start need {need} MiB{cached}; the host has {have} MiB "
                                 f"available (512 MiB kept for the host)",
                       "lower nodes[].memory" + (" or libvirt.tcgCacheMiB" if cache else "") + ", or stop other VMs")
    return None


def check_disk(ctx: Context, free_bytes: Callable[[str], int] | None = None) -> Problem | None:
    path = Path(ctx.lab.pool_path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    free = (free_bytes or (lambda p: shutil.disk_usage(p).free))(str(probe))
    # overlays are thin: budget the base image (a few GiB) plus 2 GiB per node of early growth
    need = (4 + 2 * len(ctx.lab.nodes)) * GIB
    if free < need:
        return Problem("disk", f"{probe} has {free / GIB:.1f} GiB free; the lab needs about {need / GIB:.0f} GiB",
                       f"free space under {probe} or set libvirt.poolPath to a larger filesystem")
    return None


# ---------------------------------------------------------------------------------------------- network


def routes_covering(cidr: ipaddress.IPv4Network, ip_route_output: str) -> list[str]:
    """Routes in ``ip -4 route`` output whose destination overlaps ``cidr`` (default route excluded)."""
    found = []
    for line in ip_route_output.splitlines():
        dest = line.split()[0] if line.strip() else ""
        if dest in ("", "default"):
            continue
        try:
            net = ipaddress.IPv4Network(dest if "/" in dest else f"{dest}/32", strict=False)
        except ValueError:
            continue
        if net.overlaps(cidr):
            found.append(line.strip())
    return found


def check_cidr_free(ctx: Context, ip_route: Callable[[], str] | None = None) -> Problem | None:
    if ctx.lab.network.mode == "bridge" or ctx.hv.network(ctx.lab.network_name) is not None:
        return None  # a bridge lab lives on an existing network; our own network's route is expected
    output = (ip_route or (lambda: _run(["ip", "-4", "route"])))()
    clash = routes_covering(ctx.lab.network.cidr, output)
    if clash:
        return Problem("network", f"network.cidr {ctx.lab.network.cidr} is already routed on this host: "
                                  f"{'; '.join(clash)}", "pick another network.cidr, or remove the other network")
    return None


def sysfs_bridge(name: str, root: str = "/sys/class/net") -> str:
    """'bridge', 'other' (an interface that is not a bridge) or 'missing'."""
    path = Path(root) / name
    if not path.exists():
        return "missing"
    return "bridge" if (path / "bridge").is_dir() else "other"


def check_bridge(ctx: Context, bridge_kind: Callable[[str], str | None] | None = None) -> Problem | None:
    """Bridge mode attaches to an existing host bridge: it must exist (libvirt fails late and vaguely otherwise)."""
    if ctx.lab.network.mode != "bridge":
        return None
    bridge = ctx.lab.bridge_name
    if bridge_kind is None:
        if local_qemu(ctx.lab.libvirt.uri):
            bridge_kind = sysfs_bridge
        else:
            bridge_kind = lambda name: {True: "bridge", False: "missing"}.get(ctx.hv.host_interface(name))  # noqa
    kind = bridge_kind(bridge)
    if kind == "missing":
        return Problem("bridge", f"network.mode is bridge but the host has no interface {bridge}",
                       f"create the bridge (e.g. `ip link add {bridge} type bridge && ip link set {bridge} up`, and "
                       "attach the uplink; make it persistent with your network configuration) or set "
                       "network.bridge to an existing bridge")
    if kind == "other":
        return Problem("bridge", f"network.mode is bridge but host interface {bridge} is not a bridge",
                       "set network.bridge to a Linux bridge (`ip -d link show type bridge` lists them)")
    return None


# ---------------------------------------------------------------------------------------------- firewall


@dataclass(frozen=True)
class ForwardChain:
    """A netfilter base chain on the forward hook, its policy, and the interfaces its accept rules name."""

    family: str          # ip, ip6, inet, bridge
    table: str
    name: str
    policy: str          # accept | drop
    accept_in: frozenset[str] = field(default_factory=frozenset)
    accept_out: frozenset[str] = field(default_factory=frozenset)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.family, self.table, self.name

    @property
    def is_iptables(self) -> bool:
        return (self.family, self.table, self.name) == ("ip", "filter", "FORWARD")


def iptables_forward_chain(iptables_save: str) -> ForwardChain | None:
    """The filter table's FORWARD chain from ``iptables-save -t filter``, following jumps to user chains."""
    policy, rules = None, {}
    for line in iptables_save.splitlines():
        if line.startswith(":FORWARD "):
            policy = line.split()[1].lower()
        elif line.startswith("-A "):
            chain, _, rest = line[3:].partition(" ")
            rules.setdefault(chain, []).append(" " + rest + " ")
    if policy is None:
        return None
    ins, outs, seen, todo = set(), set(), set(), ["FORWARD"]
    while todo:
        chain = todo.pop()
        seen.add(chain)
        for rule in rules.get(chain, []):
            target = re.search(r" -j (\S+)", rule)
            if not target:
                continue
            if target.group(1) == "ACCEPT":
                ins.update(re.findall(r" -i (\S+)", rule))
                outs.update(re.findall(r" -o (\S+)", rule))
            elif target.group(1) in rules and target.group(1) not in seen:
                todo.append(target.group(1))
    return ForwardChain("ip", "filter", "FORWARD", policy, frozenset(ins), frozenset(outs))


def nft_forward_chains(nft_json: str) -> list[ForwardChain]:
    """Base chains on the forward hook from ``nft -j list ruleset``, with the interfaces their accepts name
    (following jumps and gotos within the table)."""
    try:
        items = json.loads(nft_json).get("nftables", []) if nft_json.strip() else []
    except ValueError:
        return []
    bases, rules = [], {}
    for item in items:
        if "chain" in item and item["chain"].get("hook") == "forward":
            bases.append(item["chain"])
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r.get("expr", []))
    chains = []
    for base in bases:
        fam, table = base["family"], base["table"]
        ins, outs, seen, todo = set(), set(), set(), [base["name"]]
        while todo:
            name = todo.pop()
            seen.add(name)
            for expr in rules.get((fam, table, name), []):
                _nft_rule(expr, ins, outs, lambda t: todo.append(t) if t not in seen else None)
        chains.append(ForwardChain(fam, table, base["name"], base.get("policy", "accept"),
                                   frozenset(ins), frozenset(outs)))
    return chains


def _nft_rule(expr: list[dict], ins: set, outs: set, follow: Callable[[str], None]) -> None:
    names = {"iifname": set(), "oifname": set()}
    for e in expr:
        m = e.get("match") if isinstance(e, dict) else None
        if m and m.get("op") in ("==", "in") and isinstance(m.get("left"), dict) and "meta" in m["left"]:
            key = m["left"]["meta"].get("key")
            if key in names:
                right = m["right"]
                values = right.get("set", []) if isinstance(right, dict) else right
                names[key].update(values if isinstance(values, list) else [values])
        for jump in ("jump", "goto"):
            if isinstance(e, dict) and jump in e:
                follow(e[jump]["target"])
    if any(isinstance(e, dict) and "accept" in e for e in expr):
        ins.update(v for v in names["iifname"] if isinstance(v, str))
        outs.update(v for v in names["oifname"] if isinstance(v, str))


def libvirt_firewall_backend(network_conf: str, lib_version: int) -> str:
    """'iptables' or 'nftables': /etc/libvirt/network.conf's firewall_backend, else the build default
    (nftables from libvirt 10.4 on, iptables before)."""
    found = re.search(r'^\s*firewall_backend\s*=\s*"(\w+)"', network_conf, re.M)
    if found:
        return found.group(1)
    return "nftables" if lib_version >= 10_004_000 else "iptables"


@dataclass(frozen=True)
class FirewallFacts:
    chains: list[ForwardChain]
    bridge_nf_call_iptables: bool   # br_netfilter passes bridged frames through the ip forward hook
    libvirt_backend: str            # iptables | nftables


def forward_blockers(mode: str, bridge: str, facts: FirewallFacts) -> list[ForwardChain]:
    """Forward chains with policy drop that would drop the lab bridge's traffic.

    nat: routed traffic (guest -> out: in=bridge, replies: out=bridge) always crosses the ip forward hook; libvirt's
    iptables backend inserts its accepts into iptables' FORWARD, so only that chain is safe with that backend (its
    nftables backend uses a table of its own, and a drop in ANY base chain drops the packet: Docker + libvirt >= 10).
    bridge and isolated: traffic stays on the bridge, and crosses the ip forward hook only when
    net.bridge.bridge-nf-call-iptables is 1 (br_netfilter, which Docker loads); the bridge family always sees it.
    """
    blockers = []
    for chain in facts.chains:
        if chain.policy != "drop" or chain.family == "ip6":
            continue
        if chain.family == "bridge":
            needs_out = False
        elif mode == "nat":
            if chain.is_iptables and facts.libvirt_backend == "iptables":
                continue
            needs_out = True
        elif facts.bridge_nf_call_iptables:
            needs_out = False
        else:
            continue
        accepted_in, accepted_out = bridge in chain.accept_in, bridge in chain.accept_out
        if needs_out and not (accepted_in and accepted_out) or not needs_out and not (accepted_in or accepted_out):
            blockers.append(chain)
    return blockers


def firewall_facts(ctx: Context) -> FirewallFacts:
    chains = {c.key: c for c in nft_forward_chains(_run(["nft", "-j", "list", "ruleset"]))}
    legacy = iptables_forward_chain(_run(["iptables-save", "-t", "filter"]))
    if legacy is not None:  # iptables-nft shows the same chain in nft's ruleset: merge what each parser saw
        same = chains.get(legacy.key)
        if same is not None:
            legacy = ForwardChain(*legacy.key, legacy.policy, legacy.accept_in | same.accept_in,
                                  legacy.accept_out | same.accept_out)
        chains[legacy.key] = legacy
    nf_path = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    conf = Path("/etc/libvirt/network.conf")
    try:
        version = ctx.hv.conn.getLibVersion()
    except Exception:  # an unanswered version is the older, iptables, default
        version = 0
    return FirewallFacts(list(chains.values()), nf_path.exists() and nf_path.read_text().strip() == "1",
                         libvirt_firewall_backend(conf.read_text() if conf.exists() else "", version))


def check_forward(ctx: Context, facts: Callable[[], FirewallFacts] | None = None) -> Problem | None:
    """Docker sets iptables FORWARD to DROP (and loads br_netfilter): a lab's DHCP and traffic die silently."""
    found = (facts or (lambda: firewall_facts(ctx)))()
    mode, bridge = ctx.lab.network.mode, ctx.lab.bridge_name
    blockers = forward_blockers(mode, bridge, found)
    if not blockers:
        return None
    where, fixes = [], []
    for chain in blockers:
        if chain.is_iptables:
            where.append("iptables FORWARD policy is DROP (Docker sets this)")
            fixes.append(f"iptables -I FORWARD -i {bridge} -o {bridge} -j ACCEPT" if mode != "nat" else
                         f"iptables -I FORWARD -i {bridge} -j ACCEPT && iptables -I FORWARD -o {bridge} -j ACCEPT")
        else:
            ref = f"{chain.family} {chain.table} {chain.name}"
            where.append(f"nftables chain {ref} (hook forward) has policy drop")
            fixes.append(f"nft insert rule {ref} iifname {bridge} accept && "
                         f"nft insert rule {ref} oifname {bridge} accept")
    if mode == "nat" and found.libvirt_backend == "nftables" and any(c.is_iptables for c in blockers):
        fixes.append('or set firewall_backend = "iptables" in /etc/libvirt/network.conf and restart libvirtd')
    elif mode != "nat" and found.bridge_nf_call_iptables:
        fixes.append("or sysctl net.bridge.bridge-nf-call-iptables=0 on the hypervisor host")
    return Problem("firewall", f"{'; '.join(where)} with no accept for the lab bridge {bridge}: guests would get "
                               "no DHCP or traffic", "; ".join(fixes))


# ---------------------------------------------------------------------------------------------- the phase


def check_names_free(ctx: Context) -> Problem | None:
    """Our domain and network names must be free or already ours. Names can collide across labs (lab `a` with
    node `b-cp1` and lab `a-b` with node `cp1` both make domain `a-b-cp1`), and a hand-made object may sit there."""
    def owner_of(xml: str) -> str:
        owner = parse_owner(xml)
        return f"lab {owner[0]}" if owner else "nobody (made outside lab)"

    clashes = []
    for node in ctx.lab.nodes:
        name = ctx.lab.domain_name(node)
        dom = ctx.hv.domain(name)
        if dom is not None and parse_owner(dom.XMLDesc(0)) != (ctx.lab.name, node.name):
            clashes.append(f"domain {name} belongs to {owner_of(dom.XMLDesc(0))}")
    net = ctx.hv.network(ctx.lab.network_name) if ctx.lab.network.mode != "bridge" else None
    if net is not None and (parse_owner(net.XMLDesc(0)) or ("",))[0] != ctx.lab.name:
        clashes.append(f"network {ctx.lab.network_name} belongs to {owner_of(net.XMLDesc(0))}")
    if clashes:
        return Problem("names", "; ".join(clashes),
                       "rename this lab (name) or the node, or remove the other object if it is a leftover")
    return None


def _existing_domains(ctx: Context) -> list[str]:
    return [ctx.lab.domain_name(n) for n in ctx.lab.nodes if ctx.hv.domain(ctx.lab.domain_name(n)) is not None]


def check_host(ctx: Context) -> list[Problem]:
    """Every check; the libvirt-dependent ones only when libvirtd answers. Sets ``ctx.virt_type``."""
    local = local_qemu(ctx.lab.libvirt.uri)
    unreachable = check_libvirt(ctx)
    if unreachable:
        problems = [unreachable, check_memory(ctx, running=set()) if local else None]
    else:
        problems = [check_accel(ctx), check_names_free(ctx), check_cidr_free(ctx), check_bridge(ctx),
                    check_memory(ctx) if local else None]
        problems.append(check_tcg_smp(ctx))  # after check_accel: it reads ctx.virt_type
    if local:
        problems += [check_disk(ctx), check_forward(ctx)]
    return [p for p in problems if p]


def format_problems(lab_name: str, problems: list[Problem]) -> str:
    text = "\n".join(f"  - {p.check}: {p.message}\n    fix: {p.fix}" for p in problems)
    return f"this host is not ready for lab {lab_name}:\n{text}"


class Preflight(Phase):
    name = "preflight"
    every_up = True

    def run(self, ctx: Context) -> None:
        problems = check_host(ctx)
        if problems:
            raise LabError(format_problems(ctx.lab.name, problems),
                           hint="fix the problems above and run `lab up` again; nothing was created")
        if not ctx.state.exists():
            ctx.state.save({"lab": ctx.lab.name, "uri": ctx.lab.libvirt.uri})
        ctx.state.update(virt_type=ctx.virt_type, pid=os.getpid())
        ctx.log.info(f"libvirt {ctx.lab.libvirt.uri}: domain type {ctx.virt_type}")
