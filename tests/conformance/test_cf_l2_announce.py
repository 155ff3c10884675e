"""The L2 announcement checks (conformance/test_l2_announce.py) and the failover skip, end to end through
`pytest conformance` against the API double: nodes (cp1 labelled exclude-from-external-load-balancers), the facts
DaemonSet answering `netprobe facts` with each node's link and InternalIP, a Service controller stand-in giving the
Services an ingress IP and an EndpointSlice, ServiceL2Status objects (metallb.io/v1beta1), and the REAL
`netprobe arp` on this host (root) on a link where nobody answers, or on one that does not exist."""
from __future__ import annotations

import json

from apidouble.kubelet import NODES, run_suite

from conformance.l2 import EXCLUDE_LB_LABEL

VIPS = {"l2-cluster": "192.168.150.200", "l2-local": "192.168.150.201"}
MACS = {node: f"52:54:00:00:00:{i:02x}" for i, node in enumerate(sorted(NODES), 1)}


def cluster(double):
    double.get("nodes", "", "cp1")["metadata"]["labels"][EXCLUDE_LB_LABEL] = ""

    def service(api, svc):
        name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": VIPS[name]}]}}
        api.put("endpointslices", {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                                   "metadata": {"name": f"{name}-x", "namespace": ns,
                                                "labels": {"kubernetes.io/service-name": name}},
                                   "endpoints": [{"addresses": ["10.244.0.10"], "nodeName": "w2",
                                                  "conditions": {"ready": True}}]})
        api.put("servicel2statuses", {"apiVersion": "metallb.io/v1beta1", "kind": "ServiceL2Status",
                                      "metadata": {"name": f"l2-{name}", "namespace": "metallb-system"}, "spec": {},
                                      "status": {"node": "w2", "serviceName": name, "serviceNamespace": ns,
                                                 "interfaces": [{"name": "enp1s0"}]}})
    double.on_create("services", service)

    def facts(ns, pod, container, command):
        if command[-1:] != ["facts"]:
            return 127, b"", b"unexpected command\n"
        node = pod.rsplit("-", 1)[1]
        doc = {"interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "ipv4": ["127.0.0.1/8"]},
                              {"name": "enp1s0", "mac": MACS[node], "ipv4": [f"{NODES[node]}/24"]}], "errors": []}
        return 0, json.dumps(doc).encode(), b""
    double.exec_handler = facts


def run(kubeconfig, tmp_path, *extra):
    proc = run_suite(["conformance/test_l2_announce.py", "--kubeconfig", kubeconfig, "--lb-pool",
                      "192.168.150.200-192.168.150.210", "--results-dir", str(tmp_path / "r"), *extra], tmp_path)
    out, _ = proc.communicate(timeout=120)
    checks = {c["check"]: c for c in json.loads((tmp_path / "r" / "conformance-latest.json").read_text())["checks"]}
    return out, checks


def test_nobody_answering_on_the_runners_link_fails_naming_it(double, kubeconfig, kubelet, tmp_path):
    cluster(double)
    out, checks = run(kubeconfig, tmp_path, "--runner-iface", "lo")
    for name in ("test_l2_one_announcer_matches_servicel2status", "test_l2_local_announced_from_an_endpoint_node"):
        assert checks[name]["verdict"] == "fail", out
        assert "no ARP reply in 2.0 s to 3 who-has requests on lo" in checks[name]["message"], out
        assert checks[name]["measured"]["status_nodes"] == ["w2"]  # MetalLB's record was read
    assert double.list("namespaces") == []  # cleaned up


def test_arp_that_cannot_run_is_an_error_not_a_verdict(double, kubeconfig, kubelet, tmp_path):
    cluster(double)
    out, checks = run(kubeconfig, tmp_path, "--runner-iface", "t13nolink0")
    check = checks["test_l2_one_announcer_matches_servicel2status"]
    assert check["verdict"] == "error", out
    assert "netprobe arp on the runner could not run (exit 1): no interface 't13nolink0' here" in check["message"]


def test_failover_skips_with_the_reason_when_one_node_may_announce(double, kubeconfig):
    from conformance import kube as k8s
    from conformance.l2 import failover_skip_reason
    from conformance.test_loadbalancer import eligible_announcers
    double.get("nodes", "", "cp1")["metadata"]["labels"][EXCLUDE_LB_LABEL] = ""
    double.get("nodes", "", "w2")["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    reason = failover_skip_reason(*eligible_announcers(k8s.connect(kubeconfig)))
    assert reason == (f"failover needs two nodes that may announce the VIP; 1 may (w1); the others may not "
                      f"(cp1: labelled {EXCLUDE_LB_LABEL}; w2: not Ready)")
