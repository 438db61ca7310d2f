"""Real-format skin-lesion loaders for the full-scale MT-TransUNet path (arXiv 2112.01767).

MT-TransUNet trains joint lesion segmentation + 3-way classification on ISIC-2017 and tests on PH2. Nothing is
downloaded: the functions read files already on disk. Classes follow :data:`CLASSES` (0 melanoma,
1 seborrheic keratosis, 2 nevus). Note that the official release (``JingyeChen/MT-TransUNet``,
``utils/validate.py``) numbers them differently (0 nevus, 1 melanoma, 2 seborrheic keratosis, read from a
preprocessed ``cls_label.txt`` it does not ship); only the order here is used in this project.

Layouts read
------------
* **ISIC-2017** (:func:`scan_isic2017`): an image folder (``ISIC-2017_Training_Data/ISIC_0000000.jpg``; the
  ``*_superpixels.png`` files beside them are ignored because records come from the CSV), the Part 1 mask
  folder (``ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png``, 0/255) and the Part 3 label
  CSV (``ISIC-2017_Training_Part3_GroundTruth.csv``: ``image_id,melanoma,seborrheic_keratosis`` with
  ``0.0``/``1.0``; neither flag = nevus). The same call reads the official validation and test splits, and
  -- with ``masks_dir=None`` -- the extra unmasked "Training_addition" images (1320 in the paper; their label
  CSV is assumed to have the same columns). File patterns and column names are configurable; the layout
  above matches the challenge archives as commonly distributed but was not checked against the archives here.
* **PH2** (:func:`scan_ph2`): per-case folders under ``PH2 Dataset images/``:
  ``IMD002/IMD002_Dermoscopic_Image/IMD002.bmp`` and ``IMD002/IMD002_lesion/IMD002_lesion.bmp``. PH2 ships
  its diagnosis table as ``PH2_dataset.txt`` / ``PH2_dataset.xlsx`` (clinical diagnosis 0 common nevus,
  1 atypical nevus, 2 melanoma; no seborrheic keratosis). That table's exact layout is **unverified**, so the
  loader reads a user-made CSV with configurable columns and value map instead.

Preprocessing (:func:`load_lesion`, :func:`load_lesions`) follows the release's ``dataset.py``: the whole image
is resized to ``size``×``size`` ignoring aspect ratio (no crop), bicubic for the image and nearest for the
mask, pixel values divided by 255 with no mean/std normalisation. Training-time augmentation (random border
crop, flips, random rescale) is not done here. Unlike the release (``ImageFile.LOAD_TRUNCATED_IMAGES = True``),
truncated files are refused. Every data problem raises :class:`~thrifty.data.images.ImageDataError` naming
the offending file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from thrifty.data.images import ImageDataError, _csv_rows, _require_file, load_image

log = logging.getLogger(__name__)

CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")
MELANOMA, SEBORRHEIC_KERATOSIS, NEVUS = 0, 1, 2

# PH2 clinical diagnosis -> class index: common and atypical nevus are nevus, 2 is melanoma.
PH2_DIAGNOSIS_MAP: Mapping[str, int] = MappingProxyType({"0": NEVUS, "1": NEVUS, "2": MELANOMA})

# A mask pixel is "intermediate" if it lies strictly between these fractions of the mask's range; a mask with
# more than MAX_INTERMEDIATE_FRACTION of its pixels intermediate is not a binary mask (e.g. a greyscale photo,
# a soft/probability map, or a JPEG-compressed mask) and is refused.
_INTERMEDIATE_BAND = (0.1, 0.9)
MAX_INTERMEDIATE_FRACTION = 0.01

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclasses.dataclass
class LesionRecord:
    """One dermoscopic image: its file, its lesion mask (``None`` if unmasked), class index and id."""

    image: Path
    mask: Path | None
    label: int  # index into CLASSES
    id: str

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.mask = None if self.mask is None else Path(self.mask)
        if self.label not in range(len(CLASSES)):
            raise ValueError(f"LesionRecord label must be 0..{len(CLASSES) - 1} ({CLASSES}), got {self.label!r}")


# ----------------------------------------------------------------------------------------------- scanning


def _check_pattern(pattern: str, name: str) -> None:
    """A file pattern must use the field ``{id}`` and no other."""
    try:
        a, b = pattern.format(id="X"), pattern.format(id="Y")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{name} may only use the field '{{id}}', got {pattern!r} ({exc!r})") from None
    if a == b:
        raise ValueError(f"{name} must contain '{{id}}', got {pattern!r}")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise ImageDataError(f"{path}: {what} {state}")


def _flag(text: str, *, csv_path: Path, line: int, column: str) -> bool:
    """An ISIC 0/1 cell (``0``, ``1``, ``0.0``, ``1.0``) as a bool; anything else raises naming file:line."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise ImageDataError(f"{csv_path}:{line}: column {column!r} has {text!r}; expected 0 or 1 (or 0.0/1.0)")
    return value == 1.0


def _row_id(row: dict[str, str], column: str, seen: dict[str, int], *, csv_path: Path, line: int) -> str:
    case = row[column]
    if not case:
        raise ImageDataError(f"{csv_path}:{line}: empty {column!r}")
    if case in seen:
        raise ImageDataError(f"{csv_path}:{line}: {case!r} is listed twice (first at line {seen[case]})")
    seen[case] = line
    return case


def scan_isic2017(
    images_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    *,
    masks_dir: str | os.PathLike[str] | None = None,
    image_pattern: str = "{id}.jpg",
    mask_pattern: str = "{id}_segmentation.png",
    id_column: str = "image_id",
    melanoma_column: str = "melanoma",
    sk_column: str = "seborrheic_keratosis",
) -> list[LesionRecord]:
    """Records of one ISIC-2017 split, one per CSV row, sorted by id.

    ``labels_csv`` is a Part 3 ground-truth CSV (a UTF-8 BOM and extra columns are fine). A row with both flags
    set raises; neither set is nevus. Each image is ``images_dir / image_pattern.format(id=...)``; with
    ``masks_dir`` each must have its mask ``masks_dir / mask_pattern.format(id=...)``, without it ``mask`` is
    ``None`` (the unmasked "Training_addition" images). Missing files, bad cells, blank or duplicate ids and a
    CSV without data rows raise :class:`ImageDataError` naming the file (and CSV line).
    """
    _check_pattern(image_pattern, "image_pattern")
    if masks_dir is not None:
        _check_pattern(mask_pattern, "mask_pattern")
    images_dir, labels_csv = Path(images_dir), Path(labels_csv)
    masks = None if masks_dir is None else Path(masks_dir)
    _require_dir(images_dir, "ISIC-2017 image folder")
    if masks is not None:
        _require_dir(masks, "ISIC-2017 mask folder")
    _require_file(labels_csv, "ISIC-2017 label CSV")
    what = "ISIC-2017 label CSV"
    required = {"image id": id_column, "melanoma flag": melanoma_column, "seborrheic keratosis flag": sk_column}
    records: list[LesionRecord] = []
    seen: dict[str, int] = {}
    for line, row in _csv_rows(labels_csv, required, what):
        case = _row_id(row, id_column, seen, csv_path=labels_csv, line=line)
        mel = _flag(row[melanoma_column], csv_path=labels_csv, line=line, column=melanoma_column)
        sk = _flag(row[sk_column], csv_path=labels_csv, line=line, column=sk_column)
        if mel and sk:
            raise ImageDataError(
                f"{labels_csv}:{line}: {case!r} is marked both {melanoma_column!r} and {sk_column!r}; "
                "the classes are exclusive"
            )
        label = MELANOMA if mel else SEBORRHEIC_KERATOSIS if sk else NEVUS
        image = images_dir / image_pattern.format(id=case)
        _require_file(image, f"image of {case} (listed at {labels_csv}:{line})")
        mask = None
        if masks is not None:
            mask = masks / mask_pattern.format(id=case)
            _require_file(mask, f"mask of {case} (listed at {labels_csv}:{line})")
        records.append(LesionRecord(image=image, mask=mask, label=label, id=case))
    if not records:
        raise ImageDataError(f"{labels_csv}: {what} has a header but no data rows")
    return sorted(records, key=lambda r: r.id)


def scan_ph2(
    root: str | os.PathLike[str],
    *,
    labels_csv: str | os.PathLike[str] | None = None,
    image_pattern: str = "{id}/{id}_Dermoscopic_Image/{id}.bmp",
    mask_pattern: str = "{id}/{id}_lesion/{id}_lesion.bmp",
    id_column: str = "image_name",
    diagnosis_column: str = "clinical_diagnosis",
    diagnosis_map: Mapping[str, int] = PH2_DIAGNOSIS_MAP,
) -> list[LesionRecord]:
    """Records of PH2 (every case masked), one per row of a user-provided CSV, sorted by id.

    ``root`` is the folder holding the ``IMDxxx`` case folders (``PH2 Dataset images`` in the archive).
    **The PH2 layout is unverified here**: PH2 ships its table as ``PH2_dataset.txt``/``.xlsx``, which this
    loader does not parse. Export it to a CSV (default ``root/PH2_dataset.csv``) with an id column and a
    diagnosis column; ``diagnosis_map`` maps the diagnosis text to a class index (default: clinical
    diagnosis 0 common nevus and 1 atypical nevus -> nevus, 2 -> melanoma; a value such as ``2.0`` is also
    looked up as ``2``). Patterns, columns and the map are all configurable. An unknown diagnosis, a missing
    image or mask, or a blank/duplicate id raises :class:`ImageDataError` naming the file and case.
    """
    bad = {k: v for k, v in diagnosis_map.items() if v not in range(len(CLASSES))}
    if bad:
        raise ValueError(f"diagnosis_map values must be class indices 0..{len(CLASSES) - 1} ({CLASSES}); got {bad}")
    _check_pattern(image_pattern, "image_pattern")
    _check_pattern(mask_pattern, "mask_pattern")
    root = Path(root)
    _require_dir(root, "PH2 case folder")
    labels_csv = root / "PH2_dataset.csv" if labels_csv is None else Path(labels_csv)
    what = "PH2 label CSV"
    _require_file(labels_csv, what)
    lookup = {str(k).strip(): v for k, v in diagnosis_map.items()}
    records: list[LesionRecord] = []
    seen: dict[str, int] = {}
    for line, row in _csv_rows(labels_csv, {"case id": id_column, "diagnosis": diagnosis_column}, what):
        case = _row_id(row, id_column, seen, csv_path=labels_csv, line=line)
        label = _ph2_label(row[diagnosis_column], lookup)
        if label is None:
            raise ImageDataError(
                f"{labels_csv}:{line}: case {case!r} has {diagnosis_column}={row[diagnosis_column]!r}, which "
                f"diagnosis_map does not know (known: {sorted(lookup)})"
            )
        image = root / image_pattern.format(id=case)
        mask = root / mask_pattern.format(id=case)
        _require_file(image, f"dermoscopic image of case {case} (listed at {labels_csv}:{line})")
        _require_file(mask, f"lesion mask of case {case} (listed at {labels_csv}:{line})")
        records.append(LesionRecord(image=image, mask=mask, label=label, id=case))
    if not records:
        raise ImageDataError(f"{labels_csv}: {what} has a header but no data rows")
    return sorted(records, key=lambda r: r.id)


def _ph2_label(text: str, lookup: Mapping[str, int]) -> int | None:
    if text in lookup:
        return lookup[text]
    try:
        value = float(text)
    except ValueError:
        return None
    if value.is_integer():
        return lookup.get(str(int(value)))
    return None


# ----------------------------------------------------------------------------------------------- loading


def _resize(channel: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resize one float channel to ``size``×``size`` (aspect ratio not kept, no crop), in floating point."""
    if channel.shape == (size, size):
        return channel
    as_float = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))  # mode "F"
    return np.asarray(as_float.resize((size, size), resample), dtype=np.float32)


def _check_size(size: object) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _resample(name: str) -> Image.Resampling:
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ValueError(f"image_resample must be one of {sorted(_RESAMPLE)}, got {name!r}") from None


def _decode_image(path: Path, size: int, resample: Image.Resampling) -> tuple[np.ndarray, tuple[int, int]]:
    """``(float32 (size, size, 3) in [0, 1], native (H, W))``."""
    native = load_image(path, grayscale=False)
    out = np.stack([_resize(native[..., c], size, resample) for c in range(3)], axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), native.shape[:2]


def _decode_mask(path: Path, size: int, image_shape: tuple[int, int], image: Path) -> np.ndarray:
    """Binary uint8 ``(size, size)`` mask; refuses a shape mismatch with its image or a non-binary mask.

    The mask is read as greyscale in [0, 1]. If its largest value is at most one 8-bit step (a 0/1 label
    image), it is divided by that value first. More than :data:`MAX_INTERMEDIATE_FRACTION` of pixels strictly
    between 10% and 90% of the range makes it non-binary; otherwise foreground is ``>= 0.5``.
    """
    grey = load_image(path, grayscale=True)
    if grey.shape != tuple(image_shape):
        (mh, mw), (ih, iw) = grey.shape, image_shape
        raise ImageDataError(f"{path}: mask is {mw}x{mh} (WxH) but its image {image} is {iw}x{ih}")
    hi = float(grey.max()) if grey.size else 0.0
    if 0.0 < hi <= 1.0 / 255.0 + 1e-6:
        grey = grey / hi
    lo_band, hi_band = _INTERMEDIATE_BAND
    frac = float(np.mean((grey > lo_band) & (grey < hi_band))) if grey.size else 0.0
    if frac > MAX_INTERMEDIATE_FRACTION:
        raise ImageDataError(
            f"{path}: not a binary mask: {frac:.1%} of its pixels lie between {lo_band:.0%} and {hi_band:.0%} of "
            f"the range (at most {MAX_INTERMEDIATE_FRACTION:.0%} allowed); expected 0/255 or 0/1 values"
        )
    binary = np.where(grey >= 0.5, np.uint8(255), np.uint8(0))
    if binary.shape != (size, size):
        binary = np.asarray(Image.fromarray(binary).resize((size, size), Image.Resampling.NEAREST))
    return (binary > 0).astype(np.uint8)


def load_rgb(path: str | Path, *, size: int, image_resample: str = "bicubic") -> tuple[np.ndarray, tuple[int, int]]:
    """One image, whole, resized (no crop) to ``size``×``size``: ``(float32 (size, size, 3) in [0, 1], its native
    (H, W))``. An unreadable file raises :class:`ImageDataError` naming it (for scoring new images)."""
    _check_size(size)
    return _decode_image(Path(path), size, _resample(image_resample))


def load_lesion(
    record: LesionRecord, *, size: int, image_resample: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(image, mask)`` of one record, both resized (whole image, no crop) to ``size``×``size``.

    ``image`` is ``float32`` ``(size, size, 3)`` in ``[0, 1]`` (``image_resample`` ``"bicubic"`` as in the
    release, or ``"bilinear"``; done in float, antialiased when shrinking); ``mask`` is ``uint8``
    ``(size, size)`` in ``{0, 1}`` (nearest neighbour), or ``None`` for an unmasked record. 0/255 and 0/1
    masks are accepted; a mask whose size differs from its image's, or that is not binary (see
    :func:`_decode_mask`), raises :class:`ImageDataError` naming the mask, as does any unreadable file.
    """
    _check_size(size)
    resample = _resample(image_resample)
    image, shape = _decode_image(record.image, size, resample)
    mask = None if record.mask is None else _decode_mask(record.mask, size, shape, record.image)
    return image, mask


def load_lesions(
    records: Sequence[LesionRecord], *, size: int, skip_bad: bool = False, image_resample: str = "bicubic"
) -> dict[str, np.ndarray]:
    """Load ``records`` (in order) into stacked arrays; see :func:`load_lesion` for the per-file rules.

    Returns a dict with ``images`` ``uint8`` ``(N, size, size, 3)``, ``masks`` ``uint8`` ``(N, size, size)`` in
    {0, 1} (all zeros where the record has no mask), ``has_mask`` ``bool`` ``(N,)``, ``labels`` ``int64`` ``(N,)``
    and ``ids`` (``str`` ``(N,)``), plus ``skipped`` (``str`` array of the bad files' paths) and
    ``skipped_reasons`` (``str`` array, the matching error messages). Without ``skip_bad`` the first bad file
    raises :class:`ImageDataError` and ``skipped`` is always empty; with it, a record whose image or mask is
    bad is left out of the arrays, its offending file listed in ``skipped``, and a warning is logged.
    """
    _check_size(size)
    resample = _resample(image_resample)
    records = list(records)
    images = np.zeros((len(records), size, size, 3), dtype=np.uint8)
    masks = np.zeros((len(records), size, size), dtype=np.uint8)
    kept: list[LesionRecord] = []
    skipped: list[str] = []
    reasons: list[str] = []
    for rec in records:
        current = rec.image
        try:
            image, shape = _decode_image(rec.image, size, resample)
            mask = None
            if rec.mask is not None:
                current = rec.mask
                mask = _decode_mask(rec.mask, size, shape, rec.image)
        except ImageDataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(current))
            reasons.append(str(exc))
            continue
        i = len(kept)
        images[i] = np.rint(image * 255.0).astype(np.uint8)
        if mask is not None:
            masks[i] = mask
        kept.append(rec)
    if skipped:
        log.warning("skipped %d bad lesion file(s) of %d records; first: %s", len(skipped), len(records), reasons[0])
    n = len(kept)
    return {
        "images": images[:n].copy() if n < len(records) else images,
        "masks": masks[:n].copy() if n < len(records) else masks,
        "has_mask": np.array([r.mask is not None for r in kept], dtype=bool),
        "labels": np.array([r.label for r in kept], dtype=np.int64),
        "ids": np.array([r.id for r in kept], dtype=str),
        "skipped": np.array(skipped, dtype=str),
        "skipped_reasons": np.array(reasons, dtype=str),
    }
