"""ApiDouble: a small in-memory Kubernetes API server, a TEST DOUBLE for the conformance orchestration tests.

It speaks enough of the real REST API for the real ``kubernetes`` Python client: namespaces, nodes, pods (+ exec
over the ``v4.channel.k8s.io`` websocket subprotocol), configmaps, services, events, daemonsets, networkpolicies,
deployments, endpointslices, servicel2statuses.metallb.io (v1beta1, through CustomObjectsApi),
SelfSubjectAccessReviews, /version; create / get / list (labelSelector, simple fieldSelector) / replace / patch /
delete / deletecollection. No watch, no admission, no controllers: what kubelet and controllers would do, the test
does through :class:`ApiDouble` methods (``set_pod_status``, ``on_create`` hooks, ``exec_handler``).
Bearer-token auth (a wrong token gets 401) and per-(verb, resource) denials (403) exercise the preflight.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import re
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# (group path, plural) -> (kind, namespaced)
RESOURCES = {
    ("api/v1", "namespaces"): ("Namespace", False),
    ("api/v1", "nodes"): ("Node", False),
    ("api/v1", "pods"): ("Pod", True),
    ("api/v1", "configmaps"): ("ConfigMap", True),
    ("api/v1", "services"): ("Service", True),
    ("api/v1", "events"): ("Event", True),
    ("apis/apps/v1", "daemonsets"): ("DaemonSet", True),
    ("apis/networking.k8s.io/v1", "networkpolicies"): ("NetworkPolicy", True),
    ("apis/apps/v1", "deployments"): ("Deployment", True),
    ("apis/discovery.k8s.io/v1", "endpointslices"): ("EndpointSlice", True),
    ("apis/metallb.io/v1beta1", "servicel2statuses"): ("ServiceL2Status", True),
}
PATH = re.compile(r"^/(api/v1|apis/[^/]+/v1(?:beta1)?)(?:/namespaces/(?P<ns>[^/]+)(?=/))?/(?P<plural>[a-z0-9]+)"
                  r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?$")


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success",
            "reason": reason, "message": message, "code": code}


def labels_match(selector: str, labels: dict) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_value(obj: dict, path: str):
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def merge(base, patch):
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(base.get(k), v)
    return out


class ApiDouble:
    """The double's state and the test's handles on it. ``start()`` serves on 127.0.0.1 with a random port."""

    def __init__(self, token: str = "double-token"):
        self.token = token
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace or "", name) -> object
        self.denied: set[tuple[str, str]] = set()              # (verb, plural) answered 403
        self.hooks: dict[tuple[str, str], list] = {}           # (verb, plural) -> [fn(double, obj)]
        self.exec_handler = lambda ns, pod, container, command: (1, b"", b"no exec handler in the test\n")
        self.requests: list[tuple[str, str]] = []              # (method, path) log, for assertions
        self.faults: list[dict] = []                           # scripted transient answers, see fail()
        self.stalls: dict[str, float] = {}                     # path -> seconds before answering (a busy server)
        self.lock = threading.RLock()
        self._rv = itertools.count(1)
        self.server: ThreadingHTTPServer | None = None
        self.version = {"major": "1", "minor": "37", "gitVersion": "v1.37.0-apidouble", "platform": "linux/amd64",
                        "buildDate": "2026-01-01T00:00:00Z", "compiler": "gc", "gitCommit": "0" * 40,
                        "gitTreeState": "clean", "goVersion": "go1.25"}

    # ---- lifecycle

    def start(self) -> "ApiDouble":
        double = self

        class Handler(_Handler):
            api = double
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="apidouble", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path, token: str | None = None, server: str | None = None) -> str:
        text = (f"apiVersion: v1\nkind: Config\ncurrent-context: apidouble\n"
                f"clusters:\n- name: apidouble\n  cluster:\n    server: {server or self.url}\n"
                f"users:\n- name: apidouble\n  user:\n    token: {token or self.token}\n"
                f"contexts:\n- name: apidouble\n  context:\n    cluster: apidouble\n    user: apidouble\n")
        with open(path, "w") as f:
            f.write(text)
        return str(path)

    # ---- test handles (what kubelet and controllers would do)

    def put(self, plural: str, obj: dict) -> dict:
        with self.lock:
            meta = obj.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta["resourceVersion"] = str(next(self._rv))
            self.objects[(plural, meta.get("namespace", ""), meta["name"])] = obj
            return obj

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        with self.lock:
            return self.objects.get((plural, namespace, name))

    def list(self, plural: str, namespace: str | None = None) -> list[dict]:
        with self.lock:
            return [o for (p, ns, _), o in self.objects.items() if p == plural and namespace in (None, ns)]

    def add_node(self, name: str, ip: str, labels: dict | None = None) -> dict:
        return self.put("nodes", {"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
                                  "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                                             "conditions": [{"type": "Ready", "status": "True"}]}})

    def set_pod_status(self, namespace: str, name: str, phase: str = "Running", ready: bool = True,
                       ip: str | None = None, node: str | None = None, reason: str | None = None) -> None:
        with self.lock:
            pod = self.objects[("pods", namespace, name)]
            st = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
            if ip:
                st["podIP"] = ip
            if reason:
                st["containerStatuses"] = [{"name": "probe", "ready": False, "restartCount": 0, "image": "x",
                                            "imageID": "", "state": {"waiting": {"reason": reason}}}]
            pod["status"] = st
            if node:
                pod.setdefault("spec", {})["nodeName"] = node

    def on_create(self, plural: str, fn) -> None:
        self.hooks.setdefault(("create", plural), []).append(fn)

    def deny(self, verb: str, plural: str) -> None:
        self.denied.add((verb, plural))

    def fail(self, method: str, plural: str, times: int, code: int = 500,
             message: str = "etcdserver: request timed out", written: bool = False) -> None:
        """Answer the next ``times`` ``method`` requests on ``plural`` with ``code``; ``written`` performs the
        request first, as an API server whose etcd write landed after its client-side timeout."""
        self.faults.append({"method": method, "plural": plural, "times": times, "code": code, "message": message,
                            "written": written})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: ApiDouble

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- plumbing

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null") if length else None

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.api.token}":
            self._send(401, status(401, "Unauthorized", "Unauthorized"))
            return False
        return True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.api.requests.append((method, url.path))
        if url.path in self.api.stalls:
            time.sleep(self.api.stalls[url.path])
        if not self._authorized():
            return
        if url.path.rstrip("/") == "/version":
            return self._send(200, self.api.version)
        if url.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" and method == "POST":
            return self._access_review(self._body())
        m = PATH.match(url.path)
        if not m or (m.group(1), m.group("plural")) not in RESOURCES:
            return self._send(404, status(404, "NotFound", f"the server could not find the requested resource {url.path}"))
        group, plural, ns, name, sub = m.group(1), m.group("plural"), m.group("ns"), m.group("name"), m.group("sub")
        if plural == "namespaces" and name is None and ns is None:
            pass
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}[method]
        if sub == "exec":
            verb = "create"
        resource = f"{plural}/{sub}" if sub else plural
        if (verb, resource) in self.api.denied:
            return self._send(403, status(403, "Forbidden", f'{resource} is forbidden: User "apidouble" cannot '
                                                            f'{verb} resource "{resource}"'))
        if sub == "exec":
            return self._exec(ns, name, query)
        handler = getattr(self, f"_{verb}")
        fault = self._fault(method, plural)
        if fault is not None:
            if fault["written"]:
                self._send = lambda code, body: None  # perform the request, drop its answer
                handler(group, plural, ns or "", name, query)
                del self._send
            elif method in ("POST", "PUT", "PATCH"):
                self._body()  # read it: the connection is kept alive
            reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                      504: "Timeout"}.get(fault["code"], "InternalError")
            return self._send(fault["code"], status(fault["code"], reason, fault["message"]))
        return handler(group, plural, ns or "", name, query)

    def _fault(self, method: str, plural: str) -> dict | None:
        with self.api.lock:
            for fault in self.api.faults:
                if fault["method"] == method and fault["plural"] == plural and fault["times"] > 0:
                    fault["times"] -= 1
                    return fault
        return None

    # ---- verbs

    def _list(self, group, plural, ns, name, query):
        kind, namespaced = RESOURCES[(group, plural)]
        items = self.api.list(plural, ns if (namespaced and ns) else None)
        selector = (query.get("labelSelector") or [""])[0]
        items = [o for o in items if labels_match(selector, o["metadata"].get("labels") or {})]
        for term in filter(None, (query.get("fieldSelector") or [""])[0].split(",")):
            path, want = term.split("=", 1)
            items = [o for o in items if str(field_value(o, path)) == want]
        self._send(200, {"kind": f"{kind}List", "apiVersion": group.split("/", 1)[1] if group != "api/v1" else "v1",
                         "metadata": {"resourceVersion": str(next(self.api._rv))}, "items": items})

    def _get(self, group, plural, ns, name, query):
        obj = self.api.get(plural, ns, name)
        if obj is None:
            return self._send(404, status(404, "NotFound", f'{plural} "{name}" not found'))
        self._send(200, obj)

    def _create(self, group, plural, ns, name, query):
        body = self._body()
        kind, namespaced = RESOURCES[(group, plural)]
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if namespaced:
            if self.api.get("namespaces", "", ns) is None:
                return self._send(404, status(404, "NotFound", f'namespaces "{ns}" not found'))
            meta["namespace"] = ns
        if self.api.get(plural, ns, meta["name"]) is not None:
            return self._send(409, status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists'))
        body.setdefault("kind", kind)
        if plural == "namespaces":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            body["status"] = {"phase": "Active"}
        if plural == "pods":
            body.setdefault("status", {"phase": "Pending"})
        obj = self.api.put(plural, body)
        for hook in self.api.hooks.get(("create", plural), []):
            hook(self.api, obj)
        self._send(201, obj)

    def _update(self, group, plural, ns, name, query):
        if self.api.get(plural, ns, name) is None:
            return self._send(404, status(404, "NotFound", f'{plural} "{name}" not found'))
        self._send(200, self.api.put(plural, self._body()))

    def _patch(self, group, plural, ns, name, query):
        with self.api.lock:
            obj = self.api.get(plural, ns, name)
            if obj is None:
                return self._send(404, status(404, "NotFound", f'{plural} "{name}" not found'))
            body = self._body()
            if isinstance(body, list):  # JSON patch: add / replace / remove on simple paths
                obj = copy.deepcopy(obj)
                for op in body:
                    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].strip("/").split("/")]
                    parent = obj
                    for p in parts[:-1]:
                        parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
                    if op["op"] == "remove":
                        parent.pop(parts[-1], None) if isinstance(parent, dict) else parent.pop(int(parts[-1]))
                    else:
                        parent[parts[-1]] = op["value"]
            else:
                obj = merge(obj, body)
            self._send(200, self.api.put(plural, obj))

    def _delete(self, group, plural, ns, name, query):
        with self.api.lock:
            if self.api.objects.pop((plural, ns, name), None) is None:
                return self._send(404, status(404, "NotFound", f'{plural} "{name}" not found'))
            if plural == "namespaces":  # cascade: everything inside goes (a real server does it asynchronously)
                for key in [k for k in self.api.objects if k[1] == name]:
                    del self.api.objects[key]
        self._send(200, status(200, "Success", f"{plural} {name} deleted"))

    def _deletecollection(self, group, plural, ns, name, query):
        selector = (query.get("labelSelector") or [""])[0]
        with self.api.lock:
            for key, obj in list(self.api.objects.items()):
                if key[0] == plural and key[1] == ns and labels_match(selector, obj["metadata"].get("labels") or {}):
                    del self.api.objects[key]
        self._send(200, status(200, "Success", "deleted"))

    def _access_review(self, body):
        attrs = body["spec"]["resourceAttributes"]
        resource = attrs["resource"] + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        allowed = (attrs["verb"], resource) not in self.api.denied
        body["status"] = {"allowed": allowed, **({} if allowed else {"reason": "denied by the test"})}
        self._send(201, body)

    # ---- exec over websocket (v4.channel.k8s.io): 1 stdout, 2 stderr, 3 status

    def _exec(self, ns, name, query):
        pod = self.api.get("pods", ns, name)
        if pod is None:
            return self._send(404, status(404, "NotFound", f'pods "{name}" not found'))
        if (pod.get("status") or {}).get("phase") != "Running":
            return self._send(400, status(400, "BadRequest", f"pod {name} is not running"))
        if self.headers.get("Upgrade", "").lower() != "websocket":
            return self._send(400, status(400, "BadRequest", "exec needs a websocket upgrade"))
        offered = [p.strip() for p in (self.headers.get("Sec-WebSocket-Protocol") or "").split(",")]
        if "v4.channel.k8s.io" not in offered:
            return self._send(400, status(400, "BadRequest", f"unsupported subprotocols {offered}"))
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        self.end_headers()
        container = (query.get("container") or [None])[0]
        rc, out, err = self.api.exec_handler(ns, name, container, query.get("command") or [])
        if out:
            self._frame(b"\x01" + out)
        if err:
            self._frame(b"\x02" + err)
        result = ({"metadata": {}, "status": "Success"} if rc == 0 else
                  {"metadata": {}, "status": "Failure", "message": f"command terminated with non-zero exit code: {rc}",
                   "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": str(rc)}]}})
        self._frame(b"\x03" + json.dumps(result).encode())
        self._frame(struct.pack("!H", 1000), opcode=0x8)
        self.wfile.flush()
        self.close_connection = True

    def _frame(self, payload: bytes, opcode: int = 0x2) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
