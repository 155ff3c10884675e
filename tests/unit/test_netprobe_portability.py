"""netprobe runs unchanged in a python:3.x-slim pod, on a node and in our tests: Python 3.9+, stdlib only."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "conformance" / "probes" / "netprobe.py"
VERMIN = Path(sys.executable).with_name("vermin")


def test_needs_nothing_newer_than_python_3_9():
    proc = subprocess.run([str(VERMIN), "-t=3.9-", "--violations", "--no-tips", str(PROBE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vermin_does_catch_newer_syntax(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("def f(x):\n    match x:\n        case 1:\n            return 1\n")
    proc = subprocess.run([str(VERMIN), "-t=3.9-", "--violations", "--no-tips", str(newer)],
                          capture_output=True, text=True)
    assert proc.returncode != 0


def test_imports_only_the_standard_library():
    tree = ast.parse(PROBE.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names), modules - set(sys.stdlib_module_names)
