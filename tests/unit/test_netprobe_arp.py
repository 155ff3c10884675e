"""`netprobe arp` without a network: frame building and parsing, which frames count as a claim on the VIP, the
verdict, and argument errors. The real-kernel behaviour is in tests/netns/test_arp_announcers.py."""
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

NETPROBE = Path(__file__).resolve().parents[2] / "conformance" / "probes" / "netprobe.py"
spec = importlib.util.spec_from_file_location("netprobe_arp_under_test", NETPROBE)
np = importlib.util.module_from_spec(spec)
spec.loader.exec_module(np)

RUNNER, NODE1, NODE2 = "02:00:00:00:00:64", "02:00:00:00:00:01", "02:00:00:00:00:02"
VIP = "10.0.0.200"


def mac(text):
    return bytes.fromhex(text.replace(":", ""))


def frame(op, sha, spa, tha, tpa, eth_src=None, eth_dst=None):
    """An ARP frame as RFC 826 lays it out (built here independently of netprobe's builder)."""
    eth = mac(eth_dst or tha) + mac(eth_src or sha) + b"\x08\x06"
    return eth + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac(sha) + bytes(map(int, spa.split("."))) \
        + mac(tha) + bytes(map(int, tpa.split(".")))


def test_request_is_a_broadcast_who_has_padded_to_the_ethernet_minimum():
    req = np.arp_request(mac(RUNNER), "10.0.0.100", VIP)
    assert len(req) == 60 and req[:6] == b"\xff" * 6 and req[6:12] == mac(RUNNER)
    assert req[:42] == frame(1, RUNNER, "10.0.0.100", "00:00:00:00:00:00", VIP, eth_dst="ff:ff:ff:ff:ff:ff")
    parsed = np.parse_arp_frame(req)
    assert (parsed["op"], parsed["sha"], parsed["spa"], parsed["tpa"]) == (1, RUNNER, "10.0.0.100", VIP)


@pytest.mark.parametrize("raw,claim", [
    (frame(2, NODE1, VIP, RUNNER, "10.0.0.100"), "reply"),
    (frame(2, NODE1, "10.0.0.201", RUNNER, "10.0.0.100"), None),               # a reply for another address
    (frame(1, NODE1, VIP, "ff:ff:ff:ff:ff:ff", VIP), "gratuitous"),            # MetalLB's gratuitous request
    (frame(2, NODE2, VIP, "ff:ff:ff:ff:ff:ff", VIP), "gratuitous"),            # ... and its gratuitous reply
    (frame(1, NODE1, "10.0.0.1", "00:00:00:00:00:00", VIP), None),             # someone else asking for the VIP
    (frame(2, RUNNER, VIP, NODE1, "10.0.0.1"), None),                          # our own MAC never counts
])
def test_which_frames_claim_the_vip(raw, claim):
    assert np.arp_claim(np.parse_arp_frame(raw), VIP, RUNNER) == claim


def test_a_proxy_reply_keeps_sender_and_ethernet_source_apart():
    parsed = np.parse_arp_frame(frame(2, NODE1, VIP, RUNNER, "10.0.0.100", eth_src=NODE2))
    assert (parsed["sha"], parsed["eth_src"]) == (NODE1, NODE2)


@pytest.mark.parametrize("raw", [b"", b"\x00" * 41, frame(2, NODE1, VIP, RUNNER, "10.0.0.1")[:12] + b"\x08\x00"
                                 + b"\x00" * 28])
def test_non_arp_frames_are_ignored(raw):
    assert np.parse_arp_frame(raw) is None


def test_verdict_counts_distinct_responders():
    assert [np.arp_verdict(["a"] * n) for n in (0, 1, 2, 3)] == [
        "no_announcer", "one_announcer", "several_announcers", "several_announcers"]


@pytest.mark.parametrize("args,message", [
    (["--iface", "eth0", "--ip", "10.0.0"], "expected an IPv4 address"),
    (["--iface", "eth0", "--ip", "fd00::1"], "expected an IPv4 address"),
    (["--ip", VIP], "--iface"),
    (["--iface", "eth0", "--ip", VIP, "--count", "5", "--interval", "1", "--window", "2"], "must outlast"),
    (["--iface", "eth0", "--ip", VIP, "--count", "0"], "must be > 0"),
])
def test_argument_errors_are_json_with_exit_2(args, message):
    res = subprocess.run([sys.executable, str(NETPROBE), "arp", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and message in json.loads(res.stdout)["error"]
