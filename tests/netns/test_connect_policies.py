"""Deny rules (nftables on the nodes' forward path) standing in for NetworkPolicies:
`connect` verdicts must match each table exactly, and a healthy topology must show none of them."""
import pytest

from topo import POD2, VIP, Overlay, build, capture

TARGETS = {
    "app": POD2 + ":8080/tcp",
    "admin": POD2 + ":9090/tcp",
    "dns_udp": POD2 + ":53/udp",
    "dns_tcp": POD2 + ":53/tcp",
    "closed": POD2 + ":7777/tcp",
    "service": VIP + ":80/tcp",
}
HEALTHY = {"app": "connected", "admin": "connected", "dns_udp": "connected", "dns_tcp": "connected",
           "closed": "refused", "service": "connected"}

INGRESS = 'oifname "br0" ct state established,related accept; oifname "br0" %s'
EGRESS = 'iifname "br0" ct state established,related accept; iifname "br0" %s'

# name: (node whose forward chain gets the rules, rules, expected verdicts)
SCENARIOS = {
    "healthy": (None, "", HEALTHY),
    "default_deny_ingress": ("node2", INGRESS % "drop", dict.fromkeys(HEALTHY, "timeout")),
    "default_deny_egress_drop": ("node1", EGRESS % "drop", dict.fromkeys(HEALTHY, "timeout")),
    "default_deny_egress_reject": ("node1", EGRESS % "reject with icmpx type admin-prohibited",
                                   dict.fromkeys(HEALTHY, "unreachable")),
    "dns_blocked": ("node1", 'iifname "br0" udp dport 53 drop; iifname "br0" tcp dport 53 drop',
                    dict(HEALTHY, dns_udp="timeout", dns_tcp="timeout")),
    "one_allowed_port": ("node2", 'oifname "br0" ct state established,related accept; '
                                  'oifname "br0" tcp dport 8080 accept; oifname "br0" drop',
                         dict(dict.fromkeys(HEALTHY, "timeout"), app="connected", service="connected")),
    "reset_after_handshake": ("node2", 'oifname "br0" tcp dport 9090 ct state established '
                                       'tcp flags & (syn | rst | fin) == 0 reject with tcp reset',
                              dict(HEALTHY, admin="reset")),
}


def policy_table(rules: str) -> str:
    return "table inet netpol {\n  chain forward { type filter hook forward priority 0; %s; }\n}\n" % rules


@pytest.fixture
def cluster(lab):
    topo = build(lab, Overlay(kind="vxlan", service=True))
    lab.serve(topo.pod2, tcp="8080,9090,53", udp="53", hostname="pod2")
    return topo


def observe(lab, topo):
    args = ["connect", "--timeout", "1"]
    for to in TARGETS.values():
        args += ["--to", to]
    results = lab.probe(topo.pod1, *args)
    by_target = {r["to"]: r for r in results}
    return results, {name: by_target[to]["verdict"] for name, to in TARGETS.items()}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_connect_verdicts_match_table(lab, cluster, scenario):
    node, rules, expected = SCENARIOS[scenario]
    if node:
        lab.nft(getattr(cluster, node), policy_table(rules))
    results, observed = observe(lab, cluster)
    capture("connect_%s" % scenario, results)
    assert observed == expected
    for r in results:
        if r["verdict"] == "connected" and r["proto"] == "tcp":
            assert r["peer_host"] == "pod2"  # the greeting names who answered, through the DNAT too
        if r["verdict"] == "timeout":
            assert 900 <= r["ms"] <= 1500
        if r["proto"] == "udp":
            assert 1 <= r["tries"] <= 3
    if scenario != "healthy":
        assert observed != HEALTHY  # each fault is visible against the healthy table
