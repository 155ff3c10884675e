"""kube-proxy replacement: no kube-proxy DaemonSet, process or KUBE-SERVICES rules anywhere; Cilium says it replaces it.

Also reports every node's kernel: Cilium's eBPF datapath with kube-proxy replacement and BPF masquerading wants
5.10 or newer.
"""
from __future__ import annotations

from conformance.judge import NotMeasured, judge_kernels, judge_kpr, kube_proxy_daemonsets, kube_proxy_findings

#: Prints yes / no / none (neither tool present). A tool that is present but fails exits non-zero with its error:
#: pipefail, and grep's "no match" (1) told apart from a failure (>1), so a broken iptables-save is never "no rules".
RULES_SCRIPT = r"""set -o pipefail 2>/dev/null || { echo 'this shell has no pipefail' >&2; exit 9; }
found=none
check() { out=$("$@") || { echo "$* failed (exit $?)" >&2; exit 3; }; [ $found = none ] && found=no
  printf '%s\n' "$out" | grep -qE 'KUBE-SERVICES|table ip6? kube-proxy' && found=yes; return 0; }
if command -v iptables-save >/dev/null 2>&1; then check iptables-save; fi
if command -v nft >/dev/null 2>&1; then check nft list ruleset; fi
echo $found"""


def parse_rules_answer(node: str, rc, stdout: str, stderr: str) -> bool | None:
    """True/False: rules present or not; None: neither tool exists. A failed read is NotMeasured."""
    word = (stdout or "").strip()
    if rc != 0 or word not in ("yes", "no", "none"):
        raise NotMeasured(f"{node}: reading iptables/nft rules failed (exit {rc}): "
                          f"{(stderr or stdout or '').strip()[:300] or 'no output'}")
    return {"yes": True, "no": False, "none": None}[word]


def test_no_kube_proxy_daemonset(kube):
    found = kube_proxy_daemonsets(kube.apps.list_daemon_set_for_all_namespaces().items)
    assert not found, (f"kube-proxy DaemonSet(s) present: {', '.join(found)}; with Cilium kube-proxy replacement "
                       "they must not exist (kubeadm init --skip-phases=addon/kube-proxy)")


def test_no_kube_proxy_process_or_rules(node_facts, measure):
    facts = node_facts.facts()
    host_rules = {}
    for node in facts:
        res = node_facts.host(node, RULES_SCRIPT, shell="bash")  # the node's own iptables/nft
        host_rules[node] = parse_rules_answer(node, res.rc, res.stdout, res.stderr)
    findings = kube_proxy_findings(facts, host_rules)
    measure("nodes", len(facts))
    assert not findings, "kube-proxy is not fully replaced:\n  " + "\n  ".join(findings)


def test_kernels_support_the_ebpf_datapath(node_facts, measure):
    kernels = {node: f.get("kernel") for node, f in node_facts.facts().items()}
    measure("kernels", kernels)
    problem = judge_kernels(kernels)
    assert not problem, problem


def test_cilium_reports_kube_proxy_replacement(kube, session, measure):
    agents = kube.core.list_namespaced_pod("kube-system", label_selector="k8s-app=cilium").items
    assert agents, "no Cilium agent pods (kube-system, k8s-app=cilium): is Cilium the CNI?"
    problems = []
    for pod in agents:
        res = session.exec("kube-system", pod.metadata.name, ["cilium-dbg", "status"], 60, container="cilium-agent")
        problem = judge_kpr(pod.spec.node_name, res.rc, res.stdout)
        if problem:
            problems.append(problem)
    measure("agents", len(agents))
    assert not problems, "Cilium does not report kube-proxy replacement active:\n  " + "\n  ".join(problems)
