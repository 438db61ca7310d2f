"""Real-format image loaders for unsupervised anomaly detection (used by the SQUID recipe at full scale).

Nothing is downloaded: every function reads files that are already on disk.

* :func:`load_image` decodes one file (PNG, JPEG, BMP, TIFF) into ``float32`` in ``[0, 1]``. 8-bit, RGB(A),
  palette and 16-bit (``I;16``/``I``) inputs are converted by their own range, so a 16-bit X-ray keeps its
  dynamic range instead of being clipped at 255. 16-bit colour PNGs (RGB, RGBA, grey+alpha), which Pillow
  opens as 8-bit ``RGB``/``RGBA``, are decoded at their full 16 bits too (see :func:`_png16_colour_channels`).
  An optional ``size`` resizes the shorter side and center-crops to a square (bilinear, antialiased, done in
  floating point).
* :func:`load_images` stacks a list of :class:`ImageRecord` into an ``(N, C, size, size)`` array, either
  failing on the first bad file or skipping bad files and reporting them.
* Scanners turn on-disk layouts into sorted, deterministic record lists:
  :func:`scan_image_folder` (``root/normal``, ``root/abnormal[/<kind>]``), :func:`scan_zhanglab`
  (Kermany et al. pediatric pneumonia, ``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}``) and
  :func:`scan_chexpert` (CheXpert CSV with the 14 findings).
* :func:`split_holdout` carves a seeded per-label holdout (e.g. a validation set) out of a record list.

Every data problem raises :class:`ImageDataError`, whose message names the offending file or directory and
says what is wrong. The scanners ignore hidden files and folders (names starting with ``.``, e.g. the macOS
``._x.png`` resource forks that archives carry along), which would otherwise be reported as corrupt images.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

CHEXPERT_FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_REQUIRED_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS)
_CHEXPERT_NOT_ABNORMAL = ("No Finding", "Support Devices")
UNCERTAIN_MODES = ("exclude", "ones", "zeros")
ZHANGLAB_SPLITS = ("train", "test", "val")

_UINT16_MAX = 65535.0
# ITU-R 601-2 luma, the weights PIL's ``convert("L")`` uses for 8-bit colour (there in 16.16 fixed point)
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Pillow opens a 16-bit colour PNG as 8-bit "RGB"/"RGBA" through these big-endian raw modes, which keep only
# the high byte of each sample. Each maps to a raw mode of the same bits per pixel (so PNG unfiltering and
# Adam7 de-interlacing are unchanged) that recovers the rest: the ";16L" unpackers read the samples as
# little-endian and so keep the *low* byte of big-endian data; "RGBA" (4 bytes a pixel, like "LA;16B") keeps
# all four bytes of a grey+alpha pixel (L high, L low, A high, A low).
_PNG16_COLOUR_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}


class ImageDataError(ValueError):
    """An image file, folder or label file is missing or malformed; the message names it and says what is wrong."""


@dataclasses.dataclass
class ImageRecord:
    """One image of a data set: where it is, whether it is abnormal, and which kind of abnormality."""

    path: Path
    label: int  # 0 normal, 1 abnormal
    kind: str  # "normal", or the abnormal class / finding name

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.label not in (0, 1):
            raise ValueError(
                f"ImageRecord label must be 0 (normal) or 1 (abnormal), got {self.label!r} for {self.path}"
            )


# ----------------------------------------------------------------------------------------------- decoding


def _to_float_channels(img: Image.Image, *, grayscale: bool, path: Path) -> list[np.ndarray]:
    """Decode a loaded PIL image into float32 channels in [0, 1]: one channel if grayscale, else three (R, G, B)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > _UINT16_MAX):
            raise ImageDataError(
                f"{path}: 32-bit integer image with values in [{arr.min():.0f}, {arr.max():.0f}] is outside the "
                "16-bit range this loader scales by; convert it to 8- or 16-bit first"
            )
        gray = arr / _UINT16_MAX
        return [gray] if grayscale else [gray, gray, gray]
    if mode == "F":
        arr = np.asarray(img).astype(np.float32)
        if not np.isfinite(arr).all():
            raise ImageDataError(f"{path}: floating-point image contains NaN or infinite values")
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return [arr] if grayscale else [arr, arr, arr]
    if mode in ("1", "L", "LA", "La"):
        gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        return [gray] if grayscale else [gray, gray, gray]
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # converting a palette straight to RGB/L warns about byte transparency
    # RGB, RGBA (alpha dropped, colour kept as stored), palette, CMYK, YCbCr: let PIL convert.
    if grayscale:
        return [np.asarray(img.convert("L"), dtype=np.float32) / 255.0]  # ITU-R 601-2 luma
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return [rgb[..., 0], rgb[..., 1], rgb[..., 2]]


def _png16_colour_rawmode(img: Image.Image) -> str | None:
    """The raw mode of a still-unloaded 16-bit colour PNG (see ``_PNG16_COLOUR_RAWMODES``), else ``None``.

    Must be called before ``img.load()``, which clears the tile list this reads. Mirrors the 16-bit greyscale
    check in :func:`_to_float_channels`, which can use the mode because PIL has 16-bit grey modes but no
    16-bit colour ones.
    """
    if img.format != "PNG" or len(img.tile) != 1:
        return None
    args = img.tile[0][3]
    rawmode = args if isinstance(args, str) else (args[0] if args else None)
    return rawmode if rawmode in _PNG16_COLOUR_RAWMODES else None


def _decode_png_rawmode(path: Path, rawmode: str) -> np.ndarray:
    """Decode the PNG at ``path`` with its single tile's raw mode replaced by ``rawmode``, as a uint8 array."""
    with Image.open(path) as img:
        codec, extents, offset, _ = img.tile[0]
        img.tile = [(codec, extents, offset, rawmode)]
        img.load()
        return np.asarray(img, dtype=np.uint8)


def _png16_colour_channels(img: Image.Image, rawmode: str, *, grayscale: bool, path: Path) -> list[np.ndarray]:
    """Float32 channels in [0, 1] of a 16-bit colour PNG, at full 16-bit precision (values / 65535).

    ``img`` is the opened, not yet loaded file and ``rawmode`` what :func:`_png16_colour_rawmode` returned.
    RGB(A): PIL's own decode gives the high bytes, a second decode with the little-endian raw mode the low
    bytes. Grey+alpha: one decode as 4-byte "RGBA" gives both bytes of grey and alpha. Alpha is dropped as
    in the 8-bit path; colour goes to grey with the same ITU-R 601-2 luma weights as 8-bit colour, in float.
    If this Pillow cannot decode the file so, it is refused rather than silently cut to 8 bits.
    """
    img.load()  # the ordinary decode first, so a truncated / corrupt file is reported as such
    alt = _PNG16_COLOUR_RAWMODES[rawmode]
    try:
        other = _decode_png_rawmode(path, alt)
    except Exception as exc:
        raise ImageDataError(
            f"{path}: 16-bit colour PNG cannot be read without losing precision: this Pillow "
            f"({Image.__version__}) cannot decode it with raw mode {alt!r} ({type(exc).__name__}: {exc}); "
            "convert it to 16-bit greyscale or 8-bit first"
        ) from exc
    if rawmode == "LA;16B":
        gray = (other[..., 0].astype(np.float64) * 256.0 + other[..., 1]) / _UINT16_MAX
        gray = gray.astype(np.float32)
        return [gray] if grayscale else [gray, gray, gray]
    high = np.asarray(img, dtype=np.uint8)
    if high.shape != other.shape:
        raise ImageDataError(
            f"{path}: 16-bit colour PNG cannot be read without losing precision: its two decodes disagree in "
            f"shape ({high.shape} vs {other.shape})"
        )
    rgb = (high[..., :3].astype(np.float64) * 256.0 + other[..., :3]) / _UINT16_MAX
    if grayscale:
        luma = _LUMA_WEIGHTS[0] * rgb[..., 0] + _LUMA_WEIGHTS[1] * rgb[..., 1] + _LUMA_WEIGHTS[2] * rgb[..., 2]
        return [luma.astype(np.float32)]
    return [rgb[..., c].astype(np.float32) for c in range(3)]


def _resize_center_crop(channel: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` and center-crop to ``size``×``size`` in one antialiased resample."""
    h, w = channel.shape
    if (h, w) == (size, size):
        return channel
    short = min(h, w)
    left, top = (w - short) / 2.0, (h - short) / 2.0
    box = (left, top, left + short, top + short)  # the centered square in source coordinates
    as_float = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))  # mode "F"
    resized = as_float.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.float32)


def load_image(path: str | os.PathLike[str], *, size: int | None = None, grayscale: bool = True) -> np.ndarray:
    """Load one image as ``float32`` in ``[0, 1]``: shape ``(H, W)`` if ``grayscale`` else ``(H, W, 3)``.

    ``size`` resizes the shorter side to ``size`` and center-crops to ``size``×``size`` (bilinear with
    antialiasing, computed in floating point so 16-bit precision survives). 16-bit images are divided by 65535;
    that includes 16-bit colour PNGs (RGB, RGBA, grey+alpha), whose grey is the ITU-R 601-2 luma
    ``0.299 R + 0.587 G + 0.114 B`` (as for 8-bit colour) computed in floating point; one this Pillow cannot
    decode at full depth raises :class:`ImageDataError` rather than being cut to 8 bits.
    EXIF orientation is not applied (the pixels are used as stored). A missing, empty, truncated, corrupt or
    non-image file raises :class:`ImageDataError` naming the path.
    """
    path = Path(path)
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    try:
        nbytes = path.stat().st_size
    except FileNotFoundError:
        raise ImageDataError(f"{path}: image file does not exist") from None
    except OSError as exc:
        raise ImageDataError(f"{path}: cannot read image file ({exc})") from exc
    if path.is_dir():
        raise ImageDataError(f"{path}: expected an image file, found a directory")
    if nbytes == 0:
        raise ImageDataError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            rawmode = _png16_colour_rawmode(img)  # before load(), which clears what it reads
            if rawmode is not None:
                channels = _png16_colour_channels(img, rawmode, grayscale=grayscale, path=path)
            else:
                img.load()  # decode now so truncated / corrupt pixel data is caught here, not later
                channels = _to_float_channels(img, grayscale=grayscale, path=path)
    except (ImageDataError, MemoryError):
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError, ...)
        raise ImageDataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if size is not None:
        channels = [_resize_center_crop(c, size) for c in channels]
    out = channels[0] if grayscale else np.stack(channels, axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)  # bilinear can overshoot by rounding only


def load_images(
    records: Sequence[ImageRecord],
    *,
    size: int,
    grayscale: bool = True,
    skip_bad: bool = False,
    show_progress: bool = False,
) -> tuple[np.ndarray, list[ImageRecord], list[tuple[Path, str]]]:
    """Load ``records`` into one ``float32`` array ``(N, 1, size, size)`` (grayscale) or ``(N, 3, size, size)``.

    Returns ``(images, kept_records, bad)``. A bad file raises :class:`ImageDataError` unless ``skip_bad``, in
    which case it is left out of ``images``/``kept_records`` and listed in ``bad`` as ``(path, reason)`` so the
    caller can report how many were skipped. ``kept_records[i]`` describes ``images[i]``. ``show_progress``
    shows a progress bar (or logs every 10% when not on a terminal).
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    records = list(records)
    channels = 1 if grayscale else 3
    out = np.empty((len(records), channels, size, size), dtype=np.float32)
    kept: list[ImageRecord] = []
    bad: list[tuple[Path, str]] = []
    if show_progress:  # imported lazily: thrifty.core.run pulls in torch, which plain image loading does not need
        from thrifty.core.run import progress

        bar = progress(len(records), f"loading {len(records)} images")
    else:
        bar = contextlib.nullcontext(lambda n=1, **fields: None)
    with bar as advance:
        for rec in records:
            try:
                img = load_image(rec.path, size=size, grayscale=grayscale)
            except ImageDataError as exc:
                if not skip_bad:
                    raise
                bad.append((rec.path, str(exc)))
                advance()
                continue
            out[len(kept)] = img[None] if grayscale else np.moveaxis(img, -1, 0)
            kept.append(rec)
            advance()
    if bad:
        log.warning("skipped %d unreadable image(s) of %d; first: %s", len(bad), len(records), bad[0][1])
        out = out[: len(kept)].copy()
    return out, kept, bad


# ----------------------------------------------------------------------------------------------- scanning


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _listing(directory: Path, limit: int = 20) -> str:
    """A short, sorted description of what a directory holds, for error messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError as exc:
        return f"(cannot list: {exc})"
    if not names:
        return "(empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _find_subdir(parent: Path, name: str) -> Path | None:
    """``parent/name``, matching case-insensitively if there is no exact match (ambiguous matches raise)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    matches = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower() == name.lower())
    if len(matches) > 1:
        raise ImageDataError(
            f"{parent}: several folders match {name!r} case-insensitively: {[m.name for m in matches]}"
        )
    return matches[0] if matches else None


def _images_under(directory: Path, *, recursive: bool) -> list[Path]:
    """Image files in ``directory`` (optionally below it), skipping hidden files/folders, sorted by relative path."""
    found = directory.rglob("*") if recursive else directory.iterdir()
    paths = [
        p for p in found if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    return sorted(paths, key=lambda p: p.relative_to(directory).as_posix())


def scan_image_folder(
    root: str | os.PathLike[str], *, normal_dir: str = "normal", abnormal_dir: str = "abnormal"
) -> list[ImageRecord]:
    """Records for ``root/<normal_dir>/**`` (label 0) and ``root/<abnormal_dir>/**`` (label 1).

    An abnormal image inside a subfolder gets that first-level subfolder's name as ``kind``; one directly in
    ``abnormal_dir`` gets ``"abnormal"``. Folder names match case-insensitively when there is no exact match.
    Normals come first, each group sorted by relative path. The abnormal folder may be absent (a training
    folder of normals only); a missing root or normal folder, or a normal folder with no images, raises.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        where = f"; {root.parent} holds: {_listing(root.parent)}" if root.parent.is_dir() else ""
        raise ImageDataError(f"{root}: image folder {what}{where}")
    normal = _find_subdir(root, normal_dir)
    if normal is None:
        raise ImageDataError(f"{root}: no {normal_dir!r} folder of normal images; found: {_listing(root)}")
    normal_paths = _images_under(normal, recursive=True)
    if not normal_paths:
        raise ImageDataError(f"{normal}: no images with suffix {'/'.join(IMAGE_SUFFIXES)}; found: {_listing(normal)}")
    records = [ImageRecord(p, 0, "normal") for p in normal_paths]
    abnormal = _find_subdir(root, abnormal_dir)
    if abnormal is not None:
        for p in _images_under(abnormal, recursive=True):
            rel = p.relative_to(abnormal).parts
            records.append(ImageRecord(p, 1, rel[0] if len(rel) > 1 else "abnormal"))
    return records


def _zhanglab_root(root: Path, split: str) -> Path:
    """The folder holding ``train/test/val``: ``root`` itself, ``root/chest_xray`` or ``root/chest_xray/chest_xray``."""
    candidates = [root]
    inner = _find_subdir(root, "chest_xray")
    if inner is not None:
        candidates.append(inner)
        nested = _find_subdir(inner, "chest_xray")  # the Kaggle archive nests a second copy
        if nested is not None:
            candidates.append(nested)
    for cand in candidates:
        if _find_subdir(cand, split) is not None:
            return cand
    tried = ", ".join(str(c) for c in candidates)
    raise ImageDataError(
        f"{root}: no {split!r} folder of the ZhangLab chest_xray layout (tried {tried}); found: {_listing(root)}"
    )


def _zhanglab_kind(path: Path) -> str:
    name = path.name.lower()
    if "bacteria" in name:
        return "bacteria"
    if "virus" in name:
        return "virus"
    return "pneumonia"


def scan_zhanglab(root: str | os.PathLike[str], split: str) -> list[ImageRecord]:
    """Records of the Kermany/ZhangLab pediatric pneumonia set: ``<root>/<split>/{NORMAL,PNEUMONIA}/*.jpeg``.

    ``root`` may be the ``chest_xray`` folder, its parent, or the Kaggle archive's doubly nested
    ``chest_xray/chest_xray``; folder names match case-insensitively. NORMAL images are label 0 (kind
    ``"normal"``); PNEUMONIA images are label 1 with kind ``"bacteria"``/``"virus"`` when the file name says so,
    else ``"pneumonia"``. Normals come first, each group sorted by file name.
    """
    if split not in ZHANGLAB_SPLITS:
        raise ValueError(f"split must be one of {ZHANGLAB_SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise ImageDataError(f"{root}: ZhangLab chest_xray folder does not exist")
    base = _zhanglab_root(root, split)
    split_dir = _find_subdir(base, split)
    assert split_dir is not None  # _zhanglab_root only returns a base that has it
    groups: dict[str, Path] = {}
    for cls in ("NORMAL", "PNEUMONIA"):
        found = _find_subdir(split_dir, cls)
        if found is None:
            raise ImageDataError(f"{split_dir}: no {cls} folder; found: {_listing(split_dir)}")
        groups[cls] = found
    normals = _images_under(groups["NORMAL"], recursive=False)
    pneumonia = _images_under(groups["PNEUMONIA"], recursive=False)
    if not normals and not pneumonia:
        raise ImageDataError(f"{split_dir}: NORMAL and PNEUMONIA folders hold no images")
    return [ImageRecord(p, 0, "normal") for p in normals] + [ImageRecord(p, 1, _zhanglab_kind(p)) for p in pneumonia]


# ------------------------------------------------------------------------------- CSV helpers (shared)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        where = f"; {path.parent} holds: {_listing(path.parent)}" if path.parent.is_dir() else ""
        raise ImageDataError(f"{path}: {what} {state}{where}")


def _csv_rows(path: Path, required: Mapping[str, str], what: str) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, row)`` for each data row of the CSV at ``path``, after checking the ``required`` columns.

    ``required`` maps a role (for the message) to a column name. A row too short to hold a required column
    raises; values are stripped and ``None`` becomes ``""``.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [(c or "").strip() for c in (reader.fieldnames or [])]
            if not header:
                raise ImageDataError(f"{path}: {what} is empty; expected a header row")
            missing = [f"{col!r} ({role})" for role, col in required.items() if col not in header]
            if missing:
                raise ImageDataError(
                    f"{path}: {what} lacks column(s) {', '.join(missing)}; it has {header} "
                    "(column names are configurable through columns=)"
                )
            reader.fieldnames = header
            for row in reader:
                short = [col for col in required.values() if row.get(col) is None]
                if short:
                    raise ImageDataError(
                        f"{path}:{reader.line_num}: row has fewer fields than the header (no value for {short})"
                    )
                yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)}
    except UnicodeDecodeError as exc:
        raise ImageDataError(f"{path}: {what} is not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise ImageDataError(f"{path}: {what} is not a readable CSV ({exc})") from exc


def _views(views: Iterable[str] | None) -> set[str] | None:
    if views is None:
        return None
    return {v.strip().upper() for v in ([views] if isinstance(views, str) else views)}


def _chexpert_cell(text: str, *, csv_path: Path, line: int, column: str) -> float | None:
    """1.0 / 0.0 / -1.0, or None for blank; anything else raises."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (1.0, 0.0, -1.0):
        raise ImageDataError(f"{csv_path}:{line}: column {column!r} has {text!r}; expected 1, 0, -1 or blank")
    return value


def _resolve(rel: str, roots: Sequence[Path]) -> Path | None:
    for r in roots:
        candidate = r / rel
        if candidate.is_file():
            return candidate
    return None


def scan_chexpert(
    csv_path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    views: Iterable[str] = ("PA",),
    uncertain: str = "exclude",
) -> list[ImageRecord]:
    """Records from a CheXpert CSV (``train.csv`` / ``valid.csv``), frontal images of the given AP/PA ``views``.

    Normal (label 0): "No Finding" is 1 and no other finding is 1. Abnormal (label 1): a finding other than
    "No Finding"/"Support Devices" is 1; ``kind`` is the first such finding in :data:`CHEXPERT_FINDINGS` order.
    Other rows are dropped. Uncertain labels (-1): ``"exclude"`` drops a row with -1 on any finding,
    ``"ones"`` reads -1 as 1, ``"zeros"`` reads -1 as 0. Blank means 0.

    Each ``Path`` is resolved against ``image_root`` when given; otherwise against the CSV's grandparent, then
    its parent (both the usual ``CheXpert-v1.0-small/train.csv`` placement and a copy with the images beside
    the CSV work). The first root where the file exists wins; a file found under none raises. Records keep
    CSV order.
    """
    if uncertain not in UNCERTAIN_MODES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_MODES}, got {uncertain!r}")
    views_upper = _views(views) or set()
    csv_path = Path(csv_path)
    _require_file(csv_path, "CheXpert CSV")
    roots = [Path(image_root)] if image_root is not None else [csv_path.parent.parent, csv_path.parent]
    records: list[ImageRecord] = []
    for line, row in _csv_rows(csv_path, {c: c for c in CHEXPERT_REQUIRED_COLUMNS}, "CheXpert CSV"):
        if row["Frontal/Lateral"].lower() != "frontal" or row["AP/PA"].upper() not in views_upper:
            continue
        values = {f: _chexpert_cell(row[f], csv_path=csv_path, line=line, column=f) or 0.0 for f in CHEXPERT_FINDINGS}
        if any(v == -1.0 for v in values.values()):
            if uncertain == "exclude":
                continue
            fill = 1.0 if uncertain == "ones" else 0.0
            values = {f: (fill if v == -1.0 else v) for f, v in values.items()}
        positives = [f for f in CHEXPERT_FINDINGS if values[f] == 1.0 and f not in _CHEXPERT_NOT_ABNORMAL]
        if positives:
            label, kind = 1, positives[0]
        elif values["No Finding"] == 1.0 and values["Support Devices"] != 1.0:
            label, kind = 0, "normal"
        else:
            continue
        rel = row["Path"]
        if not rel:
            raise ImageDataError(f"{csv_path}:{line}: empty Path")
        resolved = _resolve(rel, roots)
        if resolved is None:
            tried = ", ".join(str(r) for r in roots)
            raise ImageDataError(f"{csv_path}:{line}: image {rel!r} not found under any of: {tried}")
        records.append(ImageRecord(resolved, label, kind))
    return records


# ----------------------------------------------------------------------------------------------- splitting


def split_holdout(
    records: Sequence[ImageRecord], *, n_per_label: int, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out up to ``n_per_label`` records of each label present, chosen by ``seed``: returns ``(rest, holdout)``.

    Deterministic for a given input order and seed (the scanners return sorted orders); both lists keep the
    input order. A label with fewer than ``n_per_label`` records is held out entirely (with a warning).
    """
    if n_per_label < 0:
        raise ValueError(f"n_per_label must be >= 0, got {n_per_label}")
    records = list(records)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for label in sorted({r.label for r in records}):
        idx = [i for i, r in enumerate(records) if r.label == label]
        if len(idx) < n_per_label:
            log.warning(
                "holdout wants %d records of label %d but only %d exist; all held out", n_per_label, label, len(idx)
            )
        take = min(n_per_label, len(idx))
        chosen.update(idx[j] for j in rng.permutation(len(idx))[:take])
    rest = [r for i, r in enumerate(records) if i not in chosen]
    holdout = [r for i, r in enumerate(records) if i in chosen]
    return rest, holdout


def expand_image_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders replaced by the image files under them (recursively, sorted; hidden ones skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(_images_under(p, recursive=True))
        else:
            out.append(p)
    return out
