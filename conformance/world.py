"""The default-deny world as data: who probes what, what the oracle expects, and the policy steps.

``conformance/test_default_deny.py`` builds a :class:`World` from a cluster (two probe pods per namespace pinned to
two nodes, a hostNetwork probe pod per pinned node, every node, kube-dns, two outside hosts served by the runner);
``tests/netns/test_fault_matrix.py`` builds the same world in network namespaces. Both then use the same functions:
the targets and the address each one is probed at, the expected table (the oracle, every cell labelled
same-node / cross-node / outside), the netprobe arguments, the observed table and the policies of each step.

Cells:
* every probe pod probes every other probe pod (2 ports x TCP/UDP), kube-dns (a real DNS query), the outside hosts
  and every node's SSH 22 and kubelet 10250, plus API server 6443 and etcd 2379 on control planes. Node ports are
  TCP connect probes only: netprobe sends nothing on TCP, it only waits for a greeting line.
* a node (its hostNetwork probe pod) probes the probe pods only: a node reaching another node's SSH is no policy
  question, NetworkPolicy never polices traffic into nodes.
* a pod probing itself is no policy question (the flow never leaves the pod's network namespace).
With two pods per namespace on two nodes, every pair of namespaces (and node -> namespace, pod -> node) has
same-node and cross-node cells; within a namespace the other pod is on the other node (cross-node only).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from conformance import policies
from conformance.check import FlowKey, PolicyCheck
from conformance.expect import Target, TruthTable, observed_table
from conformance.oracle import (CROSS_NODE, SAME_NODE, External, Node, Pod, PolicyModel, expected_table,
                                indistinct_externals, node_of, node_targets, placement, service_placement)

ROLES = ("frontend", "backend", "client")  # one namespace each: frontend and backend protected, client open
PROTECTED_ROLES = ("frontend", "backend")
PODS_PER_NAMESPACE = 2
PORTS = (8080, 9090)
ALLOWED_PORT = 8080
NAMED_PORTS = {"http": (ALLOWED_PORT, "TCP")}  # every probe pod's container declares it; step 3 uses the name
EXTERNAL_PORTS = {"web": 18080, "c2": 18081}  # "the Internet" and "a command-and-control server", on the runner
DNS_ID = "kube-system/kube-dns"


@dataclass(frozen=True)
class Dns:
    """kube-dns as a target: probed at its Service address; policies select its backends' labels."""

    pod: Pod                      # namespace and labels of a backend
    service_ip: str
    backend_ips: frozenset
    backend_nodes: frozenset


@dataclass
class World:
    roles: dict[str, str]          # role -> namespace
    namespaces: dict[str, dict]    # namespace -> labels (the model's)
    pods: list[Pod]                # probe pods, each a source and a target (node and named ports set)
    nodes: list[Node]              # every node: targets
    node_sources: list[Node]       # nodes with a hostNetwork probe pod: sources
    externals: list[External]
    handles: dict[str, object]     # source id -> how to run a probe there (the builder's business)
    dns: Dns | None = None
    external_ports: dict = field(default_factory=lambda: dict(EXTERNAL_PORTS))
    notes: list[str] = field(default_factory=list)  # e.g. "one node: every cell is same-node"
    unavailable: dict[str, str] = field(default_factory=dict)  # a left-out target (ext/c2) -> why
    targets: list[Target] = field(init=False)
    address_of: dict[Target, str] = field(init=False)

    def __post_init__(self) -> None:
        shared = indistinct_externals(PolicyModel({}, [], self.externals))
        if shared:
            raise ValueError("; ".join(shared))
        self.targets, self.address_of = [], {}
        for pod in self.pods:
            for port in PORTS:
                for proto in ("TCP", "UDP"):
                    self._add(Target(pod.id, port, proto), f"{pod.ip}:{port}")
        if self.dns is not None:  # a real DNS query: netprobe connect .../dns and .../dns-tcp
            for proto, probe in (("UDP", "dns"), ("TCP", "dns-tcp")):
                self._add(Target(DNS_ID, 53, proto), f"{self.dns.service_ip}:53/{probe}")
        for ext in self.externals:
            port = self.external_ports[ext.name]
            for proto in ("TCP", "UDP"):
                self._add(Target(ext.id, port, proto), f"{ext.ip}:{port}")
        by_id = {n.id: n for n in self.nodes}
        for t in node_targets(self.nodes):
            self._add(t, f"{by_id[t.id].ip}:{t.port}")

    def _add(self, target: Target, address: str) -> None:
        self.targets.append(target)
        self.address_of[target] = address

    # ---- who probes what

    @property
    def protected(self) -> list[str]:
        return [self.roles[r] for r in PROTECTED_ROLES]

    @property
    def sources(self) -> list[str]:
        return [p.id for p in self.pods] + [n.id for n in self.node_sources]

    def external(self, name: str) -> External | None:
        return next((e for e in self.externals if e.name == name), None)

    def probed(self, source: str, target: Target) -> bool:
        if target.id == source:
            return False
        if source.startswith("node/"):
            return any(p.id == target.id for p in self.pods)
        return True

    def connect_args(self, source: str, timeout: float = 2, *extra: str, only: set | None = None) -> list[str]:
        """`netprobe connect` for every target ``source`` probes (``only``: those targets among them)."""
        args = ["connect", "--timeout", f"{timeout:g}", "--parallel", "64", *extra]
        for t in self.targets:
            if self.probed(source, t) and (only is None or t in only):
                to = self.address_of[t]
                args += ["--to", to if "/" in to else f"{to}/{t.proto.lower()}"]
        return args

    def observed(self, results: dict[str, list[dict]]) -> TruthTable:
        return observed_table(self.sources, self.targets, results, self.address_of)

    # ---- what the oracle expects

    def model(self, manifests: list[dict], **options) -> PolicyModel:
        pods = self.pods + ([self.dns.pod] if self.dns else [])
        return PolicyModel(self.namespaces, pods, self.externals, manifests, nodes=self.nodes, **options)

    def placement(self, model: PolicyModel, source: str, target: Target) -> str:
        if self.dns is not None and target.id == DNS_ID:
            return service_placement(node_of(model.endpoint(source)), self.dns.backend_nodes)
        return placement(model, source, target)

    def expected(self, manifests: list[dict], **options) -> TruthTable:
        """The oracle's table for these policies, probed cells only, each labelled with its placement."""
        model = self.model(manifests, **options)
        table = expected_table(model, self.sources, self.targets)
        for cell in [c for c in table.cells if not self.probed(*c)]:
            table.cells.pop(cell)
        table.labels = {(s, t): self.placement(model, s, t) for s, t in table.cells}
        return table

    def flow_keys(self) -> dict:
        """(source, target) -> FlowKey, for matching Hubble's drops to cells."""
        ip_of = {p.id: p.ip for p in self.pods} | {n.id: n.ip for n in self.nodes}
        ip_of |= {e.id: e.ip for e in self.externals}
        keys = {}
        for s in self.sources:
            for t in self.targets:
                if not self.probed(s, t):
                    continue
                dst = (frozenset({self.dns.service_ip}) | self.dns.backend_ips if t.id == DNS_ID
                       else frozenset([ip_of[t.id]]))
                keys[(s, t)] = FlowKey(ip_of[s], dst, t.port, t.proto)
        return keys

    def check(self, name: str, manifests: list[dict], **options) -> PolicyCheck:
        return PolicyCheck(name, self.sources, self.targets, manifests, self.expected(manifests, **options),
                           self.expected([], **options), self.flow_keys())


# ---------------------------------------------------------------------------------------------- placement


def pin_nodes(nodes: list[Node], count: int = PODS_PER_NAMESPACE) -> list[str]:
    """The node each pod of a namespace is pinned to: distinct nodes, workers first (then by name), so that both
    same-node and cross-node cells exist; one node only: every pod on it (cells same-node only)."""
    ranked = [n.name for n in sorted(nodes, key=lambda n: (n.control_plane, n.name))]
    if not ranked:
        raise ValueError("no nodes to pin probe pods to")
    return [ranked[i % len(ranked)] for i in range(count)]


def placement_counts(table: TruthTable) -> dict[str, int]:
    return dict(sorted(Counter(table.labels.get(c, "unlabelled") for c in table.cells).items()))


def pair_class(world: World, ident: str) -> str:
    """A cell end's class: the role of its namespace, "node", "ext" or "dns"."""
    if ident.startswith(("node/", "ext/")):
        return ident.split("/", 1)[0]
    if ident == DNS_ID:
        return "dns"
    return next(role for role, ns in world.roles.items() if ident.startswith(ns + "/"))


def placement_gaps(world: World, table: TruthTable) -> list[str]:
    """(source class, target class) pairs -- a class is a namespace's role or "node" -- that lack a same-node or a
    cross-node cell. Pairs within one namespace are cross-node only by construction and not listed."""
    seen: dict[tuple[str, str], set[str]] = {}
    for s, t in table.cells:
        a, b = pair_class(world, s), pair_class(world, t.id)
        if a != b and not {a, b} & {"ext", "dns"}:
            seen.setdefault((a, b), set()).add(table.labels.get((s, t), ""))
    return [f"{a}->{b}: no {kind} cell" for (a, b), kinds in sorted(seen.items())
            for kind in (SAME_NODE, CROSS_NODE) if kind not in kinds]


# ---------------------------------------------------------------------------------------------- the steps


def step2_policies(world: World) -> list[dict]:
    """Default deny, ingress and egress, in the protected namespaces."""
    return [policies.default_deny(ns) for ns in world.protected]


def step3_policies(world: World) -> list[dict]:
    """Step 2 + DNS egress + frontend -> backend on 8080/TCP: egress by number, ingress by the NAMED port `http`
    (resolved against the backend pods' container ports)."""
    fe, be = world.roles["frontend"], world.roles["backend"]
    return step2_policies(world) + [policies.allow_dns(ns) for ns in world.protected] + [
        policies.allow_egress_to(fe, "frontend-to-backend", {"app": "frontend"}, be, {"app": "backend"}, ALLOWED_PORT),
        policies.allow_ingress_from(be, "backend-from-frontend", {"app": "backend"}, fe, {"app": "frontend"},
                                    "http")]


def step4_policies(world: World) -> list[dict]:
    """Step 2 + DNS egress + an egress allow-list for the frontend namespace: ipBlock 0.0.0.0/0 except ext/c2's
    address. ext/web connects, ext/c2 does not; pods and nodes are not matched by ipBlock (Cilium's default)."""
    c2 = world.external("c2")
    if c2 is None:
        raise ValueError("step 4 needs ext/c2 at its own address")
    return step2_policies(world) + [policies.allow_dns(ns) for ns in world.protected] + [
        policies.allow_egress_cidr(world.roles["frontend"], "internet-except-c2", "0.0.0.0/0", [f"{c2.ip}/32"])]
