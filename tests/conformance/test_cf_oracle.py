"""The NetworkPolicy oracle on a catalogue of policy cases, each with a hand-derived truth table.

World: namespaces a (team=a), b (team=b, env=prod), c (team=c), kube-system; pods a/frontend, a/other,
b/backend (named port http=8080/TCP), b/db, c/client, kube-system/kube-dns; outside hosts ext/web (203.0.113.10)
and ext/c2 (198.51.100.66). Every case lists the cells it expects ALLOWED (or BLOCKED); all others are the opposite.
"""
from __future__ import annotations

import pytest

from conformance import policies
from conformance.expect import Expect, Target
from conformance.oracle import PolicyModel, External, Pod, expected_table, selector_matches

NAMESPACES = {"a": {"team": "a"}, "b": {"team": "b", "env": "prod"}, "c": {"team": "c"}, "kube-system": {}}
PODS = [
    Pod("a", "frontend", {"app": "frontend"}, "10.244.1.10"),
    Pod("a", "other", {"app": "other", "tier": "web"}, "10.244.1.11"),
    Pod("b", "backend", {"app": "backend", "tier": "api"}, "10.244.2.20", {"http": (8080, "TCP")}),
    Pod("b", "db", {"app": "db"}, "10.244.2.21"),
    Pod("c", "client", {"app": "client"}, "10.244.3.30"),
    Pod("kube-system", "kube-dns", {"k8s-app": "kube-dns"}, "10.244.0.5", {"dns": (53, "UDP")}),
]
EXTERNALS = [External("web", "203.0.113.10"), External("c2", "198.51.100.66")]
SOURCES = ["a/frontend", "a/other", "b/db", "c/client"]
BE80, BE80U, BE90 = Target("b/backend", 8080), Target("b/backend", 8080, "UDP"), Target("b/backend", 9090)
DB, FE, WEB, C2 = Target("b/db", 5432), Target("a/frontend", 8080), Target("ext/web", 443), Target("ext/c2", 443)
DNS = Target("kube-system/kube-dns", 53, "UDP")
TARGETS = [BE80, BE80U, BE90, DB, FE, WEB, C2, DNS]


def cells(sources, targets) -> set[str]:
    return {f"{s}->{t}" for s in sources for t in targets}


ALL = cells(SOURCES, TARGETS)


def pol(ns, name, spec):
    return {"metadata": {"namespace": ns, "name": name}, "spec": spec}


DENY_B_INGRESS = pol("b", "deny", {"podSelector": {}})
CASES = {
    "no policy: everything connects": ([], ALL),
    "default-deny ingress in b (policyTypes defaults to Ingress)": (
        [DENY_B_INGRESS], ALL - cells(SOURCES, [BE80, BE80U, BE90, DB])),
    "default-deny egress in a": (
        [pol("a", "deny", {"podSelector": {}, "policyTypes": ["Egress"]})], ALL - cells(["a/frontend", "a/other"], TARGETS)),
    "no policyTypes + egress section -> Egress AND Ingress isolated (Ingress always implied)": (
        [pol("b", "e", {"podSelector": {"matchLabels": {"app": "db"}}, "egress": []})],
        ALL - cells(["b/db"], TARGETS) - cells(SOURCES, [DB])),
    "policyTypes Egress only: ingress section ignored": (
        [pol("b", "e", {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [], "egress": [{}]})], ALL),
    "ingress: [{}] allows everything into selected pods": (
        [DENY_B_INGRESS, pol("b", "all", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{}]})],
        ALL - cells(SOURCES, [BE80, BE80U, BE90])),
    "podSelector alone selects peers in the policy's own namespace": (
        [pol("b", "fe", {"podSelector": {"matchLabels": {"app": "backend"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]}]})],
        ALL - cells(SOURCES, [BE80, BE80U, BE90])),
    "namespaceSelector and podSelector in ONE peer: AND": (
        [pol("b", "fe", {"podSelector": {"matchLabels": {"app": "backend"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                                                "podSelector": {"matchLabels": {"app": "frontend"}}}]}]})],
        ALL - cells(["a/other", "b/db", "c/client"], [BE80, BE80U, BE90])),
    "namespaceSelector and podSelector in TWO peers: OR": (
        [pol("b", "fe", {"podSelector": {"matchLabels": {"app": "backend"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}},
                                               {"podSelector": {"matchLabels": {"app": "db"}}}]}]})],
        ALL - cells(["c/client"], [BE80, BE80U, BE90])),
    "matchExpressions In / NotIn (absent key matches NotIn) / Exists": (
        [pol("b", "x", {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
                        "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                            {"key": "team", "operator": "In", "values": ["a", "c"]}]},
                            "podSelector": {"matchExpressions": [
                                {"key": "tier", "operator": "NotIn", "values": ["web"]}]}}]}]})],
        ALL - cells(["a/other", "b/db"], [BE80, BE80U, BE90])),
    "DoesNotExist selects pods without the key": (
        [pol("b", "x", {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}})],
        ALL - cells(SOURCES, [DB])),
    "namespaceSelector {} means every namespace": (
        [pol("b", "x", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})], ALL),
    "named port resolves on the destination pod: http = 8080/TCP only": (
        [pol("b", "x", {"podSelector": {"matchLabels": {"app": "backend"}},
                        "ingress": [{"ports": [{"port": "http"}]}]})],
        ALL - cells(SOURCES, [BE80U, BE90])),
    "port without number: every port of that protocol": (
        [pol("b", "x", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]})],
        ALL - cells(SOURCES, [BE80, BE90, DB])),
    "endPort range 8000-9000/TCP": (
        [pol("b", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 9000}]}]})],
        ALL - cells(SOURCES, [BE80U, BE90, DB])),
    "ipBlock with except: egress to the Internet but not the C2 range; pods not matched by ipBlock": (
        [pol("a", "x", {"podSelector": {}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["198.51.100.0/24"]}}]}]})],
        ALL - cells(["a/frontend", "a/other"], [BE80, BE80U, BE90, DB, FE, C2, DNS])),
    "named port never matches an outside host": (
        [pol("a", "x", {"podSelector": {}, "policyTypes": ["Egress"],
                        "egress": [{"ports": [{"port": "https"}]}]})],
        ALL - cells(["a/frontend", "a/other"], TARGETS)),
    "egress and ingress combined: both must allow": (
        [pol("a", "eg", {"podSelector": {}, "policyTypes": ["Egress"],
                         "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
         pol("b", "in", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                                                                    "podSelector": {"matchLabels": {"app": "frontend"}}}],
                                                         "ports": [{"port": 8080}, {"port": 5432}]}]})],
        (ALL - cells(["a/frontend", "a/other"], TARGETS) - cells(["b/db", "c/client"], [BE80, BE80U, BE90, DB]))
        | cells(["a/frontend"], [BE80, DB])),
    "multiple policies add up (union)": (
        [pol("b", "p1", {"podSelector": {"matchLabels": {"app": "backend"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                                      "ports": [{"port": 8080}]}]}),
         pol("b", "p2", {"podSelector": {"matchLabels": {"app": "backend"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "c"}}}],
                                      "ports": [{"port": 9090}]}]})],
        ALL - cells(SOURCES, [BE80, BE80U, BE90]) | cells(["a/frontend", "a/other"], [BE80])
        | cells(["c/client"], [BE90])),
    "a policy in another namespace does not select these pods": (
        [pol("c", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
        ALL - cells(["c/client"], TARGETS)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name):
    policies_, allowed = CASES[name]
    table = expected_table(PolicyModel(NAMESPACES, PODS, EXTERNALS, policies_), SOURCES, TARGETS)
    got = {cid for cid, v in table.by_id().items() if v is Expect.CONNECTED}
    assert got == allowed, (f"wrongly allowed: {sorted(got - allowed)}\nwrongly blocked: {sorted(allowed - got)}\n"
                            + table.render())


def test_default_deny_steps_match_the_check():
    """Steps 2 and 3 of test_default_deny in this catalogue's world (the ingress rule names the port `http`, as the
    check's does) give the hand-derived tables; the check's own world is test_cf_world.py."""
    protected = ["a", "b"]
    step2 = [policies.default_deny(ns) for ns in protected]
    step3 = step2 + [policies.allow_dns(ns) for ns in protected] + [
        policies.allow_egress_to("a", "fe-be", {"app": "frontend"}, "b", {"app": "backend"}, 8080),
        policies.allow_ingress_from("b", "be-fe", {"app": "backend"}, "a", {"app": "frontend"}, "http")]
    inside = cells(["a/frontend", "a/other", "b/db"], TARGETS) | cells(["c/client"], [BE80, BE80U, BE90, DB, FE])
    table2 = expected_table(PolicyModel(NAMESPACES, PODS, EXTERNALS, step2), SOURCES, TARGETS)
    assert {c for c, v in table2.by_id().items() if v is Expect.CONNECTED} == ALL - inside
    table3 = expected_table(PolicyModel(NAMESPACES, PODS, EXTERNALS, step3), SOURCES, TARGETS)
    allowed3 = (ALL - inside) | cells(["a/frontend"], [BE80]) | cells(["a/frontend", "a/other", "b/db"], [DNS])
    assert {c for c, v in table3.by_id().items() if v is Expect.CONNECTED} == allowed3


@pytest.mark.parametrize("selector,labels,result", [
    ({}, {"x": "1"}, True),
    (None, {}, True),
    ({"matchLabels": {"x": "1"}}, {"x": "2"}, False),
    ({"matchLabels": {"x": "1"}, "matchExpressions": [{"key": "y", "operator": "Exists"}]}, {"x": "1"}, False),
    ({"matchExpressions": [{"key": "y", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "y", "operator": "In", "values": ["1"]}]}, {}, False),
])
def test_selector(selector, labels, result):
    assert selector_matches(selector, labels) is result


def test_unknown_operator_is_an_error_naming_the_accepted_ones():
    with pytest.raises(ValueError, match="In, NotIn, Exists or DoesNotExist"):
        selector_matches({"matchExpressions": [{"key": "a", "operator": "Gt"}]}, {})
