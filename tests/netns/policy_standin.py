"""The default-deny world of conformance/world.py on real kernels, with nftables standing in for Cilium's policy.

Layout (topo.build_cilium plus four pods): three namespaces with two pods each, one on each node --
a/frontend-{0,1}, b/backend-{0,1}, c/client-{0,1} (every pod serves 8080 and 9090, TCP and UDP, and declares the
named port http = 8080/TCP); node1 a control plane (SSH 22, etcd 2379, API server 6443, kubelet 10250 served in
its namespace on its node address), node2 a worker (22, 10250); node1 and node2 themselves as node sources (the
hostNetwork probe: uid 0 in the node's namespace); the runner serves ext/web at 10.201.0.100 and ext/c2 at
10.201.100.66 (a /32 on its loopback; the nodes route to it through the runner). Pods probe as in a pod
(podrun.pod_probe, uid 65534).

The stand-in CNI compiles a PolicyModel into nftables drops in each node's prerouting hook: a cell whose egress is
denied is dropped on the source's node as it comes out of the pod (``iifname "lxc*"``), a cell whose ingress is
denied on the destination's node whatever it came in on. A fault is a CNI that gets one thing wrong:

* ``cross-node``: ingress is enforced only for flows from the node's own pods (identity lost over the overlay);
* ``no-except``: an ipBlock's ``except`` is ignored;
* ``unnamed-ports``: named ports are not resolved (a rule naming ``http`` matches nothing);
* ``ipblock-nodes``: ipBlock selects node addresses (Cilium with policy-cidr-match-mode: nodes).

The CHECK is unchanged: the same World, the same expected table (the oracle with its stated Cilium defaults), the
same observation and runner (conformance.check.run_policy_check).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import topo
from podrun import node_probe, pod_probe

from conformance import kube as k8s
from conformance.check import CheckResult, NoBarrier, run_policy_check
from conformance.oracle import External, Node, Pod, PolicyModel, egress_allowed, ingress_allowed, node_of
from conformance.world import EXTERNAL_PORTS, NAMED_PORTS, PORTS, World

C2 = "10.201.100.66"
ROLES = {"frontend": "a", "backend": "b", "client": "c"}
NODE_PORTS = {1: "22,2379,6443,10250", 2: "22,10250"}


@dataclass
class StandIn:
    c: topo.Cilium
    world: World
    node_ns: dict[str, str]  # node name -> namespace
    node_addrs: dict[str, list[str]]  # node name -> every address its traffic may leave from


def build(lab: topo.Lab) -> StandIn:
    c = topo.build_cilium(lab, lb_vip=False)
    pods, handles = [], {}
    for k, (role, ns) in enumerate(ROLES.items()):
        for n in (1, 2):
            netns, ip = ((c.pod1, c.pod2)[n - 1], topo.CIL_POD[n]) if k == 0 else topo.add_cilium_pod(c, n, k)
            pod = Pod(ns, "%s-%d" % (role, n - 1), {"app": role}, ip, NAMED_PORTS, node="node%d" % n)
            pods.append(pod)
            handles[pod.id] = (netns, pod_probe)
            lab.serve(netns, tcp=",".join(map(str, PORTS)), udp=",".join(map(str, PORTS)))
    node_ns = {"node1": c.node1, "node2": c.node2}
    for n, node in ((1, c.node1), (2, c.node2)):
        for conf in ("all", "lan0", "ov0"):  # node -> remote node answers come back over the overlay
            lab.sysctl(node, "net.ipv4.conf.%s.rp_filter" % conf, 0)
        lab.ip(node, "route", "add", "default", "via", topo.CIL_RUNNER, "dev", "lan0")
        lab.serve(node, tcp=NODE_PORTS[n], bind=topo.CIL_NODE[n])
        handles["node/node%d" % n] = (node, node_probe)
    lab.ip(c.runner, "addr", "add", C2 + "/32", "dev", "lo")
    for n in (1, 2):
        lab.ip(c.runner, "route", "add", "10.201.%d.0/24" % n, "via", topo.CIL_NODE[n])
    for name, ip in (("web", topo.CIL_RUNNER), ("c2", C2)):
        port = str(EXTERNAL_PORTS[name])
        lab.serve(c.runner, tcp=port, udp=port, bind=ip)
    nodes = [Node("node1", topo.CIL_NODE[1], control_plane=True), Node("node2", topo.CIL_NODE[2])]
    world = World(dict(ROLES), {ns: {} for ns in ROLES.values()}, pods, nodes, nodes,
                  [External("web", topo.CIL_RUNNER), External("c2", C2)], handles)
    addrs = {"node%d" % n: [topo.CIL_NODE[n], "10.201.254.%d" % n, topo.CIL_ROUTER[n]] for n in (1, 2)}
    return StandIn(c, world, node_ns, addrs)


# ---------------------------------------------------------------------------------------------- the stand-in CNI


def cni_model(world: World, manifests: list[dict], fault: str | None) -> PolicyModel:
    """What the stand-in CNI believes: the oracle's model, bent by the fault."""
    if fault == "no-except":
        manifests = [_without_except(m) for m in manifests]
    pods = [replace(p, named_ports={}) for p in world.pods] if fault == "unnamed-ports" else world.pods
    return PolicyModel(world.namespaces, pods, world.externals, manifests, nodes=world.nodes,
                       ipblock_matches_nodes=fault == "ipblock-nodes")


def _without_except(manifest: dict) -> dict:
    spec = dict(manifest.get("spec") or {})
    spec["egress"] = [{**rule, "to": [{**peer, "ipBlock": {"cidr": peer["ipBlock"]["cidr"]}} if "ipBlock" in peer
                                      else peer for peer in rule.get("to") or []]}
                      for rule in spec.get("egress") or []]
    return {**manifest, "spec": spec}


def compile_rules(sw: StandIn, manifests: list[dict], fault: str | None) -> dict[str, list[str]]:
    """node -> nftables rules (prerouting) dropping every probed cell the stand-in CNI denies."""
    world, model = sw.world, cni_model(sw.world, manifests, fault)
    rules: dict[str, list[str]] = {name: [] for name in sw.node_ns}
    if not manifests:
        return rules
    for s in world.sources:
        src = model.endpoint(s)
        for t in world.targets:
            if not world.probed(s, t):
                continue
            dst = model.endpoint(t.id)
            match = "ip daddr %s %s dport %d drop" % (dst.ip, t.proto.lower(), t.port)
            if not egress_allowed(model, src, dst, t.port, t.proto):
                rules[node_of(src)].append('iifname "lxc*" ip saddr %s %s' % (src.ip, match))
            elif not ingress_allowed(model, src, dst, t.port, t.proto):
                if fault == "cross-node" and node_of(src) != node_of(dst):
                    continue  # the destination cannot tell who sent a flow that came over the overlay
                saddrs = sw.node_addrs[src.name] if isinstance(src, Node) else [src.ip]
                rules[node_of(dst)].append("ip saddr { %s } %s" % (", ".join(saddrs), match))
    return rules


NETPOL = "table inet netpol {\n chain pre {\n  type filter hook prerouting priority 0;\n  %s\n }\n}\n"


def enforce(sw: StandIn, manifests: list[dict], fault: str | None) -> int:
    for node, rules in compile_rules(sw, manifests, fault).items():
        ns = sw.node_ns[node]
        topo.sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "netpol", check=False)
        if rules:
            sw.c.lab.nft(ns, NETPOL % "\n  ".join(rules))
    return len(manifests)


# ---------------------------------------------------------------------------------------------- the check's run


def observe(sw: StandIn):
    """One complete observation: every source probes its targets at the same time, as in the check."""
    def probe(source):
        ns, run = sw.world.handles[source]
        return source, run(sw.c.lab, ns, *sw.world.connect_args(source, 1, "--udp-tries", "2"))

    return sw.world.observed(dict(k8s.in_parallel([lambda s=s: probe(s) for s in sw.world.sources])))


def run_step(sw: StandIn, name: str, manifests: list[dict], fault: str | None = None,
             seconds: float = 8) -> CheckResult:
    """conformance.check.run_policy_check, the check's own runner, on the world's own check."""
    return run_policy_check(sw.world.check(name, manifests), lambda m: enforce(sw, m, fault), lambda: observe(sw),
                            NoBarrier("no Cilium in a netns"), None, seconds=seconds, consecutive=2, interval=0.2,
                            transport_errors=(AssertionError,))
