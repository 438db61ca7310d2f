"""Inference with a trained Label-Assemble unit: the Predictor reproduces the unit's test probabilities, files and
folders are scored into probabilities.csv, bad images and bad unit directories are clear errors, and the CLI."""

from __future__ import annotations

import copy
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
from thrifty.data.chest_synth import FINDINGS, TARGET
from thrifty.data.images import ImageDataError
from thrifty.data.images import expand_image_paths as expand_paths
from thrifty.methods.data_assemble.data import prepare_data
from thrifty.methods.data_assemble.score import Predictor, ScoringError, score_files
from thrifty.methods.data_assemble.train import train

ARMS = ("assemble", "assemble_adapter")


def smoke(out: Path, data_dir: Path, *overrides: str):
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", *overrides]
    return load_config("data_assemble", "smoke", args)[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """Units of both heads (seed 0), and the config they were trained with."""
    out = tmp_path_factory.mktemp("runs")
    cfg = smoke(out, data_dir, f"arms=[{','.join(ARMS)}]", "seeds=[0]", "stages=[data,train]")
    train(cfg)
    units = {arm: out / "data_assemble" / "smoke" / "units" / arm / "seed0" for arm in ARMS}
    return units, cfg


@pytest.fixture(scope="module")
def test_split(trained, tmp_path_factory):
    """The test split regenerated from the config in an empty cache (the recipe's own data path), as raw images
    in [0, 1]: the Predictor applies the card's intensity window itself."""
    _, cfg = trained
    cfg = copy.deepcopy(cfg)
    cfg.data.intensity_window = []
    data = prepare_data(cfg, tmp_path_factory.mktemp("fresh-data"), AccessLog())
    return data.test.get("final_test", "scoring-test"), data.target_index


def write_pngs(folder: Path, images: torch.Tensor) -> list[Path]:
    """8-bit grayscale PNGs of ``images`` (N, 1, S, S) in [0, 1]; returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"xray_{i:02d}.png"
        Image.fromarray(np.round(img[0].numpy() * 255).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def quantised(images: torch.Tensor) -> torch.Tensor:
    return torch.round(images * 255) / 255


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("arm", ARMS)
def test_predictor_reproduces_the_units_test_probabilities(trained, test_split, arm):
    units, _ = trained
    test, t = test_split
    stored = json.loads((units[arm] / "result.json").read_text())["test_target_probs"]
    predictor = Predictor.load(units[arm])
    assert predictor.labels == list(FINDINGS) and predictor.image_size == 32
    assert predictor.card["head"] == ("adapter" if arm == "assemble_adapter" else "multihead")
    assert predictor.card["intensity_window"] == [1.0, 99.0]
    probs = predictor.predict(test.images[:16], batch_size=5)
    assert probs.shape == (16, len(FINDINGS))
    assert ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(probs[:, t], stored[:16], atol=2e-5)
    # the whole split at another batch size: the same numbers (the model is in eval mode)
    np.testing.assert_allclose(predictor.predict(test.images)[:, t], stored, atol=2e-5)


def test_predict_checks_the_input_shape(trained):
    predictor = Predictor.load(trained[0]["assemble"])
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        predictor.predict(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="32"):
        predictor.predict(torch.rand(1, 32, 32))
    assert predictor.predict(torch.zeros(0, 1, 32, 32)).shape == (0, len(FINDINGS))


def test_score_files_writes_one_row_per_image_and_one_column_per_label(trained, test_split, tmp_path):
    units, _ = trained
    test, _ = test_split
    images = test.images[:6]
    folder = tmp_path / "xrays"
    paths = write_pngs(folder, images[:4]) + write_pngs(folder / "more", images[4:])
    (folder / "notes.txt").write_text("not an image")
    csv_path = score_files(units["assemble"], [folder], tmp_path / "out")
    assert csv_path == tmp_path / "out" / "probabilities.csv"
    columns, rows = read_csv(csv_path)
    assert columns == ["file", *FINDINGS, "note"]
    assert sorted(Path(r["file"]) for r in rows) == sorted(paths)
    got = np.array([[float(r[n]) for n in FINDINGS] for r in rows])
    assert ((got > 0) & (got < 1)).all() and all(r["note"] == "" for r in rows)
    # the same numbers as the Python API on the 8-bit images
    order = [paths.index(Path(r["file"])) for r in rows]
    want = Predictor.load(units["assemble"]).predict(quantised(images))[order]
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_score_files_takes_single_files_and_resizes_larger_images(trained, tmp_path):
    units, _ = trained
    big = tmp_path / "big.png"
    Image.fromarray(np.full((64, 80), 90, dtype=np.uint8), mode="L").save(big)
    _, rows = read_csv(score_files(units["assemble_adapter"], [big], tmp_path / "out"))
    assert len(rows) == 1 and rows[0]["file"] == str(big)
    # a uniform image stays uniform after resizing and cropping
    want = Predictor.load(units["assemble_adapter"]).predict(torch.full((1, 1, 32, 32), 90 / 255))[0]
    np.testing.assert_allclose([float(rows[0][n]) for n in FINDINGS], want, atol=2e-6)


def test_expand_paths_recurses_into_folders_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/z.png", "a.JPG", "c.tiff", "readme.md"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_paths([tmp_path]) == [tmp_path / "a.JPG", tmp_path / "b/z.png", tmp_path / "c.tiff"]
    assert expand_paths([tmp_path / "readme.md"]) == [tmp_path / "readme.md"]  # a named file is kept as given


def test_a_corrupt_image_fails_naming_it_or_is_skipped_when_asked(trained, test_split, tmp_path):
    units, _ = trained
    test, _ = test_split
    good = write_pngs(tmp_path / "imgs", test.images[:2])
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDataError, match=r"broken\.png"):
        score_files(units["assemble"], [tmp_path / "imgs"], tmp_path / "out")
    _, rows = read_csv(score_files(units["assemble"], [tmp_path / "imgs"], tmp_path / "out", skip_bad=True))
    assert len(rows) == 3
    skipped = [r for r in rows if r["note"]]
    assert [Path(r["file"]).name for r in skipped] == ["broken.png"]
    assert skipped[0]["note"].startswith("skipped") and all(skipped[0][n] == "" for n in FINDINGS)
    assert sorted(Path(r["file"]) for r in rows if not r["note"]) == sorted(good)


def test_bad_unit_directories_are_scoring_errors(trained, tmp_path):
    units, _ = trained
    img = write_pngs(tmp_path / "imgs", torch.rand(1, 1, 32, 32))[0]
    with pytest.raises(ScoringError, match=r"card\.json"):
        score_files(tmp_path, [img], tmp_path / "out")
    with pytest.raises(ScoringError, match=r"card\.json"):
        Predictor.load(tmp_path / "nowhere")
    # weights without a card, a card without weights
    for missing in ("card.json", "model.safetensors"):
        unit = tmp_path / f"no-{missing}"
        shutil.copytree(units["assemble"], unit)
        (unit / missing).unlink()
        with pytest.raises(ScoringError, match=missing.replace(".", r"\.")):
            Predictor.load(unit)
    unit = tmp_path / "not-a-card"
    shutil.copytree(units["assemble"], unit)
    # a card that is not a model card
    (unit / "card.json").write_text(json.dumps({"labels": ["a"]}))
    with pytest.raises(ScoringError, match="not a data_assemble model card"):
        Predictor.load(unit)
    # a folder without images
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoringError, match="no image files"):
        score_files(units["assemble"], [tmp_path / "empty"], tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "what"),
    [({"head": "adapter"}, "another head"), ({"labels": list(FINDINGS[:3])}, "fewer labels")],
)
def test_a_card_that_does_not_describe_the_weights_is_a_scoring_error(trained, tmp_path, change, what):
    """An edited or mismatched card.json is a ScoringError naming both files, not a crash."""
    units, _ = trained
    unit = tmp_path / "mismatch"
    shutil.copytree(units["assemble"], unit)
    card = json.loads((unit / "card.json").read_text())
    (unit / "card.json").write_text(json.dumps({**card, **change}))
    with pytest.raises(ScoringError, match="does not match"):
        Predictor.load(unit)


def test_cli_scores_a_folder(trained, test_split, tmp_path, capsys):
    units, _ = trained
    test, _ = test_split
    paths = write_pngs(tmp_path / "imgs", test.images[:3])
    out = tmp_path / "scored"
    args = ["score", "data_assemble", "--checkpoint", str(units["assemble"]), str(tmp_path / "imgs"), "--out", str(out)]
    assert main(args) == EXIT_OK
    assert str(out / "probabilities.csv") in capsys.readouterr().out
    columns, rows = read_csv(out / "probabilities.csv")
    assert columns == ["file", *FINDINGS, "note"] and len(rows) == len(paths)
    assert TARGET in columns
    # bad inputs: a clear message and exit 1
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    assert main(["score", "data_assemble", "--checkpoint", str(units["assemble"]), str(bad), "--out", str(out)]) == (
        EXIT_FAILED
    )
    assert "broken.png" in capsys.readouterr().err
    skip = ["score", "data_assemble", "--checkpoint", str(units["assemble"]), str(bad), str(paths[0]), "--out",
            str(out), "--skip-bad"]  # fmt: skip
    assert main(skip) == EXIT_OK
    assert "skipped" in (out / "probabilities.csv").read_text()
    assert main(["score", "data_assemble", "--checkpoint", str(tmp_path), str(paths[0]), "--out", str(out)]) == (
        EXIT_FAILED
    )
    assert "card.json" in capsys.readouterr().err
