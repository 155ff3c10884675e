"""Defect 6: failover has a bound (--failover-seconds); the measured time is reported against it either way."""
from __future__ import annotations

from conformance.judge import judge_failover


def test_failover_within_the_bound_passes_and_reports_both_numbers():
    record, problem = judge_failover(4.26, 30)
    assert problem is None
    assert record == {"failover_bound_seconds": 30, "failover_completed": True, "failover_seconds": 4.26,
                      "failover_within_bound": True}


def test_failover_over_the_bound_fails_with_both_numbers():
    record, problem = judge_failover(42.0, 30)  # old code: passed anything under the hard 300 s cap
    assert problem == "failover took 42.0s, over the bound of 30s (--failover-seconds)"
    assert record["failover_seconds"] == 42.0 and record["failover_within_bound"] is False


def test_no_failover_seen_fails_and_reports_how_long_it_waited():
    record, problem = judge_failover(None, 30, waited=30.4)
    assert problem == "no failover within the bound of 30s (--failover-seconds): waited 30.4s"
    assert record == {"failover_bound_seconds": 30, "failover_completed": False, "failover_seconds": 30.4,
                      "failover_within_bound": False}


def test_exactly_at_the_bound_passes():
    assert judge_failover(30.0, 30)[1] is None
