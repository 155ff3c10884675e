"""What the cluster phases share: bounded waits, retried commands, the admin kubeconfig, readiness predicates,
journals on failure, and ``cluster_status`` for ``lab status``.

Every wait takes its deadline from the spec (the caller passes ``lab.timeouts.<x>``), names what it waits for,
and raises WaitTimeout with the last observation when the time is up. Only transient failures are retried.
"""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Callable, Iterable

import yaml

from lab.errors import LabError, RemoteError, WaitTimeout
from lab.render.kubeadm import API_PORT, control_plane

if TYPE_CHECKING:
    from lab.pipeline import Context
    from lab.remote.host import CommandResult, Host
    from lab.spec import Lab

SKIP_NO_K8S = "kubernetes.enabled is false"
ADMIN_CONF = "/etc/kubernetes/admin.conf"
LAB_DIR = "/etc/lab"  # where rendered artifacts are put on nodes


def skip_without_kubernetes(ctx: "Context") -> str | None:
    return None if ctx.lab.kubernetes.enabled else SKIP_NO_K8S


# ---------------------------------------------------------------------------------------------- waits


def wait_for(what: str, deadline_s: float, probe: Callable[[], tuple[bool, str]], *, interval: float = 2.0,
             hint: str | None = None, log: Callable[[str], None] | None = None) -> str:
    """Call ``probe`` until it returns (True, detail) or ``deadline_s`` passes; then raise WaitTimeout naming
    ``what``, the deadline and the last detail. Exceptions from ``probe`` count as "not yet" (transport while the
    API server starts) and their text becomes the detail."""
    if log:
        log(f"waiting ≤ {deadline_s:.0f}s for {what}")
    start = time.monotonic()
    detail = "no observation yet"
    while True:
        try:
            ok, detail = probe()
        except LabError:
            raise
        except Exception as exc:  # noqa: BLE001 - the API server may be restarting; keep the text
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        if ok:
            return detail
        elapsed = time.monotonic() - start
        if elapsed >= deadline_s:
            raise WaitTimeout(f"{what}: not reached within {deadline_s:.0f}s; last seen: {detail}",
                              hint=hint or "see `lab logs`; raise the matching timeouts.* field if the lab is slow")
        time.sleep(min(interval, max(0.0, deadline_s - elapsed)))


def matches_any(patterns: Iterable[str]) -> Callable[["CommandResult"], bool]:
    """A ``transient`` predicate: True when stdout/stderr matches one of the regexes (case-insensitive)."""
    compiled = [re.compile(p, re.I) for p in patterns]
    return lambda result: any(c.search(result.stdout + "\n" + result.stderr) for c in compiled)


def retry_command(host: "Host", cmd: str, *args: str, what: str, deadline_s: float,
                  transient: Callable[["CommandResult"], bool], sudo: bool = False, input: str | None = None,
                  interval: float = 3.0, before_retry: Callable[[], None] | None = None,
                  log: Callable[[str], None] | None = None) -> "CommandResult":
    """Run a command until it succeeds. A failure that ``transient`` accepts is retried until ``deadline_s``;
    any other failure raises at once with the command's own last lines (never retried into a pass)."""
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline_s - (time.monotonic() - start)
        result = host.run(cmd, *args, check=False, sudo=sudo, input=input, timeout=max(1.0, remaining))
        if result.ok:
            if attempt > 1 and log:
                log(f"{what}: succeeded on attempt {attempt}")
            return result
        if not transient(result):
            raise RemoteError(f"{host.name}: {what} failed (exit {result.rc}):\n{result.tail()}",
                              hint=f"inspect the node with: lab ssh {host.name}; logs: lab logs")
        elapsed = time.monotonic() - start
        if elapsed + interval >= deadline_s:
            raise WaitTimeout(f"{host.name}: {what} still failing after {attempt} attempt(s) in {elapsed:.0f}s "
                              f"(deadline {deadline_s:.0f}s); last output:\n{result.tail()}",
                              hint="the API server or webhook never became ready; see `lab logs`, or raise the "
                                   "matching timeouts.* field")
        if log:
            log(f"{what}: attempt {attempt} hit a transient error, retrying: {result.tail(1)}")
        time.sleep(interval)
        if before_retry:
            before_retry()


# ---------------------------------------------------------------------------------------------- nodes


def cp_host(ctx: "Context") -> "Host":
    return ctx.host(control_plane(ctx.lab).name)


def kubectl(host: "Host", *args: str, check: bool = True, timeout: float | None = None,
            input: str | None = None) -> "CommandResult":
    """kubectl on the control plane with the admin credentials (root-only, hence sudo)."""
    return host.run("kubectl", f"--kubeconfig={ADMIN_CONF}", *args, check=check, sudo=True, timeout=timeout,
                    input=input)


def save_log(ctx: "Context", name: str, text: str) -> "object":
    ctx.state.logs.mkdir(parents=True, exist_ok=True)
    path = ctx.state.logs / name
    path.write_text(text)
    return path


def save_journals(ctx: "Context", node: str) -> None:
    """kubelet and containerd journals of ``node`` into the logs dir (for `lab logs`), best effort."""
    try:
        host = ctx.host(node)
        for unit in ("kubelet", "containerd"):
            res = host.run("journalctl", "--no-pager", "-o", "short-iso", "-n", "400", "-u", unit, check=False,
                           sudo=True, timeout=60)
            save_log(ctx, f"{node}-{unit}.journal.log", res.stdout + res.stderr)
    except Exception as exc:  # noqa: BLE001 - never hide the original failure behind this one
        ctx.log.warn(f"could not collect journals from {node}: {exc}")


# ---------------------------------------------------------------------------------------------- kubeconfig


def server_url(lab: "Lab") -> str:
    return f"https://{control_plane(lab).ip}:{API_PORT}"


def rewrite_server(admin_conf: str, server: str) -> str:
    """admin.conf with every cluster's server set to ``server`` (reachable from the host)."""
    data = yaml.safe_load(admin_conf)
    if not isinstance(data, dict) or not data.get("clusters"):
        raise LabError("admin.conf from the control plane has no clusters", hint="re-run `lab up`")
    for entry in data["clusters"]:
        entry["cluster"]["server"] = server
    return yaml.safe_dump(data, sort_keys=False)


def fetch_kubeconfig(ctx: "Context") -> str:
    raw = cp_host(ctx).run("cat", ADMIN_CONF, sudo=True).stdout
    return rewrite_server(raw, server_url(ctx.lab))


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


def not_ready(items, ready: Callable, name: Callable = lambda o: o.metadata.name) -> list[str]:
    return sorted(name(o) for o in items if not ready(o))


# ---------------------------------------------------------------------------------------------- lab status


def cluster_status(ctx: "Context") -> dict:
    """The cluster's state for `lab status`: nodes Ready, Cilium, MetalLB. Never raises."""
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
