"""``lab status``: the lab's VMs, network and cluster, read live from libvirt, the nodes and the cluster."""
from __future__ import annotations

from typing import Any

from lab.errors import LabError
from lab.pipeline import Context


def _ssh_state(ctx: Context, node: str, record: dict) -> str:
    if not record.get("ip"):
        return "unknown"
    try:
        host = ctx.host(node)
        host.wait_connect(5)
        return "ok" if host.run("true", check=False).ok else "failed"
    except LabError as exc:
        return f"unreachable ({exc.message.splitlines()[0][:60]})"


def lab_status(ctx: Context) -> dict[str, Any]:
    lab, hv = ctx.lab, ctx.hv
    net = hv.network(lab.network_name) if lab.network.mode != "bridge" else None
    records = ctx.state.load().get("nodes", {})
    nodes = []
    for node in lab.nodes:
        domain = hv.domain_state(lab.domain_name(node)) or "absent"
        record = records.get(node.name, {})
        nodes.append({"name": node.name, "role": node.role, "domain": domain, "ip": record.get("ip"),
                      "fingerprint": record.get("fingerprint"),
                      "ssh": _ssh_state(ctx, node.name, record) if domain == "running" else "-"})
    status: dict[str, Any] = {
        "lab": lab.name,
        "uri": lab.libvirt.uri,
        "network": {"name": lab.network_name, "state": "bridge" if lab.network.mode == "bridge" else
                    ("absent" if net is None else ("active" if net.isActive() else "inactive"))},
        "pool": {"name": lab.pool_name, "present": hv.pool(lab.pool_name) is not None},
        "nodes": nodes,
        "phases": ctx.state.load().get("phases", {}),
    }
    status["cluster"] = cluster_summary(ctx)
    return status


def cluster_summary(ctx: Context) -> dict[str, Any]:
    from lab.phases.cluster import cluster_status

    return cluster_status(ctx)
