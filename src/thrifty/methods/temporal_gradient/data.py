"""Data of the temporal-gradient recipe (Xiao et al., CVPR 2022, arXiv 2111.13241): videos, labelled subsets,
the two streams of clips and their views.

Synthetic (the card's miniature, :mod:`thrifty.data.motion_videos`): train / validation / test splits of
``MotionVideos``, each from its own seed and its own MNIST digit pool, cached as ``.npz``. The labelled subset is
a stratified ``labelled_fraction`` of the training split; the unlabelled stream is the whole training split (the
release's setting). Validation and test are wrapped in :class:`~thrifty.core.splits.Guarded`, so every read names
its purpose (``access_log.jsonl``) and the test split never reaches model selection.

Clips follow the release's pairing (``build_rawframes_temporal_gradient.py`` and ``RawFrameDecode_Custom``): for a
sampled raw index ``i`` (``i >= context`` of the modality, 1 for TG) the RGB frame is ``I[i - context]`` and the TG
frame is ``(I[i-1] - I[i] + 1) / 2``; the method card's "``I_{t-1} - I_t``" with the RGB frame ``I_t`` was an
inference the release does not bear out (its RGB frame is the *earlier* frame of the pair).
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
from thrifty.data import motion_videos
from thrifty.methods.temporal_gradient import augment, tg
from thrifty.methods.temporal_gradient.config import RGB_NORMS, TemporalGradientConfig
from thrifty.methods.temporal_gradient.real import VideoFiles, load_real
from thrifty.methods.temporal_gradient.sampling import frame_indices, stratified_subset

log = logging.getLogger(__name__)

VAL_PURPOSES = ("selection", "calibration", "figure")
TEST_PURPOSES = ("final_test", "figure")
SPLITS = ("train", "val", "test")
GENERATOR_VERSION = 1


@dataclasses.dataclass
class VideoSet:
    """Decoded videos: ``videos`` uint8 (N, F, H, W, 3), ``labels`` int64 (N,)."""

    videos: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> VideoSet:
        idx = np.asarray(idx, dtype=np.int64)
        return VideoSet(self.videos[idx], self.labels[idx])

    def clips(
        self,
        rows: np.ndarray,
        cfg: TemporalGradientConfig,
        *,
        context: int,
        rng: np.random.Generator | None,
        test_mode: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The videos of ``rows`` as float (n, 3, F, H, W) in [0, 1] and their sampled raw indices int64
        (n, num_clips, clip_len) (the same interface as :class:`~thrifty.methods.temporal_gradient.real.VideoFiles`)."""
        rows = np.asarray(rows, dtype=np.int64)
        idx = frame_indices(len(rows), self.videos.shape[1], cfg, context=context, rng=rng, test_mode=test_mode)
        return to_float(self.videos[rows]), torch.from_numpy(idx)


class GuardedVideos(Guarded["VideoSet | VideoFiles"]):
    """Validation or test videos that can only be read by naming an allowed purpose."""

    def __init__(self, split: str, data: VideoSet | VideoFiles, access: AccessLog) -> None:
        super().__init__(split, data, access, allowed=VAL_PURPOSES if split == "val" else TEST_PURPOSES)


@dataclasses.dataclass
class TGData:
    """Everything a unit trains and is judged on.

    Attributes:
        class_names: output order.
        train: the training split (the unlabelled stream draws from all of it).
        val / test: guarded held-out splits.
        seed: the data seed (labelled subsets are drawn from it, so every arm and seed sees the same labels).
        info: sizes and settings for ``results.json``.
        labelled: a fixed labelled subset (a real dataset's ``data.real.labelled_list``), else None.
    """

    class_names: list[str]
    train: VideoSet | VideoFiles
    val: GuardedVideos
    test: GuardedVideos
    seed: int
    info: dict[str, Any]
    labelled: np.ndarray | None = None

    def labelled_indices(self, fraction: float) -> np.ndarray:
        """Rows of the labelled subset at ``fraction`` (stratified; nested across fractions), or the rows a
        release-style list named (``data.real.labelled_list``)."""
        if self.labelled is not None:
            return self.labelled
        return stratified_subset(self.train.labels, fraction, seed=self.seed)


# ------------------------------------------------------------------------------------------------- synthetic


def synthetic_settings(cfg: TemporalGradientConfig) -> dict[str, Any]:
    """What the cached synthetic splits depend on (their cache key)."""
    return {
        "synthetic": dataclasses.asdict(cfg.data.synthetic),
        "spec": motion_videos.MotionSpec(**cfg.data.synthetic.spec).to_dict(),
        "version": GENERATOR_VERSION,
    }


def _split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split),)).generate_state(1)[0])


def load_synthetic(cfg: TemporalGradientConfig, root: Path) -> dict[str, VideoSet]:
    """The three ``MotionVideos`` splits, generated once and cached under ``root``."""
    syn = cfg.data.synthetic
    spec = motion_videos.MotionSpec(**syn.spec)
    sizes = {"train": syn.train_videos, "val": syn.val_videos, "test": syn.test_videos}

    def build() -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for split, n in sizes.items():
            batch = motion_videos.generate(
                n, seed=_split_seed(syn.seed, split), split=split, spec=spec, num_frames=syn.num_frames, size=syn.size
            )
            out[split] = {"videos": batch.videos, "labels": batch.labels}
        return out

    settings = synthetic_settings(cfg)
    d = cache.cache_dir(root, "temporal_gradient", settings)
    arrays = cache.cached_splits(d, SPLITS, build, settings=settings, what="motion videos")
    return {s: VideoSet(a["videos"], a["labels"].astype(np.int64)) for s, a in arrays.items()}


def prepare_data(cfg: TemporalGradientConfig, root: Path, access: AccessLog) -> TGData:
    """The recipe's data: the synthetic miniature (decoded in memory, cached under ``root``) or a real dataset
    (:mod:`~thrifty.methods.temporal_gradient.real`, decoded clip by clip)."""
    labelled_rows = None
    if cfg.data.source == "synthetic":
        splits: dict[str, VideoSet | VideoFiles] = dict(load_synthetic(cfg, root))
        classes, seed = list(motion_videos.MOTION_CLASSES), cfg.data.synthetic.seed
        frames, size = int(splits["train"].videos.shape[1]), int(splits["train"].videos.shape[2])
    else:
        real_splits, classes, labelled_rows = load_real(cfg)
        splits = dict(real_splits)
        seed, frames, size = cfg.data.real.seed, None, cfg.data.real.short_side
    data = TGData(
        class_names=classes,
        train=splits["train"],
        val=GuardedVideos("val", splits["val"], access),
        test=GuardedVideos("test", splits["test"], access),
        seed=seed,
        info={},
        labelled=labelled_rows,
    )
    labelled = data.labelled_indices(cfg.data.labelled_fraction)
    data.info = {
        "source": cfg.data.source,
        "classes": data.class_names,
        "train_videos": len(data.train),
        "labelled_videos": len(labelled),
        "labelled_fraction": cfg.data.labelled_fraction if labelled_rows is None else len(labelled) / len(data.train),
        "val_videos": len(splits["val"]),
        "test_videos": len(splits["test"]),
        "frames": frames,
        "size": size,
    }
    return data


# ---------------------------------------------------------------------------------------------------- streams


def stream_indices(n: int, count: int, *, seed: int, stream: int, step: int, rank: int, world: int) -> np.ndarray:
    """``count`` rows of a stream of ``n`` items for (``step`` >= 1, ``rank``): epochs of seeded permutations
    dealt out in order, so the ranks of one step take disjoint slices and together cover every epoch exactly
    (a ``DistributedSampler`` per stream, stateless, hence resumable)."""
    if n < 1 or count < 1:
        raise ValueError(f"a stream needs n >= 1 and count >= 1, got n={n}, count={count}")
    start = ((step - 1) * world + rank) * count
    pos = np.arange(start, start + count)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(pos // n):
        perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, int(epoch)))).permutation(n)
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


def context_of(modality: str) -> int:
    """How many raw frames before a sampled index the modality reads (TG: 1); unknown names are a ValueError."""
    if modality not in tg.MODALITIES:
        raise ValueError(f"unknown motion modality {modality!r}; known: {', '.join(sorted(tg.MODALITIES))}")
    return tg.MODALITIES[modality].context


def to_float(videos: np.ndarray) -> torch.Tensor:
    """uint8 (N, F, H, W, 3) -> float (N, 3, F, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(videos)).permute(0, 4, 1, 2, 3).float().div_(255.0)


def rgb_clip(video: torch.Tensor, indices: torch.Tensor, modality: str) -> torch.Tensor:
    """The RGB clip (N, 3, T, H, W) of ``video`` (N, 3, F, H, W) at sampled ``indices`` (N, T): frame
    ``I[i - context]``, the earlier frame of the modality's pair (the release's pairing)."""
    return tg.gather_frames(video, indices - context_of(modality))


def two_streams(video: torch.Tensor, indices: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The RGB clip (:func:`rgb_clip`) and the motion clip (the modality at each sampled ``i``) of ``video``
    (N, 3, F, H, W) at ``indices`` (N, T): each (N, 3, T, H, W)."""
    return rgb_clip(video, indices, modality), tg.motion_modality(modality, video, indices)


def weak_views(
    rgb: torch.Tensor, motion: torch.Tensor, cfg: TemporalGradientConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop and flip drawn once per clip and applied identically to both streams (an empty
    ``motion`` stays empty: the RGB-only arms)."""
    d = cfg.data
    params = augment.sample_crop_flip(
        len(rgb),
        rgb.shape[-2],
        rgb.shape[-1],
        generator=gen,
        scale=tuple(d.crop_area),
        ratio=tuple(d.crop_ratio),
        flip_p=d.flip_p,
    )
    out = augment.apply_crop_flip(rgb, params, d.crop_size)
    if len(motion) == 0:
        return out, out[:0]
    return out, augment.apply_crop_flip(motion, params, d.crop_size)


def normalised(x: torch.Tensor, mode: str = "dataset") -> torch.Tensor:
    """``dataset``: RGB's (ImageNet) mean and std, for both streams (the card and the release's
    ``Normalize_Diff``); ``clip``: :func:`~thrifty.methods.temporal_gradient.tg.standardise_clip` (the synthetic
    miniature's RGB stream, ``data.rgb_norm``). ``x`` (N, 3, T, H, W)."""
    if mode == "clip":
        return tg.standardise_clip(x)
    if mode != "dataset":
        raise ValueError(f"normalisation must be one of {RGB_NORMS}, got {mode!r}")
    return tg.normalise(x, tg.RGB_MEAN, tg.RGB_STD)


@dataclasses.dataclass
class StepClips:
    """One step's clips, normalised, each (n, 3, T, S, S): the labelled weak views with their labels, and the
    unlabelled weak and strong views with their hidden labels (for pseudo-label diagnostics only)."""

    rgb_l: torch.Tensor
    tg_l: torch.Tensor
    y_l: torch.Tensor
    rgb_uw: torch.Tensor
    tg_uw: torch.Tensor
    rgb_us: torch.Tensor
    tg_us: torch.Tensor
    y_u: torch.Tensor

    def to(self, device: torch.device) -> StepClips:
        return StepClips(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def draw_step(
    data: TGData,
    labelled: np.ndarray,
    cfg: TemporalGradientConfig,
    *,
    seed: int,
    step: int,
    rank: int,
    world: int,
    gen: torch.Generator,
    unlabelled: bool,
    motion: bool = True,
) -> StepClips:
    """The clips of one step: ``labelled_per_step / world`` labelled clips and (when ``unlabelled``) as many
    unlabelled ones from the whole training split, each stream with its own sampler. ``motion=False`` (the
    RGB-only arms) skips the motion stream: its tensors are then empty."""
    d = cfg.data
    n_l, n_u = d.labelled_per_step // world, d.unlabelled_per_step // world
    rows_l = labelled[stream_indices(len(labelled), n_l, seed=seed, stream=0, step=step, rank=rank, world=world)]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, step, rank)))
    context = context_of(d.modality)

    def clips(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        video, idx = data.train.clips(rows, cfg, context=context, rng=rng, test_mode=False)
        idx = idx[:, 0]
        if not motion:
            rgb = rgb_clip(video, idx, d.modality)
            return weak_views(rgb, rgb[:0], cfg, gen)
        rgb, moving = two_streams(video, idx, d.modality)
        return weak_views(rgb, moving, cfg, gen)

    rgb_l, tg_l = clips(rows_l)
    empty = torch.zeros((0, *rgb_l.shape[1:]))
    if unlabelled and n_u:
        rows_u = stream_indices(len(data.train), n_u, seed=seed, stream=1, step=step, rank=rank, world=world)
        rgb_uw, tg_uw = clips(rows_u)
        if motion:  # the weak view's crop, each stream its own strong draws (as released)
            rgb_us, tg_us = augment.strong_augment_pair(rgb_uw, tg_uw, generator=gen)
        else:
            rgb_us, tg_us = augment.strong_augment(rgb_uw, generator=gen), tg_uw
        y_u = torch.from_numpy(data.train.labels[rows_u])
    else:
        rgb_uw = tg_uw = rgb_us = tg_us = empty
        y_u = torch.zeros(0, dtype=torch.int64)
    norm = d.rgb_norm
    return StepClips(
        normalised(rgb_l, norm),
        normalised(tg_l),
        torch.from_numpy(data.train.labels[rows_l]),
        normalised(rgb_uw, norm),
        normalised(tg_uw),
        normalised(rgb_us, norm),
        normalised(tg_us),
        y_u,
    )


def eval_views(split: VideoSet | VideoFiles, rows: np.ndarray, cfg: TemporalGradientConfig) -> torch.Tensor:
    """Test-time RGB views of the videos ``rows`` of ``split``: (N, V, 3, T, S, S) normalised, V = test_clips x
    test_crops (evenly spaced clips; the short side resized to ``crop_size``, then one centre or three crops)."""
    d = cfg.data
    video, indices = split.clips(rows, cfg, context=context_of(d.modality), rng=None, test_mode=True)
    views = []
    for c in range(indices.shape[1]):
        rgb = augment.resize_short(rgb_clip(video, indices[:, c], d.modality), d.crop_size)
        if cfg.test_crops == 3:
            views.extend(augment.three_crop(rgb, d.crop_size).unbind(1))
        else:
            h, w = rgb.shape[-2:]
            top, left = (h - d.crop_size) // 2, (w - d.crop_size) // 2
            views.append(rgb[..., top : top + d.crop_size, left : left + d.crop_size])
    n = len(video)
    return normalised(torch.stack(views, dim=1).flatten(0, 1), d.rgb_norm).unflatten(0, (n, len(views)))
