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

from conformance.expect import (BLOCKED_VERDICTS, TRANSPORT_FAILURES, Expect, Target, TruthTable, Verdict, cell_id, mismatches,
                               render_diff)
from conformance.probes.netprobe import TCP_DROP_COUNTERS
from lab.sysctl import normalize
from lab.table import render_table

CONNTRACK_COUNTERS = ("drop", "early_drop", "insert_failed")
FRAGMENT_COUNTERS = ("FragCreates", "FragFails", "ReasmReqds", "ReasmFails")
MTU_WASTE_WARN = 100


class NotMeasured(Exception):
    """A probe could not measure: a transport error carrying its message, never a verdict (the check errors)."""


class CounterMissing(NotMeasured):
    """A counter could not be read on a node: never counted as "no rise"."""


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


def route_mtu(facts: dict, who: str = "") -> int:
    """The MTU the kernel uses on the default route: netprobe facts' ``default_route.effective_mtu`` (IP_MTU, else
    the rtnetlink metric). Never the device MTU: Cilium leaves eth0 at 1500 and lowers the route. No default route,
    or a route MTU netprobe could not read, is :class:`NotMeasured` with netprobe's own errors."""
    route = facts.get("default_route")
    value = (route or {}).get("effective_mtu")
    if isinstance(value, int) and value > 0:
        return value
    errors = "; ".join(f"{e.get('what')}: {e.get('error')}" for e in facts.get("errors") or [])
    what = "no default route" if not route else "the default route's MTU is unknown (effective_mtu null)"
    raise NotMeasured(f"{who + ': ' if who else ''}{what}" + (f" ({errors})" if errors else "")
                      + "; the device MTU is not the route MTU, so nothing is judged")


#: What each non-ok `netprobe mtu` verdict means; only black_hole is a PMTUD black hole.
MTU_VERDICT_MEANING = {
    "black_hole": "a PMTUD black hole: large packets vanish without an ICMP error",
    "refused": "the TCP bulk connection was refused: nothing listens on the target port (test setup, not MTU)",
    "unreachable": "no UDP echo came back at any size, or the TCP bulk connection was rejected with ICMP "
                   "unreachable: nothing serves the port, or a policy or route rejects it",
    "timeout": "the TCP bulk connection timed out before it opened",
    "tcp_failed": "the TCP bulk transfer failed after connecting, with no sign of lost large datagrams",
    "reset": "the TCP bulk connection was reset by the peer or the path",
    "error": "the probe could not run its measurement",
}


def judge_path_mtu(result: dict, pod_mtu: int, ipv6: bool = False) -> list[str]:
    """`netprobe mtu` between pods: largest DF payload must be exactly pod MTU - 28 (IPv6: - 48), bulk must work."""
    problems = []
    want = pod_mtu - (48 if ipv6 else 28)
    verdict = result.get("verdict")
    if verdict != "ok":
        problems.append(f"netprobe mtu verdict {verdict!r} ({MTU_VERDICT_MEANING.get(verdict, 'unexpected')})")
    got = result.get("largest_udp_payload")
    if got != want:
        problems.append(f"largest DF UDP payload {got}, expected exactly {want} (pod MTU {pod_mtu} - "
                        f"{48 if ipv6 else 28})")
    bulk = result.get("tcp_bulk") or {}
    if not bulk.get("ok"):
        problems.append(f"TCP bulk transfer failed: {bulk.get('bytes')} of {bulk.get('requested')} bytes "
                        f"({bulk.get('error') or 'stalled'})")
    return problems


def counter_deltas(before: dict[str, dict], after: dict[str, dict], names, where: Callable[[dict], dict | None],
                   what: str = "counters", errors_of: str | None = None) -> dict:
    """node -> {counter: increase} for counters that rose between two facts snapshots.

    A node whose snapshot lacks a counter (null: netprobe could not read it) or whose facts carry ``errors``
    (``errors_of``: only the entries about that part of the facts) raises :class:`CounterMissing` with the node and
    netprobe's own error entries: a missing counter never counts as "no rise"."""
    out, missing = {}, []
    for node in sorted(after):
        for label, doc in (("before", before.get(node)), ("after", after[node])):
            found = where(doc) if doc is not None else None
            absent = [n for n in names if not isinstance((found or {}).get(n), int)]
            errors = "; ".join(f"{e.get('what')}: {e.get('error')}" for e in ((doc or {}).get("errors") or [])
                               if errors_of is None or str(e.get("what", "")).startswith(errors_of))
            if absent:
                missing.append(f"{node} ({label}): {', '.join(absent)} unreadable" + (f" ({errors})" if errors else ""))
            elif errors:  # netprobe says part of this snapshot could not be read: never judged as "no rise"
                missing.append(f"{node} ({label}): netprobe reported errors ({errors})")
        if missing:
            continue
        a, b = where(before[node]), where(after[node])
        rose = {n: b[n] - a[n] for n in names if b[n] - a[n] > 0}
        if rose:
            out[node] = rose
    if missing:
        raise CounterMissing(f"could not read the {what}: " + "; ".join(missing))
    return out


def tcp_drop_deltas(before, after) -> dict:
    """pod or node -> {TcpExt drop counter: increase}: what its own TCP stack dropped (a full accept or SYN queue,
    backlog, receive queue, memory). Only the facts' own ``tcp_ext`` errors make it unreadable: a pod's facts also
    report tables a pod cannot read, which say nothing about these counters."""
    return counter_deltas(before, after, TCP_DROP_COUNTERS, lambda f: f.get("tcp_ext"), "TCP stack's drop counters",
                          errors_of="tcp_ext")


def judge_stack_drops(drops: dict) -> str | None:
    """The problem line for :func:`tcp_drop_deltas`' result, None when nothing was dropped."""
    if not drops:
        return None
    return f"the load pods' own TCP stacks dropped (TcpExt, /proc/net/netstat): {drops}"


def fragment_deltas(before, after) -> dict:
    return counter_deltas(before, after, FRAGMENT_COUNTERS, lambda f: f.get("ip_fragments"), "fragment counters")


# ---------------------------------------------------------------------------------------------- MTU over several paths


def path_id(src: str, dst: str) -> str:
    """A path's readable id with its direction: ``cp1->w1`` is not ``w1->cp1``."""
    return f"{src}->{dst}"


def ordered_pairs(nodes) -> list[tuple[str, str]]:
    """Every ordered pair of distinct nodes, sorted: A->B and B->A both. Each direction has its own sender's route
    MTU, host routes and filters, and `netprobe mtu`'s bulk transfer loads one direction only (the peer sends
    ACKs and a receipt), so a fault on the return path is invisible from the other side."""
    names = sorted(nodes)
    return [(a, b) for a in names for b in names if a != b]


def path_record(result: dict) -> dict:
    """What the report keeps of one path's `netprobe mtu` output."""
    bulk = result.get("tcp_bulk") or {}
    rate = round(bulk["bytes"] / 1048576 / bulk["seconds"], 1) if bulk.get("seconds") else None
    return {"verdict": result.get("verdict"), "path_mtu": result.get("path_mtu"),
            "largest_udp_payload": result.get("largest_udp_payload"), "tcp_bulk_mib_per_s": rate}


@dataclass
class PathRun:
    """`netprobe mtu` over several paths, one after the other, with the nodes' fragmentation counters read before
    the first and after each path, so a rise is named with the path (and direction) that caused it."""

    before: dict[str, dict]                                   # node -> facts before the first path
    results: dict[str, dict] = field(default_factory=dict)    # path id -> netprobe mtu JSON
    fragments: dict[str, dict] = field(default_factory=dict)  # path id -> node -> counters that rose meanwhile
    unmeasured: dict[str, str] = field(default_factory=dict)  # path id -> why its probe could not run

    def record(self) -> dict:
        """path id -> verdict, path MTU, largest payload, bulk MiB/s and fragment rises (or the probe's error)."""
        return {pid: ({**path_record(self.results[pid]), "fragments": frags} if pid in self.results
                      else {"error": self.unmeasured[pid][:300], "fragments": frags})
                for pid, frags in self.fragments.items()}

    def worst(self) -> dict:
        """The worst path's values under the report's metric names (compared between runs)."""
        records = [path_record(r) for r in self.results.values()]

        def lowest(key):
            return min((r[key] for r in records if isinstance(r[key], (int, float))), default=None)
        return {"path_mtu": lowest("path_mtu"), "largest_udp_payload": lowest("largest_udp_payload"),
                "tcp_bulk_mib_per_s": lowest("tcp_bulk_mib_per_s"),
                "fragments_created": sum(d.get("FragCreates", 0) for f in self.fragments.values() for d in f.values())}


def measure_paths(probes: dict[str, Callable[[], dict]], facts: Callable[[], dict[str, dict]],
                  transport_errors: tuple = (NotMeasured,)) -> PathRun:
    """Run each path's probe in turn (one probe per path: bounded) between reads of the nodes' facts. A probe
    raising one of ``transport_errors`` is recorded as unmeasured and the other paths still run; facts whose
    counters cannot be read raise :class:`CounterMissing`."""
    run = PathRun(facts())
    snapshot = run.before
    for pid, probe in probes.items():
        try:
            run.results[pid] = probe()
        except transport_errors as exc:
            run.unmeasured[pid] = str(exc)
        after = facts()
        run.fragments[pid] = fragment_deltas(snapshot, after)
        snapshot = after
    return run


def judge_paths(run: PathRun, pod_mtu: dict[str, int]) -> dict[str, list[str]]:
    """Failing path id -> its problems: :func:`judge_path_mtu` against that path's pod MTU, and fragmentation
    counters that rose while it was measured. Any path whose probe could not run raises :class:`NotMeasured`
    naming it and the paths that did fail: an unmeasured path is never judged, so the check errors."""
    failing = {}
    for pid, result in run.results.items():
        problems = judge_path_mtu(result, pod_mtu[pid])
        if run.fragments.get(pid):
            problems.append("fragmentation counters rose while this path was measured (outer packets fragmented "
                            f"or dropped as too big): {run.fragments[pid]}")
        if problems:
            failing[pid] = problems
    if run.unmeasured:
        raise NotMeasured(f"could not measure {len(run.unmeasured)} of {len(run.fragments)} path(s): "
                          + "; ".join(f"{pid}: {why}" for pid, why in run.unmeasured.items())
                          + (f" (measured and failing: {', '.join(failing)})" if failing else ""))
    return failing


def render_path_failures(failing: dict[str, list[str]], total: int) -> str:
    """First line: how many paths fail and which, each with its direction; then one line per problem."""
    lines = [f"{len(failing)} of {total} path(s) fail: {', '.join(failing)}"]
    for pid, problems in failing.items():
        lines += [f"{pid}: {problem}" for problem in problems]
    return "\n".join(lines)


def conntrack_deltas(before, after) -> dict:
    return counter_deltas(before, after, CONNTRACK_COUNTERS, lambda f: (f.get("conntrack") or {}).get("stat"),
                          "nf_conntrack counters")


# ---------------------------------------------------------------------------------------------- load


def judge_load(results: list[dict]) -> tuple[dict, list[str]]:
    """Sum `netprobe load` outputs of several clients: totals and the problems (any failure, reset, or a held
    connection not proven end to end). ``verified`` is netprobe's count of held connections on which a byte
    went out and came back at the end of the hold; a client output without it cannot prove anything and raises
    :class:`NotMeasured` (the check errors, it does not pass on socket state alone)."""
    keys = ("requested", "established", "failed", "resets", "timeouts", "held")
    total = {k: sum(int(r.get(k) or 0) for r in results) for k in keys}
    total["open_rate_per_s"] = round(sum(float(r.get("open_rate_per_s") or 0) for r in results), 1)
    total["connect_ms_p99"] = max((float(r.get("connect_ms_p99") or 0) for r in results), default=0.0)
    unverified = [r.get("to", "?") for r in results if not isinstance(r.get("verified"), int)]
    if unverified:
        raise NotMeasured("netprobe load reported no `verified` count (a byte sent and answered on every held "
                          "connection at the end of the hold), so no held connection is proven end to end; "
                          f"clients towards {sorted(set(map(str, unverified)))}")
    total["verified"] = sum(int(r["verified"]) for r in results)
    for key in ("verify_timeouts", "verify_closed", "not_opened", "unfinished"):
        total[key] = sum(int(r.get(key) or 0) for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for name, count in (r.get("errors") or {}).items():
            errors[str(name)] = errors.get(str(name), 0) + int(count)
    total["errors"] = errors
    if total["not_opened"] or total["unfinished"]:
        behind = [f"{r.get('to', '?')}: {int(r.get('not_opened') or 0)} never opened, "
                  f"{int(r.get('unfinished') or 0)} still connecting" for r in results
                  if r.get("not_opened") or r.get("unfinished")]
        raise NotMeasured(f"a load client fell behind its own schedule ({'; '.join(behind)}) when its opening "
                          "window (N/rate + --timeout + --open-slack) closed: the client was starved, so those "
                          "connections say nothing about the datapath. Give it more time (--time-scale) or "
                          "fewer connections")
    problems = []
    if total["established"] != total["requested"]:
        problems.append(f"{total['established']} of {total['requested']} connections established")
    if total["failed"]:
        detail = ", ".join(f"{name} {count}" for name, count in sorted(errors.items())) or "no error recorded"
        problems.append(f"{total['failed']} connections failed ({total['timeouts']} timeouts; errors: {detail})")
    if total["resets"]:
        problems.append(f"{total['resets']} connections reset while held")
    if total["held"] < total["established"]:
        problems.append(f"only {total['held']} of {total['established']} connections stayed open for the hold")
    if total["verified"] < total["established"]:
        problems.append(f"only {total['verified']} of {total['established']} held connections carried a byte "
                        "end to end at the end of the hold (the datapath forgot or broke the rest): "
                        f"{total['verify_timeouts']} unanswered within the verify timeout, "
                        f"{total['verify_closed']} closed by the peer")
    return total, problems


#: The declared peak of concurrent tracked flows a node must hold (``--conntrack-peak``): production sizes
#: the table at 1,000,000 for a peak of 200,000, i.e. 80 % headroom at peak. The check fails below 20 %.
DEFAULT_CONNTRACK_PEAK = 200000
CT_HEADROOM_MIN = 0.2


@dataclass
class CtReading:
    """One node's connection-tracking table as the datapath uses it: Cilium's BPF CT map or nf_conntrack."""

    table: str        # "bpf-ct" | "nf_conntrack"
    entries: int
    max_entries: int


def judge_ct_rise(before: dict[str, CtReading], during: dict[str, CtReading], load: int) -> str | None:
    """The table must have grown by at least the load while it was held: proof the measurement sees our flows."""
    missing = sorted(set(before) ^ set(during))
    if missing:
        raise NotMeasured(f"conntrack table read on some nodes only (missing before or during the load: {missing})")
    rise = sum(during[n].entries - before[n].entries for n in during)
    if rise < load:
        tables = sorted({r.table for r in during.values()})
        kind = "NAT table" if tables == ["bpf-nat"] else "conntrack table"
        return (f"the {kind} ({'/'.join(tables)}) grew by {rise} entries while {load} connections were "
                f"held: the measurement does not see these flows (wrong table for this datapath?)")
    return None


def judge_ct_capacity(before: dict[str, CtReading], peak: int, minimum: float = CT_HEADROOM_MIN) -> tuple[dict, list]:
    """Headroom per node at the declared peak: 1 - (entries now + peak) / max. Never a fraction of the table."""
    headroom, problems = {}, []
    for node, r in sorted(before.items()):
        if r.max_entries <= 0:
            raise NotMeasured(f"{node}: {r.table} reports max {r.max_entries} entries")
        headroom[node] = round(1 - (r.entries + peak) / r.max_entries, 3)
        if headroom[node] < minimum:
            problems.append(f"{node}: {r.table} holds {r.max_entries} entries; with {r.entries} in use and the "
                            f"declared peak of {peak} the headroom is {headroom[node]:.0%} (< {minimum:.0%}): "
                            "raise the table size or --conntrack-peak is wrong")
    return headroom, problems


BPF_MAP_NAMES = {"bpf-ct": "BPF conntrack map", "bpf-nat": "BPF NAT map"}


def parse_bpf_ct(node: str, rc: int | None, stdout: str, stderr: str, table: str = "bpf-ct") -> CtReading:
    """Output of a map read script in the Cilium agent (cilium.CT_READ_SCRIPT, NAT_READ_SCRIPT): 'ENTRIES MAX';
    any failure is NotMeasured with its message."""
    m = re.fullmatch(r"\s*(\d+)\s+(\d+)\s*", stdout or "")
    if rc != 0 or not m:
        raise NotMeasured(f"{node}: reading Cilium's {BPF_MAP_NAMES.get(table, table)} failed (exit {rc}): "
                          f"{(stderr or stdout or '').strip()[:300] or 'no output'}")
    return CtReading(table, int(m.group(1)), int(m.group(2)))


def nf_conntrack_reading(node: str, facts: dict) -> CtReading:
    ct = facts.get("conntrack") or {}
    if not isinstance(ct.get("count"), int) or not isinstance(ct.get("max"), int):
        errors = "; ".join(f"{e.get('what')}: {e.get('error')}" for e in facts.get("errors") or [])
        raise NotMeasured(f"{node}: nf_conntrack count/max unreadable ({errors or 'absent from facts'})")
    return CtReading("nf_conntrack", ct["count"], ct["max"])


def default_connections(expected_conntrack_max: int | None, clients: int, cap: int = 20000) -> int:
    """Load per path: a quarter of nf_conntrack_max (never near exhaustion), at most ``cap``. The load proves the
    datapath carries and tracks held flows; capacity is judged against the declared peak, not against this."""
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
    streak: int = 0                                          # consecutive full matches at the end
    mismatched: list[dict] = field(default_factory=list)     # every observation that did not match, for the report
    leaks: dict[str, list[int]] = field(default_factory=dict)  # cell id -> polls where a BLOCKED cell connected
    reprobed: list[dict] = field(default_factory=list)       # per poll: allowed cells probed again, and how

    def record(self) -> dict:
        """What the JSON report keeps: poll count, streak, every mismatching observation, every leak, every
        re-probe of an allowed cell."""
        return {"matched": self.matched, "polls": self.polls, "streak": self.streak,
                "transport_failures": self.transport_failures, "mismatched_observations": self.mismatched,
                "leaks": self.leaks, "reprobed": self.reprobed}

    @property
    def recovered_on_reprobe(self) -> int:
        return sum(len(r["recovered"]) for r in self.reprobed)


DEFAULT_CONSECUTIVE = 3


def leaked_cells(expected: TruthTable, observed: TruthTable) -> list[tuple[str, Target]]:
    """Cells expected BLOCKED that were observed CONNECTED: a denial that let a flow through."""
    return [(s, t) for (s, t), exp in expected.cells.items()
            if exp is Expect.BLOCKED and observed.get(s, t) is Verdict.CONNECTED]


def lost_allowed_cells(expected: TruthTable, observed: TruthTable) -> list[tuple[str, Target]]:
    """Cells expected CONNECTED that got no answer at all (timeout, unreachable): a lost packet or a dropped flow;
    never a leak, a refusal or a reset."""
    return [(s, t) for s, t in mismatches(expected, observed)
            if expected.get(s, t) is Expect.CONNECTED and observed.get(s, t) in BLOCKED_VERDICTS]


def reprobe_lost(expected: TruthTable, table: TruthTable, reprobe, transport_errors: tuple, poll: int) -> dict | None:
    """Probe once more, at once, the allowed cells this observation lost; the ones that connect now count as
    connected in it. Returns the record ({poll, recovered, still}) or None when nothing was lost."""
    lost = lost_allowed_cells(expected, table)
    if not lost:
        return None
    try:
        again = reprobe(lost)
    except transport_errors as exc:
        return {"poll": poll, "recovered": [], "still": [cell_id(s, t) for s, t in lost],
                "transport_error": str(exc)[:300]}
    recovered = [(s, t) for s, t in lost if again.get(s, t) is Verdict.CONNECTED]
    for s, t in recovered:
        table.set(s, t, Verdict.CONNECTED)
    return {"poll": poll, "recovered": [cell_id(s, t) for s, t in recovered],
            "still": [cell_id(s, t) for s, t in lost if (s, t) not in recovered]}


def poll_table(expected: TruthTable, observe: Callable[[], TruthTable], seconds: float, interval: float = 2.0,
               transport_errors: tuple = (Exception,), clock=time.monotonic, sleep=time.sleep,
               consecutive: int = DEFAULT_CONSECUTIVE, enforced: bool = True,
               reprobe: Callable[[list[tuple[str, Target]]], TruthTable] | None = None) -> Convergence:
    """Observe the WHOLE table until ``consecutive`` observations in a row match, or ``seconds`` pass without one.

    ``seconds`` bounds convergence: the time until a streak of matches begins. A streak under way when the deadline
    passes is observed to its end (at most ``consecutive - 1`` more observations) and fails as soon as one of them
    does not match: where one observation of the whole table takes about as long as the deadline (240 cells under
    TCG took 55-72 s against a 60 s deadline), the confirmations would otherwise never fit.

    A cell never passes on its own: only complete observations that match count, and any observation that does
    not (or a transport failure: exec error, ERROR verdicts) resets the streak. Every mismatching observation is
    recorded. A BLOCKED cell observed CONNECTED is a leak and ends the poll as a failure at once -- never retried
    into a pass -- when ``enforced`` (the enforcement barrier passed before the first poll); without a barrier
    (``enforced=False``) leaks before the first full match are enforcement lag (recorded), later ones fail.

    With ``reprobe(cells) -> table``, the allowed cells an observation lost (no answer: timeout, unreachable) are
    probed once more at once and count as connected when they connect then: on a loaded node one probe's packets
    can be lost (a UDP echo, a CoreDNS replica restarting) without any policy saying so. Only that direction is
    re-probed: a blocked cell that connected is a leak and never probed again. Every re-probe is recorded.
    """
    start = clock()
    result = Convergence(False, 0.0, 0, 0, None, "")
    seen_match = False
    longest = 0
    while True:
        result.polls += 1
        try:
            table = observe()
        except transport_errors as exc:
            result.transport_failures += 1
            result.streak = 0
            result.mismatched.append({"poll": result.polls, "transport_error": str(exc)[:300]})
            table = None
        if table is not None and reprobe is not None:
            again = reprobe_lost(expected, table, reprobe, transport_errors, result.polls)
            if again is not None:
                result.reprobed.append(again)
        if table is not None:
            result.last = table
            bad = mismatches(expected, table)
            if any(v in TRANSPORT_FAILURES for v in table.cells.values()):
                result.transport_failures += 1
            if bad:
                result.streak = 0
                result.mismatched.append({"poll": result.polls, "at_s": round(clock() - start, 3), "cells": {
                    cell_id(s, t): (table.get(s, t).value if table.get(s, t) is not None else None) for s, t in bad}})
                leaks = leaked_cells(expected, table)
                for s, t in leaks:
                    result.leaks.setdefault(cell_id(s, t), []).append(result.polls)
                if leaks and (enforced or seen_match):
                    result.seconds = clock() - start
                    result.text = (f"{len(leaks)} blocked cell(s) connected at poll {result.polls} "
                                   f"({'after the enforcement barrier' if enforced else 'after the table had matched'}"
                                   f"; a leak is never retried into a pass): "
                                   f"{', '.join(expected.describe(s, t) for s, t in leaks)}\n"
                                   + render_diff(expected, table))
                    return result
            else:
                seen_match = True
                result.streak += 1
                longest = max(longest, result.streak)
                if result.streak >= consecutive:
                    result.matched, result.seconds = True, clock() - start
                    result.text = render_diff(expected, table)
                    return result
        if clock() - start >= seconds and result.streak == 0:
            result.seconds = clock() - start
            text = render_diff(expected, result.last) if result.last is not None else "no complete observation"
            result.text = (f"tables did not match {consecutive} times in a row within {seconds:.0f}s "
                           f"({result.polls} polls, longest streak {longest}, "
                           f"{result.transport_failures} transport failures):\n{text}")
            return result
        sleep(interval)


# ---------------------------------------------------------------------------------------------- judged as the checks do
# (pure functions the checks in conformance/test_*.py call, so the fault matrix in tests/netns feeds them real outputs)


def judge_underlay(underlay: dict[str, int], expected: int | None) -> list[str]:
    """Node default-route MTUs: each equals the expected underlay MTU (when given) and all nodes agree."""
    problems = []
    if expected:
        wrong = {n: m for n, m in underlay.items() if m != expected}
        if wrong:
            problems.append(f"node underlay MTU differs from the expected {expected}: {wrong}")
    if len(set(underlay.values())) > 1:
        problems.append(f"nodes disagree on the underlay MTU: {underlay}")
    return problems


def judge_kernels(kernels: dict[str, str]) -> str | None:
    old = {n: k for n, k in kernels.items() if not kernel_at_least(k)}
    if old:
        return f"kernel older than 5.10 on {old}: Cilium kube-proxy replacement with BPF masquerading needs 5.10+"
    return None


def kube_proxy_daemonsets(daemonsets) -> list[str]:
    """kube-proxy DaemonSets among API objects (kubernetes client V1DaemonSet): by name or k8s-app label."""
    return [f"{ds.metadata.namespace}/{ds.metadata.name}" for ds in daemonsets
            if ds.metadata.name == "kube-proxy" or (ds.metadata.labels or {}).get("k8s-app") == "kube-proxy"]


def judge_kpr(node: str, rc: int | None, stdout: str) -> str | None:
    """`cilium-dbg status` in one agent: KubeProxyReplacement must be active and the command must have worked."""
    from lab.cilium_status import cilium_kpr
    active, value = cilium_kpr(stdout or "")
    if rc != 0 or not active:
        return f"{node}: KubeProxyReplacement {value} (exit {rc})"
    return None


def judge_backend_answer(answer: dict | None, prefix: str = "backend-") -> str | None:
    """An HTTP answer through the LoadBalancer IP: `serve --http`'s JSON naming a backend pod."""
    if answer is None:
        return "no HTTP answer through the LoadBalancer IP"
    if not str(answer.get("host", "")).startswith(prefix):
        return f"answer from an unexpected host: {answer}"
    return None


def peer_host(answer: dict) -> str:
    """The client address a `serve --http` backend saw (its ``peer``, "IP:PORT"), without the port."""
    peer = str(answer.get("peer") or "")
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or "]:" in peer else peer  # serve's "IP:PORT"
    return host.strip("[]")


def judge_source_preserved(answer: dict | None, client_ip: str) -> str | None:
    """externalTrafficPolicy Local: the backend sees the client's own address."""
    if answer is None:
        return "no HTTP answer through the LoadBalancer IP"
    if peer_host(answer) != client_ip:
        return (f"the backend saw {answer.get('peer')}, not the client {client_ip}: the source was NATed "
                "(externalTrafficPolicy Local not honoured)")
    return None


def judge_announcer(ip: str, mac: str | None, macs: dict[str, set[str]]) -> tuple[str | None, str | None]:
    """The runner's neighbour entry for ip -> (the node owning that MAC, problem or None)."""
    if not mac:
        return None, f"the runner has no neighbour entry for {ip}: nothing answered ARP (no L2Advertisement?)"
    owners = sorted(n for n, m in macs.items() if mac in m)
    if len(owners) != 1:
        return None, f"{ip} is at {mac}, which belongs to {owners or 'no node'}; expected exactly one"
    return owners[0], None


def judge_requested_ip(want: str, got: str | None) -> str | None:
    return None if got == want else f"asked for {want} (metallb.io/loadBalancerIPs), got {got}"


def judge_beyond_pool(beyond: str, pool: list[str], ingress, events: list[str]) -> list[str]:
    """A Service asking for an address outside every pool: no ingress, and an AllocationFailed event."""
    problems = []
    if ip_in_pool(beyond, pool):
        problems.append(f"{beyond} is inside the pool {pool}: the scenario proves nothing")
    if ingress:
        problems.append(f"{beyond} is outside the pool {pool} but the Service got {ingress}")
    if "AllocationFailed" not in events:
        problems.append(f"no AllocationFailed event (events: {events or 'none'})")
    return problems


def judge_failover(seconds: float | None, bound: float, waited: float | None = None) -> tuple[dict, str | None]:
    """Measured failover time against the bound (``--failover-seconds``). ``seconds`` None: no failover seen within
    ``waited`` seconds. The record goes into the JSON report either way."""
    record = {"failover_bound_seconds": bound, "failover_completed": seconds is not None,
              "failover_seconds": round(seconds if seconds is not None else (waited or bound), 2)}
    record["failover_within_bound"] = seconds is not None and seconds <= bound
    if seconds is None:
        return record, (f"no failover within the bound of {bound:.0f}s (--failover-seconds): waited "
                        f"{record['failover_seconds']:.1f}s")
    if seconds > bound:
        return record, f"failover took {seconds:.1f}s, over the bound of {bound:.0f}s (--failover-seconds)"
    return record, None


# ---------------------------------------------------------------------------------------------- outside in
# (conformance/test_outside_in.py: the runner, outside the cluster, through a LoadBalancer VIP to backends under policy)


def node_ips_from_facts(facts: dict[str, dict]) -> dict[str, list[str]]:
    """node -> every IPv4 address on its links (``netprobe facts`` ``interfaces[].ipv4``): the InternalIP, and
    Cilium's ``cilium_host`` router address, which kube-proxy replacement SNATs north-south requests to when it
    forwards them over the tunnel to a backend on another node. A node whose addresses could not be listed is
    :class:`NotMeasured`: an address nobody can place is never judged."""
    import ipaddress as ipa
    out, problems = {}, []
    for node, doc in sorted(facts.items()):
        links = doc.get("interfaces") or []
        if not links or any(link.get("ipv4") is None for link in links):
            errors = "; ".join(f"{e.get('what')}: {e.get('error')}" for e in doc.get("errors") or [])
            problems.append(f"{node}: IPv4 addresses unreadable ({errors or 'no interfaces in facts'})")
            continue
        out[node] = sorted({str(ipa.ip_interface(a).ip) for link in links for a in link["ipv4"]})
    if problems:
        raise NotMeasured("cannot tell the nodes' addresses: " + "; ".join(problems))
    return out


def judge_cross_node(announcer: str | None, backend_node: str | None) -> str | None:
    """The backend must run on another node than the one announcing the VIP, so the path crosses nodes (ARP ->
    announcing node -> nodeport -> overlay -> backend). Either node unknown is NotMeasured, never a pass."""
    if not announcer or not backend_node:
        raise NotMeasured(f"cannot place the path: announcing node {announcer or 'unknown'}, backend on "
                          f"{backend_node or 'unknown node'}")
    if announcer == backend_node:
        return (f"the backend runs on {backend_node}, the node announcing the VIP: the path does not cross nodes, "
                "so nodeport forwarding, SNAT and the overlay are not exercised")
    return None


def judge_snat_source(answer: dict | None, client_ip: str, node_ips: dict[str, list[str]],
                      announcer: str | None = None) -> tuple[dict, str | None]:
    """externalTrafficPolicy Cluster, backend on another node than the announcer: the announcing node SNATs, so
    the backend sees a node's address, never the client's. Returns ({peer_seen_by_backend, snat_node,
    snat_by_announcer}, problem). Which node address it is (InternalIP or Cilium's cilium_host) is recorded."""
    if answer is None:
        return {}, "no HTTP answer through the LoadBalancer IP"
    peer = peer_host(answer)
    owners = sorted(n for n, ips in node_ips.items() if peer in ips)
    record = {"peer_seen_by_backend": peer, "snat_node": owners[0] if len(owners) == 1 else None,
              "snat_by_announcer": bool(announcer) and owners == [announcer]}
    if peer == client_ip:
        return record, (f"the backend saw the client {client_ip} itself: externalTrafficPolicy Cluster to a backend "
                        "on another node was not SNATed (DSR mode, or a datapath that skipped the nodeport NAT)")
    if len(owners) != 1:
        return record, (f"the backend saw {peer}, which is {'the address of ' + ', '.join(owners) if owners else 'no node address'}"
                        f" and not the client {client_ip}: expected exactly one node's address (SNAT by the "
                        "announcing node)")
    return record, None


def judge_open_rate(total: dict, min_rate: float, max_p99_ms: float) -> list[str]:
    """`netprobe load` totals (judge_load) against the bounds: connection-open rate at least ``min_rate`` per
    second (--lb-min-open-rate) and p99 connect time at most ``max_p99_ms`` (--lb-max-connect-p99-ms)."""
    problems = []
    rate, p99 = float(total.get("open_rate_per_s") or 0.0), float(total.get("connect_ms_p99") or 0.0)
    if rate < min_rate:
        problems.append(f"connection-open rate {rate:.1f}/s is below the bound of {min_rate:g}/s "
                        "(--lb-min-open-rate)")
    if p99 > max_p99_ms:
        problems.append(f"p99 connect time {p99:.1f} ms is over the bound of {max_p99_ms:g} ms "
                        "(--lb-max-connect-p99-ms; over 1 s means SYNs were lost and retransmitted)")
    return problems


def judge_table_rises(node: str, before: dict[str, CtReading], during: dict[str, CtReading], load: int) -> list[str]:
    """Every datapath table read on ``node`` (table name -> reading: bpf-ct, bpf-nat or nf_conntrack) must have
    grown by at least ``load`` entries while the load was held: proof the load went through that node's
    datapath. A table read before but not during (or the reverse) is NotMeasured."""
    if set(before) != set(during) or not before:
        raise NotMeasured(f"{node}: tables read before {sorted(before)} and during the load {sorted(during)} differ")
    problems = []
    for table in sorted(before):
        rise = judge_ct_rise({node: before[table]}, {node: during[table]}, load)
        if rise:
            problems.append(f"{node}: {rise}")
    return problems
