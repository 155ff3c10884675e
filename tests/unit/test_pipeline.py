"""The phase runner: order, skip and "already done", --until, errors named by phase, the state record, and
Ctrl-C that is not held up by node workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab.errors import LabError, PhaseError
from lab.phase import Context, Log, Phase
from lab.pipeline import run_phases
from lab.spec import parse_lab
from lab.state import LabState

ROOT = Path(__file__).resolve().parents[2]


class Recorder(Phase):
    def __init__(self, name, calls, skip=None, done=False, fail=None):
        self.name, self.calls, self._skip, self._done, self._fail = name, calls, skip, done, fail

    def skip_reason(self, ctx):
        return self._skip

    def done(self, ctx):
        return self._done

    def run(self, ctx):
        self.calls.append(self.name)
        if self._fail:
            raise self._fail


@pytest.fixture
def ctx(tmp_path):
    lab = parse_lab({"name": "p", "nodes": [{"name": "cp1", "role": "control-plane"}],
                     "kubernetes": {"enabled": False}})
    state = LabState("p", tmp_path)
    state.save({"lab": "p"})
    return Context(lab=lab, state=state, log=Log(tmp_path / "p.log", quiet=True))


def test_order_skip_done_and_record(ctx):
    calls = []
    phases = [Recorder("a", calls), Recorder("b", calls, skip="not wanted"), Recorder("c", calls, done=True),
              Recorder("d", calls)]
    record = run_phases(ctx, phases)
    assert calls == ["a", "d"]
    assert {k: v["status"] for k, v in record.items()} == {"a": "done", "b": "skipped", "c": "unchanged",
                                                           "d": "done", "_total": "done"}
    assert ctx.state.load()["phases"]["b"]["reason"] == "not wanted"


def test_until_stops_after_the_named_phase(ctx):
    calls = []
    run_phases(ctx, [Recorder("a", calls), Recorder("b", calls), Recorder("c", calls)], until="b")
    assert calls == ["a", "b"]


def test_lab_error_names_the_phase_and_stops(ctx):
    calls = []
    with pytest.raises(LabError) as info:
        run_phases(ctx, [Recorder("a", calls, fail=LabError("boom", hint="do x")), Recorder("b", calls)])
    assert info.value.message == "phase a: boom" and info.value.hint == "do x"
    assert calls == ["a"]
    assert ctx.state.load()["phases"]["a"]["status"] == "failed"


def test_unexpected_exception_becomes_phase_error_with_traceback_in_log(ctx):
    with pytest.raises(PhaseError) as info:
        run_phases(ctx, [Recorder("a", [], fail=ZeroDivisionError("x"))])
    assert "phase a: unexpected ZeroDivisionError" in info.value.message
    assert "Traceback" in Path(ctx.log.path).read_text()


def test_ctrl_c_is_not_held_up_by_node_workers(tmp_path):
    """Workers that would wait 60 s each; SIGINT after they start: the process ends within seconds, with 130,
    and the workers saw the cancel event."""
    marker = tmp_path / "cancelled"
    script = textwrap.dedent(f"""
        import sys, threading, time
        from lab.phase import run_on_nodes
        cancel = threading.Event()
        def work(name):
            if cancel.wait(60):
                open({str(marker)!r}, "a").write(name + "\\n")
        try:
            print("started", flush=True)
            run_on_nodes(["a", "b"], work, cancel)
        except KeyboardInterrupt:
            time.sleep(0.5)  # the workers record that they saw the event
            import os
            os._exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    assert rc == 130
    assert time.monotonic() - t0 < 20, "the interrupt waited for the workers' own deadlines"
    assert sorted(marker.read_text().split()) == ["a", "b"]


def test_cli_interrupt_exits_130_at_once(tmp_path):
    """A command interrupted while node workers wait: `lab` says so and exits 130 without waiting for them."""
    script = textwrap.dedent("""
        import sys, threading
        import lab.cli
        from lab.phase import run_on_nodes
        def busy(args):
            print("started", flush=True)
            run_on_nodes(["a", "b"], lambda n: threading.Event().wait(60))
            return 0
        lab.cli.cmd_status = busy
        sys.exit(lab.cli.main(["status", "-c", "labs/ci.yaml"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "LAB_STATE_DIR": str(tmp_path)})
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert time.monotonic() - t0 < 20, "the interrupt waited for the workers"
    assert "interrupted" in proc.stderr.read()
