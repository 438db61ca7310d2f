"""SQUID recipe end to end at the smoke budget: data files, results, claims, figures, no test leakage,
reuse of finished units, the scoring CLI and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thrifty.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from thrifty.core.registry import load_config
from thrifty.methods.squid.data import AccessLog, GuardedSet, ImageSet
from thrifty.methods.squid.score import Scorer
from thrifty.methods.squid.train import arm_settings, discriminator_lr, generator_lr, train


def smoke(out: Path, data_dir: Path, *overrides: str):
    return load_config("squid", "smoke", [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", *overrides])[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    results = train(smoke(out, data_dir))
    return out / "squid" / "smoke", results


def test_smoke_run_writes_results_tables_claims_and_figures(smoke_run):
    run_dir, results = smoke_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["claims"] == results["claims"]
    ids = {c["id"] for c in results["claims"]}
    assert {
        "squid_beats_ae",
        "squid_beats_memae",
        "squid_beats_knn",
        "squid_5_points_over_best_baseline",
        "squid_works",
        "squid_recon_score_beats_ae",
        "squid_cell_zmax_score_beats_ae",
    } <= ids
    assert {f"squid_beats_ae_on_{k}" for k in ("missing", "swap", "flip", "zero")} <= ids
    works = next(c for c in results["claims"] if c["id"] == "squid_works")
    assert works["kind"] == "works" and works["baseline"] == "cell_nn" and works["threshold"] == 2.0
    # every claim but the paper-score ones names its score; deviations say so
    assert all("deviation" in c["statement"] for c in results["claims"] if "_score_beats_" in c["id"])
    for c in results["claims"]:
        lo, hi = c["ci95"]
        assert lo <= c["measured"] <= hi
        assert c["holds"] == (lo > c["threshold"] if c["direction"] == "greater" else hi < c["threshold"])
        assert len(c["seeds"]) == 2
    auroc = results["tables"][0]
    assert [r[0] for r in auroc["rows"]] == [
        "squid (discriminator score)",
        "ae (recon score)",
        "memae (recon score)",
        "knn (position-aware bank)",
        "mean_image (training-free)",
        "cell_nn (training-free)",
    ]
    assert auroc["columns"][:3] == ["arm (score)", "seeds", "overall"]
    scores = results["tables"][1]
    assert scores["columns"] == ["arm", "selected by", "discriminator", "recon", "cell_zmax"]
    assert [r[:2] for r in scores["rows"]] == [["squid", "discriminator"], ["ae", "recon"], ["memae", "recon"]]
    assert scores["rows"][1][2] == ""  # no discriminator score for the AE
    assert set(auroc["columns"][3:]) == {"missing", "swap", "flip", "zero"}
    for fig in ("roc.png", "val_auroc.png", "val_auroc_by_score.png", "auroc_per_type.png", "reconstructions.png"):
        assert (run_dir / "figures" / fig).stat().st_size > 2000
    for arm in ("squid", "ae", "memae", "knn", "mean_image", "cell_nn"):
        for seed in (0, 1):
            res = json.loads((run_dir / "units" / arm / f"seed{seed}" / "result.json").read_text())
            t = res["test"]
            assert 0 <= t["auroc"] <= 100 and 0 <= t["auprc"] <= 100
            assert len(res["test_scores"]) == 40
            assert set(t["per_type"]) == {"missing", "swap", "flip", "zero"}
            if arm in ("squid", "ae", "memae"):
                assert 0 <= res["test_localisation_auroc"] <= 100
    squid0 = json.loads((run_dir / "units" / "squid" / "seed0" / "result.json").read_text())
    assert squid0["d_bce_end"] >= 0
    assert set(squid0["test_auroc_by_score"]) == {"discriminator", "recon", "cell_zmax"}
    assert squid0["test_auroc_by_score"]["discriminator"] == squid0["test"]["auroc"]
    assert all(
        sorted(c) == sorted(["step", "recon_mse_normal", "discriminator", "recon", "cell_zmax"])
        for c in squid0["curve"]
    )
    assert sorted(squid0["curve"][0]) == sorted(["step", "recon_mse_normal", "discriminator", "recon", "cell_zmax"])


def test_dataset_pngs_and_csv_are_written(smoke_run):
    _, results = smoke_run
    root = Path(results["data"]["root"])
    for split, n in (("val", 32), ("test", 40)):
        with open(root / split / "labels.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n
        assert {r["label"] for r in rows} == {"0", "1"}
        img = Image.open(root / split / rows[0]["file"])
        assert img.size == (24, 24) and img.mode == "L"
        for r in rows:
            assert (r["cells"].count("1") == 0) == (r["label"] == "0")


def test_no_test_image_touches_selection_calibration_or_threshold(smoke_run):
    run_dir, _ = smoke_run
    entries = [json.loads(x) for x in (run_dir / "access_log.jsonl").read_text().splitlines()]
    assert entries, "the access log is empty"
    test_reads = [e for e in entries if e["split"] == "test"]
    assert {e["purpose"] for e in test_reads} <= {"final_test", "figure"}
    assert {e["purpose"] for e in entries if e["split"] == "val"} <= {"selection", "calibration", "threshold"}
    units = {e["unit"] for e in entries if e["unit"] != "figures"}
    assert len(units) == 12  # (4 arms + 2 training-free baselines) x 2 seeds
    for unit in units:
        mine = [e for e in entries if e["unit"] == unit]
        first_test = min(e["index"] for e in mine if e["split"] == "test")
        assert all(e["index"] < first_test for e in mine if e["split"] == "val"), unit
        assert sum(e["split"] == "test" for e in mine) == 1, f"{unit} read the test set more than once"
    needs_calibration = [u for u in units if u.startswith("squid")]
    for unit in needs_calibration:
        assert any(e["unit"] == unit and e["purpose"] == "calibration" and e["split"] == "val" for e in entries)


def test_guarded_set_refuses_selection_on_test():
    data = ImageSet(torch.zeros(2, 1, 4, 4), np.array([0, 1]), ["normal", "swap"], ["a", "b"])
    log = AccessLog()
    with pytest.raises(PermissionError, match="test split may not be used for 'threshold'"):
        GuardedSet("test", data, log).get("threshold", "u")
    assert log.entries == []


def test_rerun_reuses_finished_units(smoke_run, data_dir):
    run_dir, results = smoke_run
    stamp = (run_dir / "units" / "squid" / "seed0" / "model.safetensors").stat().st_mtime_ns
    again = train(smoke(run_dir.parent.parent, data_dir))
    assert (run_dir / "units" / "squid" / "seed0" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [c["measured"] for c in again["claims"]] == [c["measured"] for c in results["claims"]]


def test_seeded_units_repeat_exactly(tmp_path, data_dir):
    a = train(smoke(tmp_path / "a", data_dir, "arms=[squid]", "seeds=[0]", "stages=[train]"))
    b = train(smoke(tmp_path / "b", data_dir, "arms=[squid]", "seeds=[0]", "stages=[train]"))
    assert a["claims"] == b["claims"] == []
    ra = json.loads((tmp_path / "a/squid/smoke/units/squid/seed0/result.json").read_text())
    rb = json.loads((tmp_path / "b/squid/smoke/units/squid/seed0/result.json").read_text())
    assert ra["test_scores"] == rb["test_scores"] and ra["curve"] == rb["curve"]


def test_data_stage_alone_builds_the_dataset(tmp_path, data_dir):
    res = train(smoke(tmp_path, data_dir, "stages=[data]"))
    assert Path(res["data"]["root"], "test", "labels.csv").is_file()
    assert res["claims"] == [] and not (tmp_path / "squid" / "smoke" / "units").exists()


def test_score_api_and_cli(smoke_run, tmp_path, capsys):
    run_dir, results = smoke_run
    unit = run_dir / "units" / "squid" / "seed0"
    scorer = Scorer.load(unit)
    imgs = torch.rand(3, 1, 24, 24)
    res = scorer.score(imgs)
    assert res["score"].shape == (3,) and np.all((res["score"] > 0) & (res["score"] < 1))
    assert res["heatmap"].shape == (3, 24, 24)
    root = Path(results["data"]["root"]) / "test"
    files = sorted(root.glob("*.png"))[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    out = tmp_path / "scored"
    assert main(["score", "squid", "--checkpoint", str(unit), *map(str, files), "--out", str(out)]) == EXIT_OK
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == [p.name for p in files]
    assert all((out / "heatmaps" / r["heatmap"]).is_file() for r in rows)
    # a bad image is a clear error naming it, or skipped and listed when asked
    assert main(["score", "squid", "--checkpoint", str(unit), str(bad), "--out", str(out)]) == EXIT_FAILED
    assert "broken.png" in capsys.readouterr().err
    assert (
        main(["score", "squid", "--checkpoint", str(unit), str(bad), str(files[0]), "--out", str(out), "--skip-bad"])
        == 0
    )
    with open(out / "scores.csv") as f:
        assert "skipped" in f.read()
    assert main(["score", "squid", "--checkpoint", str(tmp_path), str(files[0])]) == EXIT_FAILED
    assert main(["score", "glam", "--checkpoint", str(unit), str(files[0])]) == EXIT_USAGE


def test_scorer_reproduces_the_units_test_scores(smoke_run):
    run_dir, results = smoke_run
    from thrifty.data.digit_anatomy import read_eval_set

    test = read_eval_set(Path(results["data"]["root"]) / "test")
    for arm in ("squid", "ae"):
        unit = run_dir / "units" / arm / "seed1"
        stored = json.loads((unit / "result.json").read_text())["test_scores"]
        got = Scorer.load(unit).score(test.tensor())["score"]
        np.testing.assert_allclose(got, stored, rtol=1e-5, atol=1e-7)


def test_test_images_cannot_change_selection_calibration_or_threshold(smoke_run, tmp_path, data_dir):
    """Replace every test PNG by noise: everything decided on validation stays identical, the test scores move."""
    import shutil

    run_dir, results = smoke_run
    src = Path(results["data"]["root"])
    cache = tmp_path / "cache"
    shutil.copytree(src, cache / src.name)
    rng = np.random.default_rng(0)
    for png in (cache / src.name / "test").glob("*.png"):
        Image.fromarray(rng.integers(0, 256, size=(24, 24), dtype=np.uint8), mode="L").save(png)
    train(smoke(tmp_path / "runs", cache, "arms=[squid,ae]", "stages=[data,train]"))
    for arm in ("squid", "ae"):
        for seed in (0, 1):
            a = json.loads((run_dir / "units" / arm / f"seed{seed}" / "result.json").read_text())
            b = json.loads((tmp_path / f"runs/squid/smoke/units/{arm}/seed{seed}/result.json").read_text())
            assert (a["best_step"], a["val_auroc"], a["curve"]) == (b["best_step"], b["val_auroc"], b["curve"])
            assert a["calibration"] == b["calibration"]
            assert a["test"]["threshold"] == b["test"]["threshold"]
            assert a["test_scores"] != b["test_scores"]


def test_eval_stage_alone_rebuilds_claims_from_finished_units(smoke_run, data_dir):
    run_dir, results = smoke_run
    again = train(smoke(run_dir.parent.parent, data_dir, "stages=[eval]"))
    assert [c["measured"] for c in again["claims"]] == [c["measured"] for c in results["claims"]]
    assert again["tables"][0]["rows"] == results["tables"][0]["rows"]


def test_arm_settings_and_schedules():
    cfg = load_config("squid", "quick")[1]
    assert arm_settings("squid", cfg).inpaint and arm_settings("squid", cfg).queue
    assert not arm_settings("squid-no_queue", cfg).queue
    assert not arm_settings("squid-no_transformer", cfg).transformer
    assert arm_settings("squid-no_shortcut", cfg).shortcut_ratio == 1.0
    ae = arm_settings("ae", cfg)
    assert not (ae.inpaint or ae.teacher or ae.decoder_memory or ae.bottleneck_memory)
    # the authors' CAE: the whole image, no skips
    assert ae.num_patches == 1 and set(ae.ops) == {"none"}
    memae = arm_settings("memae", cfg)
    assert memae.bottleneck_memory and memae.num_patches == 1 and memae.memae_scope == "image"
    assert memae.memae_shrink == 0.0 and cfg.loss.memae_entropy_w == 0.0  # the CAE's softmax read, no entropy
    skip = arm_settings("ae_skip", cfg)
    assert skip.num_patches == 3 and "concat" in skip.ops and not skip.inpaint
    assert generator_lr(0, cfg) == pytest.approx(cfg.optim.lr)
    t_max = int(cfg.optim.t_max_epochs * cfg.optim.steps_per_epoch)
    assert generator_lr(t_max, cfg) == pytest.approx(cfg.optim.eta_min)
    m1 = int(cfg.optim.d_milestones_epochs[0] * cfg.optim.steps_per_epoch)
    assert discriminator_lr(m1 - 1, cfg) == pytest.approx(cfg.optim.d_lr)
    assert discriminator_lr(m1, cfg) == pytest.approx(cfg.optim.d_lr * cfg.optim.d_gamma)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("arms=[knn]", "needs 'ae'"),
        ("data.anomaly_types=[rotate]", "rotate"),
        ("data.source=zhanglab", "data.root"),
        ("score=entropy", "'score'"),
        ("arm_steps.knn=5", "arm_steps"),
        ("arm_steps.ae=0", "arm_steps.ae"),
        ("trivial.arms=[median]", "trivial.arms"),
        ("net.memae_scope=pixel", "memae_scope"),
    ],
)
def test_bad_config_is_a_clear_error(override, match, tmp_path, capsys):
    assert main(["run", "squid", "--preset", "smoke", f"out_dir={tmp_path}", override]) == EXIT_USAGE
    assert match in capsys.readouterr().err


def test_validation_only_run_never_reads_the_test_set(tmp_path, data_dir):
    """``final_test=false`` (the long preset): curves per score, a validation table, and no test read at all;
    ``arm_steps`` gives an arm its own budget."""
    res = train(
        smoke(tmp_path, data_dir, "arms=[squid,ae]", "seeds=[0]", "final_test=false", "arm_steps.ae=3", "eval_every=1")
    )
    run_dir = tmp_path / "squid" / "smoke"
    entries = [json.loads(x) for x in (run_dir / "access_log.jsonl").read_text().splitlines()]
    assert entries and all(e["split"] == "val" for e in entries)
    assert res["claims"] == []
    table = res["tables"][0]
    assert table["columns"][:3] == ["arm", "seed", "steps"]
    assert {r[0]: r[2] for r in table["rows"]} == {
        "squid": 2,
        "ae": 3,
        "mean_image": "training-free",
        "cell_nn": "training-free",
    }
    ae = json.loads((run_dir / "units" / "ae" / "seed0" / "result.json").read_text())
    assert [c["step"] for c in ae["curve"]] == [1, 2, 3] and "test" not in ae
    assert (run_dir / "figures" / "val_auroc_by_score.png").stat().st_size > 2000
