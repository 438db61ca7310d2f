"""Scoring DICOM exams with a trained PE CAD run (``thrifty score pe_cad``): the CSVs, agreement with the training
pipeline and with the in-memory path, the feature cache, and clear errors for bad exams and checkpoints."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from thrifty.cli import EXIT_FAILED, EXIT_OK, main
from thrifty.core.registry import load_config
from thrifty.data import ctpa_synth
from thrifty.data.rsna_pe import ExamDataError, write_ct_series
from thrifty.methods.pe_cad import score as scoring
from thrifty.methods.pe_cad.data import split_seeds
from thrifty.methods.pe_cad.score import EXAM_LABELS, ExamScorer, ScoringError, score_files
from thrifty.methods.pe_cad.train import train

pydicom = pytest.importorskip("pydicom")

RUN_ARGS = ("stage1.arms=[cnn-random]", "seeds=[0]", "stage2.kinds=[cc,mil_attention]")
PROB_COLUMNS = [f"p_{n}" for n in EXAM_LABELS]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> tuple[Path, object]:
    """A smoke run (one stage-1 arm, CC and attention-MIL, one seed) and its config."""
    out = tmp_path_factory.mktemp("runs")
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", *RUN_ARGS]
    cfg = load_config("pe_cad", "smoke", args)[1]
    train(cfg)
    return out / "pe_cad" / "smoke", cfg


def stage2_unit(run_dir: Path, kind: str) -> Path:
    return run_dir / "units" / "stage2" / kind / "seed0"


def drawn_test_exams(cfg, n: int) -> list[ctpa_synth.Exam]:
    """The run's first ``n`` test exams, drawn again from the generator (as the recipe's data stage does)."""
    syn = cfg.data.synthetic
    spec = ctpa_synth.CTPASpec.from_overrides(syn.spec)
    return [ctpa_synth.generate_exam(split_seeds(syn.seed)["test"], index=i, spec=spec) for i in range(n)]


def write_dicom_exam(folder: Path, ex: ctpa_synth.Exam) -> list[Path]:
    """One exam as a CT series in ``folder``, files named so that their name order is the reverse of z; returns the
    files in ascending z."""
    return write_ct_series(ex.volume, folder, positions=ex.positions, spacing=ex.spacing, study_uid=ex.study_uid,
                           name=lambda k, sop: f"slice{ex.n_slices - k:03d}.dcm")  # fmt: skip


def training_features(stage1_unit: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D), probs (N,), offsets (E + 1,)) of the test split as the recipe's feature stage stored them:
    one ``test.npz``, or per-exam files read with ``data.load_feature_split``."""
    directory = stage1_unit / "features"
    if (directory / "test.npz").is_file():
        with np.load(directory / "test.npz") as z:
            return z["features"], z["probs"], z["offsets"]
    from thrifty.methods.pe_cad import data

    fs = data.load_feature_split(directory / "test")
    return fs.features.numpy(), np.asarray(fs.probs), fs.offsets


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def exams(run, tmp_path_factory) -> tuple[list[ctpa_synth.Exam], list[Path]]:
    """Two of the run's test exams written as DICOM folders under ``<tmp>/exams/<study>/<series>/``."""
    _, cfg = run
    root = tmp_path_factory.mktemp("exams")
    drawn = drawn_test_exams(cfg, 2)
    folders = []
    for ex in drawn:
        folder = root / ex.study_uid / (ex.study_uid + ".1")
        write_dicom_exam(folder, ex)
        folders.append(folder)
    return drawn, folders


# ------------------------------------------------------------------------------------------------- outputs


def test_scoring_writes_exam_and_slice_csvs(run, exams, tmp_path):
    run_dir, _ = run
    drawn, folders = exams
    csv_path = score_files(stage2_unit(run_dir, "cc"), [folders[0].parents[1]], tmp_path / "out", device="cpu")
    assert csv_path == tmp_path / "out" / "exams.csv"
    rows = read_csv(csv_path)
    assert [r["exam"] for r in rows] == [str(f) for f in sorted(folders)]  # the tree is searched, sorted
    assert list(rows[0]) == ["exam", "study_instance_uid", "series_instance_uid", "slices", *PROB_COLUMNS,
                             "feature_cache", "note"]  # fmt: skip
    by_study = {ex.study_uid: ex for ex in drawn}
    for r in rows:
        ex = by_study[r["study_instance_uid"]]
        assert r["series_instance_uid"] == ex.study_uid + ".1" and int(r["slices"]) == ex.n_slices
        probs = np.array([float(r[c]) for c in PROB_COLUMNS])
        assert np.all((probs >= 0) & (probs <= 1)) and r["feature_cache"] == "miss" and r["note"] == ""
    slices = read_csv(tmp_path / "out" / "slices.csv")
    assert list(slices[0]) == ["exam", "study_instance_uid", "slice", "file", "sop_instance_uid", "z_mm",
                               "p_pe_stage1", "p_pe_cc"]  # fmt: skip
    assert len(slices) == sum(ex.n_slices for ex in drawn)
    for r in slices:
        ex = by_study[r["study_instance_uid"]]
        k = int(r["slice"])  # ascending z: the files were named in reverse order
        assert r["sop_instance_uid"] == f"{ex.study_uid}.1.{k + 1}" and r["file"] == f"slice{ex.n_slices - k:03d}.dcm"
        assert float(r["z_mm"]) == pytest.approx(ex.positions[k], abs=1e-3)
        assert 0 <= float(r["p_pe_stage1"]) <= 1 and 0 <= float(r["p_pe_cc"]) <= 1


def test_scores_equal_the_training_pipeline(run, exams):
    """The DICOM path gives the features the recipe's feature stage cached for the same test exams, and the
    exam probabilities its stage-2 unit reported on them."""
    run_dir, _ = run
    drawn, folders = exams
    unit = stage2_unit(run_dir, "cc")
    result = json.loads((unit / "result.json").read_text())
    features, probs, offsets = training_features(run_dir / "units" / "stage1" / result["features_arm"] / "seed0")
    scorer = ExamScorer.load(unit, device="cpu")
    for i, folder in enumerate(folders):
        arrays, _ = scoring.exam_features(scorer, folder, folder.parents[2] / "cache-train-check")
        a, b = offsets[i], offsets[i + 1]
        np.testing.assert_allclose(arrays["features"], features[a:b], atol=1e-6)
        np.testing.assert_allclose(arrays["probs"], probs[a:b], atol=1e-6)
        pred = scorer.predict_features(arrays["features"], arrays["probs"])
        np.testing.assert_allclose(pred.exam_probs, result["test"]["exam_probs"][i], atol=2e-5)
        assert str(arrays["study_uid"]) == drawn[i].study_uid


def test_dicom_path_equals_the_in_memory_path(run, exams, tmp_path):
    run_dir, _ = run
    drawn, folders = exams
    for kind in ("cc", "mil_attention"):
        unit = stage2_unit(run_dir, kind)
        scorer = ExamScorer.load(unit, device="cpu")
        score_files(unit, [folders[0]], tmp_path / kind, device="cpu")
        row = read_csv(tmp_path / kind / "exams.csv")[0]
        pred = scorer.score_volume(drawn[0].volume)
        assert pred.exam_probs.shape == (9,) and pred.stage1_probs.shape == (drawn[0].n_slices,)
        np.testing.assert_allclose([float(row[c]) for c in PROB_COLUMNS], pred.exam_probs, atol=1e-6)
        slices = read_csv(tmp_path / kind / "slices.csv")
        np.testing.assert_allclose([float(r["p_pe_stage1"]) for r in slices], pred.stage1_probs, atol=1e-6)
        if kind == "cc":
            assert pred.slice_probs is not None
            np.testing.assert_allclose([float(r["p_pe_cc"]) for r in slices], pred.slice_probs, atol=1e-6)
        else:  # MIL trains on exam labels only: no stage-2 slice probability
            assert pred.slice_probs is None and all(r[f"p_pe_{kind}"] == "" for r in slices)


def test_long_exam_is_fitted_and_slice_probabilities_come_back_per_slice(run):
    run_dir, cfg = run
    scorer = ExamScorer.load(stage2_unit(run_dir, "cc"), device="cpu")
    spec = ctpa_synth.CTPASpec(size=32, slices=(40, 40), indeterminate_rate=0.0)
    ex = ctpa_synth.generate_exam(7, spec=spec)
    assert ex.n_slices > cfg.stage2.seq_len  # resized to L, then back
    pred = scorer.score_volume(ex.volume)
    assert pred.slice_probs is not None and pred.slice_probs.shape == (40,) and pred.features.shape[0] == 40
    assert np.all((pred.slice_probs >= 0) & (pred.slice_probs <= 1))


# --------------------------------------------------------------------------------------------------- cache


def test_a_rerun_reads_the_feature_cache_and_a_changed_file_misses_it(run, exams, tmp_path, monkeypatch):
    run_dir, _ = run
    drawn, folders = exams
    folder = tmp_path / "exam"
    shutil.copytree(folders[0], folder)
    unit = stage2_unit(run_dir, "cc")
    first = read_csv(score_files(unit, [folder], tmp_path / "out", device="cpu"))
    assert len(list((tmp_path / "out" / "feature_cache").glob("*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the exam was decoded or run through stage 1 again")

    with monkeypatch.context() as m:
        m.setattr(scoring, "load_exam", refuse)
        m.setattr(ExamScorer, "stage1", refuse)
        again = read_csv(score_files(unit, [folder], tmp_path / "out", device="cpu"))
        # another stage-2 kind trained on the same stage-1 unit shares the cache
        read_csv(score_files(stage2_unit(run_dir, "mil_attention"), [folder], tmp_path / "out", device="cpu"))
    assert again[0]["feature_cache"] == "hit" and first[0]["feature_cache"] == "miss"
    assert [again[0][c] for c in PROB_COLUMNS] == [first[0][c] for c in PROB_COLUMNS]

    ds = pydicom.dcmread(folder / "slice001.dcm")  # change one voxel of one slice: a new key
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(folder / "slice001.dcm")
    changed = read_csv(score_files(unit, [folder], tmp_path / "out", device="cpu"))
    assert changed[0]["feature_cache"] == "miss"
    assert len(list((tmp_path / "out" / "feature_cache").glob("*.npz"))) == 2


# -------------------------------------------------------------------------------------------------- errors


def test_a_corrupt_slice_is_one_error_naming_the_file(run, exams, tmp_path):
    run_dir, _ = run
    _, folders = exams
    folder = tmp_path / "exam"
    shutil.copytree(folders[0], folder)
    bad = folder / "slice005.dcm"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    unit = stage2_unit(run_dir, "cc")
    with pytest.raises(ExamDataError, match=r"slice005\.dcm"):
        score_files(unit, [folder], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out" / "exams.csv").exists()  # nothing half-written
    bad.write_bytes(b"not a DICOM file at all")
    with pytest.raises(ExamDataError, match=r"slice005\.dcm: not a readable DICOM file"):
        score_files(unit, [folder], tmp_path / "out", device="cpu")
    # --skip-bad: the good exam is scored, the bad one gets a row saying why
    rows = read_csv(score_files(unit, [folder, folders[1]], tmp_path / "out", skip_bad=True, device="cpu"))
    assert rows[0]["note"].startswith("skipped:") and "slice005.dcm" in rows[0]["note"]
    assert rows[1]["note"] == "" and 0 <= float(rows[1][PROB_COLUMNS[0]]) <= 1


def test_a_missing_slice_is_one_error_naming_the_files_around_it(run, exams, tmp_path):
    run_dir, _ = run
    _, folders = exams
    folder = tmp_path / "exam"
    shutil.copytree(folders[0], folder)
    (folder / "slice006.dcm").unlink()
    with pytest.raises(ExamDataError, match=r"missing slice.*slice007\.dcm.*slice005\.dcm"):
        score_files(stage2_unit(run_dir, "cc"), [folder], tmp_path / "out", device="cpu")


def test_bad_checkpoints_and_inputs_are_clear_errors(run, exams, tmp_path):
    run_dir, _ = run
    _, folders = exams
    with pytest.raises(ScoringError, match=r"stage-2 units under it: .*units/stage2/cc/seed0"):
        ExamScorer.load(run_dir)
    with pytest.raises(ScoringError, match="a stage-1 unit"):
        ExamScorer.load(run_dir / "units" / "stage1" / "cnn-random" / "seed0")
    with pytest.raises(ScoringError, match="does not exist"):
        ExamScorer.load(tmp_path / "nowhere")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "units" / "stage1" / "cnn-random" / "seed0" / "model.safetensors").unlink()
    with pytest.raises(ScoringError, match=r"stage1/cnn-random/seed0/model\.safetensors does not exist"):
        ExamScorer.load(stage2_unit(copy, "cc"))
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("hidden: 8", "hidden: 12"))
    shutil.copy(run_dir / "units" / "stage1" / "cnn-random" / "seed0" / "model.safetensors",
                copy / "units" / "stage1" / "cnn-random" / "seed0" / "model.safetensors")  # fmt: skip
    with pytest.raises(ScoringError, match=r"stage2/cc/seed0/model\.safetensors does not match"):
        ExamScorer.load(stage2_unit(copy, "cc"))
    unit = stage2_unit(run_dir, "cc")
    with pytest.raises(ScoringError, match="expected an exam folder"):
        score_files(unit, [next(folders[0].iterdir())], tmp_path / "out")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ScoringError, match="no DICOM files"):
        score_files(unit, [tmp_path / "empty"], tmp_path / "out")


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_scores_exam_folders_and_reports_bad_ones(run, exams, tmp_path, capsys):
    run_dir, _ = run
    _, folders = exams
    unit = str(stage2_unit(run_dir, "cc"))
    out = tmp_path / "scored"
    assert (
        main(["score", "pe_cad", "--checkpoint", unit, str(folders[0]), str(folders[1]), "--out", str(out)]) == EXIT_OK
    )
    printed = capsys.readouterr().out
    assert str(out / "exams.csv") in printed and str(out / "slices.csv") in printed
    assert len(read_csv(out / "exams.csv")) == 2
    bad = tmp_path / "bad"
    shutil.copytree(folders[0], bad)
    (bad / "slice003.dcm").write_bytes(b"garbage")
    assert main(["score", "pe_cad", "--checkpoint", unit, str(bad), "--out", str(tmp_path / "o2")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "slice003.dcm" in err and "not a readable DICOM file" in err
    stage1 = str(run_dir / "units" / "stage1" / "cnn-random" / "seed0")
    assert main(["score", "pe_cad", "--checkpoint", stage1, str(folders[0]), "--out", str(out)]) == EXIT_FAILED
    assert "a stage-1 unit" in capsys.readouterr().err


def test_scoring_runs_under_no_grad_and_leaves_models_in_eval(run):
    run_dir, _ = run
    scorer = ExamScorer.load(stage2_unit(run_dir, "cc"), device="cpu")
    assert not scorer.backbone.training and not scorer.model.training
    pred = scorer.score_volume(np.full((6, 32, 32), -1000, np.int16))  # no lung at all: the whole slice is used
    assert np.isfinite(pred.exam_probs).all() and torch.is_grad_enabled()
