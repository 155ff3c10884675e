"""A model of Kubernetes NetworkPolicy semantics: policies + pods + targets -> the expected TruthTable.

Semantics (networking.k8s.io/v1, https://kubernetes.io/docs/concepts/services-networking/network-policies/):

* A pod is *isolated for ingress* when some policy in its namespace selects it (``spec.podSelector``) and has
  ``Ingress`` in its policyTypes; likewise for egress. A non-isolated direction allows everything.
* ``policyTypes`` defaults to ``["Ingress"]`` plus ``"Egress"`` when the policy has an ``egress`` section.
* An isolated direction allows a flow when ANY rule of ANY selecting policy allows it (policies add up).
* A rule allows a flow when one of its peers matches (no ``from``/``to``, or an empty list: every peer) and one of
  its ports matches (no ``ports``, or an empty list: every port).
* Peers: ``podSelector`` alone = pods of the policy's namespace; ``namespaceSelector`` alone = every pod of the
  matching namespaces; both = matching pods in matching namespaces; ``ipBlock`` = ``cidr`` minus ``except``.
  Whether ipBlock matches pod IPs is implementation-defined; this model applies it to non-pod addresses only
  unless ``ipblock_matches_pods=True``.
* Ports: ``protocol`` defaults to TCP; ``port`` may be a number, a name (resolved against the destination pod's
  container ports; never matches an outside host) or absent (every port of the protocol); ``endPort`` makes a range.
* Selectors: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist), ANDed; an empty selector
  matches everything. Every namespace carries ``kubernetes.io/metadata.name: <name>``.
* A flow between two pods must pass the source's egress AND the destination's ingress.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from conformance.expect import Expect, Target, TruthTable
from conformance.policies import NAME_LABEL


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = ""
    named_ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # name -> (port, protocol)

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class External:
    """A host outside the cluster (served by the suite on the runner): matched only by ipBlock."""

    name: str
    ip: str

    @property
    def id(self) -> str:
        return f"ext/{self.name}"


class PolicyModel:
    """What the oracle needs to know: namespaces with labels, pods, outside hosts and the policies."""

    def __init__(self, namespaces: Mapping[str, Mapping[str, str]], pods: Iterable[Pod],
                 externals: Iterable[External] = (), policies: Iterable[Mapping] = (),
                 ipblock_matches_pods: bool = False):
        self.namespaces = {ns: {**labels, NAME_LABEL: ns} for ns, labels in namespaces.items()}
        self.pods = {p.id: p for p in pods}
        for pod in self.pods.values():
            self.namespaces.setdefault(pod.namespace, {NAME_LABEL: pod.namespace})
        self.externals = {e.id: e for e in externals}
        self.policies = [dict(p) for p in policies]
        self.ipblock_matches_pods = ipblock_matches_pods

    def endpoint(self, ident: str) -> Pod | External:
        if ident in self.pods:
            return self.pods[ident]
        if ident in self.externals:
            return self.externals[ident]
        raise KeyError(f"{ident} is neither a pod nor an outside host of this model")


# ---------------------------------------------------------------------------------------------- selectors


def selector_matches(selector: Mapping | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set. ``{}`` matches all."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], list(expr.get("values") or [])
        present = key in labels
        if op == "In":
            ok = present and labels[key] in values
        elif op == "NotIn":
            ok = not present or labels[key] not in values
        elif op == "Exists":
            ok = present
        elif op == "DoesNotExist":
            ok = not present
        else:
            raise ValueError(f"unknown selector operator {op!r}; use In, NotIn, Exists or DoesNotExist")
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------------------------------- rules


def policy_types(policy: Mapping) -> set[str]:
    spec = policy.get("spec") or {}
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if "egress" in spec else set())


def _ns(policy: Mapping) -> str:
    return (policy.get("metadata") or {}).get("namespace", "default")


def _in_ipblock(block: Mapping, ip: str) -> bool:
    if not ip:
        return False
    addr = ipaddress.ip_address(ip)
    if addr not in ipaddress.ip_network(block["cidr"], strict=False):
        return False
    return not any(addr in ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])


def peer_matches(peer: Mapping, policy_ns: str, other: Pod | External, model: PolicyModel) -> bool:
    if "ipBlock" in peer:
        if isinstance(other, Pod) and not model.ipblock_matches_pods:
            return False
        return _in_ipblock(peer["ipBlock"], other.ip)
    if not isinstance(other, Pod):
        return False  # pod/namespace selectors select pods only
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], model.namespaces.get(other.namespace, {})):
            return False
    elif other.namespace != policy_ns:
        return False
    if "podSelector" in peer:
        return selector_matches(peer["podSelector"], other.labels)
    return True


def port_matches(rule_port: Mapping, port: int, proto: str, dest: Pod | External) -> bool:
    if str(rule_port.get("protocol", "TCP")).upper() != proto.upper():
        return False
    want = rule_port.get("port")
    if want is None:
        return True
    if isinstance(want, str) and not want.isdigit():
        if not isinstance(dest, Pod) or want not in dest.named_ports:
            return False
        named_port, named_proto = dest.named_ports[want]
        return named_port == port and named_proto.upper() == proto.upper()
    first = int(want)
    last = int(rule_port.get("endPort") or first)
    return first <= port <= last


def rule_allows(rule: Mapping, peers_key: str, policy_ns: str, other: Pod | External, port: int, proto: str,
                dest: Pod | External, model: PolicyModel) -> bool:
    peers = rule.get(peers_key) or []
    if peers and not any(peer_matches(p, policy_ns, other, model) for p in peers):
        return False
    ports = rule.get("ports") or []
    return not ports or any(port_matches(p, port, proto, dest) for p in ports)


def _selecting(model: PolicyModel, pod: Pod, direction: str) -> list[Mapping]:
    return [p for p in model.policies
            if _ns(p) == pod.namespace and direction in policy_types(p)
            and selector_matches((p.get("spec") or {}).get("podSelector"), pod.labels)]


def egress_allowed(model: PolicyModel, src: Pod | External, dst: Pod | External, port: int, proto: str) -> bool:
    if not isinstance(src, Pod):
        return True
    policies = _selecting(model, src, "Egress")
    if not policies:
        return True
    return any(rule_allows(r, "to", _ns(p), dst, port, proto, dst, model)
               for p in policies for r in (p["spec"].get("egress") or []))


def ingress_allowed(model: PolicyModel, src: Pod | External, dst: Pod | External, port: int, proto: str) -> bool:
    if not isinstance(dst, Pod):
        return True
    policies = _selecting(model, dst, "Ingress")
    if not policies:
        return True
    return any(rule_allows(r, "from", _ns(p), src, port, proto, dst, model)
               for p in policies for r in (p["spec"].get("ingress") or []))


def flow_allowed(model: PolicyModel, source: str, target: Target) -> bool:
    src, dst = model.endpoint(source), model.endpoint(target.id)
    return (egress_allowed(model, src, dst, target.port, target.proto)
            and ingress_allowed(model, src, dst, target.port, target.proto))


def expected_table(model: PolicyModel, sources: Iterable[str], targets: Iterable[Target]) -> TruthTable:
    """The truth table the policies imply: CONNECTED where allowed, BLOCKED where denied."""
    table = TruthTable(list(sources), list(targets))
    for s in table.sources:
        for t in table.targets:
            table.set(s, t, Expect.CONNECTED if flow_allowed(model, s, t) else Expect.BLOCKED)
    return table
