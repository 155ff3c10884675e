"""Each fault brought into the real CI cluster at its own layer is caught by exactly the check that should catch
it, with a message that names it; the other checks of the same concern stay green; health is restored after.
(issue 11: faults at their real layer). Runs after the healthy conformance run on the same cluster, cheapest fault
first: the two that redeploy Cilium (and so recompile its datapath on every node) come last."""
from __future__ import annotations

from pathlib import Path

import pytest

from clusterlab import RESULTS, TCG_CONNTRACK_ARGS
from faults import (cilium_values_override, kube_proxy_installed, network_policies_deleted, run_checks,
                    second_arp_responder, sysctl_reverted)

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.faults]


@pytest.fixture(scope="module")
def kubeconfig(cluster, cluster_state) -> Path:
    from clusterlab import SPEC
    from labrun import lab_cli

    proc = lab_cli(cluster_state, "kubeconfig", "-c", str(SPEC))
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def outcome_of(outcomes: dict, prefix: str) -> tuple[str, str]:
    found = [v for k, v in outcomes.items() if k.startswith(prefix)]
    assert found, f"no result for {prefix}: {sorted(outcomes)}"
    return found[0]


def test_reverted_sysctl_is_named_by_node_and_key(cluster, cluster_state, cluster_lab):
    worker = cluster_lab.workers[0].name
    with sysctl_reverted(cluster_state, worker, "net.core.somaxconn", "4096", "32768"):
        rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-sysctl", "conformance/test_tuning.py")
    outcome, message = outcome_of(outcomes, "test_node_sysctls_match_expected")
    assert rc == 1 and outcome == "failure", tail
    assert worker in message and "net.core.somaxconn" in message and "4096" in message, message
    rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-sysctl-restored", "conformance/test_tuning.py")
    assert rc == 0, tail


def test_kube_proxy_beside_kpr_fails_the_kpr_checks(cluster, cluster_state, cluster_lab, bundle, kubeconfig):
    nodes = [n.name for n in cluster_lab.nodes]
    with kube_proxy_installed(cluster_state, bundle[0], kubeconfig, nodes, cluster_lab.control_planes[0].name):
        rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-kube-proxy",
                                        "conformance/test_kube_proxy_replacement.py")
    assert rc == 1, tail
    outcome, message = outcome_of(outcomes, "test_no_kube_proxy_daemonset")
    assert outcome == "failure" and "kube-proxy" in message, message
    assert outcome_of(outcomes, "test_kernels_support_the_ebpf_datapath")[0] == "passed"
    assert outcome_of(outcomes, "test_cilium_reports_kube_proxy_replacement")[0] == "passed"
    rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-kube-proxy-restored",
                                    "conformance/test_kube_proxy_replacement.py")
    assert rc == 0, tail


def pool_addresses(lab) -> list[str]:
    from lab.spec import pool_ranges
    out = []
    for entry in lab.metallb.addresses:
        first, last = pool_ranges(entry)
        out += [str(first + i) for i in range(int(last) - int(first) + 1)]
    return out


def test_second_arp_responder_for_the_vip_is_caught(cluster, cluster_state, cluster_lab):
    """Another host on the lab's L2 answers ARP for the pool's addresses: the one-announcer check fails, naming
    the foreign MAC next to the node's; without it the same check passes."""
    with second_arp_responder(cluster_lab.bridge_name, pool_addresses(cluster_lab)) as rogue_mac:
        rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-arp", "conformance/test_l2_announce.py",
                                        "-k", "one_announcer")
    assert rc == 1, tail
    outcome, message = outcome_of(outcomes, "test_l2_one_announcer_matches_servicel2status")
    assert outcome == "failure", message
    assert rogue_mac in message.lower() and "answered by" in message, message
    rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-arp-restored", "conformance/test_l2_announce.py",
                                    "-k", "one_announcer")
    assert rc == 0, tail


def test_deleted_default_deny_names_the_leaking_cells(cluster, cluster_state, bundle, kubeconfig):
    with network_policies_deleted(bundle[0], kubeconfig, "cf-") as deleted:
        rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-policy", "conformance/test_default_deny.py::"
                                        "test_step2_default_deny_blocks_everything_in_and_out")
    assert deleted, "the fault never saw a NetworkPolicy to delete"
    outcome, message = outcome_of(outcomes, "test_step2")
    assert rc == 1 and outcome == "failure", tail
    assert "->" in message and ("leak" in message.lower() or "CONNECTED" in message or "connected" in message), \
        message


@pytest.mark.parametrize("method", ["suspend", "link-down"])
def test_announcer_lost_fails_over_within_the_bound(method, cluster, cluster_state):
    """The announcing node taken away at the hypervisor -- its VM suspended, its NIC unplugged through libvirt (the
    healthy run already fails over by taint): the VIP answers from the other node within the bound, and the
    seconds it took are in the report. The CI spec lets the control plane announce, so there are two announcers."""
    import json
    results = RESULTS / f"failover-{method}"
    rc, outcomes, tail = run_checks(cluster_state, results, "conformance/test_loadbalancer.py", "-k", "failover",
                                    "--failover-by", method)
    outcome, message = outcome_of(outcomes, "test_failover_to_another_node")
    assert rc == 0 and outcome == "passed", f"{message}\n{tail}"
    report = json.loads((results / "conformance-latest.json").read_text())
    [check] = [c for c in report["checks"] if c["id"].endswith("test_failover_to_another_node")]
    print(f"failover by {method}: {json.dumps(check.get('measured'), sort_keys=True)}")
    assert check["measured"]["failover_within_bound"] is True and check["measured"]["failover_by"] == method



def test_pod_mtu_too_large_for_the_underlay_fails_the_mtu_checks(cluster, cluster_state, tmp_path):
    """The 'Geneve 1460' mistake: pods get a 1460 route MTU on a 1500 underlay (Cilium's MTU value 1510)."""
    with cilium_values_override(cluster_state, tmp_path, {"MTU": 1510}):
        rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-mtu", "conformance/test_mtu.py",
                                        "-k", "pod_route_mtu or underlay")
    assert rc == 1, tail
    outcome, message = outcome_of(outcomes, "test_pod_route_mtu")
    assert outcome == "failure" and "1460" in message, message
    assert outcome_of(outcomes, "test_node_underlay_mtu")[0] == "passed"


def test_small_bpf_ct_map_fails_the_conntrack_check(cluster, cluster_state, tmp_path):
    """Cilium's BPF CT map sized far below the declared peak (as when its sizes are left to Cilium's memory-based
    default on a small node): the conntrack check fails and names the node, the table and its size."""
    # natMax too: Cilium refuses a NAT map larger than the CT maps together (and so does the spec now)
    small = {"bpf": {"ctTcpMax": 16384, "ctAnyMax": 8192, "natMax": 16384}}
    with cilium_values_override(cluster_state, tmp_path, small):
        rc, outcomes, tail = run_checks(cluster_state, RESULTS / "fault-bpf-ct", "conformance/test_conntrack.py",
                                        "-k", "clusterip", *TCG_CONNTRACK_ARGS)
    assert rc == 1, tail
    outcome, message = outcome_of(outcomes, "test_connections_held_without_loss[clusterip]")
    assert outcome == "failure", message
    assert "bpf-ct holds 16384 entries" in message and "headroom" in message, message