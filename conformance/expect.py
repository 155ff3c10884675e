"""Named verdicts and truth tables: what a probe observed, what a check expects, and how they differ.

A *verdict* is what ``netprobe connect`` observed for one flow (``connected``, ``timeout``, ...).
An *expectation* is what the oracle or a check wants: ``CONNECTED`` (allowed) or ``BLOCKED`` (denied by policy).
A :class:`TruthTable` holds one value per (source, target) cell; cells have readable ids such as
``ns-a/frontend->ns-b/backend:8080/TCP``. A table may label its cells (``labels``: where the flow runs, e.g.
``same-node`` / ``cross-node``); ``describe`` appends the label, so every message naming a cell says where it ran.
``render_diff`` prints expected and observed side by side with the differing cells marked, which is what a failing
check shows.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from lab.table import render_table


class Verdict(str, enum.Enum):
    """An observed outcome of one probe, exactly the names ``netprobe connect`` prints."""

    CONNECTED = "connected"
    REFUSED = "refused"          # reached the host, nothing listens (RST / ICMP port unreachable)
    TIMEOUT = "timeout"          # no answer: dropped on the way (how Cilium enforces a deny)
    UNREACHABLE = "unreachable"  # ICMP host/net unreachable or administratively prohibited
    RESET = "reset"              # connection reset after it was established
    ERROR = "error"              # the probe could not judge (local error): a transport failure, retried

    @classmethod
    def parse(cls, text: str) -> "Verdict":
        try:
            return cls(str(text).lower())
        except ValueError:
            raise ValueError(f"unknown verdict {text!r}; netprobe prints one of "
                             f"{', '.join(v.value for v in cls)}") from None


class Expect(str, enum.Enum):
    """An expected outcome: what policy semantics say should happen to a flow."""

    CONNECTED = "connected"  # allowed: the probe must connect
    BLOCKED = "blocked"      # denied: the probe must be dropped (timeout) or rejected (unreachable)


#: Observed verdicts that count as "blocked by policy". REFUSED is not among them: our targets always listen,
#: so a refusal means the target is wrong, not that a policy worked. RESET and ERROR never satisfy anything.
BLOCKED_VERDICTS = frozenset({Verdict.TIMEOUT, Verdict.UNREACHABLE})

#: Observed verdicts that say nothing about the network: the probe itself failed; only these are retried.
TRANSPORT_FAILURES = frozenset({Verdict.ERROR})


def satisfies(expected: Expect, observed: Verdict | None) -> bool:
    """Whether one observed verdict meets one expectation. ``None`` (not probed) satisfies nothing."""
    if observed is None:
        return False
    if expected is Expect.CONNECTED:
        return observed is Verdict.CONNECTED
    return observed in BLOCKED_VERDICTS


@dataclass(frozen=True, order=True)
class Target:
    """Where a probe goes: a pod (``ns/name``) or an outside host (``ext/name``), a port and a protocol."""

    id: str        # "ns-b/backend" or "ext/c2"
    port: int
    proto: str = "TCP"

    def __str__(self) -> str:
        return f"{self.id}:{self.port}/{self.proto.upper()}"


def cell_id(source: str, target: Target | str) -> str:
    return f"{source}->{target}"


_SHORT = {
    Verdict.CONNECTED: "ok", Verdict.REFUSED: "refused", Verdict.TIMEOUT: "timeout",
    Verdict.UNREACHABLE: "unreach", Verdict.RESET: "reset", Verdict.ERROR: "ERROR",
    Expect.CONNECTED: "ok", Expect.BLOCKED: "blocked",
}


@dataclass
class TruthTable:
    """Rows are sources, columns are targets, each cell an :class:`Expect` or a :class:`Verdict`."""

    sources: list[str]
    targets: list[Target]
    cells: dict[tuple[str, Target], object] = field(default_factory=dict)
    labels: dict[tuple[str, Target], str] = field(default_factory=dict)  # e.g. "cross-node", for messages

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        self.sources = list(self.sources)

    def set(self, source: str, target: Target, value) -> None:
        if source not in self.sources or target not in self.targets:
            raise KeyError(f"{cell_id(source, target)} is not a cell of this table")
        self.cells[(source, target)] = value

    def get(self, source: str, target: Target):
        return self.cells.get((source, target))

    def describe(self, source: str, target: Target) -> str:
        """The cell's id with its label, e.g. ``a/fe-0->b/be-1:8080/TCP [cross-node]``."""
        label = self.labels.get((source, target))
        return cell_id(source, target) + (f" [{label}]" if label else "")

    def by_id(self) -> dict[str, object]:
        return {cell_id(s, t): self.cells.get((s, t)) for s in self.sources for t in self.targets}

    def render(self, marks: Iterable[tuple[str, Target]] = ()) -> str:
        """A fixed-width grid; cells in ``marks`` are wrapped in ``*...*``."""
        marked = set(marks)
        header = ["source \\ target"] + [str(t) for t in self.targets]
        rows = [header]
        for s in self.sources:
            row = [s]
            for t in self.targets:
                value = self.cells.get((s, t))
                text = _SHORT.get(value, "-") if value is not None else "-"
                row.append(f"*{text}*" if (s, t) in marked else text)
            rows.append(row)
        return render_table(rows)


def mismatches(expected: TruthTable, observed: TruthTable) -> list[tuple[str, Target]]:
    """Cells of ``expected`` whose observed verdict does not satisfy the expectation (missing cells included)."""
    out = []
    for s in expected.sources:
        for t in expected.targets:
            exp = expected.get(s, t)
            if exp is None:
                continue
            if not satisfies(exp, observed.get(s, t)):
                out.append((s, t))
    return out


def render_diff(expected: TruthTable, observed: TruthTable) -> str:
    """Both tables with the differing cells marked, then one line per differing cell."""
    bad = mismatches(expected, observed)
    lines = [f"expected ({len(expected.sources)} sources x {len(expected.targets)} targets):",
             expected.render(bad), "", "observed:", observed.render(bad), ""]
    if bad:
        lines.append(f"{len(bad)} cell(s) differ (marked *...*):")
        for s, t in bad:
            obs = observed.get(s, t)
            lines.append(f"  {expected.describe(s, t)}: expected {expected.get(s, t).value}, observed "
                         f"{obs.value if obs is not None else 'nothing (not probed)'}{_hint(expected.get(s, t), obs)}")
    else:
        lines.append("all cells match")
    return "\n".join(lines)


def _hint(exp, obs) -> str:
    if obs is Verdict.REFUSED:
        return " (nothing listens there: the probe target is wrong, not the policy)"
    if obs is Verdict.ERROR:
        return " (the probe could not run: transport failure)"
    if exp is Expect.BLOCKED and obs is Verdict.CONNECTED:
        return " (policy not enforced: a flow that should be denied got through)"
    if exp is Expect.CONNECTED and obs in BLOCKED_VERDICTS:
        return " (allowed flow dropped: missing allow rule, enforcement lag, or the datapath drops it)"
    return ""


def observed_table(sources: list[str], targets: list[Target], results: Mapping[str, list[dict]],
                   address_of: Mapping[Target, str]) -> TruthTable:
    """Build the observed table from netprobe ``connect`` outputs.

    ``results[source]`` is the JSON list one source printed; ``address_of[target]`` is the ``HOST:PORT``
    that source was told to probe for that target (netprobe echoes it back in ``to``), or ``HOST:PORT/PROTO``
    when the probe protocol is not the target's transport (``/dns``, ``/dns-tcp``, ``/http``).
    """
    table = TruthTable(sources, targets)
    for source in sources:
        rows = results.get(source, [])
        by_to = {(_address(r.get("to")), str(r.get("proto", "")).upper()): r for r in rows}
        exact = {str(r.get("to")): r for r in rows}
        for target in targets:
            where = address_of[target]
            # "HOST:PORT/dns": the probe protocol differs from the target's transport; match netprobe's `to` exactly
            row = exact.get(where) if "/" in where else by_to.get((where, target.proto.upper()))
            if row is not None:
                table.set(source, target, Verdict.parse(row["verdict"]))
    return table


def _address(to) -> str:
    """``HOST:PORT`` from netprobe's ``to`` field, which may carry a ``/PROTO`` suffix."""
    return str(to).split("/", 1)[0]
