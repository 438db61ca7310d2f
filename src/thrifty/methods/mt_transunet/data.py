"""Data of the MT-TransUNet recipe (arXiv 2112.01767): lesion images, exact masks, class labels, ground-truth SDFs.

Synthetic (the card's miniature, :mod:`thrifty.data.dermoscopy`), every split from its own seed (split by image):

=================  ========  ===========================================================================
split              domain    what the recipe uses it for
=================  ========  ===========================================================================
``masked``         isic      the first training stream: masks (segmentation, SDF) + class labels
``unmasked``       isic      the second stream: class labels only (its masks exist but are never read)
``val``            isic      model selection (Jaccard; class AUC), calibration, figures
``test``           isic      the final evaluation, read once per unit
``shifted_test``   ph2       the PH2-like shifted test (other skin tones and lighting), read once per unit
=================  ========  ===========================================================================

Real data (``data.source=isic2017``) reads ISIC-2017's training images with masks and labels, the mask-free
"Training_addition" images, its validation and test splits, and optionally PH2 as the shifted test
(:mod:`thrifty.data.skin_lesions`).

``data.masked_fraction`` keeps the masks of the first ``round(f · n)`` masked images; the rest join the mask-free
stream (the masked-fraction sweep). Validation and the test splits are :class:`Guarded`: every read names its
purpose and lands in ``access_log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thrifty.core import cache
from thrifty.core.splits import AccessLog, Guarded
from thrifty.data import dermoscopy
from thrifty.methods.mt_transunet.config import CLASSES, MTTransUNetConfig

log = logging.getLogger(__name__)

VAL_PURPOSES = ("selection", "calibration", "figure")
TEST_PURPOSES = ("final_test", "figure")
GENERATOR_VERSION = 1
SPLITS = ("masked", "unmasked", "val", "test", "shifted_test")


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``images`` uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]: the release divides by 255 and applies no
    mean/std standardisation (``dataset.py``)."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 255.0


@dataclasses.dataclass
class LesionSet:
    """Images with their ground truth.

    ``images`` (N, 3, S, S) float32 in [0, 1]; ``masks`` (N, S, S) int64 in {0, 1} (zeros where ``has_mask``
    is False); ``has_mask`` (N,) bool; ``labels`` (N,) int64 class indices (:data:`CLASSES`); ``raw`` (N, S, S, 3) uint8
    the images as loaded (trivial baselines, figures).
    """

    images: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    labels: torch.Tensor
    raw: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray | list[int]) -> LesionSet:
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.from_numpy(idx)
        return LesionSet(self.images[t], self.masks[t], self.has_mask[t], self.labels[t], self.raw[idx])

    def without_masks(self) -> LesionSet:
        """The same images with their masks hidden (a mask-free stream never reads one)."""
        n = len(self)
        return dataclasses.replace(self, masks=torch.zeros_like(self.masks), has_mask=torch.zeros(n, dtype=torch.bool))


def concat(parts: list[LesionSet]) -> LesionSet:
    return LesionSet(
        torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
        torch.cat([p.has_mask for p in parts]), torch.cat([p.labels for p in parts]),
        np.concatenate([p.raw for p in parts]),
    )  # fmt: skip


def lesion_set(arrays: dict[str, np.ndarray]) -> LesionSet:
    """A :class:`LesionSet` from arrays ``images`` uint8 (N, S, S, 3), ``masks`` uint8 (N, S, S), ``labels`` (N,)
    and ``has_mask`` (N,) bool (default: all True)."""
    images = np.asarray(arrays["images"], dtype=np.uint8)
    masks = np.asarray(arrays["masks"], dtype=np.uint8)
    has_mask = np.asarray(arrays.get("has_mask", np.ones(len(images), dtype=bool)), dtype=bool)
    masks = np.where(has_mask[:, None, None], masks, 0)
    return LesionSet(
        images=normalise(images),
        masks=torch.from_numpy(masks.astype(np.int64)),
        has_mask=torch.from_numpy(has_mask),
        labels=torch.from_numpy(np.asarray(arrays["labels"], dtype=np.int64)),
        raw=images,
    )


class GuardedSet(Guarded[LesionSet]):
    """Validation or test images that can only be read by naming an allowed purpose."""

    def __init__(self, split: str, data: LesionSet, access: AccessLog) -> None:
        super().__init__(split, data, access, allowed=VAL_PURPOSES if split == "val" else TEST_PURPOSES)


@dataclasses.dataclass
class MTData:
    """Everything a unit trains and is judged on.

    Attributes:
        masked / unmasked: the two training streams before the masked-fraction cut (:meth:`streams`).
        val / test / shifted_test: guarded held-out splits (``shifted_test`` may be None).
    """

    masked: LesionSet
    unmasked: LesionSet
    val: GuardedSet
    test: GuardedSet
    shifted_test: GuardedSet | None
    info: dict[str, Any]

    def streams(self, masked_fraction: float) -> tuple[LesionSet, LesionSet]:
        """(masked stream, mask-free stream): the first ``round(f · n)`` masked images keep their masks; the others
        join the mask-free stream with their masks hidden."""
        n = len(self.masked)
        keep = max(1, round(masked_fraction * n))
        primary = self.masked.subset(range(keep))
        moved = self.masked.subset(range(keep, n)).without_masks()
        secondary = concat([moved, self.unmasked]) if len(moved) else self.unmasked
        return primary, secondary


# --------------------------------------------------------------------------------------------- synthetic


def synthetic_settings(cfg: MTTransUNetConfig) -> dict[str, Any]:
    """What the cached synthetic splits depend on (their cache key)."""
    syn = cfg.data.synthetic
    return {"synthetic": dataclasses.asdict(syn), "image_size": cfg.data.image_size, "version": GENERATOR_VERSION}


def split_seeds(seed: int) -> dict[str, int]:
    """One seed per split, derived from the data seed (no image appears in two splits)."""
    return {name: seed * 100 + k for k, name in enumerate(SPLITS, start=1)}


def _generate(cfg: MTTransUNetConfig) -> dict[str, dict[str, np.ndarray]]:
    syn = cfg.data.synthetic
    spec = dermoscopy.LesionSpec.from_overrides(syn.spec)
    seeds = split_seeds(syn.seed)
    sizes = {
        "masked": syn.masked_images,
        "unmasked": syn.unmasked_images,
        "val": syn.val_images,
        "test": syn.test_images,
        "shifted_test": syn.shifted_test_images,
    }
    out = {}
    for name, n in sizes.items():
        domain = "ph2" if name == "shifted_test" else "isic"
        g = dermoscopy.generate(n, seed=seeds[name], size=cfg.data.image_size, domain=domain, spec=spec)
        out[name] = {k: g[k] for k in ("images", "masks", "labels")}
    return out


def prepare_synthetic(cfg: MTTransUNetConfig, root: Path, access: AccessLog) -> MTData:
    settings = synthetic_settings(cfg)
    directory = cache.cache_dir(root, "mt_transunet", settings)
    arrays = cache.cached_splits(directory, SPLITS, lambda: _generate(cfg), settings=settings, what="dermoscopy images")
    sets = {k: lesion_set(v) for k, v in arrays.items()}
    sets["unmasked"] = sets["unmasked"].without_masks()  # generated masks exist but are never used (nor counted)
    shifted = GuardedSet("shifted_test", sets["shifted_test"], access) if len(sets["shifted_test"]) else None
    return MTData(
        masked=sets["masked"],
        unmasked=sets["unmasked"],
        val=GuardedSet("val", sets["val"], access),
        test=GuardedSet("test", sets["test"], access),
        shifted_test=shifted,
        info=data_info(sets, source="synthetic"),
    )


# ------------------------------------------------------------------------------------------------- real


def prepare_real(cfg: MTTransUNetConfig, access: AccessLog) -> MTData:
    """ISIC-2017 (+ PH2) from the configured folders (:mod:`thrifty.data.skin_lesions`)."""
    from thrifty.data import skin_lesions

    real, size = cfg.data.real, cfg.data.image_size
    if not real.root:
        raise ValueError("data.source=isic2017 needs config key 'data.real.root' (the ISIC-2017 folder)")
    root = Path(real.root).expanduser()

    def isic(images: str, labels: str, masks: str | None) -> LesionSet:
        records = skin_lesions.scan_isic2017(
            root / images, root / labels, masks_dir=root / masks if masks else None,
            image_pattern=real.image_pattern, mask_pattern=real.mask_pattern,
        )  # fmt: skip
        return lesion_set(skin_lesions.load_lesions(records, size=size))

    sets = {
        "masked": isic(real.train_images, real.train_labels, real.train_masks),
        "val": isic(real.val_images, real.val_labels, real.val_masks),
        "test": isic(real.test_images, real.test_labels, real.test_masks),
    }
    if real.extra_images:
        sets["unmasked"] = isic(real.extra_images, real.extra_labels, None).without_masks()
    else:
        log.warning(
            "no mask-free images (data.real.extra_images is empty): every batch is drawn from the masked images, so "
            "the dual-task consistency sees no mask-free image; the release trains with ISIC-2017's 1,320 "
            "'Training_addition' images"
        )
        sets["unmasked"] = sets["masked"].subset([]).without_masks()
    shifted = None
    if real.ph2_root:
        ph2 = lesion_set(skin_lesions.load_lesions(skin_lesions.scan_ph2(Path(real.ph2_root).expanduser()), size=size))
        sets["shifted_test"] = ph2
        shifted = GuardedSet("shifted_test", ph2, access)
    return MTData(
        masked=sets["masked"],
        unmasked=sets["unmasked"],
        val=GuardedSet("val", sets["val"], access),
        test=GuardedSet("test", sets["test"], access),
        shifted_test=shifted,
        info=data_info(sets, source="isic2017"),
    )


def data_info(sets: dict[str, LesionSet], *, source: str) -> dict[str, Any]:
    """Split sizes and class counts (for ``results.json``)."""
    info: dict[str, Any] = {"source": source, "classes": list(CLASSES)}
    for name, s in sets.items():
        counts = np.bincount(s.labels.numpy(), minlength=len(CLASSES)).tolist() if len(s) else [0] * len(CLASSES)
        info[name] = {"images": len(s), "with_mask": int(s.has_mask.sum()), "class_counts": counts}
    return info


def prepare_data(cfg: MTTransUNetConfig, root: Path, access: AccessLog) -> MTData:
    if cfg.data.source == "synthetic":
        return prepare_synthetic(cfg, root, access)
    return prepare_real(cfg, access)
