"""ready: every node Ready, kube-system pods Ready, Cilium's kube-proxy replacement active, no kube-proxy
DaemonSet (checked with the kubernetes client from the host; the Cilium agent's own status over SSH), then a pod on
the pod network on every node.

The last one is what a user's first pod needs. An agent is Ready, and kube-system is Ready, before the agent has
compiled its datapath: on the CI cluster after the agents rolled, `up` returned while cp1's agent still compiled
bpf_host and then bpf_lxc (2 min each under TCG; no pod of kube-system runs on cp1), and the suite's first pod
there sat in ContainerCreating for 5 minutes, its CNI ADD timing out twice at 90 s. A pause pod pinned to each node
is Ready only once Cilium has built its endpoint there."""
from __future__ import annotations

from typing import TYPE_CHECKING

from lab.cilium_status import kpr_mode
from lab.kubeconfig import fetch_kubeconfig
from lab.kubectl import api_client, cp_host, kubectl, node_ready, not_ready, pod_ready, waiting_reasons
from lab.phase import Phase, skip_without_kubernetes
from lab.phases.runtime import SANDBOX_IMAGE
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
    pods = [p for p in core.list_namespaced_pod("kube-system", _request_timeout=10).items
            if PODNET_LABEL not in (p.metadata.labels or {})]
    if bad := not_ready(pods, pod_ready):
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


PODNET_NAMESPACE = "kube-system"
PODNET_LABEL = "kvmlab.io/pod-network-probe"


def podnet_pod(node: str) -> dict:
    """A pause container pinned to ``node`` (any taint tolerated): Ready once its sandbox is on the pod network."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"lab-podnet-{node}", "namespace": PODNET_NAMESPACE,
                         "labels": {PODNET_LABEL: node}},
            "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                     "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "pause", "image": SANDBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                                     "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}}}]}}


def podnet_state(pods, nodes: list[str]) -> tuple[bool, str]:
    """Whether every node's probe pod is Ready, and per node what it is doing (its phase, and the kubelet's reason
    when its container waits: ContainerCreating, ...)."""
    by_node = {(p.metadata.labels or {}).get(PODNET_LABEL): p for p in pods}
    parts, ok = [], True
    for node in nodes:
        pod = by_node.get(node)
        if pod is None:
            ok = False
            parts.append(f"{node}: no probe pod")
            continue
        if pod_ready(pod):
            parts.append(f"{node}: Ready")
            continue
        ok = False
        waiting = waiting_reasons(pod)
        parts.append(f"{node}: {pod.status.phase}" + (f" ({', '.join(waiting)})" if waiting else ""))
    return ok, "; ".join(parts)


def wait_pod_network(ctx: "Context", kubeconfig: str) -> None:
    """One probe pod per node, Ready within timeouts.ready, then deleted (also when the wait fails)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client(kubeconfig))
    nodes = [n.name for n in ctx.lab.nodes]

    def delete_all() -> None:
        core.delete_collection_namespaced_pod(PODNET_NAMESPACE, label_selector=PODNET_LABEL, grace_period_seconds=0,
                                              _request_timeout=30)

    def gone() -> tuple[bool, str]:
        left = core.list_namespaced_pod(PODNET_NAMESPACE, label_selector=PODNET_LABEL, _request_timeout=10).items
        return not left, ", ".join(p.metadata.name for p in left) or "none left"

    delete_all()  # left over by an interrupted up
    wait_for("earlier pod network probe pods deleted", ctx.lab.timeouts.rollout, gone, interval=2,
             transient=api_starting)
    try:
        for node in nodes:
            try:
                core.create_namespaced_pod(PODNET_NAMESPACE, podnet_pod(node), _request_timeout=30)
            except ApiException as exc:
                if exc.status != 409:
                    raise

        def probe() -> tuple[bool, str]:
            return podnet_state(core.list_namespaced_pod(PODNET_NAMESPACE, label_selector=PODNET_LABEL,
                                                         _request_timeout=10).items, nodes)

        wait_for("a pod on the pod network on every node (Cilium builds its endpoint; the first one on a node "
                 "compiles its datapath)", ctx.lab.timeouts.ready, probe, interval=5, log=ctx.log.info,
                 transient=api_starting,
                 hint=f"`lab ssh <control-plane> sudo kubectl -n {PODNET_NAMESPACE} describe pod -l {PODNET_LABEL}` "
                      "and the node's Cilium agent log; raise timeouts.ready if the lab is slow")
    finally:
        delete_all()


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
        wait_pod_network(ctx, kubeconfig)
