"""kube-proxy replacement: no kube-proxy DaemonSet, process or KUBE-SERVICES rules anywhere; Cilium says it replaces it.

Also reports every node's kernel: Cilium's eBPF datapath with kube-proxy replacement and BPF masquerading wants
5.10 or newer.
"""
from __future__ import annotations

from conformance.judge import kernel_at_least, kube_proxy_findings
from lab.cilium_status import cilium_kpr

RULES_SCRIPT = ("found=none; "
                "if command -v iptables-save >/dev/null 2>&1; then found=no; "
                "iptables-save 2>/dev/null | grep -q KUBE-SERVICES && found=yes; fi; "
                "if command -v nft >/dev/null 2>&1; then [ $found = none ] && found=no; "
                "nft list ruleset 2>/dev/null | grep -qE 'KUBE-SERVICES|table ip6? kube-proxy' && found=yes; fi; "
                "echo $found")


def test_no_kube_proxy_daemonset(kube):
    found = [f"{ds.metadata.namespace}/{ds.metadata.name}" for ds in kube.apps.list_daemon_set_for_all_namespaces().items
             if ds.metadata.name == "kube-proxy" or (ds.metadata.labels or {}).get("k8s-app") == "kube-proxy"]
    assert not found, (f"kube-proxy DaemonSet(s) present: {', '.join(found)}; with Cilium kube-proxy replacement "
                       "they must not exist (kubeadm init --skip-phases=addon/kube-proxy)")


def test_no_kube_proxy_process_or_rules(node_facts, measure):
    facts = node_facts.facts()
    host_rules = {}
    for node in facts:
        res = node_facts.host(node, RULES_SCRIPT)  # the node's own iptables/nft (the probe image has neither)
        word = res.stdout.strip()
        host_rules[node] = {"yes": True, "no": False}.get(word)
    findings = kube_proxy_findings(facts, host_rules)
    measure("nodes", len(facts))
    assert not findings, "kube-proxy is not fully replaced:\n  " + "\n  ".join(findings)


def test_kernels_support_the_ebpf_datapath(node_facts, measure):
    kernels = {node: f.get("kernel") for node, f in node_facts.facts().items()}
    measure("kernels", kernels)
    old = {n: k for n, k in kernels.items() if not kernel_at_least(k)}
    assert not old, f"kernel older than 5.10 on {old}: Cilium kube-proxy replacement with BPF masquerading needs 5.10+"


def test_cilium_reports_kube_proxy_replacement(kube, session, measure):
    agents = kube.core.list_namespaced_pod("kube-system", label_selector="k8s-app=cilium").items
    assert agents, "no Cilium agent pods (kube-system, k8s-app=cilium): is Cilium the CNI?"
    problems = []
    for pod in agents:
        res = session.exec("kube-system", pod.metadata.name, ["cilium-dbg", "status"], 60, container="cilium-agent")
        active, value = cilium_kpr(res.stdout)
        if res.rc != 0 or not active:
            problems.append(f"{pod.spec.node_name}: KubeProxyReplacement {value} (exit {res.rc})")
    measure("agents", len(agents))
    assert not problems, "Cilium does not report kube-proxy replacement active:\n  " + "\n  ".join(problems)
