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

import dataclasses
import importlib
import multiprocessing
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import torch

from thrifty.core.distributed import DistInfo
from thrifty.core.run import MetricsLog, configure_torch, data_root, progress
from thrifty.core.splits import AccessLog

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
                if err is not None:  # units not yet started are dropped; running ones finish first
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise err
                results[i] = fut.result()
                if on_done is not None:
                    on_done(jobs[i], results[i])
                advance(1)
    return [results[i] for i in range(len(jobs))]


# --- a recipe's units in worker processes ---------------------------------------------------------------------

#: one training unit: (arm, seed, extra keyword arguments of the recipe's ``train_unit``, e.g. a sweep point)
UnitJob = tuple[str, int, dict[str, Any]]

_WORKER: dict[str, Any] = {}


def _worker_init(module: str, cfg: Any, run_dir: str, threads: int) -> None:
    """Once per worker: its threads and determinism settings, and its own copy of the (cached) data."""
    recipe = importlib.import_module(module)
    configure_torch(dataclasses.replace(cfg, num_threads=threads))
    access = AccessLog(None)  # the reads are kept in memory and logged by the parent
    _WORKER.update(recipe=recipe, cfg=dataclasses.replace(cfg, progress=False), run_dir=Path(run_dir), access=access)
    _WORKER["data"] = recipe.prepare_data(cfg, data_root(cfg), access)


def _worker_unit(job: UnitJob) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """One unit in a worker: its result, its split reads and its metrics records."""
    arm, seed, extra = job
    w = _WORKER
    start = len(w["access"].entries)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = MetricsLog(Path(tmp) / "metrics.jsonl")
        res = w["recipe"].train_unit(arm, seed, w["cfg"], w["data"], w["run_dir"], metrics, DistInfo(), **extra)
        records = metrics.read()
    return res, w["access"].entries[start:], records


def train_units(
    module: str,
    jobs: Sequence[UnitJob],
    *,
    cfg: Any,
    data: Any,
    run_dir: Path,
    metrics: MetricsLog,
    access: AccessLog,
    info: DistInfo,
    cost: Callable[[UnitJob], float] | None = None,
) -> list[dict[str, Any]]:
    """Train a recipe's units: ``module`` (e.g. ``thrifty.methods.temporal_gradient.train``) provides
    ``prepare_data(cfg, root, access)`` and ``train_unit(arm, seed, cfg, data, run_dir, metrics, info, **extra)``.

    With ``cfg.workers == 1`` or under torchrun the units train one after another in this process. Otherwise
    ``cfg.workers`` spawned processes share ``cfg.num_threads`` (torch's count when 0) and each loads the data
    itself; the costliest units (``cost``, higher first) start first so no worker is left alone with a long unit
    at the end. Each finished unit's metrics records and split reads are written here, by the parent alone. Returns
    the results in the order of ``jobs``.
    """
    recipe = importlib.import_module(module)
    if cfg.workers == 1 or info.enabled:
        return [recipe.train_unit(a, s, cfg, data, run_dir, metrics, info, **extra) for a, s, extra in jobs]

    def on_done(job: UnitJob, out: tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]) -> None:
        _, entries, records = out
        for unit in dict.fromkeys(r["unit"] for r in records):  # what an interrupted earlier attempt logged
            metrics.truncate(unit, 0)
        for rec in records:
            metrics.log(rec)
        for e in entries:
            access.record(e["split"], e["purpose"], e["unit"])

    order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])) if cost is not None else list(range(len(jobs)))
    threads = threads_per_worker(cfg.workers, cfg.num_threads)
    outs = run_units(
        _worker_unit,
        [jobs[i] for i in order],
        workers=cfg.workers,
        initializer=_worker_init,
        initargs=(module, cfg, str(run_dir), threads),
        on_done=on_done,
        description=f"units ({cfg.workers} workers x {threads} threads)",
        show_progress=cfg.progress,
    )
    results: list[dict[str, Any]] = [{}] * len(jobs)
    for i, out in zip(order, outs, strict=True):
        results[i] = out[0]
    return results


def sweep_jobs(
    arms: Sequence[str],
    seeds: Sequence[int],
    *,
    point_key: str,
    points: Sequence[Any],
    sweep_arms: Sequence[str],
    main_point: Any,
) -> list[UnitJob]:
    """A recipe's units in the order one process trains them: every arm x seed at the main setting, then every
    sweep point x sweep arm x seed that the main setting does not already give (``{point_key: point}`` is passed
    to ``train_unit``)."""
    jobs: list[UnitJob] = [(arm, seed, {}) for arm in arms for seed in seeds]
    for p in points:
        for arm in sweep_arms:
            if not (p == main_point and arm in arms):
                jobs.extend((arm, seed, {point_key: p}) for seed in seeds)
    return jobs


def by_arm_and_point(
    jobs: Sequence[UnitJob],
    results: Sequence[dict[str, Any]],
    *,
    point_key: str,
    points: Sequence[Any],
    sweep_arms: Sequence[str],
    main_point: Any,
) -> tuple[dict[str, dict[int, dict]], dict[Any, dict[str, dict[int, dict]]]]:
    """The results of :func:`sweep_jobs` as ``{arm: {seed: result}}`` at the main setting and ``{point: {arm:
    {seed: result}}}`` for the sweep, whose main point reuses the main setting's units."""
    main: dict[str, dict[int, dict]] = {}
    swept: dict[Any, dict[str, dict[int, dict]]] = {}
    for (arm, seed, extra), res in zip(jobs, results, strict=True):
        if point_key in extra:
            swept.setdefault(extra[point_key], {}).setdefault(arm, {})[seed] = res
        else:
            main.setdefault(arm, {})[seed] = res
    sweep: dict[Any, dict[str, dict[int, dict]]] = {}
    for p in points:
        for arm in sweep_arms:
            row = main.get(arm) if p == main_point and arm in main else swept.get(p, {}).get(arm)
            if row is not None:
                sweep.setdefault(p, {})[arm] = dict(row)
    return main, sweep
