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


@pytest.fixture(scope="module")
def tuning_pods(session, kube):
    """One ordinary (not hostNetwork) probe pod pinned to each node: node -> pod name, in a namespace of ours."""
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("podtune")
    session.probe_configmap(ns)
    pods = session.pods_per_node(ns, "podtune", nodes)
    return ns, {node: name for node, (name, _ip) in pods.items()}


def read_in_pod(session, ns: str, pod: str, names: list[str]) -> dict:
    res = session.exec(ns, pod, read_command(names), 60.0)
    if res.rc != 0:
        raise k8s.ProbeFailed(f"reading /proc/sys in {ns}/{pod} failed (exit {res.rc}): {res.stderr[:200]}")
    return parse_values(res.stdout, names)


def test_pods_get_the_sysctls_the_lab_claims(session, settings, tuning_pods, measure, warn):
    ns, pods = tuning_pods
    names = sorted(settings.expect_sysctls)
    observed = {f"{node}/{pod}": read_in_pod(session, ns, pod, names) for node, pod in sorted(pods.items())}
    # Pod-side expectations (securityContext.sysctls the lab gives pods) come from the runner once it has an
    # option for them (issue 13, reworked runner); until then only the node claims are judged.
    report = judge_pod_sysctls(settings.expect_sysctls, observed, getattr(settings, "expect_pod_sysctls", None))
    measure("pod_sysctls", {r.name: r.pod_values for r in report.rows})
    measure("pod_sysctl_notes", len(report.notes))
    for note in report.notes:
        warn(note)
    assert not report.failures, ("pods see sysctl values that contradict the lab (sysctl x pod):\n"
                                 + report.render() + "\n  " + "\n  ".join(report.failures))


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
