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

#: measured value -> (better direction, relative tolerance, absolute tolerance). Unknown metrics are shown, not judged.
METRICS = {
    "failover_seconds": ("lower", 0.5, 2.0),
    "lb_ip_seconds": ("lower", 0.5, 5.0),
    "policy_converge_seconds": ("lower", 0.5, 5.0),
    "path_mtu": ("higher", 0.0, 0.0),
    "largest_udp_payload": ("higher", 0.0, 0.0),
    "tcp_bulk_mib_per_s": ("higher", 0.3, 0.0),
    "connections_held": ("higher", 0.0, 0.0),
    "connections_failed": ("lower", 0.0, 0.0),
    "connection_resets": ("lower", 0.0, 0.0),
    "open_rate_per_s": ("higher", 0.3, 0.0),
    "connect_ms_p99": ("lower", 0.5, 5.0),
    "conntrack_drops": ("lower", 0.0, 0.0),
    "fragments_created": ("lower", 0.0, 0.0),
    "sysctl_mismatches": ("lower", 0.0, 0.0),
    "bpf_ct_headroom": ("higher", 0.2, 0.0),
}


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


def _worse(name: str, a, b) -> bool:
    rule = METRICS.get(name)
    if rule is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return False
    direction, rel, absolute = rule
    slack = max(abs(a) * rel, absolute)
    return b > a + slack if direction == "lower" else b < a - slack


def compare(a: dict, b: dict) -> list[Regression]:
    """Regressions from run ``a`` (baseline) to run ``b``."""
    before = {c["id"]: c for c in a["checks"]}
    after = {c["id"]: c for c in b["checks"]}
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
            if name in new["measured"] and _worse(name, value, new["measured"][name]):
                direction = METRICS[name][0]
                out.append(Regression(cid, f"{name} {_fmt(value)} -> {_fmt(new['measured'][name])} "
                                           f"({direction} is better)"))
    return out


def main_report(a_path: str, b_path: str, out=None) -> int:
    """`lab report A.json B.json`: print the comparison; 0 when B has no regression against A, 1 otherwise."""
    out = out or sys.stdout
    a, b = load(a_path), load(b_path)
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
    regressions = compare(a, b)
    if regressions:
        out.write(f"{len(regressions)} regression(s):\n" + "".join(f"  - {r}\n" for r in regressions))
        return 1
    out.write("no regressions\n")
    return 0


def _counts(doc: dict) -> str:
    c = doc["counts"]
    return f"{c['pass']} pass, {c['fail']} fail, {c['error']} error, {c['skip']} skip"
