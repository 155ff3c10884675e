"""`load` held connections through a DNAT service, a connection-limit fault, and `facts` on real namespaces."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from topo import NETPROBE, VIP, Overlay, build, capture, sh

N = 3000


def load_args(n, timeout="2", hold="3"):
    return ["load", "--to", VIP + ":80", "--connections", str(n), "--hold", hold, "--timeout", timeout]


def wait_for_count(lab, ns, at_least, seconds=10.0):
    deadline = time.monotonic() + seconds
    facts = lab.probe(ns, "facts")
    while facts["conntrack"]["count"] < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        facts = lab.probe(ns, "facts")
    return facts


@pytest.fixture
def service(lab):
    topo = build(lab, Overlay(kind="vxlan", service=True))
    lab.serve(topo.pod2, tcp="8080", hostname="pod2")
    return topo


def test_load_holds_every_connection_and_the_dnat_node_tracks_them(lab, service):
    proc = lab.spawn(service.pod1, [sys.executable, str(NETPROBE)] + load_args(N))
    node_facts = wait_for_count(lab, service.node1, N)
    pod_facts = lab.probe(service.pod2, "facts")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    capture("load_healthy", result)
    capture("facts_dnat_node_under_load", node_facts)
    assert (result["requested"], result["established"], result["held"]) == (N, N, N)
    assert result["verified"] == result["verify_sent"] == result["held"]  # serve echoed the byte on every one
    assert result["failed"] == result["timeouts"] == result["resets"] == 0
    assert result["open_rate_per_s"] > 0 and result["connect_ms_p50"] <= result["connect_ms_p99"]
    assert node_facts["conntrack"]["count"] >= N  # the DNAT rule makes node1 track every flow
    assert pod_facts["conntrack"]["count"] == 0  # no rule needs conntrack in pod2: it tracks nothing


SERVER_DROPS_INPUT = "table inet blackhole {\n chain input { type filter hook input priority 0; tcp dport 8080 drop; }\n}\n"


def test_load_verifies_fewer_than_held_when_the_server_silently_drops_mid_hold(lab, service):
    """Connections established, then the server's namespace drops everything arriving on 8080 (no RST, no ICMP):
    the client's sockets still say ESTABLISHED (held), but no byte comes back (verified 0)."""
    n = 300
    proc = lab.spawn(service.pod1, [sys.executable, str(NETPROBE)] + load_args(n, hold="4")
                     + ["--verify-timeout", "2"])
    wait_for_count(lab, service.node1, n)  # every flow established and tracked by the DNAT node
    lab.nft(service.pod2, SERVER_DROPS_INPUT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    capture("load_server_drops_mid_hold", result)
    assert result["established"] == result["held"] == n
    assert result["verify_sent"] == n and result["verified"] == 0 and result["verify_timeouts"] == n


def test_load_reports_failures_when_new_flows_are_dropped_over_a_limit(lab, service):
    limit = 500
    lab.nft(service.node1, "table inet connlimit {\n chain forward { type filter hook forward priority 0; "
                           "ct state new tcp dport 8080 ct count over %d drop; }\n}\n" % limit)
    result = lab.probe(service.pod1, *load_args(1500, timeout="1", hold="1"))
    capture("load_conn_limited", result)
    assert 0 < result["established"] <= limit
    assert result["failed"] == 1500 - result["established"] >= 1000
    assert result["timeouts"] == result["failed"]
    assert result["held"] == result["established"]


@pytest.mark.parametrize("how", ["iptables", "nft"])
def test_facts_sees_kube_services_rules(lab, how):
    ns = lab.netns("node")
    if how == "iptables":
        assert shutil.which("iptables"), "iptables is needed to stand in for kube-proxy's iptables mode"
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-N", "KUBE-SERVICES"], check=True)
    else:
        lab.nft(ns, "table ip kube-proxy {\n chain services { }\n}\n")
    facts = lab.probe(ns, "facts")
    assert facts["kube_services_rules"]["present"] is True


def test_facts_sees_no_kube_services_rules_on_a_clean_node(lab):
    facts = lab.probe(lab.netns("node"), "facts")
    capture("facts_clean_netns", facts)
    assert facts["kube_services_rules"]["present"] is False
    assert facts["kube_proxy_running"] is False


def test_facts_sees_a_running_kube_proxy(lab):
    fake = lab.tmp / "kube-proxy"
    shutil.copy("/bin/sleep", fake)
    ns = lab.netns("node")
    lab.spawn(ns, [str(fake), "30"])
    time.sleep(0.2)
    assert lab.probe(ns, "facts")["kube_proxy_running"] is True


def test_facts_reads_sysctls_interfaces_and_conntrack_in_a_netns(lab):
    ns = lab.netns("node")
    lab.sysctl(ns, "net.core.somaxconn", 12345)
    lab.ip(ns, "link", "add", "d0", "mtu", "1400", "type", "veth", "peer", "name", "d1")
    lab.ip(ns, "addr", "add", "10.202.0.1/24", "dev", "d0")
    facts = lab.probe(ns, "facts")
    assert facts["sysctls"]["net.core.somaxconn"] == 12345
    mac = sh("ip", "netns", "exec", ns, "cat", "/sys/class/net/d0/address").stdout.strip()
    assert {"name": "d0", "mtu": 1400, "operstate": "down", "mac": mac, "ipv4": ["10.202.0.1/24"]} \
        in facts["interfaces"]
    assert facts["default_route"] is None
    assert facts["conntrack"]["count"] == 0 and facts["conntrack"]["max"] > 0
    assert set(facts["conntrack"]["stat"]) >= {"found", "invalid", "insert_failed", "drop", "early_drop"}
    assert set(facts["ip_fragments"]) >= {"FragCreates", "FragFails", "ReasmReqds", "ReasmOKs"}


def test_load_counts_what_a_starved_client_left_apart_from_timeouts(lab, service):
    """The client itself is stopped (SIGSTOP, as a CPU-starved pod on a loaded node) while it opens: when it runs
    again its opening window has closed, and what it could not open or finish counts as `not_opened` /
    `unfinished`, never as a datapath timeout; judge_load calls that NotMeasured, not a verdict."""
    from conformance.judge import NotMeasured, judge_load
    n = 400
    proc = lab.spawn(service.pod1, [sys.executable, str(NETPROBE)] + load_args(n, timeout="1", hold="1")
                     + ["--rate", "100", "--open-slack", "0", "--workers", "1"])
    time.sleep(1.5)  # it has opened some (100/s after start-up); the window closes at 4 s + 1 s
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True)
    pids = [int(p) for p in workers.stdout.split()]  # netprobe load forks its workers
    assert pids, "no load worker to stop"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(6)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    capture("load_client_starved", result)
    assert result["not_opened"] > 0, result
    assert result["timeouts"] == 0, result  # the server answered every SYN it was sent
    assert result["established"] + result["not_opened"] + result["unfinished"] == n
    with pytest.raises(NotMeasured, match="fell behind"):
        judge_load([result])
