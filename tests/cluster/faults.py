"""Faults brought into the real CI cluster at their own layer, and the health each one restores.

Every fault is a context manager: on enter it breaks one thing the way it breaks in production (a sysctl reverted
on a node, a kube-proxy DaemonSet installed beside Cilium's replacement, Cilium deployed with a pod MTU too large
for the underlay, a NetworkPolicy deleted underneath the suite); on exit it restores health and waits for it.
"""
from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

import yaml

from clusterlab import ROOT, SPEC, kubectl
from labrun import lab_cli

from lab.phases.sideload import MOUNT as BUNDLE_MOUNT, MOUNT_SCRIPT as MOUNT_BUNDLE
from lab.wait import wait_for

KUBE_PROXY_ARCHIVE = f"{BUNDLE_MOUNT}/images/registry.k8s.io_kube-proxy_v1.37.2.tar"
# The bundle disk is mounted by the sideload phase, not across a reboot of the node: mounted again here, as it does.
KUBE_PROXY_IMAGE = "registry.k8s.io/kube-proxy:v1.37.2"
CTR = "ctr --address /run/containerd/containerd.sock --namespace k8s.io"


def node_run(state: Path, node: str, command: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = lab_cli(state, "ssh", "-c", str(SPEC), node, "--", f"sudo sh -c '{command}'", timeout=timeout)
    assert proc.returncode == 0, f"{node}: {command}: {proc.stderr[-2000:]}"
    return proc


@contextlib.contextmanager
def sysctl_reverted(state: Path, node: str, key: str, value: str, healthy: str):
    node_run(state, node, f"sysctl -w {key}={value}")
    try:
        yield
    finally:
        node_run(state, node, f"sysctl -w {key}={healthy}")


@contextlib.contextmanager
def kube_proxy_installed(state: Path, bundle_dir: Path, kubeconfig: Path, nodes: list[str], control_plane: str):
    """kube-proxy as kubeadm would install it, from the bundle's image, next to Cilium's replacement."""
    for node in nodes:
        node_run(state, node, f"({MOUNT_BUNDLE}) && {CTR} images import {KUBE_PROXY_ARCHIVE}")
    node_run(state, control_plane, "kubeadm init phase addon kube-proxy --config /etc/lab/kubeadm.yaml "
                                   "--kubeconfig /etc/kubernetes/admin.conf")
    try:
        proc = kubectl(bundle_dir, kubeconfig, "-n", "kube-system", "rollout", "status", "ds/kube-proxy",
                       "--timeout=900s", timeout=960)
        assert proc.returncode == 0, proc.stderr
        yield
    finally:
        kubectl(bundle_dir, kubeconfig, "-n", "kube-system", "delete", "ds/kube-proxy", "configmap/kube-proxy",
                "--ignore-not-found", "--wait=true", timeout=600)
        for node in nodes:  # kube-proxy's own cleanup of the rules it wrote, then its image goes again
            node_run(state, node, f"{CTR} run --rm --privileged --net-host {KUBE_PROXY_IMAGE} kp-cleanup "
                                  f"kube-proxy --cleanup; {CTR} images rm {KUBE_PROXY_IMAGE}")


@contextlib.contextmanager
def cilium_values_override(state: Path, tmp_path: Path, values: dict):
    """`lab up` of the same lab with extra Cilium values (bypassing the spec's checks, which look at cilium.mtu,
    not at raw values): the cilium phase sees other values, upgrades the release and waits for the rollout. The
    agents read their config at start only; the lab's values make the chart roll them on a config change
    (rollOutCiliumPods), so the fault is in force once `lab up` returns. Before that, the MTU fault's pods still
    got 1450 and its check rightly passed."""
    spec = yaml.safe_load(SPEC.read_text())
    spec.setdefault("cilium", {}).setdefault("values", {}).update(values)
    faulty = tmp_path / "faulty.yaml"
    faulty.write_text(yaml.safe_dump(spec))
    proc = lab_cli(state, "up", "-c", str(faulty), timeout=3600)
    try:  # a faulty up that failed half-way still changed the cluster: the spec's values are restored either way
        assert proc.returncode == 0, proc.stderr[-4000:]
        yield
    finally:
        restored = lab_cli(state, "up", "-c", str(SPEC), timeout=3600)
        assert restored.returncode == 0, restored.stderr[-4000:]


@contextlib.contextmanager
def network_policies_deleted(bundle_dir: Path, kubeconfig: Path, namespaces_prefix: str, deadline_s: float = 3600):
    """A controller gone wrong: every NetworkPolicy that appears in the suite's namespaces is deleted at once."""
    stop = threading.Event()
    deleted: list[str] = []

    def loop() -> None:
        end = time.monotonic() + deadline_s
        while not stop.is_set() and time.monotonic() < end:
            out = kubectl(bundle_dir, kubeconfig, "get", "networkpolicy", "-A", "--no-headers",
                          "-o", "custom-columns=NS:.metadata.namespace,NAME:.metadata.name", timeout=120)
            for line in out.stdout.splitlines():
                ns, _, name = line.partition(" ")
                name = name.strip()
                if ns.startswith(namespaces_prefix) and name:
                    if kubectl(bundle_dir, kubeconfig, "-n", ns, "delete", "networkpolicy", name,
                               "--ignore-not-found", "--wait=false", timeout=120).returncode == 0:
                        deleted.append(f"{ns}/{name}")
            stop.wait(1.0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield deleted
    finally:
        stop.set()
        thread.join(timeout=300)


def run_checks(state: Path, results: Path, *selection: str, timeout: float = 5400) -> tuple[int, dict, str]:
    """pytest over the selected conformance checks, from the runner inside labns, as `make conformance` runs them.
    Returns (exit code, {check: (outcome, message)}, output tail)."""
    import os
    import xml.etree.ElementTree as ET

    from labrun import in_netns

    junit = results / "junit.xml"
    argv = in_netns([str(ROOT / ".venv/bin/python"), "-m", "pytest", *selection, "--lab", str(SPEC),
                     "-p", "no:cacheprovider", "-o", "timeout=3600", "--results-dir", str(results),
                     "--junitxml", str(junit)])
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "LAB_STATE_DIR": str(state)}, capture_output=True,
                          text=True, timeout=timeout)
    outcomes = {}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome, message = tag, (found.get("message") or "") + "\n" + (found.text or "")
            outcomes[case.get("name")] = (outcome, message)
    return proc.returncode, outcomes, proc.stdout[-6000:] + proc.stderr[-2000:]


@contextlib.contextmanager
def second_arp_responder(bridge: str, addresses: list[str], netns: str = "kvmlab-rogue"):
    """A host on the lab's L2 that also answers ARP for the pool's addresses (a stale VIP on a decommissioned
    box, a second L2 speaker): its own network namespace, created here, on a veth enslaved to the lab's bridge
    inside labns. Linux answers ARP for every local address, so holding the pool's addresses is enough.
    Everything is removed on exit."""
    from labrun import in_netns

    def run(argv):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"

    run(["ip", "netns", "add", netns])
    try:
        run(in_netns(["ip", "link", "add", "rogue-br", "type", "veth", "peer", "name", "rogue0", "netns", netns]))
        run(in_netns(["ip", "link", "set", "rogue-br", "master", bridge, "up"]))
        inside = ["ip", "netns", "exec", netns]
        run([*inside, "ip", "link", "set", "rogue0", "up"])
        for i, address in enumerate(addresses):  # the first with the lab's prefix: a route to the askers
            run([*inside, "ip", "addr", "add", f"{address}/{24 if i == 0 else 32}", "dev", "rogue0"])
        mac = subprocess.run([*inside, "cat", "/sys/class/net/rogue0/address"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        wait_for("the rogue port of the lab's bridge to reach STP state forwarding", 120,
                 lambda: _port_state(in_netns(["bridge", "-j", "link", "show", "dev", "rogue-br"])), interval=1.0)
        yield mac
    finally:
        subprocess.run(in_netns(["ip", "link", "del", "rogue-br"]), capture_output=True, timeout=60)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=60)


def _port_state(argv) -> tuple[bool, str]:
    import json
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return False, f"`bridge link` exit {proc.returncode}: {proc.stderr.strip()[:200]}"
    state = (json.loads(proc.stdout or "[]") or [{}])[0].get("state")
    return state == "forwarding", f"port state {state}"
