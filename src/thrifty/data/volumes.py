"""Real-format CT volume loaders for Models Genesis (Zhou et al., MedIA 2021, arXiv 2004.07882) at full scale.

Nothing is downloaded: every function reads files that are already on disk.

* :func:`load_nifti` reads ``.nii`` / ``.nii.gz`` through nibabel (scaling ``scl_slope``/``scl_inter`` applied).
* :func:`load_dicom_series` reads the slices of one DICOM series through pydicom, orders them along the slice
  normal (``ImagePositionPatient`` projected on the cross product of the ``ImageOrientationPatient`` cosines;
  ``sort_by="z"``: ``ImagePositionPatient[2]``; ``InstanceNumber`` when positions are missing) and applies
  ``RescaleSlope``/``RescaleIntercept`` per slice. :func:`read_dicom_series` does the same and also returns
  the per-slice files, positions and ``SOPInstanceUID`` in volume order (:class:`DicomSeries`). Pixel data in a
  compressed transfer syntax that no installed decoder handles raises :class:`VolumeError` naming the file and
  the optional package(s) to install (pylibjpeg plugins or python-gdcm).
* :func:`load_metaimage` is thrifty's own MetaImage (``.mhd`` + ``.raw``, or ``.mha``/``LOCAL``) reader, the
  format of LUNA16: 2-D/3-D scalar images of ``MET_CHAR``/``MET_UCHAR``/``MET_SHORT``/``MET_USHORT``/``MET_INT``/
  ``MET_UINT``/``MET_LONG_LONG``/``MET_ULONG_LONG``/``MET_FLOAT``/``MET_DOUBLE``, either byte order, raw or
  zlib-compressed (``CompressedData = True``).
* :func:`load_volume` dispatches on the path (``.nii``, ``.nii.gz``, ``.mhd``, ``.mha``, ``.dcm``, or a
  directory of DICOM files); :func:`clip_and_normalize` is the Models Genesis intensity preprocessing
  (clip Hounsfield units to [-1000, 1000] and map linearly to [0, 1]).

Every loader returns a :class:`Volume` whose array is ``float32`` with axes **(z, y, x)** (slowest to fastest:
slice, row, column) — the array order of SimpleITK's ``GetArrayFromImage`` — and whose ``spacing`` and
``origin`` are given in the same (z, y, x) order, in mm (world coordinates as the format defines them: LPS
for DICOM and LUNA16's MetaImage, RAS for NIfTI). No reorientation is done unless asked for
(``load_nifti(..., canonical=True)``): the axes follow the stored voxel axes. A world coordinate (x, y, z), e.g.
a LUNA16 candidate, maps to the voxel index ``(world[::-1] - origin) / spacing`` for the usual identity
direction matrices.

Every data problem raises :class:`VolumeError` (a ``ValueError``) whose message names the offending file and
says what is wrong. A missing optional reader package (nibabel, pydicom) raises ``ImportError`` naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

HU_AIR = -1000.0
HU_BONE = 1000.0

METAIMAGE_TYPES: dict[str, str] = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_METAIMAGE_SUFFIXES = (".mhd", ".mha")
_DICOM_SUFFIXES = (".dcm", ".dicom")

DICOM_SORT_KEYS = ("normal", "z")

# Compressed transfer syntaxes -> the optional decoders pydicom can use for them (a hint for the error message).
_PYLIBJPEG_LIBJPEG = "`pip install pylibjpeg pylibjpeg-libjpeg`"
_PYLIBJPEG_OPENJPEG = "`pip install pylibjpeg pylibjpeg-openjpeg`"
_GDCM = "`pip install python-gdcm`"
_DICOM_DECODERS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": f"Pillow, {_PYLIBJPEG_LIBJPEG} or {_GDCM}",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": f"Pillow, {_PYLIBJPEG_LIBJPEG} or {_GDCM}",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": f"{_PYLIBJPEG_LIBJPEG} or {_GDCM}",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": f"{_PYLIBJPEG_LIBJPEG} or {_GDCM}",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": f"{_PYLIBJPEG_LIBJPEG}, `pip install pyjpegls` or {_GDCM}",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": f"{_PYLIBJPEG_LIBJPEG}, `pip install pyjpegls` or {_GDCM}",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": f"{_PYLIBJPEG_OPENJPEG}, Pillow with OpenJPEG or {_GDCM}",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": f"{_PYLIBJPEG_OPENJPEG}, Pillow with OpenJPEG or {_GDCM}",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _PYLIBJPEG_OPENJPEG,  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": _PYLIBJPEG_OPENJPEG,  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": _PYLIBJPEG_OPENJPEG,  # HTJ2K
}


class VolumeError(ValueError):
    """A volume file or series is missing or malformed; the message names the file and says what is wrong."""


@dataclasses.dataclass
class Volume:
    """A CT volume.

    Attributes:
        array: ``float32`` intensities (Hounsfield units for CT), shape (Z, Y, X).
        spacing: voxel size (z, y, x) in mm.
        origin: world position (z, y, x) in mm of voxel (0, 0, 0) (MetaImage ``Offset``, NIfTI affine
            translation, DICOM ``ImagePositionPatient`` of the first slice), reversed from the files' (x, y, z).
        path: the file or directory it was read from.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.array = np.ascontiguousarray(self.array, dtype=np.float32)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3-D (z, y, x), got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"Volume spacing must be 3 positive finite numbers (z, y, x), got {self.spacing}")
        if len(self.origin) != 3:
            raise ValueError(f"Volume origin must be 3 numbers (z, y, x), got {self.origin}")
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        return tuple(self.array.shape)  # type: ignore[return-value]


def _require(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the '{module}' package, which is not installed: `pip install {module}` "
            "(or `pip install thrifty[medical]`)"
        ) from err


def clip_and_normalize(hu: Any, *, low: float = HU_AIR, high: float = HU_BONE) -> np.ndarray:
    """Models Genesis intensity preprocessing: clip to [low, high] HU and map linearly to [0, 1] (``float32``).

    Any shape; ``low`` maps to 0 and ``high`` to 1. NaN stays NaN.
    """
    if not high > low:
        raise ValueError(f"clip_and_normalize needs high > low, got low={low}, high={high}")
    arr = np.asarray(hu, dtype=np.float32)
    out = (np.clip(arr, low, high) - np.float32(low)) / np.float32(high - low)
    return out.astype(np.float32, copy=False)


def load_volume(path: PathLike, **kwargs: Any) -> Volume:
    """Load a volume by its path: ``.nii``/``.nii.gz`` (NIfTI), ``.mhd``/``.mha`` (MetaImage), a directory of
    DICOM files or one ``.dcm`` file. Keyword arguments go to the chosen loader."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: does not exist")
    if path.is_dir():
        return load_dicom_series(path, **kwargs)
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return load_nifti(path, **kwargs)
    if name.endswith(_METAIMAGE_SUFFIXES):
        return load_metaimage(path, **kwargs)
    if name.endswith(_DICOM_SUFFIXES):
        return load_dicom_series([path], **kwargs)
    raise VolumeError(
        f"{path}: unknown volume format (expected .nii, .nii.gz, .mhd, .mha, .dcm or a directory of DICOM files)"
    )


# ------------------------------------------------------------------------------------------------------ NIfTI


def load_nifti(path: PathLike, *, canonical: bool = False) -> Volume:
    """Read a NIfTI-1/2 file (``.nii`` or ``.nii.gz``) with nibabel.

    The stored array (i, j, k) is transposed to (k, j, i) = (z, y, x); ``spacing`` is the header's zooms
    reversed and ``origin`` the affine's translation reversed. ``canonical=True`` first reorients the image to
    the closest RAS+ orientation (nibabel's ``as_closest_canonical``). 4-D images must have one volume.
    """
    nib = _require("nibabel", "reading NIfTI")
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: NIfTI file does not exist")
    try:
        img = nib.load(str(path))
        if canonical:
            img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in img.header.get_zooms())
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises many types for truncated / garbage files
        raise VolumeError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
        zooms = (*zooms[:2], 1.0)
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D NIfTI image, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise VolumeError(f"{path}: the image contains NaN or infinite values")
    spacing = zooms[:3]
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise VolumeError(f"{path}: invalid voxel sizes (pixdim) {spacing}")
    return Volume(
        array=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=tuple(reversed(spacing)),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in affine[:3, 3][::-1]),  # type: ignore[arg-type]
        path=path,
    )


# ------------------------------------------------------------------------------------------------------ DICOM


@dataclasses.dataclass
class _Slice:
    path: Path
    ds: Any
    position: float | None = None


@dataclasses.dataclass
class DicomSeries:
    """One DICOM series read by :func:`read_dicom_series`: the volume and, in its slice order, per-slice facts.

    Attributes:
        volume: the :class:`Volume` (HU, (z, y, x)); the same as :func:`load_dicom_series` returns.
        files: slice files in volume order.
        positions: each slice's position in mm along the sort axis (the slice normal, or z for ``sort_by="z"``),
            ascending; ``None`` when the slices were ordered by ``InstanceNumber`` (no positions).
        image_positions: each slice's ``ImagePositionPatient`` (x, y, z) in mm, shape (Z, 3), in volume order;
            ``None`` unless every slice has one.
        sop_instance_uids: each slice's ``SOPInstanceUID`` (``""`` where absent), in volume order.
        instance_numbers: each slice's ``InstanceNumber`` (``None`` where absent), in volume order.
        series_instance_uid: the series' ``SeriesInstanceUID`` (``""`` where absent).
        study_instance_uid: the first slice's ``StudyInstanceUID`` (``""`` where absent).
        ordered_by: ``"position"``, ``"instance_number"`` or ``"single"`` (one slice).
    """

    volume: Volume
    files: list[Path]
    positions: np.ndarray | None
    image_positions: np.ndarray | None
    sop_instance_uids: list[str]
    instance_numbers: list[int | None]
    series_instance_uid: str
    study_instance_uid: str
    ordered_by: str


def _dicom_files(source: PathLike | Sequence[PathLike]) -> tuple[list[Path], Path]:
    """The files of a series and a name for it (the directory, or the first file)."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise VolumeError(f"{root}: the DICOM directory holds no files")
            return files, root
        files = [root]
    else:
        files = [Path(p) for p in source]
        if not files:
            raise VolumeError("load_dicom_series got an empty list of files")
    for f in files:
        if not f.is_file():
            raise VolumeError(f"{f}: DICOM file does not exist")
    return files, (files[0].parent if len(files) > 1 else files[0])


def _floats(value: Any, n: int, *, what: str, path: Path) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise VolumeError(f"{path}: {what} is not a list of numbers: {value!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise VolumeError(f"{path}: {what} must hold {n} finite numbers, got {value!r}")
    return out


def load_dicom_series(
    source: PathLike | Sequence[PathLike],
    *,
    series_uid: str | None = None,
    allow_uneven_spacing: bool = False,
    sort_by: str = "normal",
    max_gap_ratio: float | None = None,
) -> Volume:
    """Read one DICOM series (a directory of slice files, or a list of files) into a volume in HU.

    Every non-hidden regular file of the directory must be DICOM (a stray file raises :class:`VolumeError`
    naming it). Slices are ordered along the slice normal by ``ImagePositionPatient`` when every slice has it
    and ``ImageOrientationPatient`` (else by ``InstanceNumber``); each slice's pixels become
    ``pixel * RescaleSlope + RescaleIntercept``.

    Args:
        source: a directory, one file, or a list of files.
        series_uid: keep only this ``SeriesInstanceUID`` (otherwise files of several series are an error).
        allow_uneven_spacing: accept slice gaps that differ by more than 1% (the median gap is used; a missing
            slice otherwise raises).
        sort_by: ``"normal"`` (default): position along the slice normal, which needs ``ImagePositionPatient``
            and ``ImageOrientationPatient`` on every slice; ``"z"``: ``ImagePositionPatient[2]`` alone (the
            usual rule for axial CT, e.g. the RSNA-STR PE preprocessing). Either falls back to ``InstanceNumber``
            (with a warning) when a slice lacks what it needs.
        max_gap_ratio: if given, a gap between neighbouring positions larger than ``max_gap_ratio`` times the
            median gap raises :class:`VolumeError` (missing slice; the message names both files and their
            positions), whatever ``allow_uneven_spacing`` says.

    Returns:
        A :class:`Volume` with spacing (slice gap, PixelSpacing row, PixelSpacing column) and the position of
        the first slice as origin. A single slice's z spacing is ``SpacingBetweenSlices`` or ``SliceThickness``.
    """
    return read_dicom_series(
        source,
        series_uid=series_uid,
        allow_uneven_spacing=allow_uneven_spacing,
        sort_by=sort_by,
        max_gap_ratio=max_gap_ratio,
    ).volume


def read_dicom_series(
    source: PathLike | Sequence[PathLike],
    *,
    series_uid: str | None = None,
    allow_uneven_spacing: bool = False,
    sort_by: str = "normal",
    max_gap_ratio: float | None = None,
) -> DicomSeries:
    """:func:`load_dicom_series` plus the per-slice files, positions and UIDs in volume order (:class:`DicomSeries`).

    Same arguments, rules and errors as :func:`load_dicom_series`.
    """
    if sort_by not in DICOM_SORT_KEYS:
        raise ValueError(f"sort_by must be one of {DICOM_SORT_KEYS}, got {sort_by!r}")
    if max_gap_ratio is not None and not (math.isfinite(max_gap_ratio) and max_gap_ratio > 1.0):
        raise ValueError(f"max_gap_ratio must be a finite number > 1 (or None), got {max_gap_ratio!r}")
    pydicom = _require("pydicom", "reading DICOM")
    files, name = _dicom_files(source)

    slices: list[_Slice] = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as err:  # InvalidDicomError, truncated files (EOFError, struct.error, ...)
            raise VolumeError(f"{f}: not a readable DICOM file ({type(err).__name__}: {err})") from None
        if series_uid is not None and str(ds.get("SeriesInstanceUID", "")) != series_uid:
            continue
        slices.append(_Slice(f, ds))
    if not slices:
        raise VolumeError(f"{name}: no slice of series {series_uid}")

    uids: dict[str, Path] = {}
    for s in slices:
        uids.setdefault(str(s.ds.get("SeriesInstanceUID", "")), s.path)
    if len(uids) > 1:
        listed = ", ".join(f"{uid or '<none>'} (e.g. {p.name})" for uid, p in uids.items())
        raise VolumeError(f"{name}: files of {len(uids)} series are mixed ({listed}); pass series_uid= to pick one")

    first = slices[0]
    pixels: list[np.ndarray] = []
    shape: tuple[int, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None
    for s in slices:
        ds = s.ds
        if "PixelData" not in ds:
            raise VolumeError(f"{s.path}: DICOM file has no pixel data")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"{s.path}: multi-frame DICOM images are not supported (one slice per file)")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise VolumeError(f"{s.path}: only single-channel (grayscale) images are supported")
        try:
            arr = np.asarray(ds.pixel_array)
        except Exception as err:
            raise VolumeError(_decode_error(s.path, ds, err)) from None
        if arr.ndim != 2:
            raise VolumeError(f"{s.path}: expected a 2-D slice, got pixel array of shape {arr.shape}")
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise VolumeError(f"{s.path}: slice shape {arr.shape} differs from {shape} of {first.path.name}")
        if "PixelSpacing" not in ds:
            log.warning("%s: no PixelSpacing; using 1 mm", s.path)
        ps = _floats(ds.get("PixelSpacing", (1.0, 1.0)), 2, what="PixelSpacing", path=s.path)
        if pixel_spacing is None:
            pixel_spacing = ps
        elif not np.allclose(ps, pixel_spacing, rtol=1e-4, atol=1e-6):
            raise VolumeError(f"{s.path}: PixelSpacing {ps} differs from {pixel_spacing} of {first.path.name}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        pixels.append(arr.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    assert pixel_spacing is not None

    order, z_spacing = _order_slices(
        slices, name, allow_uneven_spacing=allow_uneven_spacing, sort_by=sort_by, max_gap_ratio=max_gap_ratio
    )
    volume = np.stack([pixels[i] for i in order])
    ipp = slices[order[0]].ds.get("ImagePositionPatient")
    origin = _floats(ipp, 3, what="ImagePositionPatient", path=slices[order[0]].path)[::-1] if ipp else (0.0,) * 3
    ordered = [slices[i] for i in order]
    has_positions = all(s.position is not None for s in ordered)
    return DicomSeries(
        volume=Volume(
            array=volume,
            spacing=(z_spacing, pixel_spacing[0], pixel_spacing[1]),
            origin=origin,  # type: ignore[arg-type]
            path=name,
        ),
        files=[s.path for s in ordered],
        positions=np.array([s.position for s in ordered], dtype=np.float64) if has_positions else None,
        image_positions=(
            np.array(
                [_floats(s.ds.ImagePositionPatient, 3, what="ImagePositionPatient", path=s.path) for s in ordered],
                dtype=np.float64,
            )
            if all("ImagePositionPatient" in s.ds for s in ordered)
            else None
        ),
        sop_instance_uids=[str(s.ds.get("SOPInstanceUID", "") or "") for s in ordered],
        instance_numbers=[_instance_number(s) for s in ordered],
        series_instance_uid=str(first.ds.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=str(first.ds.get("StudyInstanceUID", "") or ""),
        ordered_by="single" if len(ordered) == 1 else "position" if has_positions else "instance_number",
    )


def _instance_number(s: _Slice) -> int | None:
    value = s.ds.get("InstanceNumber")
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _decode_error(path: Path, ds: Any, err: Exception) -> str:
    """The message for pixel data pydicom could not decode, naming the optional decoder packages it needs."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    label = "unknown" if syntax is None else str(syntax)
    name = str(getattr(syntax, "name", "") or "")
    if name and name != label:  # pydicom names an unknown UID by the UID itself
        label = f"{name} {label}"
    msg = f"{path}: cannot decode the pixel data (transfer syntax {label}): {type(err).__name__}: {err}"
    hint = _DICOM_DECODERS.get(str(syntax)) if syntax is not None else None
    if hint:
        msg += f"; this compressed transfer syntax needs an optional decoder package: {hint}"
    return msg


def _order_slices(
    slices: list[_Slice],
    name: Path,
    *,
    allow_uneven_spacing: bool,
    sort_by: str = "normal",
    max_gap_ratio: float | None = None,
) -> tuple[list[int], float]:
    """Slice order (indices into ``slices``) and the slice gap in mm; sets each slice's ``position``."""
    n = len(slices)
    if sort_by == "z" and all("ImagePositionPatient" in s.ds for s in slices):
        for s in slices:
            s.position = _floats(s.ds.ImagePositionPatient, 3, what="ImagePositionPatient", path=s.path)[2]
        return _check_gaps(slices, name, allow_uneven_spacing=allow_uneven_spacing, max_gap_ratio=max_gap_ratio)
    if sort_by == "normal" and all(
        "ImagePositionPatient" in s.ds and "ImageOrientationPatient" in s.ds for s in slices
    ):
        iop = _floats(slices[0].ds.ImageOrientationPatient, 6, what="ImageOrientationPatient", path=slices[0].path)
        for s in slices[1:]:
            other = _floats(s.ds.ImageOrientationPatient, 6, what="ImageOrientationPatient", path=s.path)
            if not np.allclose(other, iop, atol=1e-3):
                raise VolumeError(
                    f"{s.path}: ImageOrientationPatient {other} differs from {iop} of {slices[0].path.name}"
                )
        normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
        if not np.linalg.norm(normal) > 0.5:
            raise VolumeError(f"{slices[0].path}: degenerate ImageOrientationPatient {iop}")
        for s in slices:
            ipp = _floats(s.ds.ImagePositionPatient, 3, what="ImagePositionPatient", path=s.path)
            s.position = float(np.dot(ipp, normal))
        return _check_gaps(slices, name, allow_uneven_spacing=allow_uneven_spacing, max_gap_ratio=max_gap_ratio)
    # no positions: InstanceNumber order and the nominal slice spacing
    if n > 1:
        missing = [s.path for s in slices if "InstanceNumber" not in s.ds]
        if missing:
            raise VolumeError(f"{missing[0]}: cannot order the slices: no ImagePositionPatient and no InstanceNumber")
        numbers = [int(s.ds.InstanceNumber) for s in slices]
        order = sorted(range(n), key=lambda i: numbers[i])
        for a, b in itertools.pairwise(order):
            if numbers[a] == numbers[b]:
                raise VolumeError(f"{slices[b].path}: same InstanceNumber {numbers[a]} as {slices[a].path.name}")
        log.warning("%s: no ImagePositionPatient; slices ordered by InstanceNumber", name)
        return order, _thickness(slices[order[0]])
    return [0], _thickness(slices[0])


def _check_gaps(
    slices: list[_Slice], name: Path, *, allow_uneven_spacing: bool, max_gap_ratio: float | None
) -> tuple[list[int], float]:
    """Order slices whose ``position`` is set; refuse duplicates, missing slices and (unless allowed) uneven gaps."""
    n = len(slices)
    order = sorted(range(n), key=lambda i: slices[i].position)  # type: ignore[arg-type, return-value]
    positions = np.array([slices[i].position for i in order], dtype=np.float64)
    if n == 1:
        return order, _thickness(slices[0])
    gaps = np.diff(positions)
    dup = int(np.argmin(gaps))
    if gaps[dup] < 1e-4:
        a, b = slices[order[dup]].path, slices[order[dup + 1]].path
        raise VolumeError(f"{b}: same slice position {positions[dup]:.4f} mm as {a.name} (duplicate slice?)")
    gap = float(np.median(gaps))
    if max_gap_ratio is not None:
        big = np.flatnonzero(gaps > max_gap_ratio * gap)
        if big.size:
            listed = "; ".join(
                f"{gaps[k]:.4f} mm between {slices[order[k]].path.name} ({positions[k]:.4f} mm) and "
                f"{slices[order[k + 1]].path.name} ({positions[k + 1]:.4f} mm)"
                for k in big[:5]
            )
            more = f" (and {big.size - 5} more)" if big.size > 5 else ""
            raise VolumeError(
                f"{slices[order[big[0] + 1]].path}: missing slice(s) in {name}: {big.size} gap(s) larger than "
                f"{max_gap_ratio:g}x the median gap {gap:.4f} mm: {listed}{more}"
            )
    worst = int(np.argmax(np.abs(gaps - gap)))
    if abs(gaps[worst] - gap) > max(1e-3, 1e-2 * gap):
        msg = (
            f"{name}: uneven slice spacing: gap {gaps[worst]:.4f} mm between {slices[order[worst]].path.name} "
            f"and {slices[order[worst + 1]].path.name}, median {gap:.4f} mm (missing slice?)"
        )
        if not allow_uneven_spacing:
            raise VolumeError(msg + "; pass allow_uneven_spacing=True to use the median gap")
        log.warning("%s; using the median gap", msg)
    return order, gap


def _thickness(s: _Slice) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = s.ds.get(key)
        if value not in (None, ""):
            try:
                v = abs(float(value))
            except (TypeError, ValueError):
                continue
            if v > 0 and math.isfinite(v):
                return v
    log.warning("%s: no slice spacing in the header; using 1 mm", s.path)
    return 1.0


# -------------------------------------------------------------------------------------------------- MetaImage


def _parse_bool(value: str, *, key: str, path: Path) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise VolumeError(f"{path}: {key} must be True or False, got {value!r}")


def read_metaimage_header(path: PathLike) -> tuple[dict[str, str], int]:
    """Parse a MetaImage header: (``key → value`` with the keys as written, byte offset just past the
    ``ElementDataFile`` line, where ``LOCAL`` data starts). ``ElementDataFile`` must be the last key."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: MetaImage header does not exist")
    blob = path.read_bytes()
    header: dict[str, str] = {}
    pos = 0
    while pos < len(blob):
        end = blob.find(b"\n", pos)
        line_end = len(blob) if end < 0 else end + 1
        raw = blob[pos : (len(blob) if end < 0 else end)]
        pos = line_end
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise VolumeError(f"{path}: not a MetaImage header (binary bytes before ElementDataFile)") from None
        if not line:
            continue
        if "=" not in line:
            raise VolumeError(f"{path}: not a MetaImage header (line {line[:60]!r} is not `Key = Value`)")
        key, value = (part.strip() for part in line.split("=", 1))
        header[key] = value
        if key.lower() == "elementdatafile":
            return header, pos
    raise VolumeError(f"{path}: MetaImage header has no ElementDataFile line")


def load_metaimage(path: PathLike) -> Volume:
    """Read a MetaImage volume (``.mhd`` header with a separate data file, or ``ElementDataFile = LOCAL``).

    Supported: ``ObjectType = Image``, ``NDims`` 2 or 3, ``DimSize`` (x y z), the element types of
    :data:`METAIMAGE_TYPES` with one channel, ``ElementSpacing`` (or ``ElementSize``), ``Offset`` (or
    ``Origin``/``Position``), ``BinaryDataByteOrderMSB``/``ElementByteOrderMSB``, ``CompressedData`` (zlib or
    gzip stream, optional ``CompressedDataSize``), ``HeaderSize`` (bytes to skip; -1: data at the end of the
    file) and ``ElementDataFile`` as a path relative to the header (or absolute) or ``LOCAL``. Any
    ``TransformMatrix`` is ignored (LUNA16's are identities). A 2-D image becomes one slice.
    """
    path = Path(path)
    header, data_start = read_metaimage_header(path)
    fields = {k.lower(): v for k, v in header.items()}

    def get(*keys: str) -> str | None:
        for k in keys:
            if k.lower() in fields:
                return fields[k.lower()]
        return None

    def numbers(key_names: tuple[str, ...], n: int, cast: type, default: tuple | None) -> tuple:
        value = get(*key_names)
        if value is None:
            if default is None:
                raise VolumeError(f"{path}: MetaImage header has no {key_names[0]}")
            return default
        try:
            out = tuple(cast(v) for v in value.split())
        except ValueError:
            raise VolumeError(f"{path}: {key_names[0]} is not a list of numbers: {value!r}") from None
        if len(out) != n:
            raise VolumeError(f"{path}: {key_names[0]} must hold {n} values (NDims), got {value!r}")
        return out

    object_type = get("ObjectType")
    if object_type is not None and object_type.lower() != "image":
        raise VolumeError(f"{path}: ObjectType {object_type!r} is not an image")
    try:
        ndims = int(get("NDims") or "")
    except ValueError:
        raise VolumeError(f"{path}: NDims is missing or not an integer: {get('NDims')!r}") from None
    if ndims not in (2, 3):
        raise VolumeError(f"{path}: only 2-D and 3-D images are supported, got NDims = {ndims}")
    dims = numbers(("DimSize",), ndims, int, None)
    if any(d <= 0 for d in dims):
        raise VolumeError(f"{path}: DimSize must be positive, got {dims}")
    element_type = (get("ElementType") or "").upper()
    if element_type not in METAIMAGE_TYPES:
        raise VolumeError(
            f"{path}: unsupported ElementType {get('ElementType')!r} (supported: {', '.join(METAIMAGE_TYPES)})"
        )
    channels = get("ElementNumberOfChannels")
    if channels is not None and channels.strip() != "1":
        raise VolumeError(f"{path}: only single-channel images are supported, got ElementNumberOfChannels {channels}")
    binary = get("BinaryData")
    if binary is not None and not _parse_bool(binary, key="BinaryData", path=path):
        raise VolumeError(f"{path}: ASCII MetaImage data (BinaryData = False) is not supported")
    spacing = numbers(("ElementSpacing", "ElementSize"), ndims, float, (1.0,) * ndims)
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise VolumeError(f"{path}: ElementSpacing must be positive, got {spacing}")
    origin = numbers(("Offset", "Origin", "Position"), ndims, float, (0.0,) * ndims)
    msb_value = get("BinaryDataByteOrderMSB", "ElementByteOrderMSB")
    msb = _parse_bool(msb_value, key="BinaryDataByteOrderMSB", path=path) if msb_value is not None else False
    compressed_value = get("CompressedData")
    compressed = _parse_bool(compressed_value, key="CompressedData", path=path) if compressed_value else False
    try:
        header_size = int(get("HeaderSize") or 0)
        compressed_size = int(get("CompressedDataSize")) if get("CompressedDataSize") else None
    except ValueError:
        raise VolumeError(f"{path}: HeaderSize / CompressedDataSize must be integers") from None

    data_file = get("ElementDataFile") or ""
    if data_file.upper() == "LOCAL":
        source = path
        blob = path.read_bytes()[data_start:]
    elif not data_file or data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
        raise VolumeError(f"{path}: unsupported ElementDataFile {data_file!r} (one file or LOCAL)")
    else:
        source = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
        if not source.is_file():
            raise VolumeError(f"{source}: the data file named by {path.name} (ElementDataFile) does not exist")
        blob = source.read_bytes()
        if header_size > 0:
            blob = blob[header_size:]

    dtype = np.dtype(METAIMAGE_TYPES[element_type]).newbyteorder(">" if msb else "<")
    expected = int(np.prod(dims)) * dtype.itemsize
    if compressed:
        packed = blob if compressed_size is None else blob[:compressed_size]
        if compressed_size is not None and len(packed) < compressed_size:
            raise VolumeError(f"{source}: truncated: CompressedDataSize {compressed_size}, found {len(packed)} bytes")
        try:
            inflater = zlib.decompressobj(wbits=47)  # zlib or gzip stream, header detected automatically
            blob = inflater.decompress(packed, expected + 1)
        except zlib.error as err:
            raise VolumeError(f"{source}: corrupt compressed data ({err})") from None
        if len(blob) < expected and not inflater.eof:
            raise VolumeError(
                f"{source}: truncated compressed data: inflates to {len(blob)} bytes, expected {expected} "
                f"({element_type} × DimSize {' '.join(map(str, dims))})"
            )
    elif header_size == -1:
        blob = blob[len(blob) - expected :] if len(blob) >= expected else blob
    if len(blob) != expected:
        raise VolumeError(
            f"{source}: wrong data size: {len(blob)} bytes, expected {expected} "
            f"({element_type} × DimSize {' '.join(map(str, dims))})"
        )
    array = np.frombuffer(blob, dtype=dtype).reshape(tuple(reversed(dims)))
    if ndims == 2:
        array = array[None]
        spacing, origin = (*spacing, 1.0), (*origin, 0.0)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise VolumeError(f"{source}: the image contains NaN or infinite values")
    return Volume(
        array=array,
        spacing=tuple(reversed(spacing)),  # type: ignore[arg-type]
        origin=tuple(reversed(origin)),  # type: ignore[arg-type]
        path=path,
    )
