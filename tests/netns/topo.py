"""Real kernel topologies in network namespaces, for netprobe's fault catalogue.

    pod1 --veth-- [br0 node1 ov0] ==overlay over underlay u0 (MTU 1500)== [ov0 node2 br0] --veth-- pod2

Addresses live in 10.200.0.0/16 and only inside namespaces made here:
underlay 10.200.0.1/.2, overlay devices 10.200.254.1/.2, pod1 10.200.1.2 behind
br0 10.200.1.1, pod2 10.200.2.2 behind br0 10.200.2.1, service VIP 10.200.99.10.
Every namespace is named <prefix>-<pid>-<n>-<role> (prefix: $NETNS_TEST_PREFIX, default npt) and deleted
by Lab.close().

build_cilium() builds Cilium's own layout (see its docstring) in 10.201.0.0/16.
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
        self.prefix = "%s-%d-%d-" % (os.environ.get("NETNS_TEST_PREFIX", "npt"), os.getpid(), next(_counter))
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

    def serve(self, ns: str, tcp="", udp="", hostname=None, workers=2, http="", bind="") -> subprocess.Popen:
        ready = self.tmp / ("serve-%d.ready" % len(self.procs))
        argv = [sys.executable, str(NETPROBE), "serve", "--ready-file", str(ready), "--workers", str(workers)]
        argv += (["--tcp", tcp] if tcp else []) + (["--udp", udp] if udp else []) + (["--http", http] if http else [])
        argv += ["--bind", bind] if bind else []
        proc = self.spawn(ns, argv, hostname)
        self.wait_file(ready, proc, "netprobe serve in " + ns)
        return proc

    def slim_path(self) -> str:
        """A directory holding only python3: PATH as in a slim probe image (no ip, iptables, nft, conntrack)."""
        bin_dir = self.tmp / "slim-bin"
        if not bin_dir.exists():
            bin_dir.mkdir()
            (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
        return str(bin_dir)

    def probe(self, ns: str, *args, timeout=120, slim=False) -> dict | list:
        """Run netprobe in ns; slim=True runs it as in a pod image: PATH holds only python3, no other env."""
        if slim:
            path = self.slim_path()
            argv = ["env", "-i", "PATH=" + path, os.path.join(path, "python3"), str(NETPROBE)]
        else:
            argv = [sys.executable, str(NETPROBE)]
        res = sh("ip", "netns", "exec", ns, *argv, *args, check=False, timeout=timeout)
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


# ---------------------------------------------------------------- Cilium's layout

CIL_LAN = "10.201.0.0/24"  # the nodes' L2 segment (underlay), a bridge in namespace "lan"
CIL_NODE = {1: "10.201.0.1", 2: "10.201.0.2"}
CIL_RUNNER = "10.201.0.100"
CIL_LB_VIP = "10.201.0.200"  # a LoadBalancer address on the LAN, answered (ARP) by node1
CIL_POD = {1: "10.201.1.2", 2: "10.201.2.2"}
CIL_ROUTER = {1: "10.201.1.1", 2: "10.201.2.1"}  # the pods' gateway on each node (cilium_host's role)
VXLAN_OVERHEAD = 50


@dataclass
class Cilium:
    """Namespaces and addresses of build_cilium()'s layout."""

    lab: Lab
    lan: str
    runner: str
    node1: str
    node2: str
    pod1: str
    pod2: str
    route_mtu: int | None

    def pod_ip(self, n: int) -> str:
        return CIL_POD[n]


def build_cilium(lab: Lab, route_mtu: int | None = 1450, lb_vip: bool = True) -> Cilium:
    """Cilium's datapath shape with kernel parts:

        runner (10.201.0.100) ---+
        node1  (10.201.0.1, LB VIP 10.201.0.200/32) ---+--- br0 in "lan" (L2, MTU 1500)
        node2  (10.201.0.2) ---+
        node1 ov0 ==VXLAN id 42, dstport 4789, df set, MTU 1500-50== node2 ov0 (10.201.254.1/.2)
        pod1 eth0 (1500, 10.201.1.2/32) --veth-- lxc0 node1 (10.201.1.1/32); pod2 likewise on node2

    Each pod's eth0 stays at 1500 (the base MTU); its routes are `10.201.n.1 dev eth0 scope link` and
    `default via 10.201.n.1 dev eth0 mtu <route_mtu>` (Cilium's CNI plugin sets Route.MTU; route_mtu=None
    leaves it unset, the fault). Nodes route the other pod's /24 over ov0. node1 owns the LB VIP on its LAN
    link (so it answers ARP for it), DNATs VIP:80 to pod2:8080 and masquerades that flow (externalTrafficPolicy
    Cluster), so the runner on the same L2 reaches pod2 through node1."""
    c = Cilium(lab, lab.netns("lan"), lab.netns("runner"), lab.netns("node1"), lab.netns("node2"),
               lab.netns("pod1"), lab.netns("pod2"), route_mtu)
    lab.ip(c.lan, "link", "add", "br0", "mtu", "1500", "type", "bridge")
    lab.ip(c.lan, "link", "set", "br0", "up")
    for i, (ns, addr) in enumerate(((c.node1, CIL_NODE[1]), (c.node2, CIL_NODE[2]), (c.runner, CIL_RUNNER))):
        port = "p%d" % i
        lab.ip(c.lan, "link", "add", port, "mtu", "1500", "type", "veth", "peer", "name", "lan0", "netns", ns,
               "mtu", "1500")
        lab.ip(c.lan, "link", "set", port, "master", "br0")
        lab.ip(c.lan, "link", "set", port, "up")
        lab.ip(ns, "addr", "add", addr + "/24", "dev", "lan0")
        lab.ip(ns, "link", "set", "lan0", "up")
    for n, node in ((1, c.node1), (2, c.node2)):
        lab.sysctl(node, "net.ipv4.ip_forward", 1)
        other = 3 - n
        lab.ip(node, "link", "add", "ov0", "type", "vxlan", "id", "42", "local", CIL_NODE[n], "remote",
               CIL_NODE[other], "dstport", "4789", "dev", "lan0", "df", "set")
        lab.ip(node, "link", "set", "ov0", "mtu", str(1500 - VXLAN_OVERHEAD))
        lab.ip(node, "addr", "add", "10.201.254.%d/24" % n, "dev", "ov0")
        lab.ip(node, "link", "set", "ov0", "up")
        lab.ip(node, "route", "add", "10.201.%d.0/24" % other, "via", "10.201.254.%d" % other, "dev", "ov0")
        attach_cilium_pod(c, n, (c.pod1, c.pod2)[n - 1], CIL_POD[n], "lxc0")
    if lb_vip:
        lab.ip(c.node1, "addr", "add", CIL_LB_VIP + "/32", "dev", "lan0")
        lab.nft(c.node1, LB_DNAT)
    return c


def attach_cilium_pod(c: Cilium, n: int, pod: str, ip: str, dev: str) -> None:
    """Pod namespace ``pod`` on node n as Cilium wires it: eth0 1500 with ``ip``/32, a scope-link route to the
    router address (on the node's ``dev``), the default route via it with the route MTU."""
    lab, node = c.lab, (c.node1, c.node2)[n - 1]
    lab.ip(node, "link", "add", dev, "mtu", "1500", "type", "veth", "peer", "name", "eth0", "netns", pod, "mtu", "1500")
    lab.ip(node, "addr", "add", CIL_ROUTER[n] + "/32", "dev", dev)
    lab.ip(node, "link", "set", dev, "up")
    lab.ip(node, "route", "add", ip + "/32", "dev", dev, "scope", "link")
    lab.ip(pod, "addr", "add", ip + "/32", "dev", "eth0")
    lab.ip(pod, "link", "set", "eth0", "up")
    lab.ip(pod, "route", "add", CIL_ROUTER[n], "dev", "eth0", "scope", "link")
    mtu = ["mtu", str(c.route_mtu)] if c.route_mtu else []
    lab.ip(pod, "route", "add", "default", "via", CIL_ROUTER[n], "dev", "eth0", *mtu)


def add_cilium_pod(c: Cilium, n: int, k: int) -> tuple[str, str]:
    """Another pod on node n of build_cilium()'s layout: namespace ``pod<n>-<k>``, address 10.201.<n>.<2+k>, the
    node's device lxc<k> (k >= 1; pod1/pod2 are k = 0). Returns (namespace, address)."""
    ns, ip = c.lab.netns("pod%d-%d" % (n, k)), "10.201.%d.%d" % (n, 2 + k)
    attach_cilium_pod(c, n, ns, ip, "lxc%d" % k)
    return ns, ip


LB_DNAT = """
table ip lb {
  chain prerouting { type nat hook prerouting priority dstnat; ip daddr %s tcp dport 80 dnat to %s:8080; }
  chain postrouting { type nat hook postrouting priority srcnat; ct status dnat ip daddr %s masquerade; }
}
""" % (CIL_LB_VIP, CIL_POD[2], CIL_POD[2])


def announce_vip(lab: Lab, c: Cilium, n: int, vip: str = CIL_LB_VIP) -> None:
    """Make node n answer ARP for vip on the LAN as a MetalLB speaker does (here: the kernel, owning vip/32)."""
    lab.ip((c.node1, c.node2)[n - 1], "addr", "add", vip + "/32", "dev", "lan0")


GARP = """
import socket, sys
dev, mac, ip = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3])
arp = bytes.fromhex("0001080006040001") + mac + ip + bytes(6) + ip   # request: who-has ip, tell ip (gratuitous)
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
    s.bind((dev, 0))
    s.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + arp)
"""


def move_vip(lab: Lab, c: Cilium, vip: str, to: int) -> None:
    """Move vip's announcement to node ``to`` as a MetalLB speaker that took over does: the other node drops it,
    node ``to`` owns it and sends one gratuitous ARP, which moves every neighbour entry on the LAN."""
    nodes = (c.node1, c.node2)
    lab.ip(nodes[2 - to], "addr", "del", vip + "/32", "dev", "lan0")
    lab.ip(nodes[to - 1], "addr", "add", vip + "/32", "dev", "lan0")
    sh("ip", "netns", "exec", nodes[to - 1], sys.executable, "-c", GARP, "lan0", mac_of(lab, nodes[to - 1], "lan0"),
       vip)


def mac_of(lab: Lab, ns: str, dev: str) -> str:
    return sh("ip", "netns", "exec", ns, "cat", "/sys/class/net/%s/address" % dev).stdout.strip()


def neighbour_mac(lab: Lab, ns: str, addr: str) -> str | None:
    """The MAC ns's neighbour table holds for addr (None when it has no complete entry)."""
    out = lab.ip(ns, "-j", "neigh", "show", addr).stdout
    for entry in json.loads(out or "[]"):
        if entry.get("lladdr") and "FAILED" not in entry.get("state", []):
            return entry["lladdr"]
    return None


def dnsmasq(lab: Lab, ns: str, listen: str, records: dict) -> subprocess.Popen:
    """A real DNS server (dnsmasq) on listen:53 answering records {name: address}, nothing else."""
    assert shutil.which("dnsmasq"), "dnsmasq is needed for the DNS probe tests (apt-get install dnsmasq-base)"
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", "--listen-address=" + listen, "--port=53", "--user=root",
            "--pid-file=%s" % (lab.tmp / ("dnsmasq-%s.pid" % ns)), "--log-facility=-"]
    argv += ["--address=/%s/%s" % (name, addr) for name, addr in records.items()]
    proc = lab.spawn(ns, argv)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # bounded: wait until dnsmasq holds udp/53 in ns
        if proc.poll() is not None:
            raise RuntimeError("dnsmasq exited rc=%s: %s" % (proc.returncode, proc.stderr.read()))
        if ":0035 " in sh("ip", "netns", "exec", ns, "cat", "/proc/net/udp").stdout:
            return proc
        time.sleep(0.05)
    raise RuntimeError("dnsmasq in %s did not listen on udp/53 within 10 s" % ns)
