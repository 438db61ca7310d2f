"""LUNA16 (Setio et al., MedIA 2017) for the Genesis recipe's full-scale path: scans, nodule annotations and
nodule candidates in the layout of the challenge's download.

Layout read (``root``)::

    root/subset0/<seriesuid>.mhd (+ .raw) … root/subset9/…
    root/annotations.csv       seriesuid,coordX,coordY,coordZ,diameter_mm      (the 1,186 nodules)
    root/candidates.csv        seriesuid,coordX,coordY,coordZ,class            (or candidates_V2.csv)

Each scan is read with our MetaImage parser (:func:`thrifty.data.volumes.load_metaimage`; LUNA16's
``TransformMatrix`` is the identity, so voxel = (world − origin) / spacing) and resized, trilinearly, to one
common frame ``shape`` (D, H, W). The frame makes the same voxel coordinate mean roughly the same place in every
scan, which the visual-word self-discovery needs (the releases resize whole scans too, to 128×128×64, for their
auto-encoder); it also stretches anatomy anisotropically, which the phantom path does not. In the frame a scan has:

- ``volume``: HU, ``float32``; ``lung_mask``: air (< -400 HU) enclosed by the body in its axial slice, i.e. the
  lungs and airways (a threshold heuristic, not a segmentation);
- ``nodule_mask``: an ellipsoid per annotation with the annotated diameter (LUNA16 has no voxel masks; LIDC-IDRI's
  XML contours would give real ones; not read here);
- ``nodules`` (centres) and candidates with their 0/1 class, mapped to frame voxels.

:class:`Scan` offers the attributes of :class:`thrifty.data.ct_phantom.Patient` that the recipe reads, so the rest of
the recipe does not know which source it runs on. :func:`cached_scans` keeps one ``.npz`` per scan and frame.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from thrifty.data.volumes import VolumeError, load_metaimage

LUNG_HU = -400.0
CANDIDATE_FILES = ("candidates_V2.csv", "candidates.csv")


class Luna16Error(ValueError):
    """A LUNA16 file or folder is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class Centre:
    center: tuple[int, int, int]


@dataclasses.dataclass(eq=False)
class Scan:
    """One LUNA16 scan in the common frame (see the module docstring); ``labels`` are all zero (no organ labels)."""

    index: int
    uid: str
    subset: int
    volume: np.ndarray
    lung_mask: np.ndarray
    nodule_mask: np.ndarray
    nodules: list[Centre]
    candidate_centers: np.ndarray
    candidate_labels: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return np.zeros(self.volume.shape, dtype=np.uint8)

    def candidate_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.candidate_centers, self.candidate_labels


def read_points(path: Path, value: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """``seriesuid,coordX,coordY,coordZ,<value>`` rows → {uid: [(z, y, x, value), …]} (world mm, z first)."""
    if not path.is_file():
        raise Luna16Error(f"{path}: missing (expected in the LUNA16 root)")
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"seriesuid", "coordX", "coordY", "coordZ", value}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise Luna16Error(f"{path}: needs columns {sorted(need)}, has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                point = (float(row["coordZ"]), float(row["coordY"]), float(row["coordX"]), float(row[value]))
            except (TypeError, ValueError):
                raise Luna16Error(f"{path}:{line}: not numbers: {row}") from None
            out.setdefault(row["seriesuid"], []).append(point)
    return out


def _points(path: Path, value: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """:func:`read_points`, parsed once per file version and process: the candidate list has about 550,000 rows,
    and a run reads four pools (pre-training, train, validation, test) of the same root."""
    mtime = path.stat().st_mtime_ns if path.is_file() else -1
    return _points_at(path, value, mtime)


@functools.lru_cache(maxsize=4)
def _points_at(path: Path, value: str, mtime: int) -> dict[str, list[tuple[float, float, float, float]]]:
    return read_points(path, value)


def _candidate_file(root: Path) -> Path:
    return next((root / n for n in CANDIDATE_FILES if (root / n).is_file()), root / CANDIDATE_FILES[-1])


def find_scans(root: Path, subsets: Sequence[int]) -> list[tuple[str, Path, int]]:
    """(seriesuid, .mhd path, subset) of every scan in ``root/subset<k>`` for k in ``subsets``, sorted."""
    out = []
    for k in subsets:
        folder = root / f"subset{k}"
        if not folder.is_dir():
            raise Luna16Error(f"{folder}: missing LUNA16 subset folder")
        out += [(p.stem, p, k) for p in sorted(folder.glob("*.mhd"))]
    return out


def lung_mask_from_hu(hu: np.ndarray) -> np.ndarray:
    """Air (< -400 HU) that, within its axial slice, does not touch the slice's border: lungs and airways inside the
    body. Components are found per slice because lungs and the trachea reach the first and last slices of a scan,
    while the air around the body touches every slice's border."""
    air = hu < LUNG_HU
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, n = ndimage.label(air, structure=in_plane)
    if n == 0:
        return air
    border = np.unique(np.concatenate([labels[:, [0, -1]].ravel(), labels[..., [0, -1]].ravel()]))
    return air & ~np.isin(labels, border[border > 0])


def _resize(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def load_scan(
    path: Path,
    *,
    index: int,
    subset: int,
    annotations: Sequence[tuple[float, float, float, float]],
    candidates: Sequence[tuple[float, float, float, float]],
    shape: Sequence[int],
) -> Scan:
    """Read one scan and map it, its nodules (z, y, x, diameter mm) and candidates (z, y, x, class) to the frame."""
    vol = load_metaimage(path)
    native = np.asarray(vol.shape, dtype=np.float64)
    scale = np.asarray(shape, dtype=np.float64) / native
    spacing = np.asarray(vol.spacing) / scale  # mm per frame voxel
    origin = np.asarray(vol.origin)

    def to_frame(points: Sequence[tuple[float, ...]]) -> np.ndarray:
        if not points:
            return np.zeros((0, 3), dtype=np.int64)
        world = np.asarray([p[:3] for p in points], dtype=np.float64)
        voxel = (world - origin) / np.asarray(vol.spacing)
        frame = np.round((voxel + 0.5) * scale - 0.5).astype(np.int64)
        return np.clip(frame, 0, np.asarray(shape) - 1)

    hu = _resize(vol.array, shape)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1).astype(np.float32)
    nodule_mask = np.zeros(tuple(shape), dtype=bool)
    centres = to_frame(annotations)
    for c, a in zip(centres, annotations):
        radius = a[3] / 2 / spacing  # frame voxels per axis
        nodule_mask |= (((grid - c) / np.maximum(radius, 0.5)) ** 2).sum(-1) <= 1.0
    return Scan(
        index=index,
        uid=path.stem,
        subset=subset,
        volume=hu.astype(np.float32),
        lung_mask=_resize(lung_mask_from_hu(vol.array).astype(np.float32), shape) > 0.5,
        nodule_mask=nodule_mask,
        nodules=[Centre(tuple(int(v) for v in c)) for c in centres],  # type: ignore[arg-type]
        candidate_centers=to_frame(candidates),
        candidate_labels=np.asarray([int(c[3]) for c in candidates], dtype=np.int64),
    )


def cached_scans(
    root: str | Path, cache: str | Path, *, subsets: Sequence[int], shape: Sequence[int], max_scans: int = 0
) -> list[Scan]:
    """Every scan of ``subsets`` (the first ``max_scans`` when > 0) in the frame ``shape``, cached as ``.npz`` under
    ``cache/luna16-<digest of root and shape>/``. Indices follow the sorted (subset, uid) order."""
    root = Path(root)
    if not root.is_dir():
        raise Luna16Error(f"{root}: LUNA16 root folder does not exist")
    annotations = _points(root / "annotations.csv", "diameter_mm")
    candidates = _points(_candidate_file(root), "class")
    scans = find_scans(root, subsets)
    if max_scans > 0:
        scans = scans[:max_scans]
    key = hashlib.sha256(f"{root.resolve()}|{list(shape)}|v1".encode()).hexdigest()[:16]
    folder = Path(cache) / f"luna16-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (uid, path, subset) in enumerate(scans):
        file = folder / f"{uid}.npz"
        if file.is_file():
            with np.load(file, allow_pickle=False) as z:
                out.append(
                    Scan(
                        index=i,
                        uid=uid,
                        subset=subset,
                        volume=z["volume"],
                        lung_mask=z["lung_mask"],
                        nodule_mask=z["nodule_mask"],
                        nodules=[Centre(tuple(int(v) for v in c)) for c in z["nodule_centers"]],  # type: ignore[arg-type]
                        candidate_centers=z["candidate_centers"],
                        candidate_labels=z["candidate_labels"],
                    )
                )
            continue
        try:
            scan = load_scan(
                path,
                index=i,
                subset=subset,
                annotations=annotations.get(uid, []),
                candidates=candidates.get(uid, []),
                shape=shape,
            )
        except VolumeError as err:
            raise Luna16Error(str(err)) from None
        tmp = file.with_name(file.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                volume=scan.volume,
                lung_mask=scan.lung_mask,
                nodule_mask=scan.nodule_mask,
                nodule_centers=np.asarray([n.center for n in scan.nodules], dtype=np.int64).reshape(-1, 3),
                candidate_centers=scan.candidate_centers,
                candidate_labels=scan.candidate_labels,
            )
        os.replace(tmp, file)
        out.append(scan)
    return out
