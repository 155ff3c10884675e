"""kube.in_parallel: the calls overlap (load is held from every pod at once), results keep their order, and an
error is raised only after every call has finished (no probe is abandoned half-way)."""
from __future__ import annotations

import threading

import pytest

from conformance.kube import in_parallel


def test_calls_overlap_and_results_keep_order():
    barrier = threading.Barrier(3, timeout=10)  # only passes if all three run at the same time

    def call(i):
        barrier.wait()
        return i * 10

    assert in_parallel([lambda i=i: call(i) for i in range(3)]) == [0, 10, 20]


def test_first_error_raised_after_all_finished():
    finished = []

    def ok(i):
        finished.append(i)
        return i

    def bad():
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        in_parallel([lambda: ok(1), bad, lambda: ok(2)])
    assert sorted(finished) == [1, 2]


def test_no_calls():
    assert in_parallel([]) == []
