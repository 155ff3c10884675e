"""`make conformance` runs its first stage with `-n 2 --dist loadgroup` and relies on `xdist_group` markers: the four
default-deny steps share one world (their module fixture), and the checks that share MetalLB's speakers run on one
worker. With pytest 9.2 and pytest-xdist 3.8 the markers were silently ignored (xdist sets the grouped node id on
an attribute pytest 9.2 no longer reads): on the real cluster the steps ran on both workers, each building its own
world. This runs the installed pytest and xdist the way the Makefile does."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_xdist_group_keeps_marked_checks_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(textwrap.dedent("""
        import os
        import pytest
        pytestmark = [pytest.mark.xdist_group("shared_world")]

        @pytest.mark.parametrize("i", range(6))
        def test_step(i):
            with open(os.path.join(os.environ["GROUP_OUT"], f"step{i}.worker"), "w") as out:
                out.write(os.environ["PYTEST_XDIST_WORKER"])
        """))
    (tmp_path / "test_free.py").write_text(textwrap.dedent("""
        import pytest
        @pytest.mark.parametrize("i", range(6))
        def test_free(i):
            pass
        """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2",
                           "--dist", "loadgroup", "--basetemp", str(tmp_path / "base"), str(tmp_path)],
                          cwd=tmp_path, env={**os.environ, "GROUP_OUT": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    workers = {p.name: p.read_text() for p in tmp_path.glob("step*.worker")}
    assert len(workers) == 6, workers
    assert len(set(workers.values())) == 1, f"grouped checks ran on several workers: {workers}"
