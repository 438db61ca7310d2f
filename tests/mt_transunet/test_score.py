"""Inference with a trained MT-TransUNet unit: the Predictor reproduces the unit's in-run test predictions, image
files of any size are scored into predictions.csv and masks at each image's own size, bad images and bad unit
directories are clear errors, and the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thrifty.cli import EXIT_FAILED, EXIT_OK, main
from thrifty.core.registry import load_config
from thrifty.core.splits import AccessLog
from thrifty.data.images import ImageDataError
from thrifty.methods.mt_transunet.config import CLASSES
from thrifty.methods.mt_transunet.data import prepare_data
from thrifty.methods.mt_transunet.metrics import segmentation_metrics
from thrifty.methods.mt_transunet.score import Predictor, ScoringError, score_files
from thrifty.methods.mt_transunet.train import train

ARM = "seg+cls+dual"
COLUMNS = ["file", *[f"p_{c}" for c in CLASSES], "predicted", "lesion_fraction", "mask", "note"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One unit of the full method trained for one step (so its segmentation and classification checkpoints are
    the same weights, those it exports), and the test split it was judged on."""
    out = tmp_path_factory.mktemp("runs")
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", f"arms=[{ARM}]", "seeds=[0]", "max_steps=1",
            "stages=[data,train]"]  # fmt: skip
    cfg = load_config("mt_transunet", "smoke", args)[1]
    train(cfg)
    unit = out / "mt_transunet" / "smoke" / "units" / ARM / "seed0"
    test = prepare_data(cfg, data_dir, AccessLog()).test.get("final_test", "scoring-test")
    return unit, test


def write_images(
    folder: Path, raw: np.ndarray, sizes: list[tuple[int, int]], suffix: str = ".png", stem: str = "lesion"
) -> list[Path]:
    """``raw`` uint8 (N, S, S, 3) resized to each (W, H) of ``sizes`` and saved; returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, size) in enumerate(zip(raw, sizes)):
        path = folder / f"{stem}_{i:02d}{suffix}"
        Image.fromarray(img).resize(size, Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_predictor_reproduces_the_units_test_predictions(trained):
    unit, test = trained
    result = json.loads((unit / "result.json").read_text())
    assert result["best_step"] == {"seg": 1, "cls": 1}
    predictor = Predictor.load(unit)
    assert predictor.classes == list(CLASSES) and predictor.image_size == 32
    assert predictor.card["arm"] == ARM and not predictor.model.training
    lesion, probs = predictor.predict(test.images, batch_size=7)
    assert lesion.shape == (24, 32, 32) and probs.shape == (24, 3)
    assert ((lesion >= 0) & (lesion <= 1)).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, result["test"]["cls_probs"], atol=2e-5)
    seg = segmentation_metrics(lesion > 0.5, test.masks.numpy())
    for key, value in result["test"]["seg"].items():
        assert seg[key] == pytest.approx(value, abs=1e-6), key
    # another batch size: the same numbers
    np.testing.assert_allclose(predictor.predict(test.images[:5])[1], probs[:5], atol=1e-6)


def test_predict_checks_the_input_shape(trained):
    predictor = Predictor.load(trained[0])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        predictor.predict(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="32"):
        predictor.predict(torch.rand(3, 32, 32))
    lesion, probs = predictor.predict(torch.zeros(0, 3, 32, 32))
    assert lesion.shape == (0, 32, 32) and probs.shape == (0, 3)


def test_score_files_writes_predictions_and_masks_at_each_images_size(trained, tmp_path):
    unit, test = trained
    folder = tmp_path / "lesions"
    sizes = [(32, 32), (48, 40), (70, 50)]
    paths = write_images(folder, test.raw[:3], sizes)
    paths += write_images(folder / "more", test.raw[3:5], [(64, 64), (45, 33)], suffix=".jpg", stem="other")
    (folder / "notes.txt").write_text("not an image")
    csv_path = score_files(unit, [folder], tmp_path / "out")
    assert csv_path == tmp_path / "out" / "predictions.csv"
    columns, rows = read_csv(csv_path)
    assert columns == COLUMNS
    assert sorted(Path(r["file"]) for r in rows) == sorted(paths)
    by_file = {Path(r["file"]): r for r in rows}
    for path, (w, h) in zip(paths, [*sizes, (64, 64), (45, 33)]):
        row = by_file[path]
        p = np.array([float(row[f"p_{c}"]) for c in CLASSES])
        assert abs(p.sum() - 1) < 1e-5 and row["predicted"] == CLASSES[int(p.argmax())] and row["note"] == ""
        mask = np.asarray(Image.open(tmp_path / "out" / row["mask"]))
        assert row["mask"] == f"masks/{path.stem}.png"
        assert mask.shape == (h, w) and set(np.unique(mask).tolist()) <= {0, 255}
        assert float(row["lesion_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-4)
    # an image at the network's size is the Python API's input exactly
    lesion, probs = Predictor.load(unit).predict(test.images[:1])
    first = by_file[paths[0]]
    np.testing.assert_allclose([float(first[f"p_{c}"]) for c in CLASSES], probs[0], atol=2e-6)
    mask = np.asarray(Image.open(tmp_path / "out" / first["mask"])) > 0
    assert (mask == (lesion[0] > 0.5)).mean() > 0.99


def test_same_file_names_get_distinct_masks(trained, tmp_path):
    unit, test = trained
    a = write_images(tmp_path / "a", test.raw[:1], [(32, 32)])
    b = write_images(tmp_path / "b", test.raw[1:2], [(40, 40)])
    _, rows = read_csv(score_files(unit, [*a, *b], tmp_path / "out"))
    assert [r["mask"] for r in rows] == ["masks/lesion_00.png", "masks/lesion_00_2.png"]
    assert np.asarray(Image.open(tmp_path / "out" / "masks" / "lesion_00_2.png")).shape == (40, 40)


def test_a_corrupt_image_fails_naming_it_or_is_skipped_when_asked(trained, tmp_path):
    unit, test = trained
    good = write_images(tmp_path / "imgs", test.raw[:2], [(32, 32), (50, 40)])
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDataError, match=r"broken\.png"):
        score_files(unit, [tmp_path / "imgs"], tmp_path / "out")
    _, rows = read_csv(score_files(unit, [tmp_path / "imgs"], tmp_path / "out", skip_bad=True))
    assert len(rows) == 3
    skipped = [r for r in rows if r["note"]]
    assert [Path(r["file"]).name for r in skipped] == ["broken.png"]
    assert skipped[0]["note"].startswith("skipped") and "broken.png" in skipped[0]["note"]
    assert all(skipped[0][k] == "" for k in COLUMNS[1:-1])
    assert sorted(Path(r["file"]) for r in rows if not r["note"]) == sorted(good)
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["lesion_00.png", "lesion_01.png"]


def test_bad_unit_directories_are_scoring_errors(trained, tmp_path):
    unit, test = trained
    img = write_images(tmp_path / "imgs", test.raw[:1], [(32, 32)])[0]
    with pytest.raises(ScoringError, match=r"card\.json"):
        score_files(tmp_path, [img], tmp_path / "out")
    for missing in ("card.json", "model.safetensors"):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(unit, broken)
        (broken / missing).unlink()
        with pytest.raises(ScoringError, match=missing.replace(".", r"\.")):
            Predictor.load(broken)
    broken = tmp_path / "not-a-card"
    shutil.copytree(unit, broken)
    for text in (json.dumps({"classes": ["a"]}), "{not json"):
        (broken / "card.json").write_text(text)
        with pytest.raises(ScoringError, match="not a mt_transunet model card"):
            Predictor.load(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoringError, match="no image files"):
        score_files(unit, [tmp_path / "empty"], tmp_path / "out")


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"dim": 48}},
        {"model": {"decoder_channels": [16, 8, 4]}},
        {"classes": ["melanoma", "nevus"]},
        {"model": {"pos_embed": "learned"}},
    ],
)
def test_a_card_that_does_not_describe_the_weights_is_a_scoring_error(trained, tmp_path, change):
    unit, _ = trained
    broken = tmp_path / "mismatch"
    shutil.copytree(unit, broken)
    card = json.loads((broken / "card.json").read_text())
    card = {**card, **change, "model": {**card["model"], **change.get("model", {})}}
    (broken / "card.json").write_text(json.dumps(card))
    with pytest.raises(ScoringError, match="does not match"):
        Predictor.load(broken)


def test_cli_scores_a_folder(trained, tmp_path, capsys):
    unit, test = trained
    paths = write_images(tmp_path / "imgs", test.raw[:3], [(32, 32), (40, 36), (64, 48)])
    out = tmp_path / "scored"
    assert main(["score", "mt_transunet", "--checkpoint", str(unit), str(tmp_path / "imgs"), "--out", str(out)]) == (
        EXIT_OK
    )
    assert str(out / "predictions.csv") in capsys.readouterr().out
    columns, rows = read_csv(out / "predictions.csv")
    assert columns == COLUMNS and len(rows) == len(paths)
    assert np.asarray(Image.open(out / "masks" / "lesion_02.png")).shape == (48, 64)
    # bad inputs: a clear message and exit 1
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    assert main(["score", "mt_transunet", "--checkpoint", str(unit), str(bad), "--out", str(out)]) == EXIT_FAILED
    assert "broken.png" in capsys.readouterr().err
    skip = ["score", "mt_transunet", "--checkpoint", str(unit), str(bad), str(paths[0]), "--out", str(out),
            "--skip-bad"]  # fmt: skip
    assert main(skip) == EXIT_OK
    assert "skipped" in (out / "predictions.csv").read_text()
    assert main(["score", "mt_transunet", "--checkpoint", str(tmp_path), str(paths[0]), "--out", str(out)]) == (
        EXIT_FAILED
    )
    assert "card.json" in capsys.readouterr().err
