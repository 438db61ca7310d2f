"""Parallel training units (:mod:`thrifty.core.parallel`): results in job order whatever the finishing order,
the parent's callback once per unit, a failing unit's error raised in the parent, and the thread split."""

from __future__ import annotations

import math

import pytest

from thrifty.core.parallel import run_units, threads_per_worker


def test_results_keep_job_order_and_every_unit_reports_once():
    jobs = [5, 0, 7, 3, 1, 6]
    seen: list[tuple[int, int]] = []
    out = run_units(math.factorial, jobs, workers=2, on_done=lambda j, r: seen.append((j, r)), show_progress=False)
    assert out == [math.factorial(j) for j in jobs]
    assert sorted(seen) == sorted(zip(jobs, out, strict=True))


def test_a_failing_unit_raises_in_the_parent():
    with pytest.raises(ValueError, match="negative"):
        run_units(math.factorial, [3, -1, 4], workers=2, show_progress=False)


def test_no_jobs_and_bad_worker_counts():
    assert run_units(math.factorial, [], workers=2, show_progress=False) == []
    with pytest.raises(ValueError, match="workers"):
        run_units(math.factorial, [1], workers=0, show_progress=False)
    with pytest.raises(ValueError, match="workers"):
        threads_per_worker(0, 4)


@pytest.mark.parametrize(("workers", "threads", "expected"), [(2, 4, 2), (2, 2, 1), (4, 2, 1), (1, 8, 8), (3, 8, 2)])
def test_threads_are_shared_and_never_zero(workers, threads, expected):
    assert threads_per_worker(workers, threads) == expected
