"""The fault matrix (issue 9): every collected conformance check, on real kernels, once where it must FAIL with the
right message and once where it must PASS. Probes run as in a pod (tests/netns/podrun.py: the image's Python, PATH
with only python3, uid 65534; node-side facts as uid 0), in the Cilium layout of topo.build_cilium (pod eth0 1500,
route MTU 1450 over VXLAN between two node namespaces, node1 answering ARP for the LB VIP, a runner on the same
L2), and their JSON goes to the SAME judge function the check calls (conformance/judge.py, check.py, pod_tuning.py,
lab/cilium_status.py). Checks whose measurement is an API object or a Cilium agent's output judge real client
objects / captured agent output; conformance/README.md's table says what stays unprovable without a cluster.
MATRIX maps each collected check to its scenarios; test_matrix_covers_every_collected_check keeps them in sync."""
from __future__ import annotations

import functools
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import policy_standin
import topo
from podrun import PROBE_PYTHON, node_probe, pod_probe, pod_shell, pod_spawn
from conformance.check import NoBarrier, PolicyCheck, run_policy_check
from conformance.expect import Expect, Target, TruthTable, Verdict, cell_id, mismatches, observed_table
from conformance.judge import (MtuFinding, NotMeasured, PathRun, conntrack_deltas, expected_pod_mtu, ip_in_pool,
                               judge_announcer, judge_backend_answer, judge_beyond_pool, judge_ct_capacity,
                               judge_ct_rise, judge_failover, judge_kernels, judge_kpr, judge_load, judge_paths,
                               judge_requested_ip, judge_route_mtu, judge_source_preserved, judge_underlay,
                               kube_proxy_daemonsets, kube_proxy_findings, measure_paths, nf_conntrack_reading,
                               node_ips_from_facts, ordered_pairs, parse_link_macs, parse_neighbour, path_id, render_path_failures,
                               route_mtu, sysctl_table, judge_stack_drops, tcp_drop_deltas)
from conformance.pod_tuning import NODE_RP_FILTER_SCRIPT, judge_node_rp_filter, judge_pod_sysctls, parse_rp_filter_lines
from conformance.cilium import judge_relay
from conformance.l2 import L2Finding, judge_announcement, lab_link_macs
from conformance.oracle import CROSS_NODE, OUTSIDE, SAME_NODE
from conformance.world import step2_policies, step3_policies, step4_policies
from conformance.test_kube_proxy_replacement import RULES_SCRIPT, parse_rules_answer
from conformance.test_l2_announce import ARP_ARGS as L2_ARP_ARGS
from lab.cilium_status import ExpectedDatapath, datapath_modes, judge_datapath, judge_health
from conformance.test_loadbalancer import announcing_node, http_answer
from conformance.test_conntrack import read_while_held
from conformance.test_outside_in import (DENIED, RUNNER as RUNNER_ID, RUNNER_ALLOWED, WORLD_ALLOWED, OutsideWorld,
                                         NeighbourWatch, RunnerObservation, cluster_path_findings, deny_policies,
                                         judge_announcer_held, judge_outside_load,
                                         load_args, local_source_findings, observe_from_runner, outside_check,
                                         runner_allowed_policies, world_allowed_policies)
from lab.sysctl import parse_values, read_command

REPO = Path(__file__).resolve().parents[2]
VIP, RUNNER = topo.CIL_LB_VIP, topo.CIL_RUNNER
POD_MTU = expected_pod_mtu(1500, "vxlan")  # 1450

# collected check -> the matrix tests proving it fails on its fault and passes when healthy
MATRIX = {
    "test_tuning.py::test_node_sysctls_match_expected": ["test_tuning__sysctl_not_applied__fails",
                                                          "test_tuning__applied__passes"],
    "test_kube_proxy_replacement.py::test_no_kube_proxy_daemonset": ["test_kp_daemonset__present__fails",
                                                                     "test_kp_daemonset__absent__passes"],
    "test_kube_proxy_replacement.py::test_no_kube_proxy_process_or_rules": [
        "test_kp_rules__kube_proxy_nft_table__fails", "test_kp_rules__iptables_save_broken__errors",
        "test_kp_rules__clean_node__passes"],
    "test_kube_proxy_replacement.py::test_kernels_support_the_ebpf_datapath": ["test_kernel__uname_2_6__fails",
                                                                               "test_kernel__this_kernel__passes"],
    "test_kube_proxy_replacement.py::test_cilium_reports_kube_proxy_replacement": [
        "test_cilium_kpr__false_or_exec_failed__fails", "test_cilium_kpr__captured_status__passes"],
    "test_loadbalancer.py::test_ip_from_pool_within_deadline": ["test_lb_pool__vip_outside_pool__fails",
                                                                "test_lb_pool__vip_inside_pool__passes"],
    "test_loadbalancer.py::test_http_from_runner_reaches_a_backend": ["test_lb_http__node_drops_forward__fails",
                                                                      "test_lb_http__healthy__passes"],
    "test_loadbalancer.py::test_neighbour_entry_maps_to_exactly_one_node": ["test_lb_neigh__nobody_answers_arp__fails",
                                                                            "test_lb_neigh__node1_answers__passes"],
    "test_loadbalancer.py::test_requested_ip_is_honoured": ["test_lb_requested__other_ip__fails",
                                                            "test_lb_requested__honoured__passes"],
    "test_loadbalancer.py::test_request_beyond_pool_stays_pending_with_event": [
        "test_lb_beyond__got_an_ip__fails", "test_lb_beyond__pending_with_event__passes"],
    "test_loadbalancer.py::test_external_traffic_policy_local_preserves_source_ip": [
        "test_lb_local__masqueraded__fails", "test_lb_local__dnat_to_local_pod__passes"],
    "test_loadbalancer.py::test_failover_to_another_node": ["test_lb_failover__nobody_takes_over__fails",
                                                            "test_lb_failover__node2_takes_over__passes"],
    "test_mtu.py::test_node_underlay_mtu": ["test_underlay__node2_at_1400__fails", "test_underlay__1500__passes"],
    "test_mtu.py::test_pod_route_mtu": ["test_route_mtu__geneve1460__fails", "test_route_mtu__unset_1500__fails",
                                        "test_route_mtu__cilium_1450__passes"],
    "test_mtu.py::test_path_mtu_between_nodes": ["test_mtu__geneve1460_black_hole__fails",
                                                 "test_mtu__nothing_listens__fails",
                                                 "test_mtu__return_path_drops_large_tcp__fails",
                                                 "test_mtu__one_node_pod_route_1460__fails", "test_mtu__healthy__passes"],
    "test_mtu.py::test_path_mtu_between_host_network_and_pod": ["test_mtu_host__host_route_mtu_unset__fails",
                                                                "test_mtu_host__healthy__passes"],
    "test_conntrack.py::test_connections_held_without_loss[clusterip]": [
        "test_ct_clusterip__server_drops_mid_hold__fails", "test_ct_clusterip__server_accept_queue_overflows__fails",
        "test_ct_clusterip__peak_over_table__fails",
        "test_ct_clusterip__healthy__passes"],
    "test_conntrack.py::test_connections_held_without_loss[loadbalancer]": [
        "test_ct_lb__table_that_does_not_see_the_flows__fails", "test_ct_lb__healthy__passes"],
    "test_default_deny.py::test_step1_no_policy_everything_connects": ["test_deny_step1__datapath_drops__fails",
                                                                       "test_deny_step1__healthy__passes"],
    "test_default_deny.py::test_step2_default_deny_blocks_everything_in_and_out": [
        "test_deny_step2__not_enforced__fails", "test_deny_step2__dead_target_baseline__fails",
        "test_deny_step2__cross_node_leak__fails", "test_deny_step2__enforced__passes",
        "test_deny_step2__world_enforced__passes"],
    "test_default_deny.py::test_step3_only_dns_and_frontend_to_backend_pass": [
        "test_deny_step3__allows_every_port__fails", "test_deny_step3__named_port_not_resolved__fails",
        "test_deny_step3__one_port__passes", "test_deny_step3__named_port_resolved__passes"],
    "test_default_deny.py::test_step4_egress_allow_list_with_except": [
        "test_deny_step4__except_not_honoured__fails", "test_deny_step4__pod_reaches_node_port__fails",
        "test_deny_step4__except_honoured__passes"],
    "test_pod_tuning.py::test_pods_get_the_sysctls_the_lab_claims": ["test_pod_sysctls__global_claim_wrong__fails",
                                                                     "test_pod_sysctls__claims_hold__passes"],
    "test_pod_tuning.py::test_rp_filter_on_pod_devices": ["test_rp_filter__all_strict__fails",
                                                          "test_rp_filter__off__passes"],
    "test_datapath_modes.py::test_cilium_datapath_modes": ["test_datapath__legacy_routing_iptables_masq__fails",
                                                           "test_datapath__captured_bpf_status__passes"],
    "test_datapath_modes.py::test_cilium_health_reaches_every_node": ["test_health__node_down__fails",
                                                                      "test_health__all_reachable__passes"],
    "test_datapath_modes.py::test_hubble_relay_ready": ["test_relay__not_ready_or_absent__fails",
                                                        "test_relay__ready__passes"],
    "test_l2_announce.py::test_l2_one_announcer_matches_servicel2status": [
        "test_l2__two_nodes_answer__fails", "test_l2__nobody_answers__fails", "test_l2__status_names_other_node__fails",
        "test_l2__node1_answers_as_recorded__passes"],
    "test_l2_announce.py::test_l2_local_announced_from_an_endpoint_node": [
        "test_l2_local__announcer_without_endpoint__fails", "test_l2_local__announcer_holds_endpoint__passes"],
    "test_outside_in.py::test_default_deny_denies_the_runner": [
        "test_oi_deny__policy_ignored__fails", "test_oi_deny__widened_to_every_address__fails",
        "test_oi_deny__enforced__passes"],
    "test_outside_in.py::test_ipblock_allows_the_runner_and_keeps_its_address": [
        "test_oi_ipblock__allow_rule_missing__fails", "test_oi_ipblock__local_snated__fails",
        "test_oi_ipblock__runner_network_allowed__passes"],
    "test_outside_in.py::test_cluster_traffic_crosses_nodes_and_is_snated": [
        "test_oi_snat__not_snated__fails", "test_oi_snat__backend_on_the_announcer__fails",
        "test_oi_snat__node1_snats_across_nodes__passes"],
    "test_outside_in.py::test_lb_datapath_under_load_from_outside": [
        "test_oi_load__answered_before_node1__fails", "test_oi_load__open_rate_below_bound__fails",
        "test_oi_load__announcement_moves_mid_hold__fails", "test_oi_load__through_node1__passes"],
}


@pytest.fixture(scope="module")
def cil(root):
    """One healthy Cilium layout for the read-only PASS scenarios (faults build their own)."""
    lab = topo.Lab()
    try:
        c = topo.build_cilium(lab, route_mtu=1450)
        for node in (c.node1, c.node2):  # the nodes' default route: the underlay MTU check reads it
            lab.ip(node, "route", "add", "default", "via", RUNNER, "dev", "lan0")
        lab.serve(c.pod2, tcp="7000", udp="7000", http="8080", hostname="backend-pod2")
        lab.serve(c.pod1, tcp="7000", udp="7000")  # the MTU paths run both ways
        lab.serve(c.node1, tcp="7000", udp="7000", bind=topo.CIL_NODE[1])  # the hostNetwork pod, bound to its node IP
        yield c
    finally:
        lab.close()


def test_probe_runs_as_in_a_pod(cil):
    doc = pod_probe(cil.lab, cil.pod1, "facts")
    assert doc["errors"] == [] and doc["default_route"]["effective_mtu"] == 1450
    res = subprocess.run(["ip", "netns", "exec", cil.pod1, "env", "-i", "PATH=" + str(cil.lab.tmp / "pod-bin"),
                          "python3", "-c", "import os,shutil,sys; print(os.getuid() if False else sys.version_info[:2],"
                          " [t for t in ('ip','iptables','nft','conntrack','sh') if shutil.which(t)])"],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == "%s []" % (tuple(int(x) for x in
                                                  Path(PROBE_PYTHON).name.replace("python", "").split(".")[:2])
                                            if Path(PROBE_PYTHON).name != "python" and "." in Path(PROBE_PYTHON).name
                                            else sys.version_info[:2],)


# ---------------------------------------------------------------------------------------------- tuning

TUNING = {"net.core.somaxconn": "8192", "net.ipv4.tcp_max_syn_backlog": "8192", "net.ipv4.ip_forward": "1"}


def _node_sysctls(lab, apply: dict) -> dict:
    ns = lab.netns("node")
    for name, value in apply.items():
        lab.sysctl(ns, name, value)
    return {"node1": node_probe(lab, ns, "facts")["sysctls"]}


def test_tuning__sysctl_not_applied__fails(lab):
    table = sysctl_table(TUNING, _node_sysctls(lab, {k: v for k, v in TUNING.items() if k != "net.core.somaxconn"}))
    assert table.mismatches == [("node1", "net.core.somaxconn")]
    assert "1 mismatch(es) marked" in table.render() and "*4096*" in table.render()


def test_tuning__applied__passes(lab):
    assert sysctl_table(TUNING, _node_sysctls(lab, TUNING)).mismatches == []


# ---------------------------------------------------------------------------------------------- kube-proxy


def _daemonset(ns, name, labels):
    """The attributes the check reads from the client's DaemonSet objects (metadata.namespace/name/labels)."""
    from types import SimpleNamespace
    return SimpleNamespace(metadata=SimpleNamespace(namespace=ns, name=name, labels=labels))


def test_kp_daemonset__present__fails():
    found = kube_proxy_daemonsets([_daemonset("kube-system", "cilium", {"k8s-app": "cilium"}),
                                   _daemonset("kube-system", "kp", {"k8s-app": "kube-proxy"})])
    assert found == ["kube-system/kp"]


def test_kp_daemonset__absent__passes():
    assert kube_proxy_daemonsets([_daemonset("kube-system", "cilium", {"k8s-app": "cilium"})]) == []


def _rules(lab, ns, env=None):
    res = subprocess.run(["ip", "netns", "exec", ns, "bash", "-c", RULES_SCRIPT], capture_output=True, text=True,
                         timeout=60, env=env)
    return parse_rules_answer("node1", res.returncode, res.stdout, res.stderr)


def test_kp_rules__kube_proxy_nft_table__fails(lab):
    ns = lab.netns("node")
    lab.nft(ns, "table ip kube-proxy {\n chain services { }\n}\n")
    facts = node_probe(lab, ns, "facts")
    findings = kube_proxy_findings({"node1": facts}, {"node1": _rules(lab, ns)})
    assert findings == ["node1: KUBE-SERVICES rules exist (iptables/nft): kube-proxy ran here"]


def test_kp_rules__iptables_save_broken__errors(lab):
    ns = lab.netns("node")
    bad = lab.tmp / "badbin"
    bad.mkdir()
    (bad / "iptables-save").write_text("#!/bin/sh\necho 'iptables-save: cannot open table' >&2\nexit 1\n")
    (bad / "iptables-save").chmod(0o755)
    env = {"PATH": "%s:/usr/sbin:/usr/bin:/sbin:/bin" % bad}
    with pytest.raises(NotMeasured, match="iptables-save failed"):
        _rules(lab, ns, env)


def test_kp_rules__clean_node__passes(lab):
    ns = lab.netns("node")
    assert kube_proxy_findings({"node1": node_probe(lab, ns, "facts")}, {"node1": _rules(lab, ns)}) == []


def test_kernel__uname_2_6__fails(lab):
    ns = lab.netns("node")
    facts = node_probe(lab, ns, "facts", prefix=("setarch", platform.machine(), "--uname-2.6"))
    assert facts["kernel"].startswith("2.6.")
    assert judge_kernels({"node1": facts["kernel"]}).startswith("kernel older than 5.10 on {'node1': '2.6.")


def test_kernel__this_kernel__passes(lab):
    assert judge_kernels({"node1": node_probe(lab, lab.netns("node"), "facts")["kernel"]}) is None


CILIUM_STATUS = REPO / "tests" / "fixtures" / "cilium" / "status_bpf.txt"


def test_cilium_kpr__false_or_exec_failed__fails():
    text = CILIUM_STATUS.read_text()
    disabled = text.replace("KubeProxyReplacement:    True", "KubeProxyReplacement:    False")
    assert judge_kpr("w1", 0, disabled) == "w1: KubeProxyReplacement False (exit 0)"
    assert judge_kpr("w1", 1, "").startswith("w1: KubeProxyReplacement") and "(exit 1)" in judge_kpr("w1", 1, "")


def test_cilium_kpr__captured_status__passes():
    assert judge_kpr("w1", 0, CILIUM_STATUS.read_text()) is None


# ---------------------------------------------------------------------------------------------- LoadBalancer


def test_lb_pool__vip_outside_pool__fails():
    assert not ip_in_pool(VIP, ["10.201.0.210-10.201.0.220"])


def test_lb_pool__vip_inside_pool__passes():
    assert ip_in_pool(VIP, ["10.201.0.200-10.201.0.220"]) and ip_in_pool(VIP, ["10.201.0.192/27"])


def _runner_http(c, ip=VIP, timeout="1"):
    """The runner asks as http_get does: netprobe connect IP:80/http, from the host's side (root, full PATH)."""
    [row] = topo.Lab.probe(c.lab, c.runner, "connect", "--timeout", timeout, "--to", "%s:80/http" % ip)
    return http_answer(row)


def test_lb_http__node_drops_forward__fails(cil):
    cil.lab.nft(cil.node1, "table ip t9mfault {\n chain forward { type filter hook forward priority 0; "
                           "ip daddr %s tcp dport 8080 drop; }\n}\n" % topo.CIL_POD[2])
    try:
        assert judge_backend_answer(_runner_http(cil)) == "no HTTP answer through the LoadBalancer IP"
    finally:
        topo.sh("ip", "netns", "exec", cil.node1, "nft", "delete", "table", "ip", "t9mfault")


def test_lb_http__healthy__passes(cil):
    answer = _runner_http(cil)
    assert judge_backend_answer(answer) is None and answer["host"] == "backend-pod2"


def _node_macs(c) -> dict:
    return {name: parse_link_macs(c.lab.ip(ns, "-o", "link").stdout) for name, ns in (("node1", c.node1),
                                                                                       ("node2", c.node2))}


def test_lb_neigh__nobody_answers_arp__fails(cil):
    ghost = "10.201.0.201"
    assert _runner_http(cil, ghost) is None
    mac = parse_neighbour(cil.lab.ip(cil.runner, "neigh", "show", "to", ghost).stdout, ghost)
    node, problem = judge_announcer(ghost, mac, _node_macs(cil))
    assert node is None and problem.startswith("the runner has no neighbour entry for 10.201.0.201")


def test_lb_neigh__node1_answers__passes(cil):
    assert _runner_http(cil) is not None
    mac = parse_neighbour(cil.lab.ip(cil.runner, "neigh", "show", "to", VIP).stdout, VIP)
    assert judge_announcer(VIP, mac, _node_macs(cil)) == ("node1", None)


def test_lb_requested__other_ip__fails():
    assert judge_requested_ip("10.201.0.220", VIP) == "asked for 10.201.0.220 (metallb.io/loadBalancerIPs), got " + VIP


def test_lb_requested__honoured__passes():
    assert judge_requested_ip(VIP, VIP) is None


def test_lb_beyond__got_an_ip__fails():
    problems = judge_beyond_pool("10.201.0.254", ["10.201.0.200-10.201.0.220"], ["10.201.0.254"], [])
    assert problems == ["10.201.0.254 is outside the pool ['10.201.0.200-10.201.0.220'] but the Service got "
                        "['10.201.0.254']", "no AllocationFailed event (events: none)"]


def test_lb_beyond__pending_with_event__passes():
    assert judge_beyond_pool("10.201.0.254", ["10.201.0.200-10.201.0.220"], None, ["AllocationFailed"]) == []


def test_lb_local__masqueraded__fails(cil):
    problem = judge_source_preserved(_runner_http(cil), RUNNER)
    assert problem.startswith("the backend saw 10.201.254.1:")
    assert ", not the client %s: the source was NATed" % RUNNER in problem


LOCAL_DNAT = """table ip lblocal {
  chain prerouting { type nat hook prerouting priority dstnat; ip daddr %s tcp dport 80 dnat to %s:8080; }
}
""" % (VIP, topo.CIL_POD[1])


def test_lb_local__dnat_to_local_pod__passes(lab):
    c = topo.build_cilium(lab, lb_vip=False)
    topo.announce_vip(lab, c, 1)
    lab.nft(c.node1, LOCAL_DNAT)  # externalTrafficPolicy Local: a local endpoint, no masquerade
    lab.serve(c.pod1, http="8080", hostname="backend-pod1")
    assert judge_source_preserved(_runner_http(c), RUNNER) is None


def _failover(lab, take_over: bool, bound: float):
    c = topo.build_cilium(lab)
    macs = {name: topo.mac_of(lab, ns, "lan0") for name, ns in (("node1", c.node1), ("node2", c.node2))}
    started = time.monotonic()
    lab.ip(c.node1, "addr", "del", VIP + "/32", "dev", "lan0")  # node1's speaker is gone
    if take_over:
        topo.announce_vip(lab, c, 2)
    seconds = None
    for _ in range(int(bound / 0.5) + 1):  # bounded: at most bound/0.5+1 asks of ~0.5 s each
        seen = lab.probe(c.runner, "arp", "--iface", "lan0", "--ip", VIP, "--count", "1", "--window", "0.4")
        if [r["mac"] for r in seen["responders"]] == [macs["node2"]]:
            seconds = time.monotonic() - started
            break
        if time.monotonic() - started > bound:
            break
    return judge_failover(seconds, bound, time.monotonic() - started)


def test_lb_failover__nobody_takes_over__fails(lab):
    record, problem = _failover(lab, take_over=False, bound=2)
    assert problem.startswith("no failover within the bound of 2s (--failover-seconds): waited ")
    assert record["failover_completed"] is False and record["failover_bound_seconds"] == 2


def test_lb_failover__node2_takes_over__passes(lab):
    record, problem = _failover(lab, take_over=True, bound=30)
    assert problem is None and record["failover_completed"] and record["failover_within_bound"]


# ---------------------------------------------------------------------------------------------- MTU


def test_underlay__node2_at_1400__fails(lab):
    n1, n2 = lab.netns("node1"), lab.netns("node2")
    lab.ip(n1, "link", "add", "lan0", "mtu", "1500", "type", "veth", "peer", "name", "lan0", "netns", n2, "mtu", "1400")
    for i, ns in ((1, n1), (2, n2)):
        lab.ip(ns, "addr", "add", "10.201.0.%d/24" % i, "dev", "lan0")
        lab.ip(ns, "link", "set", "lan0", "up")
        lab.ip(ns, "route", "add", "default", "via", "10.201.0.%d" % (3 - i))
    underlay = {name: route_mtu(node_probe(lab, ns, "facts"), name) for name, ns in (("node1", n1), ("node2", n2))}
    assert judge_underlay(underlay, 1500) == ["node underlay MTU differs from the expected 1500: {'node2': 1400}",
                                              "nodes disagree on the underlay MTU: {'node1': 1500, 'node2': 1400}"]


def test_underlay__1500__passes(cil):
    underlay = {name: route_mtu(node_probe(cil.lab, ns, "facts"), name)
                for name, ns in (("node1", cil.node1), ("node2", cil.node2))}
    assert underlay == {"node1": 1500, "node2": 1500} and judge_underlay(underlay, 1500) == []


def test_route_mtu__geneve1460__fails(lab):
    c = topo.build_cilium(lab, route_mtu=1460, lb_vip=False)
    finding, text = judge_route_mtu(route_mtu(pod_probe(lab, c.pod1, "facts")), POD_MTU)
    assert finding is MtuFinding.TOO_LARGE and text.startswith("pod route MTU 1460 is above the expected 1450")


def test_route_mtu__unset_1500__fails(lab):
    c = topo.build_cilium(lab, route_mtu=None, lb_vip=False)
    finding, text = judge_route_mtu(route_mtu(pod_probe(lab, c.pod1, "facts")), POD_MTU)
    assert finding is MtuFinding.TOO_LARGE and text.startswith("pod route MTU 1500 is above the expected 1450")


def test_route_mtu__cilium_1450__passes(cil):
    assert judge_route_mtu(route_mtu(pod_probe(cil.lab, cil.pod1, "facts")), POD_MTU)[0] is MtuFinding.OK


def _node_facts(c) -> dict:
    return {n: node_probe(c.lab, ns, "facts") for n, ns in (("node1", c.node1), ("node2", c.node2))}


def _mtu_probe(c, ns, to, as_node=False):
    """`netprobe mtu` as the check runs it, from a pod (uid 65534) or the hostNetwork pod (as_node: uid 0)."""
    return functools.partial(node_probe if as_node else pod_probe, c.lab, ns, "mtu", "--to", to, "--bulk-mib", "2",
                             "--bulk-timeout", "3")


def _judge(c, probes: dict) -> tuple[PathRun, dict]:
    """The checks' own measurement loop (fragment counters around each path) and judgement, on these probes."""
    run = measure_paths(probes, lambda: _node_facts(c))
    return run, judge_paths(run, {pid: POD_MTU for pid in probes})


def _pairs(c, port="7000") -> tuple[PathRun, dict]:
    """test_path_mtu_between_nodes: every ordered pair of nodes, pod -> pod."""
    pods = {"node1": (c.pod1, topo.CIL_POD[1]), "node2": (c.pod2, topo.CIL_POD[2])}
    return _judge(c, {path_id(a, b): _mtu_probe(c, pods[a][0], "%s:%s" % (pods[b][1], port))
                      for a, b in ordered_pairs(pods)})


def _host_and_pod(c) -> tuple[PathRun, dict]:
    """test_path_mtu_between_host_network_and_pod: node1's host (serving bound to its node IP, as the hostNetwork
    pod does) -> pod2 on node2, and back."""
    return _judge(c, {"host@node1->pod@node2": _mtu_probe(c, c.node1, topo.CIL_POD[2] + ":7000", as_node=True),
                      "pod@node2->host@node1": _mtu_probe(c, c.pod2, topo.CIL_NODE[1] + ":7000")})


def _serve_mtu(c):
    for pod in (c.pod1, c.pod2):
        c.lab.serve(pod, tcp="7000", udp="7000")


def test_mtu__geneve1460_black_hole__fails(lab):
    c = topo.build_cilium(lab, route_mtu=1460, lb_vip=False)
    for node in (c.node1, c.node2):
        lab.nft(node, topo.DROP_FRAG_NEEDED)
    _serve_mtu(c)
    run, failing = _pairs(c)
    assert list(failing) == ["node1->node2", "node2->node1"]
    for pid, sender in (("node1->node2", "node1"), ("node2->node1", "node2")):
        assert failing[pid][0].startswith("netprobe mtu verdict 'black_hole' (a PMTUD black hole")
        assert any(p.startswith("TCP bulk transfer failed") for p in failing[pid])
        # the sender's node dropped the oversized DF packets, and the rise is named with this direction
        assert set(run.fragments[pid]) == {sender} and run.fragments[pid][sender]["FragFails"] > 0


def test_mtu__nothing_listens__fails(cil):
    _, failing = _pairs(cil, port="7001")
    assert list(failing) == ["node1->node2", "node2->node1"]
    for problems in failing.values():
        assert problems[0].startswith("netprobe mtu verdict 'unreachable' (no UDP echo came back at any size")
        assert "black hole" not in " ".join(problems)


def test_mtu__return_path_drops_large_tcp__fails(lab):
    """A black hole on the return path only: node2 drops large TCP segments from pod2 towards pod1 (a filter or a
    broken offload on one node). node1->node2, the one direction the check used to probe, is clean."""
    c = topo.build_cilium(lab, route_mtu=1450, lb_vip=False)
    lab.nft(c.node2, "table ip oneway {\n chain forward { type filter hook forward priority 0; ip saddr %s "
                     "ip daddr %s meta l4proto tcp ip length > 1400 drop; }\n}\n" % (topo.CIL_POD[2], topo.CIL_POD[1]))
    _serve_mtu(c)
    run, failing = _pairs(c)
    assert run.results["node1->node2"]["verdict"] == "ok" and "node1->node2" not in failing
    assert list(failing) == ["node2->node1"]
    assert failing["node2->node1"][0].startswith("netprobe mtu verdict 'black_hole'")
    assert render_path_failures(failing, 2).splitlines()[0] == "1 of 2 path(s) fail: node2->node1"


def test_mtu__one_node_pod_route_1460__fails(lab):
    """One node's pods get route MTU 1460 (frag-needed dropped): TCP still negotiates pod1's smaller MSS, so only
    node2's FragFails rising while node2->node1 is measured shows it, named with that direction."""
    c = topo.build_cilium(lab, route_mtu=1450, lb_vip=False)
    lab.ip(c.pod2, "route", "replace", "default", "via", topo.CIL_ROUTER[2], "dev", "eth0", "mtu", "1460")
    for node in (c.node1, c.node2):
        lab.nft(node, topo.DROP_FRAG_NEEDED)
    _serve_mtu(c)
    run, failing = _pairs(c)
    assert run.fragments["node1->node2"] == {} and "node1->node2" not in failing
    assert list(failing) == ["node2->node1"]
    assert failing["node2->node1"][-1].startswith("fragmentation counters rose while this path was measured")
    assert run.fragments["node2->node1"]["node2"]["FragFails"] > 0


def test_mtu__healthy__passes(cil):
    run, failing = _pairs(cil)
    assert failing == {} and list(run.results) == ["node1->node2", "node2->node1"]
    assert all(r["fragments"] == {} and r["path_mtu"] == POD_MTU for r in run.record().values())


def test_mtu_host__host_route_mtu_unset__fails(lab):
    """node1's route to the remote pods lacks the overlay MTU (Cilium sets it on the host's routes): the host's
    large packets are too big for the tunnel. The kernel's VXLAN drops the first (FragFails) and learns 1450 where
    Cilium's eBPF encapsulation would black-hole them; either way host->pod fails and pod->host does not."""
    c = topo.build_cilium(lab, route_mtu=1450, lb_vip=False)
    lab.ip(c.node1, "route", "replace", "10.201.2.0/24", "via", "10.201.254.2", "dev", "ov0", "mtu", "1500")
    for node in (c.node1, c.node2):
        lab.nft(node, topo.DROP_FRAG_NEEDED)
    c.lab.serve(c.pod2, tcp="7000", udp="7000")
    c.lab.serve(c.node1, tcp="7000", udp="7000", bind=topo.CIL_NODE[1])
    run, failing = _host_and_pod(c)
    assert list(failing) == ["host@node1->pod@node2"]
    assert failing["host@node1->pod@node2"][-1].startswith("fragmentation counters rose while this path")
    assert run.fragments["host@node1->pod@node2"]["node1"]["FragFails"] > 0


def test_mtu_host__healthy__passes(cil):
    run, failing = _host_and_pod(cil)
    assert failing == {} and [r["path_mtu"] for r in run.record().values()] == [POD_MTU, POD_MTU]


# ---------------------------------------------------------------------------------------------- conntrack

N = 300


def _ct_pod_facts(lab, client, server):
    """The load pods' facts, as the check reads them: netprobe in each pod (the pod's image, PATH and user)."""
    return {"client": pod_probe(lab, client, "facts"), "server": pod_probe(lab, server, "facts")}


def _ct_run(lab, client, to, tracker, server, drop_mid_hold=False, peak=1000, hold="3"):
    facts_before = {"node1": node_probe(lab, tracker, "facts")}
    pods_before = _ct_pod_facts(lab, client, server)
    reading_before = {"node1": nf_conntrack_reading("node1", facts_before["node1"])}
    proc = pod_spawn(lab, client, "load", "--to", to, "--connections", N, "--hold", hold, "--timeout", "2",
                     "--verify-timeout", "2")
    during = facts_before["node1"]
    for _ in range(50):  # bounded: until the table shows the flows, or 50 reads
        during = node_probe(lab, tracker, "facts")
        if during["conntrack"]["count"] >= reading_before["node1"].entries + N:
            break
        time.sleep(0.1)
    if drop_mid_hold:
        lab.nft(server, "table inet blackhole {\n chain input { type filter hook input priority 0; "
                        "tcp dport 8080 drop; }\n}\n")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    facts_after = {"node1": node_probe(lab, tracker, "facts")}
    pods_after = _ct_pod_facts(lab, client, server)
    total, problems = judge_load([json.loads(out)])
    drops = conntrack_deltas(facts_before, facts_after)
    if drops:
        problems.append("nf_conntrack counters rose: %s" % drops)
    stack = judge_stack_drops(tcp_drop_deltas(pods_before, pods_after))
    if stack:
        problems.append(stack)
        topo.capture("facts_pod_accept_queue_overflow_before", pods_before["server"])
        topo.capture("facts_pod_accept_queue_overflow_after", pods_after["server"])
    rise = judge_ct_rise(reading_before, {"node1": nf_conntrack_reading("node1", during)}, N)
    if rise:
        problems.append(rise)
    _, capacity = judge_ct_capacity(reading_before, peak)
    return total, problems + capacity


@pytest.fixture
def svc(lab):
    t = topo.build(lab, topo.Overlay(kind="vxlan", service=True))  # ClusterIP: DNAT on node1
    lab.serve(t.pod2, tcp="8080")
    return t


def test_ct_clusterip__server_drops_mid_hold__fails(lab, svc):
    total, problems = _ct_run(lab, svc.pod1, topo.VIP + ":80", svc.node1, svc.pod2, drop_mid_hold=True)
    assert total["held"] == N and total["verified"] == 0
    assert problems == ["only 0 of %d held connections carried a byte end to end at the end of the hold (the "
                        "datapath forgot or broke the rest): %d unanswered within the verify timeout, 0 closed by "
                        "the peer" % (N, N)]


#: A server that listens with an accept queue of one and never accepts: an overloaded or wedged server.
WEDGED_SERVER = ("import socket, time\n"
                 "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                 "s.bind(('0.0.0.0', 8080)); s.listen(1); print('listening', flush=True); time.sleep(60)\n")


def test_ct_clusterip__server_accept_queue_overflows__fails(lab):
    """Connections lost in the server's own stack, with no conntrack table showing anything: the server pod's
    TcpExt counters name it."""
    t = topo.build(lab, topo.Overlay(kind="vxlan", service=True))
    server = lab.spawn(t.pod2, [PROBE_PYTHON, "-c", WEDGED_SERVER])
    assert server.stdout.readline().strip() == "listening"
    total, problems = _ct_run(lab, t.pod1, topo.VIP + ":80", t.node1, t.pod2)
    assert total["established"] < N
    stack = [p for p in problems if p.startswith("the load pods' own TCP stacks dropped")]
    assert len(stack) == 1 and "'server': {" in stack[0] and "'ListenOverflows': " in stack[0], problems
    assert "'client'" not in stack[0]


def test_ct_clusterip__peak_over_table__fails(lab, svc):
    ct_max = node_probe(lab, svc.node1, "facts")["conntrack"]["max"]
    total, problems = _ct_run(lab, svc.pod1, topo.VIP + ":80", svc.node1, svc.pod2, peak=ct_max)
    assert total["verified"] == N and len(problems) == 1
    assert problems[0].startswith("node1: nf_conntrack holds %d entries" % ct_max) and "(< 20%)" in problems[0]


def test_ct_clusterip__healthy__passes(lab, svc):
    total, problems = _ct_run(lab, svc.pod1, topo.VIP + ":80", svc.node1, svc.pod2)
    assert problems == [] and total["verified"] == total["held"] == N


@pytest.fixture
def lbct(lab):
    c = topo.build_cilium(lab)  # pod1 -> LB VIP: node1 DNATs and masquerades to pod2
    lab.serve(c.pod2, tcp="8080")
    return c


def test_ct_lb__table_that_does_not_see_the_flows__fails(lab, lbct):
    total, problems = _ct_run(lab, lbct.pod1, VIP + ":80", lbct.node2,
                              lbct.pod2)  # node2 tracks nothing of these flows
    assert total["verified"] == N
    assert len(problems) == 1 and problems[0].startswith("the conntrack table (nf_conntrack) grew by ")
    assert "while %d connections were held: the measurement does not see these flows" % N in problems[0]


def test_ct_lb__healthy__passes(lab, lbct):
    total, problems = _ct_run(lab, lbct.pod1, VIP + ":80", lbct.node1, lbct.pod2)
    assert problems == [] and total["verified"] == N


# ---------------------------------------------------------------------------------------------- default deny

SRC = "a/frontend"
TARGETS = [Target("b/backend", port, proto) for port in (8080, 9090) for proto in ("TCP", "UDP")]
ADDRESS = {t: "%s:%d" % (topo.CIL_POD[2], t.port) for t in TARGETS}


def _table(allowed) -> TruthTable:
    table = TruthTable([SRC], TARGETS)
    for t in TARGETS:
        table.set(SRC, t, Expect.CONNECTED if allowed(t) else Expect.BLOCKED)
    return table


def _nft_policy(lab, node, allow):
    """Enforcement standing in for the CNI: node2's forward hook drops new flows into pod2 except ``allow``
    (None: no rule at all)."""
    topo.sh("ip", "netns", "exec", node, "nft", "delete", "table", "inet", "netpol", check=False)
    if allow is None:
        return
    accepts = "".join("ip daddr %s %s dport %d accept; " % (topo.CIL_POD[2], t.proto.lower(), t.port) for t in allow)
    lab.nft(node, "table inet netpol {\n chain forward { type filter hook forward priority 0; %sip daddr %s drop; }\n}\n"
            % (accepts, topo.CIL_POD[2]))


def _policy_world(lab, serve=True):
    c = topo.build_cilium(lab, lb_vip=False)
    if serve:
        lab.serve(c.pod2, tcp="8080,9090", udp="8080,9090")
    return c


IGNORED = object()  # the CNI ignores the policies: nothing is enforced


def _run(c, name, expected, policies: bool, enforce, datapath_drops=False):
    """conformance.check.run_policy_check, the check's own runner: baseline without policy, apply, K matches."""
    def apply(manifests):
        _nft_policy(c.lab, c.node2, [] if datapath_drops else (enforce if manifests and enforce is not IGNORED
                                                                 else None))
        return len(manifests)

    def observe():
        rows = pod_probe(c.lab, c.pod1, "connect", "--timeout", "1", "--udp-tries", "2",
                         *sum((["--to", "%s/%s" % (ADDRESS[t], t.proto.lower())] for t in TARGETS), []))
        return observed_table([SRC], TARGETS, {SRC: rows}, ADDRESS)

    check = PolicyCheck(name, [SRC], TARGETS, [{"kind": "NetworkPolicy"}] if policies else [], expected,
                        _table(lambda t: True))
    return run_policy_check(check, apply, observe, NoBarrier("no Cilium in a netns"), None, seconds=5,
                            consecutive=2, interval=0.2, transport_errors=(AssertionError,))


ALL = _table(lambda t: True)
NONE = _table(lambda t: False)
ONE = _table(lambda t: (t.port, t.proto) == (8080, "TCP"))


def test_deny_step1__datapath_drops__fails(lab):
    result = _run(_policy_world(lab), "no policy", ALL, False, None, datapath_drops=True)
    assert not result.passed and result.text.startswith("no policy: tables did not match 2 times in a row")


def test_deny_step1__healthy__passes(lab):
    result = _run(_policy_world(lab), "no policy", ALL, False, None)
    assert result.passed, result.text


def test_deny_step2__not_enforced__fails(lab):
    result = _run(_policy_world(lab), "default deny", NONE, True, IGNORED)
    assert not result.passed and result.text.startswith("default deny: tables did not match 2 times in a row")
    assert sorted(result.enforced.leaks) == sorted("a/frontend->b/backend:%d/%s" % (t.port, t.proto) for t in TARGETS)


def test_deny_step2__dead_target_baseline__fails(lab):
    result = _run(_policy_world(lab, serve=False), "default deny", NONE, True, [])
    assert not result.passed and result.enforced is None
    assert result.text.startswith("default deny: baseline failed, so no denial can be judged: 4 cell(s)")


def test_deny_step2__enforced__passes(lab):
    result = _run(_policy_world(lab), "default deny", NONE, True, [])
    assert result.passed, result.text
    assert all(v.startswith("drop reason unavailable") for v in result.drop_reasons.values())


def test_deny_step3__allows_every_port__fails(lab):
    result = _run(_policy_world(lab), "allow frontend->backend", ONE, True, TARGETS)
    assert not result.passed and "tables did not match" in result.text
    assert set(result.enforced.leaks) == {"a/frontend->b/backend:9090/TCP", "a/frontend->b/backend:8080/UDP",
                                          "a/frontend->b/backend:9090/UDP"}


def test_deny_step3__one_port__passes(lab):
    result = _run(_policy_world(lab), "allow frontend->backend", ONE, True, [Target("b/backend", 8080, "TCP")])
    assert result.passed, result.text


# ------------------------------------------------------------------------- default deny on the world of issue 13
# conformance/world.py's world in netns (tests/netns/policy_standin.py): 2 pods per namespace on two nodes, nodes as
# targets and sources, ext/web and ext/c2 at distinct addresses; nftables compiled from a PolicyModel stands in for
# Cilium, and a fault is a stand-in CNI that gets one thing wrong. The check's World, oracle and runner judge it.


@pytest.fixture(scope="module")
def world(root):
    lab = topo.Lab()
    try:
        yield policy_standin.build(lab)
    finally:
        lab.close()


def _labels(sw, manifests) -> dict[str, str]:
    return {cell_id(s, t): label for (s, t), label in sw.world.expected(manifests).labels.items()}


def test_deny_step2__cross_node_leak__fails(world):
    """Enforced on each node for its own pods' flows, not for flows that came over the overlay: the one-pod world
    with both pods on one node passed this; here every leak is a cross-node cell and every same-node cell holds."""
    manifests = step2_policies(world.world)
    result = policy_standin.run_step(world, "default deny", manifests, fault="cross-node")
    assert not result.passed and result.text.startswith("default deny: tables did not match 2 times in a row")
    labels = _labels(world, manifests)
    assert result.enforced.leaks and {labels[c] for c in result.enforced.leaks} == {CROSS_NODE}
    assert "c/client-0->b/backend-1:8080/TCP" in result.enforced.leaks  # into a protected pod on the other node
    assert "node/node1->a/frontend-1:9090/UDP" in result.enforced.leaks  # a remote node into a protected pod
    assert "  c/client-0->b/backend-1:8080/TCP [cross-node]: expected blocked, observed connected" in result.text
    assert "[same-node]: expected blocked" not in result.text


def test_deny_step2__world_enforced__passes(world):
    result = policy_standin.run_step(world, "default deny", step2_policies(world.world))
    assert result.passed, result.text
    assert set(_labels(world, step2_policies(world.world)).values()) == {SAME_NODE, CROSS_NODE, OUTSIDE}


def test_deny_step3__named_port_not_resolved__fails(world):
    """`port: http` on the backend's ingress resolved to nothing: frontend -> backend 8080/TCP is dropped."""
    manifests = step3_policies(world.world)
    result = policy_standin.run_step(world, "allow frontend->backend", manifests, fault="unnamed-ports")
    assert not result.passed and "tables did not match" in result.text
    bad = {cell_id(s, t) for s, t in mismatches(world.world.expected(manifests), result.enforced.last)}
    assert bad == {"a/frontend-%d->b/backend-%d:8080/TCP" % (i, j) for i in (0, 1) for j in (0, 1)}
    assert "expected connected, observed timeout (allowed flow dropped" in result.text


def test_deny_step3__named_port_resolved__passes(world):
    result = policy_standin.run_step(world, "allow frontend->backend", step3_policies(world.world))
    assert result.passed, result.text


def test_deny_step4__except_not_honoured__fails(world):
    """ipBlock 0.0.0.0/0 except ext/c2 with the except ignored: the frontend pods reach the C2 server."""
    result = policy_standin.run_step(world, "allow-list", step4_policies(world.world), fault="no-except")
    assert not result.passed and "tables did not match" in result.text
    assert set(result.enforced.leaks) == {"a/frontend-%d->ext/c2:18081/%s" % (i, p) for i in (0, 1)
                                          for p in ("TCP", "UDP")}
    assert "a/frontend-0->ext/c2:18081/TCP [%s]: expected blocked, observed connected" % OUTSIDE in result.text


def test_deny_step4__pod_reaches_node_port__fails(world):
    """A CNI whose ipBlock selects node addresses (policy-cidr-match-mode: nodes) against the model's Cilium
    default: the allow-list opens SSH, kubelet, API server and etcd to the frontend pods."""
    result = policy_standin.run_step(world, "allow-list", step4_policies(world.world), fault="ipblock-nodes")
    assert not result.passed
    node_ports = ["node1:22", "node1:2379", "node1:6443", "node1:10250", "node2:22", "node2:10250"]
    assert set(result.enforced.leaks) == {"a/frontend-%d->node/%s/TCP" % (i, t) for i in (0, 1) for t in node_ports}
    assert "a/frontend-0->node/node2:10250/TCP [cross-node]: expected blocked" in result.text


def test_deny_step4__except_honoured__passes(world):
    result = policy_standin.run_step(world, "allow-list", step4_policies(world.world))
    assert result.passed, result.text


# ---------------------------------------------------------------------------------------------- pod tuning


def _pod_sysctls(lab, ns, names):
    res = pod_shell(lab, ns, read_command(names))  # the check's own reader, as the pod's user
    assert res.returncode == 0, res.stderr
    return parse_values(res.stdout, names)


POD_NAMES = ["net.netfilter.nf_conntrack_max", "net.core.somaxconn"]


def test_pod_sysctls__global_claim_wrong__fails(lab):
    pod = lab.netns("pod")
    seen = _pod_sysctls(lab, pod, POD_NAMES)
    claim = {"net.netfilter.nf_conntrack_max": str(int(seen["net.netfilter.nf_conntrack_max"]) + 1),
             "net.core.somaxconn": "8192"}
    report = judge_pod_sysctls(claim, {"node1/pod": seen})
    assert report.failures == ["net.netfilter.nf_conntrack_max is global, so pods must see the node's %s, but "
                               "node1/pod sees %s" % (claim["net.netfilter.nf_conntrack_max"],
                                                      seen["net.netfilter.nf_conntrack_max"])]


def test_pod_sysctls__claims_hold__passes(lab):
    pod = lab.netns("pod")
    seen = _pod_sysctls(lab, pod, POD_NAMES)
    report = judge_pod_sysctls({"net.netfilter.nf_conntrack_max": seen["net.netfilter.nf_conntrack_max"],
                                "net.core.somaxconn": "8192"}, {"node1/pod": seen})
    assert report.failures == [] and len(report.notes) == 1  # somaxconn per netns: a note, not a failure


def _node_rp(lab, all_value):
    node = lab.netns("node")
    lab.ip(node, "link", "add", "lxc0", "type", "veth", "peer", "name", "eth9")
    lab.sysctl(node, "net.ipv4.conf.all.rp_filter", all_value)
    lab.sysctl(node, "net.ipv4.conf.lxc0.rp_filter", 0)
    res = topo.sh("ip", "netns", "exec", node, "sh", "-c", NODE_RP_FILTER_SCRIPT)
    return judge_node_rp_filter("node1", parse_rp_filter_lines(res.stdout))


def test_rp_filter__all_strict__fails(lab):
    problems = _node_rp(lab, 1)
    assert problems and all(p.startswith("node1: ") for p in problems) and any("lxc0" in p for p in problems)


def test_rp_filter__off__passes(lab):
    assert _node_rp(lab, 0) == []


# ---------------------------------------------------------------------------------------------- datapath modes
# Captured-shape agent output (tests/fixtures/cilium, Cilium 1.20.2's JSON models) through the SAME judges the check
# calls; a live agent is needed to prove the modes themselves (README table, last column).

CILIUM_FIX = REPO / "tests" / "fixtures" / "cilium"
CIL_NODES = ["cp1", "w1", "w2"]


def test_datapath__legacy_routing_iptables_masq__fails():
    problems = judge_datapath(datapath_modes((CILIUM_FIX / "status_legacy.json").read_text()), ExpectedDatapath(),
                              node="w1")
    assert [p.split(" (expected")[0] for p in problems] == ["w1: Masquerading: iptables", "w1: Host Routing: Legacy"]


def test_datapath__captured_bpf_status__passes():
    assert judge_datapath(datapath_modes((CILIUM_FIX / "status_bpf.json").read_text()), ExpectedDatapath()) == []


def test_health__node_down__fails():
    problems = judge_health((CILIUM_FIX / "health_one_down.json").read_text(), CIL_NODES)
    assert "default/w2 node 192.168.100.12 ICMP: Connection timed out" in problems


def test_health__all_reachable__passes():
    assert judge_health((CILIUM_FIX / "health_ok.json").read_text(), CIL_NODES) == []


def _deployment(name, replicas, ready):
    from types import SimpleNamespace
    return SimpleNamespace(metadata=SimpleNamespace(namespace="kube-system", name=name, labels={"k8s-app": name}),
                           spec=SimpleNamespace(replicas=replicas), status=SimpleNamespace(ready_replicas=ready))


def test_relay__not_ready_or_absent__fails():
    assert judge_relay([_deployment("hubble-relay", 1, None)]) == \
        "Hubble Relay not ready: kube-system/hubble-relay: 0/1 replicas ready"
    assert judge_relay([_deployment("cilium-operator", 1, 1)]).startswith("no hubble-relay Deployment in kube-system")


def test_relay__ready__passes():
    assert judge_relay([_deployment("hubble-relay", 1, 1)]) is None


# ---------------------------------------------------------------------------------------------- MetalLB L2 observed
# Real `netprobe arp` from the runner (root, the check's own arguments) on the Cilium layout's L2; node MACs from
# `netprobe facts` on each node (the link holding the node's address); ServiceL2Status shaped per MetalLB's CRD
# (../shared/schemas/metallb/metallb.io_servicel2statuses.yaml: v1beta1, status.node/serviceName/serviceNamespace/
# interfaces[].name); all fed to conformance.l2.judge_announcement, as the check does.

L2_SVC = "cf-l2-t13/l2-cluster"
L2_LABELS = {"node1": {}, "node2": {}}


def _l2status(node, service=L2_SVC):
    ns, _, name = service.partition("/")
    return {"apiVersion": "metallb.io/v1beta1", "kind": "ServiceL2Status",
            "metadata": {"name": "l2-%s" % node, "namespace": "metallb-system"},
            "spec": {}, "status": {"node": node, "serviceName": name, "serviceNamespace": ns,
                                   "interfaces": [{"name": "lan0"}]}}


def _l2_observe(c, vip=VIP):
    arp = c.lab.probe(c.runner, "arp", "--iface", "lan0", "--ip", vip, *L2_ARP_ARGS)
    facts = {name: node_probe(c.lab, ns, "facts") for name, ns in (("node1", c.node1), ("node2", c.node2))}
    macs, problems = lab_link_macs(facts, {"node1": topo.CIL_NODE[1], "node2": topo.CIL_NODE[2]})
    assert problems == [] and macs["node1"] == [topo.mac_of(c.lab, c.node1, "lan0")]
    return arp, macs


def _findings(j):
    return [f for f, _ in j.problems]


def test_l2__two_nodes_answer__fails(lab):
    c = topo.build_cilium(lab)
    topo.announce_vip(lab, c, 2)  # split brain: node2 answers too
    arp, macs = _l2_observe(c)
    j = judge_announcement(arp, [_l2status("node1")], macs, L2_LABELS, L2_SVC)
    assert _findings(j) == [L2Finding.SEVERAL_ANNOUNCERS] and "(node1)" in j.messages()[0] and "(node2)" in j.messages()[0]


def test_l2__nobody_answers__fails(lab):
    c = topo.build_cilium(lab, lb_vip=False)
    arp, macs = _l2_observe(c)
    j = judge_announcement(arp, [], macs, L2_LABELS, L2_SVC)
    assert _findings(j) == [L2Finding.NO_ANNOUNCER, L2Finding.NO_STATUS]


def test_l2__status_names_other_node__fails(cil):
    arp, macs = _l2_observe(cil)
    j = judge_announcement(arp, [_l2status("node2")], macs, L2_LABELS, L2_SVC)
    assert _findings(j) == [L2Finding.STATUS_MISMATCH]
    assert j.messages() == ["%s %s: ARP is answered by node1 but ServiceL2Status names node2" % (L2_SVC, VIP)]


def test_l2__node1_answers_as_recorded__passes(cil):
    arp, macs = _l2_observe(cil)
    j = judge_announcement(arp, [_l2status("node1"), _l2status("node2", "other/svc")], macs, L2_LABELS, L2_SVC)
    assert j.ok and j.announcer == "node1", j.messages()


def test_l2_local__announcer_without_endpoint__fails(cil):
    arp, macs = _l2_observe(cil)  # the backend is pod2 on node2; node1 answers
    j = judge_announcement(arp, [_l2status("node1")], macs, L2_LABELS, L2_SVC, traffic_policy="Local",
                           endpoint_nodes=["node2"])
    assert _findings(j) == [L2Finding.NO_LOCAL_ENDPOINT]


def test_l2_local__announcer_holds_endpoint__passes(lab):
    c = topo.build_cilium(lab, lb_vip=False)
    topo.announce_vip(lab, c, 2)  # MetalLB announces Local only from node2, which holds the endpoint
    arp, macs = _l2_observe(c)
    j = judge_announcement(arp, [_l2status("node2")], macs, L2_LABELS, L2_SVC, traffic_policy="Local",
                           endpoint_nodes=["node2"])
    assert j.ok and j.announcer == "node2", j.messages()


# ---------------------------------------------------------------------------------------------- outside in
# conformance/test_outside_in.py's own observation, policy step, findings and load judgement on the Cilium layout:
# the runner on the LAN; node1 answers ARP for both VIPs (the announcer); nftables DNAT stands in for kube-proxy
# replacement: the Cluster VIP 10.201.0.200 (80 -> 8080, 81 -> 9090) to pod2 on node2, masqueraded to node1's
# overlay address (ETP Cluster, SNAT), the Local VIP 10.201.0.201 to pod1 on node1, not masqueraded (ETP Local).
# NetworkPolicy stands in as nftables on each backend's own node (Cilium enforces at the endpoint), generated from
# the check's own manifests: default deny drops everything into the pod, each ipBlock accepts its CIDR on 8080.

OI_LOCAL_VIP = "10.201.0.201"
OI_HOSTS = {1: "backend-pod1", 2: "backend-pod2"}  # serve's host: what the answers name, as a pod's hostname does
OI_N = 300


def _oi_build(lab, cluster_backend=2, cluster_snat=True, local_snat=False):
    c = topo.build_cilium(lab, lb_vip=False)
    for vip in (VIP, OI_LOCAL_VIP):
        topo.announce_vip(lab, c, 1, vip)
    pod = topo.CIL_POD[cluster_backend]
    post = "".join("ct status dnat ct original ip daddr %s masquerade; " % vip
                   for vip, on in ((VIP, cluster_snat), (OI_LOCAL_VIP, local_snat)) if on)
    lab.nft(c.node1, "table ip oi {\n chain prerouting { type nat hook prerouting priority dstnat; "
                     "ip daddr %s tcp dport 80 dnat to %s:8080; ip daddr %s tcp dport 81 dnat to %s:9090; "
                     "ip daddr %s tcp dport 80 dnat to %s:8080; }\n"
                     " chain postrouting { type nat hook postrouting priority srcnat; %s}\n}\n"
            % (VIP, pod, VIP, pod, OI_LOCAL_VIP, topo.CIL_POD[1], post))
    if not cluster_snat and cluster_backend == 2:  # without SNAT, replies to the runner must still pass node1
        lab.ip(c.node2, "route", "add", RUNNER + "/32", "via", "10.201.254.1", "dev", "ov0")
    for n in (1, 2):
        lab.serve((c.pod1, c.pod2)[n - 1], http="8080", tcp="9090", hostname=OI_HOSTS[n])
    return c


def _oi_probe(c, keep=None):
    """netprobe on the runner (root, as the check runs it on this host); ``keep`` collects every output."""
    def probe(args, timeout):
        out = topo.Lab.probe(c.lab, c.runner, *args, timeout=timeout)
        if keep is not None:
            keep.append(out)
        return out
    return probe


def _oi_world(c, cluster_backend=2) -> OutsideWorld:
    """What the check's fixture finds: the VIPs, the backends' nodes, the announcer (the runner's neighbour entry
    against the nodes' MACs, judged as announcing_node does) and every node address (netprobe facts)."""
    observe_from_runner({Target("oi/x", 80): "%s:80/http" % VIP}, _oi_probe(c))  # resolves the neighbour entry
    mac = parse_neighbour(c.lab.ip(c.runner, "neigh", "show", "to", VIP).stdout, VIP)
    announcer, problem = judge_announcer(VIP, mac, _node_macs(c))
    assert problem is None, problem
    facts = {"node1": node_probe(c.lab, c.node1, "facts"), "node2": node_probe(c.lab, c.node2, "facts")}
    topo.capture("facts_oi_node1", facts["node1"])
    return OutsideWorld("oi", RUNNER, topo.CIL_LAN, {"local": OI_LOCAL_VIP, "cluster": VIP},
                        {"local": OI_HOSTS[1], "cluster": OI_HOSTS[cluster_backend]},
                        {OI_HOSTS[1]: "node1", OI_HOSTS[2]: "node2"},
                        {"local": topo.CIL_POD[1], "cluster": topo.CIL_POD[cluster_backend]}, announcer,
                        node_ips_from_facts(facts))


def _oi_enforce(c, manifests, cni):
    """The CNI standing in: ``honours`` the manifests, ``ignores`` them, ``drops-allows`` (default deny only) or
    ``widens`` (an allow for every address slipped in)."""
    for node in (c.node1, c.node2):
        topo.sh("ip", "netns", "exec", node, "nft", "delete", "table", "inet", "oipol", check=False)
    if not manifests or cni == "ignores":
        return
    cidrs = [peer["ipBlock"]["cidr"] for m in manifests for rule in m["spec"].get("ingress", [])
             for peer in rule.get("from", []) if "ipBlock" in peer]
    cidrs = [] if cni == "drops-allows" else cidrs + (["0.0.0.0/0"] if cni == "widens" else [])
    for n, node in ((1, c.node1), (2, c.node2)):
        pod = topo.CIL_POD[n]
        accepts = "".join("ip daddr %s tcp dport 8080 ip saddr %s accept; " % (pod, cidr) for cidr in cidrs)
        c.lab.nft(node, "table inet oipol {\n chain forward { type filter hook forward priority 0; %s"
                        "ip daddr %s drop; }\n}\n" % (accepts, pod))


def _oi_step(c, world, name, manifests, expect, cni="honours", keep=None):
    """The check's policy step: outside_check + run_policy_check with the runner's observation."""
    check = outside_check(name, world.targets, expect, manifests, world.flow_keys())
    seen = RunnerObservation(world.address_of(), _oi_probe(c, keep))

    def apply(m):
        _oi_enforce(c, m, cni)
        return len(m)
    result = run_policy_check(check, apply, seen, NoBarrier("no Cilium in a netns"), None, seconds=5, consecutive=2,
                              interval=0.2, transport_errors=(AssertionError,))
    return result, seen


OI_CELLS = ["outside/runner->oi/oi-local:80/TCP", "outside/runner->oi/oi-cluster:80/TCP"]


def _oi_deny(lab, cni, keep=None):
    c = _oi_build(lab)
    return _oi_step(c, _oi_world(c), "outside-in default deny", deny_policies("oi"), DENIED, cni, keep)[0]


def test_oi_deny__policy_ignored__fails(lab):
    result = _oi_deny(lab, "ignores")
    assert not result.passed and result.text.startswith("outside-in default deny: tables did not match 2 times")
    assert sorted(result.enforced.leaks) == sorted(OI_CELLS)


def test_oi_deny__widened_to_every_address__fails(lab):
    result = _oi_deny(lab, "widens")
    assert not result.passed and sorted(result.enforced.leaks) == sorted(OI_CELLS)


def test_oi_deny__enforced__passes(lab):
    keep = []
    result = _oi_deny(lab, "honours", keep)
    topo.capture("connect_oi_runner_two_vips_denied", keep[-1])
    assert result.passed, result.text
    assert result.baseline.matched and result.enforced.last.by_id() == dict.fromkeys(OI_CELLS, Verdict.TIMEOUT)


def _oi_ipblock(lab, cni="honours", **build):
    c = _oi_build(lab, **build)
    world = _oi_world(c)
    result, seen = _oi_step(c, world, "outside-in ipBlock", runner_allowed_policies("oi", world.runner_net),
                            RUNNER_ALLOWED, cni)
    return world, result, seen


def test_oi_ipblock__allow_rule_missing__fails(lab):
    _, result, _ = _oi_ipblock(lab, cni="drops-allows")
    assert not result.passed and "tables did not match 2 times in a row" in result.text
    assert "outside/runner->oi/oi-local:80/TCP: expected connected, observed timeout" in result.text


def test_oi_ipblock__local_snated__fails(lab):
    world, result, seen = _oi_ipblock(lab, local_snat=True)  # the Local VIP masqueraded: SNAT where Local was asked
    assert result.passed, result.text
    record, problems = local_source_findings(world, seen)
    assert record["peer_seen_by_local_backend"].startswith(topo.CIL_ROUTER[1] + ":")
    assert problems == ["the backend saw %s, not the client %s: the source was NATed (externalTrafficPolicy Local "
                        "not honoured)" % (record["peer_seen_by_local_backend"], RUNNER)]


def test_oi_ipblock__runner_network_allowed__passes(lab):
    world, result, seen = _oi_ipblock(lab)
    assert result.passed, result.text
    assert local_source_findings(world, seen) == ({"peer_seen_by_local_backend": seen.answers[
        world.targets["local"]]["peer"]}, [])
    # the Cluster cell is recorded, not judged: SNATed to node1's overlay address, outside the runner's network
    assert result.enforced.last.get(RUNNER_ID, world.targets["cluster"]) is Verdict.TIMEOUT


def _oi_cluster(lab, **build):
    c = _oi_build(lab, **build)
    world = _oi_world(c, build.get("cluster_backend", 2))
    keep = []
    result, seen = _oi_step(c, world, "outside-in ipBlock 0.0.0.0/0", world_allowed_policies("oi"), WORLD_ALLOWED,
                            keep=keep)
    assert result.passed, result.text
    return world, seen, keep


def test_oi_snat__not_snated__fails(lab):
    world, seen, _ = _oi_cluster(lab, cluster_snat=False)
    record, problems = cluster_path_findings(world, seen)
    assert record["peer_seen_by_backend"] == RUNNER and record["cluster_backend_node"] == "node2"
    assert problems == ["the backend saw the client %s itself: externalTrafficPolicy Cluster to a backend on another "
                        "node was not SNATed (DSR mode, or a datapath that skipped the nodeport NAT)" % RUNNER]


def test_oi_snat__backend_on_the_announcer__fails(lab):
    world, seen, _ = _oi_cluster(lab, cluster_backend=1)
    record, problems = cluster_path_findings(world, seen)
    assert record["snat_node"] == "node1" and record["cluster_backend_node"] == "node1"
    assert problems == ["the backend runs on node1, the node announcing the VIP: the path does not cross nodes, so "
                        "nodeport forwarding, SNAT and the overlay are not exercised"]


def test_oi_snat__node1_snats_across_nodes__passes(lab):
    world, seen, keep = _oi_cluster(lab)
    topo.capture("connect_oi_runner_two_vips", keep[-1])
    record, problems = cluster_path_findings(world, seen)
    assert problems == [], problems
    assert record == {"peer_seen_by_backend": "10.201.254.1", "snat_node": "node1", "snat_by_announcer": True,
                      "announcing_node": "node1", "cluster_backend_node": "node2"}


def _oi_load(c, min_rate, max_p99_ms=1000.0, hold=3.0, meanwhile=None):
    """The load check's measurement and judgement: node1's table (nf_conntrack: its DNAT rule makes it track)
    before and while the runner's connections are held, and the runner's neighbour entry for the VIP watched the
    whole time. ``meanwhile`` = (seconds, action): the action runs once that long after the load starts."""
    def read():
        return {"nf_conntrack": nf_conntrack_reading("node1", node_probe(c.lab, c.node1, "facts"))}

    def neighbour(ip):
        return topo.neighbour_mac(c.lab, c.runner, ip)
    macs, failed = _node_macs(c), []

    def act():
        try:
            meanwhile[1]()
        except (subprocess.CalledProcessError, OSError) as exc:
            failed.append(exc)
    timer = threading.Timer(meanwhile[0], act) if meanwhile else None
    before = read()
    with NeighbourWatch(VIP, macs, interval=0.2, neighbour=neighbour) as watch:
        if timer:
            timer.start()
        result, during = read_while_held(read, hold / 2, lambda: topo.Lab.probe(
            c.lab, c.runner, *load_args(VIP, OI_N, 0, hold), timeout=90))
    if timer:
        timer.join()
    assert not failed, failed
    if not meanwhile:
        topo.capture("load_oi_runner_vip", result)
    after = announcing_node(VIP, macs, neighbour)[0]
    total, problems = judge_outside_load("node1", before, result, during, OI_N, min_rate, max_p99_ms)
    seen = watch.seen + [after] if after else watch.seen
    problems[:0] = judge_announcer_held(VIP, "node1", seen, watch.unknown)
    total["announcer_during_load"] = seen
    return total, problems


def test_oi_load__answered_before_node1__fails(lab):
    """The load never reaches the datapath: the runner holds the VIP itself (as a pod's socket LB translates it at
    connect()); every connection is verified, but node1's table does not rise."""
    c = _oi_build(lab)
    lab.ip(c.runner, "addr", "add", VIP + "/32", "dev", "lo")
    lab.serve(c.runner, tcp="81", bind=VIP)
    total, problems = _oi_load(c, min_rate=10)
    assert total["verified"] == OI_N and len(problems) == 1
    assert problems[0].startswith("node1: the conntrack table (nf_conntrack) grew by ")
    assert "while %d connections were held: the measurement does not see these flows" % OI_N in problems[0]


def test_oi_load__open_rate_below_bound__fails(lab):
    """node1's LAN link shaped to 256 kbit/s (tbf, deep queue: nothing dropped): SYN-ACKs and the overlay's
    encapsulated SYNs queue, connections open at a fraction of the bound."""
    c = _oi_build(lab)
    topo.sh("ip", "netns", "exec", c.node1, "tc", "qdisc", "add", "dev", "lan0", "root", "tbf", "rate", "256kbit",
            "burst", "1600", "limit", "1000000")
    total, problems = _oi_load(c, min_rate=500, max_p99_ms=60000, hold=6.0)
    assert total["verified"] == OI_N and total["open_rate_per_s"] < 500
    assert problems == ["connection-open rate %.1f/s is below the bound of 500/s (--lb-min-open-rate)"
                        % total["open_rate_per_s"]]


def test_oi_load__announcement_moves_mid_hold__fails(lab):
    """MetalLB moves the VIP while the connections are held (a speaker declared its peer dead): node2 takes the
    address and sends a gratuitous ARP, the runner's entry follows it, and the held flows land on a node that
    never saw them."""
    c = _oi_build(lab)
    total, problems = _oi_load(c, min_rate=10, hold=4.0, meanwhile=(1.5, lambda: topo.move_vip(lab, c, VIP, 2)))
    assert problems[0] == ("the runner's neighbour entry for %s moved while the load was held: node1 -> node2 "
                           "(MetalLB moved or split the announcement; held flows cannot survive a move)" % VIP)
    assert total["verified"] < OI_N


def test_oi_load__through_node1__passes(lab):
    total, problems = _oi_load(_oi_build(lab), min_rate=500)
    assert problems == [] and total["verified"] == OI_N and total["open_rate_per_s"] >= 500
    assert total["announcer_during_load"][0] == "node1" and set(total["announcer_during_load"]) == {"node1"}


# ---------------------------------------------------------------------------------------------- completeness


def collected_checks() -> list[str]:
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "conformance"], capture_output=True, text=True, cwd=REPO, timeout=120)
    ids = [line.split("conformance/", 1)[1] for line in res.stdout.splitlines() if line.startswith("conformance/")]
    assert ids, "pytest --collect-only collected no conformance check:\n" + res.stdout + res.stderr
    return ids


def test_matrix_covers_every_collected_check():
    checks = collected_checks()
    assert sorted(MATRIX) == sorted(checks), "checks without a matrix row (or rows for no check)"
    names = set(globals())
    for check, tests in MATRIX.items():
        assert any(t.endswith("__fails") or t.endswith("__errors") for t in tests), check
        assert any(t.endswith("__passes") for t in tests), check
        assert set(tests) <= names, (check, set(tests) - names)


def test_readme_table_names_every_check_and_its_matrix_tests():
    text = (REPO / "conformance" / "README.md").read_text()
    for check, tests in MATRIX.items():
        assert "`%s`" % check.split("::", 1)[1] in text, check
        for t in tests:
            assert "`%s`" % t in text, t
