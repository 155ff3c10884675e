"""Pod-level tuning: the values pods actually get for the lab's sysctls, reported against what the lab claims for
nodes, and rp_filter on pod devices (in the pod, and Cilium's lxc*/cilium_* devices on the node).

Most of the lab's network sysctls are per network namespace: a pod starts from the kernel default, not from the
node's value (conformance/pod_tuning.py lists which, and how a pod gets each). So a differing per-namespace value
is a note, not a failure; a global one (nf_conntrack_max) that differs is a failure, and so is a pod missing a
value it was configured to get.
"""
from __future__ import annotations

import pytest

from conformance import kube as k8s
from conformance.pod_tuning import (NODE_RP_FILTER_SCRIPT, POD_RP_FILTER_KEYS, judge_node_rp_filter,
                                    judge_pod_rp_filter, judge_pod_sysctls, parse_rp_filter_lines)
from lab.sysctl import parse_values, read_command

pytestmark = pytest.mark.datapath("observe")  # starts pods on every node: never while load is held


@pytest.fixture(scope="module")
def tuning_pods(session, kube):
    """One ordinary (not hostNetwork) probe pod pinned to each node: node -> pod name, in a namespace of ours."""
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("podtune")  # with its netprobe ConfigMap (a second create was a 409 on the real cluster)
    pods = session.pods_per_node(ns, "podtune", nodes)
    return ns, {node: name for node, (name, _ip) in pods.items()}


def read_in_pod(session, ns: str, pod: str, names: list[str]) -> dict:
    res = session.exec(ns, pod, read_command(names), 60.0)
    if res.rc != 0:
        raise k8s.ProbeFailed(f"reading /proc/sys in {ns}/{pod} failed (exit {res.rc}): {res.stderr[:200]}")
    return parse_values(res.stdout, names)


def sysctl_pods(session, kube, sysctls: dict[str, str], seconds: float) -> tuple[str, dict[str, str], list[str]]:
    """One probe pod per node configured with ``securityContext.sysctls`` (--expect-pod-sysctl): (namespace,
    node -> pod, problems). A pod the kubelet refuses (``SysctlForbidden``: an unsafe sysctl not in its
    ``allowedUnsafeSysctls``) is a problem naming it: such pods never get the value. The namespace is
    ``privileged`` for PodSecurity (baseline and restricted admit only the safe sysctls); the pods themselves
    stay non-root with every capability dropped."""
    from lab.wait import wait_for
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("podsysctl", {k8s.PSA_LABEL: "privileged"})
    for node in nodes:
        spec = session.probe_pod_spec(node=node)
        spec["securityContext"] = {"sysctls": [{"name": n, "value": str(v)} for n, v in sorted(sysctls.items())]}
        session.create_pod(ns, {"metadata": {"name": f"podsysctl-{node}"[:63], "labels": {
            "app": "podsysctl", k8s.OWNER_LABEL: "true"}}, "spec": spec})

    def check():
        pods = kube.core.list_namespaced_pod(ns, label_selector="app=podsysctl").items
        failed = [p for p in pods if p.status and p.status.phase == "Failed"]
        ready = [p for p in pods if k8s._pod_ready(p)]
        done = len(ready) + len(failed) >= len(nodes)
        return (True, (ready, failed)) if done else (False, f"{len(ready)}/{len(nodes)} ready")
    ready, failed = wait_for(f"{len(nodes)} pod(s) with securityContext.sysctls ({ns})", seconds, check,
                             interval=1.0, hint=k8s.WAIT_HINT)
    problems = [f"{p.spec.node_name}: the kubelet refused pod {ns}/{p.metadata.name} "
                f"({p.status.reason}: {(p.status.message or '')[:200]}): add the sysctl to the kubelet's "
                "allowedUnsafeSysctls, or drop it from --expect-pod-sysctl" for p in failed]
    return ns, {p.spec.node_name: p.metadata.name for p in ready}, problems


def test_pods_get_the_sysctls_the_lab_claims(session, kube, settings, tuning_pods, measure, warn):
    """Plain probe pods against the lab's node claims; with --expect-pod-sysctl, pods configured with those
    values (securityContext.sysctls) must see them."""
    ns, pods = tuning_pods
    wanted = dict(settings.expect_pod_sysctls)
    claims = {n: v for n, v in settings.expect_sysctls.items() if n not in wanted}
    observed = {f"{node}/{pod}": read_in_pod(session, ns, pod, sorted(claims)) for node, pod in sorted(pods.items())}
    report = judge_pod_sysctls(claims, observed)
    failures, rows, notes = list(report.failures), list(report.rows), list(report.notes)
    if wanted:
        sns, spods, refused = sysctl_pods(session, kube, wanted, settings.wait_seconds)
        configured = {f"{node}/{pod}": read_in_pod(session, sns, pod, sorted(wanted))
                      for node, pod in sorted(spods.items())}
        pod_report = judge_pod_sysctls({}, configured, wanted)
        failures += refused + pod_report.failures
        rows += pod_report.rows
        measure("pod_sysctls_configured", {r.name: r.pod_values for r in pod_report.rows})
    measure("pod_sysctls", {r.name: r.pod_values for r in rows})
    measure("pod_sysctl_notes", len(notes))
    for note in notes:
        warn(note)
    assert not failures, ("pods see sysctl values that contradict the lab (sysctl x pod):\n"
                          + report.render() + "\n  " + "\n  ".join(failures))


def test_rp_filter_on_pod_devices(session, node_facts, tuning_pods, measure, warn):
    ns, pods = tuning_pods
    problems = []
    for node in sorted(node_facts.pods):
        res = node_facts.host(node, NODE_RP_FILTER_SCRIPT)
        if res.rc != 0:
            problems.append(f"{node}: reading rp_filter failed (exit {res.rc}): {res.stderr[:200]}")
            continue
        values = parse_rp_filter_lines(res.stdout)
        measure(f"rp_filter_{node}", {d: v for d, v in values.items() if d.startswith(("all", "lxc", "cilium_"))})
        problems += judge_node_rp_filter(node, values)
    for node, pod in sorted(pods.items()):
        for note in judge_pod_rp_filter(f"{ns}/{pod}", read_in_pod(session, ns, pod, POD_RP_FILTER_KEYS)):
            warn(note)
    assert not problems, "reverse-path filtering on pod devices:\n  " + "\n  ".join(problems)
