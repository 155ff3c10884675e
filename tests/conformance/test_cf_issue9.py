"""Issue 9, conformance side: one test per defect that failed on the old code and passes now.

Defect numbers refer to `issues show 9`. Harness: pure judges on real netprobe outputs, the policy runner with
scripted observations, the API double (tests/apidouble) for orchestration, real bash / real sockets where cheap.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from apidouble.kubelet import NETPROBE, NODES, run_netprobe_locally, run_suite

from conformance import cilium, report
from conformance import kube as k8s
from conformance.check import (REASON_UNAVAILABLE, BarrierResult, Drop, FlowKey, NoBarrier, PolicyCheck,
                               run_policy_check)
from conformance.expect import Expect, Target, TruthTable, Verdict, observed_table
from conformance.judge import (CounterMissing, CtReading, NotMeasured, conntrack_deltas, judge_ct_capacity,
                               judge_ct_rise, judge_load, parse_bpf_ct, poll_table)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "netprobe"
SRC, A, B = "ns/client", Target("ns/web", 8080), Target("ns/web", 9090)


def table(kind, **cells) -> TruthTable:
    t = TruthTable([SRC], [A, B])
    for target, value in zip((A, B), (cells["a"], cells["b"])):
        t.set(SRC, target, kind(value))
    return t


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


class Scripted:
    """observe(): the next table of a script; apply(): records the manifests applied."""

    def __init__(self, *tables):
        self.tables, self.applied = list(tables), []

    def observe(self):
        return self.tables.pop(0) if len(self.tables) > 1 else self.tables[0]

    def apply(self, manifests):
        self.applied.append(manifests)
        return len(manifests)


DENY_B = PolicyCheck("deny 9090", [SRC], [A, B], [{"kind": "NetworkPolicy"}],
                     expected=table(Expect, a="connected", b="blocked"),
                     baseline=table(Expect, a="connected", b="connected"),
                     flow_keys={(SRC, B): FlowKey("10.0.0.1", frozenset({"10.0.0.2"}), 9090, "TCP")})
DEAD = table(Verdict, a="connected", b="timeout")      # the target on 9090 is dead: times out with or without policy
ENFORCED = table(Verdict, a="connected", b="timeout")
OPEN = table(Verdict, a="connected", b="connected")


def run(check, script, barrier=None, drops=None, seconds=10, consecutive=3):
    clock = Clock()
    return run_policy_check(check, script.apply, script.observe, barrier or NoBarrier("test"), drops, seconds,
                            consecutive=consecutive, clock=clock, sleep=clock.sleep, wall=lambda: 0.0)


# ---------------------------------------------------------------------------------------------- defect 2


def test_d2_a_dead_target_never_satisfies_a_denial():
    """Old code: step 2 polled only the enforced table, so a dead 9090 'passed' the denial."""
    result = run(DENY_B, Scripted(DEAD))
    assert not result.passed
    assert "baseline failed" in result.text and "ns/client->ns/web:9090/TCP (timeout)" in result.text
    assert result.enforced is None  # no denial was judged


def test_d2_baseline_is_inside_the_check_then_policies_applied():
    script = Scripted(OPEN, ENFORCED)
    result = run(DENY_B, script, consecutive=1)
    assert result.passed, result.text
    assert script.applied == [[], DENY_B.policies]  # baseline without policy first, same check, same pods


class Drops:
    def __init__(self, drops):
        self.found = drops

    def drops(self, since):
        return self.found


def test_d2_drop_for_a_reason_other_than_policy_fails_naming_it():
    script = Scripted(OPEN, ENFORCED)
    result = run(DENY_B, script, drops=Drops([Drop("10.0.0.1", "10.0.0.2", 9090, "TCP", "CT_MAP_INSERTION_FAILED")]),
                 consecutive=1)
    assert not result.passed and "ns/client->ns/web:9090/TCP: dropped for CT_MAP_INSERTION_FAILED" in result.text
    ok = run(DENY_B, Scripted(OPEN, ENFORCED), drops=Drops([Drop("10.0.0.1", "10.0.0.2", 9090, "TCP",
                                                                   "POLICY_DENIED")]), consecutive=1)
    assert ok.passed and ok.drop_reasons == {"ns/client->ns/web:9090/TCP": "POLICY_DENIED"}


def test_d2_without_hubble_the_reason_is_said_to_be_unavailable():
    result = run(DENY_B, Scripted(OPEN, ENFORCED), consecutive=1)
    assert result.drop_reasons["ns/client->ns/web:9090/TCP"].startswith(REASON_UNAVAILABLE)


def test_d2_hubble_json_lines_parsed():
    line = json.dumps({"flow": {"verdict": "DROPPED", "drop_reason_desc": "POLICY_DENIED",
                                "IP": {"source": "10.0.0.1", "destination": "10.0.0.2"},
                                "l4": {"UDP": {"source_port": 5353, "destination_port": 53}}}})
    forwarded = json.dumps({"flow": {"verdict": "FORWARDED", "IP": {}, "l4": {"TCP": {}}}})
    assert cilium.parse_hubble_flows(f"{line}\n{forwarded}\n") == [
        Drop("10.0.0.1", "10.0.0.2", 53, "UDP", "POLICY_DENIED")]
    with pytest.raises(NotMeasured, match="not JSON"):
        cilium.parse_hubble_flows("rpc error: connection refused")


# ---------------------------------------------------------------------------------------------- defect 3


def test_d3_one_match_is_not_enough_and_mismatches_are_recorded():
    """Old code passed on the first full match; now K consecutive, every mismatch kept for the report."""
    want = table(Expect, a="connected", b="blocked")
    flaky = table(Verdict, a="timeout", b="timeout")  # the allowed flow dropped once
    clock = Clock()
    seq = iter([ENFORCED, flaky, ENFORCED, ENFORCED, ENFORCED])
    result = poll_table(want, lambda: next(seq), 60, clock=clock, sleep=clock.sleep, consecutive=3)
    assert result.matched and result.polls == 5 and result.streak == 3
    assert result.record()["mismatched_observations"] == [
        {"poll": 2, "at_s": 2.0, "cells": {"ns/client->ns/web:8080/TCP": "timeout"}}]


def test_d3_a_leak_after_the_barrier_is_a_failure_never_retried():
    want = table(Expect, a="connected", b="blocked")
    seq = iter([ENFORCED, OPEN, ENFORCED, ENFORCED, ENFORCED])
    clock = Clock()
    result = poll_table(want, lambda: next(seq), 60, clock=clock, sleep=clock.sleep, consecutive=3, enforced=True)
    assert not result.matched and result.leaks == {"ns/client->ns/web:9090/TCP": [2]}
    assert "connected at poll 2" in result.text


class FakeAgents:
    """Session.exec double for the Cilium agents: policy revisions that advance per call."""

    def __init__(self, revisions: dict[str, list[int]], wait_rc: int = 0):
        self.revisions, self.calls, self.wait_rc = {k: list(v) for k, v in revisions.items()}, [], wait_rc

    def exec(self, ns, pod, command, timeout, container="probe"):
        self.calls.append((pod, command))
        node = pod.split("-", 1)[1]
        if command[:3] == ["cilium-dbg", "policy", "get"]:
            revs = self.revisions[node]
            rev = revs.pop(0) if len(revs) > 1 else revs[0]
            return k8s.ExecResult(0, json.dumps({"policy": "[]", "revision": rev}), "")
        if command[:3] == ["cilium-dbg", "policy", "wait"]:
            return k8s.ExecResult(self.wait_rc, "", "timeout" if self.wait_rc else "")
        raise AssertionError(command)


def test_d3_barrier_waits_for_every_agent_revision():
    agents = FakeAgents({"w1": [5, 5, 6, 7], "w2": [9, 11]})
    clock = Clock()
    barrier = cilium.CiliumBarrier(agents, {"w1": "cilium-w1", "w2": "cilium-w2"}, clock=clock, sleep=clock.sleep)
    mark = barrier.mark()
    assert mark == {"w1": 5, "w2": 9}
    result = barrier.wait(mark, 2, 30)
    assert result.passed and "'w1': 7" in result.text and "'w2': 11" in result.text
    # whole seconds: cilium-dbg's flag is an IntVar (cilium-dbg/cmd/policy_wait.go); "29s" was refused by the real
    # agent ('invalid argument "40s" for "--max-wait-time" flag') on the CI cluster
    assert ("cilium-w1", ["cilium-dbg", "policy", "wait", "7", "--max-wait-time", "29"]) in agents.calls


def test_d3_barrier_stuck_agent_is_an_error_not_a_verdict():
    clock = Clock()
    barrier = cilium.CiliumBarrier(FakeAgents({"w1": [5]}), {"w1": "cilium-w1"}, clock=clock, sleep=clock.sleep)
    with pytest.raises(NotMeasured, match=r"did not reach the policy revision .*'w1': '5<6'"):
        barrier.wait({"w1": 5}, 1, 3)


# ---------------------------------------------------------------------------------------------- defect 4


def load_doc(**kw) -> dict:
    return {**json.loads((FIXTURES / "load_healthy.json").read_text()), **kw}


def test_d4_held_needs_an_end_to_end_byte():
    doc = load_doc()
    old_netprobe = {k: v for k, v in doc.items() if not k.startswith("verif")}
    with pytest.raises(NotMeasured, match="no `verified` count"):
        judge_load([old_netprobe])  # old code: passed on client socket state alone
    _, problems = judge_load([dict(doc, verified=doc["held"] - 3)])
    assert any(f"only {doc['held'] - 3} of {doc['established']} held connections carried a byte" in p
               for p in problems)


def test_d4_the_table_must_grow_by_the_load():
    before = {"w1": CtReading("bpf-ct", 100, 524288), "w2": CtReading("bpf-ct", 80, 524288)}
    blind = {"w1": CtReading("bpf-ct", 110, 524288), "w2": CtReading("bpf-ct", 85, 524288)}
    assert "grew by 15 entries while 1000 connections were held" in judge_ct_rise(before, blind, 1000)
    seen = {"w1": CtReading("bpf-ct", 1200, 524288), "w2": CtReading("bpf-ct", 80, 524288)}
    assert judge_ct_rise(before, seen, 1000) is None


def test_d4_capacity_against_the_declared_peak():
    prod = {"n": CtReading("nf_conntrack", 0, 1000000)}
    assert judge_ct_capacity(prod, 200000) == ({"n": 0.8}, [])
    small = {"n": CtReading("bpf-ct", 5000, 262144)}  # old code: 20 % of *this* table "had headroom"
    headroom, problems = judge_ct_capacity(small, 200000)
    assert headroom == {"n": 0.218} and problems == []  # 1 - (5000 + 200000) / 262144
    assert judge_ct_capacity(small, 250000)[1][0].startswith("n: bpf-ct holds 262144 entries")


def test_d4_bpf_ct_read_failure_is_not_measured():
    assert parse_bpf_ct("w1", 0, "1234 524288\n", "") == CtReading("bpf-ct", 1234, 524288)
    with pytest.raises(NotMeasured, match=r"w1: reading Cilium's BPF conntrack map failed \(exit 3\): cilium-dbg"):
        parse_bpf_ct("w1", 3, "", "cilium-dbg bpf ct list global failed")


def test_d4_ct_script_checks_every_step(tmp_path):
    """The agent script, run by a real sh with fake cilium-dbg: a failing list is an error, not '0 entries'."""
    fake = tmp_path / "cilium-dbg"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = status ]; then echo '  TCP connection tracking   524288'; exit 0; fi\n"
                    "[ -n \"$FAIL\" ] && { echo 'agent down' >&2; exit 1; }\necho 'TCP IN 10.0.0.1'\necho 'TCP OUT x'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    ok = subprocess.run(["sh", "-c", cilium.CT_READ_SCRIPT], capture_output=True, text=True, env=env)
    assert parse_bpf_ct("w1", ok.returncode, ok.stdout, ok.stderr) == CtReading("bpf-ct", 2, 524288)
    bad = subprocess.run(["sh", "-c", cilium.CT_READ_SCRIPT], capture_output=True, text=True, env={**env, "FAIL": "1"})
    with pytest.raises(NotMeasured, match="exit 3"):
        parse_bpf_ct("w1", bad.returncode, bad.stdout, bad.stderr)


def test_d4_ct_script_counts_one_ports_flows_on_a_real_listing(tmp_path):
    """`cilium-dbg bpf ct list global` as captured on the CI cluster's w1: all TCP entries, or only those whose
    destination port is the load's (a port that is another's source port, or a longer port, does not count)."""
    listing = Path(__file__).resolve().parents[1] / "fixtures" / "cilium" / "bpf_ct_list_global_cik8s_w1.txt"
    fake = tmp_path / "cilium-dbg"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = status ]; then echo '  TCP connection tracking   524288'; exit 0; fi\n"
                    f"cat '{listing}'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def count(dport):
        script = cilium.map_read_script("cilium-dbg bpf ct list global", "TCP connection tracking", dport)
        res = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)
        return parse_bpf_ct("w1", res.returncode, res.stdout, res.stderr).entries

    assert count(None) == 14          # every TCP line, not the ICMP one
    assert count(81) == 3             # SVC entries of the load to 10.232.0.206:81 (one is among the twelve)
    assert count(8181) == 3           # CoreDNS readiness probes; 81 is not a prefix match of 8181
    assert count(7946) == 5           # memberlist, never its source ports
    assert count(28081) == 0


class ShSession:
    """Runs the agent script with this host's sh (the fake cilium-dbg first on PATH), as session.exec would."""

    def __init__(self, env):
        self.env = env

    def exec(self, ns, pod, argv, timeout, container=None):
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        return type("Res", (), {"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr})()


def test_d4_one_listing_gives_the_whole_table_and_one_ports_flows(tmp_path):
    """The conntrack check's reading before its load: both counts from one listing (the captured w1 map)."""
    listing = Path(__file__).resolve().parents[1] / "fixtures" / "cilium" / "bpf_ct_list_global_cik8s_w1.txt"
    fake = tmp_path / "cilium-dbg"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = status ]; then echo '  TCP connection tracking   524288'; exit 0; fi\n"
                    "[ -n \"$FAIL\" ] && { echo 'agent down' >&2; exit 1; }\n"
                    f"echo list >> '{tmp_path}/calls'; cat '{listing}'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    whole, port = cilium.ct_reading_pair(ShSession(env), "w1", "cilium-x", 7946)
    assert (whole, port) == (CtReading("bpf-ct", 14, 524288), CtReading("bpf-ct", 5, 524288))
    assert (tmp_path / "calls").read_text() == "list\n"  # listed once
    with pytest.raises(NotMeasured, match="w1: reading Cilium's BPF conntrack map failed \\(exit 3\\)"):
        cilium.ct_reading_pair(ShSession({**env, "FAIL": "1"}), "w1", "cilium-x", 7946)


# ---------------------------------------------------------------------------------------------- defect 5


def test_d5_a_missing_counter_is_not_no_rise():
    facts = json.loads((FIXTURES / "facts_dnat_node_under_load.json").read_text())
    broken = dict(facts, conntrack={"count": None, "max": None, "stat": None},
                  errors=[{"what": "conntrack.stat", "error": "/proc/net/stat/nf_conntrack is absent"}])
    with pytest.raises(CounterMissing, match=r"n1 \(after\): drop, early_drop, insert_failed unreadable "
                                             r"\(conntrack.stat: /proc/net/stat/nf_conntrack is absent\)"):
        conntrack_deltas({"n1": facts}, {"n1": broken})  # old code: {} ("no rise")
    assert issubclass(CounterMissing, NotMeasured)


def test_d5_rules_script_fails_when_iptables_save_fails(tmp_path):
    """Old script: a failing iptables-save piped into grep printed 'no' (no rules)."""
    from conformance.test_kube_proxy_replacement import RULES_SCRIPT, parse_rules_answer
    fake = tmp_path / "iptables-save"
    fake.write_text("#!/bin/sh\necho 'iptables-save v1.8: cannot initialize table' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    res = subprocess.run(["bash", "-c", RULES_SCRIPT], capture_output=True, text=True, env=env)
    with pytest.raises(NotMeasured, match="iptables-save failed"):
        parse_rules_answer("w1", res.returncode, res.stdout, res.stderr)
    fake.write_text("#!/bin/sh\necho ':KUBE-SERVICES - [0:0]'\n")
    res = subprocess.run(["bash", "-c", RULES_SCRIPT], capture_output=True, text=True, env=env)
    assert parse_rules_answer("w1", res.returncode, res.stdout, res.stderr) is True


def test_d5_not_measured_is_reported_as_error_not_fail(tmp_path):
    from conformance.conftest import report_entry

    class Rep:
        nodeid, when, outcome, duration = "t.py::c", "call", "failed", 1.0
        user_properties = [("not_measured", True)]
        longrepr = None
    assert report_entry(Rep())["verdict"] == "error"


# ---------------------------------------------------------------------------------------------- defect 7


def test_d7_disruptive_check_never_runs_alongside_others_under_xdist(double, kubeconfig, kubelet, tmp_path):
    """Old code: failover ran on some worker while other workers' pods were being evicted by its taint."""
    from test_cf_orchestration import tuning_exec
    double.exec_handler = tuning_exec()
    proc = run_suite(["conformance/test_tuning.py", "conformance/test_loadbalancer.py", "-k", "tuning or failover",
                      "-n", "2", "-rs", "--kubeconfig", kubeconfig, "--lb-pool", "192.168.150.200-192.168.150.210",
                      "--results-dir", str(tmp_path / "r")], tmp_path)
    out, _ = proc.communicate(timeout=120)
    checks = {c["check"]: c for c in json.loads((tmp_path / "r" / "conformance-latest.json").read_text())["checks"]}
    assert checks["test_node_sysctls_match_expected"]["verdict"] == "pass", out
    assert checks["test_failover_to_another_node"]["verdict"] == "skip", out
    assert "runs only in its own serial stage" in checks["test_failover_to_another_node"]["message"]


def test_d7_cleanup_only_removes_a_left_over_taint(double, kubeconfig, tmp_path):
    node = double.get("nodes", "", "w1")
    node["spec"] = {"taints": [{"key": "kvmlab.io/conformance-failover", "value": "true", "effect": "NoExecute"},
                               {"key": "keep-me", "effect": "NoSchedule"}]}
    proc = run_suite(["conformance", "--kubeconfig", kubeconfig, "--cleanup-only"], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "removed 1 taint(s)" in out and "w1:kvmlab.io/conformance-failover:NoExecute" in out
    assert double.get("nodes", "", "w1")["spec"]["taints"] == [{"key": "keep-me", "effect": "NoSchedule"}]


def test_d7_make_conformance_runs_disruptive_in_a_serial_second_stage():
    text = (REPO / "Makefile").read_text()
    first, second = text.index("-m 'not disruptive'"), text.index("-m disruptive")
    assert first < second and "--append-report" in text[second:second + 200]
    assert "-n" not in text[second:text.index("\n", second)]


def test_d7_append_report_merges_the_stages(tmp_path):
    first = report.build([{"id": "a", "check": "a", "verdict": "pass", "measured": {}, "message": "",
                           "seconds": 1, "phase": "call"}], started=0)
    report.write(first, tmp_path)
    second = report.build([{"id": "fo", "check": "fo", "verdict": "fail", "measured": {}, "message": "x",
                            "seconds": 1, "phase": "call"}], started=1)
    merged = report.append(tmp_path, second)
    assert [c["id"] for c in merged["checks"]] == ["a", "fo"] and merged["counts"]["fail"] == 1


# ---------------------------------------------------------------------------------------------- defect 8


def test_d8_load_and_observation_share_one_lock():
    import conformance.test_conntrack as ct
    import conformance.test_default_deny as dd
    import conformance.test_mtu as mtu
    kinds = {m.__name__: [mk.args[0] for mk in (m.pytestmark if isinstance(m.pytestmark, list) else [m.pytestmark])
                          if mk.name == "datapath"] for m in (ct, dd, mtu)}
    assert kinds == {ct.__name__: ["load"], dd.__name__: ["observe"], mtu.__name__: ["observe"]}


def test_d8_an_observer_holding_the_lock_keeps_load_out(tmp_path):
    path = tmp_path / "lock"
    with open(path, "a+") as observer, open(path, "a+") as other_observer, open(path, "a+") as load:
        fcntl.flock(observer, fcntl.LOCK_SH)
        fcntl.flock(other_observer, fcntl.LOCK_SH | fcntl.LOCK_NB)  # observers run together
        with pytest.raises(BlockingIOError):
            fcntl.flock(load, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(observer, fcntl.LOCK_UN)
        fcntl.flock(other_observer, fcntl.LOCK_UN)
        fcntl.flock(load, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------------------------------------- defect 9


def test_d9_runner_ip_is_the_source_of_the_route_to_the_nodes():
    from conformance.conftest import source_ip_towards
    assert source_ip_towards("127.0.0.1") == "127.0.0.1"


def test_d9_http_from_the_runner_ignores_http_proxy(tmp_path, monkeypatch):
    """Old code: urllib sent the GET to $http_proxy (here: nothing listens), so the LB looked dead."""
    from conformance.test_loadbalancer import http_get
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(NETPROBE), "serve", "--bind", "127.0.0.1", "--http", str(port),
                             "--ready-file", str(ready), "--workers", "1"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if ready.exists():
                break
            proc.wait(timeout=0.05) if proc.poll() is not None else subprocess.run(["sleep", "0.05"])
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        answer = http_get("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert answer and answer["peer"].startswith("127.0.0.1")


def test_d9_a_runner_firewall_is_one_clear_error(double, kubeconfig, kubelet):
    from conformance.conftest import check_runner_reachable
    kube = k8s.connect(kubeconfig)
    s = k8s.Session(kube, k8s.StreamExecutor(kube))
    double.exec_handler = lambda ns, pod, c, command: (0, json.dumps([{
        "to": command[-1], "proto": "tcp", "verdict": "timeout", "error": None}]).encode(), b"")
    with pytest.raises(k8s.ConformanceError, match=r"cannot reach the runner at 127.0.0.1:\d+ \(timeout\)") as err:
        check_runner_reachable(s, "127.0.0.1", "w1")
    assert "INPUT chain" in err.value.hint
    double.exec_handler = lambda ns, pod, c, command: run_netprobe_locally(command)
    check_runner_reachable(k8s.Session(kube, k8s.StreamExecutor(kube)), "127.0.0.1", "w1")  # the real probe reaches the real serve: no error


# ---------------------------------------------------------------------------------------------- defect 10


def doc(**measured):
    return {"format": report.FORMAT, "started": "x", "counts": {}, "checks": [
        {"id": "dd::step2", "verdict": "pass", "measured": measured, "message": ""}]}


def test_d10_one_poll_more_is_not_a_regression():
    a = doc(policy_converge_seconds=4.1, policy_polls=1, policy_poll_seconds=6.5)
    b = doc(policy_converge_seconds=10.6, policy_polls=2, policy_poll_seconds=6.5)
    assert report.compare(a, b) == []  # old code: +6.5 s > max(50 %, 5 s) was a "regression"
    c = doc(policy_converge_seconds=30.0, policy_polls=5, policy_poll_seconds=6.5)
    assert [r.what.split(" (")[0] for r in report.compare(a, c)] == ["policy_converge_seconds 4.1 -> 30",
                                                                     "policy_polls 1 -> 5"]


def test_d10_tolerance_follows_the_measured_spread():
    history = [doc(tcp_bulk_mib_per_s=v) for v in (80.0, 120.0, 95.0)]
    a, b = doc(tcp_bulk_mib_per_s=110.0), doc(tcp_bulk_mib_per_s=70.0)
    assert report.compare(a, b)  # fixed 30 % floor: 70 < 77
    assert report.compare(a, b, history) == []  # spread 40 over 4 runs: within 2 x 40
    worse = report.compare(a, doc(tcp_bulk_mib_per_s=20.0), history)
    assert "beyond 2x the spread 40 of 4 earlier runs" in str(worse[0])


# ---------------------------------------------------------------------------------------------- defect 11


def test_d11_default_image_pinned_and_from_one_place(monkeypatch):
    assert "@sha256:" in k8s.PROBE_IMAGE and len(k8s.PROBE_IMAGE.split("@sha256:")[1]) == 64
    monkeypatch.delenv(k8s.PROBE_IMAGE_ENV, raising=False)
    assert k8s.probe_image(None) == k8s.PROBE_IMAGE
    monkeypatch.setenv(k8s.PROBE_IMAGE_ENV, "kvmlab.dev/netprobe:1")
    assert k8s.probe_image(None) == "kvmlab.dev/netprobe:1"
    assert k8s.probe_image("mirror/x@sha256:" + "0" * 64).startswith("mirror/")


def test_d11_probe_pods_are_restricted_compliant(double, kubeconfig, kubelet):
    kube = k8s.connect(kubeconfig)
    s = k8s.Session(kube, k8s.StreamExecutor(kube))
    ns = s.namespace("x")
    s.probe_pod(ns, "p", {"app": "p"}, tcp=[8080])
    sc = double.get("pods", ns, "p")["spec"]["containers"][0]["securityContext"]
    assert sc == {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534, "allowPrivilegeEscalation": False,
                  "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def test_d11_podsecurity_rejection_names_the_label(double, kubeconfig, kubelet):
    from kubernetes.client.rest import ApiException
    kube = k8s.connect(kubeconfig)
    s = k8s.Session(kube, k8s.StreamExecutor(kube))
    ns = s.namespace("x")

    def reject(namespace, body):
        exc = ApiException(status=403, reason="Forbidden")
        exc.body = json.dumps({"message": 'pods "p" is forbidden: violates PodSecurity "restricted:latest": '
                                          'privileged'})
        raise exc
    kube.core.create_namespaced_pod = reject
    with pytest.raises(k8s.ConformanceError, match="violates PodSecurity") as err:
        s.probe_pod(ns, "p", {"app": "p"})
    assert k8s.PSA_LABEL in err.value.hint


# ---------------------------------------------------------------------------------------------- defect 13


def test_d13_dns_cells_come_from_netprobe_dns_probes():
    """The default-deny DNS cells are read from `netprobe connect IP:53/dns` and `/dns-tcp` output."""
    dns_udp, dns_tcp = Target("kube-system/kube-dns", 53, "UDP"), Target("kube-system/kube-dns", 53, "TCP")
    rows = [{"to": "10.96.0.10:53/dns", "proto": "dns", "verdict": "connected"},
            {"to": "10.96.0.10:53/dns-tcp", "proto": "dns-tcp", "verdict": "timeout"}]
    t = observed_table([SRC], [dns_udp, dns_tcp], {SRC: rows},
                       {dns_udp: "10.96.0.10:53/dns", dns_tcp: "10.96.0.10:53/dns-tcp"})
    assert t.get(SRC, dns_udp) is Verdict.CONNECTED and t.get(SRC, dns_tcp) is Verdict.TIMEOUT
    for name in ("test_default_deny.py", "test_loadbalancer.py"):
        text = (REPO / "conformance" / name).read_text()
        assert "python3\", \"-c\"" not in text and "socket.socket" not in text and "urllib" not in text


def test_d13_barrier_interface_is_honest_about_skipping():
    assert NoBarrier("no Cilium").wait(None, 3, 10) == BarrierResult(False, "enforcement barrier skipped: no Cilium")


def test_a_transport_error_in_a_check_is_not_measured_never_a_failure():
    """Against the real CI cluster a broken exec channel raised ApiException(status 0) inside checks, and the report
    called them FAIL. A transport error is an ERROR; a wrong answer from the API server (404) is not."""
    from kubernetes.client.exceptions import ApiException

    from conformance.conftest import not_measured
    from conformance.judge import NotMeasured

    assert not_measured(ApiException(status=0, reason="Handshake status 200 OK"))
    assert not_measured(ApiException(status=503)) and not_measured(ConnectionResetError())
    assert not_measured(NotMeasured("no counters"))
    assert not not_measured(ApiException(status=404)) and not not_measured(AssertionError("leak"))
    from lab.errors import WaitTimeout
    assert not not_measured(WaitTimeout("no LoadBalancer IP within 120s"))  # the cluster never did it: a verdict
