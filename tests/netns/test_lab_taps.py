"""The lab raises its nodes' host-side tap queues through sysfs (lab.virt.taps): a real tap in a namespace made
here, read and raised by the module itself running inside that namespace, the kernel's own answer read back."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import topo

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys
sys.path.insert(0, %r)
from lab.virt.taps import TAP_TX_QUEUE_LEN, raise_tx_queue_len, short_taps, tx_queue_len
before = short_taps(["vnet0", "absent0"])
for dev in before:
    raise_tx_queue_len(dev)
print(json.dumps({"before": before, "after": short_taps(["vnet0"]), "len": tx_queue_len("vnet0"),
                  "absent": tx_queue_len("absent0"), "want": TAP_TX_QUEUE_LEN}))
""" % str(REPO)


def test_tap_queue_raised_live_and_read_back_from_the_kernel(lab):
    ns = lab.netns("host")
    lab.ip(ns, "tuntap", "add", "dev", "vnet0", "mode", "tap")
    out = json.loads(topo.sh("ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT).stdout)
    assert out == {"before": {"vnet0": 1000}, "after": {}, "len": out["want"], "absent": None, "want": 10000}
    [link] = json.loads(lab.ip(ns, "-j", "link", "show", "vnet0").stdout)
    assert link["txqlen"] == 10000


DRAIN_SCRIPT = """
import fcntl, json, os, socket, struct, subprocess, sys
sys.path.insert(0, %r)
import libvirt
from conformance.hypervisor import TapDrops
from lab.spec import load_lab

LIVE = open(%r).read()  # virsh dumpxml cik8s-cp1 on the CI cluster: its NIC's host side is vnet0


class Conn:  # libvirt's answer for the lab's two domains; everything below it is the kernel's
    def lookupByName(self, name):
        class Dom:
            def XMLDesc(self, flags):
                return LIVE if name.endswith("cp1") else LIVE.replace("vnet0", "vnet1")
        return Dom()

    def close(self):
        pass


libvirt.open = lambda uri: Conn()
held = []
for tap in ("vnet0", "vnet1"):  # a guest that never drains its NIC: the fd is held, nothing reads it
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000))  # TUNSETIFF, IFF_TAP|IFF_NO_PI
    held.append(fd)
    subprocess.run(["ip", "link", "set", tap, "up", "txqueuelen", "16"], check=True)
subprocess.run(["ip", "addr", "add", "192.0.2.1/24", "dev", "vnet0"], check=True)
subprocess.run(["ip", "neigh", "replace", "192.0.2.2", "lladdr", "02:00:00:00:00:02", "dev", "vnet0", "nud",
                "permanent"], check=True)
taps = TapDrops(load_lab(%r))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(200):
        s.sendto(b"x" * 100, ("192.0.2.2", 9))
taps.stop()
measured, problems = {}, ["only 1738 of 2000 held connections carried a byte"]
taps.report(measured.__setitem__, problems)
print(json.dumps({"measured": measured, "problems": problems}))
"""


def test_a_tap_nobody_drains_counts_its_overflow_and_the_load_check_names_it(lab):
    """The counter the load checks read is the kernel's own: a tap whose reader does not drain it (a guest too slow
    for its NIC, as cp1 under TCG) queues tx_queue_len frames and counts the rest in tx_dropped. A real tap in a
    namespace made here, libvirt's live XML as captured, the rise named in a failing check's message."""
    ns = lab.netns("host")
    script = DRAIN_SCRIPT % (str(REPO), str(REPO / "tests/fixtures/libvirt/domain_live_cik8s_cp1.xml"),
                             str(REPO / "labs/ci-cluster.yaml"))
    out = json.loads(topo.sh("ip", "netns", "exec", ns, sys.executable, "-c", script).stdout)
    rise = out["measured"]["hypervisor_tap_drops"]
    assert list(rise) == ["cp1"] and list(rise["cp1"]) == ["vnet0"] and rise["cp1"]["vnet0"]["rx_dropped"] == 0
    # 200 frames sent into a ring of 16 (minus what the kernel's own IPv6 link-up traffic already holds there)
    assert 200 - 16 <= rise["cp1"]["vnet0"]["tx_dropped"] <= 200, rise
    assert out["problems"][1] == (
        "meanwhile the lab's hypervisor dropped packets before any datapath saw them: cp1 (tap vnet0: %d towards the "
        "guest, 0 from it): a guest that drains its NIC queue too slowly (TCG), below the cluster"
        % rise["cp1"]["vnet0"]["tx_dropped"])
