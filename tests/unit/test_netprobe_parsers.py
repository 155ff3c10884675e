"""netprobe's pure parsers, on text captured from real kernels and tools."""
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "conformance" / "probes" / "netprobe.py"
spec = importlib.util.spec_from_file_location("netprobe", PATH)
netprobe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(netprobe)

STAT = """entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000002a  00000000 00000003 00000000 00000010 00000000 00000000 00000000 00000000 00000001 0000000a 00000002 00000000  00000000 00000000 00000000 00000000
0000002a  00000000 00000001 00000000 00000005 00000000 00000000 00000000 00000000 00000002 00000001 00000000 00000000  00000000 00000000 00000000 0000000f
"""

SNMP = """Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers OutRequests OutDiscards OutNoRoutes ReasmTimeout ReasmReqds ReasmOKs ReasmFails FragOKs FragFails FragCreates OutTransmits
Ip: 1 64 100 0 0 0 0 0 100 90 0 0 0 2896 1448 0 1450 3 2898 90
Icmp: InMsgs InErrors
Icmp: 0 0
"""


def test_conntrack_stat_sums_cpus_but_takes_entries_once():
    stat = netprobe.parse_conntrack_stat(STAT)
    assert stat["entries"] == 42
    assert (stat["found"], stat["invalid"], stat["insert_failed"], stat["drop"], stat["early_drop"]) == (4, 21, 3, 11, 2)
    assert stat["search_restart"] == 15


def test_snmp_ip_fragment_counters():
    ip = netprobe.parse_snmp(SNMP)
    assert (ip["FragCreates"], ip["FragFails"], ip["ReasmReqds"], ip["ReasmOKs"]) == (2898, 3, 2896, 1448)


@pytest.mark.parametrize("text, expected", [
    ("default via 10.0.0.1 dev eth0 proto dhcp src 10.0.0.5 metric 100 \n", ("eth0", "10.0.0.1", None)),
    ("default via 10.200.1.1 dev eth0 mtu 1450 \n", ("eth0", "10.200.1.1", 1450)),
    ("default via 10.0.0.1 dev eth0 mtu lock 1400 \n", ("eth0", "10.0.0.1", 1400)),
    ("10.0.0.0/24 dev eth0 proto kernel scope link\n", None),
])
def test_ip_route_default(text, expected):
    route = netprobe.parse_ip_route_default(text)
    assert (route and (route["dev"], route["via"], route["mtu"])) == expected


def test_proc_net_route_default():
    text = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
            "eth0\t0001C80A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
            "eth0\t00000000\t0101C80A\t0003\t0\t0\t0\t00000000\t1450\t0\t0\n")
    assert netprobe.parse_proc_route_default(text) == {"dev": "eth0", "via": "10.200.1.1", "mtu": 1450}


def test_missing_sysctl_is_none_not_an_error():
    assert netprobe.read_sysctl("net.no_such_subsystem.no_such_key") is None


@pytest.mark.parametrize("text, host, port, proto", [
    ("10.0.0.1:80/tcp", "10.0.0.1", 80, "tcp"),
    ("[fd00::1]:53/UDP", "fd00::1", 53, "udp"),
    ("kube-dns.kube-system:53/udp", "kube-dns.kube-system", 53, "udp"),
])
def test_target_parsing(text, host, port, proto):
    t = netprobe.target(text)
    assert (t["host"], t["port"], t["proto"]) == (host, port, proto)


@pytest.mark.parametrize("largest, silent, bulk, verdict", [
    (None, False, None, "unreachable"),
    (1422, False, {"ok": True, "bytes": 1}, "ok"),
    (1422, True, {"ok": False, "bytes": 0}, "black_hole"),
    (1472, False, {"ok": False, "bytes": 5}, "tcp_failed"),
    (1422, True, None, "black_hole"),
])
def test_mtu_verdict(largest, silent, bulk, verdict):
    assert netprobe.mtu_verdict(largest, silent, bulk) == verdict
