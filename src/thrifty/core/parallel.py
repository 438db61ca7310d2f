"""Independent training units (arm x seed, sweep points) in parallel worker processes.

A claim preset trains tens of small, independent units one after another. On a CPU with few cores, tiny 3D
convolutions use two intra-op threads poorly: two 1-thread workers ran the temporal-gradient claim preset in 37.2
min where one 2-thread process took 53.8 (a TG-full unit: 130-135 s per worker, two at a time, against 94-98 s
alone, about 1.4x the throughput), and on a machine with more cores several multi-thread workers train as many
units at once. :func:`train_units` runs a recipe's units in ``spawn``-started worker processes with their share of
the threads; as each unit finishes, the parent writes its metrics records and split reads to the run's logs and
only then its ``result.json``, so a unit that a resumed run reuses always has complete logs.

Each unit's numbers do not depend on how many workers run beside it; like any change of ``num_threads`` they can
differ from a run with another thread count in the last float bits (reduction order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import multiprocessing
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import torch

from thrifty.core.config import ConfigError
from thrifty.core.distributed import DistInfo
from thrifty.core.run import MetricsLog, configure_torch, data_root, progress, resolve_device, write_json
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
    runs in the parent as soon as each job finishes (write logs); the returned list keeps the order of ``jobs``.
    When a job raises (or the parent is interrupted), jobs not yet started are dropped, the running ones finish,
    ``on_done`` still runs for every job that succeeded, and then the first error is raised here.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not jobs:
        return []
    results: dict[int, R] = {}
    error: BaseException | None = None
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=context, initializer=initializer, initargs=initargs
    )
    with progress(len(jobs), description, enabled=show_progress) as advance:

        def collect(finished: Sequence[Future[R]]) -> None:
            nonlocal error
            for fut in sorted(finished, key=pending.__getitem__):
                i = pending.pop(fut)
                if fut.cancelled():
                    continue
                err = fut.exception()
                if err is not None:
                    error = error or err
                    continue
                results[i] = fut.result()
                if on_done is not None:
                    on_done(jobs[i], results[i])
                advance(1)

        pending: dict[Future[R], int] = {}
        try:
            pending = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            while pending and error is None:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                collect(list(done))
        except BaseException as exc:  # an interrupt, or on_done failing
            error = error or exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            with contextlib.suppress(BaseException):  # the first error is the one to report
                collect([f for f in pending if f.done()])  # what finished while the pool shut down
            raise error
    return [results[i] for i in range(len(jobs))]


# --- a recipe's units in worker processes ---------------------------------------------------------------------

#: one training unit: (arm, seed, extra keyword arguments of the recipe's ``train_unit``, e.g. a sweep point)
UnitJob = tuple[str, int, dict[str, Any]]

_WORKER: dict[str, Any] = {}


def _worker_init(module: str, cfg: Any, run_dir: str, threads: int) -> None:
    """Once per worker: warnings to stderr, its threads and determinism settings, its own copy of the (cached)
    data."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [worker] %(name)s: %(message)s")
    recipe = importlib.import_module(module)
    configure_torch(dataclasses.replace(cfg, num_threads=threads))
    access = AccessLog(None)  # the reads are kept in memory and logged by the parent
    _WORKER.update(recipe=recipe, cfg=dataclasses.replace(cfg, progress=False), run_dir=Path(run_dir), access=access)
    _WORKER["info"] = DistInfo(device=resolve_device(cfg.device))
    _WORKER["data"] = recipe.prepare_data(cfg, data_root(cfg), access)


def _worker_unit(job: UnitJob) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """One unit in a worker: its result (``result.json`` is left to the parent), split reads, metrics records."""
    arm, seed, extra = job
    w = _WORKER
    start = len(w["access"].entries)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = MetricsLog(Path(tmp) / "metrics.jsonl")
        res = w["recipe"].train_unit(
            arm, seed, w["cfg"], w["data"], w["run_dir"], metrics, w["info"], **extra, write_result=False
        )
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
    """Train a recipe's units. ``module`` (e.g. ``thrifty.methods.temporal_gradient.train``) provides
    ``prepare_data(cfg, root, access)``, ``unit_dir_for(run_dir, arm, seed, **extra)`` and ``train_unit(arm, seed,
    cfg, data, run_dir, metrics, info, **extra, write_result=True)``, which reuses a unit whose ``result.json``
    exists when ``cfg.resume``.

    With ``cfg.workers == 1`` or under torchrun the units train one after another in this process. Otherwise the
    finished units are reused here and the rest go to ``cfg.workers`` spawned processes that share
    ``cfg.num_threads`` (torch's count when 0), each loading the data itself, the costliest first (``cost``,
    higher first) so that no worker is left alone with a long unit at the end. As each unit finishes, its metrics
    records and split reads are written here, by the parent alone, then its ``result.json``. Returns the results
    in the order of ``jobs``.
    """
    recipe = importlib.import_module(module)
    if cfg.workers == 1 or info.enabled:
        return [recipe.train_unit(a, s, cfg, data, run_dir, metrics, info, **extra) for a, s, extra in jobs]

    def result_file(job: UnitJob) -> Path:
        return recipe.unit_dir_for(run_dir, job[0], job[1], **job[2]) / "result.json"

    results: dict[int, dict[str, Any]] = {}
    if cfg.resume:
        for i, job in enumerate(jobs):
            if (done := result_file(job)).is_file():
                results[i] = json.loads(done.read_text())
    todo = [i for i in range(len(jobs)) if i not in results]
    if cost is not None:
        todo.sort(key=lambda i: -cost(jobs[i]))

    def on_done(job: UnitJob, out: tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]) -> None:
        result, entries, records = out
        for unit in dict.fromkeys(r["unit"] for r in records):  # what an interrupted earlier attempt logged
            metrics.truncate(unit, 0)
        for rec in records:
            metrics.log(rec)
        for e in entries:
            access.record(e["split"], e["purpose"], e["unit"])
        write_json(result_file(job), result)

    threads = threads_per_worker(cfg.workers, cfg.num_threads)
    outs = run_units(
        _worker_unit,
        [jobs[i] for i in todo],
        workers=cfg.workers,
        initializer=_worker_init,
        initargs=(module, cfg, str(run_dir), threads),
        on_done=on_done,
        description=f"units ({cfg.workers} workers x {threads} threads)",
        show_progress=cfg.progress,
    )
    for i, out in zip(todo, outs, strict=True):
        results[i] = out[0]
    return [results[i] for i in range(len(jobs))]


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
    to ``train_unit``). A repeated arm, seed or point would train one unit twice: a ConfigError."""
    for key, values in (("arms", arms), ("seeds", seeds), ("sweep arms", sweep_arms), ("sweep points", points)):
        if len(set(values)) != len(values):
            raise ConfigError(f"the {key} list a value twice: {list(values)}")
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


def train_arms_and_sweep(
    module: str,
    *,
    cfg: Any,
    data: Any,
    run_dir: Path,
    metrics: MetricsLog,
    access: AccessLog,
    info: DistInfo,
    point_key: str,
    points: Sequence[Any],
    main_point: Any,
    cost: Callable[[UnitJob], float] | None = None,
) -> tuple[dict[str, dict[int, dict]], dict[Any, dict[str, dict[int, dict]]]]:
    """:func:`sweep_jobs` of ``cfg.arms`` x ``cfg.seeds`` and ``cfg.sweep.arms`` at ``points``, trained by
    :func:`train_units`, regrouped by :func:`by_arm_and_point`: ``({arm: {seed: result}}, {point: {arm: {seed:
    result}}})``."""
    where = {"point_key": point_key, "points": points, "sweep_arms": cfg.sweep.arms, "main_point": main_point}
    jobs = sweep_jobs(cfg.arms, cfg.seeds, **where)
    done = train_units(
        module, jobs, cfg=cfg, data=data, run_dir=run_dir, metrics=metrics, access=access, info=info, cost=cost
    )
    return by_arm_and_point(jobs, done, **where)
