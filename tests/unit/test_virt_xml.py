"""lab.virt.xml: every builder's output passes libvirt's own schemas (virt-xml-validate) and says what we mean."""
from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

import pytest

from lab.spec import parse_lab
from lab.virt.xml import NS, TCG_CPU_MODEL, TCG_KERNEL_ARGS, domain_xml, network_xml, parse_owner, pool_xml, volume_xml

OWNER = f"{{{NS}}}owner"


def make_lab(mode: str = "nat", name: str = "t1", mtu: int = 1400):
    network = {"mode": mode, "cidr": "10.77.0.0/24", "mtu": mtu}
    if mode == "bridge":
        network["bridge"] = "br0"
    return parse_lab({"name": name, "network": network, "kubernetes": {"enabled": False},
                      "nodes": [{"name": "cp1", "role": "control-plane", "cpus": 2, "memory": 1536},
                                {"name": "w1", "role": "worker", "cpus": 1, "memory": 1024}]})


def validate(tmp_path, text: str, schema: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{schema}.xml"
    path.write_text(text)
    return subprocess.run(["virt-xml-validate", str(path), schema], capture_output=True, text=True)


def assert_valid(tmp_path, text: str, schema: str) -> ET.Element:
    result = validate(tmp_path, text, schema)
    assert result.returncode == 0, f"{schema} XML rejected by virt-xml-validate:\n{result.stderr}\n{text}"
    return ET.fromstring(text)


def test_validator_rejects_an_invalid_document(tmp_path):
    """The schema check can fail: a domain without <memory> and with a bogus device is refused."""
    bad = domain_xml(make_lab(), make_lab().nodes[0], virt_type="qemu", disk_path="/p/d", seed_path="/p/s",
                     console_log="/l").replace("<memballoon", "<nosuchdevice").replace("</memballoon", "</nosuchdevice")
    assert validate(tmp_path, bad, "domain").returncode != 0


# ---------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("mode", ["nat", "isolated"])
def test_network_xml_valid_with_mtu_bridge_and_reservations(tmp_path, mode):
    lab = make_lab(mode)
    net = assert_valid(tmp_path, network_xml(lab), "network")
    assert net.findtext("name") == lab.network_name
    assert net.find("bridge").get("name") == lab.bridge_name
    assert net.find("mtu").get("size") == "1400"
    forward = net.find("forward")
    assert (forward.get("mode") if forward is not None else None) == ("nat" if mode == "nat" else None)
    ip = net.find("ip")
    assert (ip.get("address"), ip.get("netmask")) == ("10.77.0.1", "255.255.255.0")
    rng = ip.find("dhcp/range")
    assert (rng.get("start"), rng.get("end")) == tuple(str(a) for a in lab.dhcp_range)
    hosts = {(h.get("mac"), h.get("ip"), h.get("name")) for h in ip.findall("dhcp/host")}
    assert hosts == {(lab.mac(n), str(n.ip), n.name) for n in lab.nodes}
    assert parse_owner(network_xml(lab)) == ("t1", None)


def test_bridge_mode_has_no_network_object():
    assert network_xml(make_lab("bridge")) is None


# ---------------------------------------------------------------------------------------------- storage


def test_pool_xml_is_a_dir_pool_at_the_lab_path(tmp_path):
    lab = make_lab()
    pool = assert_valid(tmp_path, pool_xml(lab), "storagepool")
    assert pool.get("type") == "dir"
    assert pool.findtext("name") == lab.pool_name
    assert pool.findtext("target/path") == lab.pool_path == "/var/lib/libvirt/images/lab-t1"
    assert pool.findtext("target/permissions/mode") == "0711"


@pytest.mark.parametrize("backing", ["/pool/base.qcow2", ("/pool/base.raw", "raw")])
def test_volume_xml_qcow2_overlay(tmp_path, backing):
    vol = assert_valid(tmp_path, volume_xml("cp1.qcow2", 20 * 2**30, "qcow2", backing=backing), "storagevol")
    assert vol.findtext("name") == "cp1.qcow2"
    assert vol.find("capacity").get("unit") == "bytes" and vol.findtext("capacity") == str(20 * 2**30)
    assert vol.find("target/format").get("type") == "qcow2"
    path, fmt = (backing, "qcow2") if isinstance(backing, str) else backing
    assert vol.findtext("backingStore/path") == path
    assert vol.find("backingStore/format").get("type") == fmt


def test_volume_xml_raw_without_backing(tmp_path):
    vol = assert_valid(tmp_path, volume_xml("cp1-cidata.img", 374784, "raw"), "storagevol")
    assert vol.find("target/format").get("type") == "raw"
    assert vol.find("backingStore") is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(fmt="vmdk"), "use qcow2 or raw"),
    (dict(capacity_bytes=0), "capacity must be positive"),
    (dict(fmt="raw", backing="/b.qcow2"), "only a qcow2 volume"),
])
def test_volume_xml_rejects_nonsense(kwargs, message):
    args = dict(name="v", capacity_bytes=1, fmt="qcow2") | kwargs
    with pytest.raises(ValueError, match=message):
        volume_xml(**args)


# ---------------------------------------------------------------------------------------------- domain

KERNEL = dict(kernel="/pool/vmlinuz", initrd="/pool/initrd", cmdline="root=/dev/vda rw console=ttyS0,115200n8")


@pytest.mark.parametrize("mode", ["nat", "isolated", "bridge"])
@pytest.mark.parametrize("image", ["qcow2", "kernel"])
@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_domain_xml_valid_virtio_node(tmp_path, mode, image, virt_type):
    lab = make_lab(mode)
    node = lab.nodes[0]
    text = domain_xml(lab, node, virt_type=virt_type, disk_path="/pool/cp1.qcow2", seed_path="/pool/cp1-cidata.img",
                      console_log="/var/log/libvirt/qemu/t1-cp1-serial.log", **(KERNEL if image == "kernel" else {}))
    dom = assert_valid(tmp_path, text, "domain")
    assert dom.get("type") == virt_type
    assert dom.findtext("name") == "t1-cp1"
    assert dom.find("memory").get("unit") == "MiB" and dom.findtext("memory") == "1536"
    assert dom.findtext("vcpu") == "2"
    os_ = dom.find("os")
    if image == "kernel":
        # TCG guests trust the TSC (else acpi_pm: every clock read a port I/O through qemu); KVM keeps kvm-clock
        want = KERNEL["cmdline"] + (f" {TCG_KERNEL_ARGS}" if virt_type == "qemu" else "")
        assert (os_.findtext("kernel"), os_.findtext("initrd"), os_.findtext("cmdline")) == \
            (KERNEL["kernel"], KERNEL["initrd"], want)
        assert os_.find("boot") is None
    else:
        assert os_.find("kernel") is None and os_.find("boot").get("dev") == "hd"
    cpu = dom.find("cpu")
    if virt_type == "kvm":
        assert cpu.get("mode") == "host-passthrough"
    else:
        assert cpu.get("mode") == "custom" and cpu.findtext("model") == TCG_CPU_MODEL

    disks = {d.find("target").get("dev"): d for d in dom.findall("devices/disk")}
    assert set(disks) == {"vda", "vdb"}
    assert all(d.find("target").get("bus") == "virtio" and d.get("device") == "disk" for d in disks.values())
    assert disks["vda"].find("driver").get("type") == "qcow2"
    assert disks["vda"].find("source").get("file") == "/pool/cp1.qcow2" and disks["vda"].find("readonly") is None
    assert disks["vdb"].find("driver").get("type") == "raw"
    assert disks["vdb"].find("source").get("file") == "/pool/cp1-cidata.img" and disks["vdb"].find("readonly") is not None

    (iface,) = dom.findall("devices/interface")
    assert iface.find("mac").get("address") == lab.mac(node)
    assert iface.find("model").get("type") == "virtio"
    assert iface.find("mtu").get("size") == "1400"
    if mode == "bridge":
        assert iface.get("type") == "bridge" and iface.find("source").get("bridge") == "br0"
    else:
        assert iface.get("type") == "network" and iface.find("source").get("network") == lab.network_name

    assert dom.find("devices/rng").get("model") == "virtio"
    serial = dom.find("devices/serial")
    assert serial.get("type") == "pty"
    assert serial.find("log").get("file") == "/var/log/libvirt/qemu/t1-cp1-serial.log"
    assert dom.find("devices/console/target").get("type") == "serial"
    channel = dom.find("devices/channel/target")
    assert (channel.get("type"), channel.get("name")) == ("virtio", "org.qemu.guest_agent.0")
    assert dom.find("devices/memballoon").get("model") == "virtio"
    owner = dom.find(f"metadata/{OWNER}")
    assert (owner.get("lab"), owner.get("node"), owner.get("role")) == ("t1", "cp1", "control-plane")


def test_domain_xml_refuses_unknown_virt_type_and_initrd_without_kernel():
    lab = make_lab()
    common = dict(disk_path="/d", seed_path="/s", console_log="/l")
    with pytest.raises(ValueError, match="'kvm' or 'qemu'"):
        domain_xml(lab, lab.nodes[0], virt_type="tcg", **common)
    with pytest.raises(ValueError, match="needs the kernel"):
        domain_xml(lab, lab.nodes[0], virt_type="qemu", initrd="/i", **common)


# ---------------------------------------------------------------------------------------------- ownership


def test_parse_owner_round_trips_domain_and_network():
    lab = make_lab(name="alpha")
    for node in lab.nodes:
        text = domain_xml(lab, node, virt_type="qemu", disk_path="/d", seed_path="/s", console_log="/l")
        assert parse_owner(text) == ("alpha", node.name)
    assert parse_owner(network_xml(lab)) == ("alpha", None)


def test_parse_owner_reads_xml_as_libvirt_reformats_it():
    # libvirt's XMLDesc declares the namespace on the element itself, not on the root as ElementTree does
    desc = (f"<domain type='qemu'><name>x</name><metadata><lab:owner xmlns:lab='{NS}' lab='beta' node='cp1'/>"
            "</metadata></domain>")
    assert parse_owner(desc) == ("beta", "cp1")


@pytest.mark.parametrize("text", [
    "<domain><name>foreign</name></domain>",
    "<domain><metadata><app:owner xmlns:app='urn:other' lab='alpha'/></metadata></domain>",
    f"<network><metadata><lab:owner xmlns:lab='{NS}'/></metadata></network>",
    "not xml at all <",
    f'<owner xmlns="{NS}" lab="alpha" node="w1"/>',  # an owner element alone is not an object
])
def test_parse_owner_is_none_for_objects_not_ours(text):
    assert parse_owner(text) is None


def test_emulated_control_plane_gets_the_larger_cpu_share(tmp_path):
    """TCG vCPUs are busy host threads: the control plane must win when the host has fewer cores than the lab."""
    from lab.virt.xml import TCG_CONTROL_PLANE_SHARES

    lab = make_lab()
    common = dict(disk_path="/p/d", seed_path="/p/s", console_log="/p/l")
    shares = {}
    for node in lab.nodes:
        for virt_type in ("qemu", "kvm"):
            dom = assert_valid(tmp_path, domain_xml(lab, node, virt_type=virt_type, **common), "domain")
            shares[node.role, virt_type] = dom.findtext("cputune/shares")
    assert shares[("control-plane", "qemu")] == str(TCG_CONTROL_PLANE_SHARES)
    assert shares[("control-plane", "kvm")] is None and shares[("worker", "qemu")] is None


@pytest.mark.parametrize("cache", ["default", "unsafe"])
def test_disk_cache_mode_applies_to_the_node_disk_only(tmp_path, cache):
    lab = parse_lab({"name": "t1", "network": {"cidr": "10.77.0.0/24"}, "kubernetes": {"enabled": False},
                     "libvirt": {"diskCache": cache},
                     "nodes": [{"name": "cp1", "role": "control-plane", "cpus": 2, "memory": 1536}]})
    dom = assert_valid(tmp_path, domain_xml(lab, lab.nodes[0], virt_type="qemu", disk_path="/p/d", seed_path="/p/s",
                                            console_log="/p/l"), "domain")
    caches = {d.find("target").get("dev"): d.find("driver").get("cache") for d in dom.iter("disk")}
    assert caches == {"vda": None if cache == "default" else cache, "vdb": None}


def _test_driver_domain(hv, name: str, cputune: str):
    return hv.conn.defineXML(f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                             f"{cputune}<os><type arch='x86_64'>hvm</type></os></domain>")


def test_cpu_shares_that_libvirt_does_not_apply_are_reported():
    """The CI host's libvirtd (no systemd) keeps <shares> in the XML and enforces nothing: `schedulerParameters`
    fails with "cgroup CPU controller is not mounted". libvirt's test driver has no cpu_shares either (it reports
    only a 'weight'), so it stands for a libvirtd that cannot apply them."""
    from lab.virt.hypervisor import Hypervisor

    hv = Hypervisor("test:///default")
    with_shares = _test_driver_domain(hv, "shares-wanted", "<cputune><shares>4096</shares></cputune>")
    without = _test_driver_domain(hv, "no-shares", "")
    assert hv.unapplied_cpu_shares(with_shares) == \
        "libvirt reports cpu_shares None (parameters ['weight']), want 4096"
    assert hv.unapplied_cpu_shares(without) is None


@pytest.mark.parametrize("spec_mib", [None, 1536])
def test_emulated_nodes_get_a_translation_cache_larger_than_qemus_default(tmp_path, spec_mib):
    """qemu's 1 GiB default filled while a CI cluster node booted: TCG nodes get TCG_TB_CACHE_MIB or the spec's
    libvirt.tcgCacheMiB; KVM nodes have no translation cache and get no <tcg> element."""
    from lab.virt.xml import TCG_TB_CACHE_MIB

    libvirt = {} if spec_mib is None else {"tcgCacheMiB": spec_mib}
    lab = parse_lab({"name": "t1", "network": {"cidr": "10.77.0.0/24"}, "kubernetes": {"enabled": False},
                     "libvirt": libvirt, "nodes": [{"name": "cp1", "role": "control-plane", "cpus": 2, "memory": 1536}]})
    common = dict(disk_path="/p/d", seed_path="/p/s", console_log="/p/l")
    tcg = assert_valid(tmp_path, domain_xml(lab, lab.nodes[0], virt_type="qemu", **common), "domain")
    kvm = assert_valid(tmp_path, domain_xml(lab, lab.nodes[0], virt_type="kvm", **common), "domain")
    cache = tcg.find("features/tcg/tb-cache")
    assert (cache.text, cache.get("unit")) == (str(spec_mib or TCG_TB_CACHE_MIB), "MiB")
    assert TCG_TB_CACHE_MIB > 1024
    assert kvm.find("features/tcg") is None


def test_a_translation_cache_larger_than_qemu_takes_on_the_host_is_rendered_as_qemus_most():
    """qemu on an x86_64 host cuts tb-cache to 2 GiB without a word (`info jit` showed 2147401728 bytes for 4096):
    the domain and preflight's memory count say what qemu really uses; other hosts take what is asked."""
    from lab.virt.xml import tcg_cache_mib

    lab = parse_lab({"name": "t1", "network": {"cidr": "10.77.0.0/24"}, "kubernetes": {"enabled": False},
                     "libvirt": {"tcgCacheMiB": 4096},
                     "nodes": [{"name": "cp1", "role": "control-plane", "cpus": 2, "memory": 1536}]})
    assert tcg_cache_mib(lab, machine="x86_64") == 2048
    assert tcg_cache_mib(lab, machine="aarch64") == 4096


def test_a_translation_cache_below_64_mib_is_refused():
    with pytest.raises(Exception, match="tcgCacheMiB"):
        parse_lab({"name": "t1", "network": {"cidr": "10.77.0.0/24"}, "kubernetes": {"enabled": False},
                   "libvirt": {"tcgCacheMiB": 16},
                   "nodes": [{"name": "cp1", "role": "control-plane", "cpus": 2, "memory": 1536}]})
