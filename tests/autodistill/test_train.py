"""End to end at the smoke budget: every stage, claims, figures, exports, stage selection and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.methods.autodistill.space import Arch
from thrifty.methods.autodistill.train import train
from thrifty.methods.autodistill.trial import evaluate_arch, prepare_context


def _cfg(data_dir: Path, out: Path, *extra: str):
    return load_config("autodistill", "smoke", [f"data_dir={data_dir}", f"out_dir={out}", "progress=false", *extra])[1]


def test_smoke_trial_is_deterministic(data_dir: Path, tmp_path: Path) -> None:
    ctx = prepare_context(_cfg(data_dir, tmp_path))
    arch = Arch(num_layers=2, hidden_size=ctx.teacher_dim, intra_bottleneck_size=32, num_heads=2, intermediate_size=64,
                num_ffn=1, embedding_size=ctx.cfg.space.embedding_size)  # fmt: skip
    a, sa = evaluate_arch(ctx, arch)
    b, sb = evaluate_arch(ctx, arch)
    assert a["val_acc"] == b["val_acc"] and a["distill"]["stages"] == b["distill"]["stages"]
    assert all(torch.equal(x, y) for x, y in zip(sa.state_dict().values(), sb.state_dict().values()))
    lat = a["latency"]["1"]
    assert lat["runs"] == ctx.cfg.latency.repeats and lat["threads"] == 2 and lat["protocol"] == "interleaved"
    assert a["latency_ratio"] == lat["ratio"] > 0 and lat["reference_ms"] > 0
    # another distillation seed gives another student of the same architecture
    c, _ = evaluate_arch(ctx, arch, seed=ctx.cfg.seed + 1)
    assert c["seed"] == ctx.cfg.seed + 1 and c["distill"]["stages"] != a["distill"]["stages"]


def test_teacher_stage_alone_fills_the_cache_and_ends_cleanly(data_dir: Path, tmp_path: Path) -> None:
    res = train(_cfg(data_dir, tmp_path, "stages=[teacher]"))
    assert res["claims"] == [] and "search" not in res
    assert res["teacher"]["teacher_source"] == "ibbert" and res["teacher"]["teacher_params"] > 100_000
    run = Path(res["run_dir"])
    assert (run / "results.json").is_file() and not (run / "units" / "study.journal").exists()


def test_search_stage_alone_then_the_rest_resumes(data_dir: Path, tmp_path: Path) -> None:
    first = train(_cfg(data_dir, tmp_path, "stages=[teacher,search]"))
    assert first["claims"] == [] and len(first["search"]["trials"]) == 2
    hv = first["search"]["hypervolume"]["per_trial"]
    assert len(hv) == 2 and 0 < hv[0] <= hv[1]
    run = Path(first["run_dir"])
    assert (run / "units" / "study.journal").is_file() and not (run / "export").exists()

    res = train(_cfg(data_dir, tmp_path))
    assert [t["number"] for t in res["search"]["trials"]] == [0, 1]  # the study was resumed, not re-run
    assert res["search"]["trials"] == first["search"]["trials"]
    ids = {c["id"] for c in res["claims"]}
    assert {"flash_rank_fidelity", "bo_hypervolume_vs_random"} <= ids
    for base in ("mobilebert_like", "distilbert_like"):
        assert {f"searched_student_more_accurate_than_{base}", f"searched_student_faster_than_{base}"} <= ids
    assert "best_student_beats_unigram" in ids
    for fig in ("pareto.png", "hypervolume.png", "rank_fidelity.png", "downstream.png"):
        assert (run / "figures" / fig).stat().st_size > 1000
    saved = json.loads((run / "results.json").read_text())
    assert saved["teacher"]["teacher_source"] == "ibbert" and saved["teacher"]["teacher_params"] > 100_000
    assert 0 < saved["teacher"]["unigram_test_acc"] < 1
    students = saved["students"]
    assert {"mobilebert_like", "distilbert_like"} <= set(students) and any(n.startswith("front-") for n in students)
    for rec in students.values():  # every compared student distilled once per seed, test read per seed
        assert sorted(rec["per_seed"]) == ["0", "1"] and all("test_acc" in r for r in rec["per_seed"].values())
    session = saved["latency_session"]
    assert session["fresh_process"] and session["reference"] == "mobilebert_like" and session["rounds"] == 2
    assert students["mobilebert_like"]["session"]["ratio_median"] == 1.0
    for name in students:
        export = run / "export" / name
        assert {"config.json", "model.safetensors", "model.onnx", "README.md", "tokenizer.json"} <= {
            p.name for p in export.iterdir()
        }
    assert set(saved["teacher_downstream"]) == {"source", "same_work"}
    assert len(saved["sampler_comparison"]["runs"]) == 2 * 2  # gp and random × 2 seeds


def test_bad_settings_are_clear_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"search\.sampler"):
        _cfg(data_dir, tmp_path, "search.sampler=cmaes")
    with pytest.raises(ConfigError, match="stages"):
        _cfg(data_dir, tmp_path, "stages=[explore]")
    with pytest.raises(ConfigError, match="no completed search trials"):
        train(_cfg(data_dir, tmp_path, "stages=[evaluate]", "run_name=empty"))


def test_resume_false_starts_the_search_over(data_dir: Path, tmp_path: Path) -> None:
    first = train(_cfg(data_dir, tmp_path, "stages=[teacher,search]", "run_name=fresh"))
    again = train(_cfg(data_dir, tmp_path, "stages=[teacher,search]", "run_name=fresh", "resume=false"))
    # the journal was cleared, so the trials ran again: same seeds, same architectures, same accuracy
    assert [t["number"] for t in again["search"]["trials"]] == [0, 1]
    assert [(t["key"], t["val_acc"]) for t in again["search"]["trials"]] == [
        (t["key"], t["val_acc"]) for t in first["search"]["trials"]
    ]


@pytest.mark.dist
def test_two_search_workers_through_the_recipe(data_dir: Path, tmp_path: Path) -> None:
    res = train(
        _cfg(data_dir, tmp_path, "stages=[teacher,search]", "search.workers=2", "search.num_trials=3",
             "run_name=parallel")
    )  # fmt: skip
    trials = res["search"]["trials"]
    assert 3 <= len(trials) <= 4
    assert sorted(t["number"] for t in trials) == list(range(len(trials)))
    assert all(t["latency"]["1"]["runs"] == 4 for t in trials)
