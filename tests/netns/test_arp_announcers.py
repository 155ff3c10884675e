"""`netprobe arp` on real kernels: the runner on the nodes' L2 (topo.build_cilium) asks who-has the LB VIP on a raw
socket and reports EVERY responder's MAC, not the neighbour table's single entry. Two nodes answering for one VIP
(a split brain, what MetalLB's memberlist partition causes) must show two MACs; one node exactly its MAC; none
an empty list and the verdict no_announcer. The kernel answers ARP for an address it owns, so a node owning the
VIP/32 on its LAN link stands in for a speaker."""
import json
import shutil
import sys

import pytest

from topo import CIL_LB_VIP, NETPROBE, announce_vip, build_cilium, capture, mac_of, sh

OTHER_VIP = "10.201.0.201"  # owned by nobody in these topologies


def arp(lab, c, vip=CIL_LB_VIP, *extra):
    return lab.probe(c.runner, "arp", "--iface", "lan0", "--ip", vip, "--count", "3", "--interval", "0.1",
                     "--window", "1.5", *extra, slim=True)


def test_one_announcer_is_exactly_that_nodes_mac(lab):
    c = build_cilium(lab)  # node1 owns the VIP
    result = arp(lab, c)
    capture("arp_one_announcer", result)
    assert result["verdict"] == "one_announcer", result
    assert result["macs"] == [mac_of(lab, c.node1, "lan0")]
    (responder,) = result["responders"]
    assert responder["replies"] >= 1 and responder["eth_src"] == [responder["mac"]]
    assert result["requests_sent"] == 3 and result["source_mac"] == mac_of(lab, c.runner, "lan0")
    assert result["source_ip"] == "10.201.0.100" and result["errors"] == []


def test_two_nodes_answering_for_one_vip_are_both_reported(lab):
    c = build_cilium(lab)
    announce_vip(lab, c, 2)
    result = arp(lab, c)
    capture("arp_two_announcers", result)
    assert result["verdict"] == "several_announcers", result
    assert result["macs"] == sorted([mac_of(lab, c.node1, "lan0"), mac_of(lab, c.node2, "lan0")])
    assert all(r["replies"] >= 1 for r in result["responders"])


def test_nobody_answering_is_no_announcer(lab):
    c = build_cilium(lab)
    result = arp(lab, c, OTHER_VIP)
    capture("arp_no_announcer", result)
    assert (result["verdict"], result["macs"], result["responders"]) == ("no_announcer", [], [])
    assert result["requests_sent"] == 3


def test_other_vip_answered_by_node2_only_is_not_confused_with_node1s(lab):
    c = build_cilium(lab)
    announce_vip(lab, c, 2, OTHER_VIP)
    assert arp(lab, c, OTHER_VIP)["macs"] == [mac_of(lab, c.node2, "lan0")]
    assert arp(lab, c)["macs"] == [mac_of(lab, c.node1, "lan0")]


def test_without_cap_net_raw_the_probe_says_so_in_json(lab):
    if not shutil.which("setpriv"):
        pytest.fail("this test needs setpriv (util-linux) to drop CAP_NET_RAW")
    c = build_cilium(lab, lb_vip=False)
    res = sh("ip", "netns", "exec", c.runner, "setpriv", "--bounding-set", "-net_raw", sys.executable,
             str(NETPROBE), "arp", "--iface", "lan0", "--ip", CIL_LB_VIP, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "CAP_NET_RAW" in json.loads(res.stdout)["error"]
