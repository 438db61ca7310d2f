"""The BigSSL recipe end to end at the smoke budget: artefacts, claims, split hygiene, determinism, resumption, the
card's stage and selector commands, and torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.core.registry import load_config

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make setup)")


def _run(out: Path, data_dir: Path, *overrides: str) -> tuple[dict, Path]:
    module, cfg = load_config(
        "bigssl", "smoke", [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", *overrides]
    )
    res = module.train(cfg)
    return res, Path(res["run_dir"])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[dict, Path]:
    return _run(tmp_path_factory.mktemp("bigssl"), data_dir)


def _units(run_dir: Path, kind: str) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(run_dir)): json.loads(p.read_text())
        for p in sorted((run_dir / "units" / kind).rglob("result.json"))
    }


def test_smoke_writes_claims_tables_figures(smoke, data_dir: Path) -> None:
    res, run_dir = smoke
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # the corpus lives in the data cache; the manifest names it by placeholder, not by this machine's path
    assert manifest["corpus"].startswith("<data_dir>/speech/") and str(data_dir) not in json.dumps(manifest)
    ids = {c["id"] for c in res["claims"]}
    for f in ("0.5", "1"):
        assert f"pretraining_lowers_wer_{f}" in ids and f"nst_lowers_wer_{f}" in ids
        assert f"pretraining_lowers_cer_{f}" in ids and f"nst_lowers_cer_{f}" in ids
    assert {"gain_largest_at_low_fraction", "pretrained_low_reaches_scratch_full"} <= ids
    assert {"gain_largest_at_low_fraction_cer", "pretrained_low_reaches_scratch_full_cer"} <= ids
    for c in res["claims"]:
        assert isinstance(c["holds"], bool) and len(c["seeds"]) == 2 and c["paper_value"]
    for fig in ("wer_vs_labels.png", "pretrain.png", "nst.png", "finetune_dev_cer.png"):
        assert (run_dir / "figures" / fig).stat().st_size > 0
    assert len(_units(run_dir, "finetune")) == 2 * 2 * 2  # inits x fractions x seeds
    assert len(_units(run_dir, "nst")) == 2 * 2  # fractions x seeds, one generation
    assert set(res["wer"]) == {"scratch", "pretrained", "pretrained+nst"}
    assert set(res["data"]) == {"unlabelled", "labelled", "dev", "test_in", "test_ood"}
    assert (run_dir / "units" / "pretrain" / "wav2vec2-s0" / "encoder.safetensors").exists()
    assert res["cost"]["wall_time_s"] > 0 and res["cost"]["peak_rss_mb"] > 0


def test_wer_is_computed_from_the_written_hypotheses(smoke) -> None:
    """Each unit's test WER lies in [0, ∞), the greedy examples are real transcripts, and the fused decoding's
    weights come from the dev grid."""
    _, run_dir = smoke
    for res in _units(run_dir, "finetune").values():
        for scores in res["test"].values():
            assert scores["greedy_wer"] >= 0 and scores["greedy_cer"] >= 0
            assert all(ex["ref"] for ex in scores["examples"])
        grid = res["fusion"]["dev_grid"]
        best = min(grid, key=lambda r: r["wer"])
        assert (res["fusion"]["lm_weight"], res["fusion"]["length_bonus"]) == (best["lm_weight"], best["length_bonus"])


def test_test_sets_are_read_once_per_model_and_never_for_selection(smoke) -> None:
    _, run_dir = smoke
    entries = [json.loads(line) for line in (run_dir / "access_log.jsonl").read_text().splitlines()]
    tests = [e for e in entries if e["split"].startswith("test")]
    assert tests and {e["purpose"] for e in tests} == {"test"}
    per_unit: dict[tuple[str, str], int] = {}
    for e in tests:
        per_unit[(e["unit"], e["split"])] = per_unit.get((e["unit"], e["split"]), 0) + 1
    assert set(per_unit.values()) == {1}
    models = len(_units(run_dir, "finetune")) + len(_units(run_dir, "nst"))
    # test_in and test_ood, once each per trained model, and once for the training-free baselines
    assert len(per_unit) == 2 * (models + 1)
    assert {s for u, s in per_unit if u == "baseline/trivial"} == {"test_in", "test_ood"}
    # every test read comes after that unit's last dev read
    for unit in {e["unit"] for e in tests} - {"baseline/trivial"}:
        last_dev = max(e["index"] for e in entries if e["unit"] == unit and e["split"] == "dev")
        first_test = min(e["index"] for e in tests if e["unit"] == unit)
        assert first_test > last_dev
    truth = [e for e in entries if e["split"] == "unlabelled_truth"]
    assert truth and {e["purpose"] for e in truth} == {"pseudo_label_quality"}


def test_pseudo_labels_are_persisted_with_the_filter(smoke) -> None:
    _, run_dir = smoke
    for unit, res in _units(run_dir, "nst").items():
        rows = [json.loads(line) for line in (run_dir / unit / "pseudo_labels.jsonl").read_text().splitlines()]
        assert len(rows) == res["decoded"] == 20
        assert sum(r["kept"] for r in rows) == res["kept"]
        tau = res["normaliser"]["tau"]
        assert all(r["normalized"] > tau for r in rows if r["kept"])
        assert res["teacher"].startswith("units/finetune/pretrained-")


def test_same_seed_same_numbers(smoke, tmp_path: Path, data_dir: Path) -> None:
    res, _ = smoke
    again, _ = _run(tmp_path, data_dir)
    assert again["wer"] == res["wer"]
    assert [c["values"] for c in again["claims"]] == [c["values"] for c in res["claims"]]


class _Interrupt(Exception):
    pass


def test_resume_continues_interrupted_training(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    """A fine-tuning unit interrupted at step 7 (last checkpoint: step 5) and resumed equals an uninterrupted run."""
    from thrifty.core.run import MetricsLog

    over = ("stages=[data,pretrain,finetune]", "finetune.inits=[scratch]", "finetune.fractions=[1.0]", "seeds=[0]")
    _, full_dir = _run(tmp_path / "a", data_dir, *over)
    original = MetricsLog.log

    def crash(self, record):  # the process dies at step 7, after the step-5 checkpoint
        original(self, record)
        if record.get("unit") == "finetune/scratch/1/s0" and record.get("step") == 7:
            raise _Interrupt

    monkeypatch.setattr(MetricsLog, "log", crash)
    with pytest.raises(_Interrupt):
        _run(tmp_path / "b", data_dir, *over)
    monkeypatch.setattr(MetricsLog, "log", original)
    _, part_dir = _run(tmp_path / "b", data_dir, *over)
    unit = "units/finetune/scratch-100pct-s0"
    a, b = _units(full_dir, "finetune")[unit], _units(part_dir, "finetune")[unit]
    assert a["curve"] == b["curve"] and a["test"] == b["test"]

    def losses(d: Path) -> list[tuple[int, float]]:
        rows = map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in rows if r.get("unit") == "finetune/scratch/1/s0" and "grad_norm" in r]

    assert losses(full_dir) == losses(part_dir) and len(losses(full_dir)) == 10


def test_card_commands_select_stages_and_arms(tmp_path: Path, data_dir: Path) -> None:
    res, run_dir = _run(tmp_path, data_dir, "stages=[data,pretrain]", "pretrain.objective=w2v_bert")
    assert (run_dir / "units" / "pretrain" / "w2v_bert-s0" / "encoder.safetensors").exists()
    assert not (run_dir / "units" / "finetune").exists() and res["claims"] == []
    res, _ = _run(
        tmp_path,
        data_dir,
        "stages=[finetune,evaluate]",
        "pretrain.objective=w2v_bert",
        "finetune.init=pretrained",
        "finetune.fractions=[0.5]",
    )
    assert set(_units(run_dir, "finetune")) == {
        "units/finetune/pretrained-50pct-s0",
        "units/finetune/pretrained-50pct-s1",
    }
    assert set(res["wer"]) == {"pretrained"}


def test_finetuning_a_pretrained_init_without_pretraining_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="add the pretrain stage"):
        _run(tmp_path, data_dir, "stages=[finetune]", "finetune.init=pretrained")


@pytest.mark.dist
def test_torchrun_two_gloo_processes(tmp_path: Path, data_dir: Path) -> None:
    """Pre-training runs under DDP with per-rank length-bucketed batches; fine-tuning units are shared out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "thrifty",
        "run",
        "bigssl",
        "--preset",
        "smoke",
        f"out_dir={tmp_path}",
        f"data_dir={data_dir}",
        "progress=false",
        "num_threads=1",
        "nst.generations=0",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "bigssl" / "smoke"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["cost"]["world_size"] == 2
    assert len(_units(run_dir, "finetune")) == 8
    ranks = {
        json.loads(line).get("unit")
        for line in (run_dir / "metrics.rank1.jsonl").read_text().splitlines()
        if json.loads(line).get("unit", "").startswith("finetune/")
    }
    assert len(ranks) == 4  # rank 1 trained half of the 8 units


def test_two_noisy_student_generations_chain_teachers(tmp_path: Path, data_dir: Path) -> None:
    """Generation 2 is taught by generation 1's student, and the claims compare against the last generation."""
    res, run_dir = _run(
        tmp_path,
        data_dir,
        "nst.generations=2",
        "finetune.fractions=[1.0]",
        "finetune.inits=[pretrained]",
        "seeds=[0,1]",
    )
    units = _units(run_dir, "nst")
    assert set(units) == {f"units/nst/100pct-s{s}/gen{g}" for s in (0, 1) for g in (1, 2)}
    for s in (0, 1):
        assert units[f"units/nst/100pct-s{s}/gen2"]["teacher"] == f"units/nst/100pct-s{s}/gen1"
        assert units[f"units/nst/100pct-s{s}/gen1"]["teacher"] == f"units/finetune/pretrained-100pct-s{s}"
    gen2 = {s: 100 * units[f"units/nst/100pct-s{s}/gen2"]["test"]["test_in"]["greedy_wer"] for s in (0, 1)}
    assert res["wer"]["pretrained+nst"]["1.0"]["test_in"] == pytest.approx(sum(gen2.values()) / 200)
    nst_table = next(t for t in res["tables"] if t["columns"][1] == "generation")
    assert [row[1] for row in nst_table["rows"]] == [0, 1, 2]


def test_rnnt_fine_tuning_runs_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    """``finetune.decoder=rnnt``: transducer fine-tuning from scratch and from the pre-trained encoder, greedy
    decoding, WER on both test sets, kept weights that load back as a transducer, and a noisy-student generation
    taught by a transducer."""
    from thrifty.methods.bigssl.finetune import load_model
    from thrifty.methods.bigssl.rnnt import TransducerModel

    res, run_dir = _run(tmp_path, data_dir, "finetune.decoder=rnnt", "seeds=[0]", "finetune.fractions=[1.0]")
    units = _units(run_dir, "finetune")
    assert len(units) == 2  # scratch and pre-trained
    for unit in [*units.values(), *_units(run_dir, "nst").values()]:
        assert set(unit["test"]) == {"test_in", "test_ood"} and unit.get("fusion") is None
        assert all(s["greedy_wer"] >= 0 and "lm_wer" not in s for s in unit["test"].values())
    nst = _units(run_dir, "nst")
    assert len(nst) == 1 and next(iter(nst.values()))["decoded"] > 0
    labels = [
        json.loads(x)
        for x in next((run_dir / "units" / "nst").rglob("pseudo_labels.jsonl")).read_text().split("\n")
        if x
    ]
    assert labels and all(isinstance(p["score"], float) and p["score"] <= 0 for p in labels)
    _, cfg = load_config("bigssl", "smoke", ["finetune.decoder=rnnt"])
    unit_dir = next((run_dir / "units" / "finetune").glob("pretrained-*"))
    assert isinstance(load_model(unit_dir, cfg, torch.device("cpu")), TransducerModel)
    assert res["wer"]["scratch"]["1.0"]["test_in"] >= 0


def test_calibration_mode_reads_no_test_utterance(tmp_path: Path, data_dir: Path) -> None:
    """``finetune.test=false`` with every stage: units, noisy student and the evaluate stage run on dev alone."""
    res, run_dir = _run(tmp_path, data_dir, "finetune.test=false", "seeds=[0]")
    entries = [json.loads(line) for line in (run_dir / "access_log.jsonl").read_text().splitlines()]
    assert entries and not [e for e in entries if e["split"].startswith("test")]
    units = [*_units(run_dir, "finetune").values(), *_units(run_dir, "nst").values()]
    assert len(units) == 2 * 2 + 2 and all(u["test"] == {} and u["dev_wer"] >= 0 for u in units)
    assert res["claims"] == [] and res["trivial_baselines"] is None
    assert res["tables"][0]["rows"] and res["tables"][0]["columns"][-1] == "dev WER (selected)"
