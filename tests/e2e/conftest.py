"""Shared end-to-end fixtures: one real lab (labs/ci.yaml) booted once per session inside netns `labns`.

`lab down` always runs at session end, whatever happened; test_down_leaves_nothing is moved to the very end.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lab.spec import load_lab

from labrun import SPEC, lab_cli, require_root_and_libvirtd, virsh  # noqa: E402


@pytest.fixture(scope="session")
def lab():
    return load_lab(SPEC)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory):
    require_root_and_libvirtd("the end-to-end tests")
    return tmp_path_factory.mktemp("lab-state")


@pytest.fixture(scope="session")
def up(lab, state_dir):
    """One `lab up` for the session; `lab down` always runs at the end."""
    leftovers = [d for d in virsh("list", "--all", "--name").split() if d.startswith(f"{lab.name}-")]
    if leftovers:  # an interrupted earlier run: clear it the way a user would, through `lab down`
        print(f"leftover domains of lab {lab.name}: {leftovers}; removing them with lab down")
        assert lab_cli(state_dir, "down", "-c", str(SPEC)).returncode == 0
    proc = lab_cli(state_dir, "up", "-c", str(SPEC))
    try:
        assert proc.returncode == 0, f"lab up failed:\n{proc.stderr[-4000:]}"
        yield proc
    finally:
        down = lab_cli(state_dir, "down", "-c", str(SPEC))
        assert down.returncode == 0, down.stderr


def pytest_collection_modifyitems(items):
    """`lab down` is tested right after the last end-to-end test: every test that needs the running lab has
    run, and the lab's VMs do not keep running under the suites collected after tests/e2e."""
    here = Path(__file__).parent
    for item in [i for i in items if i.name == "test_down_leaves_nothing"]:
        items.remove(item)
        last_e2e = max(n for n, i in enumerate(items) if here in Path(str(i.fspath)).parents)
        items.insert(last_e2e + 1, item)
