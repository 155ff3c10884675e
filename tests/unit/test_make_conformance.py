"""`make conformance`'s two stages and their exit codes, run through the real Makefile with a stand-in for the
virtualenv's python that exits as told per stage: a failing or empty stage fails the target; only a `-k` selection
that leaves the disruptive stage empty (pytest's exit 5) is accepted, as the smoke run needs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STANDIN = """#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> calls.log
for a in "$@"; do [ "$a" = "not disruptive" ] && exit "$S1"; done
exit "$S2"
"""


def make_conformance(tmp_path: Path, stage1: int, stage2: int, pytest_args: str) -> int:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    py = tmp_path / "py"
    py.write_text(STANDIN)
    py.chmod(0o755)
    proc = subprocess.run(["make", "-s", "-o", "venv", "conformance", f"PY={py}", f"PYTEST_ARGS={pytest_args}"],
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "S1": str(stage1), "S2": str(stage2)},
                          capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and "not disruptive" in calls[0] and "--append-report" in calls[1], calls
    return proc.returncode


@pytest.mark.parametrize("stage1,stage2,args,ok", [
    (0, 0, "", True),
    (1, 0, "", False),
    (0, 1, "", False),
    (0, 5, "", False),                 # no disruptive check collected: a failure, not a pass
    (0, 5, "--results-dir r", False),  # other arguments do not make it acceptable
    (0, 5, "-k tuning", True),         # -k chose checks that are all in the first stage
    (0, 1, "-k tuning", False),
    (5, 5, "-k nothing", False),       # -k that selects nothing at all
])
def test_stage_exit_codes(tmp_path, stage1, stage2, args, ok):
    assert (make_conformance(tmp_path, stage1, stage2, args) == 0) is ok
