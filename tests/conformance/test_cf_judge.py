"""Verdict logic on REAL netprobe outputs (tests/fixtures/netprobe, captured from the netns fault catalogue), and
the report's comparison of two runs."""
from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import report
from conformance.expect import Expect, Target, TruthTable, Verdict, mismatches, observed_table, render_diff
from conformance.judge import (MtuFinding, NotMeasured, conntrack_deltas, default_connections, expected_pod_mtu,
                               fragment_deltas, ip_in_pool, judge_load, judge_path_mtu, judge_paths, judge_route_mtu,
                               kernel_at_least, kube_proxy_findings, measure_paths, ordered_pairs,
                               outside_pool_address, parse_link_macs, parse_neighbour, path_id, poll_table,
                               render_path_failures, route_mtu, sysctl_table, tcp_drop_deltas)
from lab.cilium_status import cilium_kpr
from lab.spec import PRODUCTION_SYSCTLS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "netprobe"
NETPROBE = Path(__file__).resolve().parents[2] / "conformance" / "probes" / "netprobe.py"


def fixture(name: str):
    return json.loads((FIXTURES / f"{name}.json").read_text())


# The fixtures' pod1 probes pod2 (10.200.2.2) and a DNAT "service" (10.200.99.10:80).
POD2_8080, POD2_9090 = Target("ns/pod2", 8080), Target("ns/pod2", 9090)
DNS_UDP, DNS_TCP, SVC = Target("ns/pod2", 53, "UDP"), Target("ns/pod2", 53), Target("ns/svc", 80)
TARGETS = [POD2_8080, POD2_9090, DNS_UDP, DNS_TCP, SVC]
ADDRESS = {POD2_8080: "10.200.2.2:8080", POD2_9090: "10.200.2.2:9090", DNS_UDP: "10.200.2.2:53",
           DNS_TCP: "10.200.2.2:53", SVC: "10.200.99.10:80"}
SRC = "ns/pod1"


def observed(name: str) -> TruthTable:
    return observed_table([SRC], TARGETS, {SRC: fixture(name)}, ADDRESS)


def expect(allowed: set[Target]) -> TruthTable:
    table = TruthTable([SRC], TARGETS)
    for t in TARGETS:
        table.set(SRC, t, Expect.CONNECTED if t in allowed else Expect.BLOCKED)
    return table


ONE_PORT = expect({POD2_8080, SVC})


def test_observed_table_reads_real_connect_output():
    table = observed("connect_reset_after_handshake")
    assert table.get(SRC, POD2_8080) is Verdict.CONNECTED
    assert table.get(SRC, POD2_9090) is Verdict.RESET
    assert table.get(SRC, DNS_UDP) is Verdict.CONNECTED  # same address as DNS_TCP, told apart by protocol
    assert table.by_id()["ns/pod1->ns/pod2:8080/TCP"] is Verdict.CONNECTED


@pytest.mark.parametrize("name,allowed,bad", [
    ("connect_one_allowed_port", {POD2_8080, SVC}, []),
    ("connect_healthy", {POD2_8080, POD2_9090, DNS_UDP, DNS_TCP, SVC}, []),
    ("connect_healthy", {POD2_8080, SVC}, [POD2_9090, DNS_UDP, DNS_TCP]),  # policy not enforced
    ("connect_default_deny_ingress", set(), []),
    ("connect_default_deny_egress_drop", set(), []),
    ("connect_default_deny_egress_reject", set(), []),  # ICMP admin-prohibited counts as blocked
    ("connect_dns_blocked", {POD2_8080, POD2_9090, SVC}, []),
    ("connect_dns_blocked", {POD2_8080, POD2_9090, SVC, DNS_UDP, DNS_TCP}, [DNS_UDP, DNS_TCP]),
    ("connect_reset_after_handshake", {POD2_8080, POD2_9090, DNS_UDP, DNS_TCP, SVC}, [POD2_9090]),
    ("connect_reset_after_handshake", {POD2_8080, DNS_UDP, DNS_TCP, SVC}, [POD2_9090]),  # reset is not "blocked"
])
def test_expected_vs_observed_on_real_outputs(name, allowed, bad):
    assert [t for _, t in mismatches(expect(allowed), observed(name))] == bad


def test_diff_marks_the_differing_cells_and_says_why():
    text = render_diff(ONE_PORT, observed("connect_healthy"))
    assert "*ok*" in text and "*blocked*" in text
    assert "ns/pod1->ns/pod2:9090/TCP: expected blocked, observed connected (policy not enforced" in text
    assert "3 cell(s) differ" in text
    assert "all cells match" in render_diff(ONE_PORT, observed("connect_one_allowed_port"))


def test_unknown_verdict_is_an_error():
    with pytest.raises(ValueError, match="unknown verdict 'maybe'"):
        Verdict.parse("maybe")


# ---------------------------------------------------------------------------------------------- polling


class Seq:
    def __init__(self, *items):
        self.items = list(items)

    def __call__(self):
        item = self.items.pop(0) if len(self.items) > 1 else self.items[0]
        if isinstance(item, Exception):
            raise item
        return item


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_poll_absorbs_enforcement_lag_only_without_a_barrier():
    clock = Clock()
    result = poll_table(ONE_PORT, Seq(observed("connect_healthy"), observed("connect_one_allowed_port")), 60,
                        clock=clock, sleep=clock.sleep, consecutive=1, enforced=False)
    assert result.matched and result.polls == 2 and result.seconds == 2.0
    assert result.leaks == {"ns/pod1->ns/pod2:9090/TCP": [1], "ns/pod1->ns/pod2:53/UDP": [1],
                            "ns/pod1->ns/pod2:53/TCP": [1]}  # recorded as lag, reported
    result = poll_table(ONE_PORT, Seq(observed("connect_healthy"), observed("connect_one_allowed_port")), 60,
                        clock=clock, sleep=clock.sleep, consecutive=1, enforced=True)
    assert not result.matched and result.polls == 1  # after the barrier a leak is final


def test_poll_retries_transport_failures_and_counts_them():
    clock = Clock()
    result = poll_table(ONE_PORT, Seq(RuntimeError("exec lost"), observed("connect_one_allowed_port")), 60,
                        transport_errors=(RuntimeError,), clock=clock, sleep=clock.sleep, consecutive=1)
    assert result.matched and result.transport_failures == 1
    assert result.mismatched == [{"poll": 1, "transport_error": "exec lost"}]


def test_a_blocked_cell_is_never_retried_into_a_pass():
    """Every cell matched in SOME observation, but no single observation matched: the check fails."""
    want = expect({POD2_8080})
    first = observed("connect_healthy")           # 8080 ok, but everything else connects (should be blocked)
    second = observed("connect_default_deny_ingress")  # everything blocked, but 8080 should connect
    clock = Clock()
    result = poll_table(want, Seq(second, first, second, second), 10, clock=clock, sleep=clock.sleep,
                        enforced=False)
    assert not result.matched
    assert "did not match 3 times in a row within 10s" in result.text and "*" in result.text


class SlowObserve(Seq):
    """Each observation takes ``seconds`` of the clock, like a whole table under TCG."""
    def __init__(self, clock, seconds, *items):
        super().__init__(*items)
        self.clock, self.seconds = clock, seconds

    def __call__(self):
        self.clock.t += self.seconds
        return super().__call__()


def test_a_streak_under_way_at_the_deadline_is_observed_to_its_end():
    clock = Clock()
    good = observed("connect_one_allowed_port")
    result = poll_table(ONE_PORT, SlowObserve(clock, 70, good), 60, clock=clock, sleep=clock.sleep)
    assert result.matched and result.polls == 3 and result.seconds == 214.0  # 3 x 70 s + 2 intervals


def test_a_streak_that_breaks_after_the_deadline_fails():
    clock = Clock()
    good = observed("connect_one_allowed_port")
    result = poll_table(ONE_PORT, SlowObserve(clock, 70, good, good, RuntimeError("exec lost"), good), 60,
                        transport_errors=(RuntimeError,), clock=clock, sleep=clock.sleep)
    assert not result.matched and result.polls == 3
    assert "did not match 3 times in a row within 60s (3 polls, longest streak 2, 1 transport" in result.text


def test_no_match_by_the_deadline_fails_even_with_slow_observations():
    clock = Clock()
    result = poll_table(ONE_PORT, SlowObserve(clock, 70, RuntimeError("exec lost"), observed("connect_one_allowed_port")),
                        60, transport_errors=(RuntimeError,), clock=clock, sleep=clock.sleep)
    assert not result.matched and result.polls == 1 and "no complete observation" in result.text


class Reprobe:
    """poll_table's re-probe: records the cells asked for, answers with the given observation."""
    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def __call__(self, cells):
        self.asked.append(sorted(str(t) for _, t in cells))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_a_lost_allowed_cell_probed_again_counts_when_it_connects():
    want = expect({POD2_8080})
    again = Reprobe(observed("connect_one_allowed_port"))  # 8080 answers now
    clock = Clock()
    result = poll_table(want, Seq(observed("connect_default_deny_ingress")), 60, clock=clock, sleep=clock.sleep,
                        consecutive=1, reprobe=again)
    assert again.asked == [[str(POD2_8080)]]  # only the allowed cell that got no answer
    assert result.matched and result.recovered_on_reprobe == 1
    assert result.reprobed == [{"poll": 1, "recovered": [f"{SRC}->{POD2_8080}"], "still": []}]


def test_a_lost_allowed_cell_lost_again_stays_a_mismatch():
    want = expect({POD2_8080})
    clock = Clock()
    result = poll_table(want, Seq(observed("connect_default_deny_ingress")), 4, clock=clock, sleep=clock.sleep,
                        consecutive=1, reprobe=Reprobe(observed("connect_default_deny_ingress")))
    assert not result.matched and result.recovered_on_reprobe == 0
    assert result.reprobed[0]["still"] == [f"{SRC}->{POD2_8080}"]
    result = poll_table(want, Seq(observed("connect_default_deny_ingress")), 4, clock=clock, sleep=clock.sleep,
                        consecutive=1, transport_errors=(RuntimeError,), reprobe=Reprobe(RuntimeError("exec lost")))
    assert not result.matched and result.reprobed[0]["transport_error"] == "exec lost"


def test_a_leak_is_never_probed_again():
    again = Reprobe(observed("connect_one_allowed_port"))
    clock = Clock()
    result = poll_table(ONE_PORT, Seq(observed("connect_healthy")), 60, clock=clock, sleep=clock.sleep,
                        consecutive=1, enforced=True, reprobe=again)
    assert not result.matched and result.leaks and again.asked == [] and result.reprobed == []


def test_poll_without_any_observation_reports_it():
    clock = Clock()
    result = poll_table(ONE_PORT, Seq(RuntimeError("down")), 4, transport_errors=(RuntimeError,),
                        clock=clock, sleep=clock.sleep)
    assert not result.matched and "no complete observation" in result.text


# ---------------------------------------------------------------------------------------------- MTU


def test_expected_pod_mtu_is_the_same_for_vxlan_and_geneve():
    assert expected_pod_mtu(1500, "vxlan") == expected_pod_mtu(1500, "geneve") == 1450
    assert expected_pod_mtu(1500, "geneve", ipv6_underlay=True) == 1430
    assert expected_pod_mtu(9000, "vxlan") == 8950


@pytest.mark.parametrize("route,expected,finding", [
    (1450, 1450, MtuFinding.OK), (1460, 1450, MtuFinding.TOO_LARGE), (1500, 1450, MtuFinding.TOO_LARGE),
    (1350, 1450, MtuFinding.OK), (1349, 1450, MtuFinding.WASTEFUL),
])
def test_route_mtu_judgement(route, expected, finding):
    assert judge_route_mtu(route, expected)[0] is finding


def test_black_hole_fixture_fails_with_the_cause():
    for name in ("mtu_black_hole_vxlan", "mtu_black_hole_geneve"):
        problems = judge_path_mtu(fixture(name), 1450)
        assert any("black_hole" in p for p in problems) and any("TCP bulk transfer failed" in p for p in problems)


def test_fragmenting_overlay_is_caught_by_payload_and_counters():
    result = fixture("mtu_fragmenting_vxlan")
    assert judge_path_mtu(result, 1450) == ["largest DF UDP payload 1472, expected exactly 1422 (pod MTU 1450 - 28)"]
    before, after = (fixture("facts_node1_before_fragmentation_vxlan"),
                     fixture("facts_node1_after_fragmentation_vxlan"))
    rose = fragment_deltas({"node1": before}, {"node1": after})
    assert rose["node1"]["FragCreates"] == 2898  # from the capture (tests/fixtures/netprobe, NETPROBE_CAPTURE=1)
    assert fragment_deltas({"node1": before}, {"node1": before}) == {}
    geneve = fixture("mtu_fragmenting_geneve")
    assert judge_path_mtu(geneve, 1450) == ["largest DF UDP payload 1472, expected exactly 1422 (pod MTU 1450 - 28)"]
    rose = fragment_deltas({"node1": fixture("facts_node1_before_fragmentation_geneve")},
                           {"node1": fixture("facts_node1_after_fragmentation_geneve")})
    assert rose["node1"]["FragCreates"] == 3316  # from the capture


def test_ordered_pairs_measure_both_directions():
    assert ordered_pairs(["w1", "cp1", "w2"]) == [("cp1", "w1"), ("cp1", "w2"), ("w1", "cp1"), ("w1", "w2"),
                                                  ("w2", "cp1"), ("w2", "w1")]
    assert ordered_pairs(["cp1"]) == [] and path_id("w1", "cp1") == "w1->cp1"


def _facts_sequence(*snapshots):
    """facts() for measure_paths: node1's real captured facts, one snapshot per call, in order."""
    it = iter(snapshots)
    return lambda: {"node1": fixture(next(it))}


def test_a_fault_on_one_direction_is_named_with_that_direction():
    """cp1->w1 healthy; w1->cp1 black-holes and node1's fragment counters rise while it (only) is measured."""
    before, after = "facts_node1_before_fragmentation_vxlan", "facts_node1_after_fragmentation_vxlan"
    run = measure_paths({"cp1->w1": lambda: fixture("mtu_cilium_healthy"),
                         "w1->cp1": lambda: fixture("mtu_cilium_black_hole")}, _facts_sequence(before, before, after))
    assert run.fragments == {"cp1->w1": {}, "w1->cp1": {"node1": {"FragCreates": 2898, "ReasmReqds": 2}}}
    failing = judge_paths(run, {"cp1->w1": 1450, "w1->cp1": 1450})
    assert list(failing) == ["w1->cp1"]
    assert failing["w1->cp1"][0].startswith("netprobe mtu verdict 'black_hole'")
    assert failing["w1->cp1"][-1].startswith("fragmentation counters rose while this path was measured")
    text = render_path_failures(failing, 2)
    assert text.splitlines()[0] == "1 of 2 path(s) fail: w1->cp1" and "cp1->w1" not in text
    assert run.record()["cp1->w1"] == {"verdict": "ok", "path_mtu": 1450, "largest_udp_payload": 1422,
                                       "tcp_bulk_mib_per_s": 500.0, "fragments": {}}
    assert run.worst() == {"path_mtu": 1450, "largest_udp_payload": 1422, "tcp_bulk_mib_per_s": 0.0,
                           "fragments_created": 2898}


def test_a_path_that_could_not_be_measured_errors_naming_it_and_the_failures():
    def broken():
        raise NotMeasured("exec in ns/mtu-w1 failed: 500 Internal Server Error")
    snap = "facts_node1_before_fragmentation_vxlan"
    run = measure_paths({"cp1->w1": lambda: fixture("mtu_cilium_black_hole"), "w1->cp1": broken},
                        _facts_sequence(snap, snap, snap))
    assert run.record()["w1->cp1"] == {"error": "exec in ns/mtu-w1 failed: 500 Internal Server Error",
                                       "fragments": {}}
    with pytest.raises(NotMeasured, match=r"could not measure 1 of 2 path\(s\): w1->cp1: exec in ns/mtu-w1 "
                                          r"failed.*\(measured and failing: cp1->w1\)"):
        judge_paths(run, {"cp1->w1": 1450, "w1->cp1": 1450})


def test_healthy_path_mtu_from_a_real_loopback_run():
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = Path(f"/tmp/cf-mtu-{port}.ready")
    server = subprocess.Popen([sys.executable, str(NETPROBE), "serve", "--bind", "127.0.0.1", "--tcp", str(port),
                               "--udp", str(port), "--workers", "1", "--ready-file", str(ready)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if ready.exists():
                break
            time.sleep(0.05)
        out = subprocess.run([sys.executable, str(NETPROBE), "mtu", "--to", f"127.0.0.1:{port}", "--max", "1450",
                              "--bulk-mib", "1"], capture_output=True, text=True, timeout=60)
        result = json.loads(out.stdout)
    finally:
        server.terminate()
        server.wait()
        ready.unlink(missing_ok=True)
    assert judge_path_mtu(result, 1450) == [], result
    assert judge_path_mtu(result, 1500) != []  # a 1500 pod MTU would need a 1472 payload


def test_route_mtu_from_facts():
    with pytest.raises(NotMeasured, match="pod1: no default route"):
        route_mtu(fixture("facts_clean_netns"), "pod1")  # an empty namespace: nothing to judge, never 1500
    assert route_mtu(fixture("facts_cilium_pod_route_mtu_1450")) == 1450  # eth0 1500, route mtu 1450
    assert route_mtu({"default_route": {"mtu": None, "dev_mtu": 1500, "effective_mtu": 1450}}) == 1450


def test_route_mtu_unknown_is_not_measured_never_the_device_mtu():
    facts = copy.deepcopy(fixture("facts_cilium_pod_route_mtu_1450"))
    facts["default_route"].update(effective_mtu=None, kernel_mtu=None, mtu=None, source="/proc/net/route")
    facts["errors"] = [{"what": "default_route.effective_mtu", "error": "neither rtnetlink nor IP_MTU answered"}]
    with pytest.raises(NotMeasured, match=r"effective_mtu null.*neither rtnetlink nor IP_MTU answered"):
        route_mtu(facts)  # old code: fell back to dev_mtu 1500 and judged TOO_LARGE on a healthy Cilium pod


@pytest.mark.parametrize("name,verdict,says", [
    ("mtu_bulk_refused", "refused", "nothing listens on the target port"),
    ("mtu_black_hole_vxlan", "black_hole", "a PMTUD black hole"),
    ("mtu_cilium_black_hole", "black_hole", "a PMTUD black hole"),
])
def test_path_mtu_names_what_happened(name, verdict, says):
    doc = fixture(name)
    assert doc["verdict"] == verdict
    first = judge_path_mtu(doc, 1450)[0]
    assert first.startswith(f"netprobe mtu verdict {verdict!r} (") and says in first
    if verdict != "black_hole":
        assert "black hole" not in " ".join(judge_path_mtu(doc, 1450))


@pytest.mark.parametrize("verdict", ["refused", "unreachable", "timeout", "reset", "error"])
def test_only_black_hole_is_called_a_black_hole(verdict):
    doc = dict(fixture("mtu_bulk_refused"), verdict=verdict)
    assert "black hole" not in judge_path_mtu(doc, 1450)[0]


def test_counters_are_not_measured_when_null_or_facts_carry_errors():
    before = fixture("facts_node1_before_fragmentation_vxlan")
    null = copy.deepcopy(before)
    null["ip_fragments"]["FragCreates"] = None
    with pytest.raises(NotMeasured, match=r"node1 \(after\): FragCreates unreadable"):
        fragment_deltas({"node1": before}, {"node1": null})
    errored = copy.deepcopy(before)
    errored["errors"] = [{"what": "/proc/net/snmp", "error": "Permission denied"}]
    with pytest.raises(NotMeasured, match=r"node1 \(after\): netprobe reported errors \(/proc/net/snmp: Permission"):
        fragment_deltas({"node1": before}, {"node1": errored})


# ---------------------------------------------------------------------------------------------- load, conntrack


def test_load_healthy_and_limited():
    total, problems = judge_load([fixture("load_healthy")])  # real `verified` from netprobe, echoed by serve
    assert problems == [] and total["established"] == total["requested"] == total["verified"]
    total, problems = judge_load([fixture("load_healthy"), fixture("load_conn_limited")])
    assert "500 of 1500" not in " ".join(problems)  # summed over clients
    assert problems[0].startswith(f"{total['established']} of {total['requested']} connections established")
    assert "1000 connections failed (1000 timeouts; errors: ETIMEDOUT 1000)" in problems


def test_load_with_the_server_dropping_mid_hold_is_held_but_not_verified():
    doc = fixture("load_server_drops_mid_hold")
    total, problems = judge_load([doc])
    assert total["held"] == doc["held"] and total["verified"] == doc["verified"] < doc["held"]
    assert problems == [f"only {doc['verified']} of {doc['established']} held connections carried a byte end to "
                        "end at the end of the hold (the datapath forgot or broke the rest): 300 unanswered within "
                        "the verify timeout, 0 closed by the peer"]


def test_conntrack_counters_rising_are_reported():
    before = fixture("facts_dnat_node_under_load")
    after = copy.deepcopy(before)
    after["conntrack"]["stat"]["early_drop"] += 7
    after["conntrack"]["stat"]["insert_failed"] += 1
    assert conntrack_deltas({"n1": before}, {"n1": after}) == {"n1": {"early_drop": 7, "insert_failed": 1}}
    assert conntrack_deltas({"n1": before}, {"n1": before}) == {}


def test_tcp_drop_deltas_name_the_pod_whose_accept_queue_overflowed():
    """Captured in a pod namespace whose server never accepted (tests/netns/test_fault_matrix.py)."""
    before = fixture("facts_pod_accept_queue_overflow_before")
    after = fixture("facts_pod_accept_queue_overflow_after")
    drops = tcp_drop_deltas({"server w1": before, "client cp1": before}, {"server w1": after, "client cp1": before})
    assert list(drops) == ["server w1"]
    assert drops["server w1"]["ListenOverflows"] == after["tcp_ext"]["ListenOverflows"] > 0
    assert set(drops["server w1"]) <= {"ListenOverflows", "ListenDrops"}  # retransmit counters are never drops


def test_tcp_drop_deltas_ignore_other_unreadable_facts_but_not_their_own():
    before = fixture("facts_pod_accept_queue_overflow_before")
    other = copy.deepcopy(before)
    other["errors"] = [{"what": "conntrack.stat", "error": "/proc/net/stat/nf_conntrack is absent"}]
    assert tcp_drop_deltas({"p": before}, {"p": other}) == {}  # a pod's facts may lack tables it cannot read
    broken = copy.deepcopy(before)
    broken["tcp_ext"] = None
    broken["errors"] = [{"what": "tcp_ext", "error": "cannot read /proc/net/netstat: Permission denied"}]
    with pytest.raises(NotMeasured, match="p \\(after\\): ListenOverflows.*Permission denied"):
        tcp_drop_deltas({"p": before}, {"p": broken})


def test_default_connections_sized_to_the_table():
    assert default_connections(1000000, 3) == 20000
    assert default_connections(40000, 3) == 10000
    assert default_connections(None, 3) == 20000


# ---------------------------------------------------------------------------------------------- tuning, kube-proxy


def test_sysctl_table_marks_mismatches_on_real_facts():
    facts = fixture("facts_clean_netns")
    table = sysctl_table(PRODUCTION_SYSCTLS, {"cp1": facts["sysctls"],
                                              "w1": {k: v for k, v in PRODUCTION_SYSCTLS.items()}})
    assert all(node == "cp1" for node, _ in table.mismatches)
    text = table.render()
    assert "*" in text.splitlines()[1] or "*" in text
    assert f"{len(table.mismatches)} mismatch(es) marked" in text
    ok = sysctl_table({"net.ipv4.tcp_rmem": "4096 87380 6291456"}, {"n": {"net.ipv4.tcp_rmem": "4096\t87380\t6291456"}})
    assert ok.mismatches == []


def test_kube_proxy_findings():
    clean = fixture("facts_clean_netns")
    assert kube_proxy_findings({"n1": clean}) == []
    dirty = copy.deepcopy(clean)
    dirty["kube_proxy_running"] = True
    dirty["kube_services_rules"] = {"present": True, "sources": {"iptables-save": True}}
    assert kube_proxy_findings({"n1": dirty}) == ["n1: a kube-proxy process runs",
                                                  "n1: KUBE-SERVICES rules exist (iptables/nft): kube-proxy ran here"]
    unknown = copy.deepcopy(clean)
    unknown["kube_services_rules"] = {"present": None, "sources": {}}
    assert kube_proxy_findings({"n1": unknown}, {"n1": False}) == []  # the node's own tools answered
    assert "could not read" in kube_proxy_findings({"n1": unknown})[0]


def test_cilium_status_and_kernel():
    assert cilium_kpr("KVStore:  Ok\nKubeProxyReplacement:    True   [eth0 192.168.150.10]\n") == (True, "True")
    assert cilium_kpr("KubeProxyReplacement:   False\n") == (False, "False")
    assert cilium_kpr("garbage")[0] is False
    assert kernel_at_least("6.8.0-49-generic") and kernel_at_least("5.10.0") and not kernel_at_least("5.4.0-1")


def test_loadbalancer_helpers():
    assert parse_neighbour("192.168.150.200 dev virbr1 lladdr 52:54:00:AA:bb:cc REACHABLE\n",
                           "192.168.150.200") == "52:54:00:aa:bb:cc"
    assert parse_neighbour("192.168.150.200 dev virbr1  FAILED\n", "192.168.150.200") is None
    assert parse_link_macs("2: enp1s0: <UP> mtu 1500 qdisc\\    link/ether 52:54:00:12:34:56 brd ff:ff:ff:ff:ff:ff") \
        == {"52:54:00:12:34:56"}
    pool = ["192.168.150.200-192.168.150.220"]
    assert ip_in_pool("192.168.150.210", pool) and not ip_in_pool("192.168.150.221", pool)
    assert outside_pool_address(pool, "192.168.150.0/24") == "192.168.150.254"


# ---------------------------------------------------------------------------------------------- report


def run_doc(checks) -> dict:
    return report.build([{"id": cid, "check": cid.split("::")[-1], "verdict": v, "phase": "call", "seconds": 1.0,
                          "measured": m, "warnings": [], "message": "" if v == "pass" else "AssertionError: boom"}
                         for cid, v, m in checks], started=0.0)


BASE = run_doc([("t.py::lb_failover", "pass", {"failover_seconds": 3.0}), ("t.py::mtu", "pass", {"path_mtu": 1450}),
                ("t.py::tuning", "pass", {}), ("t.py::deny", "fail", {})])


def test_compare_finds_regressions():
    worse = run_doc([("t.py::lb_failover", "pass", {"failover_seconds": 9.0}), ("t.py::mtu", "fail", {"path_mtu": 1400}),
                     ("t.py::deny", "pass", {})])
    found = [str(r) for r in report.compare(BASE, worse)]
    assert found == ["t.py::lb_failover: failover_seconds 3 -> 9 (lower is better)",
                     "t.py::mtu: passed before, fail now: AssertionError: boom",
                     "t.py::mtu: path_mtu 1450 -> 1400 (higher is better)",
                     "t.py::tuning: passed before, not run now"]


def test_compare_tolerates_noise_and_improvements():
    same = run_doc([("t.py::lb_failover", "pass", {"failover_seconds": 4.5}), ("t.py::mtu", "pass", {"path_mtu": 1450}),
                    ("t.py::tuning", "pass", {}), ("t.py::deny", "pass", {})])
    assert report.compare(BASE, same) == []


def test_main_report_exit_codes_and_files(tmp_path):
    a = report.write(BASE, tmp_path)
    b = report.write(run_doc([("t.py::lb_failover", "fail", {})]), tmp_path)
    assert a != b and (tmp_path / "conformance-latest.json").exists()
    out = io.StringIO()
    assert report.main_report(str(a), str(a), out) == 0 and "no regressions" in out.getvalue()
    out = io.StringIO()
    assert report.main_report(str(a), str(b), out) == 1
    assert "regression(s):" in out.getvalue() and "lb_failover: passed before, fail now" in out.getvalue()
    bogus = tmp_path / "x.json"
    bogus.write_text("{}")
    with pytest.raises(ValueError, match="not a conformance report"):
        report.load(bogus)


def test_summary_table_says_skips_are_not_passes():
    doc = run_doc([("t.py::a", "pass", {"path_mtu": 1450}), ("t.py::b", "skip", {})])
    text = report.summary_table(doc)
    assert re.search(r"^PASS +t\.py::a +1\.0 +path_mtu=1450$", text, re.M), text
    assert "1 passed, 0 failed, 0 errors, 1 skipped (a skip is not a pass)" in text
