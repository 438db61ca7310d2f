"""Skin-lesion loaders: ISIC-2017 and PH2 scanners, whole-image resize with aligned masks, bad files, skip_bad."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thrifty.data.images import ImageDataError
from thrifty.data.skin_lesions import (
    CLASSES,
    MELANOMA,
    NEVUS,
    SEBORRHEIC_KERATOSIS,
    LesionRecord,
    load_lesion,
    load_lesions,
    scan_isic2017,
    scan_ph2,
)

SIZE = 16
# id -> (width, height, melanoma, seborrheic_keratosis); listed out of id order on purpose
ISIC_CASES = {
    "ISIC_0000002": (30, 30, "0.0", "1.0"),
    "ISIC_0000000": (40, 20, "0", "0"),
    "ISIC_0000001": (24, 36, "1.0", "0.0"),
}
RECT = (10, 5, 30, 15)  # (left, top, right, bottom) of the lesion in ISIC_0000000, a 40x20 image


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _lesion_image(w: int, h: int, rect: tuple[int, int, int, int]) -> np.ndarray:
    """Skin-coloured RGB with a dark-red rectangle (the lesion)."""
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[...] = (40, 200, 40)
    left, top, right, bottom = rect
    arr[top:bottom, left:right] = (230, 20, 20)
    return arr


def _rect_mask(w: int, h: int, rect: tuple[int, int, int, int], fg: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    left, top, right, bottom = rect
    mask[top:bottom, left:right] = fg
    return mask


def _rect_for(w: int, h: int) -> tuple[int, int, int, int]:
    return RECT if (w, h) == (40, 20) else (w // 4, h // 4, 3 * w // 4, 3 * h // 4)


def _write_csv(path: Path, header: list[str], rows: list[list[str]], *, bom: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def isic(tmp_path) -> dict[str, Path]:
    """An ISIC-2017-style split: JPEG images, Part 1 PNG masks (0/255), Part 3 CSV with a BOM and extra columns."""
    images = tmp_path / "ISIC-2017_Training_Data"
    masks = tmp_path / "ISIC-2017_Training_Part1_GroundTruth"
    rows = []
    for case, (w, h, mel, sk) in ISIC_CASES.items():
        rect = _rect_for(w, h)
        _save(images / f"{case}.jpg", _lesion_image(w, h, rect), quality=95)
        _save(images / f"{case}_superpixels.png", np.zeros((h, w, 3), np.uint8))  # ignored: not in the CSV
        _save(masks / f"{case}_segmentation.png", _rect_mask(w, h, rect))
        rows.append(["55", case, mel, sk, "female"])
    header = ["age_approximate", "image_id", "melanoma", "seborrheic_keratosis", "sex"]
    labels = _write_csv(tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv", header, rows)
    return {"images": images, "masks": masks, "csv": labels}


PH2_CASES = {"IMD003": "0", "IMD002": "2", "IMD010": "1", "IMD017": "2.0"}


@pytest.fixture
def ph2(tmp_path) -> dict[str, Path]:
    """A PH2-style tree: per-case folders with BMP image and BMP lesion mask, plus a user-made CSV table."""
    root = tmp_path / "PH2 Dataset images"
    for i, case in enumerate(PH2_CASES):
        w, h = 32 + 4 * i, 24
        rect = (8, 6, 20, 18)
        _save(root / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp", _lesion_image(w, h, rect))
        mask = Image.fromarray(_rect_mask(w, h, rect))
        if i % 2:  # 1-bit BMPs as well as 8-bit ones
            mask = mask.convert("1")
        (root / case / f"{case}_lesion").mkdir(parents=True)
        mask.save(root / case / f"{case}_lesion" / f"{case}_lesion.bmp")
    rows = [[case, "", diag, "x"] for case, diag in PH2_CASES.items()]
    _write_csv(root / "PH2_dataset.csv", ["image_name", "histological_diagnosis", "clinical_diagnosis", "notes"], rows)
    return {"root": root}


# ----------------------------------------------------------------------------------------------- scanning


def test_scan_isic2017_labels_ids_and_paths_sorted(isic):
    records = scan_isic2017(isic["images"], isic["csv"], masks_dir=isic["masks"])
    assert [r.id for r in records] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert [r.label for r in records] == [NEVUS, MELANOMA, SEBORRHEIC_KERATOSIS]
    assert CLASSES[MELANOMA] == "melanoma" and CLASSES[SEBORRHEIC_KERATOSIS] == "seborrheic_keratosis"
    assert records[1].image == isic["images"] / "ISIC_0000001.jpg"
    assert records[1].mask == isic["masks"] / "ISIC_0000001_segmentation.png"
    assert scan_isic2017(isic["images"], isic["csv"], masks_dir=isic["masks"]) == records  # deterministic


def test_unmasked_split_gives_no_masks(isic):
    records = scan_isic2017(isic["images"], isic["csv"])
    assert all(r.mask is None for r in records)
    out = load_lesions(records, size=SIZE)
    assert not out["has_mask"].any() and not out["masks"].any()
    image, mask = load_lesion(records[0], size=SIZE)
    assert mask is None and image.shape == (SIZE, SIZE, 3)


def test_scan_ph2_maps_diagnoses_and_finds_case_files(ph2):
    records = scan_ph2(ph2["root"])
    assert [r.id for r in records] == ["IMD002", "IMD003", "IMD010", "IMD017"]
    assert [r.label for r in records] == [MELANOMA, NEVUS, NEVUS, MELANOMA]
    rec = records[0]
    assert rec.image == ph2["root"] / "IMD002" / "IMD002_Dermoscopic_Image" / "IMD002.bmp"
    assert rec.mask == ph2["root"] / "IMD002" / "IMD002_lesion" / "IMD002_lesion.bmp"
    out = load_lesions(records, size=SIZE)
    assert out["has_mask"].all()
    for i in range(len(records)):  # 8-bit and 1-bit BMP masks agree: the lesion covers the image's red area
        red = out["images"][i, ..., 0] > 128
        assert (red == out["masks"][i].astype(bool)).mean() > 0.9


def test_record_and_argument_validation(isic):
    with pytest.raises(ValueError, match="label"):
        LesionRecord(image=Path("a.jpg"), mask=None, label=3, id="a")
    with pytest.raises(ValueError, match="image_pattern"):
        scan_isic2017(isic["images"], isic["csv"], image_pattern="fixed.jpg")
    with pytest.raises(ValueError, match="diagnosis_map"):
        scan_ph2(isic["images"], diagnosis_map={"0": 5})
    rec = scan_isic2017(isic["images"], isic["csv"])[0]
    with pytest.raises(ValueError, match="size"):
        load_lesion(rec, size=0)


# ----------------------------------------------------------------------------------------------- loading


def _nearest_expected(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres: output i samples source floor((i + 0.5) * n / size)."""
    h, w = mask.shape
    rows = np.floor((np.arange(size) + 0.5) * h / size).astype(int)
    cols = np.floor((np.arange(size) + 0.5) * w / size).astype(int)
    return mask[np.ix_(rows, cols)]


@pytest.mark.parametrize("case", sorted(ISIC_CASES))
def test_masks_stay_aligned_after_whole_image_resize(isic, case):
    records = {r.id: r for r in scan_isic2017(isic["images"], isic["csv"], masks_dir=isic["masks"])}
    image, mask = load_lesion(records[case], size=SIZE)
    assert image.dtype == np.float32 and image.shape == (SIZE, SIZE, 3)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert mask is not None and mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
    w, h = ISIC_CASES[case][:2]
    expected = _nearest_expected(_rect_mask(w, h, _rect_for(w, h), fg=1), SIZE)
    np.testing.assert_array_equal(mask, expected)
    if case == "ISIC_0000000":  # 40x20 squeezed (not cropped) to 16x16: the rectangle lands at rows/cols 4..11
        assert mask[4:12, 4:12].all() and mask.sum() == 64
    # the image moved with the mask: lesion pixels are red, skin pixels green (away from the blurred border)
    inner = mask.astype(bool)
    for axis in (0, 1):
        inner = inner & np.roll(inner, 1, axis) & np.roll(inner, -1, axis)
    assert inner.any() and (image[inner][:, 0] > image[inner][:, 1] + 0.4).all()
    assert (image[mask == 0][:, 1] > image[mask == 0][:, 0]).mean() > 0.9


def test_zero_one_masks_equal_zero_255_masks(isic, tmp_path):
    rec = scan_isic2017(isic["images"], isic["csv"], masks_dir=isic["masks"])[0]
    w, h = ISIC_CASES[rec.id][:2]
    png01 = _save(tmp_path / "m01.png", _rect_mask(w, h, RECT, fg=1))
    bmp01 = _save(tmp_path / "m01.bmp", _rect_mask(w, h, RECT, fg=1))
    _, ref = load_lesion(rec, size=SIZE)
    for path in (png01, bmp01):
        _, mask = load_lesion(LesionRecord(rec.image, path, rec.label, rec.id), size=SIZE)
        np.testing.assert_array_equal(mask, ref)


def test_load_lesions_stacks_dtypes_and_order(isic):
    records = scan_isic2017(isic["images"], isic["csv"], masks_dir=isic["masks"])
    unmasked = scan_isic2017(isic["images"], isic["csv"])[:1]
    out = load_lesions(records + unmasked, size=SIZE)
    assert out["images"].dtype == np.uint8 and out["images"].shape == (4, SIZE, SIZE, 3)
    assert out["masks"].dtype == np.uint8 and out["masks"].shape == (4, SIZE, SIZE)
    assert set(np.unique(out["masks"])) <= {0, 1}
    assert out["has_mask"].tolist() == [True, True, True, False] and out["has_mask"].dtype == bool
    assert out["labels"].dtype == np.int64 and out["labels"].tolist() == [NEVUS, MELANOMA, SEBORRHEIC_KERATOSIS, NEVUS]
    assert out["ids"].tolist() == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000000"]
    assert not out["masks"][3].any() and out["skipped"].size == 0
    image, mask = load_lesion(records[1], size=SIZE)
    np.testing.assert_array_equal(out["images"][1], np.rint(image * 255).astype(np.uint8))
    np.testing.assert_array_equal(out["masks"][1], mask)


# ----------------------------------------------------------------------------------------------- bad inputs


def _truncate_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break(kind: str, isic: dict[str, Path], ph2_root: Path | None) -> tuple[str, object]:
    """Damage the fixture one way; return (regex the error must match, callable that should raise)."""
    images, masks, labels = isic["images"], isic["masks"], isic["csv"]
    scan = lambda: scan_isic2017(images, labels, masks_dir=masks)
    load_all = lambda: load_lesions(scan(), size=SIZE)
    if kind == "missing_image":
        (images / "ISIC_0000001.jpg").unlink()
        return r"ISIC_0000001\.jpg", scan
    if kind == "missing_mask":
        (masks / "ISIC_0000002_segmentation.png").unlink()
        return r"ISIC_0000002_segmentation\.png", scan
    if kind == "truncated_jpeg":
        _truncate_jpeg(images / "ISIC_0000001.jpg")
        return r"ISIC_0000001\.jpg", load_all
    if kind == "non_image":
        (images / "ISIC_0000002.jpg").write_text("<html>not an image</html>\n")
        return r"ISIC_0000002\.jpg", load_all
    if kind == "mask_wrong_shape":
        _save(masks / "ISIC_0000001_segmentation.png", np.zeros((24, 36), np.uint8))  # transposed: 36x24
        return r"ISIC_0000001_segmentation\.png", load_all
    if kind == "non_binary_mask":
        ramp = np.tile(np.linspace(0, 255, 30).astype(np.uint8), (30, 1))
        _save(masks / "ISIC_0000002_segmentation.png", ramp)
        return r"ISIC_0000002_segmentation\.png", load_all
    if kind == "csv_missing_column":
        _write_csv(labels, ["image_id", "melanoma"], [["ISIC_0000000", "0"]])
        return r"Part3_GroundTruth\.csv.*seborrheic_keratosis", scan
    if kind == "both_classes":
        rows = [[case, mel, sk] for case, (_, _, mel, sk) in ISIC_CASES.items()]
        rows[2][1:] = ["1.0", "1"]  # ISIC_0000001, CSV line 4
        _write_csv(labels, ["image_id", "melanoma", "seborrheic_keratosis"], rows)
        return r"Part3_GroundTruth\.csv:4: 'ISIC_0000001'", scan
    if kind == "bad_flag":
        _write_csv(labels, ["image_id", "melanoma", "seborrheic_keratosis"], [["ISIC_0000000", "yes", "0"]])
        return r"Part3_GroundTruth\.csv:2: column 'melanoma'", scan
    if kind == "unknown_ph2_diagnosis":
        assert ph2_root is not None
        table = ph2_root / "PH2_dataset.csv"
        _write_csv(table, ["image_name", "clinical_diagnosis"], [["IMD002", "2"], ["IMD003", "SK"]])
        return r"PH2_dataset\.csv:3: case 'IMD003'", lambda: scan_ph2(ph2_root)
    if kind == "missing_ph2_mask":
        assert ph2_root is not None
        (ph2_root / "IMD010" / "IMD010_lesion" / "IMD010_lesion.bmp").unlink()
        return r"IMD010_lesion\.bmp", lambda: scan_ph2(ph2_root)
    raise AssertionError(kind)


BAD_KINDS = [
    "missing_image",
    "missing_mask",
    "truncated_jpeg",
    "non_image",
    "mask_wrong_shape",
    "non_binary_mask",
    "csv_missing_column",
    "both_classes",
    "bad_flag",
    "unknown_ph2_diagnosis",
    "missing_ph2_mask",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_bad_input_raises_one_error_naming_the_file(isic, ph2, kind):
    name, call = _break(kind, isic, ph2["root"])
    with pytest.raises(ImageDataError, match=name) as info:
        call()
    assert info.type is ImageDataError


def test_skip_bad_skips_and_reports_the_offending_files(isic):
    records = scan_isic2017(isic["images"], isic["csv"], masks_dir=isic["masks"])
    _truncate_jpeg(isic["images"] / "ISIC_0000001.jpg")
    _save(isic["masks"] / "ISIC_0000002_segmentation.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ImageDataError, match=r"ISIC_0000001\.jpg"):
        load_lesions(records, size=SIZE)
    out = load_lesions(records, size=SIZE, skip_bad=True)
    assert out["ids"].tolist() == ["ISIC_0000000"]
    assert out["images"].shape == (1, SIZE, SIZE, 3) and out["masks"].shape == (1, SIZE, SIZE)
    assert out["labels"].tolist() == [NEVUS] and out["has_mask"].tolist() == [True]
    assert out["skipped"].tolist() == [
        str(isic["images"] / "ISIC_0000001.jpg"),
        str(isic["masks"] / "ISIC_0000002_segmentation.png"),
    ]
    assert "truncated" in out["skipped_reasons"][0] or "readable" in out["skipped_reasons"][0]
    assert "mask is 5x5" in out["skipped_reasons"][1]
