"""The scripted kubelet and DaemonSet controller for the API double, and helpers for the orchestration tests.

Part of the TEST DOUBLE: what a cluster would do to the suite's objects (pods Running with an IP, one DaemonSet pod
per node). Nothing in conformance/ knows about it.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

from apidouble.server import ApiDouble

REPO = Path(__file__).resolve().parents[2]
NETPROBE = REPO / "conformance" / "probes" / "netprobe.py"
NODES = {"cp1": "192.168.150.10", "w1": "192.168.150.11", "w2": "192.168.150.12"}


class Kubelet:
    """Scripted kubelet + DaemonSet controller for the double: what a cluster would do to our objects."""

    def __init__(self, double: ApiDouble):
        self.double = double
        self.ips = (f"10.244.{i // 200}.{i % 200 + 10}" for i in itertools.count())
        self.running = True          # mark created pods Running/Ready
        self.waiting_reason = None   # or e.g. "ImagePullBackOff"
        double.on_create("pods", self.on_pod)
        double.on_create("daemonsets", self.on_daemonset)

    def on_pod(self, double, pod):
        meta = pod["metadata"]
        node = (pod["spec"].get("nodeSelector") or {}).get("kubernetes.io/hostname") or pod["spec"].get("nodeName")
        node = node or sorted(NODES)[hash(meta["name"]) % len(NODES)]
        pod["spec"]["nodeName"] = node
        ip = NODES[node] if pod["spec"].get("hostNetwork") else next(self.ips)
        if self.waiting_reason:
            double.set_pod_status(meta["namespace"], meta["name"], "Pending", False, reason=self.waiting_reason)
        elif self.running:
            double.set_pod_status(meta["namespace"], meta["name"], "Running", True, ip=ip, node=node)

    def on_daemonset(self, double, ds):
        ns, name = ds["metadata"]["namespace"], ds["metadata"]["name"]
        template = ds["spec"]["template"]
        for node in sorted(NODES):
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{name}-{node}", "namespace": ns, "labels": dict(template["metadata"]["labels"])},
                   "spec": {**template["spec"], "nodeName": node}}
            double.put("pods", pod)
            self.on_pod(double, pod)


def run_netprobe_locally(command: list[str], timeout: float = 30) -> tuple[int, bytes, bytes]:
    """The double's exec, for tests that want real netprobe output: the ConfigMap path maps to the repo's file."""
    argv = [sys.executable if c == "python3" else str(NETPROBE) if c == "/netprobe/netprobe.py" else c
            for c in command]
    res = subprocess.run(argv, capture_output=True, timeout=timeout)
    return res.returncode, res.stdout, res.stderr


def run_suite(args: list[str], tmp_path: Path, timeout: float = 60, **popen) -> subprocess.Popen:
    """Start `pytest <args>` for the real conformance suite in a subprocess (the double lives in this process)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("KUBECONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(REPO),
                             "-o", "timeout=0", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)
