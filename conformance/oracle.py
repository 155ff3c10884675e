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

Nodes as peers (kubelet 10250, API server 6443, etcd 2379, SSH 22; node -> pod; hostNetwork pods):

* NetworkPolicy selects pods, never nodes: traffic INTO a node (or a hostNetwork pod) is not policed, and traffic
  FROM a node or a hostNetwork pod is not egress-isolated. pod/namespace selectors never match node traffic (a
  hostNetwork pod shares its node's address and, in Cilium, its node's identity).
* "When a pod is isolated for ingress, the only allowed connections into the pod are those from the pod's node
  and those allowed by the ingress list" (the NetworkPolicy concept page): the pod's own node always gets in
  (``local_node_always_allowed``; Cilium: the ``host`` identity, allow-localhost=auto).
* Whether ipBlock matches node addresses is implementation-defined, like pod IPs. Cilium gives node addresses the
  ``host``/``remote-node`` identities, which ipBlock (a CIDR selector) does not select unless
  ``policy-cidr-match-mode: nodes`` is set; so the model's default is ``ipblock_matches_nodes=False``: a pod under
  default-deny egress cannot reach kubelet/API server/etcd/SSH through an ipBlock allow, and a remote node cannot
  reach a pod isolated for ingress through one.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from conformance.expect import Expect, Target, TruthTable, cell_id
from conformance.policies import NAME_LABEL


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = ""
    named_ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # name -> (port, protocol)
    node: str = ""              # where it runs: labels cells same-node / cross-node
    host_network: bool = False  # shares its node's network namespace: node traffic, not a policed pod

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


@dataclass(frozen=True)
class Node:
    """A cluster node as a peer: a target (kubelet, SSH; API server and etcd on control-plane nodes) and a source."""

    name: str
    ip: str
    control_plane: bool = False

    @property
    def id(self) -> str:
        return f"node/{self.name}"


#: Ports every node listens on, and those only control-plane nodes listen on (kubeadm's static pods).
NODE_PORTS = {"ssh": 22, "kubelet": 10250}
CONTROL_PLANE_PORTS = {"apiserver": 6443, "etcd": 2379}


def node_targets(nodes: Iterable[Node]) -> list[Target]:
    """Truth-table targets on nodes: SSH and kubelet everywhere, API server and etcd where they listen (a
    worker's 6443 would be ``refused``, which says nothing about policy)."""
    out = []
    for node in nodes:
        ports = dict(NODE_PORTS, **(CONTROL_PLANE_PORTS if node.control_plane else {}))
        out += [Target(node.id, port) for port in sorted(ports.values())]
    return out


class PolicyModel:
    """What the oracle needs to know: namespaces with labels, pods, outside hosts, nodes, the policies, and what the
    CNI does where the API leaves it open (ipBlock on pod and node addresses)."""

    def __init__(self, namespaces: Mapping[str, Mapping[str, str]], pods: Iterable[Pod],
                 externals: Iterable[External] = (), policies: Iterable[Mapping] = (),
                 ipblock_matches_pods: bool = False, nodes: Iterable[Node] = (),
                 ipblock_matches_nodes: bool = False, local_node_always_allowed: bool = True):
        self.namespaces = {ns: {**labels, NAME_LABEL: ns} for ns, labels in namespaces.items()}
        self.pods = {p.id: p for p in pods}
        for pod in self.pods.values():
            self.namespaces.setdefault(pod.namespace, {NAME_LABEL: pod.namespace})
        self.externals = {e.id: e for e in externals}
        self.nodes = {n.id: n for n in nodes}
        self.policies = [dict(p) for p in policies]
        self.ipblock_matches_pods = ipblock_matches_pods
        self.ipblock_matches_nodes = ipblock_matches_nodes
        self.local_node_always_allowed = local_node_always_allowed

    def endpoint(self, ident: str) -> Pod | External | Node:
        for group in (self.pods, self.externals, self.nodes):
            if ident in group:
                return group[ident]
        raise KeyError(f"{ident} is neither a pod, an outside host nor a node of this model")


def is_node_traffic(end) -> bool:
    """A node, or a hostNetwork pod (its node's address and identity)."""
    return isinstance(end, Node) or (isinstance(end, Pod) and end.host_network)


def is_policed_pod(end) -> bool:
    return isinstance(end, Pod) and not end.host_network


def node_of(end) -> str | None:
    if isinstance(end, Node):
        return end.name
    if isinstance(end, Pod):
        return end.node or None
    return None


SAME_NODE, CROSS_NODE, OUTSIDE, UNKNOWN = "same-node", "cross-node", "outside", "unknown"
#: A Service target whose backends run on the source's node and on others: the datapath picks one per flow.
EITHER = "same-node or cross-node (Service)"


def placement(model: PolicyModel, source: str, target: Target | str) -> str:
    """same-node / cross-node from where both ends run; outside for a host outside the cluster; unknown when a
    pod's node is not known (a check must pin pods so that both kinds are present)."""
    src = model.endpoint(source)
    dst = model.endpoint(target.id if isinstance(target, Target) else target)
    if isinstance(src, External) or isinstance(dst, External):
        return OUTSIDE
    a, b = node_of(src), node_of(dst)
    if not a or not b:
        return UNKNOWN
    return SAME_NODE if a == b else CROSS_NODE


def service_placement(source_node: str | None, backend_nodes: Iterable[str]) -> str:
    """A flow to a Service (kube-dns): same-node when every backend runs on the source's node, cross-node when
    none does, else EITHER."""
    backends = set(backend_nodes)
    if not source_node or not backends:
        return UNKNOWN
    if backends == {source_node}:
        return SAME_NODE
    return CROSS_NODE if source_node not in backends else EITHER


def placements(model: PolicyModel, table: TruthTable) -> dict[str, str]:
    """Cell id -> placement, for every cell of the table."""
    return {cell_id(s, t): placement(model, s, t) for s in table.sources for t in table.targets}


def indistinct_externals(model: PolicyModel) -> list[str]:
    """Outside hosts sharing an address: an ipBlock (with ``except``) cannot tell them apart, so a table with them
    cannot show an egress allow-list working. One message per shared address; empty when all are distinct."""
    by_ip: dict[str, list[str]] = {}
    for ext in model.externals.values():
        by_ip.setdefault(ext.ip, []).append(ext.id)
    return [f"{', '.join(sorted(ids))} share {ip}: give each outside target its own address"
            for ip, ids in sorted(by_ip.items()) if len(ids) > 1]


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


def peer_matches(peer: Mapping, policy_ns: str, other: Pod | External | Node, model: PolicyModel) -> bool:
    if "ipBlock" in peer:
        if is_node_traffic(other):
            if not model.ipblock_matches_nodes:
                return False
        elif isinstance(other, Pod) and not model.ipblock_matches_pods:
            return False
        return _in_ipblock(peer["ipBlock"], other.ip)
    if not is_policed_pod(other):
        return False  # pod/namespace selectors select pods only (never nodes or hostNetwork pods)
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], model.namespaces.get(other.namespace, {})):
            return False
    elif other.namespace != policy_ns:
        return False
    if "podSelector" in peer:
        return selector_matches(peer["podSelector"], other.labels)
    return True


def port_matches(rule_port: Mapping, port: int, proto: str, dest: Pod | External | Node) -> bool:
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


def rule_allows(rule: Mapping, peers_key: str, policy_ns: str, other: Pod | External | Node, port: int, proto: str,
                dest: Pod | External | Node, model: PolicyModel) -> bool:
    peers = rule.get(peers_key) or []
    if peers and not any(peer_matches(p, policy_ns, other, model) for p in peers):
        return False
    ports = rule.get("ports") or []
    return not ports or any(port_matches(p, port, proto, dest) for p in ports)


def _selecting(model: PolicyModel, pod: Pod, direction: str) -> list[Mapping]:
    return [p for p in model.policies
            if _ns(p) == pod.namespace and direction in policy_types(p)
            and selector_matches((p.get("spec") or {}).get("podSelector"), pod.labels)]


def egress_allowed(model: PolicyModel, src, dst, port: int, proto: str) -> bool:
    if not is_policed_pod(src):
        return True
    policies = _selecting(model, src, "Egress")
    if not policies:
        return True
    return any(rule_allows(r, "to", _ns(p), dst, port, proto, dst, model)
               for p in policies for r in (p["spec"].get("egress") or []))


def ingress_allowed(model: PolicyModel, src, dst, port: int, proto: str) -> bool:
    if not is_policed_pod(dst):
        return True
    if model.local_node_always_allowed and is_node_traffic(src) and dst.node and node_of(src) == dst.node:
        return True  # "the only allowed connections into the pod are those from the pod's node and ..."
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
