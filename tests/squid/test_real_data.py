"""SQUID's real-format sources (image folders, ZhangLab) through prepare_data: splits, labels, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thrifty.core.registry import load_config
from thrifty.data.images import ImageDataError
from thrifty.methods.squid.data import AccessLog, prepare_data


def _png(path: Path, value: int, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((30, 40, 3) if rgb else (30, 40), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _cfg(tmp: Path, *overrides: str):
    return load_config("squid", "smoke", [f"out_dir={tmp}", "data.image_size=24", *overrides])[1]


def test_folder_source_holds_out_validation_and_keeps_test_apart(tmp_path):
    root = tmp_path / "set"
    for i in range(6):
        _png(root / "train" / "normal" / f"n{i}.png", 10 + i)
        _png(root / "train" / "abnormal" / f"a{i}.png", 200, rgb=True)
    for i in range(3):
        _png(root / "normal" / f"tn{i}.png", 20)
        _png(root / "abnormal" / "opacity" / f"ta{i}.png", 250)
    data = prepare_data(
        _cfg(tmp_path, "data.source=folder", f"data.root={root}", "data.holdout=2"), tmp_path, AccessLog()
    )
    val, test = data.val.get("selection", "t"), data.test.get("final_test", "t")
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1]
    assert test.images.shape == (6, 1, 24, 24) and set(test.kinds) == {"normal", "opacity"}
    assert data.info["train_normal"] == 4  # 6 normals minus 2 held out; abnormal training images unused
    batch = data.train_stream(0).batch(0, 5)
    assert batch.shape == (5, 1, 24, 24) and float(batch.max()) < 0.1  # only normals (values 10..15 / 255)


def test_folder_source_without_validation_abnormals_is_a_clear_error(tmp_path):
    root = tmp_path / "set"
    for i in range(4):
        _png(root / "train" / "normal" / f"n{i}.png", 10)
    _png(root / "normal" / "tn.png", 20)
    _png(root / "abnormal" / "ta.png", 250)
    with pytest.raises(ImageDataError, match="no abnormal images"):
        prepare_data(_cfg(tmp_path, "data.source=folder", f"data.root={root}", "data.holdout=2"), tmp_path, AccessLog())
    val_root = tmp_path / "val"
    _png(val_root / "normal" / "vn.png", 15)
    _png(val_root / "abnormal" / "va.png", 240)
    data = prepare_data(
        _cfg(tmp_path, "data.source=folder", f"data.root={root}", f"data.val_root={val_root}"), tmp_path, AccessLog()
    )
    assert sorted(data.val.get("selection", "t").labels.tolist()) == [0, 1]


def test_test_images_inside_training_are_refused(tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        _png(root / "normal" / f"n{i}.png", 10)
        _png(root / "abnormal" / f"a{i}.png", 200)
    with pytest.raises(ImageDataError, match="also appear"):
        prepare_data(
            _cfg(tmp_path, "data.source=folder", f"data.root={root}", f"data.train_root={root}", "data.holdout=1"),
            tmp_path,
            AccessLog(),
        )


def test_zhanglab_layout(tmp_path):
    root = tmp_path / "chest_xray"
    for split, n in (("train", 5), ("test", 2)):
        for i in range(n):
            _png(root / split / "NORMAL" / f"IM-{i}.jpeg", 30)
            _png(root / split / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", 220)
            _png(root / split / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg", 230)
    data = prepare_data(
        _cfg(tmp_path, "data.source=zhanglab", f"data.root={tmp_path}", "data.holdout=2"), tmp_path, AccessLog()
    )
    test = data.test.get("final_test", "t")
    assert sorted(set(test.kinds)) == ["bacteria", "normal", "virus"] and len(test) == 6
    assert data.info["train_normal"] == 3 and data.info["val"] == {"normal": 2, "abnormal": 2}


def test_bad_image_in_a_real_source_names_the_file_or_is_skipped(tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        _png(root / "train" / "normal" / f"n{i}.png", 10)
        _png(root / "train" / "abnormal" / f"a{i}.png", 200)
        _png(root / "normal" / f"tn{i}.png", 20)
    (root / "abnormal").mkdir()
    (root / "abnormal" / "corrupt.png").write_bytes(b"\x89PNG broken")
    _png(root / "abnormal" / "ok.png", 240)
    args = ("data.source=folder", f"data.root={root}", "data.holdout=1")
    with pytest.raises(ImageDataError, match=r"corrupt\.png"):
        prepare_data(_cfg(tmp_path, *args), tmp_path, AccessLog())
    data = prepare_data(_cfg(tmp_path, *args, "data.skip_bad=true"), tmp_path, AccessLog())
    assert data.info["skipped_bad_images"] == 1 and len(data.test) == 4


def test_chexpert_csvs(tmp_path):
    from thrifty.data.images import CHEXPERT_FINDINGS

    root = tmp_path / "chexpert"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]

    def write_csv(name: str, rows: list[tuple[str, str, str]]) -> Path:
        lines = [",".join(header)]
        for rel, view, finding in rows:
            _png(root / rel, 40 if finding == "No Finding" else 210)
            values = ["1.0" if f == finding else "" for f in CHEXPERT_FINDINGS]
            lines.append(",".join([rel, "Female", "50", "Frontal", view, *values]))
        path = root / name
        path.write_text("\n".join(lines) + "\n")
        return path

    train_rows = [(f"train/p{i}/view1_frontal.jpg", "PA", "No Finding") for i in range(5)]
    train_rows += [(f"train/q{i}/view1_frontal.jpg", "PA", "Edema") for i in range(3)]
    train_rows += [("train/ap/view1_frontal.jpg", "AP", "No Finding")]  # AP view: dropped
    test_rows = [("valid/a/view1_frontal.jpg", "PA", "No Finding"), ("valid/b/view1_frontal.jpg", "PA", "Cardiomegaly")]
    csv_train, csv_test = write_csv("train.csv", train_rows), write_csv("valid.csv", test_rows)
    cfg = _cfg(
        tmp_path,
        "data.source=chexpert",
        f"data.root={root}",
        f"data.csv_train={csv_train}",
        f"data.csv_test={csv_test}",
    )
    cfg.data.holdout = 1
    data = prepare_data(cfg, tmp_path, AccessLog())
    assert data.info["train_normal"] == 4 and data.info["val"] == {"normal": 1, "abnormal": 1}
    assert data.test.get("final_test", "t").kinds == ["normal", "Cardiomegaly"]
