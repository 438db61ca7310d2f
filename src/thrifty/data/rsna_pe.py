"""Real-format loaders for the full-scale PE CAD path (arXiv 2109.07029): RSNA-STR PE CTPA exams.

Nothing is downloaded: the functions read files already on disk.

* :func:`load_exam` reads one CTPA series (a folder of single-slice DICOM files, or a list of them) into a
  ``(S, H, W)`` array in Hounsfield units plus :class:`ExamMeta` (z positions, spacing and ``SOPInstanceUID``
  in slice order). It is :func:`thrifty.data.volumes.read_dicom_series` with the PE recipe's rules: slices
  sorted by ``ImagePositionPatient[2]`` (``InstanceNumber`` with a warning when positions are missing),
  ``RescaleSlope``/``RescaleIntercept`` applied, consistent rows/columns/``PixelSpacing`` required, and a gap
  between neighbouring slices larger than ``max_gap_ratio`` (1.5) times the median gap refused as a missing
  slice (smaller unevenness is accepted with a warning).
* :func:`scan_rsna` reads the RSNA-STR ``train.csv`` (one row per slice; the nine exam labels repeated on every
  row, checked to agree within an exam) into one :class:`ExamRecord` per exam, with the slice files found
  through a configurable ``layout`` (default ``{study}/{series}/{sop}.dcm``). :func:`load_rsna_exam` loads a
  record and aligns its per-slice ``pe_present_on_image`` with the loaded (z-sorted) slices.
* :func:`split_studies`, :func:`write_manifest`, :func:`read_manifest` and :func:`check_disjoint` make and check
  study-level split manifests (train/val/test disjoint by ``StudyInstanceUID``).

**Unverified:** the file layout (``StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID.dcm``) and the CSV column
names (:data:`RSNA_COLUMNS`) follow the method card's description of the Kaggle RSNA-STR PE release and the
common Kaggle kernels; they were not checked against the archive here, so both are configurable.

Every data problem raises :class:`ExamDataError` (a :class:`~thrifty.data.volumes.VolumeError`, hence a
``ValueError``) whose message names the offending file (and CSV line, study or column). Pixel data in a
compressed transfer syntax that no installed decoder handles (JPEG lossless / JPEG-LS / JPEG 2000 need
``pylibjpeg`` with ``pylibjpeg-libjpeg`` / ``pylibjpeg-openjpeg``, or ``python-gdcm``) raises it too, naming the
file and the package to install.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from thrifty.data.images import ImageDataError, _csv_rows
from thrifty.data.volumes import VolumeError, read_dicom_series

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# The nine exam-level labels, in the order of the exam heads (negative, indeterminate, left, right, central,
# RV/LV >= 1, RV/LV < 1, chronic, acute-and-chronic).
RSNA_EXAM_LABELS = (
    "negative_exam_for_pe",
    "indeterminate",
    "leftsided_pe",
    "rightsided_pe",
    "central_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "chronic_pe",
    "acute_and_chronic_pe",
)
# Columns of train.csv that exist but are not used (quality flags); listed so that they can be renamed too.
RSNA_IGNORED_COLUMNS = ("qa_motion", "qa_contrast", "flow_artifact", "true_filling_defect_not_pe")

# Role -> CSV column name. "study", "series", "sop" are the three ids; the rest are the label columns named as
# in the (unverified) Kaggle train.csv. Pass a partial mapping as scan_rsna(columns=...) to rename some.
RSNA_COLUMNS: Mapping[str, str] = MappingProxyType(
    {
        "study": "StudyInstanceUID",
        "series": "SeriesInstanceUID",
        "sop": "SOPInstanceUID",
        "pe_present_on_image": "pe_present_on_image",
        **{name: name for name in RSNA_EXAM_LABELS},
        **{name: name for name in RSNA_IGNORED_COLUMNS},
    }
)

SPLIT_NAMES = ("train", "val", "test")
_LAYOUT_FIELDS = {"study", "series", "sop"}
_EXAM_DTYPES = ("float32", "int16")


class ExamDataError(VolumeError):
    """A CTPA exam, RSNA label CSV or split manifest is missing or malformed; the message names the file."""


# ------------------------------------------------------------------------------------------------- one exam


@dataclasses.dataclass
class ExamMeta:
    """What :func:`load_exam` knows about the slices it stacked, all in volume (ascending z) order.

    Attributes:
        source: the folder (or the first file) the exam was read from.
        files: slice files.
        z_positions: ``ImagePositionPatient[2]`` of each slice in mm (ascending), or ``None`` when the slices had
            no positions and were ordered by ``InstanceNumber``.
        sop_instance_uids: each slice's ``SOPInstanceUID`` (``""`` where the header has none).
        spacing: (slice gap, row spacing, column spacing) in mm; the slice gap is the median gap.
        origin: (z, y, x) world position in mm of the first slice's first pixel.
        study_instance_uid: ``StudyInstanceUID`` of the series (``""`` if absent).
        series_instance_uid: ``SeriesInstanceUID`` of the series (``""`` if absent).
        ordered_by: ``"position"``, ``"instance_number"`` or ``"single"``.
    """

    source: Path
    files: list[Path]
    z_positions: np.ndarray | None
    sop_instance_uids: list[str]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    study_instance_uid: str
    series_instance_uid: str
    ordered_by: str

    @property
    def num_slices(self) -> int:
        return len(self.files)


def load_exam(
    source: PathLike | Sequence[PathLike],
    *,
    dtype: str = "float32",
    series_uid: str | None = None,
    sort_by: str = "z",
    max_gap_ratio: float = 1.5,
) -> tuple[np.ndarray, ExamMeta]:
    """Read one CTPA series into ``(volume, meta)``: ``volume`` is ``(S, H, W)`` in HU, slices in ascending z.

    Args:
        source: a folder holding the series' slice files (every non-hidden file must be DICOM), one file, or a
            list of files (e.g. :attr:`ExamRecord.files`).
        dtype: ``"float32"`` (exact ``stored * RescaleSlope + RescaleIntercept``) or ``"int16"`` (rounded and
            clipped to the int16 range; half the memory, exact for integer slope and intercept).
        series_uid: keep only this ``SeriesInstanceUID`` (files of several series are otherwise an error).
        sort_by: ``"z"`` (default, the recipe's rule: ``ImagePositionPatient[2]``) or ``"normal"`` (position
            along the slice normal from ``ImageOrientationPatient``). Slices without positions fall back to
            ``InstanceNumber`` with a warning.
        max_gap_ratio: a gap between neighbouring slice positions larger than this times the median gap is a
            missing slice and raises, naming the files and positions around it.

    Raises:
        ExamDataError: naming the file, for an empty folder, a non-DICOM file, a slice without pixel data, pixel
            data that cannot be decoded (naming the optional decoder package), slices of different shape or
            ``PixelSpacing``, duplicate positions, or a missing slice.
    """
    if dtype not in _EXAM_DTYPES:
        raise ValueError(f"dtype must be one of {_EXAM_DTYPES}, got {dtype!r}")
    try:
        series = read_dicom_series(
            source, series_uid=series_uid, allow_uneven_spacing=True, sort_by=sort_by, max_gap_ratio=max_gap_ratio
        )
    except VolumeError as err:
        raise ExamDataError(str(err)) from None
    vol = series.volume
    array = vol.array
    if dtype == "int16":
        info = np.iinfo(np.int16)
        array = np.clip(np.rint(array), info.min, info.max).astype(np.int16)
    ipp = series.image_positions
    z = None if series.ordered_by == "instance_number" or ipp is None else ipp[:, 2].copy()
    meta = ExamMeta(
        source=Path(vol.path) if vol.path is not None else series.files[0],
        files=series.files,
        z_positions=z,
        sop_instance_uids=series.sop_instance_uids,
        spacing=vol.spacing,
        origin=vol.origin,
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        ordered_by=series.ordered_by,
    )
    return array, meta


# ------------------------------------------------------------------------------------------------ RSNA CSV


@dataclasses.dataclass
class ExamRecord:
    """One RSNA-STR exam (one series of one study) as listed in ``train.csv``.

    Attributes:
        study: ``StudyInstanceUID``.
        series: ``SeriesInstanceUID``.
        sop_instance_uids: the slices' ``SOPInstanceUID``, in CSV order, or in ``ImagePositionPatient[2]`` order
            when :func:`scan_rsna` was called with ``sort_slices=True`` (see :attr:`z_sorted`).
        files: the slice files (same order).
        pe_present_on_image: ``uint8`` ``(S,)`` per-slice PE flag (same order); ``None`` for unlabelled exams.
        labels: the nine exam labels (:data:`RSNA_EXAM_LABELS` -> 0/1); ``None`` for unlabelled exams.
        z_sorted: whether the slices are in ascending ``ImagePositionPatient[2]`` order.
    """

    study: str
    series: str
    sop_instance_uids: list[str]
    files: list[Path]
    pe_present_on_image: np.ndarray | None = None
    labels: dict[str, int] | None = None
    z_sorted: bool = False

    @property
    def num_slices(self) -> int:
        return len(self.files)

    def label_vector(self) -> np.ndarray:
        """The nine exam labels as ``float32`` ``(9,)`` in :data:`RSNA_EXAM_LABELS` order."""
        if self.labels is None:
            raise ValueError(f"exam {self.study}/{self.series} has no labels (scanned with labelled=False)")
        return np.array([self.labels[name] for name in RSNA_EXAM_LABELS], dtype=np.float32)

    def image_labels_for(self, files: Sequence[PathLike]) -> np.ndarray:
        """``pe_present_on_image`` re-ordered to match ``files`` (e.g. :attr:`ExamMeta.files` of the loaded exam).

        Every file must be one of this record's; a file the CSV does not list raises :class:`ExamDataError`.
        """
        if self.pe_present_on_image is None:
            raise ValueError(f"exam {self.study}/{self.series} has no labels (scanned with labelled=False)")
        index = {Path(f): i for i, f in enumerate(self.files)}
        out = np.empty(len(files), dtype=np.uint8)
        for k, f in enumerate(files):
            i = index.get(Path(f))
            if i is None:
                raise ExamDataError(f"{f}: not a slice of study {self.study} series {self.series} in the label CSV")
            out[k] = self.pe_present_on_image[i]
        return out


def write_ct_series(
    volume_hu: np.ndarray,
    folder: PathLike,
    *,
    positions: Sequence[float],
    spacing: Sequence[float],
    study_uid: str,
    series_uid: str | None = None,
    name: Callable[[int, str], str] | None = None,
) -> list[Path]:
    """Write an exam as a CT Image Storage series that :func:`load_exam` (and any DICOM reader) reads back.

    ``volume_hu`` is (S, H, W) in HU with slice ``k`` at z = ``positions[k]`` mm; ``spacing`` is (z, y, x) mm.
    Pixels are stored as int16 ``HU + 1024`` with slope 1 / intercept -1024, explicit-VR little endian; slice ``k``
    has SOP instance UID ``<series_uid>.<k + 1>``, instance number ``k + 1`` and goes to ``folder / name(k, sop)``
    (default ``"{k:04d}.dcm"``; a name may hold sub-folders). Returns the files in ascending z. Used to export the
    synthetic exams for ``thrifty score pe_cad`` and by the tests.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    vol = np.asarray(volume_hu)
    if vol.ndim != 3 or len(positions) != vol.shape[0]:
        raise ValueError(f"expected an (S, H, W) volume and S positions, got {vol.shape} and {len(positions)}")
    series = series_uid or f"{study_uid}.1"
    stored = np.clip(np.rint(vol.astype(np.float64)) + 1024, -32768, 32767).astype("<i2")
    name = name or (lambda k, sop: f"{k:04d}.dcm")
    modern = int(pydicom.__version__.split(".")[0]) >= 3
    paths = []
    for k in range(vol.shape[0]):
        sop = f"{series}.{k + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series, "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(positions[k])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = vol.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = Path(folder) / name(k, sop)
        path.parent.mkdir(parents=True, exist_ok=True)
        if modern:
            ds.save_as(path, enforce_file_format=True)
        else:  # pydicom 2.x takes the encoding from the dataset
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


def _check_layout(layout: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(layout) if f is not None}
    except ValueError as exc:
        raise ValueError(f"layout is not a valid format string: {layout!r} ({exc})") from None
    unknown = fields - _LAYOUT_FIELDS
    if unknown or "sop" not in fields:
        raise ValueError(
            f"layout may use only the fields {{study}}, {{series}}, {{sop}} and must use {{sop}}, got {layout!r}"
        )


def _columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(RSNA_COLUMNS)
    if columns:
        unknown = sorted(set(columns) - set(RSNA_COLUMNS))
        if unknown:
            raise ValueError(f"columns: unknown role(s) {unknown}; known roles: {sorted(RSNA_COLUMNS)}")
        merged.update(columns)
    return merged


def _flag(text: str, *, csv_path: Path, line: int, column: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise ExamDataError(f"{csv_path}:{line}: column {column!r} has {text!r}; expected 0 or 1 (or 0.0/1.0)")
    return int(value)


@dataclasses.dataclass
class _Exam:
    sops: list[str] = dataclasses.field(default_factory=list)
    lines: list[int] = dataclasses.field(default_factory=list)
    pe: list[int] = dataclasses.field(default_factory=list)
    labels: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # name -> (value, first line)


def scan_rsna(
    root: PathLike,
    labels_csv: PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    layout: str = "{study}/{series}/{sop}.dcm",
    labelled: bool = True,
    check_files: bool = True,
    sort_slices: bool = False,
) -> list[ExamRecord]:
    """One :class:`ExamRecord` per (study, series) of an RSNA-STR label CSV, sorted by study then series.

    The **layout and column names are unverified** (see the module docstring), hence configurable.

    Args:
        root: the DICOM root (``train/`` of the Kaggle release).
        labels_csv: ``train.csv``: one row per slice with the ids, ``pe_present_on_image`` and the nine exam
            labels repeated on every row (``0``/``1``; ``0.0``/``1.0`` accepted). A UTF-8 BOM, extra columns
            and the ignored quality columns (:data:`RSNA_IGNORED_COLUMNS`) are fine.
        columns: role -> column name overrides merged into :data:`RSNA_COLUMNS` (e.g.
            ``{"study": "study_uid"}``); roles are ``study``, ``series``, ``sop``, ``pe_present_on_image``, the
            nine exam labels and the ignored quality flags.
        layout: slice file path under ``root`` with the fields ``{study}``, ``{series}`` and ``{sop}``.
        labelled: ``False`` reads only the three id columns (the release's ``test.csv``); the records then have
            no labels.
        check_files: require every slice file to exist.
        sort_slices: read each slice's header (no pixels) and order the record's slices by
            ``ImagePositionPatient[2]``; otherwise they stay in CSV order (:func:`load_rsna_exam` sorts anyway).

    Raises:
        ExamDataError: naming the CSV (and line) for a missing column, a blank id, a SOP listed twice, a cell
            that is not 0/1, exam labels that differ between rows of one exam (naming the study and column), or
            a CSV without data rows; naming the file for a missing slice file (with ``check_files``).
    """
    _check_layout(layout)
    cols = _columns(columns)
    root, labels_csv = Path(root), Path(labels_csv)
    what = "RSNA label CSV"
    if not root.is_dir():
        raise ExamDataError(f"{root}: the RSNA DICOM root {'is not a folder' if root.exists() else 'does not exist'}")
    if not labels_csv.is_file():
        raise ExamDataError(f"{labels_csv}: the {what} {'is a folder' if labels_csv.exists() else 'does not exist'}")
    required = {"study id": cols["study"], "series id": cols["series"], "slice id": cols["sop"]}
    label_roles = ("pe_present_on_image", *RSNA_EXAM_LABELS) if labelled else ()
    required.update({role: cols[role] for role in label_roles})

    exams: dict[tuple[str, str], _Exam] = {}
    seen_sop: dict[str, int] = {}
    try:
        for line, row in _csv_rows(labels_csv, required, what):
            study, series, sop = row[cols["study"]], row[cols["series"]], row[cols["sop"]]
            for role, value in (("study", study), ("series", series), ("sop", sop)):
                if not value:
                    raise ExamDataError(f"{labels_csv}:{line}: empty {cols[role]!r}")
            if sop in seen_sop:
                raise ExamDataError(
                    f"{labels_csv}:{line}: {cols['sop']} {sop!r} is listed twice (first at line {seen_sop[sop]})"
                )
            seen_sop[sop] = line
            exam = exams.setdefault((study, series), _Exam())
            exam.sops.append(sop)
            exam.lines.append(line)
            if not labelled:
                continue
            col = cols["pe_present_on_image"]
            exam.pe.append(_flag(row[col], csv_path=labels_csv, line=line, column=col))
            for name in RSNA_EXAM_LABELS:
                col = cols[name]
                value = _flag(row[col], csv_path=labels_csv, line=line, column=col)
                first = exam.labels.setdefault(name, (value, line))
                if first[0] != value:
                    raise ExamDataError(
                        f"{labels_csv}:{line}: study {study} (series {series}) has {col}={value} here but "
                        f"{col}={first[0]} at line {first[1]}; exam labels must agree on every row of an exam"
                    )
    except ImageDataError as err:  # the shared CSV reader's errors (missing column, short row, not UTF-8)
        raise ExamDataError(str(err)) from None
    if not exams:
        raise ExamDataError(f"{labels_csv}: the {what} has a header but no data rows")

    records = []
    for (study, series), exam in sorted(exams.items()):
        files = [root / layout.format(study=study, series=series, sop=sop) for sop in exam.sops]
        if check_files:
            for f, line in zip(files, exam.lines, strict=True):
                if not f.is_file():
                    raise ExamDataError(
                        f"{f}: slice file of study {study} (listed at {labels_csv}:{line}) does not exist "
                        f"(layout {layout!r}, which is unverified and configurable)"
                    )
        record = ExamRecord(
            study=study,
            series=series,
            sop_instance_uids=list(exam.sops),
            files=files,
            pe_present_on_image=np.array(exam.pe, dtype=np.uint8) if labelled else None,
            labels={name: exam.labels[name][0] for name in RSNA_EXAM_LABELS} if labelled else None,
        )
        if sort_slices:
            _sort_record(record)
        records.append(record)
    return records


def _sort_record(record: ExamRecord) -> None:
    """Order a record's slices by ``ImagePositionPatient[2]`` read from the headers (no pixel data)."""
    import pydicom

    z = []
    for f in record.files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
            z.append(float(ds.ImagePositionPatient[2]))
        except AttributeError:
            raise ExamDataError(
                f"{f}: no ImagePositionPatient; cannot sort the slices of study {record.study}"
            ) from None
        except Exception as err:
            raise ExamDataError(f"{f}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    order = np.argsort(np.asarray(z), kind="stable")
    record.sop_instance_uids = [record.sop_instance_uids[i] for i in order]
    record.files = [record.files[i] for i in order]
    if record.pe_present_on_image is not None:
        record.pe_present_on_image = record.pe_present_on_image[order]
    record.z_sorted = True


def load_rsna_exam(record: ExamRecord, **kwargs) -> tuple[np.ndarray, ExamMeta, np.ndarray | None]:
    """``(volume, meta, pe_present_on_image)`` of one record: :func:`load_exam` on the record's files (so stray
    files in the folder are ignored), with the per-slice labels aligned to the loaded z order (``None`` for an
    unlabelled record). Keyword arguments go to :func:`load_exam`."""
    volume, meta = load_exam(record.files, **kwargs)
    labels = None if record.pe_present_on_image is None else record.image_labels_for(meta.files)
    return volume, meta, labels


# ------------------------------------------------------------------------------------------ split manifests


def split_studies(
    study_ids: Iterable[str],
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    names: Sequence[str] = SPLIT_NAMES,
) -> dict[str, list[str]]:
    """Deterministic study-level split: ``{name: sorted study ids}``, disjoint by study.

    Repeated ids (e.g. one per slice) count once. The result depends only on the set of ids, ``fractions`` and
    ``seed`` (not on the input order): the sorted unique ids are permuted by ``numpy.random.default_rng(seed)``
    and cut into consecutive blocks whose sizes are the fractions rounded by largest remainder; every split with
    a positive fraction gets at least one study when there are enough studies.
    """
    fractions = [float(f) for f in fractions]
    names = list(names)
    if len(fractions) != len(names):
        raise ValueError(f"fractions {fractions} must give one value per split name {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be distinct, got {names}")
    if any(not math.isfinite(f) or f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    unique = sorted({str(s) for s in study_ids})
    if any(not s for s in unique):
        raise ValueError("study ids must be non-empty strings")
    n = len(unique)
    exact = [f * n for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):  # a non-empty split for every positive fraction, if possible
        if f > 0 and counts[i] == 0:
            donor = max(range(len(names)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [unique[i] for i in perm]
    out: dict[str, list[str]] = {}
    start = 0
    for name, count in zip(names, counts, strict=True):
        out[name] = sorted(shuffled[start : start + count])
        start += count
    check_disjoint(out)
    return out


def check_disjoint(splits: Mapping[str, Iterable[str]], *, source: PathLike | None = None) -> None:
    """Raise :class:`ExamDataError` if a study is in two splits (or twice in one), naming it and the splits."""
    where = f"{source}: " if source is not None else ""
    owner: dict[str, str] = {}
    for name, studies in splits.items():
        for study in studies:
            if study in owner:
                if owner[study] == name:
                    raise ExamDataError(f"{where}study {study!r} is listed twice in split {name!r}")
                raise ExamDataError(
                    f"{where}study {study!r} is in both split {owner[study]!r} and split {name!r} (leak across splits)"
                )
            owner[study] = name


def _check_names(splits: Mapping[str, object], names: Sequence[str], source: PathLike | None) -> None:
    unknown = [n for n in splits if n not in names]
    if unknown:
        where = f"{source}: " if source is not None else ""
        raise ExamDataError(f"{where}unknown split name(s) {unknown}; expected {list(names)}")


def write_manifest(path: PathLike, splits: Mapping[str, Iterable[str]], *, names: Sequence[str] = SPLIT_NAMES) -> Path:
    """Write a split manifest: ``.json`` (``{split: [study, ...]}``) or ``.csv`` (``study,split`` rows).

    Refuses (``ExamDataError``) unknown split names and a study in two splits. Returns the path.
    """
    path = Path(path)
    splits = {name: [str(s) for s in studies] for name, studies in splits.items()}
    _check_names(splits, names, None)
    check_disjoint(splits)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"{path}: manifest must be .json or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {name: splits.get(name, []) for name in names if name in splits}
    if suffix == ".json":
        path.write_text(json.dumps(ordered, indent=1) + "\n", encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["study", "split"])
            for name, studies in ordered.items():
                writer.writerows([study, name] for study in studies)
    return path


def read_manifest(path: PathLike, *, names: Sequence[str] = SPLIT_NAMES) -> dict[str, list[str]]:
    """Read a manifest written by :func:`write_manifest` (or by hand): ``{split: [study, ...]}``, every name in
    ``names`` present (empty where the file lists none), studies in file order.

    Raises :class:`ExamDataError` naming the file for an unreadable file, an unknown split name, a blank study,
    or a study in two splits (or twice in one).
    """
    path = Path(path)
    if not path.is_file():
        raise ExamDataError(f"{path}: split manifest does not exist")
    suffix = path.suffix.lower()
    splits: dict[str, list[str]] = {}
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExamDataError(f"{path}: split manifest is not valid JSON ({err})") from None
        if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
        ):
            raise ExamDataError(f"{path}: split manifest must be a JSON object of split name -> list of study ids")
        splits = {str(k): list(v) for k, v in data.items()}
        if any(not s.strip() for v in splits.values() for s in v):
            raise ExamDataError(f"{path}: split manifest holds a blank study id")
    elif suffix == ".csv":
        try:
            for line, row in _csv_rows(path, {"study id": "study", "split name": "split"}, "split manifest"):
                if not row["study"]:
                    raise ExamDataError(f"{path}:{line}: blank study id")
                splits.setdefault(row["split"], []).append(row["study"])
        except ImageDataError as err:
            raise ExamDataError(str(err)) from None
    else:
        raise ExamDataError(f"{path}: split manifest must be .json or .csv")
    _check_names(splits, names, path)
    check_disjoint(splits, source=path)
    return {name: splits.get(name, []) for name in names}
