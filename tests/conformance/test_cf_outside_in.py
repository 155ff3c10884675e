"""Outside in (conformance/test_outside_in.py): the judges on real netprobe outputs captured by the fault matrix
(tests/fixtures/netprobe/*_oi_*), the observation and check shapes with a scripted runner, the NAT map reader with a
fake cilium-dbg run by a real sh, and the new options."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conformance import cilium
from conformance.expect import Expect, Verdict
from conformance.judge import (CtReading, NotMeasured, judge_cross_node, judge_load, judge_open_rate,
                               judge_snat_source, judge_table_rises, node_ips_from_facts, parse_bpf_ct, peer_host)
from conformance.test_outside_in import (DENIED, RUNNER, RUNNER_ALLOWED, WORLD_ALLOWED, OutsideWorld,
                                         RunnerObservation, cluster_path_findings, judge_outside_load, load_args,
                                         local_source_findings, observe_from_runner, outside_check, runner_network)

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "netprobe"
RUNNER_IP, CLUSTER_VIP, LOCAL_VIP = "10.201.0.100", "10.201.0.200", "10.201.0.201"


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def node_ips():
    node2 = {"interfaces": [{"name": "lan0", "ipv4": ["10.201.0.2/24"]}, {"name": "ov0", "ipv4": ["10.201.254.2/24"]}],
             "errors": []}
    return node_ips_from_facts({"node1": fixture("facts_oi_node1.json"), "node2": node2})


def world(**kw) -> OutsideWorld:
    base = dict(ns="oi", runner_ip=RUNNER_IP, runner_net="10.201.0.0/24", vips={"local": LOCAL_VIP,
                "cluster": CLUSTER_VIP}, backend_pods={"local": "backend-pod1", "cluster": "backend-pod2"},
                pod_nodes={"backend-pod1": "node1", "backend-pod2": "node2"},
                pod_ips={"local": "10.201.1.2", "cluster": "10.201.2.2"}, announcer="node1", node_ips=node_ips())
    return OutsideWorld(**{**base, **kw})


def scripted(rows):
    """A runner probe returning captured rows, recording the arguments it was given."""
    calls = []

    def probe(args, timeout):
        calls.append((args, timeout))
        return copy.deepcopy(rows)
    return probe, calls


# ---------------------------------------------------------------------------------------------- node addresses


def test_node_ips_from_real_facts_hold_every_link_address():
    ips = node_ips()
    assert ips["node1"] == ["10.201.0.1", "10.201.0.200", "10.201.0.201", "10.201.1.1", "10.201.254.1", "127.0.0.1"]
    assert ips["node2"] == ["10.201.0.2", "10.201.254.2"]


def test_node_ips_unreadable_is_not_measured():
    broken = fixture("facts_oi_node1.json")
    broken["interfaces"][0]["ipv4"] = None
    broken["errors"] = [{"what": "interfaces.ipv4", "error": "rtnetlink address dump failed: EPERM"}]
    with pytest.raises(NotMeasured, match=r"node1: IPv4 addresses unreadable \(interfaces.ipv4: rtnetlink"):
        node_ips_from_facts({"node1": broken})
    with pytest.raises(NotMeasured, match="no interfaces in facts"):
        node_ips_from_facts({"node1": {"interfaces": [], "errors": []}})


# ---------------------------------------------------------------------------------------------- what the backends saw


def answers():
    probe, _ = scripted(fixture("connect_oi_runner_two_vips.json"))
    w = world()
    return w, observe_from_runner(w.address_of(), probe)


def test_peer_host_strips_the_port():
    assert peer_host({"peer": "10.201.254.1:45514"}) == "10.201.254.1"
    assert peer_host({"peer": "[fd00::1]:80"}) == "fd00::1" and peer_host({}) == ""


def test_snat_to_the_announcer_is_recorded_and_passes():
    w, (_, got) = answers()
    record, problem = judge_snat_source(got[w.targets["cluster"]], RUNNER_IP, w.node_ips, "node1")
    assert problem is None
    assert record == {"peer_seen_by_backend": "10.201.254.1", "snat_node": "node1", "snat_by_announcer": True}


def test_snat_by_another_node_is_recorded_not_failed():
    w, (_, got) = answers()
    record, problem = judge_snat_source(got[w.targets["cluster"]], RUNNER_IP, w.node_ips, "node2")
    assert problem is None and record["snat_node"] == "node1" and record["snat_by_announcer"] is False


def test_client_address_at_a_cluster_backend_fails():
    w, (_, got) = answers()
    record, problem = judge_snat_source(got[w.targets["local"]], RUNNER_IP, w.node_ips, "node1")  # unSNATed answer
    assert record["peer_seen_by_backend"] == RUNNER_IP and record["snat_node"] is None
    assert problem.startswith("the backend saw the client 10.201.0.100 itself: externalTrafficPolicy Cluster")


def test_an_address_of_no_node_fails_and_no_answer_fails():
    record, problem = judge_snat_source({"peer": "192.0.2.9:1234"}, RUNNER_IP, node_ips(), "node1")
    assert record["snat_node"] is None and "192.0.2.9, which is no node address" in problem
    assert judge_snat_source(None, RUNNER_IP, node_ips()) == ({}, "no HTTP answer through the LoadBalancer IP")


def test_cross_node_placement():
    assert judge_cross_node("node1", "node2") is None
    assert judge_cross_node("node1", "node1").startswith("the backend runs on node1, the node announcing the VIP")
    with pytest.raises(NotMeasured, match="announcing node unknown"):
        judge_cross_node(None, "node2")
    with pytest.raises(NotMeasured, match="backend on unknown node"):
        judge_cross_node("node1", None)


def test_findings_from_the_captured_observation():
    w, (_, got) = answers()
    seen = SimpleNamespace(answers=got)
    assert local_source_findings(w, seen) == ({"peer_seen_by_local_backend": got[w.targets["local"]]["peer"]}, [])
    record, problems = cluster_path_findings(w, seen)
    assert problems == [] and record["cluster_backend_node"] == "node2" and record["announcing_node"] == "node1"
    on_announcer = world(pod_nodes={"backend-pod1": "node1", "backend-pod2": "node1"})
    assert cluster_path_findings(on_announcer, seen)[1][0].startswith("the backend runs on node1")


def test_findings_judge_the_announcer_that_handled_the_observation():
    """MetalLB moved the VIP onto the backend's node after the world was built: the observation's own announcer
    is judged (the path no longer crosses nodes) and the one before is recorded."""
    w, (_, got) = answers()
    w.announcer_moves.append("node2 -> node1")
    record, problems = cluster_path_findings(w, SimpleNamespace(answers=got, announcer="node2"))
    assert record["announcing_node"] == "node2" and record["announcer_before_the_check"] == "node1"
    assert record["announcer_moves"] == ["node2 -> node1"]
    assert problems[0].startswith("the backend runs on node2, the node announcing the VIP")


# ---------------------------------------------------------------------------------------------- observation and checks


def test_observation_builds_the_runner_row_from_real_rows():
    w = world()
    probe, calls = scripted(fixture("connect_oi_runner_two_vips_denied.json"))
    seen = RunnerObservation(w.address_of(), probe)
    table = seen()
    assert table.by_id() == {f"{RUNNER}->oi/oi-local:80/TCP": Verdict.TIMEOUT,
                             f"{RUNNER}->oi/oi-cluster:80/TCP": Verdict.TIMEOUT}
    assert seen.answers == {w.targets["local"]: None, w.targets["cluster"]: None}
    args, timeout = calls[0]
    assert args == ["connect", "--timeout", "2.0", "--to", f"{LOCAL_VIP}:80/http", "--to", f"{CLUSTER_VIP}:80/http"]
    assert timeout == 34.0


def test_observation_of_a_target_netprobe_did_not_report_is_missing_not_connected():
    w = world()
    probe, _ = scripted(fixture("connect_oi_runner_two_vips.json")[:1])  # only the Local VIP's row
    table, got = observe_from_runner(w.address_of(), probe)
    assert table.get(RUNNER, w.targets["cluster"]) is None and got[w.targets["cluster"]] is None


def test_checks_judge_only_their_cells_and_baseline_everything():
    w = world()
    deny = outside_check("d", w.targets, DENIED, [], w.flow_keys())
    assert [c for c in deny.blocked_cells()] == sorted((RUNNER, t) for t in w.targets.values())
    assert set(deny.baseline.cells.values()) == {Expect.CONNECTED} and len(deny.baseline.cells) == 2
    allowed = outside_check("a", w.targets, RUNNER_ALLOWED, [])
    assert list(allowed.expected.cells) == [(RUNNER, w.targets["local"])]  # the Cluster cell: recorded only
    assert allowed.blocked_cells() == []
    assert len(outside_check("w", w.targets, WORLD_ALLOWED, []).expected.cells) == 2
    key = w.flow_keys()[(RUNNER, w.targets["local"])]
    assert (key.src_ip, key.dst_ips, key.port) == (RUNNER_IP, frozenset({"10.201.1.2"}), 8080)


def test_runner_network_is_the_lab_network_holding_the_runner():
    lab = SimpleNamespace(network=SimpleNamespace(cidr="10.232.0.0/24"))
    assert runner_network(SimpleNamespace(lab=lab), "10.232.0.1") == "10.232.0.0/24"
    assert runner_network(SimpleNamespace(lab=lab), "192.168.1.5") == "192.168.1.5/32"
    assert runner_network(SimpleNamespace(lab=None), "10.232.0.1") == "10.232.0.1/32"


# ---------------------------------------------------------------------------------------------- load


def test_load_args_target_the_tcp_port():
    assert load_args(CLUSTER_VIP, 1000, 1000.0, 10.0) == [
        "load", "--to", f"{CLUSTER_VIP}:81", "--connections", "1000", "--rate", "1000", "--hold", "10",
        "--timeout", "5", "--verify-timeout", "5", "--open-slack", "30"]


def test_open_rate_and_p99_against_the_bounds_on_real_load():
    total, problems = judge_load([fixture("load_oi_runner_vip.json")])
    assert problems == [] and total["verified"] == 300
    assert judge_open_rate(total, 200, 1000) == []
    rate, p99 = total["open_rate_per_s"], total["connect_ms_p99"]
    assert judge_open_rate(total, rate + 1, p99 - 1) == [
        f"connection-open rate {rate:.1f}/s is below the bound of {rate + 1:g}/s (--lb-min-open-rate)",
        f"p99 connect time {p99:.1f} ms is over the bound of {p99 - 1:g} ms (--lb-max-connect-p99-ms; over 1 s "
        "means SYNs were lost and retransmitted)"]
    assert judge_open_rate({"open_rate_per_s": 0.0, "connect_ms_p99": 0.0}, 1, 1000)[0].startswith(
        "connection-open rate 0.0/s is below")


def test_every_table_on_the_announcer_must_rise_by_the_load():
    before = {"bpf-ct": CtReading("bpf-ct", 100, 524288), "bpf-nat": CtReading("bpf-nat", 10, 524288)}
    during = {"bpf-ct": CtReading("bpf-ct", 1200, 524288), "bpf-nat": CtReading("bpf-nat", 2010, 524288)}
    assert judge_table_rises("w1", before, during, 1000) == []
    flat = {**during, "bpf-nat": CtReading("bpf-nat", 12, 524288)}
    [problem] = judge_table_rises("w1", before, flat, 1000)
    assert problem.startswith("w1: the NAT table (bpf-nat) grew by 2 entries while 1000 connections were held")
    with pytest.raises(NotMeasured, match="differ"):
        judge_table_rises("w1", before, {"bpf-ct": during["bpf-ct"]}, 1000)
    with pytest.raises(NotMeasured):
        judge_table_rises("w1", {}, {}, 1000)


def test_judge_outside_load_adds_up_the_three_judges():
    result = fixture("load_oi_runner_vip.json")
    before = {"nf_conntrack": CtReading("nf_conntrack", 5, 262144)}
    during = {"nf_conntrack": CtReading("nf_conntrack", 7, 262144)}
    total, problems = judge_outside_load("node1", before, result, during, 300, 10 ** 6, 10 ** 6)
    assert total["verified"] == 300 and len(problems) == 2
    assert problems[0].startswith("node1: the conntrack table (nf_conntrack) grew by 2 entries")
    assert problems[1].startswith("connection-open rate")
    with pytest.raises(NotMeasured, match="verified"):
        judge_outside_load("node1", before, {k: v for k, v in result.items() if k != "verified"}, during, 300, 1, 1)


# ---------------------------------------------------------------------------------------------- the BPF NAT map reader


def test_nat_read_failure_is_not_measured_and_names_the_map():
    assert parse_bpf_ct("w1", 0, "42 524288\n", "", "bpf-nat") == CtReading("bpf-nat", 42, 524288)
    with pytest.raises(NotMeasured, match=r"w1: reading Cilium's BPF NAT map failed \(exit 3\)"):
        parse_bpf_ct("w1", 3, "", "cilium-dbg bpf nat list failed", "bpf-nat")


def test_nat_script_counts_tcp_entries_and_reads_the_nat_size(tmp_path):
    """The agent script, run by a real sh with a fake cilium-dbg printing Cilium's formats (`bpf nat list` lines,
    the verbose status's BPF Maps table): a failing list is an error, not '0 entries'."""
    fake = tmp_path / "cilium-dbg"
    fake.write_text(
        "#!/bin/sh\nif [ \"$1\" = status ]; then printf '  Name                          Size\\n"
        "  IPv4 service reverse NAT      65536\\n  NAT                           524288\\n'; exit 0; fi\n"
        "[ -n \"$FAIL\" ] && { echo 'agent down' >&2; exit 1; }\n"
        "echo 'TCP OUT 10.232.0.1:40000 -> 10.0.0.5:9090 XLATE_SRC 10.0.1.15:40000 Created=1sec ago NeedsCT=1'\n"
        "echo 'TCP IN 10.0.0.5:9090 -> 10.0.1.15:40000 XLATE_DST 10.232.0.1:40000 Created=1sec ago NeedsCT=1'\n"
        "echo 'UDP OUT 10.0.1.7:53 -> 10.0.0.9:53 XLATE_SRC 10.0.1.15:53 Created=1sec ago NeedsCT=1'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    ok = subprocess.run(["sh", "-c", cilium.NAT_READ_SCRIPT], capture_output=True, text=True, env=env, timeout=30)
    assert parse_bpf_ct("w1", ok.returncode, ok.stdout, ok.stderr, "bpf-nat") == CtReading("bpf-nat", 2, 524288)
    bad = subprocess.run(["sh", "-c", cilium.NAT_READ_SCRIPT], capture_output=True, text=True,
                         env={**env, "FAIL": "1"}, timeout=30)
    with pytest.raises(NotMeasured, match=r"(?s)exit 3.*cilium-dbg bpf nat list failed"):
        parse_bpf_ct("w1", bad.returncode, bad.stdout, bad.stderr, "bpf-nat")


# ---------------------------------------------------------------------------------------------- options


def _settings_with(**given):
    from conformance.conftest import _settings
    values = {"--expect-sysctl": [], "--expect-pod-sysctl": [], "--lb-pool": [], "--conntrack-hold": 10.0,
              "--wait-timeout": 300.0, "--policy-timeout": 60.0, "--policy-consecutive": 3,
              "--conntrack-peak": 200000, "--failover-seconds": 30.0, "--results-dir": "results",
              "--kubeconfig": "/nonexistent", **given}
    return _settings(SimpleNamespace(getoption=lambda name: values.get(name)))


def test_lb_load_options_default_and_override():
    s = _settings_with()
    assert (s.lb_load_connections, s.lb_load_rate, s.lb_min_open_rate, s.lb_max_connect_p99_ms) == \
        (1000, 1000.0, 200.0, 1000.0)
    s = _settings_with(**{"--lb-load-connections": 5000, "--lb-load-rate": 0.0, "--lb-min-open-rate": 50.0,
                          "--lb-max-connect-p99-ms": 250.0})
    assert (s.lb_load_connections, s.lb_load_rate, s.lb_min_open_rate, s.lb_max_connect_p99_ms) == \
        (5000, 0.0, 50.0, 250.0)


@pytest.mark.parametrize("given, named", [({"--lb-load-connections": 0}, "--lb-load-connections 0"),
                                          ({"--lb-load-connections": 2_000_000}, "--lb-load-connections 2000000"),
                                          ({"--lb-min-open-rate": -1.0}, "--lb-min-open-rate -1.0"),
                                          ({"--lb-max-connect-p99-ms": 0.0}, "--lb-max-connect-p99-ms 0.0"),
                                          ({"--lb-load-rate": -5.0}, "--lb-load-rate -5.0")])
def test_lb_load_options_reject_nonsense(given, named):
    with pytest.raises(pytest.UsageError, match=named):
        _settings_with(**given)


def test_the_checks_hold_the_datapath_lock():
    """Load never runs while policy is observed: the policy steps share the lock, the load takes it alone."""
    import conformance.test_outside_in as oi
    kinds = {name: [m.args[0] for m in getattr(getattr(oi, name), "pytestmark", []) if m.name == "datapath"]
             for name in dir(oi) if name.startswith("test_")}
    assert kinds == {"test_default_deny_denies_the_runner": ["observe"],
                     "test_ipblock_allows_the_runner_and_keeps_its_address": ["observe"],
                     "test_cluster_traffic_crosses_nodes_and_is_snated": ["observe"],
                     "test_lb_datapath_under_load_from_outside": ["load"]}
    assert (oi.pytestmark.name, oi.pytestmark.args) == ("xdist_group", ("metallb",))  # with the other LB checks


def test_the_announcer_must_hold_through_the_load():
    from conformance.test_outside_in import judge_announcer_held
    assert judge_announcer_held(CLUSTER_VIP, "node1", ["node1", "node1"], set()) == []
    assert judge_announcer_held(CLUSTER_VIP, "node1", [], set()) == []
    [moved] = judge_announcer_held(CLUSTER_VIP, "node1", ["node1", "node2", "node1"], set())
    assert f"neighbour entry for {CLUSTER_VIP} moved while the load was held: node1 -> node2 -> node1" in moved
    [stray] = judge_announcer_held(CLUSTER_VIP, "node1", ["node1"], {"52:54:00:00:00:99"})
    assert "52:54:00:00:00:99" in stray and "no node's MAC" in stray


def test_neighbour_watch_follows_the_entry_it_reads():
    """The watch reads the entry through ``neighbour`` (`ip neigh` on the runner by default; the netns fault
    matrix moves a real one); a MAC sequence stands in for it here."""
    import conformance.test_loadbalancer as lb
    from conformance.test_outside_in import NeighbourWatch
    assert NeighbourWatch(CLUSTER_VIP, {}).neighbour is lb.neighbour_mac
    macs = iter(["aa:aa:aa:aa:aa:01", "aa:aa:aa:aa:aa:01", "aa:aa:aa:aa:aa:02", "aa:aa:aa:aa:aa:99"])
    with NeighbourWatch(CLUSTER_VIP, {"node1": {"aa:aa:aa:aa:aa:01"}, "node2": {"aa:aa:aa:aa:aa:02"}},
                        interval=0.01, seconds=5, neighbour=lambda ip: next(macs, "aa:aa:aa:aa:aa:02")) as watch:
        time.sleep(0.2)
    assert watch.seen == ["node1", "node2"] and watch.unknown == {"aa:aa:aa:aa:aa:99"}
