"""The conformance suite against the real CI cluster, exactly as users run it: `make conformance` (both stages) from
the runner on the lab's L2 (inside labns), probes in the bundle's probe image. Records the suite's wall time and
every check's time (results/cluster-conformance.json)."""
from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager

import pytest

from clusterlab import RESULTS, ROOT, SPEC, TCG_CONNTRACK_ARGS
from labrun import in_netns

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def run_make_conformance(state_dir, results_dir, *pytest_args: str, timeout: float = 5400):
    env = {**os.environ, "LAB_STATE_DIR": str(state_dir)}
    argv = in_netns(["make", "-s", "conformance", f"LAB={SPEC.relative_to(ROOT)}", "CONFORMANCE_WORKERS=2",
                     "PYTEST_ARGS=" + " ".join(["--results-dir", str(results_dir), "-p", "no:cacheprovider",
                                                *pytest_args])])
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


#: ext/c2's address for the default-deny step 4 (an ipBlock `except` needs it distinct from ext/web at the lab's
#: gateway): a /32 on the runner's loopback in labns, which pods reach through their nodes' default route to the
#: gateway. TEST-NET-2: routed nowhere else. Added for the run, removed afterwards.
OUTSIDE_IP = "198.51.100.66"


@contextmanager
def second_runner_address():
    subprocess.run(in_netns(["ip", "addr", "replace", f"{OUTSIDE_IP}/32", "dev", "lo"]), check=True, timeout=30)
    try:
        yield OUTSIDE_IP
    finally:
        subprocess.run(in_netns(["ip", "addr", "del", f"{OUTSIDE_IP}/32", "dev", "lo"]), check=False, timeout=30)


def check_times(junit_paths) -> dict[str, dict]:
    out = {}
    for path in junit_paths:
        if not path.is_file():
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = tag
            out[f"{case.get('classname')}::{case.get('name')}"] = {"seconds": float(case.get("time") or 0),
                                                                   "outcome": outcome}
    return out


def test_conformance_passes_on_the_healthy_cluster(cluster, cluster_state):
    results = RESULTS / "conformance-healthy"
    with second_runner_address() as outside_ip:
        proc, wall = run_make_conformance(cluster_state, results, "--outside-ip", outside_ip, *TCG_CONNTRACK_ARGS)
    times = check_times([ROOT / "results/junit.xml", ROOT / "results/junit-disruptive.xml"])
    (RESULTS / "cluster-conformance.json").write_text(json.dumps({"wall_seconds": round(wall, 1),
                                                                  "checks": times}, indent=2))
    print(f"conformance wall time {wall:.0f}s")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"  {t['seconds']:7.1f}s {t['outcome']:8} {name}")
    assert times, f"no JUnit results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"conformance failed on the healthy cluster:\n{proc.stdout[-8000:]}"
    assert all(t["outcome"] == "passed" for t in times.values()), \
        {k: v for k, v in times.items() if v["outcome"] != "passed"}
