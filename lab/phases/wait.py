"""Wait: each node's IP, then SSH with its pinned host key, then cloud-init done. Every wait has a deadline."""
from __future__ import annotations

import time
from pathlib import Path

from lab.errors import RemoteError, WaitTimeout
from lab.layout import console_log_path
from lab.phase import Context, Phase, run_on_nodes
from lab.spec import NodeSpec
from lab.state import write_private

POLL = 2.0


def console_tail(ctx: Context, node: NodeSpec | str, lines: int = 15) -> str:
    path = Path(console_log_path(ctx.lab, node))
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(serial console log not readable here)"
    return "\n".join(text[-lines:]) or "(serial console empty)"


def wait_ip(ctx: Context, node: NodeSpec) -> str:
    name, mac = ctx.lab.domain_name(node), ctx.lab.mac(node)
    deadline = time.monotonic() + ctx.lab.timeouts.boot
    ctx.log.info(f"{node.name}: waiting ≤ {ctx.lab.timeouts.boot}s for an IP for {mac} (DHCP lease, guest agent, ARP)")
    while True:
        state = ctx.hv.domain_state(name)
        if state != "running":
            raise RemoteError(f"{node.name}: domain {name} is {state} while waiting for its IP; last console "
                              f"lines:\n{console_tail(ctx, node)}", hint="lab logs; then lab down && lab up")
        dom = ctx.hv.domain(name)
        found = ctx.hv.addresses(dom, mac)
        if found:
            source, ip = found[0]
            if ip != str(node.ip) and ctx.lab.network.mode != "bridge":
                ctx.log.warn(f"{node.name}: got {ip} from {source}, not the reserved {node.ip}")
            return ip
        if time.monotonic() > deadline:
            errors = "".join(f"; {src} failed: {msg}" for src, msg in ctx.hv.address_errors.items())
            raise WaitTimeout(f"{node.name}: no IP address for MAC {mac} within {ctx.lab.timeouts.boot}s "
                              f"(timeouts.boot){errors}; last console lines:\n{console_tail(ctx, node)}",
                              hint="check the network's DHCP (virsh net-dhcp-leases) and the console: lab logs")
        if ctx.cancel.wait(POLL):
            raise WaitTimeout(f"{node.name}: stopped waiting for an IP (interrupted)")


def wait_cloud_init(ctx: Context, node: NodeSpec) -> None:
    host = ctx.host(node.name)
    limit = ctx.lab.timeouts.cloud_init
    ctx.log.info(f"{node.name}: waiting ≤ {limit}s for cloud-init to finish")
    result = host.run("cloud-init", "status", "--wait", check=False, timeout=limit)
    status = host.run("cloud-init", "status", "--long", check=False)
    if result.rc != 0 and "status: done" not in status.stdout:
        raise RemoteError(f"{node.name}: cloud-init did not finish cleanly (rc {result.rc}):\n{status.stdout.strip()}",
                          hint=f"lab ssh {node.name} -- sudo cat /var/log/cloud-init-output.log")


def write_known_hosts(ctx: Context) -> None:
    """known_hosts (0600) for `lab ssh` and OpenSSH users: each node's address with its pinned key."""
    lines = [f"{r['ip']} {r['host_key']}\n" for r in ctx.state.load().get("nodes", {}).values()
             if r.get("ip") and r.get("host_key")]
    write_private(ctx.state.known_hosts, "".join(lines))


def wait_node(ctx: Context, node: NodeSpec) -> str:
    ip = wait_ip(ctx, node)
    record = ctx.state.get_in("nodes", node.name, {})
    ctx.state.set_in("nodes", node.name, {**record, "ip": ip})
    write_known_hosts(ctx)
    ctx.hosts.pop(node.name, None)
    host = ctx.host(node.name)
    ctx.log.info(f"{node.name}: {ip}; waiting ≤ {ctx.lab.timeouts.ssh}s for SSH with pinned key "
                 f"{record.get('fingerprint', '?')}")
    host.wait_connect(ctx.lab.timeouts.ssh)
    wait_cloud_init(ctx, node)
    return f"{node.name}: ready at {ip}"


class Wait(Phase):
    name = "wait"

    def done(self, ctx: Context) -> bool:
        try:
            for node in ctx.lab.nodes:
                if not ctx.state.get_in("nodes", node.name, {}).get("ip"):
                    return False
                host = ctx.host(node.name)
                host.wait_connect(10)
                if "status: done" not in host.run("cloud-init", "status", check=False).stdout:
                    return False
        except (RemoteError, WaitTimeout):
            ctx.hosts.clear()
            return False
        return True

    def run(self, ctx: Context) -> None:
        run_on_nodes([n.name for n in ctx.lab.nodes], lambda n: ctx.log.info(wait_node(ctx, ctx.lab.node(n))),
                     ctx.cancel)
