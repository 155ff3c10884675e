"""--failover-by: the ways the failover check takes the announcer away. Suspend runs against libvirt's test driver
(a real libvirt connection, no VM); link-down's device update is checked on the XML it hands libvirt (the test
driver has no virDomainUpdateDeviceFlags; the real-cluster tier runs it against qemu)."""
from __future__ import annotations

import types
import xml.etree.ElementTree as ET

import libvirt
import pytest

from conformance.failover import hypervisor_down, set_link, usage_problem
from conformance.judge import NotMeasured


def fake_lab(uri="test:///default", domain="test", mac="aa:bb:cc:dd:ee:ff"):
    return types.SimpleNamespace(libvirt=types.SimpleNamespace(uri=uri), domain_name=lambda node: domain,
                                 mac=lambda node: mac)


def test_usage_names_the_option_and_the_fix():
    assert usage_problem("taint", None) is None
    assert usage_problem("suspend", fake_lab()) is None
    assert "--lab" in usage_problem("suspend", None) and "--failover-by taint" in usage_problem("link-down", None)
    assert "taint, suspend, link-down" in usage_problem("reboot", fake_lab())


def test_suspend_pauses_the_domain_and_restore_resumes_it():
    conn = libvirt.open("test:///default")  # the test driver keeps its state per process
    dom = conn.lookupByName("test")
    restore = hypervisor_down(fake_lab(), "w1", "suspend")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    restore()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_unknown_domain_is_not_measured_naming_it():
    with pytest.raises(NotMeasured, match="no domain nosuch-w1 for node w1"):
        hypervisor_down(fake_lab(domain="nosuch-w1"), "w1", "suspend")


class RecordingDomain:
    def __init__(self, xml):
        self.xml, self.updates = xml, []

    def XMLDesc(self, flags):
        return self.xml

    def name(self):
        return "cik8s-w1"

    def updateDeviceFlags(self, xml, flags):
        self.updates.append((xml, flags))


DOMAIN_XML = """<domain><devices>
<interface type='network'><mac address='52:54:00:aa:aa:aa'/><source network='lab-x'/><model type='virtio'/></interface>
<interface type='network'><mac address='52:54:00:bb:bb:bb'/><source network='lab-x'/><link state='up'/></interface>
</devices></domain>"""


def test_link_state_is_set_on_the_interface_with_that_mac_only():
    dom = RecordingDomain(DOMAIN_XML)
    set_link(dom, "52:54:00:BB:BB:BB", "down")
    [(xml, flags)] = dom.updates
    iface = ET.fromstring(xml)
    assert iface.find("mac").get("address") == "52:54:00:bb:bb:bb" and iface.find("link").get("state") == "down"
    assert flags == libvirt.VIR_DOMAIN_AFFECT_LIVE
    set_link(dom, "52:54:00:aa:aa:aa", "down")  # no <link> yet: one is added
    assert ET.fromstring(dom.updates[1][0]).find("link").get("state") == "down"


def test_link_of_a_mac_the_domain_lacks_is_not_measured():
    with pytest.raises(NotMeasured, match="no interface with MAC 52:54:00:cc:cc:cc"):
        set_link(RecordingDomain(DOMAIN_XML), "52:54:00:cc:cc:cc", "down")

