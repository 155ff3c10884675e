"""lab.virt.hypervisor against libvirt's in-process test driver (test:///default), plus the accelerator logic.

test:///default keeps ONE state per process: every connection sees the same objects and they survive closing
all connections (test_default_driver_state_is_shared). So each test uses its own lab name and the ``hv``
fixture removes whatever a test added, whatever the outcome: the tests run in any order, alone or together.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from lab.errors import VirtError
from lab.spec import parse_lab
from lab.virt import accel as hvmod
from lab.virt.accel import AccelFacts, decide_accel, is_local_uri, local_accel
from lab.virt.hypervisor import Hypervisor
from lab.virt.xml import domain_xml, network_xml, pool_xml, volume_xml

URI = "test:///default"


def make_lab(name: str | None = None, nodes=("cp1", "w1")):
    name = name or f"t{uuid.uuid4().hex[:8]}"
    return parse_lab({"name": name, "network": {"cidr": "10.88.0.0/24"}, "kubernetes": {"enabled": False},
                      "libvirt": {"uri": URI, "poolPath": f"/nonexistent/lab-{name}"},
                      "nodes": [{"name": n, "role": "control-plane" if i == 0 else "worker", "cpus": 1,
                                 "memory": 1024} for i, n in enumerate(nodes)]})


def inventory(conn) -> set[tuple[str, str]]:
    return ({("domain", d.name()) for d in conn.listAllDomains(0)}
            | {("network", n.name()) for n in conn.listAllNetworks(0)}
            | {("pool", p.name()) for p in conn.listAllStoragePools(0)})


@pytest.fixture
def hv():
    warnings: list[str] = []
    hv = Hypervisor(URI, warn=warnings.append)
    hv.warnings = warnings
    before = inventory(hv.conn)
    yield hv
    cleaner = Hypervisor(URI)
    for kind, name in inventory(cleaner.conn) - before:
        getattr(cleaner, f"remove_{kind}")(name)
    cleaner.close()
    hv.close()


def up(hv: Hypervisor, lab, start: bool = True) -> None:
    """What `lab up` does with libvirt, condensed: network, pool, overlays, seeds, domains."""
    net, _ = hv.ensure_network(network_xml(lab))
    for node in lab.nodes:
        hv.ensure_dhcp_host(net, lab.mac(node), str(node.ip), node.name)
    pool, _ = hv.ensure_pool(pool_xml(lab))
    base, _ = hv.ensure_volume(pool, volume_xml("base.qcow2", 2**30, "qcow2"))
    for node in lab.nodes:
        disk, _ = hv.ensure_volume(pool, volume_xml(f"{node.name}.qcow2", 4 * 2**30, backing=base.path()))
        seed, _ = hv.ensure_volume(pool, volume_xml(f"{node.name}-cidata.img", 65536, "raw"))
        dom = hv.define_domain(domain_xml(lab, node, virt_type="qemu", disk_path=disk.path(), seed_path=seed.path(),
                                          console_log=f"/tmp/{lab.domain_name(node)}.log"))
        if start:
            hv.start(dom)


# ---------------------------------------------------------------------------------------------- connection


SHARED_STATE_PROBE = """
import gc, libvirt
libvirt.registerErrorHandler(lambda *a: None, None)
a, b = libvirt.open("test:///default"), libvirt.open("test:///default")
a.networkDefineXML("<network><name>probe</name></network>")
print("shared" if "probe" in b.listNetworks() + b.listDefinedNetworks() else "separate")
a.close(); b.close(); gc.collect()
c = libvirt.open("test:///default")
print("kept" if "probe" in c.listDefinedNetworks() else "reset")
"""


def test_default_driver_state_is_shared_while_any_connection_lives():
    """In a fresh process: two connections share one state; once the last reference is gone it is reset.

    Any libvirt object (a virNetwork, a pending event callback) holds its connection, so within a test
    session the state may outlive a test: hence unique lab names and the cleanup in the ``hv`` fixture.
    """
    out = subprocess.run([sys.executable, "-c", SHARED_STATE_PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["shared", "reset"]


def test_unreachable_daemon_names_the_uri_and_how_to_start_it():
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(VirtError) as err:
        Hypervisor(uri)
    assert uri in err.value.message and "systemctl start libvirtd" in err.value.hint
    assert f"virsh -c {uri} version" in err.value.hint


def test_context_manager_closes_the_connection():
    with Hypervisor(URI) as hv:
        assert hv.simulated and hv.conn.isAlive()
    assert hv.conn is None


@pytest.mark.parametrize("uri, local", [
    ("qemu:///system", True), ("qemu:///session", True), ("qemu+unix:///system", True), ("test:///default", True),
    ("qemu+ssh://root@kvm1/system", False), ("qemu+tcp://kvm1/system", False), ("qemu+tls://kvm1/system", False),
])
def test_is_local_uri(uri, local):
    assert is_local_uri(uri) is local


def test_lookups_return_none_when_absent(hv):
    assert hv.network("lab-absent") is None
    assert hv.pool("lab-absent") is None
    assert hv.domain("absent-cp1") is None
    assert hv.volume("default-pool", "absent.qcow2") is None
    assert hv.domain_state("absent-cp1") is None
    assert hv.host_interface("nosuchbr0") is False
    with pytest.raises(VirtError, match="pool lab-absent does not exist"):
        hv.volume("lab-absent", "x")


# ---------------------------------------------------------------------------------------------- network


def test_ensure_network_is_idempotent_and_restarts_an_inactive_network(hv):
    lab = make_lab()
    net, created = hv.ensure_network(network_xml(lab))
    assert created and net.isActive() and net.autostart()
    again, created = hv.ensure_network(network_xml(lab))
    assert not created and again.UUIDString() == net.UUIDString()
    net.destroy()
    net.setAutostart(0)
    again, created = hv.ensure_network(network_xml(lab))
    assert not created and again.isActive() and again.autostart()
    assert hv.owned_networks(lab.name) == [lab.network_name]


def test_ensure_network_refuses_a_network_it_does_not_own(hv):
    lab = make_lab()
    hv.conn.networkDefineXML(f"<network><name>{lab.network_name}</name><bridge name='foreign0'/></network>")
    with pytest.raises(VirtError, match="belongs to nobody we know") as err:
        hv.ensure_network(network_xml(lab))
    assert "rename the lab" in err.value.hint


class LifecycleEvents:
    """Network start/stop events, delivered by libvirt's default event loop in a daemon thread."""

    _loop_started = False

    def __init__(self, conn):
        if not LifecycleEvents._loop_started:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)],
                             daemon=True).start()
            LifecycleEvents._loop_started = True
        self.conn, self.seen = conn, []
        self.id = conn.networkEventRegisterAny(None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                                               lambda _c, net, event, _d, _o: self.seen.append((net.name(), event)),
                                               None)

    def settle(self) -> list:
        time.sleep(0.3)
        return list(self.seen)

    def close(self):
        self.conn.networkEventDeregisterAny(self.id)


def dhcp_hosts(net) -> set[tuple[str, str, str]]:
    return {(h.get("mac"), h.get("ip"), h.get("name")) for h in ET.fromstring(net.XMLDesc(0)).findall("ip/dhcp/host")}


class RecordingNetwork:
    """The real virNetwork, with its update() calls recorded: the test driver keeps ONE definition for an
    active network (it refuses VIR_NETWORK_XML_INACTIVE and drops config-only updates), so which scopes we
    asked for is the part of "live AND config" that can be checked here; the e2e test checks the rest."""

    def __init__(self, net):
        self._net, self.updates = net, []

    def update(self, command, section, parent, xml, flags):
        self.updates.append((command, flags))
        return self._net.update(command, section, parent, xml, flags)

    def __getattr__(self, name):
        return getattr(self._net, name)


def test_dhcp_host_added_live_and_to_config_without_restart_and_idempotent(hv):
    lab = make_lab()
    net = RecordingNetwork(hv.ensure_network(network_xml(lab))[0])
    live, config = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE, libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
    add, modify = libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_UPDATE_COMMAND_MODIFY
    events = LifecycleEvents(hv.conn)
    try:
        entry = ("52:54:00:aa:bb:cc", "10.88.0.50", "extra")
        assert hv.ensure_dhcp_host(net, *entry) is True
        assert entry in dhcp_hosts(net)
        assert sorted(net.updates) == sorted([(add, config), (add, live)])
        assert hv.ensure_dhcp_host(net, "52:54:00:AA:BB:CC", "10.88.0.50", "extra") is False
        assert len(net.updates) == 2  # nothing asked of libvirt the second time
        moved = ("52:54:00:aa:bb:cc", "10.88.0.51", "extra")
        assert hv.ensure_dhcp_host(net, *moved) is True
        assert moved in dhcp_hosts(net) and entry not in dhcp_hosts(net)
        assert {c for c, _ in net.updates[2:]} == {modify}
        assert events.settle() == [] and net.isActive()  # never stopped or restarted
        net.destroy()
        net.create()  # the control: a restart IS seen by this listener
        assert [e for n, e in events.settle() if n == lab.network_name] == [
            libvirt.VIR_NETWORK_EVENT_STOPPED, libvirt.VIR_NETWORK_EVENT_STARTED]
    finally:
        events.close()


def test_dhcp_host_on_an_inactive_network_goes_to_config_only(hv):
    lab = make_lab()
    net, _ = hv.ensure_network(network_xml(lab))
    net.destroy()
    assert hv.ensure_dhcp_host(net, "52:54:00:aa:bb:01", "10.88.0.60", "later") is True
    assert ("52:54:00:aa:bb:01", "10.88.0.60", "later") in dhcp_hosts(net)  # the definition
    net.create()
    assert ("52:54:00:aa:bb:01", "10.88.0.60", "later") in dhcp_hosts(net)
    assert hv.ensure_dhcp_host(lab.network_name, "52:54:00:aa:bb:01", "10.88.0.60", "later") is False


def test_dhcp_host_refuses_to_steal_an_address_or_name(hv):
    lab = make_lab()
    net, _ = hv.ensure_network(network_xml(lab))
    cp1 = lab.nodes[0]
    with pytest.raises(VirtError, match=f"reserves {cp1.ip}"):
        hv.ensure_dhcp_host(net, "52:54:00:00:00:99", str(cp1.ip), "thief")
    with pytest.raises(VirtError, match="for MAC"):
        hv.ensure_dhcp_host(net, "52:54:00:00:00:99", "10.88.0.77", cp1.name)
    assert all(h[0] != "52:54:00:00:00:99" for h in dhcp_hosts(net))


# ---------------------------------------------------------------------------------------------- storage


def test_ensure_pool_and_volume_are_idempotent(hv):
    lab = make_lab()
    pool, created = hv.ensure_pool(pool_xml(lab))
    assert created and pool.isActive() and pool.autostart()
    assert hv.ensure_pool(pool_xml(lab))[1] is False
    pool.destroy()
    again, created = hv.ensure_pool(pool_xml(lab))
    assert not created and again.isActive()
    base, created = hv.ensure_volume(pool, volume_xml("base.qcow2", 2**30))
    assert created
    overlay, created = hv.ensure_volume(lab.pool_name, volume_xml("cp1.qcow2", 4 * 2**30, backing=base.path()))
    assert created and ET.fromstring(overlay.XMLDesc(0)).findtext("backingStore/path") == base.path()
    again, created = hv.ensure_volume(pool, volume_xml("cp1.qcow2", 4 * 2**30, backing=base.path()))
    assert not created and again.key() == overlay.key()
    assert sorted(pool.listVolumes()) == ["base.qcow2", "cp1.qcow2"]


def test_ensure_pool_refuses_a_moved_path(hv):
    lab = make_lab()
    hv.ensure_pool(pool_xml(lab))
    moved = pool_xml(lab).replace(lab.pool_path, "/elsewhere/pool")
    with pytest.raises(VirtError, match=f"exists at {lab.pool_path}, not /elsewhere/pool"):
        hv.ensure_pool(moved)


def test_upload_on_the_test_driver_warns_that_no_data_is_kept(hv, tmp_path):
    lab = make_lab()
    pool, _ = hv.ensure_pool(pool_xml(lab))
    vol, _ = hv.ensure_volume(pool, volume_xml("seed.img", 4096, "raw"))
    assert hv.upload(vol, b"x" * 4096) is False
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"\0" * 1000)
    assert hv.upload(vol, image) is False
    assert len(hv.warnings) == 2
    assert all("simulated test driver" in w and "EMPTY" in w and "seed.img" in w for w in hv.warnings)


def test_upload_failure_raises_everywhere_but_the_test_driver(hv, tmp_path):
    lab = make_lab()
    pool, _ = hv.ensure_pool(pool_xml(lab))
    vol, _ = hv.ensure_volume(pool, volume_xml("seed.img", 4096, "raw"))
    hv.simulated = False  # the same refusal from any real driver is a failure, never a warning
    with pytest.raises(VirtError, match="uploading 4096 bytes into volume seed.img failed"):
        hv.upload(vol, b"x" * 4096)
    with pytest.raises(VirtError, match="cannot upload .*missing.qcow2"):
        hv.upload(vol, tmp_path / "missing.qcow2")
    assert hv.warnings == []


# ---------------------------------------------------------------------------------------------- domains


def test_define_start_and_state(hv):
    lab = make_lab(nodes=("cp1",))
    up(hv, lab, start=False)
    name = lab.domain_name("cp1")
    assert hv.domain_state(name) == "shutoff"
    assert hv.start(name) is True and hv.domain_state(name) == "running"
    assert hv.start(hv.domain(name)) is False
    dom = hv.domain(name)
    xml = domain_xml(lab, lab.nodes[0], virt_type="kvm", disk_path="/other", seed_path="/s", console_log="/l")
    assert hv.define_domain(xml).UUIDString() == dom.UUIDString()  # present: returned unchanged
    assert ET.fromstring(dom.XMLDesc(0)).get("type") == "qemu"


def test_domain_names_can_collide_across_labs_and_ownership_catches_it(hv):
    first = make_lab(name=f"a{uuid.uuid4().hex[:6]}", nodes=("b-cp1",))
    second = make_lab(name=f"{first.name}-b", nodes=("cp1",))
    assert first.domain_name("b-cp1") == second.domain_name("cp1")
    up(hv, first, start=False)
    xml = domain_xml(second, second.nodes[0], virt_type="qemu", disk_path="/d", seed_path="/s", console_log="/l")
    with pytest.raises(VirtError, match=f"belongs to lab {first.name}, not lab {second.name}"):
        hv.define_domain(xml)
    assert hv.owned_domains(second.name) == {}


def test_remove_domain_with_managed_save_and_snapshots(hv):
    lab = make_lab(nodes=("cp1",))
    up(hv, lab)
    dom = hv.domain(lab.domain_name("cp1"))
    dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    dom.managedSave(0)  # a plain undefine now refuses: the flags are what make removal work
    with pytest.raises(libvirt.libvirtError, match="managed save"):
        dom.undefine()
    assert hv.remove_domain(lab.domain_name("cp1")) is True
    assert hv.domain(lab.domain_name("cp1")) is None
    assert hv.remove_domain(lab.domain_name("cp1")) is False


def test_remove_running_domain_network_and_pool_leaves_nothing(hv):
    lab = make_lab()
    before = inventory(hv.conn)
    up(hv, lab)
    assert hv.pool(lab.pool_name).numOfVolumes() == 5
    for name in hv.owned_domains(lab.name):
        assert hv.remove_domain(name)
    for name in hv.owned_networks(lab.name):
        assert hv.remove_network(name)
    assert hv.remove_pool(lab.pool_name)
    assert inventory(hv.conn) == before
    assert not {o for o in inventory(hv.conn) if lab.name in o[1]}
    assert (hv.remove_network(lab.network_name), hv.remove_pool(lab.pool_name)) == (False, False)


def test_remove_pool_when_inactive(hv):
    lab = make_lab()
    pool, _ = hv.ensure_pool(pool_xml(lab))
    hv.ensure_volume(pool, volume_xml("a.img", 4096, "raw"))
    pool.destroy()
    assert hv.remove_pool(lab.pool_name) is True and hv.pool(lab.pool_name) is None


def test_owned_objects_never_include_another_labs(hv):
    alpha, beta = make_lab(), make_lab()
    up(hv, alpha)
    up(hv, beta)
    assert hv.owned_domains(alpha.name) == {alpha.domain_name(n): n.name for n in alpha.nodes}
    assert hv.owned_networks(alpha.name) == [alpha.network_name]
    for name in hv.owned_domains(alpha.name):
        hv.remove_domain(name)
    for name in hv.owned_networks(alpha.name):
        hv.remove_network(name)
    hv.remove_pool(alpha.pool_name)
    assert hv.owned_domains(alpha.name) == {} and hv.owned_networks(alpha.name) == []
    assert hv.owned_domains(beta.name) == {beta.domain_name(n): n.name for n in beta.nodes}
    assert all(hv.domain_state(beta.domain_name(n)) == "running" for n in beta.nodes)
    assert hv.network(beta.network_name).isActive() and hv.pool(beta.pool_name).numOfVolumes() == 5
    assert "test" not in hv.owned_domains("test")  # the driver's own domain carries no metadata of ours


# ---------------------------------------------------------------------------------------------- addresses


def test_addresses_empty_while_off_or_for_an_unknown_mac(hv):
    lab = make_lab(nodes=("cp1",))
    up(hv, lab, start=False)
    name = lab.domain_name("cp1")
    assert hv.addresses(name, lab.mac("cp1")) == []
    hv.start(name)
    assert hv.addresses(name, "52:54:00:de:ad:00") == []


def test_addresses_on_the_test_driver_are_fabricated_by_libvirt(hv):
    """Recorded so nobody mistakes them for the lab's: the test driver invents an IPv4 for any running NIC."""
    lab = make_lab(nodes=("cp1",))
    up(hv, lab)
    found = hv.addresses(lab.domain_name("cp1"), lab.mac("cp1").upper())
    assert len(found) == 1 and found[0][0] == "lease"
    assert found[0][1] != str(lab.nodes[0].ip)


def _error(code: int) -> libvirt.libvirtError:
    exc = libvirt.libvirtError("injected")
    exc.err = (code, libvirt.VIR_FROM_QEMU, f"injected error {code}", 2, None, None, None, -1, -1)
    return exc


class ScriptedDomain:
    """A stand-in domain whose address sources answer as scripted (a real guest's agent cannot be faked)."""

    def __init__(self, answers: dict):
        self.answers, self.asked = answers, []

    def isActive(self):
        return 1

    def name(self):
        return "scripted"

    def interfaceAddresses(self, source, flags):
        self.asked.append(source)
        answer = self.answers[source]
        if isinstance(answer, libvirt.libvirtError):
            raise answer
        return answer


def nic(mac: str, *addrs: tuple[int, str]) -> dict:
    return {"vnet0": {"hwaddr": mac, "addrs": [{"addr": a, "prefix": 24, "type": t} for t, a in addrs]}}


def test_addresses_fall_through_agent_not_connected_to_arp(hv):
    mac = "52:54:00:12:34:56"
    dom = ScriptedDomain({libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: {},
                          libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT: _error(libvirt.VIR_ERR_AGENT_UNRESPONSIVE),
                          libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP: nic(mac, (libvirt.VIR_IP_ADDR_TYPE_IPV6,
                                                                                    "fe80::1"),
                                                                               (libvirt.VIR_IP_ADDR_TYPE_IPV4,
                                                                                "10.88.0.10"))})
    assert hv.addresses(dom, mac) == [("arp", "10.88.0.10")]
    assert len(dom.asked) == 3


def test_addresses_stop_at_the_first_source_that_knows(hv):
    mac = "52:54:00:12:34:56"
    dom = ScriptedDomain({libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: nic(mac, (0, "10.88.0.10"))})
    assert hv.addresses(dom, mac) == [("lease", "10.88.0.10")] and len(dom.asked) == 1


def test_addresses_all_sources_silent_is_empty_and_a_real_failure_is_recorded(hv):
    silent = {libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: _error(libvirt.VIR_ERR_NO_SUPPORT),
              libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT: _error(libvirt.VIR_ERR_AGENT_UNSYNCED),
              libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP: _error(libvirt.VIR_ERR_OPERATION_INVALID)}
    assert hv.addresses(ScriptedDomain(silent), "52:54:00:12:34:56") == []
    assert hv.address_errors == {}
    # libvirt 9.0's ARP reader fails on newer kernels ("wrong nlmsg len"): the wait goes on, the error is kept
    broken = {**silent, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP: _error(libvirt.VIR_ERR_INTERNAL_ERROR)}
    assert hv.addresses(ScriptedDomain(broken), "52:54:00:12:34:56") == []
    assert set(hv.address_errors) == {"arp"}


def test_a_failing_source_does_not_hide_a_later_answer(hv):
    mac = "52:54:00:12:34:56"
    dom = ScriptedDomain({libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: _error(libvirt.VIR_ERR_RPC),
                          libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT: nic(mac, (0, "10.88.0.11"))})
    assert hv.addresses(dom, mac) == [("agent", "10.88.0.11")]
    assert set(hv.address_errors) == {"lease"}


# ---------------------------------------------------------------------------------------------- accelerator


def cpu_has_virtualization() -> bool:
    return bool(hvmod.cpuinfo_flags() & {"vmx", "svm"})


def test_detect_accel_here_picks_tcg_with_a_warning(hv):
    virt_type, warning = hv.detect_accel("auto")
    assert virt_type == "qemu"
    assert "TCG" in warning and "slower" in warning and URI in warning
    assert "does not offer domain type kvm" in warning  # the test driver's guests are type 'test'
    if not cpu_has_virtualization():  # this machine: no vmx/svm flag
        assert "neither vmx nor svm" in warning


def test_detect_accel_here_refuses_kvm_and_honours_tcg(hv):
    with pytest.raises(VirtError, match="libvirt.accel is kvm but KVM is unusable"):
        hv.detect_accel("kvm")
    assert hv.detect_accel("tcg") == ("qemu", None)


def test_accel_facts_read_from_this_host(hv):
    facts = hv.accel_facts()
    assert facts.local and facts.uri == URI
    assert bool(facts.cpu_flags & {"vmx", "svm"}) == cpu_has_virtualization()
    assert facts.kvm_offered == "its guest domain types are test"


GOOD = AccelFacts(uri="qemu:///system", local=True, cpu_flags=frozenset({"sse2", "vmx"}), kvm_device=None,
                  kvm_offered=None)


@pytest.mark.parametrize("facts, requested, expected, words", [
    (GOOD, "auto", "kvm", None),
    (GOOD, "kvm", "kvm", None),
    (GOOD, "tcg", "qemu", None),
    (AccelFacts(GOOD.uri, True, frozenset({"svm"}), None, None), "auto", "kvm", None),
    (AccelFacts(GOOD.uri, True, frozenset({"sse2"}), None, None), "auto", "qemu", "neither vmx nor svm"),
    (AccelFacts(GOOD.uri, True, GOOD.cpu_flags, "cannot be opened read-write by this user (add it to group kvm)",
                None), "auto", "qemu", "/dev/kvm cannot be opened read-write"),
    (AccelFacts(GOOD.uri, True, GOOD.cpu_flags, None, "KVM is not supported by '/usr/bin/qemu-system-x86_64'"),
     "auto", "qemu", "does not offer domain type kvm"),
    # remote: /dev/kvm on this machine says nothing about the hypervisor host
    (AccelFacts("qemu+ssh://kvm1/system", False, GOOD.cpu_flags, "does not exist", None), "auto", "kvm", None),
])
def test_decide_accel(facts, requested, expected, words):
    virt_type, warning = decide_accel(requested, facts)
    assert virt_type == expected
    if words is None:
        assert warning is None
    else:
        assert words in warning and "TCG" in warning and "slower" in warning


def test_decide_accel_kvm_requested_but_unusable_lists_every_reason():
    facts = AccelFacts("qemu:///system", True, frozenset(), "does not exist (kvm_intel/kvm_amd not loaded, ...)",
                       "domain capabilities do not list kvm")
    with pytest.raises(VirtError) as err:
        decide_accel("kvm", facts)
    message = err.value.message
    assert "neither vmx nor svm" in message and "/dev/kvm does not exist" in message and "do not list kvm" in message
    assert "libvirt.accel: auto" in err.value.hint


def test_decide_accel_rejects_unknown_requests():
    with pytest.raises(VirtError, match="'hvf' is not known") as err:
        decide_accel("hvf", GOOD)
    assert err.value.exit_code == 2


def test_local_accel_here_agrees_with_this_machine():
    """``lab render`` decides without libvirt: on this machine (no vmx/svm) that is TCG with the reason."""
    virt_type, warning = local_accel("auto")
    if cpu_has_virtualization() and hvmod.open_kvm_device() is None:
        assert (virt_type, warning) == ("kvm", None)
    else:
        assert virt_type == "qemu" and "TCG" in warning
    assert local_accel("tcg") == ("qemu", None)


def test_kvm_device_and_cpuinfo_probes(tmp_path):
    assert "does not exist" in hvmod.open_kvm_device(str(tmp_path / "kvm"))
    assert hvmod.open_kvm_device(str(tmp_path)).startswith("cannot be opened")  # a directory: EISDIR
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 vmx\n\nprocessor\t: 1\nflags\t\t: fpu sse2 vmx\n")
    assert hvmod.cpuinfo_flags(str(cpuinfo)) == {"fpu", "sse2", "vmx"}
    assert hvmod.cpuinfo_flags(str(tmp_path / "none")) == set()
