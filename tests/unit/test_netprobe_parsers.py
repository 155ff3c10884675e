"""netprobe's pure parsers, on text captured from real kernels and tools."""
import importlib.util
import struct
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


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "netprobe"


@pytest.mark.parametrize("name, route", [
    ("proc_net_route_default_dev_lo_mtu1450.txt", {"dev": "lo", "via": None}),
    ("proc_net_route_cilium_pod_mtu1450.txt", {"dev": "eth0", "via": "10.200.1.1"}),
])
def test_proc_net_route_gives_the_default_route_but_never_an_mtu(name, route):
    """Captured from this kernel with `mtu 1450` on the route: the MTU column says 0 (it is advmss+40)."""
    text = (FIXTURES / name).read_text()
    assert [line.split()[8] for line in text.splitlines()[1:]][0] == "0"
    assert netprobe.parse_proc_route_default(text) == route


def test_rtnetlink_dump_of_a_cilium_pod_has_the_route_mtu():
    data = bytes.fromhex((FIXTURES / "rtnetlink_dump_cilium_pod_mtu1450.hex").read_text())
    routes, done = netprobe.parse_rtnl_routes(data)
    assert done is True
    main = [r for r in routes if r["table"] == netprobe.RT_TABLE_MAIN]
    assert [(r["dst"], r["dst_len"], r["gateway"], r["mtu"]) for r in main] == [
        (None, 0, "10.200.1.1", 1450), ("10.200.1.0", 24, None, None)]
    assert {r["table"] for r in routes} == {netprobe.RT_TABLE_MAIN, 255}  # local table too: filter it


def test_rtnetlink_error_message_raises():
    err = struct.pack("=IHHII", 36, netprobe.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)
    with pytest.raises(OSError):
        netprobe.parse_rtnl_routes(err)


def test_truncated_rtnetlink_dump_is_an_error_not_an_empty_table():
    data = bytes.fromhex((FIXTURES / "rtnetlink_dump_cilium_pod_mtu1450.hex").read_text())
    with pytest.raises(ValueError):
        netprobe.parse_rtnl_routes(data[:40])


@pytest.mark.parametrize("addr, covered", [("10.200.1.77", True), ("10.200.2.1", False), ("192.0.2.1", False)])
def test_route_cover(addr, covered):
    route = {"dst": "10.200.1.0", "dst_len": 24}
    assert netprobe.covers(route, addr) is covered


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


def bulk(verdict, stage, ok=False, nbytes=0):
    return {"ok": ok, "bytes": nbytes, "verdict": verdict, "stage": stage}


@pytest.mark.parametrize("largest, silent, bulk_result, verdict", [
    (None, False, None, "unreachable"),
    (1422, False, bulk("connected", None, ok=True, nbytes=1), "ok"),
    (1422, True, bulk("timeout", "send"), "black_hole"),
    (1422, True, bulk("timeout", "receipt"), "black_hole"),
    (1472, False, bulk("connected", "receipt", nbytes=5), "tcp_failed"),
    (1422, True, None, "black_hole"),
    # defect 12: a refused (or otherwise unopened) bulk connection is what it is, never a black hole
    (1422, True, bulk("refused", "connect"), "refused"),
    (1472, False, bulk("refused", "connect"), "refused"),
    (1472, False, bulk("unreachable", "connect"), "unreachable"),
    (1472, True, bulk("timeout", "connect"), "timeout"),
    (1472, False, bulk("reset", "send"), "reset"),
    (1472, False, bulk("error", "receipt"), "tcp_failed"),
])
def test_mtu_verdict(largest, silent, bulk_result, verdict):
    assert netprobe.mtu_verdict(largest, silent, bulk_result) == verdict


@pytest.mark.parametrize("rtt, nbytes, expected", [
    (None, 2 << 20, netprobe.BULK_TIMEOUT_FLOOR),  # no echo timed: the floor
    (0.0001, 2 << 20, 5.008),  # loopback: the floor dominates
    (0.1, 2 << 20, 5.0 + 8 * 9 * 0.1),  # 1498 segments: 9 slow-start rounds of 100 ms, 8 RTTs each
    (2.0, 8 << 20, netprobe.BULK_TIMEOUT_CAP),  # bounded
])
def test_bulk_timeout_follows_rtt_with_floor_and_cap(rtt, nbytes, expected):
    assert netprobe.bulk_timeout_for(rtt, nbytes) == pytest.approx(expected, abs=0.01)


def test_bulk_timeout_grows_with_rtt():
    values = [netprobe.bulk_timeout_for(r, 2 << 20) for r in (0.001, 0.01, 0.05, 0.2)]
    assert values == sorted(values) and values[0] < values[-1]


def test_dns_query_and_reply_round_trip():
    query = netprobe.dns_query("kubernetes.default.svc.cluster.local", 1, 0x4B1D)
    assert query[:2] == b"\x4b\x1d" and query[12:23] == b"\x0akubernetes"
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + bytes([10, 96, 0, 1])
    reply = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + query[12:] + answer
    assert netprobe.parse_dns_reply(reply, query) == {"rcode": "NOERROR", "truncated": False, "answers": ["10.96.0.1"]}
    nxdomain = query[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + query[12:]
    assert netprobe.parse_dns_reply(nxdomain, query)["rcode"] == "NXDOMAIN"


def test_dns_reply_to_another_query_is_ignored_and_garbage_is_an_error():
    query = netprobe.dns_query("a.example", 1, 7)
    other = netprobe.dns_query("b.example", 1, 7)
    assert netprobe.parse_dns_reply(b"\x00\x07\x81\x80" + other[4:], query) is None  # another question
    assert netprobe.parse_dns_reply(query, query) is None  # not a reply (QR clear)
    broken = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + query[12:] + b"\xc0"
    with pytest.raises(ValueError):
        netprobe.parse_dns_reply(broken, query)


@pytest.mark.parametrize("buf, complete, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", False, (200, "hi")),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi", False, None),  # body still coming
    (b"HTTP/1.0 503 Service Unavailable\r\n\r\ndown", True, (503, "down")),
    (b"HTTP/1.1 2", False, None),
])
def test_http_reply(buf, complete, expected):
    reply = netprobe.parse_http_reply(buf, complete)
    assert (reply and (reply["status"], reply["body"])) == expected


@pytest.mark.parametrize("buf, complete", [(b'{"host": "pod2"}\n', False), (b"HTTP/1.1 200 OK\r\n", True)])
def test_not_http_is_an_error(buf, complete):
    with pytest.raises(ValueError):
        netprobe.parse_http_reply(buf, complete)


def test_unreadable_counters_are_errors_not_zeros(monkeypatch):
    monkeypatch.setattr(netprobe, "read_text_or_error", lambda path: (None, "cannot read %s: gone" % path))
    facts = netprobe.Facts()
    assert netprobe.ip_fragment_counters(facts) is None
    assert facts.counter("net.netfilter.nf_conntrack_count") is None
    assert [e["what"] for e in facts.errors] == ["ip_fragments", "net.netfilter.nf_conntrack_count"]
    assert all("gone" in e["error"] for e in facts.errors)


@pytest.mark.parametrize("text", ["", "Ip: Forwarding DefaultTTL\n", "Icmp: InMsgs\nIcmp: 0\n"])
def test_snmp_without_ip_rows_does_not_parse_as_no_counters(text):
    with pytest.raises(ValueError):
        netprobe.parse_snmp(text)


def test_conntrack_stat_without_rows_is_an_error():
    with pytest.raises(ValueError):
        netprobe.parse_conntrack_stat(STAT.splitlines()[0] + "\n")


def test_rtnetlink_address_dump_lists_every_ipv4_address_by_link():
    """A real RTM_GETADDR dump (a node namespace: lo, lan0 with 10.201.0.1/24 and the VIP 10.201.0.200/32)."""
    data = bytes.fromhex((FIXTURES / "rtnetlink_addr_dump_node1_lan0.hex").read_text())
    addrs, done = netprobe.parse_rtnl_addrs(data)
    assert done is True
    assert [(a["index"], a["address"], a["prefixlen"]) for a in addrs] == [
        (1, "127.0.0.1", 8), (3, "10.201.0.1", 24), (3, "10.201.0.200", 32)]
    with pytest.raises(ValueError):
        netprobe.parse_rtnl_addrs(data[:40])
