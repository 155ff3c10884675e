"""ready: every node Ready, kube-system pods Ready, Cilium's kube-proxy replacement active, no kube-proxy
DaemonSet (checked with the kubernetes client from the host; the Cilium agent's own status over SSH)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from lab.cilium_status import kpr_mode
from lab.kubeconfig import fetch_kubeconfig
from lab.kubectl import api_client, cp_host, kubectl, node_ready, not_ready, pod_ready
from lab.phase import Phase, skip_without_kubernetes
from lab.wait import api_starting, wait_for

if TYPE_CHECKING:
    from lab.phase import Context


def cluster_problems(ctx: "Context", kubeconfig: str) -> list[str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    lab = ctx.lab
    api = api_client(kubeconfig)
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    problems = []
    nodes = core.list_node(_request_timeout=10).items
    missing = sorted({n.name for n in lab.nodes} - {n.metadata.name for n in nodes})
    if missing:
        problems.append(f"nodes not registered: {', '.join(missing)}")
    if bad := not_ready(nodes, node_ready):
        problems.append(f"nodes not Ready: {', '.join(bad)}")
    if bad := not_ready(core.list_namespaced_pod("kube-system", _request_timeout=10).items, pod_ready):
        problems.append(f"kube-system pods not Ready: {', '.join(bad)}")
    if lab.cilium.kube_proxy_replacement:
        try:
            apps.read_namespaced_daemon_set("kube-proxy", "kube-system", _request_timeout=10)
            problems.append("a kube-proxy DaemonSet exists although Cilium replaces kube-proxy")
        except ApiException as exc:
            if exc.status != 404:
                raise
        status = kubectl(cp_host(ctx), "-n", "kube-system", "exec", "ds/cilium", "-c", "cilium-agent", "--",
                         "cilium-dbg", "status", "-o", "json", check=False, timeout=60)
        mode = kpr_mode(status.stdout) if status.ok else None
        if mode != "True":
            problems.append(f"Cilium kube-proxy replacement is not active (mode {mode!r}"
                            + ("" if status.ok else f"; {status.tail(1)}") + ")")
    return problems


class Ready(Phase):
    name = "ready"
    every_up = True

    def skip_reason(self, ctx: "Context") -> str | None:
        return skip_without_kubernetes(ctx)

    def done(self, ctx: "Context") -> bool:
        return False  # cheap to check and always worth checking again

    def run(self, ctx: "Context") -> None:
        kubeconfig = fetch_kubeconfig(ctx)

        def probe() -> tuple[bool, str]:
            problems = cluster_problems(ctx, kubeconfig)
            return not problems, "; ".join(problems) or "all checks pass"

        wait_for("every node Ready, kube-system pods Ready, Cilium kube-proxy replacement active",
                 ctx.lab.timeouts.ready, probe, interval=5, log=ctx.log.info, transient=api_starting,
                 hint="`lab status` and `lab logs`; raise timeouts.ready if the lab is slow")
