"""Preflight: is this host fit for the lab, before anything is created? Each failure names the fix."""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab.errors import LabError
from lab.pipeline import Context, Phase

GIB = 1024 ** 3


@dataclass(frozen=True)
class Problem:
    check: str
    message: str
    fix: str


def is_local_uri(uri: str) -> bool:
    return uri.startswith(("qemu:///", "qemu+unix:///")) or uri in ("qemu:///system", "qemu:///session")


def meminfo_available_mib(path: str = "/proc/meminfo") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def check_memory(ctx: Context, available_mib: Callable[[], int] = meminfo_available_mib) -> Problem | None:
    running = {d for d in _existing_domains(ctx)}
    need = sum(n.memory for n in ctx.lab.nodes if ctx.lab.domain_name(n) not in running)
    have = available_mib()
    if need and have < need + 512:
        return Problem("memory", f"the nodes still to start need {need} MiB; the host has {have} MiB available "
                                 f"(512 MiB kept for the host)", "lower nodes[].memory or stop other VMs")
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
    output = (ip_route or (lambda: subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout))()
    clash = routes_covering(ctx.lab.network.cidr, output)
    if clash:
        return Problem("network", f"network.cidr {ctx.lab.network.cidr} is already routed on this host: "
                                  f"{'; '.join(clash)}", "pick another network.cidr, or remove the other network")
    return None


def forward_policy(iptables_save: str) -> str | None:
    for line in iptables_save.splitlines():
        if line.startswith(":FORWARD "):
            return line.split()[1]
    return None


def check_forward(ctx: Context, iptables_save: Callable[[], str] | None = None,
                  bridge_nf: Callable[[], str] | None = None) -> Problem | None:
    """Docker sets FORWARD to DROP; with br_netfilter that silently drops a bridged lab's traffic."""
    if ctx.lab.network.mode != "bridge":
        return None  # libvirt's nat/isolated networks install their own accept rules
    if iptables_save is None:
        if not shutil.which("iptables-save"):
            return None
        iptables_save = lambda: subprocess.run(["iptables-save", "-t", "filter"], capture_output=True,  # noqa: E731
                                               text=True).stdout
    policy = forward_policy(iptables_save())
    nf_path = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    nf = (bridge_nf or (lambda: nf_path.read_text().strip() if nf_path.exists() else "0"))()
    if policy == "DROP" and nf == "1":
        bridge = ctx.lab.bridge_name
        return Problem("firewall", f"iptables FORWARD policy is DROP (Docker sets this) and bridged traffic goes "
                                   f"through iptables: guests on {bridge} would get no DHCP or traffic",
                       f"iptables -I FORWARD -i {bridge} -o {bridge} -j ACCEPT (or sysctl "
                       "net.bridge.bridge-nf-call-iptables=0 on the hypervisor host)")
    return None


def _existing_domains(ctx: Context) -> list[str]:
    return [ctx.lab.domain_name(n) for n in ctx.lab.nodes if ctx.hv.domain(ctx.lab.domain_name(n)) is not None]


class Preflight(Phase):
    name = "preflight"

    def run(self, ctx: Context) -> None:
        hv = ctx.hv  # raises a clear VirtError when libvirtd is unreachable
        virt_type, warning = hv.detect_accel(ctx.lab.libvirt.accel)
        if warning:
            ctx.log.warn(warning)
        ctx.virt_type = virt_type
        problems = [check_cidr_free(ctx), check_forward(ctx)]
        if is_local_uri(ctx.lab.libvirt.uri):
            problems += [check_memory(ctx), check_disk(ctx)]
        problems = [p for p in problems if p]
        if problems:
            text = "\n".join(f"  - {p.check}: {p.message}\n    fix: {p.fix}" for p in problems)
            raise LabError(f"this host is not ready for lab {ctx.lab.name}:\n{text}",
                           hint="fix the problems above and run `lab up` again; nothing was created")
        if not ctx.state.exists():
            ctx.state.save({"lab": ctx.lab.name, "uri": ctx.lab.libvirt.uri})
        ctx.state.update(virt_type=virt_type, pid=os.getpid())
        ctx.log.info(f"libvirt {ctx.lab.libvirt.uri}: domain type {virt_type}")
