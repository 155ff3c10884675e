"""Access to the lab's Kubernetes API: kubectl on the control plane with the admin credentials, a kubernetes
client from kubeconfig text, and the readiness predicates (``kubectl rollout status`` semantics) read through it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import yaml

from lab.render.kubeadm import control_plane

if TYPE_CHECKING:
    from lab.phase import Context
    from lab.remote.host import CommandResult, Host

ADMIN_CONF = "/etc/kubernetes/admin.conf"
LAB_DIR = "/etc/lab"  # where rendered artifacts are put on nodes


def cp_host(ctx: "Context") -> "Host":
    return ctx.host(control_plane(ctx.lab).name)


def kubectl(host: "Host", *args: str, check: bool = True, timeout: float | None = None,
            input: str | None = None) -> "CommandResult":
    """kubectl on the control plane with the admin credentials (root-only, hence sudo)."""
    return host.run("kubectl", f"--kubeconfig={ADMIN_CONF}", *args, check=check, sudo=True, timeout=timeout,
                    input=input)


#: An API server that is up but overloaded or (re)starting: a starved etcd behind it ("etcdserver: request timed
#: out" while creating MetalLB's Service, seen on the CI cluster under TCG), TLS handshakes that time out, refusals
#: during a restart. ``kubectl apply`` and ``helm upgrade --install`` are idempotent, so these are retried until the
#: phase's deadline; a rejected object (validation, admission) is not in this list and fails at once. Two more seen
#: while the API server restarted in a loop: kubectl's validation could not fetch the server's own OpenAPI document
#: ("failed to download openapi: unknown"), and the admin was refused until RBAC had been bootstrapped again.
API_BUSY = (r"etcdserver: (request timed out|leader changed|too many requests)", r"TLS handshake timeout",
            r"Unable to connect to the server", r"the server was unable to return a response",
            r"the server is currently unable to handle the request", r"context deadline exceeded",
            r"connection refused", r"The connection to the server \S+ was refused",
            r"http2: client connection lost", r"i/o timeout", r"net/http: request canceled",
            r"Client\.Timeout exceeded", r"failed to download openapi", r'User "kubernetes-admin" cannot')


def kubectl_retrying(ctx: "Context", host: "Host", *args: str, what: str, deadline_s: float,
                     transient: "Callable[[CommandResult], bool] | None" = None) -> "CommandResult":
    """kubectl (admin credentials) until it succeeds, retrying the failures ``transient`` accepts (default: the
    API server is busy, API_BUSY) until ``deadline_s``; any other failure at once."""
    from lab.wait import matches_any, retry_command

    return retry_command(host, "kubectl", f"--kubeconfig={ADMIN_CONF}", *args, sudo=True, what=what,
                         deadline_s=deadline_s, transient=transient or matches_any(API_BUSY), interval=5.0,
                         log=ctx.log.info)


def api_client(kubeconfig_text: str):
    """A kubernetes ApiClient from kubeconfig text (nothing written to disk)."""
    from kubernetes import config

    return config.new_client_from_config_dict(yaml.safe_load(kubeconfig_text))


# ---------------------------------------------------------------------------------------------- predicates


def daemonset_rolled_out(ds) -> tuple[bool, str]:
    """kubectl rollout status semantics for a DaemonSet (V1DaemonSet)."""
    st = ds.status
    want = st.desired_number_scheduled or 0
    updated, ready = st.updated_number_scheduled or 0, st.number_available or 0
    gen_ok = (st.observed_generation or 0) >= (ds.metadata.generation or 0)
    ok = gen_ok and want > 0 and updated == want and ready == want
    return ok, f"daemonset {ds.metadata.name}: {ready}/{want} available, {updated} updated"


def deployment_rolled_out(dep) -> tuple[bool, str]:
    """kubectl rollout status semantics for a Deployment (V1Deployment)."""
    st = dep.status
    want = dep.spec.replicas if dep.spec.replicas is not None else 1
    updated, available = st.updated_replicas or 0, st.available_replicas or 0
    gen_ok = (st.observed_generation or 0) >= (dep.metadata.generation or 0)
    ok = gen_ok and updated == want and available == want and (st.replicas or 0) == want
    return ok, f"deployment {dep.metadata.name}: {available}/{want} available, {updated} updated"


def deployment_serving(dep) -> tuple[bool, str]:
    """At least one available replica of the current generation: enough to serve while the rest wait for nodes that
    have not joined yet (the Cilium operator's replicas repel each other, one per node)."""
    st = dep.status
    want = dep.spec.replicas if dep.spec.replicas is not None else 1
    available = st.available_replicas or 0
    gen_ok = (st.observed_generation or 0) >= (dep.metadata.generation or 0)
    return gen_ok and available >= min(1, want), f"deployment {dep.metadata.name}: {available}/{want} available"


def _condition(obj, kind: str) -> str | None:
    for cond in (obj.status.conditions or []):
        if cond.type == kind:
            return cond.status
    return None


def node_ready(node) -> bool:
    return _condition(node, "Ready") == "True"


def pod_ready(pod) -> bool:
    """Ready, or a completed run-to-completion pod."""
    return pod.status.phase == "Succeeded" or _condition(pod, "Ready") == "True"


def waiting_reasons(pod, container: str | None = None) -> list[str]:
    """Why the pod's containers (or the one named) wait, in the kubelet's words: ContainerCreating,
    CrashLoopBackOff, ..."""
    return [c.state.waiting.reason for c in (pod.status.container_statuses or [])
            if container in (None, c.name) and c.state and c.state.waiting and c.state.waiting.reason]


def not_ready(items, ready: Callable, name: Callable = lambda o: o.metadata.name) -> list[str]:
    return sorted(name(o) for o in items if not ready(o))
