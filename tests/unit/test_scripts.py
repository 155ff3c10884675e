"""Every shell script of the project passes shellcheck (warnings and errors) and `bash -n`."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*ROOT.glob("scripts/*.sh"), *ROOT.glob("images/offline/*.sh"), ROOT / ".ci" / "run"])


def test_there_are_scripts():
    assert len(SCRIPTS) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: `make sysdeps-test` installs it (Debian package shellcheck)")
    proc = subprocess.run(["shellcheck", "-S", "warning", "-x", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
