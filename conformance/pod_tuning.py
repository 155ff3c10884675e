"""Pod-level tuning: which of the lab's sysctls a pod actually gets, and rp_filter on pod devices.

Kernel facts (a new network namespace, which is what a pod gets; written and read back in a child netns on this
host's kernel, 6.18, and unchanged in kind since before 6.1; the check itself measures the cluster's kernel):

* per network namespace, starting from the kernel default, NOT from the node's value: ``net.core.somaxconn``,
  ``net.ipv4.tcp_max_syn_backlog``, ``net.ipv4.ip_local_port_range``, ``net.ipv4.ip_forward``,
  ``net.netfilter.nf_conntrack_tcp_timeout_established``, ``net.bridge.bridge-nf-call-iptables``;
* global, visible read-only in a pod: ``net.netfilter.nf_conntrack_max`` (mode 0444 outside the initial netns);
* global and not visible in a pod at all: ``net.ipv4.neigh.default.gc_thresh1..3`` (the ARP table is one per
  kernel; a child netns has no ``neigh/default``).

How a pod gets a per-netns value: ``spec.securityContext.sysctls``. Kubernetes 1.37 allows these "safe" ones
without kubelet flags (pkg/kubelet/sysctl/safe_sysctls.go, with the kernel each needs); any other namespaced
sysctl (somaxconn, tcp_max_syn_backlog) is "unsafe": the kubelet must list it in ``allowedUnsafeSysctls``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from lab.sysctl import normalize


class Scope(str, enum.Enum):
    NETNS = "netns"              # each pod has its own value, the kernel default unless the pod sets it
    GLOBAL = "global"            # one value for the kernel: pods see the node's
    NODE_ONLY = "node-only"      # global and absent from a pod's /proc/sys


SCOPES = {
    "net.core.somaxconn": Scope.NETNS,
    "net.ipv4.tcp_max_syn_backlog": Scope.NETNS,
    "net.ipv4.ip_local_port_range": Scope.NETNS,
    "net.ipv4.ip_forward": Scope.NETNS,
    "net.netfilter.nf_conntrack_tcp_timeout_established": Scope.NETNS,
    "net.bridge.bridge-nf-call-iptables": Scope.NETNS,
    "net.netfilter.nf_conntrack_max": Scope.GLOBAL,
    "net.ipv4.neigh.default.gc_thresh1": Scope.NODE_ONLY,
    "net.ipv4.neigh.default.gc_thresh2": Scope.NODE_ONLY,
    "net.ipv4.neigh.default.gc_thresh3": Scope.NODE_ONLY,
}

#: Kubernetes 1.37.2 safe sysctls -> the kernel they need (None: any). A pod may set these in
#: securityContext.sysctls with no kubelet flag.
SAFE_SYSCTLS_1_37 = {
    "kernel.shm_rmid_forced": None, "net.ipv4.ip_local_port_range": None, "net.ipv4.tcp_syncookies": None,
    "net.ipv4.ping_group_range": None, "net.ipv4.ip_unprivileged_port_start": None,
    "net.ipv4.ip_local_reserved_ports": "3.16", "net.ipv4.tcp_keepalive_time": "4.5",
    "net.ipv4.tcp_fin_timeout": "4.6", "net.ipv4.tcp_keepalive_intvl": "4.5", "net.ipv4.tcp_keepalive_probes": "4.5",
    "net.ipv4.tcp_rmem": "4.15", "net.ipv4.tcp_wmem": "4.15", "net.ipv4.tcp_slow_start_after_idle": "4.15",
    "net.ipv4.tcp_notsent_lowat": "4.6",
}


def how_a_pod_gets_it(name: str) -> str:
    scope = SCOPES.get(name)
    if scope is Scope.GLOBAL:
        return "from the node (global)"
    if scope is Scope.NODE_ONLY:
        return "not visible in pods (global; set on the node only)"
    if name in SAFE_SYSCTLS_1_37:
        return "securityContext.sysctls (safe)"
    if name.startswith("net.bridge.") or name == "net.ipv4.ip_forward":
        return "not settable by a pod (a pod has no bridge and needs no forwarding)"
    return "securityContext.sysctls + kubelet allowedUnsafeSysctls (unsafe)"


@dataclass
class PodSysctlRow:
    name: str
    scope: str
    node_claim: str | None           # what the lab sets on nodes
    pod_values: dict[str, str | None]  # pod -> value read in it
    how: str


@dataclass
class PodTuningReport:
    rows: list[PodSysctlRow]
    failures: list[str] = field(default_factory=list)   # a pod sees what it must not (global value differs, ...)
    notes: list[str] = field(default_factory=list)      # a lab setting that does not reach pods, said plainly

    def render(self) -> str:
        from lab.table import render_table
        pods = sorted({p for r in self.rows for p in r.pod_values})
        head = ["sysctl", "scope", "node (lab)"] + pods + ["how a pod gets it"]
        body = [[r.name, r.scope, r.node_claim or "-"] + [str(r.pod_values.get(p) or "-") for p in pods] + [r.how]
                for r in self.rows]
        return render_table([head] + body)


def judge_pod_sysctls(claimed: Mapping[str, str], observed: Mapping[str, Mapping[str, str | None]],
                      pod_expected: Mapping[str, str] | None = None) -> PodTuningReport:
    """``claimed``: the lab's node sysctls; ``observed``: pod -> name -> value read in that pod (None: missing).

    Failures: a GLOBAL sysctl whose pod value differs from the claim (the node is not tuned as the lab says); a
    value in ``pod_expected`` (what pods are configured to get via securityContext.sysctls) that a pod lacks.
    Notes: each NETNS claim whose pod value differs (the setting does not reach pods) and each NODE_ONLY one."""
    pod_expected = dict(pod_expected or {})
    rows, failures, notes = [], [], []
    for name in sorted(set(claimed) | set(pod_expected)):
        scope = SCOPES.get(name, Scope.NETNS if name.startswith("net.") else Scope.GLOBAL)
        values = {pod: normalize(v.get(name)) for pod, v in sorted(observed.items())}
        claim = normalize(claimed.get(name))
        rows.append(PodSysctlRow(name, scope.value, claim, values, how_a_pod_gets_it(name)))
        if name in pod_expected:
            want = normalize(pod_expected[name])
            bad = {p: v for p, v in values.items() if v != want}
            if bad:
                failures.append(f"{name}: pods should get {want} ({how_a_pod_gets_it(name)}) but "
                                + ", ".join(f"{p} has {v}" for p, v in bad.items()))
            continue
        if claim is None:
            continue
        if scope is Scope.GLOBAL:
            bad = {p: v for p, v in values.items() if v != claim}
            if bad:
                failures.append(f"{name} is global, so pods must see the node's {claim}, but "
                                + ", ".join(f"{p} sees {v}" for p, v in bad.items()))
        elif scope is Scope.NODE_ONLY:
            notes.append(f"{name}={claim} is a node-wide table setting; pods do not see it (nothing to check there)")
        else:
            differ = sorted({v for v in values.values() if v != claim}, key=str)
            if differ:
                notes.append(f"{name}={claim} on nodes does not reach pods (they have {', '.join(map(str, differ))}): "
                             f"per network namespace; a pod gets it via {how_a_pod_gets_it(name)}")
    return PodTuningReport(rows, failures, notes)


# ---------------------------------------------------------------------------------------------- rp_filter

POD_RP_FILTER_KEYS = ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter", "net.ipv4.conf.eth0.rp_filter"]
#: Cilium's own devices on a node (the pods' host side is lxc*): Cilium sets rp_filter 0 on them; a distribution
#: default (systemd's 50-default.conf: net.ipv4.conf.*.rp_filter = 2, or 1) that lands on them drops pod traffic
#: whose source the reverse path does not route back through the same device.
CILIUM_DEVICE_PREFIXES = ("lxc", "cilium_")
RP_NAMES = {0: "off", 1: "strict", 2: "loose"}

#: Node-side reader: "device value" per line for every /proc/sys/net/ipv4/conf/<dev>/rp_filter (run on the node).
NODE_RP_FILTER_SCRIPT = ('for f in /proc/sys/net/ipv4/conf/*/rp_filter; do d=${f%/rp_filter}; '
                         'printf "%s %s\\n" "${d##*/}" "$(cat "$f")"; done')


def parse_rp_filter_lines(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        dev, _, value = line.strip().partition(" ")
        if dev and value.strip().isdigit():
            out[dev] = int(value)
    return out


def effective_rp_filter(all_value: int, dev_value: int) -> int:
    """The kernel uses max(conf/all/rp_filter, conf/<dev>/rp_filter) (Documentation/networking/ip-sysctl.rst)."""
    return max(all_value, dev_value)


def judge_node_rp_filter(node: str, values: Mapping[str, int]) -> list[str]:
    """Every Cilium device (lxc*, cilium_*) must have an effective rp_filter of 0."""
    if "all" not in values:
        return [f"{node}: net.ipv4.conf.all.rp_filter could not be read"]
    problems = []
    for dev, value in sorted(values.items()):
        if not dev.startswith(CILIUM_DEVICE_PREFIXES):
            continue
        eff = effective_rp_filter(values["all"], value)
        if eff:
            problems.append(f"{node}: rp_filter on {dev} is {eff} ({RP_NAMES.get(eff, '?')}; all={values['all']}, "
                            f"{dev}={value}): reverse-path filtering on a Cilium device drops pod traffic; a sysctl.d "
                            "file (systemd's 50-default.conf) overrode Cilium's 0")
    return problems


def judge_pod_rp_filter(pod: str, values: Mapping[str, str | None]) -> list[str]:
    """The pod's eth0: strict (1) is reported; Cilium's pod routes (default via the node, /32 address) pass even a
    strict filter, so this is a note for multi-homed pods, not a failure."""
    try:
        eff = effective_rp_filter(int(values["net.ipv4.conf.all.rp_filter"]),
                                  int(values["net.ipv4.conf.eth0.rp_filter"]))
    except (KeyError, TypeError, ValueError):
        return [f"{pod}: rp_filter of eth0 could not be read ({dict(values)})"]
    return [f"{pod}: eth0 rp_filter is {eff} (strict)"] if eff == 1 else []
