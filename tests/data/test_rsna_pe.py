"""RSNA-STR PE loaders: CTPA series sorted by z in HU (hand-built DICOM and pydicom's CT_small), one clear error
naming the file for every bad input, the train.csv reader with configurable columns and exam-label agreement,
and study-level split manifests that stay disjoint."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from thrifty.data.rsna_pe import (
    RSNA_COLUMNS,
    RSNA_EXAM_LABELS,
    ExamDataError,
    ExamRecord,
    check_disjoint,
    load_exam,
    load_rsna_exam,
    read_manifest,
    scan_rsna,
    split_studies,
    write_ct_series,
    write_manifest,
)
from thrifty.data.volumes import VolumeError

ROWS, COLS = 6, 5
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"

# --------------------------------------------------------------------------------------------- helpers


def _raw(k: int) -> np.ndarray:
    """Stored (pre-rescale) pixels of the slice at z index k: a ramp plus a per-slice signature 100·k."""
    return (np.arange(ROWS * COLS, dtype=np.int16).reshape(ROWS, COLS) * 7 + 100 * k).astype(np.int16)


def _ct_slice(
    sop: str,
    z: float | None,
    *,
    instance: int | None,
    pixels: np.ndarray,
    study: str = STUDY,
    series: str = SERIES,
    spacing: tuple[float, float] = (0.7, 0.7),
) -> Dataset:
    """A CT Image Storage dataset built from scratch: int16 pixels, slope 1, intercept -1024."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if int(pydicom.__version__.split(".")[0]) < 3:  # pydicom 2.x needs the encoding on the dataset
        ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    if instance is not None:
        ds.InstanceNumber = instance
    if z is not None:
        ds.ImagePositionPatient = [-160.0, -170.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.save_as(path, write_like_original=False)
    return path


def _sop(series: str, k: int) -> str:
    return f"{series}.{k + 1}"


def _write_exam(
    folder: Path, z: list[float], *, series: str = SERIES, study: str = STUDY, seed: int = 0, positions: bool = True
) -> list[Path]:
    """One series, slice k (ascending z) holding ``_raw(k)``; written in shuffled order under shuffled names and
    shuffled InstanceNumbers, so only the positions tell the order. Returns the paths in z order."""
    rng = random.Random(seed)
    order = list(range(len(z)))
    rng.shuffle(order)
    instance = list(range(1, len(z) + 1))
    rng.shuffle(instance)
    paths: dict[int, Path] = {}
    for k in order:
        sop = _sop(series, k)
        ds = _ct_slice(
            sop, z[k] if positions else None, instance=instance[k], pixels=_raw(k), study=study, series=series
        )
        paths[k] = _save(ds, folder / f"{sop}.dcm")
    return [paths[k] for k in range(len(z))]


# ------------------------------------------------------------------------------------------- load_exam


def test_load_exam_sorts_by_z_and_gives_hu(tmp_path):
    z = [-120.0, -117.5, -115.0, -112.5, -110.0]
    paths = _write_exam(tmp_path / "exam", z, seed=3)
    volume, meta = load_exam(tmp_path / "exam")
    assert volume.dtype == np.float32 and volume.shape == (5, ROWS, COLS)
    for k in range(5):
        np.testing.assert_array_equal(volume[k], _raw(k).astype(np.float32) - 1024)
    np.testing.assert_allclose(meta.z_positions, z)
    assert meta.sop_instance_uids == [_sop(SERIES, k) for k in range(5)]
    assert meta.files == paths
    assert meta.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert meta.origin == pytest.approx((-120.0, -170.0, -160.0))
    assert (meta.study_instance_uid, meta.series_instance_uid, meta.ordered_by) == (STUDY, SERIES, "position")

    as_int, meta16 = load_exam(list(reversed(paths)), dtype="int16")
    assert as_int.dtype == np.int16
    np.testing.assert_array_equal(as_int, volume.astype(np.int16))
    assert meta16.sop_instance_uids == meta.sop_instance_uids


def test_load_exam_descending_z_and_mild_unevenness(tmp_path, caplog):
    # positions given high-to-low on disk still come out ascending; a 2.7 mm gap among 2.5 mm ones is accepted
    z = [10.0, 12.5, 15.2, 17.5, 20.0]
    _write_exam(tmp_path / "e", z, seed=1)
    with caplog.at_level(logging.WARNING):
        volume, meta = load_exam(tmp_path / "e")
    np.testing.assert_allclose(meta.z_positions, z)
    assert meta.spacing[0] == pytest.approx(2.5)
    np.testing.assert_array_equal(volume[2], _raw(2) - 1024.0)
    assert "uneven slice spacing" in caplog.text


def test_ct_small_loads_in_hu_with_its_intercept():
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert (slope, intercept) == (1.0, -1024.0)
    raw = ds.pixel_array.astype(np.float64)
    volume, meta = load_exam(path)
    assert volume.shape == (1, int(ds.Rows), int(ds.Columns))
    np.testing.assert_array_equal(volume[0], (raw * slope + intercept).astype(np.float32))
    np.testing.assert_array_equal(volume[0], (raw - 1024).astype(np.float32))
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    np.testing.assert_allclose(volume[0], apply_modality_lut(ds.pixel_array, ds))
    assert meta.sop_instance_uids == [str(ds.SOPInstanceUID)]
    assert meta.z_positions == pytest.approx([float(ds.ImagePositionPatient[2])])
    assert meta.ordered_by == "single"


def test_load_exam_falls_back_to_instance_number_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "nopos"
    for k, instance in enumerate([3, 1, 2]):
        _save(_ct_slice(_sop(SERIES, k), None, instance=instance, pixels=_raw(k)), folder / f"s{k}.dcm")
    with caplog.at_level(logging.WARNING):
        volume, meta = load_exam(folder)
    assert "InstanceNumber" in caplog.text
    assert meta.ordered_by == "instance_number" and meta.z_positions is None
    assert meta.sop_instance_uids == [_sop(SERIES, 1), _sop(SERIES, 2), _sop(SERIES, 0)]
    np.testing.assert_array_equal(volume[0], _raw(1) - 1024.0)


def test_load_exam_errors_name_the_file(tmp_path):
    # non-DICOM file
    folder = tmp_path / "stray"
    _write_exam(folder, [0.0, 2.5, 5.0])
    (folder / "readme.txt").write_text("not DICOM")
    with pytest.raises(ExamDataError, match=r"readme\.txt.*not a readable DICOM"):
        load_exam(folder)

    # a slice without pixel data
    folder = tmp_path / "nopixels"
    paths = _write_exam(folder, [0.0, 2.5, 5.0])
    ds = pydicom.dcmread(paths[1])
    del ds.PixelData
    ds.save_as(paths[1])
    with pytest.raises(ExamDataError, match=rf"{re.escape(paths[1].name)}.*no pixel data"):
        load_exam(folder)

    # a missing slice: gap 5 mm > 1.5 x the median 2.5 mm; the message names the files and positions
    folder = tmp_path / "gap"
    paths = _write_exam(folder, [0.0, 2.5, 5.0, 10.0, 12.5])
    with pytest.raises(ExamDataError, match="missing slice") as info:
        load_exam(folder)
    msg = str(info.value)
    assert paths[2].name in msg and paths[3].name in msg and "5.0000" in msg and "10.0000" in msg
    with pytest.raises(ExamDataError, match="missing slice"):
        load_exam(folder, sort_by="normal")
    assert load_exam(folder, max_gap_ratio=2.5)[0].shape[0] == 5

    # inconsistent shape
    folder = tmp_path / "shape"
    paths = _write_exam(folder, [0.0, 2.5, 5.0])
    bad = _ct_slice(_sop(SERIES, 9), 7.5, instance=9, pixels=np.zeros((ROWS + 1, COLS), np.int16))
    bad_path = _save(bad, folder / "odd.dcm")
    with pytest.raises(ExamDataError, match=rf"{re.escape(bad_path.name)}.*shape"):
        load_exam(folder)

    # inconsistent pixel spacing
    folder = tmp_path / "spacing"
    _write_exam(folder, [0.0, 2.5])
    odd = _ct_slice(_sop(SERIES, 7), 5.0, instance=7, pixels=_raw(2), spacing=(0.8, 0.8))
    odd_path = _save(odd, folder / "odd.dcm")
    with pytest.raises(ExamDataError, match=rf"{re.escape(odd_path.name)}.*PixelSpacing"):
        load_exam(folder)

    # empty folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExamDataError, match=rf"{re.escape(str(empty))}.*no files"):
        load_exam(empty)

    # one error type for everything: ExamDataError is a VolumeError is a ValueError
    assert issubclass(ExamDataError, VolumeError) and issubclass(ExamDataError, ValueError)
    with pytest.raises(ValueError, match="dtype"):
        load_exam(empty, dtype="float64")


_JPEG_LS_DECODERS = ("pylibjpeg", "gdcm", "jpeg_ls")


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is not None for m in _JPEG_LS_DECODERS),
    reason="a JPEG-LS decoder is installed, so the file decodes",
)
def test_compressed_slice_without_decoder_names_the_file_and_package(tmp_path):
    folder = tmp_path / "jls"
    folder.mkdir()
    target = folder / "slice.dcm"
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), target)
    with pytest.raises(ExamDataError) as info:
        load_exam(folder)
    msg = str(info.value)
    assert str(target) in msg
    assert "JPEG-LS" in msg and "1.2.840.10008.1.2.4.80" in msg
    assert "pylibjpeg-libjpeg" in msg and "python-gdcm" in msg


# ------------------------------------------------------------------------------------------- RSNA CSV


def _label_row(study: str, series: str, sop: str, pe: int, labels: dict[str, int], cols=RSNA_COLUMNS) -> dict:
    row = {cols["study"]: study, cols["series"]: series, cols["sop"]: sop, cols["pe_present_on_image"]: pe}
    row.update({cols[name]: labels[name] for name in RSNA_EXAM_LABELS})
    row.update({"qa_motion": 0, "flow_artifact": 0})  # ignored extra columns
    return row


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


POSITIVE = {name: 0 for name in RSNA_EXAM_LABELS} | {"rightsided_pe": 1, "central_pe": 1, "rv_lv_ratio_gte_1": 1}
NEGATIVE = {name: 0 for name in RSNA_EXAM_LABELS} | {"negative_exam_for_pe": 1, "rv_lv_ratio_lt_1": 1}


def _rsna_tree(tmp_path: Path, cols=RSNA_COLUMNS) -> tuple[Path, Path, dict[str, list[float]]]:
    """Two exams under root/{study}/{series}/{sop}.dcm and a train.csv listing their slices out of z order."""
    root = tmp_path / "train"
    exams = {  # study -> (z positions, exam labels, per-slice PE in z order, CSV order of the slices)
        "2.25.2": ([0.0, 2.5, 5.0, 7.5], POSITIVE, [0, 1, 1, 0], [2, 0, 3, 1]),
        "2.25.1": ([50.0, 52.0, 54.0], NEGATIVE, [0, 0, 0], [1, 2, 0]),
    }
    rows = []
    z_by_study = {}
    for study, (z, labels, pe, csv_order) in exams.items():
        series = study + ".9"
        _write_exam(root / study / series, z, study=study, series=series, seed=len(z))
        for k in csv_order:
            rows.append(_label_row(study, series, _sop(series, k), pe[k], labels, cols))
        z_by_study[study] = z
    return root, _write_csv(tmp_path / "train.csv", rows), z_by_study


def test_scan_rsna_reads_exams_and_aligns_slice_labels(tmp_path):
    root, labels_csv, z = _rsna_tree(tmp_path)
    records = scan_rsna(root, labels_csv)
    assert [r.study for r in records] == ["2.25.1", "2.25.2"]
    pos = records[1]
    assert pos.series == "2.25.2.9" and pos.num_slices == 4 and not pos.z_sorted
    assert pos.sop_instance_uids == [_sop("2.25.2.9", k) for k in [2, 0, 3, 1]]  # CSV order
    assert pos.files[0] == root / "2.25.2" / "2.25.2.9" / f"{_sop('2.25.2.9', 2)}.dcm"
    np.testing.assert_array_equal(pos.pe_present_on_image, [1, 0, 0, 1])
    assert pos.labels == POSITIVE
    np.testing.assert_array_equal(pos.label_vector(), [POSITIVE[n] for n in RSNA_EXAM_LABELS])
    assert records[0].labels == NEGATIVE

    volume, meta, pe = load_rsna_exam(pos)
    np.testing.assert_allclose(meta.z_positions, z["2.25.2"])
    np.testing.assert_array_equal(pe, [0, 1, 1, 0])  # aligned to ascending z
    np.testing.assert_array_equal(volume[1], _raw(1) - 1024.0)

    ordered = scan_rsna(root, labels_csv, sort_slices=True)[1]
    assert ordered.z_sorted and ordered.sop_instance_uids == [_sop("2.25.2.9", k) for k in range(4)]
    np.testing.assert_array_equal(ordered.pe_present_on_image, [0, 1, 1, 0])

    unlabelled = scan_rsna(root, labels_csv, labelled=False)
    assert unlabelled[1].labels is None and unlabelled[1].pe_present_on_image is None
    assert load_rsna_exam(unlabelled[1])[2] is None


def test_scan_rsna_configurable_columns_and_layout(tmp_path):
    cols = dict(RSNA_COLUMNS) | {"study": "study_uid", "sop": "image_uid", "central_pe": "PE_central"}
    root, labels_csv, _ = _rsna_tree(tmp_path, cols)
    with pytest.raises(ExamDataError, match=r"lacks column.*'StudyInstanceUID'.*configurable"):
        scan_rsna(root, labels_csv)
    records = scan_rsna(
        root, labels_csv, columns={"study": "study_uid", "sop": "image_uid", "central_pe": "PE_central"}
    )
    assert records[1].labels["central_pe"] == 1

    flat = tmp_path / "flat"
    for record in records:
        for sop, f in zip(record.sop_instance_uids, record.files, strict=True):
            (flat / record.study).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, flat / record.study / f"{sop}.dicom")
    again = scan_rsna(flat, labels_csv, columns=cols, layout="{study}/{sop}.dicom")
    assert again[1].files[0] == flat / "2.25.2" / f"{_sop('2.25.2.9', 2)}.dicom"
    with pytest.raises(ValueError, match="layout"):
        scan_rsna(flat, labels_csv, columns=cols, layout="{study}/{slice}.dcm")
    with pytest.raises(ValueError, match="unknown role"):
        scan_rsna(flat, labels_csv, columns={"patient": "PatientID"})
    with pytest.raises(ExamDataError, match=r"does not exist.*layout"):
        scan_rsna(flat, labels_csv, columns=cols)  # default layout points at files that are not there


def test_scan_rsna_refuses_inconsistent_exam_labels_and_bad_rows(tmp_path):
    root, labels_csv, _ = _rsna_tree(tmp_path)
    with open(labels_csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    broken = [dict(r) for r in rows]
    broken[2]["chronic_pe"] = "1"  # row 3 (line 4) belongs to study 2.25.2, whose other rows say 0
    with pytest.raises(ExamDataError, match=r"train\.csv:4: study 2\.25\.2 .*chronic_pe=1.*chronic_pe=0 at line 2"):
        scan_rsna(root, _write_csv(tmp_path / "train.csv", broken))

    broken = [dict(r) for r in rows]
    broken[1]["pe_present_on_image"] = "yes"
    with pytest.raises(ExamDataError, match=r"train\.csv:3: column 'pe_present_on_image' has 'yes'"):
        scan_rsna(root, _write_csv(tmp_path / "train.csv", broken))

    with pytest.raises(ExamDataError, match=r"train\.csv:\d+: SOPInstanceUID .* listed twice"):
        scan_rsna(root, _write_csv(tmp_path / "train.csv", [*rows, rows[0]]))

    broken = [dict(r) for r in rows]
    broken[0]["StudyInstanceUID"] = ""
    with pytest.raises(ExamDataError, match=r"train\.csv:2: empty 'StudyInstanceUID'"):
        scan_rsna(root, _write_csv(tmp_path / "train.csv", broken))

    (tmp_path / "header_only.csv").write_text(",".join(rows[0]) + "\n")
    with pytest.raises(ExamDataError, match="no data rows"):
        scan_rsna(root, tmp_path / "header_only.csv")

    _write_csv(tmp_path / "train.csv", rows)
    missing = root / "2.25.1" / "2.25.1.9" / f"{_sop('2.25.1.9', 0)}.dcm"
    missing.unlink()
    with pytest.raises(ExamDataError, match=rf"{re.escape(str(missing))}.*does not exist"):
        scan_rsna(root, labels_csv)
    assert len(scan_rsna(root, labels_csv, check_files=False)) == 2


def test_image_labels_for_refuses_foreign_files(tmp_path):
    record = ExamRecord("s", "r", ["a", "b"], [tmp_path / "a.dcm", tmp_path / "b.dcm"], np.array([0, 1], np.uint8))
    np.testing.assert_array_equal(record.image_labels_for([tmp_path / "b.dcm", tmp_path / "a.dcm"]), [1, 0])
    with pytest.raises(ExamDataError, match=r"c\.dcm: not a slice of study s"):
        record.image_labels_for([tmp_path / "c.dcm"])


# ------------------------------------------------------------------------------------------ split manifests


def test_split_studies_is_deterministic_disjoint_and_complete():
    studies = [f"1.2.{i}" for i in range(240)]
    splits = split_studies(studies, fractions=(0.5, 1 / 6, 1 / 3), seed=7)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [120, 40, 80]
    check_disjoint(splits)
    assert sorted(s for v in splits.values() for s in v) == sorted(studies)
    # input order and repeats (one id per slice) do not matter; the seed does
    shuffled = list(reversed(studies)) + studies[:10]
    assert split_studies(shuffled, fractions=(0.5, 1 / 6, 1 / 3), seed=7) == splits
    assert split_studies(studies, fractions=(0.5, 1 / 6, 1 / 3), seed=8) != splits
    tiny = split_studies(["a", "b", "c"], fractions=(0.9, 0.05, 0.05))
    assert all(len(v) == 1 for v in tiny.values())
    with pytest.raises(ValueError, match="sum to 1"):
        split_studies(studies, fractions=(0.5, 0.5, 0.5))


def test_manifests_round_trip_and_refuse_leaks(tmp_path):
    splits = split_studies([f"s{i}" for i in range(20)], seed=1)
    for name in ("m.json", "m.csv"):
        path = write_manifest(tmp_path / name, splits)
        assert read_manifest(path) == splits

    leaky = {"train": ["s1", "s2"], "val": ["s3"], "test": ["s2"]}
    with pytest.raises(ExamDataError, match=r"'s2' is in both split 'train' and split 'test'"):
        write_manifest(tmp_path / "leak.json", leaky)
    with pytest.raises(ExamDataError, match="'s2'"):
        check_disjoint(leaky)

    (tmp_path / "leak.json").write_text(json.dumps(leaky))
    with pytest.raises(ExamDataError, match=r"leak\.json: study 's2' is in both"):
        read_manifest(tmp_path / "leak.json")
    (tmp_path / "leak.csv").write_text("study,split\ns1,train\ns2,val\ns1,test\n")
    with pytest.raises(ExamDataError, match=r"leak\.csv: study 's1' is in both split 'train' and split 'test'"):
        read_manifest(tmp_path / "leak.csv")
    (tmp_path / "twice.csv").write_text("study,split\ns1,train\ns1,train\n")
    with pytest.raises(ExamDataError, match="listed twice in split 'train'"):
        read_manifest(tmp_path / "twice.csv")

    (tmp_path / "names.csv").write_text("study,split\ns1,train\ns2,holdout\n")
    with pytest.raises(ExamDataError, match=r"names\.csv: unknown split name\(s\) \['holdout'\]"):
        read_manifest(tmp_path / "names.csv")
    with pytest.raises(ExamDataError, match="unknown split name"):
        write_manifest(tmp_path / "names.json", {"train": ["a"], "validation": ["b"]})

    (tmp_path / "partial.csv").write_text("study,split\ns1,train\n")
    assert read_manifest(tmp_path / "partial.csv") == {"train": ["s1"], "val": [], "test": []}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ExamDataError, match=r"bad\.json.*not valid JSON"):
        read_manifest(tmp_path / "bad.json")


def test_write_ct_series_round_trips_through_load_exam(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1024, 1500, size=(5, 6, 7)).astype(np.int16)
    z = [-40.0, -37.5, -35.0, -32.5, -30.0]
    # names in reverse z order, in a sub-folder: the reader must sort by position, not by name
    paths = write_ct_series(vol, tmp_path, positions=z, spacing=(2.5, 0.7, 0.8), study_uid="1.2.3",
                            name=lambda k, sop: f"series/{9 - k}.dcm")  # fmt: skip
    assert [p.name for p in paths] == ["9.dcm", "8.dcm", "7.dcm", "6.dcm", "5.dcm"]
    back, meta = load_exam(tmp_path / "series")
    np.testing.assert_array_equal(back, vol.astype(np.float32))
    assert list(meta.z_positions) == z and meta.sop_instance_uids == [f"1.2.3.1.{k + 1}" for k in range(5)]
    assert meta.study_instance_uid == "1.2.3" and tuple(meta.spacing[1:]) == (0.7, 0.8)
    with pytest.raises(ValueError, match="positions"):
        write_ct_series(vol, tmp_path / "bad", positions=z[:3], spacing=(2.5, 0.7, 0.8), study_uid="1.2.3")
