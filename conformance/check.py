"""One declarative policy check and one runner (the shape of cilium-cli's connectivity tests).

A :class:`PolicyCheck` names its workloads' flows (sources x targets), the policies it applies and the oracle's
expectation with and without them. :func:`run_policy_check` runs it the same way every time:

    remove policies -> barrier -> BASELINE (every flow the policies must block connects, same pods, same check)
    apply policies  -> barrier -> observe until K consecutive full matches -> diff -> drop reason per blocked cell

A failed baseline fails the check naming the cells that did not connect: a denial observed as a timeout proves
nothing unless the same flow connected without the policy moments before. Each check is self-contained, so a
default-deny step never relies on an earlier step having run or passed.

The cluster-specific parts come in through two small interfaces: an :class:`EnforcementBarrier` (Cilium: every
agent's policy revision, ``conformance.cilium``) and a :class:`DropSource` (Hubble). Either may be absent; the
result then says so explicitly and never turns the absence into a pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from conformance.expect import Expect, Target, TruthTable, Verdict, cell_id, mismatches
from conformance.judge import DEFAULT_CONSECUTIVE, Convergence, poll_table

#: Hubble drop reasons that mean "a policy denied it" (Cilium api/v1/flow DropReason names).
POLICY_DROP_REASONS = frozenset({"POLICY_DENIED", "POLICY_DENY", "AUTH_REQUIRED"})
REASON_UNAVAILABLE = "drop reason unavailable"


@dataclass(frozen=True)
class FlowKey:
    """How a cell's packets look on the wire: source IP, destination IPs (a Service: its backends), port, proto."""

    src_ip: str
    dst_ips: frozenset
    port: int
    proto: str  # "TCP" | "UDP"


@dataclass(frozen=True)
class Drop:
    """One dropped flow as the datapath reported it."""

    src_ip: str
    dst_ip: str
    port: int
    proto: str
    reason: str


@dataclass
class BarrierResult:
    passed: bool       # every agent reached the revision after the change
    text: str          # what was waited for, or why the barrier was skipped


class EnforcementBarrier(Protocol):
    def mark(self) -> object:
        """State before a policy change (e.g. each agent's revision)."""

    def wait(self, mark: object, changes: int, seconds: float) -> BarrierResult:
        """Block until the change is enforced everywhere; raise on a deadline; ``passed=False`` = skipped."""


class DropSource(Protocol):
    def drops(self, since: float) -> list[Drop]:
        """Every drop since the wall-clock time ``since``; raise NotMeasured when it cannot be read."""


class NoBarrier:
    """No Cilium (or no way to read enforcement): the barrier is skipped with a reason; leaks before the first
    full match count as enforcement lag, later ones fail."""

    def __init__(self, reason: str):
        self.reason = reason

    def mark(self):
        return None

    def wait(self, mark, changes, seconds) -> BarrierResult:
        return BarrierResult(False, f"enforcement barrier skipped: {self.reason}")


@dataclass
class PolicyCheck:
    name: str
    sources: list[str]
    targets: list[Target]
    policies: list[dict]
    expected: TruthTable              # the oracle with the policies applied
    baseline: TruthTable              # the oracle with no policy (what must connect first)
    flow_keys: dict = field(default_factory=dict)  # (source, Target) -> FlowKey, for drop reasons

    def blocked_cells(self) -> list[tuple[str, Target]]:
        return [c for c, e in sorted(self.expected.cells.items()) if e is Expect.BLOCKED]


@dataclass
class CheckResult:
    passed: bool
    text: str
    baseline: Convergence | None = None
    enforced: Convergence | None = None
    barrier: list[str] = field(default_factory=list)
    drop_reasons: dict[str, str] = field(default_factory=dict)  # blocked cell id -> reason (or "unavailable: ...")

    def record(self) -> dict:
        return {"baseline": self.baseline.record() if self.baseline else None,
                "enforced": self.enforced.record() if self.enforced else None,
                "barrier": self.barrier, "drop_reasons": self.drop_reasons}


def baseline_failures(check: PolicyCheck, observed: TruthTable | None) -> list[str]:
    """Cells the policies must block that did not connect without any policy (or were not observed)."""
    out = []
    for s, t in check.blocked_cells():
        got = observed.get(s, t) if observed is not None else None
        if got is not Verdict.CONNECTED:
            out.append(f"{check.expected.describe(s, t)} ({got.value if got is not None else 'not observed'})")
    return out


def judge_drop_reasons(check: PolicyCheck, drops: list[Drop] | None, unavailable: str = "") \
        -> tuple[dict[str, str], list[str]]:
    """Per blocked cell: the datapath's drop reason. A reason other than policy is a problem naming it; no drop
    source, or no drop seen for a cell, is recorded as "drop reason unavailable" -- information, never a pass."""
    reasons, problems = {}, []
    for s, t in check.blocked_cells():
        cid = cell_id(s, t)
        key = check.flow_keys.get((s, t))
        if drops is None or key is None:
            reasons[cid] = f"{REASON_UNAVAILABLE}: {unavailable or 'no flow key for this cell'}"
            continue
        found = sorted({d.reason for d in drops if d.src_ip == key.src_ip and d.dst_ip in key.dst_ips
                        and d.port == key.port and d.proto.upper() == key.proto.upper()})
        if not found:
            reasons[cid] = f"{REASON_UNAVAILABLE}: no drop of this flow reported"
            continue
        reasons[cid] = ",".join(found)
        other = [r for r in found if r not in POLICY_DROP_REASONS]
        if other:
            problems.append(f"{check.expected.describe(s, t)}: dropped for {', '.join(other)}, not by policy")
    return reasons, problems


def run_policy_check(check: PolicyCheck, apply: Callable[[list[dict]], int], observe: Callable[[], TruthTable],
                     barrier: EnforcementBarrier, drop_source: DropSource | None, seconds: float,
                     consecutive: int = DEFAULT_CONSECUTIVE, transport_errors: tuple = (Exception,),
                     interval: float = 2.0, clock=time.monotonic, sleep=time.sleep, wall=time.time,
                     unavailable: str = "", reprobe=None) -> CheckResult:
    """The one runner. ``apply(manifests)`` replaces the policies and returns how many objects changed;
    ``reprobe(cells)`` (optional) probes some cells again: see poll_table."""
    result = CheckResult(False, "")
    mark = barrier.mark()
    changed = apply([])
    b = barrier.wait(mark, changed, seconds)
    result.barrier.append(f"baseline: {b.text}")
    # The baseline has only CONNECTED expectations: polling it cannot turn a denial into a pass.
    result.baseline = poll_table(check.baseline, observe, seconds, interval, transport_errors, clock, sleep,
                                 consecutive=1, enforced=True, reprobe=reprobe)
    failed = baseline_failures(check, result.baseline.last)
    if failed or result.baseline.last is None:
        result.text = (f"{check.name}: baseline failed, so no denial can be judged: {len(failed)} cell(s) the policy "
                       f"must block did not connect without any policy (dead target, unready pod or broken "
                       f"datapath):\n  " + "\n  ".join(failed or ["no complete observation"]))
        return result
    mark = barrier.mark()
    since = wall()
    changed = apply(check.policies)
    b = barrier.wait(mark, changed, seconds)
    result.barrier.append(f"policies: {b.text}")
    result.enforced = poll_table(check.expected, observe, seconds, interval, transport_errors, clock, sleep,
                                 consecutive=consecutive, enforced=b.passed, reprobe=reprobe)
    problems = [] if result.enforced.matched else [result.enforced.text]
    if result.enforced.matched and check.blocked_cells():
        drops = None
        if drop_source is not None:
            drops = drop_source.drops(since)
        result.drop_reasons, why = judge_drop_reasons(check, drops, unavailable)
        problems += why
    result.passed = not problems
    bad = len(mismatches(check.expected, result.enforced.last)) if result.enforced.last else None
    result.text = (f"{check.name}: " + ("\n".join(problems) if problems else
                   f"{consecutive} consecutive matches in {result.enforced.polls} polls") +
                   (f"\n({bad} cell(s) differ in the last observation)" if bad else ""))
    return result


def measure_policy_result(measure: Callable[[str, object], None], check: PolicyCheck, result: CheckResult,
                          record: dict | None = None) -> None:
    """What a policy check puts in the JSON report: its cells, the whole record (baseline, enforced, barrier, drop
    reasons, plus the check's own ``record`` entries such as default deny's placements) and, once enforced, the
    convergence time, polls and retried transport failures."""
    measure("cells", len(check.expected.cells))
    measure("policy", {**result.record(), **(record or {})})
    if result.enforced is not None:
        measure("policy_converge_seconds", round(result.enforced.seconds, 1))
        measure("policy_polls", result.enforced.polls)
        measure("transport_failures_retried", result.enforced.transport_failures)
        measure("cells_recovered_on_reprobe", result.enforced.recovered_on_reprobe)
