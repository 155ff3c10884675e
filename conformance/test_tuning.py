"""Node tuning: every node's sysctls equal the expected set, read after the cluster is up.

kube-proxy (when present) rewrites nf_conntrack_max at start, so the value that matters is the one in force now,
not the one in /etc/sysctl.d. Expected: the lab spec's tuning.sysctls, else the production set, plus --expect-sysctl.
"""
from __future__ import annotations

from conformance.judge import sysctl_table


def test_node_sysctls_match_expected(node_facts, settings, measure):
    names = sorted(settings.expect_sysctls)
    facts = node_facts.facts()
    observed = {}
    for node, f in facts.items():
        values = dict(f.get("sysctls") or {})
        extra = [n for n in names if n not in values]  # netprobe facts reads a fixed set; read the rest directly
        if extra:
            values.update(node_facts.sysctl(node, extra))
        observed[node] = values
    table = sysctl_table(settings.expect_sysctls, observed)
    measure("sysctl_mismatches", len(table.mismatches))
    measure("nodes", len(observed))
    assert not table.mismatches, (
        "node tuning differs from the expected set (node x sysctl, mismatches marked):\n" + table.render()
        + "\nlikely cause: the sysctl file was not applied or was overwritten after boot (kube-proxy sets "
          "nf_conntrack_max at start); rerun `lab up` to reapply the tune phase")
