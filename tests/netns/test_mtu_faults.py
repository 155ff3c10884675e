"""MTU fault catalogue: correct overlay, PMTUD black hole, silent fragmentation, refused bulk, lost echoes."""
import pytest

from topo import DROP_FRAG_NEEDED, OVERLAY_OVERHEAD_V4, POD2, UNDERLAY_MTU, Overlay, build, capture

FRAG_COUNTERS = ("FragCreates", "FragOKs", "ReasmReqds", "ReasmOKs")


def mtu_run(lab, topo, *extra):
    lab.serve(topo.pod2, tcp="7000", udp="7000", hostname="pod2")
    return lab.probe(topo.pod1, "mtu", "--to", POD2 + ":7000", "--bulk-timeout", "3", *extra)


def fragments(lab, ns):
    return lab.probe(ns, "facts")["ip_fragments"]


def delta(before, after):
    return {k: after[k] - before[k] for k in FRAG_COUNTERS}


def test_correct_overlay_path_mtu_is_underlay_minus_50(lab, overlay_kind):
    topo = build(lab, Overlay(kind=overlay_kind, overlay_mtu=UNDERLAY_MTU - OVERLAY_OVERHEAD_V4))
    result = mtu_run(lab, topo)
    capture("mtu_ok_%s" % overlay_kind.split("-")[0], result)
    assert result["path_mtu"] == UNDERLAY_MTU - 50 == 1450
    assert result["largest_udp_payload"] == 1450 - 28
    assert result["verdict"] == "ok"
    assert result["tcp_bulk"]["ok"] is True
    assert result["tcp_bulk"]["bytes"] == result["tcp_bulk"]["requested"]
    assert result["local_route_mtu"] == 1500 and result["icmp_seen"] is True  # learnt by PMTUD, not local
    assert result["sizes_tried"] <= 14 and result["probes"] <= 3 * result["sizes_tried"]


def test_route_mtu_lowered_in_pod_is_seen_by_facts_and_mtu(lab):
    topo = build(lab, Overlay(kind="vxlan", pod_mtu=1500, route_mtu=1450))
    for slim in (False, True):  # with `ip` on PATH and without (a slim pod image)
        route = lab.probe(topo.pod1, "facts", slim=slim)["default_route"]
        assert (route["mtu"], route["dev_mtu"], route["effective_mtu"]) == (1450, 1500, 1450)
    result = mtu_run(lab, topo)
    assert (result["local_route_mtu"], result["path_mtu"], result["verdict"]) == (1450, 1450, "ok")


def test_black_hole_when_overlay_too_large_and_frag_needed_dropped(lab, overlay_kind):
    topo = build(lab, Overlay(kind=overlay_kind, overlay_mtu=1450, pod_mtu=1500))
    lab.nft(topo.node1, DROP_FRAG_NEEDED)
    lab.nft(topo.node2, DROP_FRAG_NEEDED)
    result = mtu_run(lab, topo)
    capture("mtu_black_hole_%s" % overlay_kind.split("-")[0], result)
    assert result["verdict"] == "black_hole"
    assert result["tcp_bulk"]["ok"] is False
    assert result["silent_loss"] is True and result["icmp_seen"] is False
    assert result["path_mtu"] == 1450  # small datagrams still come back
    assert result["sizes_tried"] <= 14 and result["probes"] <= 3 * result["sizes_tried"]


def test_geneve_1460_advice_black_holes(lab, geneve_kind):
    """DESIGN: 1460 is the TCP MSS, not Geneve's MTU; with DF set its 1510-byte outer packets vanish."""
    topo = build(lab, Overlay(kind=geneve_kind, overlay_mtu=1460, pod_mtu=1460, df="set"))
    result = mtu_run(lab, topo)
    assert (result["local_route_mtu"], result["path_mtu"]) == (1460, 1450)
    assert result["verdict"] == "black_hole" and result["tcp_bulk"]["ok"] is False


def test_silent_fragmentation_raises_fragment_counters(lab, overlay_kind):
    topo = build(lab, Overlay(kind=overlay_kind, overlay_mtu=1500, pod_mtu=1500, df="unset"))
    before1, before2 = lab.probe(topo.node1, "facts"), lab.probe(topo.node2, "facts")
    result = mtu_run(lab, topo)
    after1, after2 = lab.probe(topo.node1, "facts"), lab.probe(topo.node2, "facts")
    kind = overlay_kind.split("-")[0]
    capture("facts_node1_before_fragmentation_%s" % kind, before1)
    capture("facts_node1_after_fragmentation_%s" % kind, after1)
    capture("mtu_fragmenting_%s" % kind, result)
    sent, received = delta(before1["ip_fragments"], after1["ip_fragments"]), \
        delta(before2["ip_fragments"], after2["ip_fragments"])
    assert sent["FragCreates"] > 0 and sent["FragOKs"] > 0
    assert received["ReasmReqds"] > 0 and received["ReasmOKs"] > 0
    assert result["path_mtu"] == 1500  # fragmentation hides the 1450 limit from the probe itself


def test_correct_overlay_does_not_fragment(lab, overlay_kind):
    topo = build(lab, Overlay(kind=overlay_kind, overlay_mtu=1450, pod_mtu=1500, df="set"))
    before = [fragments(lab, ns) for ns in (topo.node1, topo.node2)]
    result = mtu_run(lab, topo)
    after = [fragments(lab, ns) for ns in (topo.node1, topo.node2)]
    assert result["verdict"] == "ok"
    assert delta(before[0], after[0]) == dict.fromkeys(FRAG_COUNTERS, 0)
    assert delta(before[1], after[1]) == dict.fromkeys(FRAG_COUNTERS, 0)


def test_refused_bulk_connection_is_reported_as_refused_not_black_hole(lab):
    """Issue 9 defect 12: UDP echoes at every size but nothing listens on TCP 7000."""
    topo = build(lab, Overlay(kind="vxlan"))
    lab.serve(topo.pod2, udp="7000", hostname="pod2")
    result = lab.probe(topo.pod1, "mtu", "--to", POD2 + ":7000")
    capture("mtu_bulk_refused", result)
    assert result["path_mtu"] == 1450
    assert result["verdict"] == "refused"
    bulk = result["tcp_bulk"]
    assert (bulk["verdict"], bulk["stage"], bulk["errno"], bulk["ok"]) == ("refused", "connect", "ECONNREFUSED", False)


def test_bulk_connection_rejected_by_a_policy_is_unreachable_not_black_hole(lab):
    topo = build(lab, Overlay(kind="vxlan"))
    lab.serve(topo.pod2, tcp="7000", udp="7000", hostname="pod2")
    lab.nft(topo.node2, "table inet pol {\n chain forward { type filter hook forward priority 0; "
                        "tcp dport 7000 reject with icmpx type admin-prohibited; }\n}\n")
    result = lab.probe(topo.pod1, "mtu", "--to", POD2 + ":7000")
    assert (result["path_mtu"], result["verdict"], result["tcp_bulk"]["stage"]) == (1450, "unreachable", "connect")


# Deterministic loss (this kernel has no sch_netem, so `tc qdisc ... netem loss` cannot run here): pod2 drops
# every other echo it sends, counted by nftables' numgen across all sizes. Every size's first echo is lost.
LOSE_EVERY_OTHER_ECHO = """
table inet loss {
  chain output { type filter hook output priority 0; udp sport 7000 numgen inc mod 2 == 0 drop; }
}
"""


def test_lost_echoes_are_retried_before_counting_as_silent_loss(lab):
    """Issue 9 defect 8: without retries every size looked lost and a healthy path read as a black hole."""
    topo = build(lab, Overlay(kind="vxlan", overlay_mtu=1450, pod_mtu=1500))
    lab.nft(topo.pod2, LOSE_EVERY_OTHER_ECHO)
    result = mtu_run(lab, topo)
    capture("mtu_every_other_echo_lost", result)
    assert (result["path_mtu"], result["silent_loss"], result["verdict"]) == (1450, False, "ok")
    assert result["lost_sizes"] == []
    assert result["retried"] >= 1 and result["probes"] == result["sizes_tried"] + result["retried"]


def test_retries_are_bounded_and_zero_retries_misread_loss(lab):
    """--retries 0 shows what the loss does to a probe that believes its first datagram."""
    topo = build(lab, Overlay(kind="vxlan", overlay_mtu=1450, pod_mtu=1500))
    lab.nft(topo.pod2, LOSE_EVERY_OTHER_ECHO)
    result = mtu_run(lab, topo, "--retries", "0", "--bulk-mib", "0")
    assert result["retried"] == 0 and result["probes"] == result["sizes_tried"]
    assert result["path_mtu"] != 1450 or result["lost_sizes"]


def test_bulk_timeout_follows_the_measured_rtt(lab):
    """No netem here to add delay: check the derivation from the RTT netprobe measured on this path."""
    import importlib.util

    from topo import NETPROBE
    spec = importlib.util.spec_from_file_location("netprobe_under_test", NETPROBE)
    netprobe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(netprobe)
    topo = build(lab, Overlay(kind="vxlan"))
    lab.serve(topo.pod2, tcp="7000", udp="7000", hostname="pod2")
    result = lab.probe(topo.pod1, "mtu", "--to", POD2 + ":7000", "--bulk-mib", "1")
    assert result["bulk_timeout_from"] == "rtt" and result["rtt_ms"] > 0
    expected = netprobe.bulk_timeout_for(result["rtt_ms"] / 1000.0, 1 << 20, result["path_mtu"] - 12)
    assert result["bulk_timeout"] == pytest.approx(expected, abs=0.01)
    assert result["tcp_bulk"]["timeout"] == result["bulk_timeout"]
    assert netprobe.BULK_TIMEOUT_FLOOR <= result["bulk_timeout"] <= netprobe.BULK_TIMEOUT_CAP
