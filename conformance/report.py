"""The run report: one JSON document per run under ``results/``, a summary table, and comparison of two runs.

Document (``format: kvmlab-conformance/1``)::

    {"format", "started", "finished", "seconds", "exitstatus", "cluster": {...expectations...},
     "counts": {"pass": n, "fail": n, "error": n, "skip": n},
     "checks": [{"id", "check", "verdict": pass|fail|error|skip, "phase", "seconds",
                 "measured": {name: value}, "warnings": [...], "message"}]}

``compare(a, b)`` lists regressions from run A (the last good one) to run B: a check that passed in A and does not
pass in B (failed, errored, skipped or missing), and measured values that got worse beyond their tolerance.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lab.table import render_table

FORMAT = "kvmlab-conformance/1"

#: measured value -> (better direction, relative tolerance, absolute tolerance[, resolution metric]).
#: These are FLOORS: with earlier runs (``--history``) each tolerance grows to SPREAD_FACTOR x the metric's
#: run-to-run spread (max - min over A and the history), so noise is not reported as a regression. A resolution
#: metric is the measurement's step (policy convergence is measured in polls: one poll is never a regression).
#: Unknown metrics are shown, not judged.
METRICS = {
    "failover_seconds": ("lower", 0.5, 2.0),
    "lb_ip_seconds": ("lower", 0.5, 5.0),
    "policy_converge_seconds": ("lower", 0.5, 5.0, "policy_poll_seconds"),
    "policy_polls": ("lower", 0.0, 1.0),
    "path_mtu": ("higher", 0.0, 0.0),
    "largest_udp_payload": ("higher", 0.0, 0.0),
    "tcp_bulk_mib_per_s": ("higher", 0.3, 0.0),
    "connections_held": ("higher", 0.0, 0.0),
    "connections_verified": ("higher", 0.0, 0.0),
    "connections_failed": ("lower", 0.0, 0.0),
    "connection_resets": ("lower", 0.0, 0.0),
    "open_rate_per_s": ("higher", 0.3, 0.0),
    "connect_ms_p99": ("lower", 0.5, 5.0),
    "conntrack_drops": ("lower", 0.0, 0.0),
    "fragments_created": ("lower", 0.0, 0.0),
    "sysctl_mismatches": ("lower", 0.0, 0.0),
    "ct_headroom_at_peak": ("higher", 0.0, 0.02),
}
SPREAD_FACTOR = 2.0


def build(results: list[dict], started: float, settings=None, exitstatus: int = 0) -> dict:
    finished = time.time()
    counts = {v: 0 for v in ("pass", "fail", "error", "skip")}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    cluster = {}
    if settings is not None:
        cluster = {"kubeconfig": settings.kubeconfig, "lab": getattr(settings.lab, "name", None),
                   "probe_image": settings.probe_image, "underlay_mtu": settings.underlay_mtu,
                   "tunnel": settings.tunnel, "lb_pool": settings.lb_pool, "expected_sysctls": settings.expect_sysctls}
    return {"format": FORMAT, "started": _iso(started), "finished": _iso(finished),
            "seconds": round(finished - started, 3), "exitstatus": exitstatus, "cluster": cluster,
            "counts": counts, "checks": results}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def write(doc: dict, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = doc["started"].replace(":", "").replace("-", "")
    path = directory / f"conformance-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"conformance-{stamp}-{n}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    (directory / "conformance-latest.json").write_text(path.read_text())
    return path


def load(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a conformance report (format {doc.get('format')!r}, want {FORMAT!r})")
    return doc


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def summary_table(doc: dict) -> str:
    rows = [("verdict", "check", "seconds", "measured / why")]
    for c in doc["checks"]:
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(c["measured"].items()))
        if c["verdict"] != "pass" and c["message"]:
            detail = (detail + "; " if detail else "") + c["message"].splitlines()[0][:100]
        if c.get("warnings"):
            detail += ("; " if detail else "") + "WARN " + "; ".join(c["warnings"])[:100]
        rows.append((c["verdict"].upper(), c["id"], f"{c['seconds']:.1f}", detail))
    counts = doc["counts"]
    return render_table(rows) + (f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
                                 f"{counts['skip']} skipped (a skip is not a pass) in {doc['seconds']:.0f}s")


@dataclass(frozen=True)
class Regression:
    check: str
    what: str

    def __str__(self) -> str:
        return f"{self.check}: {self.what}"


def spread(docs: list[dict]) -> dict[tuple[str, str], float]:
    """(check id, metric) -> max - min of its numeric values over ``docs`` (two or more values)."""
    values: dict[tuple[str, str], list[float]] = {}
    for doc in docs:
        for c in doc["checks"]:
            for name, v in c["measured"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values.setdefault((c["id"], name), []).append(float(v))
    return {k: max(v) - min(v) for k, v in values.items() if len(v) >= 2}


def tolerance(name: str, a, old: dict, new: dict, noise: float | None) -> float:
    rule = METRICS[name]
    slack = max(abs(a) * rule[1], rule[2])
    if len(rule) > 3:  # one step of the measurement (e.g. one poll) is never a regression
        steps = [m.get(rule[3]) for m in (old, new) if isinstance(m.get(rule[3]), (int, float))]
        slack = max([slack] + steps)
    if noise is not None:
        slack = max(slack, SPREAD_FACTOR * noise)
    return slack


def _worse(name: str, a, b, old: dict | None = None, new: dict | None = None, noise: float | None = None) -> bool:
    rule = METRICS.get(name)
    if rule is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return False
    slack = tolerance(name, a, old or {}, new or {}, noise)
    return b > a + slack if rule[0] == "lower" else b < a - slack


def compare(a: dict, b: dict, history: list[dict] | None = None) -> list[Regression]:
    """Regressions from run ``a`` (baseline) to run ``b``; ``history``: earlier runs giving each metric's spread."""
    before = {c["id"]: c for c in a["checks"]}
    after = {c["id"]: c for c in b["checks"]}
    noise = spread([a, *history]) if history else {}
    out = []
    for cid, old in before.items():
        new = after.get(cid)
        if new is None:
            if old["verdict"] == "pass":
                out.append(Regression(cid, "passed before, not run now"))
            continue
        if old["verdict"] == "pass" and new["verdict"] != "pass":
            why = new["message"].splitlines()[0][:160] if new.get("message") else ""
            out.append(Regression(cid, f"passed before, {new['verdict']} now" + (f": {why}" if why else "")))
        for name, value in old["measured"].items():
            if name in new["measured"] and _worse(name, value, new["measured"][name], old["measured"],
                                                  new["measured"], noise.get((cid, name))):
                direction = METRICS[name][0]
                spread_text = (f", beyond {SPREAD_FACTOR:g}x the spread {_fmt(noise[(cid, name)])} of "
                               f"{len(history) + 1} earlier runs" if (cid, name) in noise else "")
                out.append(Regression(cid, f"{name} {_fmt(value)} -> {_fmt(new['measured'][name])} "
                                           f"({direction} is better{spread_text})"))
    return out


def append(directory: str | Path, doc: dict) -> dict:
    """The first stage's report (results/conformance-latest.json) with ``doc``'s checks added (disruptive stage)."""
    path = Path(directory) / "conformance-latest.json"
    if not path.exists():
        return doc
    first = load(path)
    merged = dict(first, checks=first["checks"] + doc["checks"], finished=doc["finished"],
                  exitstatus=max(int(first.get("exitstatus", 0)), int(doc.get("exitstatus", 0))))
    merged["counts"] = {v: sum(1 for c in merged["checks"] if c["verdict"] == v) for v in ("pass", "fail", "error", "skip")}
    return merged


def main_report(a_path: str, b_path: str, out=None, history: list[str] | None = None) -> int:
    """`lab report A.json B.json [--history R...]`: print the comparison; 0 when B has no regression against A."""
    out = out or sys.stdout
    a, b = load(a_path), load(b_path)
    past = [load(p) for p in history or []]
    out.write(f"A: {a_path} ({a['started']}, {_counts(a)})\nB: {b_path} ({b['started']}, {_counts(b)})\n")
    before = {c["id"]: c for c in a["checks"]}
    for c in b["checks"]:
        old = before.get(c["id"])
        changes = []
        for name, value in sorted(c["measured"].items()):
            prev = (old or {}).get("measured", {}).get(name)
            if prev is not None and prev != value:
                changes.append(f"{name} {_fmt(prev)} -> {_fmt(value)}")
        if old is None:
            out.write(f"  new   {c['id']}: {c['verdict']}\n")
        elif old["verdict"] != c["verdict"] or changes:
            out.write(f"  diff  {c['id']}: {old['verdict']} -> {c['verdict']}"
                      + (f"; {', '.join(changes)}" if changes else "") + "\n")
    if not past:
        out.write("no --history: tolerances are the fixed floors, not the measured run-to-run spread\n")
    regressions = compare(a, b, past)
    if regressions:
        out.write(f"{len(regressions)} regression(s):\n" + "".join(f"  - {r}\n" for r in regressions))
        return 1
    out.write("no regressions\n")
    return 0


def _counts(doc: dict) -> str:
    c = doc["counts"]
    return f"{c['pass']} pass, {c['fail']} fail, {c['error']} error, {c['skip']} skip"
