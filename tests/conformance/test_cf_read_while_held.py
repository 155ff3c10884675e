"""conformance.test_conntrack.read_while_held: the tables are read again and again while the load runs and the
fullest reading counts, so connections that open late (SYN retransmits under TCG) are not missed; a failed read is
an error only when no read succeeded."""
from __future__ import annotations

import time

import pytest

from conformance.judge import CtReading, NotMeasured
from conformance.test_conntrack import read_while_held


def test_the_fullest_reading_while_the_load_runs_counts():
    """As on the CI cluster: the table fills for a while after the first reading (the slowest connects)."""
    start = time.monotonic()

    def read():
        entries = min(2000, int((time.monotonic() - start) * 4000))  # full after 0.5 s
        return {"cp1": CtReading("bpf-ct", entries, 1_000_000)}

    result, during = read_while_held(read, 0.05, lambda: time.sleep(1.0) or "done", pause=0.05)
    assert result == "done" and during["cp1"].entries == 2000


def test_a_failed_read_among_good_ones_is_not_the_verdict():
    calls = []

    def read():
        calls.append(1)
        if len(calls) == 1:
            raise NotMeasured("cp1: exec into the agent failed")
        return {"cp1": CtReading("bpf-ct", 7, 100)}

    _, during = read_while_held(read, 0.0, lambda: time.sleep(0.3), pause=0.05)
    assert during["cp1"].entries == 7 and len(calls) >= 2


def test_no_reading_at_all_is_an_error_never_no_rise():
    def read():
        raise NotMeasured("cp1: the BPF CT map could not be listed")

    with pytest.raises(NotMeasured, match="could not be listed"):
        read_while_held(read, 0.0, lambda: time.sleep(0.2), pause=0.05)


def test_a_load_shorter_than_the_delay_is_still_read_once():
    _, during = read_while_held(lambda: {"n1": CtReading("nf_conntrack", 3, 10)}, 5.0, lambda: None)
    assert during["n1"].entries == 3
