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
