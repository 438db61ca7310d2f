"""Partial-label loaders (ChestX-ray14, CheXpert, COVIDx), source protocols, assembly, patient splits, images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thrifty.data.images import CHEXPERT_FINDINGS, ImageDataError
from thrifty.data.partial_labels import (
    CHESTXRAY14_FINDINGS,
    LabelTable,
    SourceProtocol,
    assemble,
    check_protocols,
    load_table_images,
    read_protocols,
    scan_chestxray14,
    scan_chexpert_partial,
    scan_covidx,
    split_by_patient,
    write_protocols,
)

# ----------------------------------------------------------------------------------------------- fixtures

NIH_HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
]
# image, finding labels, patient, view, folder (relative to root)
NIH_ROWS = [
    ("00000001_000.png", "Effusion|Nodule", "1", "PA", "images_001/images"),
    ("00000001_001.png", "No Finding", "1", "AP", "images_001/images"),
    ("00000002_000.png", "Cardiomegaly", "2", "PA", "images_001/images"),
    ("00000003_000.png", "No Finding", "3", "PA", "images_002/images"),
    ("00000003_001.png", "Pleural_Thickening|Hernia|Mass", "3", "AP", "images_002/images"),
    ("00000004_000.png", "Pneumothorax", "4", "PA", "images_003"),  # an archive unpacked without images/
]
NIH_TRAIN_VAL = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png", "00000003_001.png"]
NIH_TEST = ["00000004_000.png"]


def _img(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _nih_row(image: str, labels: str, patient: str, view: str) -> list[str]:
    return [image, labels, "0", patient, "50", "M", view]


def _nih(root: Path, rows=NIH_ROWS, header=NIH_HEADER) -> Path:
    for i, (image, _, _, _, folder) in enumerate(rows):
        _img(root / folder / image, value=10 * (i + 1))
    _write_csv(root / "Data_Entry_2017.csv", header, [_nih_row(*r[:4]) for r in rows])
    (root / "train_val_list.txt").write_text("\n".join(NIH_TRAIN_VAL) + "\n")
    (root / "test_list.txt").write_text("\n".join(NIH_TEST) + "\n")
    return root


def _nih_expected(rows) -> np.ndarray:
    out = np.zeros((len(rows), len(CHESTXRAY14_FINDINGS)), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, name in enumerate(CHESTXRAY14_FINDINGS):
            out[i, j] = float(name in r[1].split("|"))
    return out


CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
# (path under CheXpert-v1.0-small/train, frontal/lateral, AP/PA, {finding: cell}); unnamed findings are blank
CHEX_ROWS = [
    ("patient00001/study1/view1_frontal.jpg", "Frontal", "PA",
     {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"}),
    ("patient00001/study1/view2_lateral.jpg", "Lateral", "", {"Cardiomegaly": "1.0"}),
    ("patient00002/study1/view1_frontal.jpg", "Frontal", "AP", {"No Finding": "1.0", "Pleural Effusion": "-1"}),
    ("patient00003/study2/view1_frontal.jpg", "Frontal", "LL", {"Pleural Effusion": "1"}),
    ("patient00003/study1/view1_frontal.jpg", "Frontal", "AP", {"Pleural Effusion": "1", "Edema": "0"}),
]  # fmt: skip


def _chexpert(root: Path, rows=CHEX_ROWS, header=CHEX_HEADER) -> Path:
    """``root/CheXpert-v1.0-small/{train.csv, train/...}``, the archive layout; returns the CSV path."""
    base = root / "CheXpert-v1.0-small"
    out = []
    for rel, fl, view, cells in rows:
        _img(base / "train" / rel, value=200)
        row = {
            "Path": f"CheXpert-v1.0-small/train/{rel}",
            "Sex": "F",
            "Age": "60",
            "Frontal/Lateral": fl,
            "AP/PA": view,
        }
        row.update(cells)
        out.append([row.get(c, "") for c in header])
    return _write_csv(base / "train.csv", header, out)


def _chex_cells(rows, finding: str) -> list[str]:
    return [cells.get(finding, "") for _, _, _, cells in rows]


COVIDX_LINES = [
    ("101", "a.png", "positive", "bimcv"),
    ("102", "b.png", "negative", "cohen"),
    ("101", "c.png", "positive", "bimcv"),
    ("101", "d.png", "negative", "cohen"),  # same id, other origin: another patient
]


def _covidx(root: Path, lines=COVIDX_LINES) -> Path:
    for line in lines:
        _img(root / "train" / line[1], value=50)
    path = root / "train.txt"
    path.write_text("".join(" ".join(line) + "\n" for line in lines))
    return path


# ----------------------------------------------------------------------------------------------- LabelTable


def _table(n: int = 3, names=("a", "b"), source: str = "s") -> LabelTable:
    return LabelTable(
        paths=[Path(f"/x/{i}.png") for i in range(n)],
        labels=np.zeros((n, len(names)), dtype=np.float32),
        mask=np.ones((n, len(names)), dtype=bool),
        label_names=names,
        patient_ids=[str(i) for i in range(n)],
        sources=[source] * n,
    )


def test_label_table_checks_shapes_and_values_and_subsets():
    t = _table(4)
    t.labels[1, 0] = 1.0
    t.mask[2, 1] = False
    assert len(t) == 4
    sub = t.subset([2, 1])
    assert sub.paths == [t.paths[2], t.paths[1]] and sub.patient_ids == ["2", "1"]
    np.testing.assert_array_equal(sub.labels, t.labels[[2, 1]])
    np.testing.assert_array_equal(sub.mask, t.mask[[2, 1]])
    by_mask = t.subset(np.array([False, True, False, True]))
    assert by_mask.patient_ids == ["1", "3"]
    assert len(t.subset([])) == 0
    with pytest.raises(ValueError, match="boolean row mask"):
        t.subset(np.array([True, False]))
    with pytest.raises(ValueError, match="shape"):
        LabelTable([Path("a")], np.zeros((2, 2)), np.ones((2, 2), bool), ("a", "b"), ["1"], ["s"])
    with pytest.raises(ValueError, match="patient_ids"):
        LabelTable([Path("a")], np.zeros((1, 1)), np.ones((1, 1), bool), ("a",), [], ["s"])
    with pytest.raises(ValueError, match="0 or 1"):
        LabelTable([Path("a")], np.full((1, 1), 0.5), np.ones((1, 1), bool), ("a",), ["1"], ["s"])
    with pytest.raises(ValueError, match="missing"):
        LabelTable([Path("a")], np.ones((1, 1)), np.zeros((1, 1), bool), ("a",), ["1"], ["s"])
    with pytest.raises(ValueError, match="repeat"):
        LabelTable([Path("a")], np.zeros((1, 2)), np.ones((1, 2), bool), ("a", "a"), ["1"], ["s"])


# ----------------------------------------------------------------------------------------------- ChestX-ray14


def test_chestxray14_reads_labels_patients_and_nested_image_folders(tmp_path):
    root = _nih(tmp_path / "nih")
    t = scan_chestxray14(root)
    assert t.label_names == CHESTXRAY14_FINDINGS
    assert [p.name for p in t.paths] == [r[0] for r in NIH_ROWS]
    assert t.paths == [root / r[4] / r[0] for r in NIH_ROWS]
    np.testing.assert_array_equal(t.labels, _nih_expected(NIH_ROWS))
    assert t.labels[1].sum() == 0 and t.labels[0].sum() == 2  # "No Finding" all negative; multi-label row
    assert t.mask.all() and t.mask.shape == (len(NIH_ROWS), 14)
    assert t.patient_ids == [r[2] for r in NIH_ROWS]
    assert t.sources == ["chestxray14"] * len(NIH_ROWS)


def test_chestxray14_official_split_lists_and_view_filter(tmp_path):
    root = _nih(tmp_path / "nih")
    train_val = scan_chestxray14(root, split="train_val")
    assert [p.name for p in train_val.paths] == NIH_TRAIN_VAL
    test = scan_chestxray14(root, split="test", name="nih")
    assert [p.name for p in test.paths] == NIH_TEST and test.sources == ["nih"]
    assert not {p.name for p in train_val.paths} & {p.name for p in test.paths}
    pa = scan_chestxray14(root, views=("pa",))
    assert [p.name for p in pa.paths] == [r[0] for r in NIH_ROWS if r[3] == "PA"]
    both = scan_chestxray14(root, split="train_val", views="AP")
    assert [p.name for p in both.paths] == [r[0] for r in NIH_ROWS if r[3] == "AP" and r[0] in NIH_TRAIN_VAL]


def test_chestxray14_column_overrides(tmp_path):
    header = ["file", "findings", "Follow-up #", "pid", "Patient Age", "Patient Gender", "view"]
    root = _nih(tmp_path / "nih", header=header)
    cols = {"image": "file", "labels": "findings", "patient": "pid", "view": "view"}
    t = scan_chestxray14(root, columns=cols, views=("PA",))
    assert [p.name for p in t.paths] == [r[0] for r in NIH_ROWS if r[3] == "PA"]
    with pytest.raises(ImageDataError, match=r"lacks column.*'Image Index'.*'file'"):
        scan_chestxray14(root)
    with pytest.raises(ValueError, match="unknown column key"):
        scan_chestxray14(root, columns={"images": "file"})


def test_chestxray14_header_with_trailing_comma_and_bracketed_columns(tmp_path):
    """The NIH header as recalled: bracketed multi-part names and a trailing comma that data rows lack."""
    root = tmp_path / "nih"
    for image, _, _, _, folder in NIH_ROWS:
        _img(root / folder / image)
    header = ",".join([*NIH_HEADER, "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]) + ","
    lines = [",".join([*_nih_row(*r[:4]), "2500", "2048", "0.14", "0.14"]) for r in NIH_ROWS]
    (root / "Data_Entry_2017.csv").write_text("\n".join([header, *lines]) + "\n")
    t = scan_chestxray14(root, views=("PA", "AP"))
    np.testing.assert_array_equal(t.labels, _nih_expected(NIH_ROWS))
    assert t.patient_ids == [r[2] for r in NIH_ROWS]


def test_chestxray14_view_column_needed_only_for_view_filter(tmp_path):
    header = [*NIH_HEADER[:-1], "Projection"]
    root = _nih(tmp_path / "nih", header=header)
    assert len(scan_chestxray14(root)) == len(NIH_ROWS)
    with pytest.raises(ImageDataError, match=r"Data_Entry_2017\.csv.*'View Position'.*Projection"):
        scan_chestxray14(root, views=("PA",))


def test_chestxray14_errors_name_file_and_line(tmp_path):
    with pytest.raises(ImageDataError, match="does not exist"):
        scan_chestxray14(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageDataError, match=r"Data_Entry_2017\.csv: ChestX-ray14 label CSV does not exist"):
        scan_chestxray14(empty)

    bad = list(NIH_ROWS)
    bad[2] = ("00000002_000.png", "Cardiomegaly|Covid", "2", "PA", "images_001/images")
    root = _nih(tmp_path / "unknown_label", rows=bad)
    with pytest.raises(ImageDataError, match=r"Data_Entry_2017\.csv:4: .*'Covid'"):
        scan_chestxray14(root)

    bad = list(NIH_ROWS)
    bad[1] = ("00000001_001.png", "No Finding|Effusion", "1", "AP", "images_001/images")
    root = _nih(tmp_path / "mixed_no_finding", rows=bad)
    with pytest.raises(ImageDataError, match=r"Data_Entry_2017\.csv:3: .*'No Finding'"):
        scan_chestxray14(root)

    root = _nih(tmp_path / "missing_image")
    (root / "images_002" / "images" / "00000003_001.png").unlink()
    with pytest.raises(ImageDataError, match=r"Data_Entry_2017\.csv:6: image '00000003_001\.png' not found"):
        scan_chestxray14(root)
    assert len(scan_chestxray14(root, split="test")) == 1  # the missing file is not in the kept rows

    root = _nih(tmp_path / "list_names_unknown")
    (root / "test_list.txt").write_text("00000004_000.png\n99999999_000.png\n")
    with pytest.raises(ImageDataError, match=r"test_list\.txt:2: image '99999999_000\.png' is not in"):
        scan_chestxray14(root, split="test")

    root = _nih(tmp_path / "no_list")
    (root / "train_val_list.txt").unlink()
    with pytest.raises(ImageDataError, match=r"train_val_list\.txt: .*does not exist"):
        scan_chestxray14(root, split="train_val")

    root = _nih(tmp_path / "no_dirs")
    with pytest.raises(ImageDataError, match=r"no image folder matches 'scans\*'"):
        scan_chestxray14(root, image_dirs="scans*")

    bad = [*NIH_ROWS, NIH_ROWS[0]]
    root = _nih(tmp_path / "duplicate", rows=bad)
    with pytest.raises(ImageDataError, match=r"Data_Entry_2017\.csv:8: .*already listed on line 2"):
        scan_chestxray14(root)

    root = _nih(tmp_path / "args")
    with pytest.raises(ValueError, match="split"):
        scan_chestxray14(root, split="val")


# ----------------------------------------------------------------------------------------------- CheXpert


def _expected_chex(rows, finding: str, *, uncertain: str, blank: str) -> tuple[list[float], list[bool]]:
    labels, given = [], []
    for cell in _chex_cells(rows, finding):
        if cell == "":
            labels.append(0.0), given.append(blank == "negative")
        elif float(cell) == -1.0:
            labels.append(1.0 if uncertain == "ones" else 0.0), given.append(uncertain != "missing")
        else:
            labels.append(float(cell)), given.append(True)
    return labels, given


@pytest.mark.parametrize("uncertain", ["missing", "ones", "zeros"])
@pytest.mark.parametrize("blank", ["missing", "negative"])
def test_chexpert_policies_for_uncertain_and_blank(tmp_path, uncertain, blank):
    csv_path = _chexpert(tmp_path)
    t = scan_chexpert_partial(csv_path, uncertain=uncertain, blank=blank)
    kept = [r for r in CHEX_ROWS if r[1] == "Frontal" and r[2] in ("PA", "AP")]
    assert [p.relative_to(tmp_path).as_posix() for p in t.paths] == [f"CheXpert-v1.0-small/train/{r[0]}" for r in kept]
    assert t.label_names == CHEXPERT_FINDINGS
    for j, finding in enumerate(CHEXPERT_FINDINGS):
        labels, given = _expected_chex(kept, finding, uncertain=uncertain, blank=blank)
        np.testing.assert_array_equal(t.labels[:, j], labels, err_msg=finding)
        np.testing.assert_array_equal(t.mask[:, j], given, err_msg=finding)
    assert t.patient_ids == [r[0].split("/")[0] for r in kept]
    assert t.sources == ["chexpert"] * len(kept)


def test_chexpert_row_selection_findings_and_image_root(tmp_path):
    csv_path = _chexpert(tmp_path)
    everything = scan_chexpert_partial(csv_path, frontal_only=False, views=None)
    assert len(everything) == len(CHEX_ROWS)
    with_lateral = scan_chexpert_partial(csv_path, frontal_only=False)
    assert [p.name for p in with_lateral.paths] == [
        Path(r[0]).name for r in CHEX_ROWS if r[1] == "Lateral" or r[2] in ("PA", "AP")
    ]
    pa = scan_chexpert_partial(csv_path, views=("PA",))
    assert pa.patient_ids == ["patient00001"]
    sub = scan_chexpert_partial(csv_path, findings=("Edema", "Cardiomegaly"), name="cx")
    assert sub.label_names == ("Edema", "Cardiomegaly") and sub.sources[0] == "cx"
    kept = [r for r in CHEX_ROWS if r[1] == "Frontal" and r[2] in ("PA", "AP")]
    assert len(sub) == len(kept)
    np.testing.assert_array_equal(sub.mask[:, 1], [c != "" for c in _chex_cells(kept, "Cardiomegaly")])
    explicit = scan_chexpert_partial(csv_path, image_root=tmp_path)
    assert explicit.paths == scan_chexpert_partial(csv_path).paths
    with pytest.raises(ImageDataError, match="not found under any of"):
        scan_chexpert_partial(csv_path, image_root=tmp_path / "elsewhere")


def test_chexpert_patient_pattern_is_configurable(tmp_path):
    rows = [("pt7/study1/view1_frontal.jpg", "Frontal", "PA", {"Edema": "1"})]
    csv_path = _chexpert(tmp_path, rows=rows)
    with pytest.raises(ImageDataError, match=r"train\.csv:2: no patient id in .*pt7"):
        scan_chexpert_partial(csv_path)
    assert scan_chexpert_partial(csv_path, patient_pattern=r"/(pt\d+)/").patient_ids == ["pt7"]


def test_chexpert_errors(tmp_path):
    with pytest.raises(ImageDataError, match=r"nope\.csv: CheXpert CSV does not exist"):
        scan_chexpert_partial(tmp_path / "nope.csv")
    rows = list(CHEX_ROWS)
    rows[2] = (rows[2][0], "Frontal", "AP", {"Edema": "2"})
    csv_path = _chexpert(tmp_path / "bad_value", rows=rows)
    with pytest.raises(ImageDataError, match=r"train\.csv:4: column 'Edema' has '2'; expected 1, 0, -1 or blank"):
        scan_chexpert_partial(csv_path)
    header = [c for c in CHEX_HEADER if c != "Fracture"]
    csv_path = _chexpert(tmp_path / "no_column", header=header)
    with pytest.raises(ImageDataError, match=r"train\.csv: .*'Fracture'.*'Path'"):
        scan_chexpert_partial(csv_path)
    assert len(scan_chexpert_partial(csv_path, findings=("Edema",))) == 3  # fine without that finding
    csv_path = _chexpert(tmp_path / "no_image")
    (csv_path.parent / "train" / CHEX_ROWS[2][0]).unlink()
    with pytest.raises(ImageDataError, match=r"train\.csv:4: image .*patient00002.* not found"):
        scan_chexpert_partial(csv_path)
    for kw in ({"uncertain": "exclude"}, {"blank": "zeros"}, {"patient_pattern": "("}):
        with pytest.raises(ValueError):
            scan_chexpert_partial(csv_path, **kw)


# ----------------------------------------------------------------------------------------------- COVIDx


def test_covidx_reads_schema_labels_and_patients(tmp_path):
    split = _covidx(tmp_path)
    t = scan_covidx(split, image_root=tmp_path / "train")
    assert t.paths == [tmp_path / "train" / line[1] for line in COVIDX_LINES]
    np.testing.assert_array_equal(t.labels[:, 0], [float(line[2] == "positive") for line in COVIDX_LINES])
    assert t.mask.all() and t.label_names == ("COVID-19",) and t.sources == ["covidx"] * len(COVIDX_LINES)
    assert t.patient_ids == [f"{line[3]}/{line[0]}" for line in COVIDX_LINES]
    assert t.patient_ids[0] == t.patient_ids[2] != t.patient_ids[3]


def test_covidx_custom_schema_and_label_values(tmp_path):
    root = tmp_path / "v8"
    for name in ("x.png", "y.png", "z.png"):
        _img(root / name)
    split = tmp_path / "v8.txt"
    split.write_text("x.png COVID-19\n\n# comment\ny.png normal\nz.png pneumonia\n")
    t = scan_covidx(split, image_root=root, schema=("image", "label"), positive="COVID-19",
                    negative=("normal", "pneumonia"), label_name="covid")  # fmt: skip
    np.testing.assert_array_equal(t.labels[:, 0], [1.0, 0.0, 0.0])
    assert t.patient_ids == ["x.png", "y.png", "z.png"] and t.label_names == ("covid",)
    with pytest.raises(ImageDataError, match=r"v8\.txt:5: label 'pneumonia'"):
        scan_covidx(split, image_root=root, schema=("image", "label"), positive="COVID-19", negative="normal")


def test_covidx_errors(tmp_path):
    split = _covidx(tmp_path)
    root = tmp_path / "train"
    with pytest.raises(ImageDataError, match=r"absent\.txt: COVIDx split file does not exist"):
        scan_covidx(tmp_path / "absent.txt", image_root=root)
    with pytest.raises(ImageDataError, match="image folder does not exist"):
        scan_covidx(split, image_root=tmp_path / "absent")
    lines = split.read_text().splitlines()
    bad = tmp_path / "bad_label.txt"
    bad.write_text("\n".join([lines[0], "103 b.png maybe cohen"]) + "\n")
    with pytest.raises(ImageDataError, match=r"bad_label\.txt:2: label 'maybe'; expected one of"):
        scan_covidx(bad, image_root=root)
    bad = tmp_path / "fields.txt"
    bad.write_text("\n".join([lines[0], "103 b.png negative"]) + "\n")
    with pytest.raises(ImageDataError, match=r"fields\.txt:2: 3 whitespace-separated field\(s\), expected 4"):
        scan_covidx(bad, image_root=root)
    bad = tmp_path / "missing.txt"
    bad.write_text("103 zz.png negative cohen\n")
    with pytest.raises(ImageDataError, match=r"missing\.txt:1: image 'zz\.png' not found"):
        scan_covidx(bad, image_root=root)
    bad = tmp_path / "dupe.txt"
    bad.write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n")
    with pytest.raises(ImageDataError, match=r"dupe\.txt:3: .*already listed on line 1"):
        scan_covidx(bad, image_root=root)
    with pytest.raises(ValueError, match="lacks"):
        scan_covidx(split, image_root=root, schema=("patient", "file", "label", "source"))
    with pytest.raises(ValueError, match="both positive and negative"):
        scan_covidx(split, image_root=root, positive="positive", negative=("positive", "negative"))


# ----------------------------------------------------------------------------------------------- protocols


def test_protocol_json_round_trip_and_strict_keys(tmp_path):
    p = SourceProtocol(
        name="chexpert",
        provides=("Cardiomegaly", "Effusion"),
        implies_negative=("COVID-19",),
        aliases={"Pleural Effusion": "Effusion"},
    )
    again = SourceProtocol.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p and hash(again) == hash(p)
    assert SourceProtocol.from_dict({"name": "x", "provides": []}) == SourceProtocol("x", ())
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['implied'\]"):
        SourceProtocol.from_dict({"name": "x", "provides": [], "implied": ["a"]})
    with pytest.raises(ValueError, match="provides"):
        SourceProtocol.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="sequence of label names"):
        SourceProtocol(name="x", provides="Effusion")
    with pytest.raises(ValueError, match="aliases"):
        SourceProtocol(name="x", provides=(), aliases={"a": 3})
    path = tmp_path / "protocols.json"
    write_protocols(path, [p, SourceProtocol("nih", ("Effusion",))])
    assert read_protocols(path) == [p, SourceProtocol("nih", ("Effusion",))]
    (tmp_path / "one.json").write_text(json.dumps(p.to_dict()))
    assert read_protocols(tmp_path / "one.json") == [p]
    (tmp_path / "bad.json").write_text('[{"name": "a", "provides": []}, {"name": "b", "provides": [], "x": 1}]')
    with pytest.raises(ImageDataError, match=r"bad\.json: protocol #1: .*'x'"):
        read_protocols(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{\n  nope")
    with pytest.raises(ImageDataError, match=r"broken\.json:2: protocol file is not valid JSON"):
        read_protocols(tmp_path / "broken.json")
    with pytest.raises(ImageDataError, match="does not exist"):
        read_protocols(tmp_path / "absent.json")


def test_check_protocols_finds_each_kind_of_conflict():
    nih = SourceProtocol("nih", ("Effusion", "Nodule"), implies_negative=("COVID-19",))
    covid = SourceProtocol("covidx", ("COVID-19",))
    chex = SourceProtocol("chexpert", ("Effusion",), aliases={"Pleural Effusion": "Effusion"})
    assert check_protocols([nih, covid, chex]) == []

    def one(protocols, *needles):
        found = check_protocols(protocols)
        hits = [m for m in found if all(n in m for n in needles)]
        assert hits, (needles, found)

    one([SourceProtocol("a", ("x", "y"), implies_negative=("y",))], "'a'", "'y'", "both provided and implied")
    one([SourceProtocol("a", ("x", "x"))], "'a'", "more than once")
    one([SourceProtocol("a", ("x",), aliases={"X1": "x", "X2": "x"})], "'a'", "'X1'", "'X2'", "'x'")
    one([SourceProtocol("a", ("x",), aliases={"Y": "y"})], "'a'", "'Y'", "does not provide")
    one([SourceProtocol("a", ("x",)), SourceProtocol("a", ("y",))], "'a'", "share this name")
    one([nih], "'COVID-19'", "'nih'", "provided by no source")
    one(
        [nih, SourceProtocol("other", ("COVID-19",), aliases={"covid_pos": "COVID-19"}), covid],
        "'COVID-19'",
        "'nih'",
        "'other'",
        "'covid_pos'",
    )
    one(
        [SourceProtocol("nih", ("Pleural_Thickening",)), SourceProtocol("b", ("pleural thickening",))],
        "'Pleural_Thickening'",
        "'pleural thickening'",
    )


# ----------------------------------------------------------------------------------------------- assembly


def test_assemble_builds_masks_from_protocols(tmp_path):
    nih = scan_chestxray14(_nih(tmp_path / "nih"))
    chex = scan_chexpert_partial(_chexpert(tmp_path / "chex"))  # uncertain / blank -> missing
    covid = scan_covidx(_covidx(tmp_path / "covidx"), image_root=tmp_path / "covidx" / "train")
    protocols = [
        SourceProtocol("chestxray14", ("Effusion", "Cardiomegaly", "Nodule"), implies_negative=("COVID-19",)),
        SourceProtocol("chexpert", ("Effusion", "Cardiomegaly", "Edema"), aliases={"Pleural Effusion": "Effusion"}),
        SourceProtocol("covidx", ("COVID-19",)),
    ]
    names = ("COVID-19", "Effusion", "Cardiomegaly", "Edema", "Nodule")
    out = assemble([nih, chex, covid], protocols=protocols, label_names=names)
    assert out.label_names == names
    assert out.paths == nih.paths + chex.paths + covid.paths
    assert out.sources == nih.sources + chex.sources + covid.sources
    assert out.patient_ids == nih.patient_ids + chex.patient_ids + covid.patient_ids
    col = {n: j for j, n in enumerate(names)}
    a, b = len(nih), len(nih) + len(chex)

    # NIH: its own findings given; COVID-19 implied negative (given, 0); Edema not provided -> missing
    for label in ("Effusion", "Cardiomegaly", "Nodule"):
        np.testing.assert_array_equal(out.labels[:a, col[label]], nih.labels[:, CHESTXRAY14_FINDINGS.index(label)])
        assert out.mask[:a, col[label]].all()
    assert out.mask[:a, col["COVID-19"]].all() and (out.labels[:a, col["COVID-19"]] == 0).all()
    assert not out.mask[:a, col["Edema"]].any()

    # CheXpert: "Pleural Effusion" read as Effusion, with its own (policy) mask; COVID-19 and Nodule missing
    kept = [r for r in CHEX_ROWS if r[1] == "Frontal" and r[2] in ("PA", "AP")]
    for label, column in (("Effusion", "Pleural Effusion"), ("Edema", "Edema"), ("Cardiomegaly", "Cardiomegaly")):
        labels, given = _expected_chex(kept, column, uncertain="missing", blank="missing")
        np.testing.assert_array_equal(out.labels[a:b, col[label]], labels, err_msg=label)
        np.testing.assert_array_equal(out.mask[a:b, col[label]], given, err_msg=label)
    assert not out.mask[a:b, col["COVID-19"]].any() and not out.mask[a:b, col["Nodule"]].any()

    # COVIDx: only COVID-19 given
    np.testing.assert_array_equal(out.labels[b:, col["COVID-19"]], [float(x[2] == "positive") for x in COVIDX_LINES])
    assert out.mask[b:, col["COVID-19"]].all() and not out.mask[b:, 1:].any()
    assert (out.labels[~out.mask] == 0).all()

    union = assemble([nih, chex, covid], protocols=protocols)
    assert union.label_names == ("Effusion", "Cardiomegaly", "Nodule", "COVID-19", "Edema")


def test_assemble_without_protocols_keeps_each_table_own_labels():
    t1 = _table(2, names=("a", "b"), source="one")
    t1.labels[0, 0] = 1.0
    t1.mask[1, 1] = False
    t2 = _table(3, names=("b", "c"), source="two")
    t2.labels[2, 1] = 1.0
    out = assemble([t1, t2])
    assert out.label_names == ("a", "b", "c")
    expected_mask = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 1, 1], [0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(out.mask, expected_mask)
    expected_labels = np.zeros((5, 3), dtype=np.float32)
    expected_labels[0, 0] = 1.0
    expected_labels[4, 2] = 1.0
    np.testing.assert_array_equal(out.labels, expected_labels)
    only_c = assemble([t1, t2], label_names=("c",))
    np.testing.assert_array_equal(only_c.mask[:, 0], [False, False, True, True, True])


def test_assemble_rejects_inconsistent_protocols_and_data():
    t = _table(2, names=("a", "b"), source="s")
    with pytest.raises(ValueError, match="source 's' has no protocol"):
        assemble([t], protocols=[SourceProtocol("other", ("a",))])
    with pytest.raises(ValueError, match=r"provides \['z'\].*columns are \['a', 'b'\]"):
        assemble([t], protocols=[SourceProtocol("s", ("a", "z"))])
    with pytest.raises(ValueError, match="columns 'a' and 'b' both map to 'a'"):
        assemble([t], protocols=[SourceProtocol("s", ("a",), aliases={"b": "a"})])
    with pytest.raises(ValueError, match="both provided and implied negative"):
        assemble([t], protocols=[SourceProtocol("s", ("a",), implies_negative=("a",))])
    with pytest.raises(ValueError, match="share this name"):
        assemble([t], protocols=[SourceProtocol("s", ("a",)), SourceProtocol("s", ("b",))])
    t.labels[1, 1] = 1.0
    with pytest.raises(ImageDataError, match=r"1\.png: source 's' implies 'b' negative"):
        assemble([t], protocols=[SourceProtocol("s", ("a",), implies_negative=("b",))])
    with pytest.raises(ValueError, match="at least one table"):
        assemble([])


# ----------------------------------------------------------------------------------------------- splits, images


def _patients_table(seed: int) -> LabelTable:
    rng = np.random.default_rng(seed)
    pids, sources = [], []
    for p in range(60):
        for _ in range(int(rng.integers(1, 5))):
            pids.append(str(p % 30))  # ids 0..29 reused by two sources
            sources.append("a" if p < 30 else "b")
    n = len(pids)
    return LabelTable(
        paths=[Path(f"{i}.png") for i in range(n)],
        labels=np.zeros((n, 1)),
        mask=np.ones((n, 1), dtype=bool),
        label_names=("x",),
        patient_ids=pids,
        sources=sources,
    )


@pytest.mark.parametrize("seed", range(6))
def test_split_by_patient_is_disjoint_complete_and_deterministic(seed):
    table = _patients_table(seed)
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    splits = split_by_patient(table, fractions=fractions, seed=seed)
    assert list(splits) == list(fractions)
    rows = np.concatenate(list(splits.values()))
    assert sorted(rows.tolist()) == list(range(len(table)))
    owner = {}
    for name, idx in splits.items():
        assert (np.diff(idx) > 0).all()
        for i in idx:
            key = (table.sources[i], table.patient_ids[i])
            assert owner.setdefault(key, name) == name, key
    for name, frac in fractions.items():  # sizes follow the fractions up to a patient's rows (at most 4)
        assert abs(len(splits[name]) - frac * len(table)) <= 4
    again = split_by_patient(table, fractions=fractions, seed=seed)
    assert all(np.array_equal(again[k], splits[k]) for k in fractions)
    other = split_by_patient(table, fractions=fractions, seed=seed + 100)
    assert any(not np.array_equal(other[k], splits[k]) for k in fractions)


def test_split_by_patient_arguments():
    table = _patients_table(0)
    zero = split_by_patient(table, fractions={"train": 1.0, "val": 0.0}, seed=0)
    assert len(zero["train"]) == len(table) and len(zero["val"]) == 0
    for bad in ({"a": 0.5, "b": 0.4}, {"a": 1.2, "b": -0.2}, {}, {"a": float("nan")}):
        with pytest.raises(ValueError, match="fractions"):
            split_by_patient(table, fractions=bad, seed=0)
    empty = split_by_patient(table.subset([]), fractions={"a": 0.5, "b": 0.5}, seed=0)
    assert all(len(v) == 0 for v in empty.values())


def test_load_table_images_shape_values_and_bad_file(tmp_path):
    root = _nih(tmp_path / "nih")
    t = scan_chestxray14(root)
    images = load_table_images(t, size=4)
    assert images.shape == (len(NIH_ROWS), 1, 4, 4) and images.dtype == np.float32
    for i in range(len(NIH_ROWS)):  # _nih writes uniform images of value 10 * (i + 1)
        np.testing.assert_allclose(images[i], 10 * (i + 1) / 255.0, atol=1e-6)
    t.paths[3].write_bytes(b"not a png")
    with pytest.raises(ImageDataError, match=r"00000003_000\.png.*row 3"):
        load_table_images(t, size=4)
    with pytest.raises(ValueError, match="size"):
        load_table_images(t, size=0)
