"""MetalLB layer 2, observed directly: who answers ARP for a LoadBalancer VIP, judged against MetalLB's own claim.

Inputs, each as the cluster or the probe gives it:

* ``arp``: the JSON of ``netprobe arp --iface IF --ip VIP`` run on the runner (outside the cluster, on the lab's L2):
  every responder's MAC from a raw socket, so two nodes answering for one VIP are seen (the neighbour table keeps
  one entry and hides the second).
* ``statuses``: ``servicel2statuses.metallb.io`` objects (v1beta1; ``status.node``, ``status.serviceName``,
  ``status.serviceNamespace``, ``status.interfaces[].name``), as the API returns them. The speaker that announces a
  Service creates one for it.
* ``node_macs``: node -> the MAC of the link holding its InternalIP (``lab_link_macs`` over netprobe facts).
* ``node_labels``: node -> labels. kubeadm labels control-plane nodes ``node.kubernetes.io/exclude-from-external-
  load-balancers``; MetalLB's speaker never announces from a node carrying it.
* ``endpoint_nodes``: nodes holding a ready endpoint of the Service (EndpointSlices); with
  ``externalTrafficPolicy: Local`` MetalLB announces only from those.

Everything here is pure: the check (conformance/test_l2_announce.py) collects
the inputs and asserts ``not problems``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping

EXCLUDE_LB_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


class L2Finding(str, enum.Enum):
    """What is wrong with one VIP's announcement (named, never a bare boolean)."""

    PROBE_FAILED = "probe_failed"              # netprobe arp could not run (no CAP_NET_RAW, no such link)
    NO_ANNOUNCER = "no_announcer"              # nobody answers ARP for the VIP
    SEVERAL_ANNOUNCERS = "several_announcers"  # two or more MACs answer: split brain or an address conflict
    NOT_A_NODE = "not_a_node"                  # the answering MAC belongs to no node
    NO_STATUS = "no_status"                    # no ServiceL2Status for the Service
    SEVERAL_STATUSES = "several_statuses"      # more than one node claims the Service in ServiceL2Status
    STATUS_MISMATCH = "status_mismatch"        # ARP says node X, ServiceL2Status says node Y
    EXCLUDED_NODE = "excluded_node"            # the announcer carries the exclude-from-external-LB label
    NO_LOCAL_ENDPOINT = "no_local_endpoint"    # ETP Local, but the announcer holds no endpoint


@dataclass
class L2Judgement:
    vip: str
    service: str                        # "namespace/name"
    announcer: str | None               # the node whose MAC answered, when exactly one node did
    arp_macs: list[str]
    status_nodes: list[str]
    problems: list[tuple[L2Finding, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def messages(self) -> list[str]:
        return [f"{self.service} {self.vip}: {text}" for _, text in self.problems]


def norm_mac(mac: str) -> str:
    return str(mac).strip().lower()


def mac_owners(node_macs: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """MAC -> node. A MAC on two nodes (cloned VMs) is an error of the lab: raise naming both."""
    owners: dict[str, str] = {}
    for node, macs in sorted(node_macs.items()):
        for mac in {norm_mac(m) for m in macs if m}:
            if mac in owners and owners[mac] != node:
                raise ValueError(f"MAC {mac} is on nodes {owners[mac]} and {node}: cloned VMs? "
                                 "ARP replies cannot be mapped to a node")
            owners[mac] = node
    return owners


def status_nodes_for(statuses: Iterable[Mapping], namespace: str, name: str) -> list[str]:
    """Nodes named by the ServiceL2Status objects of one Service (sorted, duplicates kept once)."""
    nodes = set()
    for obj in statuses:
        status = obj.get("status") or {}
        if status.get("serviceNamespace") == namespace and status.get("serviceName") == name and status.get("node"):
            nodes.add(status["node"])
    return sorted(nodes)


def judge_announcement(arp: Mapping, statuses: Iterable[Mapping], node_macs: Mapping[str, Iterable[str]],
                       node_labels: Mapping[str, Mapping[str, str]], service: str,
                       traffic_policy: str = "Cluster", endpoint_nodes: Iterable[str] = ()) -> L2Judgement:
    """One VIP's announcement: exactly one node answers ARP, it is the node ServiceL2Status names, it may announce
    (no exclusion label) and, with ``externalTrafficPolicy: Local``, it holds an endpoint."""
    namespace, _, name = service.partition("/")
    vip = str(arp.get("ip", "?"))
    claimed = status_nodes_for(statuses, namespace, name)
    if "error" in arp:
        j = L2Judgement(vip, service, None, [], claimed)
        j.problems.append((L2Finding.PROBE_FAILED, f"netprobe arp could not run: {arp['error']}"))
        return j
    macs = sorted({norm_mac(m) for m in arp.get("macs") or []})
    owners = mac_owners(node_macs)
    answering = sorted({owners[m] for m in macs if m in owners})
    j = L2Judgement(vip, service, answering[0] if len(macs) == 1 and answering else None, macs, claimed)
    _judge_arp(j, macs, owners, arp)
    _judge_status(j, claimed)
    if j.announcer:
        _judge_node(j, node_labels.get(j.announcer) or {}, traffic_policy, set(endpoint_nodes))
    return j


def _who(mac: str, owners: Mapping[str, str]) -> str:
    return f"{mac} ({owners[mac]})" if mac in owners else f"{mac} (no node)"


def _judge_arp(j: L2Judgement, macs: list[str], owners: Mapping[str, str], arp: Mapping) -> None:
    if not macs:
        j.problems.append((L2Finding.NO_ANNOUNCER, f"no ARP reply in {arp.get('window_s', '?')} s to "
                           f"{arp.get('requests_sent', '?')} who-has requests on {arp.get('iface', '?')}: no "
                           "speaker announces it (no L2Advertisement for the pool? speakers not running?)"))
        return
    if len(macs) > 1:
        j.problems.append((L2Finding.SEVERAL_ANNOUNCERS, "answered by " + ", ".join(_who(m, owners) for m in macs)
                           + ": more than one host claims the VIP (speakers split by a memberlist partition, or "
                             "an address conflict)"))
    for mac in macs:
        if mac not in owners:
            j.problems.append((L2Finding.NOT_A_NODE, f"answered by MAC {mac}, which is on no node: another host "
                                                     "uses the VIP (a pool that overlaps static addresses?)"))


def _judge_status(j: L2Judgement, claimed: list[str]) -> None:
    if not claimed:
        j.problems.append((L2Finding.NO_STATUS, "no ServiceL2Status names a node for it (MetalLB did not record "
                                                "an announcement)"))
    elif len(claimed) > 1:
        j.problems.append((L2Finding.SEVERAL_STATUSES, "ServiceL2Status names several nodes: " + ", ".join(claimed)))
    elif j.announcer and claimed[0] != j.announcer:
        j.problems.append((L2Finding.STATUS_MISMATCH, f"ARP is answered by {j.announcer} but ServiceL2Status "
                                                      f"names {claimed[0]}"))


def _judge_node(j: L2Judgement, labels: Mapping[str, str], traffic_policy: str, endpoint_nodes: set[str]) -> None:
    if EXCLUDE_LB_LABEL in labels:
        j.problems.append((L2Finding.EXCLUDED_NODE, f"announced from {j.announcer}, which is labelled "
                                                    f"{EXCLUDE_LB_LABEL} (MetalLB must not announce from it)"))
    if traffic_policy == "Local" and j.announcer not in endpoint_nodes:
        have = ", ".join(sorted(endpoint_nodes)) or "none"
        j.problems.append((L2Finding.NO_LOCAL_ENDPOINT, f"externalTrafficPolicy Local, announced from "
                                                        f"{j.announcer}, which holds no endpoint (endpoints on: "
                                                        f"{have}): traffic arriving there is dropped"))


def lab_link_macs(facts: Mapping[str, Mapping], internal_ips: Mapping[str, str]) -> tuple[dict[str, list[str]],
                                                                                          list[str]]:
    """({node: [MAC of the link holding its InternalIP]}, problems) from ``netprobe facts`` run on each node
    (``interfaces[].ipv4`` and ``.mac``): the MAC that answers ARP on the lab network. A node whose facts name no
    link with that address, or whose address dump failed, is a problem (the caller reports it as not measured):
    guessing from every link's MAC would let a bridge or a veth stand in for the node."""
    import ipaddress
    found, problems = {}, []
    for node, ip in sorted(internal_ips.items()):
        doc = facts.get(node)
        if doc is None:
            problems.append(f"{node}: no netprobe facts")
            continue
        links = doc.get("interfaces") or []
        if any(link.get("ipv4") is None for link in links):
            errors = "; ".join(e.get("error", "") for e in doc.get("errors") or [] if e.get("what") == "interfaces.ipv4")
            problems.append(f"{node}: netprobe facts could not list IPv4 addresses ({errors or 'no reason given'})")
            continue
        holders = [link for link in links
                   if any(str(ipaddress.ip_interface(a).ip) == ip for a in link.get("ipv4") or [])]
        macs = sorted({norm_mac(link["mac"]) for link in holders if link.get("mac")})
        if not macs:
            problems.append(f"{node}: no link holds its InternalIP {ip} (links: "
                            + ", ".join(f"{link.get('name')} {link.get('ipv4')}" for link in links) + ")")
            continue
        found[node] = macs
    return found, problems


def endpoint_nodes(slices) -> list[str]:
    """Nodes holding a ready endpoint, from EndpointSlices (kubernetes client V1EndpointSlice objects): an
    endpoint whose ``conditions.ready`` is unset counts as ready (the API's documented default)."""
    nodes = set()
    for eps in slices:
        for ep in getattr(eps, "endpoints", None) or []:
            ready = getattr(getattr(ep, "conditions", None), "ready", None)
            if ready is not False and getattr(ep, "node_name", None):
                nodes.add(ep.node_name)
    return sorted(nodes)


def ready_nodes(nodes) -> list[str]:
    """Names of Node objects (kubernetes client V1Node) whose Ready condition is True."""
    return sorted(n.metadata.name for n in nodes
                  if any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or [])))


# ---------------------------------------------------------------------------------------------- failover


def may_announce(node_labels: Mapping[str, Mapping[str, str]], ready_nodes: Iterable[str],
                 traffic_policy: str = "Cluster", endpoint_nodes: Iterable[str] = (),
                 speaker_nodes: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(nodes that may announce the Service, {other node: why not}). A node may announce when it is Ready, has no
    exclusion label, runs a speaker (when ``speaker_nodes`` is known) and, for ETP Local, holds an endpoint."""
    ready, endpoints = set(ready_nodes), set(endpoint_nodes)
    speakers = None if speaker_nodes is None else set(speaker_nodes)
    eligible, why_not = [], {}
    for node in sorted(node_labels):
        if node not in ready:
            why_not[node] = "not Ready"
        elif EXCLUDE_LB_LABEL in (node_labels[node] or {}):
            why_not[node] = f"labelled {EXCLUDE_LB_LABEL}"
        elif speakers is not None and node not in speakers:
            why_not[node] = "no MetalLB speaker running"
        elif traffic_policy == "Local" and node not in endpoints:
            why_not[node] = "holds no endpoint (externalTrafficPolicy Local)"
        else:
            eligible.append(node)
    return eligible, why_not


def failover_skip_reason(eligible: list[str], why_not: Mapping[str, str]) -> str | None:
    """None when failover can be tested (two or more nodes may announce), else the reason to skip, naming every
    node that may not and why."""
    if len(eligible) >= 2:
        return None
    others = "; ".join(f"{n}: {r}" for n, r in sorted(why_not.items())) or "no other nodes"
    return (f"failover needs two nodes that may announce the VIP; {len(eligible)} may "
            f"({', '.join(eligible) or 'none'}); the others may not ({others})")
