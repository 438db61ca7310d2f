"""Parallel training units (:mod:`thrifty.core.parallel`): results in job order whatever the finishing order,
the parent's callback once per unit, a failing unit's error raised in the parent, and the thread split."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from thrifty.cli import EXIT_OK, main
from thrifty.core.config import ConfigError
from thrifty.core.parallel import by_arm_and_point, run_units, sweep_jobs, threads_per_worker


def test_results_keep_job_order_and_every_unit_reports_once():
    jobs = [5, 0, 7, 3, 1, 6]
    seen: list[tuple[int, int]] = []
    out = run_units(math.factorial, jobs, workers=2, on_done=lambda j, r: seen.append((j, r)), show_progress=False)
    assert out == [math.factorial(j) for j in jobs]
    assert sorted(seen) == sorted(zip(jobs, out, strict=True))


def test_each_unit_is_handed_back_as_soon_as_it_finishes():
    """A short unit reaches ``on_done`` while a long one still runs (the logs of a killed run stay complete)."""
    finished: dict[float, float] = {}
    run_units(
        time.sleep, [0.0, 1.5], workers=2, on_done=lambda j, _: finished.setdefault(j, time.monotonic()),
        show_progress=False,
    )  # fmt: skip
    assert finished[1.5] - finished[0.0] > 1.0


def test_a_failing_unit_raises_in_the_parent_after_the_finished_ones_are_reported():
    seen: list[int] = []
    with pytest.raises(ValueError, match="negative"):
        run_units(math.factorial, [3, -1], workers=2, on_done=lambda j, _: seen.append(j), show_progress=False)
    assert seen == [3]
    with pytest.raises(RuntimeError, match="on_done"):  # an error in the parent's callback stops the run too

        def fail(job: int, result: int) -> None:
            raise RuntimeError("on_done failed")

        run_units(math.factorial, [1, 2, 3], workers=1, on_done=fail, show_progress=False)


def test_no_jobs_and_bad_worker_counts():
    assert run_units(math.factorial, [], workers=2, show_progress=False) == []
    with pytest.raises(ValueError, match="workers"):
        run_units(math.factorial, [1], workers=0, show_progress=False)
    with pytest.raises(ValueError, match="workers"):
        threads_per_worker(0, 4)


@pytest.mark.parametrize(("workers", "threads", "expected"), [(2, 4, 2), (2, 2, 1), (4, 2, 1), (1, 8, 8), (3, 8, 2)])
def test_threads_are_shared_and_never_zero(workers, threads, expected):
    assert threads_per_worker(workers, threads) == expected


def test_sweep_jobs_skip_the_main_point_of_trained_arms_and_results_regroup():
    where = {"point_key": "count", "points": [20, 60, 180], "sweep_arms": ["a", "c"], "main_point": 60}
    jobs = sweep_jobs(["a", "b"], [0, 1], **where)
    assert jobs[:4] == [("a", 0, {}), ("a", 1, {}), ("b", 0, {}), ("b", 1, {})]
    swept = [(arm, p["count"]) for arm, seed, p in jobs[4:] if seed == 0]
    # arm c is not trained at the main setting, so its main point is a sweep unit; arm a's is not
    assert swept == [("a", 20), ("c", 20), ("c", 60), ("a", 180), ("c", 180)]
    results = [{"job": i} for i in range(len(jobs))]
    main, sweep = by_arm_and_point(jobs, results, **where)
    assert main == {"a": {0: {"job": 0}, 1: {"job": 1}}, "b": {0: {"job": 2}, 1: {"job": 3}}}
    assert list(sweep) == [20, 60, 180] and list(sweep[60]) == ["a", "c"]
    assert sweep[60]["a"] == main["a"]  # the main point reuses the main units
    assert sweep[60]["c"][1] == results[jobs.index(("c", 1, {"count": 60}))]
    assert all(len(sweep[p][arm]) == 2 for p in sweep for arm in sweep[p])
    with pytest.raises(ConfigError, match="arms list a value twice"):
        sweep_jobs(["a", "a"], [0], **where)
    with pytest.raises(ConfigError, match="sweep points"):
        sweep_jobs(["a"], [0], **{**where, "points": [20, 20]})


@pytest.mark.parametrize(
    ("recipe", "args", "units"),
    [
        (
            "temporal_gradient",
            ["arms=[supervised,fixmatch_03,tg_full]", "sweep.labelled_fractions=[0.25,0.5]"],
            3 * 2 + 2 * 2,  # the main setting, then the sweep's 0.5 (its 0.25 is the main setting)
        ),
        (
            "data_assemble",
            ["arms=[target_only,assemble]", "sweep.target_images=[8,16]", "sweep.arms=[target_only,assemble]"],
            2 * 2 + 2 * 2,  # the main setting (16 target images), then the sweep's 8
        ),
    ],
)
def test_units_trained_by_two_worker_processes_equal_one_process(recipe, args, units, tmp_path, data_dir):
    """``workers=2`` (one thread each) trains the same units as one 1-thread process, number for number; the parent
    alone writes the metrics and the split-access log, with every unit's reads and records, each unit's final test
    read after its selection reads."""
    runs = {}
    for workers, threads in ((1, 1), (2, 2)):
        out = tmp_path / f"w{workers}"
        overrides = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", "seeds=[0,1]", *args]
        rc = main(["run", recipe, "--preset", "smoke", *overrides, f"num_threads={threads}", f"workers={workers}"])
        assert rc == EXIT_OK
        runs[workers] = out / recipe / "smoke"
    found = [sorted(p.relative_to(runs[w]) for p in (runs[w] / "units").rglob("result.json")) for w in (1, 2)]
    assert found[0] == found[1] and len(found[0]) == units
    for rel in found[0]:
        one, two = (json.loads((runs[w] / rel).read_text()) for w in (1, 2))
        assert set(one) == set(two)
        for key in set(one) - {"train_seconds", "train_images_per_s", "infer_images_per_s", "train_clips_per_s",
                               "infer_clips_per_s"}:  # fmt: skip
            assert one[key] == two[key], (rel, key)
    for name in ("metrics.jsonl", "access_log.jsonl"):
        one, two = (read_jsonl(runs[w] / name) for w in (1, 2))
        if name == "access_log.jsonl":
            assert [e["index"] for e in two] == list(range(len(two)))
            for e in (*one, *two):
                e.pop("index")
            tested = {e["unit"] for e in two if e["purpose"] == "final_test"}
            assert len(tested) >= units
            for unit in tested:
                purposes = [e["purpose"] for e in two if e["unit"] == unit]
                assert purposes[-1] == "final_test" and purposes.count("final_test") == 1, unit
        else:  # timings differ; every other logged number is equal
            for r in (*one, *two):
                for k in [k for k in r if "per_s" in k or "seconds" in k]:
                    r.pop(k)
        assert sorted(one, key=_key) == sorted(two, key=_key), name
    claims = [json.loads((runs[w] / "results.json").read_text())["claims"] for w in (1, 2)]
    assert [(c["id"], c["values"]) for c in claims[0]] == [(c["id"], c["values"]) for c in claims[1]]

    # resumed with one unit's result gone: only that unit trains again, and its logs hold one attempt
    lost = runs[2] / found[0][-1]
    before = json.loads(lost.read_text())
    lost.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (runs[2] / "units").rglob("result.json")}
    unit = str(found[0][-1].parent.relative_to("units"))  # e.g. sweep/p0.5/tg_full/seed1
    n_records = sum(r["unit"] == unit for r in read_jsonl(runs[2] / "metrics.jsonl"))
    assert n_records > 0
    overrides = [f"out_dir={tmp_path / 'w2'}", f"data_dir={data_dir}", "progress=false", "seeds=[0,1]", *args]
    assert main(["run", recipe, "--preset", "smoke", *overrides, "num_threads=2", "workers=2"]) == EXIT_OK
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the other units were reused
    again = json.loads(lost.read_text())
    assert {k: again[k] for k in ("curve", "test")} == {k: before[k] for k in ("curve", "test")}
    assert sum(r["unit"] == unit for r in read_jsonl(runs[2] / "metrics.jsonl")) == n_records
    tests = [e for e in read_jsonl(runs[2] / "access_log.jsonl") if e["purpose"] == "final_test"]
    assert [e["unit"] for e in tests].count(unit) == 2  # the first attempt's read and this one's


def _key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
