"""The datapath lock: load runs alone, observers together, across processes (xdist workers); a module's world
(its pods brought up on the nodes) is built under the module's lock too, so no load runs beside that work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conformance import conftest as cf


class Config:
    def __init__(self, uid):
        self.workerinput = {"testrunuid": uid}


def other_process_can_take(path, exclusive: bool) -> bool:
    """Whether another process (another xdist worker) gets the lock now, without waiting."""
    code = ("import fcntl,sys\nf=open(sys.argv[1],'a+')\ntry:\n fcntl.flock(f,(fcntl.LOCK_EX if sys.argv[2]=='1' "
            "else fcntl.LOCK_SH)|fcntl.LOCK_NB)\nexcept BlockingIOError:\n sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", code, str(path), "1" if exclusive else "0"]).returncode == 0


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    return Config(f"test-{tmp_path.name}")


def test_observe_shares_and_load_excludes(config):
    path = cf.datapath_lock_path(config)
    with cf.datapath_lock(config, "observe"):
        assert other_process_can_take(path, exclusive=False)
        assert not other_process_can_take(path, exclusive=True)
    with cf.datapath_lock(config, "load"):
        assert not other_process_can_take(path, exclusive=False)
    assert other_process_can_take(path, exclusive=True)


def test_nested_holds_do_not_deadlock_and_release_at_the_outermost(config):
    path = cf.datapath_lock_path(config)
    with cf.datapath_lock(config, "load"):
        with cf.datapath_lock(config, "load"):  # a second flock on another fd would wait for ourselves
            assert not other_process_can_take(path, exclusive=False)
        assert not other_process_can_take(path, exclusive=False)
    assert other_process_can_take(path, exclusive=True)
    assert cf._LOCK_HELD == [0]


class Marked:
    def __init__(self, kind):
        self.kind = kind

    def get_closest_marker(self, name):
        return pytest.mark.datapath(self.kind).mark if self.kind and name == "datapath" else None


class Fixturedef:
    def __init__(self, scope):
        self.scope = scope


class Request:
    def __init__(self, config, kind):
        self.config, self.node = config, Marked(kind)


@pytest.mark.parametrize("scope,kind,held", [("module", "load", True), ("module", "observe", True),
                                             ("module", None, False), ("function", "load", False)])
def test_a_modules_world_is_built_under_its_lock(config, scope, kind, held):
    hook = cf.pytest_fixture_setup(Fixturedef(scope), Request(config, kind))
    next(hook)  # pluggy's hookwrapper: here the fixture sets up
    assert other_process_can_take(cf.datapath_lock_path(config), exclusive=True) is not held
    with pytest.raises(StopIteration):
        hook.send(None)
    assert other_process_can_take(cf.datapath_lock_path(config), exclusive=True)
