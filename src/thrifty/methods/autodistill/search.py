"""Multi-objective architecture search with Optuna: samplers, storage, Pareto front and hypervolume
(AutoDistill, arXiv 2201.08539: BO over pre-training accuracy and latency).

The study optimises the *vector* (accuracy ↑, latency ↓) — not a scalarised ``acc − λ·latency`` — with
Optuna's GP sampler by default (multivariate TPE, NSGA-II and random search selectable). Studies live in a
journal file (or an RDB URL), so several worker processes can share one study and an interrupted search
resumes from its completed trials.

Samplers are compared on a *tabular benchmark*: the architectures the run actually evaluated form a table,
and a sampler's proposal is answered with the nearest evaluated architecture (normalised index distance over
the knobs), so comparing samplers over seeds costs table look-ups, not training (NAS-Bench style).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thrifty.methods.autodistill.space import KNOBS, Arch, arch_from_params

log = logging.getLogger(__name__)


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# --- Pareto front and hypervolume -----------------------------------------------------------------------


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """(accuracy, latency) ``a`` dominates ``b``: no worse in both, strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_mask(points: Sequence[Sequence[float]]) -> np.ndarray:
    """Which (accuracy, latency) points no other point dominates; duplicates of a front point stay on it."""
    pts = [tuple(p) for p in points]
    return np.array([not any(dominates(q, p) for q in pts) for p in pts], dtype=bool)


def hypervolume(points: Sequence[Sequence[float]], ref: tuple[float, float]) -> float:
    """Area dominated by (accuracy, latency) points and bounded by ``ref = (accuracy_ref, latency_ref)``:
    the union over points p of [acc_ref, p.acc] × [p.lat, lat_ref]. Points outside the box add nothing."""
    acc_ref, lat_ref = ref
    pts = sorted((lat, acc) for acc, lat in points if acc > acc_ref and lat < lat_ref)
    area, best = 0.0, acc_ref
    for i, (lat, acc) in enumerate(pts):
        best = max(best, acc)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else lat_ref
        area += (nxt - lat) * (best - acc_ref)
    return area


def reference_point(latencies: Sequence[float]) -> tuple[float, float]:
    """The shared hypervolume reference: accuracy 0 and 1.1 × the largest observed latency."""
    return 0.0, 1.1 * max(latencies)


def hypervolume_curve(points: Sequence[Sequence[float]], ref: tuple[float, float]) -> list[float]:
    """Hypervolume of the first t points, for t = 1..n."""
    return [hypervolume(points[: t + 1], ref) for t in range(len(points))]


# --- samplers, storage, studies ---------------------------------------------------------------------------


def make_sampler(name: str, *, seed: int, startup_trials: int) -> Any:
    optuna = _optuna()
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, startup_trials))
    raise ValueError(f"unknown sampler {name!r}; choose from gp, tpe, random, nsga2")


def make_storage(spec: str, run_dir: Path) -> Any:
    """An RDB URL is passed through; otherwise a journal file (``spec`` or ``<run_dir>/units/study.journal``,
    which ``resume=false`` clears with the run's other units)."""
    optuna = _optuna()
    if "://" in spec:
        return spec
    path = Path(spec).expanduser() if spec else run_dir / "units" / "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def open_study(*, name: str, storage: Any, sampler: Any) -> Any:
    optuna = _optuna()
    return optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, directions=["maximize", "minimize"], load_if_exists=True
    )


def fail_stale_trials(study: Any) -> int:
    """Mark trials left RUNNING by a killed process as FAIL (call only when no other worker is running)."""
    optuna = _optuna()
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def completed(study: Any) -> list[Any]:
    optuna = _optuna()
    return sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)


def suggest_arch(trial: Any, choices: dict[str, list[int]], embedding_size: int) -> Arch:
    return arch_from_params({k: trial.suggest_categorical(k, choices[k]) for k in KNOBS}, embedding_size)


def optimise(study: Any, objective: Callable[[Any], tuple[float, float]], num_trials: int) -> None:
    """Run trials until the study holds ``num_trials`` completed ones (counting other workers' trials)."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE,)
    if len(study.get_trials(states=states)) >= num_trials:
        return
    stop = optuna.study.MaxTrialsCallback(num_trials, states=states)
    study.optimize(objective, callbacks=[stop], catch=())


# --- the tabular benchmark ------------------------------------------------------------------------------


def nearest_index(arch: Arch, table: Sequence[Arch], choices: dict[str, list[int]]) -> int:
    """Index of the table architecture closest to ``arch`` (L1 over knob positions scaled to [0, 1])."""

    def pos(a: Arch, k: str) -> float:
        c = choices[k]
        v = getattr(a, k)
        i = c.index(v) if v in c else int(np.argmin([abs(x - v) for x in c]))
        return i / max(1, len(c) - 1)

    target = [pos(arch, k) for k in KNOBS]
    dists = [sum(abs(pos(a, k) - t) for k, t in zip(KNOBS, target)) for a in table]
    return int(np.argmin(dists))


def tabular_run(
    table: Sequence[tuple[Arch, float, float]],
    choices: dict[str, list[int]],
    *,
    sampler: str,
    seed: int,
    num_trials: int,
    startup_trials: int,
    ref: tuple[float, float],
    embedding_size: int,
) -> dict[str, Any]:
    """One sampler on the table for ``num_trials`` queries; returns the visited indices and the HV curve."""
    archs = [a for a, _, _ in table]
    study = open_study(
        name=f"tabular-{sampler}-{seed}",
        storage=None,
        sampler=make_sampler(sampler, seed=seed, startup_trials=startup_trials),
    )
    visited: list[int] = []

    def objective(trial: Any) -> tuple[float, float]:
        i = nearest_index(suggest_arch(trial, choices, embedding_size), archs, choices)
        visited.append(i)
        return table[i][1], table[i][2]

    study.optimize(objective, n_trials=num_trials)
    points = [(table[i][1], table[i][2]) for i in visited]
    return {"sampler": sampler, "seed": seed, "visited": visited, "hv": hypervolume_curve(points, ref)}
