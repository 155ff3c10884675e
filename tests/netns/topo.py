"""Real kernel topologies in network namespaces, for netprobe's fault catalogue.

    pod1 --veth-- [br0 node1 ov0] ==overlay over underlay u0 (MTU 1500)== [ov0 node2 br0] --veth-- pod2

Addresses live in 10.200.0.0/16 and only inside namespaces made here:
underlay 10.200.0.1/.2, overlay devices 10.200.254.1/.2, pod1 10.200.1.2 behind
br0 10.200.1.1, pod2 10.200.2.2 behind br0 10.200.2.1, service VIP 10.200.99.10.
Every namespace is named npt-<pid>-<n>-<role> and deleted by Lab.close().
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NETPROBE = Path(__file__).resolve().parents[2] / "conformance" / "probes" / "netprobe.py"
GENEVE_TAP = Path(__file__).resolve().parent / "geneve_tap.py"
UNDERLAY_MTU = 1500
OVERLAY_OVERHEAD_V4 = 50  # VXLAN and Geneve over IPv4 (Cilium pkg/mtu)
POD1, POD2, VIP = "10.200.1.2", "10.200.2.2", "10.200.99.10"
_counter = itertools.count()


def sh(*cmd, input=None, check=True, timeout=60):
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode:
        raise RuntimeError("%s failed (rc=%d): %s" % (" ".join(cmd), res.returncode, res.stderr.strip()))
    return res


def kernel_has_geneve() -> bool:
    name = "npt-%d-gncheck" % os.getpid()
    sh("ip", "netns", "add", name)
    try:
        return sh("ip", "-n", name, "link", "add", "g0", "type", "geneve", "id", "1",
                  "remote", "10.200.0.2", check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", name, check=False)


class Lab:
    """Owns namespaces and processes; close() removes everything it made."""

    def __init__(self):
        self.prefix = "npt-%d-%d-" % (os.getpid(), next(_counter))
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix))

    def netns(self, role: str) -> str:
        name = self.prefix + role
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def ip(self, ns: str, *args):
        return sh("ip", "-n", ns, *args)

    def sysctl(self, ns: str, name: str, value):
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "%s=%s" % (name, value))

    def nft(self, ns: str, script: str):
        sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=script)

    def spawn(self, ns: str, argv: list[str], hostname: str | None = None) -> subprocess.Popen:
        cmd = ["ip", "netns", "exec", ns]
        if hostname:  # own UTS namespace, so serve's greeting names the pod
            cmd += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
        proc = subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def wait_file(self, path: Path, proc: subprocess.Popen, what: str, seconds: float = 10.0):
        deadline = time.monotonic() + seconds
        while not path.exists():
            if proc.poll() is not None:
                raise RuntimeError("%s exited rc=%s: %s" % (what, proc.returncode, proc.stderr.read()))
            if time.monotonic() > deadline:
                raise RuntimeError("%s not ready after %.0fs" % (what, seconds))
            time.sleep(0.02)

    def serve(self, ns: str, tcp="", udp="", hostname=None, workers=2) -> subprocess.Popen:
        ready = self.tmp / ("serve-%d.ready" % len(self.procs))
        argv = [sys.executable, str(NETPROBE), "serve", "--ready-file", str(ready), "--workers", str(workers)]
        argv += (["--tcp", tcp] if tcp else []) + (["--udp", udp] if udp else [])
        proc = self.spawn(ns, argv, hostname)
        self.wait_file(ready, proc, "netprobe serve in " + ns)
        return proc

    def probe(self, ns: str, *args, timeout=120) -> dict | list:
        res = sh("ip", "netns", "exec", ns, sys.executable, str(NETPROBE), *args, check=False, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError("netprobe %s rc=%d\nstdout=%s\nstderr=%s"
                                 % (" ".join(args), res.returncode, res.stdout, res.stderr))
        return json.loads(res.stdout)

    def stop(self, proc: subprocess.Popen) -> dict:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
        return json.loads(out) if out.strip() else {}

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Overlay:
    """Parameters of one two-node topology."""

    kind: str = "vxlan"  # vxlan | geneve (kernel) | geneve-user (geneve_tap.py)
    overlay_mtu: int = UNDERLAY_MTU - OVERLAY_OVERHEAD_V4
    pod_mtu: int = UNDERLAY_MTU
    df: str = "set"  # outer DF: set (oversized outer packets dropped) | unset (fragmented)
    service: bool = False  # DNAT VIP:80 -> pod2:8080 on node1 (makes node1 track connections)
    route_mtu: int | None = None  # Cilium style: pod eth0 at pod_mtu, default route MTU lowered


@dataclass
class Topology:
    lab: Lab
    spec: Overlay
    node1: str = ""
    node2: str = ""
    pod1: str = ""
    pod2: str = ""
    extra: dict = field(default_factory=dict)


def build(lab: Lab, spec: Overlay) -> Topology:
    topo = Topology(lab, spec, lab.netns("node1"), lab.netns("node2"), lab.netns("pod1"), lab.netns("pod2"))
    lab.ip(topo.node1, "link", "add", "u0", "mtu", str(UNDERLAY_MTU), "type", "veth",
           "peer", "name", "u0", "netns", topo.node2, "mtu", str(UNDERLAY_MTU))
    for n, node in ((1, topo.node1), (2, topo.node2)):
        lab.ip(node, "addr", "add", "10.200.0.%d/24" % n, "dev", "u0")
        lab.ip(node, "link", "set", "u0", "up")
        lab.sysctl(node, "net.ipv4.ip_forward", 1)
    for n, node in ((1, topo.node1), (2, topo.node2)):
        add_overlay_device(lab, node, n, spec)
        add_pod(lab, node, (topo.pod1, topo.pod2)[n - 1], n, spec)
        other = 3 - n
        lab.ip(node, "route", "add", "10.200.%d.0/24" % other, "via", "10.200.254.%d" % other, "dev", "ov0")
    if spec.service:
        lab.nft(topo.node1, SERVICE_DNAT)
    return topo


def add_overlay_device(lab: Lab, node: str, n: int, spec: Overlay):
    local, remote = "10.200.0.%d" % n, "10.200.0.%d" % (3 - n)
    if spec.kind == "vxlan":
        lab.ip(node, "link", "add", "ov0", "type", "vxlan", "id", "42", "local", local, "remote", remote,
               "dstport", "4789", "df", spec.df)
    elif spec.kind == "geneve":
        lab.ip(node, "link", "add", "ov0", "type", "geneve", "id", "42", "remote", remote, "df", spec.df)
    elif spec.kind == "geneve-user":
        ready = lab.tmp / ("geneve-%d.ready" % n)
        proc = lab.spawn(node, [sys.executable, str(GENEVE_TAP), "--local", local, "--remote", remote,
                                "--df", spec.df, "--ready-file", str(ready)])
        lab.wait_file(ready, proc, "geneve_tap in " + node)
    else:
        raise ValueError("unknown overlay kind %r" % spec.kind)
    lab.ip(node, "link", "set", "ov0", "mtu", str(spec.overlay_mtu))
    lab.ip(node, "addr", "add", "10.200.254.%d/24" % n, "dev", "ov0")
    lab.ip(node, "link", "set", "ov0", "up")


def add_pod(lab: Lab, node: str, pod: str, n: int, spec: Overlay):
    pod_mtu = spec.pod_mtu
    lab.ip(node, "link", "add", "br0", "mtu", str(pod_mtu), "type", "bridge")
    lab.ip(node, "addr", "add", "10.200.%d.1/24" % n, "dev", "br0")
    lab.ip(node, "link", "add", "vp0", "mtu", str(pod_mtu), "type", "veth",
           "peer", "name", "eth0", "netns", pod, "mtu", str(pod_mtu))
    lab.ip(node, "link", "set", "vp0", "master", "br0")
    lab.ip(node, "link", "set", "vp0", "up")
    lab.ip(node, "link", "set", "br0", "up")
    lab.ip(pod, "addr", "add", "10.200.%d.2/24" % n, "dev", "eth0")
    lab.ip(pod, "link", "set", "eth0", "up")
    route_mtu = ["mtu", str(spec.route_mtu)] if spec.route_mtu else []
    lab.ip(pod, "route", "add", "default", "via", "10.200.%d.1" % n, *route_mtu)


SERVICE_DNAT = """
table ip svc {
  chain prerouting { type nat hook prerouting priority dstnat; ip daddr %s tcp dport 80 dnat to %s:8080; }
}
""" % (VIP, POD2)

DROP_FRAG_NEEDED = """
table inet pmtud_blackhole {
  chain output { type filter hook output priority 0; icmp type destination-unreachable icmp code frag-needed drop; }
  chain forward { type filter hook forward priority 0; icmp type destination-unreachable icmp code frag-needed drop; }
}
"""


def capture(name: str, doc) -> None:
    """With NETPROBE_CAPTURE=1, keep a real probe output for the suite's unit tests."""
    if os.environ.get("NETPROBE_CAPTURE") != "1":
        return
    out = Path(__file__).resolve().parents[1] / "fixtures" / "netprobe" / (name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
