"""What the lab's hypervisor dropped on the way to its nodes, read on the host the suite runs on (with --lab).

Each node's NIC ends on the host in a tap (libvirt's ``<target dev='vnetN'>``). Its ``tx_dropped`` counts packets
the host could not queue towards the guest -- lost below the cluster, before any datapath saw them. A load check
that lost packets names these counters, so that a guest too slow for its NIC queue (TCG) is not read as a fault of
the CNI; the counters are recorded with every load run."""
from __future__ import annotations

from pathlib import Path

from lab.virt.taps import SYS_NET


def read_tap_drops(lab, sys_net: Path = SYS_NET) -> dict[str, dict] | None:
    """node -> {tap: {"tx_dropped", "rx_dropped"}}, one entry per NIC, for the lab's running domains; None without
    a lab, a local libvirt or the taps in this network namespace (the counters cannot be read from here: nothing
    is judged)."""
    if lab is None:
        return None
    import libvirt

    from lab.virt.accel import is_local_uri
    from lab.virt.taps import interface_targets
    if not is_local_uri(lab.libvirt.uri):
        return None
    try:
        conn = libvirt.open(lab.libvirt.uri)
    except libvirt.libvirtError:
        return None
    out = {}
    try:
        for node in lab.nodes:
            try:
                taps = interface_targets(conn.lookupByName(lab.domain_name(node)).XMLDesc(0))
            except libvirt.libvirtError:
                return None
            for tap in taps:
                stats = sys_net / tap / "statistics"
                if not stats.is_dir():
                    return None
                out.setdefault(node.name, {})[tap] = {"tx_dropped": int((stats / "tx_dropped").read_text()),
                                                      "rx_dropped": int((stats / "rx_dropped").read_text())}
    finally:
        conn.close()
    return out


def tap_drop_rise(before: dict | None, after: dict | None) -> dict[str, dict]:
    """node -> {tap: {"tx_dropped", "rx_dropped"} rises} between two readings: only the taps that dropped, and only
    taps present in both (a node re-created between them has new taps, whose counters started again at 0)."""
    if not before or not after:
        return {}
    rise = {}
    for node, taps in sorted(after.items()):
        for tap, now in sorted(taps.items()):
            was = (before.get(node) or {}).get(tap)
            if not was:
                continue
            delta = {k: now[k] - was[k] for k in ("tx_dropped", "rx_dropped")}
            if any(delta.values()):
                rise.setdefault(node, {})[tap] = delta
    return rise


def explain_tap_drops(rise: dict[str, dict]) -> str | None:
    """The sentence a load check's failure carries when the hypervisor dropped packets during it."""
    if not rise:
        return None
    parts = [f"{node} (tap {tap}: {r['tx_dropped']} towards the guest, {r['rx_dropped']} from it)"
             for node, taps in rise.items() for tap, r in taps.items()]
    return ("meanwhile the lab's hypervisor dropped packets before any datapath saw them: " + ", ".join(parts)
            + ": a guest that drains its NIC queue too slowly (TCG), below the cluster")


class TapDrops:
    """The lab's tap drop counters around one load: read at creation, again by ``stop()``; ``report()`` records
    the rise (None when they cannot be read here) and names it in a failure."""

    def __init__(self, lab, sys_net: Path = SYS_NET):
        self.lab, self.sys_net = lab, sys_net
        self.before, self.rise = read_tap_drops(lab, sys_net), {}

    def stop(self) -> None:
        self.rise = tap_drop_rise(self.before, read_tap_drops(self.lab, self.sys_net))

    def report(self, measure, problems: list[str]) -> None:
        measure("hypervisor_tap_drops", self.rise if self.before is not None else None)
        text = explain_tap_drops(self.rise)
        if problems and text:
            problems.append(text)
