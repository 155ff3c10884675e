"""lab.virt.taps on a live domain XML captured from libvirtd (cik8s-cp1) and a sysfs stand-in (tests/netns/test_lab_taps.py: the kernel)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lab.virt.taps import interface_targets, raise_tx_queue_len, short_taps, tx_queue_len

LIVE = (Path(__file__).resolve().parents[1] / "fixtures/libvirt/domain_live_cik8s_cp1.xml").read_text()  # virsh dumpxml


def test_interface_targets_are_the_live_tap_names():
    assert interface_targets(LIVE) == ["vnet0"]  # the disks' and consoles' targets are not taps


@pytest.fixture
def sys_net(tmp_path):
    for dev, qlen in (("vnet0", 1000), ("vnet1", 10000)):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "tx_queue_len").write_text(f"{qlen}\n")
    return tmp_path


def test_short_taps_names_only_visible_devices_below_the_length(sys_net):
    assert short_taps(["vnet0", "vnet1", "vnet9"], 10000, sys_net) == {"vnet0": 1000}
    assert tx_queue_len("vnet9", sys_net) is None
    raise_tx_queue_len("vnet0", 10000, sys_net)
    assert short_taps(["vnet0", "vnet1"], 10000, sys_net) == {}
