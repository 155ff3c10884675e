"""--time-scale: a lab under TCG gets every exec's and probe's deadline, and the default policy deadline, five times
longer; an explicit factor wins; the messages name the deadline that applied."""
from __future__ import annotations

from pathlib import Path

import pytest

from conformance import kube as k8s
from conformance.conftest import TCG_TIME_SCALE, _time_scale
from lab.spec import load_lab

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec,given,want", [
    ("labs/ci-cluster.yaml", None, TCG_TIME_SCALE),  # libvirt.accel: tcg
    ("labs/default.yaml", None, 1.0),                # accel auto: a KVM host by default
    ("labs/ci-cluster.yaml", 2.0, 2.0),
    (None, None, 1.0),                               # any kubeconfig, no lab spec
])
def test_time_scale_from_the_lab_or_the_option(spec, given, want):
    lab = load_lab(str(REPO / spec)) if spec else None
    assert _time_scale(given, lab) == want


@pytest.mark.parametrize("bad", [0.0, -1.0, 101.0])
def test_time_scale_out_of_range_is_a_usage_error(bad):
    with pytest.raises(pytest.UsageError, match=r"--time-scale .*: use a factor above 0 and at most 100"):
        _time_scale(bad, None)


class RecordingExecutor:
    def __init__(self, result):
        self.result, self.timeouts = result, []

    def run(self, namespace, pod, command, timeout, container="probe"):
        self.timeouts.append(timeout)
        return self.result


def test_session_scales_exec_and_probe_deadlines_and_names_the_scaled_one():
    executor = RecordingExecutor(k8s.ExecResult(None, "", ""))
    session = k8s.Session(kube=None, executor=executor, time_scale=5.0)
    session.exec("ns", "pod", ["true"], 60)
    with pytest.raises(k8s.ProbeFailed, match=r"netprobe facts in ns/pod did not finish within 300s"):
        session.netprobe("ns", "pod", ["facts"], timeout=60)
    assert executor.timeouts == [300.0, 300.0]


class FakeConfig:
    def __init__(self, option, ini):
        self.option, self.ini = option, ini

    def getoption(self, name, default=None):
        return self.option if name == "timeout" else default

    def getini(self, name):
        if name != "timeout":
            raise ValueError(name)
        return self.ini


class FakeItem:
    def __init__(self, marked: float | None = None):
        self.markers = [pytest.mark.timeout(marked).mark] if marked is not None else []

    def get_closest_marker(self, name):
        return next((m for m in self.markers if m.name == name), None)

    def add_marker(self, marker):
        self.markers.append(marker.mark)


def test_hang_guard_scales_the_ini_limit_and_keeps_a_checks_own_marker():
    from conformance.conftest import scale_hang_guard
    plain, own = FakeItem(), FakeItem(marked=42)
    assert scale_hang_guard(FakeConfig(None, "1800"), [plain, own], TCG_TIME_SCALE) == 1800 * TCG_TIME_SCALE
    assert plain.get_closest_marker("timeout").args == (1800 * TCG_TIME_SCALE,)
    assert own.get_closest_marker("timeout").args == (42,)


@pytest.mark.parametrize("option,ini,scale", [(None, "0", 5.0), (None, "", 5.0), (None, "1800", 1.0)])
def test_hang_guard_leaves_no_limit_and_scale_one_alone(option, ini, scale):
    from conformance.conftest import scale_hang_guard
    item = FakeItem()
    assert scale_hang_guard(FakeConfig(option, ini), [item], scale) is None
    assert item.get_closest_marker("timeout") is None


def test_hang_guard_command_line_limit_wins_over_the_ini():
    from conformance.conftest import scale_hang_guard
    item = FakeItem()
    assert scale_hang_guard(FakeConfig(600.0, "1800"), [item], 2.0) == 1200.0
