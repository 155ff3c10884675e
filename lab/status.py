"""``lab status``: the lab's VMs, network and cluster, read live from libvirt, the nodes and the cluster."""
from __future__ import annotations

from typing import Any, Callable

from lab.errors import LabError
from lab.kubectl import api_client, daemonset_rolled_out, deployment_rolled_out, node_ready
from lab.phase import SKIP_NO_K8S, Context


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
    status["cluster"] = kubernetes_status(ctx)
    return status


def kubernetes_status(ctx: Context) -> dict[str, Any]:
    """The Kubernetes cluster's state for `lab status`: nodes Ready, Cilium, MetalLB. Never raises."""
    lab = ctx.lab
    if not lab.kubernetes.enabled:
        return {"cluster": "none", "reason": SKIP_NO_K8S}
    path = ctx.state.kubeconfig
    if not path.exists():
        return {"cluster": "absent", "reason": f"no kubeconfig at {path}", "hint": "run `lab up`"}
    try:
        from kubernetes import client

        api = api_client(path.read_text())
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        nodes = core.list_node(_request_timeout=10).items
        status = {"cluster": "up", "kubeconfig": str(path),
                  "nodes": {n.metadata.name: "Ready" if node_ready(n) else "NotReady" for n in nodes}}
        status["cilium"] = _component(lambda: apps.read_namespaced_daemon_set("cilium", "kube-system",
                                                                              _request_timeout=10),
                                      daemonset_rolled_out)
        status["metallb"] = {
            "controller": _component(lambda: apps.read_namespaced_deployment("controller", "metallb-system",
                                                                             _request_timeout=10),
                                     deployment_rolled_out),
            "speaker": _component(lambda: apps.read_namespaced_daemon_set("speaker", "metallb-system",
                                                                          _request_timeout=10),
                                  daemonset_rolled_out),
        }
        return status
    except Exception as exc:  # noqa: BLE001 - status reports, it does not fail
        return {"cluster": "unreachable", "reason": f"{type(exc).__name__}: {exc}"[:300],
                "hint": "is the lab running? `lab up` resumes it"}


def _component(read: Callable, rolled_out: Callable) -> dict:
    try:
        ok, detail = rolled_out(read())
        return {"ready": ok, "detail": detail}
    except Exception as exc:  # noqa: BLE001
        status = getattr(exc, "status", None)
        return {"ready": False, "detail": "not installed" if status == 404 else f"{type(exc).__name__}"}
