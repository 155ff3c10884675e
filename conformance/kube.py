"""Kubernetes orchestration for the conformance suite: connect, preflight, workloads, waits, exec, cleanup.

Everything the suite creates lives in namespaces labelled ``kvmlab.io/conformance=true`` (and the run id), so
cleanup deletes namespaces, and ``--cleanup-only`` sweeps every namespace carrying the label.
Probe execution goes through one seam, :class:`Executor`; production uses the kubernetes client's websocket
``stream`` exec (:class:`StreamExecutor`).
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, TypeVar

import tenacity
import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.stream import stream

from lab.errors import KvmlabError, WaitTimeout
from lab.wait import wait_for

log = logging.getLogger("conformance")

OWNER_LABEL = "kvmlab.io/conformance"
RUN_LABEL = "kvmlab.io/conformance-run"
#: The one default probe image: python:3.12-slim pinned by its index digest (a tag can move under a run).
#: The lab overrides it with $KVMLAB_PROBE_IMAGE (e.g. the offline bundle's kvmlab.dev/netprobe:1) or
#: --probe-image; see probe_image().
PROBE_IMAGE = "python:3.12-slim@sha256:78387bc3881b8273120a12ebe6c1ab22b018ccc2c9adf565ae1ac9b536e184ea"
PROBE_IMAGE_ENV = "KVMLAB_PROBE_IMAGE"
#: What a `restricted` PodSecurity namespace accepts; probe pods need no privilege (ports > 1024, no raw sockets).
RESTRICTED_SECURITY = {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                       "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                       "seccompProfile": {"type": "RuntimeDefault"}}
PSA_LABEL = "pod-security.kubernetes.io/enforce"
#: Taints the suite's disruptive checks put on nodes; `--cleanup-only` removes any a killed run left behind.
SUITE_TAINTS = ("kvmlab.io/conformance-failover",)
NETPROBE_DIR = "/netprobe"
NETPROBE = f"{NETPROBE_DIR}/netprobe.py"
NETPROBE_SOURCE = Path(__file__).parent / "probes" / "netprobe.py"
FATAL_WAIT_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                      "CreateContainerError", "CrashLoopBackOff"}

#: What the suite needs to do, as (verb, group, resource, subresource); checked before any check starts.
REQUIRED_ACCESS = [
    ("create", "", "namespaces", ""), ("delete", "", "namespaces", ""), ("list", "", "nodes", ""),
    ("patch", "", "nodes", ""), ("create", "", "pods", ""), ("create", "", "pods", "exec"),
    ("delete", "", "pods", ""), ("create", "", "configmaps", ""), ("create", "", "services", ""),
    ("list", "", "events", ""), ("create", "apps", "daemonsets", ""),
    ("create", "networking.k8s.io", "networkpolicies", ""), ("list", "apps", "deployments", ""),
    ("list", "discovery.k8s.io", "endpointslices", ""), ("list", "metallb.io", "servicel2statuses", ""),
]


class ConformanceError(KvmlabError):
    """A problem of the conformance suite, with a hint naming what to do next."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint)


class PreflightError(ConformanceError):
    """The cluster cannot be used at all: reported once, before any check starts."""

    exit_code = 3  # distinct from pytest's own codes 1 (failures) and 2 (interrupted)


WAIT_HINT = "raise --wait-timeout if the cluster is slow; `kubectl get events -A` shows what it is doing"


class ProbeFailed(ConformanceError):
    """The probe could not run (exec failed, no JSON): a transport failure, never a network verdict."""


def probe_image(option: str | None) -> str:
    """--probe-image, else $KVMLAB_PROBE_IMAGE, else the pinned default: one place decides."""
    import os
    return option or os.environ.get(PROBE_IMAGE_ENV) or PROBE_IMAGE


# ---------------------------------------------------------------------------------------------- connect


@dataclass
class Kube:
    api: client.ApiClient

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.net = client.NetworkingV1Api(self.api)
        self.auth = client.AuthorizationV1Api(self.api)
        self.version = client.VersionApi(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)


def connect(kubeconfig: str | None) -> Kube:
    """A client for ``kubeconfig``; a missing or unreadable file is a PreflightError naming the option."""
    if not kubeconfig:
        raise PreflightError("no kubeconfig: none given, no lab kubeconfig found, KUBECONFIG unset",
                             "pass --kubeconfig FILE, or --lab SPEC after `lab up` wrote .lab/<name>/kubeconfig")
    if not Path(kubeconfig).is_file():
        raise PreflightError(f"kubeconfig {kubeconfig} does not exist",
                             "run `lab up` first, or pass --kubeconfig with an existing file")
    try:
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        api = RetryingApiClient(configuration=configuration)
    except Exception as exc:  # the loader raises ConfigException, ValueError, yaml errors...
        raise PreflightError(f"kubeconfig {kubeconfig} cannot be used: {exc}",
                             "check the file with `kubectl --kubeconfig FILE config view`") from None
    api.configuration.retries = 1
    return Kube(api)


#: Answers of a busy but healthy API server that say "try again": 429 TooManyRequests, 500 as the API server
#: sends it for "etcdserver: request timed out" (seen on the TCG lab), 502/503 from its proxies, 504 Timeout.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
#: How long one request keeps being retried on a transient answer; then the answer stands (an ApiException the
#: check reports as not measured, never as a verdict).
API_RETRY_SECONDS = 60.0


class RetryingApiClient(client.ApiClient):
    """The kubernetes client's ApiClient, retrying a request whose answer is transient (``TRANSIENT_STATUS``) with
    backoff for at most ``retry_seconds``, each retry logged with the server's message.

    A create (POST) that timed out in etcd may still have been written: when its retry answers 409 AlreadyExists,
    the object the first attempt wrote is read back and returned, as if that first attempt had answered."""

    retry_seconds = API_RETRY_SECONDS

    def call_api(self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
        attempts: list[int] = []
        path = url.split("?", 1)[0]

        def once():
            response = super(RetryingApiClient, self).call_api(
                method, url, header_params=header_params, body=body, post_params=post_params,
                _request_timeout=_request_timeout)
            attempts.append(response.status)
            if response.status == 409 and len(attempts) > 1 and method == "POST" and attempts[-2] in TRANSIENT_STATUS:
                name = ((body or {}).get("metadata") or {}).get("name") if isinstance(body, dict) else None
                if name:
                    log.warning("%s %s: the retried create found %s already written; reading it back", method,
                                path, name)
                    return super(RetryingApiClient, self).call_api(
                        "GET", path.rstrip("/") + "/" + name, header_params=header_params,
                        _request_timeout=_request_timeout)
            return response

        def transient(response) -> bool:
            return getattr(response, "status", 200) in TRANSIENT_STATUS

        def before_sleep(state: tenacity.RetryCallState) -> None:
            response = state.outcome.result()
            log.warning("%s %s answered %s (%s); retrying, attempt %d", method, path,
                        response.status, _response_message(response), state.attempt_number + 1)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(transient), stop=tenacity.stop_after_delay(self.retry_seconds),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8) + tenacity.wait_random(0, 0.5),
            before_sleep=before_sleep, retry_error_callback=lambda state: state.outcome.result(),
            sleep=time.sleep)
        return retrying(once)


def _response_message(response) -> str:
    """The Status message of a raw response, read once (RESTResponse.read() keeps the bytes for the caller)."""
    try:
        data = json.loads(response.read() or b"{}")
    except ValueError:
        return response.reason or ""
    return (data.get("message") if isinstance(data, dict) else None) or response.reason or ""


def preflight(kube: Kube, timeout: float = 10.0) -> str:
    """Reachability, credentials, permissions, nodes. Returns e.g. 'v1.37.0 (3 nodes)'; raises PreflightError, also
    when the API server stops answering part-way (each request waits ``timeout`` seconds)."""
    server = kube.api.configuration.host
    try:
        version = kube.version.get_code(_request_timeout=timeout).git_version
    except ApiException as exc:
        if exc.status in (401, 403):
            raise PreflightError(f"the API server at {server} rejected our credentials ({exc.status} {exc.reason})",
                                 "the kubeconfig's token or certificate is wrong or expired") from None
        raise PreflightError(f"the API server at {server} answered {exc.status} {exc.reason}") from None
    except Exception as exc:
        raise PreflightError(f"cannot reach the API server at {server}: {_short(exc)}",
                             "is the cluster up (`lab status`)? is this the right kubeconfig?") from None
    missing = []
    try:
        for verb, group, resource, sub in REQUIRED_ACCESS:
            review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(verb=verb, group=group, resource=resource,
                                                                subresource=sub or None)))
            result = kube.auth.create_self_subject_access_review(review, _request_timeout=timeout)
            if not result.status.allowed:
                missing.append(f"{verb} {resource}{'/' + sub if sub else ''}")
        nodes = None if missing else kube.core.list_node(_request_timeout=timeout).items
    except ApiException as exc:
        raise PreflightError(f"the API server at {server} answered {exc.status} {exc.reason} during the preflight") \
            from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise PreflightError(f"the API server at {server} answered its version, then not within {timeout:.0f}s: "
                             f"{_short(exc)}", "a busy control plane (under TCG: pass --time-scale, or wait and "
                             "rerun)") from None
    if missing:
        raise PreflightError(f"missing permissions on {server}: {', '.join(missing)}",
                             "run the suite as a cluster admin (the lab's kubeconfig is one)")
    if not nodes:
        raise PreflightError(f"the cluster at {server} has no nodes", "wait for `lab up` to finish")
    return f"{version} ({len(nodes)} nodes)"


def _short(exc: Exception) -> str:
    exc = getattr(exc, "reason", None) if isinstance(getattr(exc, "reason", None), Exception) else exc
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


# ---------------------------------------------------------------------------------------------- exec


T = TypeVar("T")


def in_parallel(calls: list[Callable[[], T]]) -> list[T]:
    """Run every call at the same time (probes that must overlap, e.g. load held from several pods); return
    their results in order. Every call finishes before the first error, if any, is raised."""
    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


@dataclass
class ExecResult:
    rc: int | None  # None: the command did not finish (timeout or lost stream)
    stdout: str
    stderr: str


class Executor(Protocol):
    def run(self, namespace: str, pod: str, command: list[str], timeout: float,
            container: str = "probe") -> ExecResult: ...


class StreamExecutor:
    """Exec through the API server's websocket (``kubectl exec``), keeping the real exit code.

    ``kubernetes.stream.stream`` swaps the request method of the ApiClient it is given for a websocket one while the
    exec runs. On the shared client, every other thread's ordinary call in that window went out as a websocket
    handshake ("Handshake status 200 OK", seen against the real CI cluster: list_namespaced_pod failed while probes
    were exec'd). So each thread execs through an ApiClient of its own that nothing else uses."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self._local = threading.local()

    def exec_api(self) -> client.CoreV1Api:
        """This thread's own CoreV1Api for exec (same configuration as the shared client, never shared)."""
        api = getattr(self._local, "core", None)
        if api is None:
            api = self._local.core = client.CoreV1Api(client.ApiClient(self.kube.api.configuration))
        return api

    def run(self, namespace: str, pod: str, command: list[str], timeout: float,
            container: str = "probe") -> ExecResult:
        resp = stream(self.exec_api().connect_get_namespaced_pod_exec, pod, namespace, command=command,
                      container=container, stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False)
        try:
            resp.run_forever(timeout=timeout)
            out, err = resp.read_stdout(timeout=0) or "", resp.read_stderr(timeout=0) or ""
            rc = None if resp.is_open() else resp.returncode
        finally:
            resp.close()
        return ExecResult(rc, out, err)


# ---------------------------------------------------------------------------------------------- session


@dataclass
class Session:
    """One run's handle on the cluster: what it created, so it can remove it on success, failure or Ctrl-C."""

    kube: Kube
    executor: Executor
    probe_image: str = PROBE_IMAGE
    wait_seconds: float = 300.0
    #: multiplies every exec's and probe's deadline (--time-scale): nodes under TCG run everything 5-10x slower
    time_scale: float = 1.0
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)

    # ---- namespaces and cleanup

    def namespace(self, prefix: str, labels: dict | None = None) -> str:
        name = f"cf-{prefix}-{self.run_id}"[:63].rstrip("-")
        body = client.V1Namespace(metadata=client.V1ObjectMeta(
            name=name, labels={OWNER_LABEL: "true", RUN_LABEL: self.run_id, **(labels or {})}))
        self.kube.core.create_namespace(body)
        self.namespaces.append(name)
        self.probe_configmap(name)
        return name

    def delete_namespace(self, name: str) -> None:
        try:
            self.kube.core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        if name in self.namespaces:
            self.namespaces.remove(name)

    def cleanup(self) -> list[str]:
        """Delete every namespace this session created; returns the problems (never raises)."""
        problems = []
        for name in list(self.namespaces):
            try:
                self.delete_namespace(name)
            except Exception as exc:  # keep going: remove as much as we can
                problems.append(f"namespace {name}: {_short(exc)}")
        return problems

    # ---- workloads

    def probe_configmap(self, namespace: str) -> None:
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="netprobe", labels={OWNER_LABEL: "true"}),
                                  data={"netprobe.py": NETPROBE_SOURCE.read_text()})
        self.kube.core.create_namespaced_config_map(namespace, body)

    def probe_pod_spec(self, tcp=(), udp=(), node: str | None = None, host_network: bool = False,
                       named_ports: dict | None = None, http=()) -> dict:
        command = ["python3", NETPROBE, "serve"]
        for flag, numbers in (("--tcp", tcp), ("--udp", udp), ("--http", http)):
            if numbers:
                command += [flag, ",".join(map(str, numbers))]
        if not tcp and not udp and not http:
            command = ["sleep", "infinity"]
        ports = [{"containerPort": p, "protocol": "TCP"} for p in (*tcp, *http)] + \
                [{"containerPort": p, "protocol": "UDP"} for p in udp]
        for name, (port, proto) in (named_ports or {}).items():
            for entry in ports:
                if entry["containerPort"] == port and entry["protocol"] == proto:
                    entry["name"] = name
        container = {"name": "probe", "image": self.probe_image, "command": command, "ports": ports,
                     "volumeMounts": [{"name": "netprobe", "mountPath": NETPROBE_DIR}],
                     "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                     "securityContext": dict(RESTRICTED_SECURITY)}
        spec = {"containers": [container], "terminationGracePeriodSeconds": 1, "enableServiceLinks": False,
                "volumes": [{"name": "netprobe", "configMap": {"name": "netprobe"}}]}
        if node:  # pinned: may land on a control plane too
            spec["nodeSelector"] = {"kubernetes.io/hostname": node}
            spec["tolerations"] = [{"operator": "Exists", "effect": "NoSchedule"}]
        if host_network:
            spec.update(hostNetwork=True, hostPID=True, dnsPolicy="ClusterFirstWithHostNet",
                        tolerations=[{"operator": "Exists"}])
            # Root, said explicitly: a privileged container running as the image's user (the bundle's probe image
            # is uid 65534) has no capabilities, and `chroot /host` failed with "Operation not permitted".
            container["securityContext"] = {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
            container["volumeMounts"].append({"name": "host", "mountPath": "/host", "readOnly": True})
            spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
            if tcp or udp or http:
                # A node has several addresses (Cilium's routes to pods carry cilium_host's as their source): bound
                # to all, serve would echo UDP from the route's source, which the client's connected socket drops.
                command += ["--bind", "$(HOST_IP)"]
                container["env"] = [{"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]
        return spec

    def probe_pod(self, namespace: str, name: str, labels: dict, **kw) -> None:
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {OWNER_LABEL: "true", **labels}},
                "spec": self.probe_pod_spec(**kw)}
        self.create_pod(namespace, body)

    def create_pod(self, namespace: str, body: dict) -> None:
        """Create a pod; a PodSecurity rejection is a clear error naming the namespace label."""
        try:
            self.kube.core.create_namespaced_pod(namespace, body)
        except ApiException as exc:
            if exc.status == 403 and "PodSecurity" in (exc.body or ""):
                raise ConformanceError(f"namespace {namespace} rejected pod {body['metadata']['name']} "
                                       f"(PodSecurity): {_api_message(exc)}",
                                       f"the namespace's {PSA_LABEL} label (or the cluster's PodSecurity default) "
                                       "is stricter than the probe needs; probe pods are `restricted`-compliant "
                                       "(non-root uid 65534, drop ALL, seccomp RuntimeDefault) and only the "
                                       f"facts DaemonSet needs {PSA_LABEL}=privileged") from None
            raise

    def facts_daemonset(self, namespace: str) -> None:
        labels = {OWNER_LABEL: "true", "app": "netprobe-facts"}
        spec = self.probe_pod_spec(host_network=True)
        body = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "netprobe-facts", "labels": labels},
                "spec": {"selector": {"matchLabels": {"app": "netprobe-facts"}},
                         "template": {"metadata": {"labels": labels}, "spec": spec}}}
        self.kube.apps.create_namespaced_daemon_set(namespace, body)

    def pods_per_node(self, namespace: str, prefix: str, nodes: list[str], tcp=(), udp=(),
                      labels: dict | None = None, host_network: bool = False) -> dict[str, tuple[str, str]]:
        """One probe pod pinned to each node; waits for them; node -> (pod name, pod IP). ``host_network``: in
        the node's network namespace (the namespace must be labelled privileged), its IP is the node's."""
        app = {"app": prefix, **(labels or {})}
        for node in nodes:
            self.probe_pod(namespace, f"{prefix}-{node}"[:63], app, node=node, tcp=tcp, udp=udp,
                           host_network=host_network)
        pods = self.wait_pods_ready(namespace, f"app={prefix}", len(nodes), f"{prefix} (one per node)")
        return {p.spec.node_name: (p.metadata.name, p.status.pod_ip) for p in pods}

    # ---- waits

    def wait_pods_ready(self, namespace: str, selector: str, count: int, what: str,
                        seconds: float | None = None) -> list:
        """Wait until ``count`` pods matching ``selector`` are Running and Ready; image pull errors fail at once."""
        seconds = seconds or self.wait_seconds

        def check():
            pods = self.kube.core.list_namespaced_pod(namespace, label_selector=selector).items
            ready = [p for p in pods if _pod_ready(p)]
            states = []
            for p in pods:
                reason = _waiting_reason(p)
                if reason in FATAL_WAIT_REASONS:
                    raise ConformanceError(f"pod {namespace}/{p.metadata.name} cannot start: {reason}",
                                           f"is the image {self.probe_image} pullable from the nodes? "
                                           "use --probe-image to point at a mirror")
                if not _pod_ready(p):
                    states.append(f"{p.metadata.name}: {p.status.phase if p.status else '?'}"
                                  + (f" ({reason})" if reason else ""))
            state = f"{len(ready)}/{count} ready" + (f"; {', '.join(states)}" if states else "")
            return (True, ready) if len(ready) >= count else (False, state)
        return wait_for(f"{count} pod(s) {what} ({namespace}, {selector}) to be Running and Ready", seconds, check,
                        interval=1.0, hint=WAIT_HINT, log=log.info)

    # ---- probes

    def deadline(self, seconds: float) -> float:
        """A deadline for work in a pod, scaled by --time-scale."""
        return seconds * self.time_scale

    def exec(self, namespace: str, pod: str, command: list[str], timeout: float,
             container: str = "probe") -> ExecResult:
        return self.executor.run(namespace, pod, command, self.deadline(timeout), container)

    def netprobe(self, namespace: str, pod: str, args: list[str], timeout: float = 60.0):
        """Run netprobe in a pod; its JSON document, or ProbeFailed when it could not run."""
        where = f"{namespace}/{pod}"
        timeout = self.deadline(timeout)
        try:
            res = self.executor.run(namespace, pod, ["python3", NETPROBE, *args], timeout)
        except ApiException as exc:
            raise ProbeFailed(f"exec in {where} failed: {exc.status} {exc.reason}") from None
        except Exception as exc:
            raise ProbeFailed(f"exec in {where} failed: {type(exc).__name__}: {_short(exc)}") from None
        if res.rc is None:
            raise ProbeFailed(f"netprobe {args[0]} in {where} did not finish within {timeout:.0f}s")
        if res.rc == 2:
            raise ConformanceError(f"netprobe rejected its arguments {args}: {res.stderr.strip()}",
                                   "this is a bug in the suite; please report it")
        if res.rc != 0:
            raise ProbeFailed(f"netprobe {args[0]} in {where} could not run (exit {res.rc}): "
                              f"{res.stderr.strip()[:300]}")
        try:
            return json.loads(res.stdout)
        except ValueError:
            raise ProbeFailed(f"netprobe {args[0]} in {where} printed no JSON: {res.stdout[:200]!r}") from None


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message", "")[:300]
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def _pod_ready(pod) -> bool:
    st = pod.status
    if not st or st.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in (st.conditions or []))


def _waiting_reason(pod) -> str | None:
    for cs in (pod.status.container_statuses or []) if pod.status else []:
        if cs.state and cs.state.waiting and cs.state.waiting.reason:
            return cs.state.waiting.reason
    return None


def sweep(kube: Kube) -> list[str]:
    """Delete every namespace labelled as ours (leftovers of interrupted runs). Returns their names."""
    names = [ns.metadata.name for ns in kube.core.list_namespace(label_selector=f"{OWNER_LABEL}=true").items]
    for name in names:
        try:
            kube.core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    return names


def remove_suite_taints(kube: Kube) -> list[str]:
    """Remove the taints a killed disruptive check left on nodes (SUITE_TAINTS). Returns 'node:taint' strings."""
    removed = []
    for node in kube.core.list_node().items:
        taints = (node.spec.taints or []) if node.spec else []
        ours = [t for t in taints if t.key in SUITE_TAINTS]
        if ours:
            keep = [{k: v for k, v in (("key", t.key), ("value", t.value), ("effect", t.effect)) if v is not None}
                    for t in taints if t.key not in SUITE_TAINTS]
            kube.core.patch_node(node.metadata.name, {"spec": {"taints": keep}})
            removed += [f"{node.metadata.name}:{t.key}:{t.effect}" for t in ours]
    return removed


def node_addresses(kube: Kube) -> dict[str, str]:
    """node name -> InternalIP."""
    out = {}
    for node in kube.core.list_node().items:
        for addr in node.status.addresses or []:
            if addr.type == "InternalIP":
                out[node.metadata.name] = addr.address
    return out


CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"


def control_plane_nodes(kube: Kube) -> set[str]:
    """Names of the nodes labelled as control planes (kubeadm runs the API server and etcd there)."""
    return {n.metadata.name for n in kube.core.list_node(label_selector=CONTROL_PLANE_LABEL).items}


def load_balancer_service(name: str, app: str, target_port: int, *, annotations: dict | None = None,
                          local: bool = False) -> dict:
    """A LoadBalancer Service on port 80 for the pods labelled app=``app`` (ETP Local when ``local``)."""
    spec = {"type": "LoadBalancer", "selector": {"app": app},
            "ports": [{"name": "http", "port": 80, "targetPort": target_port, "protocol": "TCP"}]}
    if local:
        spec["externalTrafficPolicy"] = "Local"
    return {"apiVersion": "v1", "kind": "Service", "spec": spec,
            "metadata": {"name": name, "annotations": annotations or {}, "labels": {OWNER_LABEL: "true"}}}


def wait_ingress(kube, ns: str, name: str, seconds: float) -> str:
    """The Service's first LoadBalancer ingress IP, once the controller (MetalLB) has assigned one."""
    def check():
        svc = kube.core.read_namespaced_service(name, ns)
        ingress = (svc.status.load_balancer.ingress or []) if svc.status and svc.status.load_balancer else []
        ips = [i.ip for i in ingress if i.ip]
        return (True, ips[0]) if ips else (False, "status.loadBalancer.ingress=empty")
    return wait_for(f"Service {ns}/{name} to get a LoadBalancer IP", seconds, check, interval=1.0, hint=WAIT_HINT)
