"""conformance.hypervisor: the lab's tap drop counters, read through libvirt's live XML (captured from libvirtd)
and a sysfs stand-in; the rise and the sentence a load check's failure carries."""
from __future__ import annotations

from pathlib import Path

import pytest

from conformance.hypervisor import explain_tap_drops, read_tap_drops, tap_drop_rise
from lab.spec import load_lab

REPO = Path(__file__).resolve().parents[2]
LIVE = (REPO / "tests/fixtures/libvirt/domain_live_cik8s_cp1.xml").read_text()  # virsh dumpxml cik8s-cp1


def with_taps(xml: str, taps: list[str]) -> str:
    """The captured domain with its one <interface> repeated, one per tap (a node on several networks)."""
    start, end = xml.index("<interface "), xml.index("</interface>") + len("</interface>")
    nic = xml[start:end]
    return xml[:start] + "\n".join(nic.replace("vnet0", tap) for tap in taps) + xml[end:]


class FakeConn:
    def lookupByName(self, name):
        test = self

        class Dom:
            def XMLDesc(self, flags):
                taps = test.taps[name]
                return with_taps(LIVE, taps if isinstance(taps, list) else [taps])
        return Dom()

    def close(self):
        pass


@pytest.fixture
def lab():
    return load_lab(REPO / "labs/ci-cluster.yaml")


def sysfs(root: Path, counters: dict) -> Path:
    for tap, (tx, rx) in counters.items():
        (root / tap / "statistics").mkdir(parents=True, exist_ok=True)
        (root / tap / "statistics" / "tx_dropped").write_text(f"{tx}\n")
        (root / tap / "statistics" / "rx_dropped").write_text(f"{rx}\n")
    return root


def test_reads_each_nodes_tap_and_the_rise_names_only_droppers(lab, tmp_path, monkeypatch):
    import libvirt
    conn = FakeConn()
    conn.taps = {"cik8s-cp1": "vnet0", "cik8s-w1": "vnet1"}
    monkeypatch.setattr(libvirt, "open", lambda uri: conn)
    root = sysfs(tmp_path, {"vnet0": (0, 0), "vnet1": (3, 0)})
    before = read_tap_drops(lab, root)
    assert before == {"cp1": {"vnet0": {"tx_dropped": 0, "rx_dropped": 0}},
                      "w1": {"vnet1": {"tx_dropped": 3, "rx_dropped": 0}}}
    sysfs(root, {"vnet0": (761, 0), "vnet1": (3, 0)})
    rise = tap_drop_rise(before, read_tap_drops(lab, root))
    assert rise == {"cp1": {"vnet0": {"tx_dropped": 761, "rx_dropped": 0}}}
    assert explain_tap_drops(rise) == (
        "meanwhile the lab's hypervisor dropped packets before any datapath saw them: cp1 (tap vnet0: 761 towards "
        "the guest, 0 from it): a guest that drains its NIC queue too slowly (TCG), below the cluster")


def test_a_node_on_two_networks_has_both_taps_read_and_named(lab, tmp_path, monkeypatch):
    import libvirt
    conn = FakeConn()
    conn.taps = {"cik8s-cp1": ["vnet0", "vnet5"], "cik8s-w1": "vnet1"}
    monkeypatch.setattr(libvirt, "open", lambda uri: conn)
    root = sysfs(tmp_path, {"vnet0": (0, 0), "vnet5": (0, 0), "vnet1": (0, 0)})
    before = read_tap_drops(lab, root)
    assert sorted(before["cp1"]) == ["vnet0", "vnet5"]
    sysfs(root, {"vnet5": (40, 2)})
    rise = tap_drop_rise(before, read_tap_drops(lab, root))
    assert rise == {"cp1": {"vnet5": {"tx_dropped": 40, "rx_dropped": 2}}}
    assert "cp1 (tap vnet5: 40 towards the guest, 2 from it)" in explain_tap_drops(rise)


def test_unreadable_taps_are_not_a_reading(lab, tmp_path, monkeypatch):
    import libvirt
    conn = FakeConn()
    conn.taps = {"cik8s-cp1": "vnet0", "cik8s-w1": "vnet1"}
    monkeypatch.setattr(libvirt, "open", lambda uri: conn)
    assert read_tap_drops(lab, sysfs(tmp_path, {"vnet0": (0, 0)})) is None  # w1's tap is not in this namespace
    assert read_tap_drops(None) is None
    assert tap_drop_rise(None, {"cp1": {"vnet0": {"tx_dropped": 5, "rx_dropped": 0}}}) == {}
    assert explain_tap_drops({}) is None


def test_a_retapped_node_is_not_compared(lab):
    before = {"cp1": {"vnet0": {"tx_dropped": 700, "rx_dropped": 0}}}
    assert tap_drop_rise(before, {"cp1": {"vnet2": {"tx_dropped": 3, "rx_dropped": 0}}}) == {}


def test_tap_drops_around_a_load_are_recorded_and_named_only_in_a_failure(lab, tmp_path, monkeypatch):
    import libvirt

    from conformance.hypervisor import TapDrops
    conn = FakeConn()
    conn.taps = {"cik8s-cp1": "vnet0", "cik8s-w1": "vnet1"}
    monkeypatch.setattr(libvirt, "open", lambda uri: conn)
    taps = TapDrops(lab, sysfs(tmp_path, {"vnet0": (0, 0), "vnet1": (0, 0)}))
    sysfs(tmp_path, {"vnet0": (12, 0)})
    taps.stop()
    measured, healthy, failing = {}, [], ["only 1738 of 2000 held connections carried a byte"]
    taps.report(measured.__setitem__, healthy)
    taps.report(measured.__setitem__, failing)
    assert measured == {"hypervisor_tap_drops": {"cp1": {"vnet0": {"tx_dropped": 12, "rx_dropped": 0}}}}
    assert healthy == [] and failing[1].startswith("meanwhile the lab's hypervisor dropped packets")
