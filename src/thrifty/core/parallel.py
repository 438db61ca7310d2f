"""Independent training units (arm x seed) in parallel worker processes.

A claim preset trains tens of small, independent units one after another. On a CPU with few cores, tiny 3D
convolutions use two intra-op threads poorly (the temporal-gradient miniature's step: 77 ms with 2 threads, 122 ms
with 1, so two 1-thread processes train about 1.3x as many steps per second as one 2-thread process), and on a
laptop with 8 cores four 2-thread workers train about four units at once. :func:`run_units` runs such units in
``spawn``-started worker processes, each with its own share of the threads, and hands each result back to the
parent in the order they finish, so the parent alone writes the run directory's shared logs.

Each unit's numbers do not depend on how many workers run beside it; they can differ from a run with another
thread count in the last float bits (reduction order), as any change of ``num_threads`` does.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

import torch

from thrifty.core.run import progress

J = TypeVar("J")
R = TypeVar("R")


def threads_per_worker(workers: int, num_threads: int = 0) -> int:
    """Intra-op threads each of ``workers`` gets out of ``num_threads`` (0: torch's current count), at least 1."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = num_threads if num_threads > 0 else torch.get_num_threads()
    return max(1, total // workers)


def run_units(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    on_done: Callable[[J, R], None] | None = None,
    description: str = "units",
    show_progress: bool = True,
) -> list[R]:
    """``[fn(job) for job in jobs]``, computed by ``workers`` spawned processes.

    ``fn`` and ``initializer`` must be importable module-level functions and the jobs, ``initargs`` and results
    picklable. ``initializer(*initargs)`` runs once per worker (load data, set threads). ``on_done(job, result)``
    runs in the parent as each unit finishes (write logs); the returned list keeps the order of ``jobs``. The first
    unit that raises cancels the units not yet started and its exception is raised here.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: dict[int, R] = {}
    if not jobs:
        return []
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
    with (
        ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=context, initializer=initializer, initargs=initargs
        ) as pool,
        progress(len(jobs), description, enabled=show_progress) as advance,
    ):
        pending: dict[Future[R], int] = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                i = pending.pop(fut)
                err = fut.exception()
                if err is not None:
                    for other in pending:
                        other.cancel()
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise err
                results[i] = fut.result()
                if on_done is not None:
                    on_done(jobs[i], results[i])
                advance(1)
    return [results[i] for i in range(len(jobs))]
