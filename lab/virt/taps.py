"""The host side of each node's NIC: the tap device libvirt creates for it (``<target dev='vnetN'>``).

A tap queues what the host sends to the guest in a ring of ``tx_queue_len`` packets (1000 by default) and drops
what does not fit (its TX "dropped" counter). A guest under TCG drains that ring slowly, so a burst towards one
node -- a thousand held connections sending their verify byte at once over VXLAN -- overflows it: seen on the CI
cluster as 761 drops on cp1's tap since boot, in a suite run where 262 of 2,000 held connections lost their verify
byte. The lab raises the ring of the taps it owns; the kernel resizes it live (no restart of the guest)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

TAP_TX_QUEUE_LEN = 10000
SYS_NET = Path("/sys/class/net")


def interface_targets(domain_xml: str) -> list[str]:
    """The host-side device of each interface of a running domain (libvirt's live ``<target dev>``)."""
    root = ET.fromstring(domain_xml)
    return [t.get("dev") for t in root.findall("devices/interface/target") if t.get("dev")]


def tx_queue_len(dev: str, sys_net: Path = SYS_NET) -> int | None:
    """The device's tx_queue_len, None when the device is not in this network namespace."""
    path = sys_net / dev / "tx_queue_len"
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None


def short_taps(devs: list[str], want: int = TAP_TX_QUEUE_LEN, sys_net: Path = SYS_NET) -> dict[str, int]:
    """dev -> its queue length, for every visible device below ``want``."""
    out = {}
    for dev in devs:
        have = tx_queue_len(dev, sys_net)
        if have is not None and have < want:
            out[dev] = have
    return out


def raise_tx_queue_len(dev: str, want: int = TAP_TX_QUEUE_LEN, sys_net: Path = SYS_NET) -> None:
    (sys_net / dev / "tx_queue_len").write_text(f"{want}\n")
