"""conformance.pod_tuning on the shapes the check reads: lab.sysctl's read_command output parsed per pod (values
a pod on a stock kernel shows, measured in a child netns here: somaxconn 4096, tcp_max_syn_backlog 2048 on this
host's memory size, gc_thresh absent) and the node's /proc/sys/net/ipv4/conf/*/rp_filter listing."""
from __future__ import annotations

from conformance.pod_tuning import (SAFE_SYSCTLS_1_37, Scope, SCOPES, how_a_pod_gets_it, judge_node_rp_filter,
                                    judge_pod_rp_filter, judge_pod_sysctls, parse_rp_filter_lines)
from lab.spec import PRODUCTION_SYSCTLS
from lab.sysctl import parse_values, read_command

NAMES = sorted(PRODUCTION_SYSCTLS)
POD_STDOUT = "\n".join([
    "net.bridge.bridge-nf-call-iptables\t1", "net.core.somaxconn\t4096",
    "net.ipv4.ip_forward\t0", "net.ipv4.neigh.default.gc_thresh1\t<missing>",
    "net.ipv4.neigh.default.gc_thresh2\t<missing>", "net.ipv4.neigh.default.gc_thresh3\t<missing>",
    "net.ipv4.tcp_max_syn_backlog\t2048", "net.netfilter.nf_conntrack_max\t1000000",
    "net.netfilter.nf_conntrack_tcp_timeout_established\t432000"]) + "\n"


def pod_values(stdout=POD_STDOUT):
    return parse_values(stdout, NAMES)


def test_every_production_sysctl_has_a_scope():
    assert set(PRODUCTION_SYSCTLS) <= set(SCOPES)
    assert SCOPES["net.core.somaxconn"] is Scope.NETNS and SCOPES["net.ipv4.tcp_max_syn_backlog"] is Scope.NETNS
    assert SCOPES["net.netfilter.nf_conntrack_max"] is Scope.GLOBAL


def test_healthy_cluster_has_no_failure_and_names_what_does_not_reach_pods():
    report = judge_pod_sysctls(PRODUCTION_SYSCTLS, {"w1/p": pod_values(), "w2/p": pod_values()})
    assert report.failures == []
    text = "\n".join(report.notes)
    assert "net.core.somaxconn=32768 on nodes does not reach pods (they have 4096)" in text
    assert "securityContext.sysctls + kubelet allowedUnsafeSysctls (unsafe)" in text
    assert "net.ipv4.tcp_max_syn_backlog=8192" in text and "gc_thresh3=16384 is a node-wide table setting" in text
    assert "nf_conntrack_max" not in text  # global and equal: nothing to say
    assert "net.core.somaxconn" in report.render()


def test_global_value_that_differs_in_pods_fails():
    report = judge_pod_sysctls(PRODUCTION_SYSCTLS, {"w1/p": pod_values(POD_STDOUT.replace("\t1000000", "\t262144"))})
    assert report.failures == ["net.netfilter.nf_conntrack_max is global, so pods must see the node's 1000000, but "
                               "w1/p sees 262144"]


def test_pod_expected_value_missing_fails_naming_how_to_set_it():
    names = ["net.ipv4.ip_local_port_range"]
    observed = {"w1/p": parse_values("net.ipv4.ip_local_port_range\t32768\t60999\n", names),
                "w2/p": parse_values("net.ipv4.ip_local_port_range\t1024\t65000\n", names)}
    report = judge_pod_sysctls({}, observed, {"net.ipv4.ip_local_port_range": "1024 65000"})
    assert report.failures == ["net.ipv4.ip_local_port_range: pods should get 1024 65000 (securityContext.sysctls "
                               "(safe)) but w1/p has 32768 60999"]


def test_safe_sysctls_are_kubernetes_1_37s():
    assert "net.ipv4.ip_local_port_range" in SAFE_SYSCTLS_1_37 and "net.core.somaxconn" not in SAFE_SYSCTLS_1_37
    assert len(SAFE_SYSCTLS_1_37) == 14
    assert how_a_pod_gets_it("net.netfilter.nf_conntrack_max") == "from the node (global)"


def test_read_command_is_what_the_check_runs():
    assert read_command(["net.core.somaxconn"])[:2] == ["sh", "-c"]


NODE_RP = "all 0\ndefault 0\nenp1s0 0\ncilium_host 0\ncilium_net 0\ncilium_vxlan 0\nlxc_health 0\nlxc1a2b 0\nlo 0\n"


def test_node_rp_filter_off_on_cilium_devices_passes():
    assert judge_node_rp_filter("w1", parse_rp_filter_lines(NODE_RP)) == []


def test_systemd_rp_filter_on_lxc_devices_fails_naming_each():
    values = parse_rp_filter_lines(NODE_RP.replace("lxc1a2b 0", "lxc1a2b 2").replace("all 0", "all 1"))
    problems = judge_node_rp_filter("w1", values)
    assert len(problems) == 5  # all=1 raises every Cilium device (cilium_host, _net, _vxlan, 2 lxc) to strict
    assert problems[-1].startswith("w1: rp_filter on lxc_health is 1 (strict; all=1, lxc_health=0)")
    assert any("lxc1a2b is 2 (loose" in p for p in judge_node_rp_filter("w1", {**values, "all": 0}))
    assert judge_node_rp_filter("w1", {"lxc1": 0}) == ["w1: net.ipv4.conf.all.rp_filter could not be read"]


def test_pod_rp_filter_strict_is_a_note():
    keys = {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.eth0.rp_filter": "1"}
    assert judge_pod_rp_filter("ns/p", keys) == ["ns/p: eth0 rp_filter is 1 (strict)"]
    assert judge_pod_rp_filter("ns/p", {**keys, "net.ipv4.conf.eth0.rp_filter": "2"}) == []
    assert "could not be read" in judge_pod_rp_filter("ns/p", {"net.ipv4.conf.all.rp_filter": None})[0]



def _settings_with(**given):
    """conformance.conftest._settings on a config whose options are the parser's defaults plus ``given``."""
    from types import SimpleNamespace

    from conformance.conftest import _settings
    defaults = {"--expect-sysctl": [], "--expect-pod-sysctl": [], "--lb-pool": [], "--conntrack-hold": 10.0,
                "--wait-timeout": 300.0, "--policy-timeout": 60.0, "--policy-consecutive": 3,
                "--conntrack-peak": 200000, "--failover-seconds": 30.0, "--results-dir": "results"}
    values = {**defaults, **given}
    return _settings(SimpleNamespace(getoption=lambda name: values.get(name)))


def test_expect_pod_sysctl_option_sets_the_pod_expectation_and_rejects_a_bad_form():
    import pytest
    s = _settings_with(**{"--kubeconfig": "/nonexistent", "--expect-pod-sysctl": [
        "net.core.somaxconn=8192", "net.ipv4.ip_local_port_range = 1024 65000"]})
    assert s.expect_pod_sysctls == {"net.core.somaxconn": "8192", "net.ipv4.ip_local_port_range": "1024 65000"}
    assert _settings_with(**{"--kubeconfig": "/nonexistent"}).expect_pod_sysctls == {}
    with pytest.raises(pytest.UsageError, match="--expect-pod-sysctl 'net.core.somaxconn': use NAME=VALUE"):
        _settings_with(**{"--kubeconfig": "/nonexistent", "--expect-pod-sysctl": ["net.core.somaxconn"]})
