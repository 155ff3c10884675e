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
