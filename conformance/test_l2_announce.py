"""MetalLB layer 2, observed directly: who answers ARP for a LoadBalancer VIP, asked by the runner on a raw socket
(`netprobe arp`: every responder's MAC, so two nodes answering for one VIP are caught; the neighbour table keeps
one), judged by conformance.l2.judge_announcement against MetalLB's own record (ServiceL2Status,
metallb.io/v1beta1), the MAC of each node's link holding its InternalIP (netprobe facts on the nodes), the
`node.kubernetes.io/exclude-from-external-load-balancers` label and, for externalTrafficPolicy Local, the nodes
holding a ready endpoint (EndpointSlices).

The runner needs CAP_NET_RAW (root in CI); without it the check is an error naming the capability, never a pass.
The runner's link toward the nodes is --runner-iface, else the link of this host's route to the first node.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kubernetes.client.rest import ApiException

from conformance import kube as k8s
from conformance.judge import NotMeasured
from conformance.l2 import (endpoint_nodes, judge_announcement, lab_link_macs, may_announce,
                            ready_nodes)
from lab.errors import WaitTimeout
from lab.wait import wait_for

pytestmark = pytest.mark.xdist_group("metallb")  # with the other LB checks: failover disturbs the speakers

HTTP_PORT = 8080
STATUS_GROUP, STATUS_VERSION, STATUS_PLURAL = "metallb.io", "v1beta1", "servicel2statuses"
#: netprobe arp's arguments after --iface/--ip: 3 who-has 0.2 s apart, replies collected for 2 s
ARP_ARGS = ("--count", "3", "--interval", "0.2", "--window", "2")


def runner_iface(settings, node_ip: str) -> str:
    """--runner-iface, else the device of this host's route to node_ip (`ip -j route get`)."""
    if settings.runner_iface:
        return settings.runner_iface
    res = subprocess.run(["ip", "-j", "route", "get", node_ip], capture_output=True, text=True, timeout=10)
    try:
        return json.loads(res.stdout)[0]["dev"]
    except (ValueError, IndexError, KeyError):
        raise NotMeasured(f"cannot tell this host's link toward {node_ip} (`ip -j route get` exit "
                          f"{res.returncode}: {res.stderr.strip()[:200]}); pass --runner-iface") from None


def arp_on_runner(iface: str, vip: str) -> dict:
    """`netprobe arp` on the runner; a probe that could not run (no CAP_NET_RAW, no such link) is NotMeasured."""
    res = subprocess.run([sys.executable, str(k8s.NETPROBE_SOURCE), "arp", "--iface", iface, "--ip", vip, *ARP_ARGS],
                         capture_output=True, text=True, timeout=60)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        raise NotMeasured(f"netprobe arp on the runner printed no JSON (exit {res.returncode}): "
                          f"{res.stderr.strip()[:300]}") from None
    if res.returncode != 0 or "error" in doc:
        raise NotMeasured(f"netprobe arp on the runner could not run (exit {res.returncode}): "
                          f"{doc.get('error') or res.stderr.strip()[:300]}")
    return doc


def service_l2_statuses(kube) -> list[dict]:
    try:
        return kube.custom.list_cluster_custom_object(STATUS_GROUP, STATUS_VERSION, STATUS_PLURAL)["items"]
    except ApiException as exc:
        raise NotMeasured(f"cannot list {STATUS_PLURAL}.{STATUS_GROUP}/{STATUS_VERSION}: {exc.status} {exc.reason} "
                          "(MetalLB older than v0.14, or not installed?)") from None


def node_lab_macs(node_facts, kube) -> dict[str, list[str]]:
    macs, problems = lab_link_macs(node_facts.facts(), k8s.node_addresses(kube))
    if problems:
        raise NotMeasured("node MACs on the lab network unknown:\n  " + "\n  ".join(problems))
    return macs


@pytest.fixture(scope="module")
def l2(session, kube, settings):
    """One HTTP backend on ONE node that may announce (a Ready node without the exclusion label), and two
    Services selecting it: Cluster and Local (MetalLB must announce Local only from that node)."""
    if not settings.lb_pool:
        pytest.skip("needs the MetalLB pool: pass --lab SPEC or --lb-pool CIDR|FIRST-LAST")
    nodes = kube.core.list_node().items
    labels = {n.metadata.name: dict(n.metadata.labels or {}) for n in nodes}
    eligible, why_not = may_announce(labels, ready_nodes(nodes))
    if not eligible:
        pytest.skip("no node may announce a LoadBalancer IP: " + "; ".join(f"{n}: {r}" for n, r in why_not.items()))
    backend_node = eligible[-1]
    ns = session.namespace("l2")
    spec = session.probe_pod_spec(node=backend_node)
    spec["containers"][0].update(command=["python3", k8s.NETPROBE, "serve", "--http", str(HTTP_PORT)],
                                 ports=[{"containerPort": HTTP_PORT, "name": "http"}])
    session.create_pod(ns, {"metadata": {"name": f"backend-{backend_node}"[:63],
                                         "labels": {"app": "l2-backend", k8s.OWNER_LABEL: "true"}}, "spec": spec})
    session.wait_pods_ready(ns, "app=l2-backend", 1, "HTTP backend")
    vips = {}
    for name, local in (("l2-cluster", False), ("l2-local", True)):
        kube.core.create_namespaced_service(ns, k8s.load_balancer_service(name, "l2-backend", HTTP_PORT,
                                                                          local=local))
        vips[name] = k8s.wait_ingress(kube, ns, name, settings.wait_seconds)
    return {"ns": ns, "vips": vips, "labels": labels, "backend_node": backend_node}


def observe(kube, node_facts, settings, l2, name: str) -> dict:
    """Everything judge_announcement needs, once MetalLB has recorded an announcement (or the wait ran out:
    then the judgement names what is missing)."""
    ns, vip = l2["ns"], l2["vips"][name]
    service = f"{ns}/{name}"

    def recorded():
        mine = [s for s in service_l2_statuses(kube)
                if (s.get("status") or {}).get("serviceNamespace") == ns
                and (s.get("status") or {}).get("serviceName") == name]
        return (True, mine) if mine else (False, f"no ServiceL2Status for {service} yet")
    try:
        wait_for(f"a ServiceL2Status for {service}", min(settings.wait_seconds, 60 * settings.time_scale), recorded,
                 interval=1.0)
    except WaitTimeout:
        pass  # judged below: NO_STATUS names it
    nodes = k8s.node_addresses(kube)
    iface = runner_iface(settings, nodes[sorted(nodes)[0]])
    arp = arp_on_runner(iface, vip)
    slices = kube.discovery.list_namespaced_endpoint_slice(
        ns, label_selector=f"kubernetes.io/service-name={name}").items
    return {"arp": arp, "statuses": service_l2_statuses(kube), "node_macs": node_lab_macs(node_facts, kube),
            "endpoint_nodes": endpoint_nodes(slices), "service": service, "iface": iface}


def _judge(seen: dict, labels: dict, policy: str, measure):
    j = judge_announcement(seen["arp"], seen["statuses"], seen["node_macs"], labels, seen["service"],
                           traffic_policy=policy, endpoint_nodes=seen["endpoint_nodes"])
    measure("announcer", j.announcer)
    measure("arp_macs", j.arp_macs)
    measure("status_nodes", j.status_nodes)
    measure("runner_iface", seen["iface"])
    assert j.ok, "MetalLB layer 2 announcement:\n  " + "\n  ".join(j.messages())


def test_l2_one_announcer_matches_servicel2status(l2, kube, node_facts, settings, measure):
    _judge(observe(kube, node_facts, settings, l2, "l2-cluster"), l2["labels"], "Cluster", measure)


def test_l2_local_announced_from_an_endpoint_node(l2, kube, node_facts, settings, measure):
    seen = observe(kube, node_facts, settings, l2, "l2-local")
    measure("endpoint_nodes", seen["endpoint_nodes"])
    _judge(seen, l2["labels"], "Local", measure)
