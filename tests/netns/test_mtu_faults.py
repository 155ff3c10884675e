"""MTU fault catalogue: correct overlay, PMTUD black hole, silent fragmentation."""
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
    assert result["probes"] <= 14


def test_route_mtu_lowered_in_pod_is_seen_by_facts_and_mtu(lab):
    topo = build(lab, Overlay(kind="vxlan", pod_mtu=1500, route_mtu=1450))
    route = lab.probe(topo.pod1, "facts")["default_route"]
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
    assert result["probes"] <= 14


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
