"""The recipe's real-data path end to end on files written in the real formats: a COVIDx-style target source and
an NIH ChestX-ray14-style assembled source, assembled into one partial-label table, split by patient, trained,
scored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thrifty.cli import main
from thrifty.core.registry import load_config
from thrifty.core.splits import AccessLog
from thrifty.methods.data_assemble.data import prepare_data

NIH_FINDINGS = ["Effusion", "Nodule", "Cardiomegaly"]


def _png(path: Path, rng: np.random.Generator, bright: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 120, size=(24, 24)) + (100 if bright else 0)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _write_sources(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    covid = root / "covidx"
    lines = []
    for i in range(40):
        positive = i % 2 == 0
        name = f"c{i:03d}.png"
        _png(covid / "train" / name, rng, positive)
        lines.append(f"p{i // 2} {name} {'positive' if positive else 'negative'} origin")
    (covid / "train.txt").write_text("\n".join(lines) + "\n")
    nih = root / "nih"
    rows = []
    for i in range(16):
        labels = "|".join(f for j, f in enumerate(NIH_FINDINGS) if (i >> j) & 1) or "No Finding"
        name = f"{i:08d}_000.png"
        _png(nih / "images_001" / "images" / name, rng, False)
        rows.append([name, labels, "0", str(1000 + i), "50", "F", "PA"])
    with open(nih / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position"])  # fmt: skip
        w.writerows(rows)
    return covid, nih


def _overrides(root: Path, covid: Path, nih: Path) -> list[str]:
    sources = (
        f"[{{name: covidx, kind: covidx, path: {covid / 'train.txt'}, image_root: {covid / 'train'}, role: target}},"
        f" {{name: nih, kind: chestxray14, path: {nih}, role: assembled, implies_negative: [COVID-19]}}]"
    )
    return [
        "data.source=real", f"data.real_sources={sources}", "data.target=COVID-19", "data.image_size=32",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "arms=[target_only,naive,assemble]",
        f"out_dir={root / 'runs'}", f"data_dir={root / 'data'}", "progress=false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("real")
    return (root, *_write_sources(root))


def test_real_sources_are_assembled_into_one_partial_label_table(sources):
    root, covid, nih = sources
    _, cfg = load_config("data_assemble", "smoke", _overrides(root, covid, nih))
    data = prepare_data(cfg, root / "data", AccessLog())
    names = data.label_names
    assert "COVID-19" in names and set(NIH_FINDINGS) <= set(names)
    t = names.index("COVID-19")
    target, assembled = data.train["target"], data.train["assembled"]
    # the target source gives the target only; NIH gives its findings and (implied) a negative COVID-19
    assert target.given[:, t].all() and not target.given[:, [names.index(f) for f in NIH_FINDINGS]].any()
    assert assembled.given[:, t].all() and (assembled.labels[:, t] == 0).all()
    effusion = names.index("Effusion")
    assert assembled.given[:, effusion].all()
    assert sorted(assembled.labels[:, effusion].tolist()).count(1.0) == 8  # images 1, 3, 5, ... have bit 0 set
    # patients of the target source never span two splits
    val = data.val.get("selection", "test")
    test = data.test.get("final_test", "test")
    splits = [set(target.ids.tolist()), set(val.ids.tolist()), set(test.ids.tolist())]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    assert len(target) + len(val) + len(test) == 40
    assert not data.oracle_available


def test_recipe_trains_on_real_files_and_its_model_scores_a_folder(sources, tmp_path):
    root, covid, nih = sources
    assert main(["run", "data_assemble", "--preset", "smoke", *_overrides(root, covid, nih)]) == 0
    res = json.loads((root / "runs" / "data_assemble" / "smoke" / "results.json").read_text())
    assert res["data"]["source"] == "real" and res["data"]["target"] == "COVID-19"
    assert {c["id"] for c in res["claims"]} >= {"assemble_beats_naive_target_auc"}
    unit = root / "runs" / "data_assemble" / "smoke" / "units" / "assemble" / "seed0"
    assert (
        main(["score", "data_assemble", "--checkpoint", str(unit), str(covid / "train"), "--out", str(tmp_path)]) == 0
    )
    with open(tmp_path / "probabilities.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40
    assert all(0.0 <= float(r["COVID-19"]) <= 1.0 for r in rows)


def test_the_oracle_arm_is_refused_without_full_labels(sources, capsys):
    root, covid, nih = sources
    args = [*_overrides(root, covid, nih), "arms=[oracle]", "run_name=oracle"]
    assert main(["run", "data_assemble", "--preset", "smoke", *args]) != 0
    assert "oracle" in capsys.readouterr().err
