"""The Genesis recipe end to end at the smoke budget: stages, artefacts, split hygiene, determinism, resumption,
the card's single-stage commands and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.methods.genesis.model import UNet3D, load_encoder, load_weights


def _run(tmp_path: Path, data_dir: Path, *overrides: str) -> tuple[dict, Path]:
    module, cfg = load_config(
        "genesis", "smoke", [f"out_dir={tmp_path}", f"data_dir={data_dir}", "progress=false", *overrides]
    )
    res = module.train(cfg)
    return res, Path(res["run_dir"])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[dict, Path]:
    return _run(tmp_path_factory.mktemp("genesis"), data_dir)


def _finetune_results(run_dir: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(run_dir)): json.loads(p.read_text())
        for p in sorted((run_dir / "units" / "finetune").rglob("result.json"))
    }


def test_smoke_writes_claims_tables_figures_and_exports(smoke) -> None:
    res, run_dir = smoke
    ids = {c["id"] for c in res["claims"]}
    for task in ("ncc", "ncs"):
        assert f"genesis_off_beats_scratch_{task}" in ids
        assert f"semantic_genesis_vs_models_genesis_{task}" in ids
    assert all(isinstance(c["holds"], bool) for c in res["claims"])
    assert any("NCC" in t["title"] or "false-positive" in t["title"] for t in res["tables"])
    for fig in ("restoration.png", "ncc_bars.png", "ncs_bars.png", "pretrain_loss.png", "visual_words.png"):
        assert (run_dir / "figures" / fig).stat().st_size > 0
    # 2 tasks x 1 fraction x 3 arms x 2 seeds
    assert len(_finetune_results(run_dir)) == 12
    for arm in ("genesis-off", "genesis-on"):
        unit = run_dir / "units" / "pretrain" / arm / "seed0"
        state, card = load_weights(unit / "encoder.safetensors")
        assert card["cube_dhw"] == [16, 32, 32] and card["hu_window"] == [-1000, 1000]
        assert card["pretraining_patients"] and card["seed"] == 0
        net = UNet3D(width=0.125)
        load_encoder(net, state)  # loads strictly into the recipe's U-Net
        unet_state, _ = load_weights(unit / "unet.safetensors")
        net.load_state_dict(unet_state)
        result = json.loads((unit / "result.json").read_text())
        assert result["constant_loss"] > 0 and result["val_loss_over_constant"] > 0
    pre = next(t for t in res["tables"] if t["title"].startswith("Pre-training"))
    assert "constant predictor" in pre["columns"] and all(r[4] for r in pre["rows"])
    # C x K x 3 (an exact and two rescaled crops per training instance, the release's multi-resolution), all written
    assert res["visual_words"]["instances"]["train"] == 3 * 4 * 3
    assert res["visual_words"]["instances"]["val"] == 3 * 2  # C x K_val exact crops, as the release's validation


def test_no_test_patient_touches_pretraining_or_selection(smoke) -> None:
    _, run_dir = smoke
    manifest = json.loads((run_dir / "manifest.json").read_text())
    test = set(manifest["target_test"])
    assert not test & set(manifest["target_val"]) and not test & set(manifest["target_train"])
    assert manifest["unlabelled_cohort"]["phantom_seed"] != manifest["target_cohort"]["phantom_seed"]
    reads = [json.loads(line) for line in (run_dir / "access_log.jsonl").read_text().splitlines()]
    test_reads = [r for r in reads if r["split"] == "test"]
    assert {r["purpose"] for r in test_reads} == {"final_test"}
    # the test split is read exactly once per fine-tuned model, after its selection reads, and once by the
    # training-free baseline
    assert len(test_reads) == len({r["unit"] for r in test_reads}) == 12 + 1
    assert sum(r["unit"] == "baseline/centre_intensity" for r in test_reads) == 1
    for r in test_reads:
        later = [x for x in reads if x["unit"] == r["unit"] and x["index"] > r["index"]]
        assert not later


def test_same_config_same_numbers_and_resume_reuses_units(smoke, tmp_path, data_dir) -> None:
    res, run_dir = smoke
    again, other = _run(tmp_path, data_dir)
    assert other != run_dir
    a, b = _finetune_results(run_dir), _finetune_results(other)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["test"] == b[k]["test"], k
        assert a[k]["curve"] == b[k]["curve"], k
    before = {p: p.stat().st_mtime_ns for p in (other / "units").rglob("result.json")}
    resumed, _ = _run(tmp_path, data_dir)
    assert {p: p.stat().st_mtime_ns for p in (other / "units").rglob("result.json")} == before
    assert [c["measured"] for c in resumed["claims"]] == [c["measured"] for c in again["claims"]]


def test_card_single_stage_commands(tmp_path, data_dir) -> None:
    res, run_dir = _run(
        tmp_path, data_dir, "stages=[pretrain]", "pretrain.pretext=genesis", "pretrain.visual_words=true"
    )
    assert (run_dir / "units" / "pretrain" / "genesis-on" / "seed0" / "encoder.safetensors").exists()
    assert not (run_dir / "units" / "pretrain" / "genesis-off").exists()
    assert not (run_dir / "units" / "finetune").exists()
    # same run directory, fine-tuning only: arms not pre-trained yet are skipped and reported, not run from scratch
    res, run_dir2 = _run(tmp_path, data_dir, "stages=[finetune,evaluate]", "finetune.task=ncc")
    assert run_dir2 == run_dir
    assert res["skipped_arms"] == ["genesis/off"]
    done = _finetune_results(run_dir)
    assert {Path(k).parts[2] for k in done} == {"ncc"}
    assert {Path(k).parts[4] for k in done} == {"scratch", "genesis-on"}


def test_changed_config_refuses_to_resume(tmp_path, data_dir) -> None:
    _run(tmp_path, data_dir, "stages=[pretrain]", "arms=[genesis/off]")
    with pytest.raises(ConfigError, match="different config"):
        _run(tmp_path, data_dir, "stages=[pretrain]", "arms=[genesis/off]", "pretrain.adam_lr=0.5")


def test_pretraining_is_deterministic(tmp_path, data_dir) -> None:
    _, a = _run(tmp_path, data_dir, "stages=[pretrain]", "arms=[inpaint/off]", "run_name=a")
    _, b = _run(tmp_path, data_dir, "stages=[pretrain]", "arms=[inpaint/off]", "run_name=b")
    sa, _ = load_weights(a / "units" / "pretrain" / "inpaint-off" / "seed0" / "encoder.safetensors")
    sb, _ = load_weights(b / "units" / "pretrain" / "inpaint-off" / "seed0" / "encoder.safetensors")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.dist
def test_recipe_runs_under_torchrun(tmp_path, data_dir) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "thrifty",
        "run",
        "genesis",
        "--preset",
        "smoke",
        f"out_dir={tmp_path}",
        f"data_dir={data_dir}",
        "progress=false",
        "num_threads=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "genesis" / "smoke"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["cost"]["world_size"] == 2
    assert len(_finetune_results(run_dir)) == 12
    # fine-tuning units were shared out: both ranks read the test split, each for its own units
    logs = [run_dir / "access_log.jsonl", run_dir / "access_log.rank1.jsonl"]
    units = [{json.loads(x)["unit"] for x in p.read_text().splitlines() if '"test"' in x} for p in logs]
    assert units[0] and units[1] and not units[0] & units[1]
    assert {c["id"] for c in res["claims"]} >= {"genesis_off_beats_scratch_ncc"}


def test_claims_skip_tasks_and_arms_without_finished_units() -> None:
    from thrifty.core.registry import load_config as load_recipe
    from thrifty.methods.genesis.train import make_claims

    _, cfg = load_recipe("genesis", "smoke", [])
    unit = {"test": {"auc": 80.0}}
    results = {"ncc": {0.5: {"scratch": {0: unit, 1: unit}, "genesis/off": {0: unit, 1: unit}}}}  # no NCS at all
    claims = make_claims(cfg, results)
    assert [c.id for c in claims] == ["genesis_off_beats_scratch_ncc"]


def test_works_claim_uses_the_validation_chosen_arm_and_the_centre_intensity_baseline() -> None:
    from thrifty.core.registry import load_config as load_recipe
    from thrifty.methods.genesis.train import WORKS_MARGIN, best_arm, make_claims, task_table

    _, cfg = load_recipe("genesis", "smoke", [])
    low = min(cfg.finetune.label_fractions)

    def unit(val: float, test: float) -> dict:
        return {"val": val, "test": {"auc": test}}

    results = {
        "ncc": {
            low: {
                "scratch": {0: unit(70.0, 90.0), 1: unit(72.0, 91.0)},  # best on test, not on validation
                "genesis/off": {0: unit(80.0, 74.0), 1: unit(82.0, 76.0)},
            }
        }
    }
    assert best_arm(results, "ncc", low) == "genesis/off"
    trivial = {"val": 71.0, "test": 72.0}
    works = next(c for c in make_claims(cfg, results, trivial) if c.id == "best_model_works_ncc")
    assert works.measured == pytest.approx(75.0 - 72.0) and works.holds is (WORKS_MARGIN < 3.0)
    table = task_table(cfg, results, "ncc", low, trivial)
    assert table["rows"][0][:4] == ["trivial: centre 3×3×3 intensity", "-", "72.0", "71.0"]
    assert all(len(r) == len(table["columns"]) for r in table["rows"])


def test_calibration_pilot_reads_no_test_cube(tmp_path, data_dir) -> None:
    res, run_dir = _run(tmp_path, data_dir, "stages=[data,finetune]", "arms=[scratch]", "finetune.test=false")
    reads = [json.loads(line) for line in (run_dir / "access_log.jsonl").read_text().splitlines()]
    assert reads and not [r for r in reads if r["split"] == "test"]
    results = _finetune_results(run_dir)
    assert results and all(r["test"] == {} and r["val"] >= 0 for r in results.values())
    with pytest.raises(Exception, match="calibration pilots"):
        _run(tmp_path, data_dir, "finetune.test=false")
