"""conformance.l2 on captured shapes: real `netprobe arp` outputs from tests/netns/test_arp_announcers.py
(tests/fixtures/netprobe/arp_*.json) and ServiceL2Status objects shaped as MetalLB's CRD
(../shared/schemas/metallb/metallb.io_servicel2statuses.yaml: v1beta1, status.node, status.serviceName,
status.serviceNamespace, status.interfaces[].name). Every fault gives its named finding; health gives none."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conformance.l2 import (EXCLUDE_LB_LABEL, L2Finding, failover_skip_reason, judge_announcement, mac_owners,
                            may_announce)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "netprobe"
ONE, TWO, NONE = (json.loads((FIXTURES / f"arp_{n}.json").read_text())
                  for n in ("one_announcer", "two_announcers", "no_announcer"))
MAC1, MAC2 = TWO["macs"]  # the two nodes' lan0 MACs of the capture (ONE was answered by node1 of its own run)
SVC = "cf-lb-1/web"


def l2status(node: str, service: str = SVC, iface: str = "enp1s0") -> dict:
    ns, _, name = service.partition("/")
    return {"apiVersion": "metallb.io/v1beta1", "kind": "ServiceL2Status",
            "metadata": {"name": f"l2-{node}", "namespace": "metallb-system"},
            "spec": {}, "status": {"node": node, "serviceName": name, "serviceNamespace": ns,
                                   "interfaces": [{"name": iface}]}}


def world(one_mac: str = None):
    """cp1 (control plane, excluded), w1 answers with MAC1 (or ONE's responder), w2 with MAC2."""
    macs = {"cp1": ["52:54:00:00:00:01"], "w1": [one_mac or MAC1, "02:42:00:00:00:01"], "w2": [MAC2.upper()]}
    labels = {"cp1": {EXCLUDE_LB_LABEL: "", "node-role.kubernetes.io/control-plane": ""}, "w1": {}, "w2": {}}
    return macs, labels


def findings(j):
    return [f for f, _ in j.problems]


def test_one_announcer_matching_its_status_is_healthy():
    macs, labels = world(ONE["macs"][0])
    j = judge_announcement(ONE, [l2status("w1"), l2status("w2", "other/svc")], macs, labels, SVC)
    assert j.ok, j.messages()
    assert (j.announcer, j.status_nodes, j.vip) == ("w1", ["w1"], "10.201.0.200")


def test_two_nodes_answering_is_a_split_brain_naming_both():
    macs, labels = world()
    j = judge_announcement(TWO, [l2status("w1")], macs, labels, SVC)
    assert findings(j) == [L2Finding.SEVERAL_ANNOUNCERS]
    assert f"{MAC1} (w1)" in j.messages()[0] and f"{MAC2} (w2)" in j.messages()[0]
    assert j.announcer is None


def test_nobody_answering_says_no_announcer_and_no_status():
    macs, labels = world()
    j = judge_announcement(NONE, [], macs, labels, SVC)
    assert findings(j) == [L2Finding.NO_ANNOUNCER, L2Finding.NO_STATUS]
    assert "no speaker announces it" in j.messages()[0]


def test_status_naming_another_node_is_a_mismatch():
    macs, labels = world(ONE["macs"][0])
    j = judge_announcement(ONE, [l2status("w2")], macs, labels, SVC)
    assert findings(j) == [L2Finding.STATUS_MISMATCH]
    assert "answered by w1 but ServiceL2Status names w2" in j.messages()[0]


def test_two_statuses_for_one_service():
    macs, labels = world(ONE["macs"][0])
    j = judge_announcement(ONE, [l2status("w1"), l2status("w2")], macs, labels, SVC)
    assert findings(j) == [L2Finding.SEVERAL_STATUSES]


def test_a_mac_of_no_node_is_named():
    _, labels = world()
    j = judge_announcement(ONE, [l2status("w1")], {"w1": ["02:00:00:00:00:99"]}, labels, SVC)
    assert findings(j) == [L2Finding.NOT_A_NODE]


def test_announcing_from_an_excluded_control_plane_node_fails():
    macs, labels = world()
    macs["cp1"] = [ONE["macs"][0]]
    macs["w1"] = ["02:00:00:00:00:11"]
    j = judge_announcement(ONE, [l2status("cp1")], macs, labels, SVC)
    assert findings(j) == [L2Finding.EXCLUDED_NODE] and EXCLUDE_LB_LABEL in j.messages()[0]


@pytest.mark.parametrize("endpoints,problems", [(["w1"], []), (["w2"], [L2Finding.NO_LOCAL_ENDPOINT]),
                                                ([], [L2Finding.NO_LOCAL_ENDPOINT])])
def test_etp_local_announcer_must_hold_an_endpoint(endpoints, problems):
    macs, labels = world(ONE["macs"][0])
    j = judge_announcement(ONE, [l2status("w1")], macs, labels, SVC, "Local", endpoints)
    assert findings(j) == problems


def test_etp_cluster_does_not_need_a_local_endpoint():
    macs, labels = world(ONE["macs"][0])
    assert judge_announcement(ONE, [l2status("w1")], macs, labels, SVC, "Cluster", []).ok


def test_probe_error_is_not_judged_as_no_announcer():
    macs, labels = world()
    j = judge_announcement({"error": "a raw AF_PACKET socket needs CAP_NET_RAW"}, [l2status("w1")], macs, labels,
                           SVC)
    assert findings(j) == [L2Finding.PROBE_FAILED] and "CAP_NET_RAW" in j.messages()[0]


def test_a_mac_on_two_nodes_is_an_error_of_the_lab():
    with pytest.raises(ValueError, match="cloned VMs"):
        mac_owners({"a": ["02:00:00:00:00:01"], "b": ["02:00:00:00:00:01"]})


LABELS3 = {"cp1": {EXCLUDE_LB_LABEL: ""}, "w1": {}, "w2": {}}


def test_failover_runs_with_two_workers():
    eligible, why_not = may_announce(LABELS3, ["cp1", "w1", "w2"])
    assert eligible == ["w1", "w2"] and failover_skip_reason(eligible, why_not) is None


@pytest.mark.parametrize("kw,text", [
    ({"ready_nodes": ["cp1", "w1"]}, "w2: not Ready"),
    ({"ready_nodes": ["cp1", "w1", "w2"], "traffic_policy": "Local", "endpoint_nodes": ["w2"]},
     "w1: holds no endpoint (externalTrafficPolicy Local)"),
    ({"ready_nodes": ["cp1", "w1", "w2"], "speaker_nodes": ["w1"]}, "w2: no MetalLB speaker running"),
])
def test_failover_is_skipped_with_the_reason_when_fewer_than_two_may_announce(kw, text):
    eligible, why_not = may_announce(LABELS3, **kw)
    reason = failover_skip_reason(eligible, why_not)
    assert reason.startswith("failover needs two nodes that may announce the VIP; 1 may")
    assert text in reason and f"cp1: labelled {EXCLUDE_LB_LABEL}" in reason


# ---------------------------------------------------------------------------------------------- node MACs


def _facts(*links, errors=()):
    return {"interfaces": [dict(zip(("name", "mac", "ipv4"), link)) for link in links], "errors": list(errors)}


def test_node_mac_is_the_mac_of_the_link_holding_the_internal_ip():
    from conformance.l2 import lab_link_macs
    facts = {"w1": _facts(("lo", "00:00:00:00:00:00", ["127.0.0.1/8"]), ("enp1s0", "52:54:00:AA:00:11",
                                                                      ["192.168.150.11/24"]),
                          ("cilium_host", "ee:ee:00:00:00:01", ["10.244.1.1/32"])),
             "w2": _facts(("enp1s0", "52:54:00:aa:00:12", ["192.168.150.12/24"]))}
    macs, problems = lab_link_macs(facts, {"w1": "192.168.150.11", "w2": "192.168.150.12"})
    assert (macs, problems) == ({"w1": ["52:54:00:aa:00:11"], "w2": ["52:54:00:aa:00:12"]}, [])


def test_node_mac_unknown_is_a_problem_never_a_guess():
    from conformance.l2 import lab_link_macs
    facts = {"w1": _facts(("enp1s0", "52:54:00:aa:00:11", ["192.168.150.99/24"])),
             "w2": _facts(("enp1s0", "52:54:00:aa:00:12", None),
                          errors=[{"what": "interfaces.ipv4", "error": "rtnetlink address dump failed: EPERM"}])}
    macs, problems = lab_link_macs(facts, {"w1": "192.168.150.11", "w2": "192.168.150.12", "w3": "192.168.150.13"})
    assert macs == {}
    assert problems[0].startswith("w1: no link holds its InternalIP 192.168.150.11 (links: enp1s0")
    assert problems[1] == "w2: netprobe facts could not list IPv4 addresses (rtnetlink address dump failed: EPERM)"
    assert problems[2] == "w3: no netprobe facts"
