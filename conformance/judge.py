"""Judgements over probe outputs: pure functions from netprobe JSON (and expectations) to named findings.

Each returns data a check asserts on and a text saying what was expected, what was observed and the likely
cause. They are unit-tested on real netprobe outputs (tests/fixtures/netprobe, tests/conformance).
"""
from __future__ import annotations

import enum
import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from conformance.expect import TRANSPORT_FAILURES, TruthTable, mismatches, render_diff
from lab.sysctl import normalize
from lab.table import render_table

CONNTRACK_COUNTERS = ("drop", "early_drop", "insert_failed")
FRAGMENT_COUNTERS = ("FragCreates", "FragFails", "ReasmReqds", "ReasmFails")
MTU_WASTE_WARN = 100


class MtuFinding(str, enum.Enum):
    OK = "ok"
    TOO_LARGE = "too_large"  # fragmentation or black holes
    WASTEFUL = "wasteful"    # more than 100 bytes below: wasted throughput (a warning)


# ---------------------------------------------------------------------------------------------- tuning


@dataclass
class SysctlTable:
    names: list[str]
    expected: dict[str, str]
    observed: dict[str, dict[str, str | None]]  # node -> name -> value
    mismatches: list[tuple[str, str]] = field(default_factory=list)  # (node, name)

    def render(self) -> str:
        nodes = sorted(self.observed)
        rows = [["sysctl", "expected"] + nodes]
        bad = set(self.mismatches)
        for name in self.names:
            row = [name, self.expected[name]]
            for node in nodes:
                value = self.observed[node].get(name)
                text = "(missing)" if value is None else value
                row.append(f"*{text}*" if (node, name) in bad else text)
            rows.append(row)
        return render_table(rows) + (f"\n{len(bad)} mismatch(es) marked *...*" if bad else "\nall match")


def sysctl_table(expected: dict[str, str], observed: dict[str, dict]) -> SysctlTable:
    names = sorted(expected)
    table = SysctlTable(names, {n: normalize(expected[n]) for n in names},
                        {node: {n: normalize(vals.get(n)) for n in names} for node, vals in observed.items()})
    for node in sorted(observed):
        for name in names:
            if table.observed[node][name] != table.expected[name]:
                table.mismatches.append((node, name))
    return table


# ---------------------------------------------------------------------------------------------- kube-proxy


def kube_proxy_findings(facts: dict[str, dict], host_rules: dict[str, bool | None] | None = None) -> list[str]:
    """Problems proving kube-proxy is still around, one line per node; [] when replaced everywhere."""
    out = []
    for node, f in sorted(facts.items()):
        if f.get("kube_proxy_running"):
            out.append(f"{node}: a kube-proxy process runs")
        rules = (f.get("kube_services_rules") or {}).get("present")
        if host_rules and host_rules.get(node) is not None:
            rules = bool(rules) or host_rules[node]
        if rules:
            out.append(f"{node}: KUBE-SERVICES rules exist (iptables/nft): kube-proxy ran here")
        elif rules is None:
            out.append(f"{node}: could not read iptables or nft rules (neither tool answered)")
    return out


def kernel_at_least(release: str, minimum=(5, 10)) -> bool:
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= minimum


# ---------------------------------------------------------------------------------------------- MTU


def expected_pod_mtu(underlay_mtu: int, tunnel: str, ipv6_underlay: bool = False) -> int:
    from lab.spec import OVERLAY_OVERHEAD_IPV4, OVERLAY_OVERHEAD_IPV6
    table = OVERLAY_OVERHEAD_IPV6 if ipv6_underlay else OVERLAY_OVERHEAD_IPV4
    return underlay_mtu - table[tunnel]


def judge_route_mtu(route_mtu: int, expected: int) -> tuple[MtuFinding, str]:
    if route_mtu > expected:
        return MtuFinding.TOO_LARGE, (f"pod route MTU {route_mtu} is above the expected {expected}: packets that "
                                      f"large fragment or vanish in the overlay")
    if route_mtu < expected - MTU_WASTE_WARN:
        return MtuFinding.WASTEFUL, (f"pod route MTU {route_mtu} is {expected - route_mtu} bytes below the "
                                     f"expected {expected}: throughput is wasted")
    return MtuFinding.OK, f"pod route MTU {route_mtu} (expected {expected})"


def route_mtu(facts: dict) -> int | None:
    route = facts.get("default_route") or {}
    return route.get("effective_mtu") or route.get("mtu") or route.get("dev_mtu")


def judge_path_mtu(result: dict, pod_mtu: int, ipv6: bool = False) -> list[str]:
    """`netprobe mtu` between pods: largest DF payload must be exactly pod MTU - 28 (IPv6: - 48), bulk must work."""
    problems = []
    want = pod_mtu - (48 if ipv6 else 28)
    if result.get("verdict") != "ok":
        problems.append(f"netprobe mtu verdict {result.get('verdict')!r} (a PMTUD black hole: large packets vanish "
                        "without an ICMP error)")
    got = result.get("largest_udp_payload")
    if got != want:
        problems.append(f"largest DF UDP payload {got}, expected exactly {want} (pod MTU {pod_mtu} - "
                        f"{48 if ipv6 else 28})")
    bulk = result.get("tcp_bulk") or {}
    if not bulk.get("ok"):
        problems.append(f"TCP bulk transfer failed: {bulk.get('bytes')} of {bulk.get('requested')} bytes "
                        f"({bulk.get('error') or 'stalled'})")
    return problems


def counter_deltas(before: dict[str, dict], after: dict[str, dict], names, where: Callable[[dict], dict]) -> dict:
    """node -> {counter: increase} for counters that rose between two facts snapshots."""
    out = {}
    for node in sorted(after):
        a, b = where(before.get(node) or {}) or {}, where(after[node]) or {}
        rose = {n: b[n] - a.get(n, 0) for n in names if n in b and b[n] - a.get(n, 0) > 0}
        if rose:
            out[node] = rose
    return out


def fragment_deltas(before, after) -> dict:
    return counter_deltas(before, after, FRAGMENT_COUNTERS, lambda f: f.get("ip_fragments"))


def conntrack_deltas(before, after) -> dict:
    return counter_deltas(before, after, CONNTRACK_COUNTERS, lambda f: (f.get("conntrack") or {}).get("stat"))


# ---------------------------------------------------------------------------------------------- load


def judge_load(results: list[dict]) -> tuple[dict, list[str]]:
    """Sum `netprobe load` outputs of several clients: totals and the problems (any failure or reset)."""
    keys = ("requested", "established", "failed", "resets", "timeouts", "held")
    total = {k: sum(int(r.get(k) or 0) for r in results) for k in keys}
    total["open_rate_per_s"] = round(sum(float(r.get("open_rate_per_s") or 0) for r in results), 1)
    total["connect_ms_p99"] = max((float(r.get("connect_ms_p99") or 0) for r in results), default=0.0)
    problems = []
    if total["established"] != total["requested"]:
        problems.append(f"{total['established']} of {total['requested']} connections established")
    if total["failed"]:
        problems.append(f"{total['failed']} connections failed ({total['timeouts']} timeouts)")
    if total["resets"]:
        problems.append(f"{total['resets']} connections reset while held")
    if total.get("held", total["established"]) < total["established"]:
        problems.append(f"only {total['held']} of {total['established']} connections stayed open for the hold")
    return total, problems


def default_connections(expected_conntrack_max: int | None, clients: int, cap: int = 20000) -> int:
    """Sized to the lab: a quarter of nf_conntrack_max (never near exhaustion), at most ``cap``, per path."""
    base = (expected_conntrack_max or 262144) // 4
    return max(clients, min(cap, base))


# ---------------------------------------------------------------------------------------------- LoadBalancer


def ip_in_pool(ip: str, pool: list[str]) -> bool:
    from lab.spec import pool_ranges
    addr = ipaddress.IPv4Address(ip)
    return any(int(first) <= int(addr) <= int(last) for first, last in (pool_ranges(e) for e in pool))


def outside_pool_address(pool: list[str], network: str | None) -> str:
    """An address inside the lab network (or TEST-NET-1) that no pool entry contains: a request MetalLB must refuse."""
    net = ipaddress.IPv4Network(network or "192.0.2.0/24")
    for host in reversed(list(net.hosts())):
        if not pool or not ip_in_pool(str(host), pool):
            return str(host)
    raise ValueError(f"every address of {net} is in the pool")


def parse_neighbour(text: str, ip: str) -> str | None:
    """`ip neigh show to IP` -> the MAC (lladdr), or None when there is no usable entry."""
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == ip and "lladdr" in words and not {"FAILED", "INCOMPLETE"} & set(words):
            return words[words.index("lladdr") + 1].lower()
    return None


def parse_link_macs(text: str) -> set[str]:
    """`ip -o link` -> the set of MACs of the node's interfaces."""
    return {m.lower() for m in re.findall(r"link/ether ([0-9a-fA-F:]{17})", text)}


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class Convergence:
    matched: bool
    seconds: float
    polls: int
    transport_failures: int
    last: TruthTable | None
    text: str


def poll_table(expected: TruthTable, observe: Callable[[], TruthTable], seconds: float, interval: float = 2.0,
               transport_errors: tuple = (Exception,), clock=time.monotonic, sleep=time.sleep) -> Convergence:
    """Observe the WHOLE table until every cell meets the expectation or ``seconds`` pass (enforcement lag).

    A cell never passes on its own: only a complete observation that matches ends the poll. An observation that
    fails as a transport (exec error, ERROR verdicts) is retried and counted; it never counts as a verdict.
    """
    start = clock()
    polls = failures = 0
    last = None
    while True:
        polls += 1
        try:
            table = observe()
        except transport_errors:
            failures += 1
            table = None
        if table is not None:
            if any(v in TRANSPORT_FAILURES for v in table.cells.values()):
                failures += 1
            last = table
            if not mismatches(expected, table):
                return Convergence(True, clock() - start, polls, failures, table, render_diff(expected, table))
        if clock() - start >= seconds:
            text = (render_diff(expected, last) if last is not None else "no complete observation")
            return Convergence(False, clock() - start, polls, failures, last,
                               f"tables still differ after {seconds:.0f}s and {polls} polls "
                               f"({failures} transport failures retried):\n{text}")
        sleep(interval)
