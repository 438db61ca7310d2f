"""Data of the SQUID recipe: DigitAnatomy or a real dataset, split into a training stream of normal images, a
validation set (normal + abnormal, for model selection, score calibration and thresholds) and a test set that
is touched once.

Every read of the validation or test set goes through :class:`GuardedSet`, which appends
``{split, purpose, unit}`` to an :class:`AccessLog` (written to ``access_log.jsonl``), so a test can prove that no
test image influenced selection, μ/σ or the threshold.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thrifty.core.splits import AccessLog, Guarded
from thrifty.data import images as imgio
from thrifty.data.digit_anatomy import NormalStream, build_digit_anatomy
from thrifty.methods.squid.config import SquidConfig

log = logging.getLogger(__name__)

VAL_PURPOSES = ("selection", "calibration", "threshold", "figure")
TEST_PURPOSES = ("final_test", "figure")


@dataclasses.dataclass
class ImageSet:
    """Evaluation images. ``images`` (N, 1, H, W) float in [0, 1]; ``labels`` (N,) 0/1; ``kinds`` anomaly type
    per image ("normal" for normals); ``cell_masks`` (N, 9) for DigitAnatomy, else None; ``names`` file names."""

    images: torch.Tensor
    labels: np.ndarray
    kinds: list[str]
    names: list[str]
    cell_masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


class GuardedSet(Guarded[ImageSet]):
    """An :class:`ImageSet` that can only be read by naming a purpose allowed for its split."""

    def __init__(self, split: str, data: ImageSet, access: AccessLog) -> None:
        super().__init__(split, data, access, allowed=VAL_PURPOSES if split == "val" else TEST_PURPOSES)


class TensorStream:
    """Random training batches from a fixed tensor of normal images, reproducible per (seed, step, rank)."""

    def __init__(self, images: torch.Tensor, *, seed: int) -> None:
        self.images, self.seed = images, seed

    def batch(self, step: int, batch_size: int, *, rank: int = 0) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step, rank])
        return self.images[torch.from_numpy(rng.integers(len(self.images), size=batch_size))]


@dataclasses.dataclass
class AnomalyData:
    """``train_stream(seed)`` gives a stream with ``batch(step, batch_size, rank=)``; val/test are guarded."""

    source: str
    image_size: int
    make_stream: Any
    val: GuardedSet
    test: GuardedSet
    info: dict[str, Any]

    def train_stream(self, seed: int):
        return self.make_stream(seed)


def _digit_set(es) -> ImageSet:
    return ImageSet(es.tensor(), es.labels, list(es.kinds), list(es.names), es.cell_masks)


def _records_set(records: list[imgio.ImageRecord], cfg: SquidConfig, bad: list) -> ImageSet:
    arr, kept, skipped = imgio.load_images(records, size=cfg.data.image_size, skip_bad=cfg.data.skip_bad)
    bad.extend(skipped)
    return ImageSet(
        torch.from_numpy(arr),
        np.array([r.label for r in kept], dtype=np.int64),
        [r.kind if r.label else "normal" for r in kept],
        [r.path.name for r in kept],
    )


def _real_records(cfg: SquidConfig) -> tuple[list, list, list]:
    """(train normals, validation records, test records) of a real source.

    Raises:
        ImageDataError: validation lacks normal or abnormal images, or an image is in both training/validation
            and test.
    """
    d = cfg.data
    if d.source == "folder":
        test = imgio.scan_image_folder(d.root)
        train_all = imgio.scan_image_folder(d.train_root or Path(d.root) / "train")
    elif d.source == "zhanglab":
        test = imgio.scan_zhanglab(d.root, "test")
        train_all = imgio.scan_zhanglab(d.root, "train")
    else:  # chexpert
        if not (d.csv_train and d.csv_test):
            raise imgio.ImageDataError("data.source=chexpert needs data.csv_train and data.csv_test")
        test = imgio.scan_chexpert(d.csv_test, image_root=d.root)
        train_all = imgio.scan_chexpert(d.csv_train, image_root=d.root)
    if d.val_root:
        rest, val = train_all, imgio.scan_image_folder(d.val_root)
    else:
        rest, val = imgio.split_holdout(train_all, n_per_label=d.holdout, seed=d.data_seed)
    train = [r for r in rest if r.label == 0]  # unsupervised: abnormal training images are never used
    labels = {r.label for r in val}
    if labels != {0, 1}:
        missing = "abnormal" if 1 not in labels else "normal"
        raise imgio.ImageDataError(
            f"the validation set has no {missing} images (model selection and the threshold need both); "
            "put abnormal images in the training folder to hold some out, or pass data.val_root=<folder with "
            "normal/ and abnormal/>"
        )
    test_paths = {r.path.resolve() for r in test}
    shared = [r.path for r in (*train, *val) if r.path.resolve() in test_paths]
    if shared:
        raise imgio.ImageDataError(f"{len(shared)} test images also appear in training/validation, e.g. {shared[0]}")
    return train, val, test


def prepare_data(cfg: SquidConfig, cache: Path, access: AccessLog) -> AnomalyData:
    """Build (or reuse) DigitAnatomy, or scan and load a real dataset."""
    if cfg.data.source == "digit_anatomy":
        d = cfg.data
        da = build_digit_anatomy(
            cache,
            cell=d.cell,
            per_class=d.per_class,
            val_sizes=tuple(d.val_sizes),
            test_sizes=tuple(d.test_sizes),
            anomaly_types=d.anomaly_types,
            scale_range=tuple(d.scale_range),
            seed=d.data_seed,
        )
        pool = da.pools.images["train"]

        def make_stream(seed: int) -> NormalStream:
            return NormalStream(
                pool,
                cell=d.cell,
                seed=seed,
                scale_range=tuple(d.scale_range),
                contamination=d.contamination,
                contamination_types=d.anomaly_types,
            )

        info = {
            "source": "digit_anatomy",
            "root": str(da.root),
            "val": {"normal": int((da.val.labels == 0).sum()), "abnormal": int(da.val.labels.sum())},
            "test": {"normal": int((da.test.labels == 0).sum()), "abnormal": int(da.test.labels.sum())},
            "train_digits_per_class": int(d.per_class[0]),
            "train_contamination": d.contamination,
        }
        return AnomalyData(
            "digit_anatomy",
            3 * d.cell,
            make_stream,
            GuardedSet("val", _digit_set(da.val), access),
            GuardedSet("test", _digit_set(da.test), access),
            info,
        )
    train_rec, val_rec, test_rec = _real_records(cfg)
    bad: list = []
    train = _records_set(train_rec, cfg, bad)
    val, test = _records_set(val_rec, cfg, bad), _records_set(test_rec, cfg, bad)
    if bad:
        log.warning("skipped %d unreadable images (data.skip_bad=true)", len(bad))
    info = {
        "source": cfg.data.source,
        "root": cfg.data.root,
        "train_normal": len(train),
        "val": {"normal": int((val.labels == 0).sum()), "abnormal": int(val.labels.sum())},
        "test": {"normal": int((test.labels == 0).sum()), "abnormal": int(test.labels.sum())},
        "skipped_bad_images": len(bad),
    }
    return AnomalyData(
        cfg.data.source,
        cfg.data.image_size,
        lambda seed: TensorStream(train.images, seed=seed),
        GuardedSet("val", val, access),
        GuardedSet("test", test, access),
        info,
    )
