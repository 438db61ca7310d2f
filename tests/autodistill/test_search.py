"""Pareto front, hypervolume, the tabular sampler benchmark, storage-backed parallel trials and resume."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from thrifty.methods.autodistill.search import (
    completed,
    dominates,
    fail_stale_trials,
    hypervolume,
    hypervolume_curve,
    make_sampler,
    make_storage,
    nearest_index,
    open_study,
    optimise,
    pareto_mask,
    tabular_run,
)
from thrifty.methods.autodistill.space import Arch

POINTS = [(0.5, 10.0), (0.6, 20.0), (0.4, 15.0), (0.6, 25.0), (0.3, 5.0)]


def test_pareto_front_of_hand_made_points() -> None:
    assert dominates((0.6, 20.0), (0.6, 25.0)) and not dominates((0.6, 20.0), (0.6, 20.0))
    assert pareto_mask(POINTS).tolist() == [True, True, False, False, True]


def test_hypervolume_of_hand_made_points() -> None:
    ref = (0.0, 30.0)
    # staircase: [5,10) at 0.3, [10,20) at 0.5, [20,30) at 0.6 -> 1.5 + 5 + 6
    assert hypervolume(POINTS, ref) == pytest.approx(12.5)
    assert hypervolume([(0.5, 10.0)], ref) == pytest.approx(10.0)
    assert hypervolume([(0.5, 40.0)], ref) == 0.0  # outside the reference box
    curve = hypervolume_curve(POINTS, ref)
    assert curve[-1] == pytest.approx(12.5)
    assert all(a <= b for a, b in itertools.pairwise(curve))


def _choices() -> dict[str, list[int]]:
    return {"num_layers": [2, 4], "hidden_size": [32], "intra_bottleneck_size": [8, 16], "num_heads": [1, 2],
            "intermediate_size": [16, 32], "num_ffn": [1]}  # fmt: skip


def _a(layers: int, b: int, h: int, i: int) -> Arch:
    return Arch(num_layers=layers, hidden_size=32, intra_bottleneck_size=b, num_heads=h, intermediate_size=i, num_ffn=1,
                embedding_size=8)  # fmt: skip


def test_nearest_table_entry() -> None:
    table = [_a(2, 8, 1, 16), _a(4, 16, 2, 32)]
    assert nearest_index(_a(2, 8, 2, 16), table, _choices()) == 0
    assert nearest_index(_a(4, 16, 1, 32), table, _choices()) == 1


@pytest.mark.parametrize("sampler", ["gp", "tpe", "random", "nsga2"])
def test_tabular_run_is_deterministic_per_seed(sampler: str) -> None:
    table = [(_a(la, b, h, i), 0.1 * la + 0.01 * b, float(la * i)) for la in (2, 4) for b in (8, 16) for h in (1, 2)
             for i in (16, 32)]  # fmt: skip
    kw = dict(sampler=sampler, num_trials=5, startup_trials=2, ref=(0.0, 200.0), embedding_size=8)
    a = tabular_run(table, _choices(), seed=1, **kw)
    b = tabular_run(table, _choices(), seed=1, **kw)
    assert a["visited"] == b["visited"] and len(a["hv"]) == 5
    assert all(x <= y for x, y in zip(a["hv"], a["hv"][1:]))


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from thrifty.methods.autodistill.search import make_sampler, make_storage, open_study, optimise

    def objective(trial):
        x = trial.suggest_int("x", 0, 50)
        time.sleep(0.05)
        return x / 50, float(50 - x)

    storage = make_storage(sys.argv[1], Path("."))
    sampler = make_sampler("random", seed=int(sys.argv[2]), startup_trials=1)
    study = open_study(name="s", storage=storage, sampler=sampler)
    optimise(study, objective, int(sys.argv[3]))
    """
)


@pytest.mark.dist
def test_two_workers_share_one_journal_and_lose_no_trial(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    journal = tmp_path / "study.journal"
    procs = [subprocess.Popen([sys.executable, str(script), str(journal), str(seed), "12"]) for seed in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    study = open_study(name="s", storage=make_storage(str(journal), tmp_path), sampler=None)
    trials = study.get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert 12 <= len(trials) <= 13  # the stop callback may let the other worker finish one trial in flight
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    for t in trials:  # every trial's values belong to its own parameters
        assert t.values == [t.params["x"] / 50, float(50 - t.params["x"])]


def test_interrupted_study_resumes_and_keeps_its_trials(tmp_path: Path) -> None:
    def objective(trial) -> tuple[float, float]:
        x = trial.suggest_int("x", 0, 9)
        return float(x), float(9 - x)

    storage = make_storage("", tmp_path)
    study = open_study(name="r", storage=storage, sampler=make_sampler("tpe", seed=0, startup_trials=2))
    optimise(study, objective, 3)
    first = [(t.number, t.params, t.values) for t in completed(study)]
    study.ask()  # a worker killed in the middle of a trial leaves it RUNNING in the journal
    again = open_study(
        name="r", storage=make_storage("", tmp_path), sampler=make_sampler("tpe", seed=0, startup_trials=2)
    )
    assert fail_stale_trials(again) == 1
    optimise(again, objective, 5)
    done = completed(again)
    assert len(done) == 5
    assert [(t.number, t.params, t.values) for t in done[:3]] == first
    assert all(t.values == [float(t.params["x"]), float(9 - t.params["x"])] for t in done)
    optimise(again, objective, 5)  # nothing left to do
    assert len(completed(again)) == 5


def test_unknown_sampler_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("cmaes", seed=0, startup_trials=1)


def test_rdb_url_storage_is_passed_through(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert make_storage(url, tmp_path) == url
    study = open_study(name="db", storage=url, sampler=make_sampler("random", seed=0, startup_trials=1))
    optimise(study, lambda t: (float(t.suggest_int("x", 0, 3)), 1.0), 3)
    reopened = open_study(name="db", storage=url, sampler=None)
    assert len(completed(reopened)) == 3
