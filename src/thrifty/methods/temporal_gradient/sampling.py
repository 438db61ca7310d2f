"""Which videos and which frames: stratified labelled subsets and MMAction2-style clip sampling, shared by the
in-memory miniature and the real-video path of the temporal-gradient recipe (Xiao et al., CVPR 2022, arXiv
2111.13241)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from thrifty.data.video import sample_clip_indices
from thrifty.methods.temporal_gradient.config import TemporalGradientConfig


def stratified_subset(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """Sorted row indices holding ``max(1, round(fraction * n_c))`` rows of every class ``c`` (n_c rows).

    Each class's rows are permuted once from ``seed`` and the subset takes a prefix, so the subset at a smaller
    fraction is contained in the one at a larger fraction (the label-fraction sweep adds labels, never swaps them).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(17,)))
    keep = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        keep.append(rows[: max(1, round(fraction * len(rows)))])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def frame_indices(
    n: int,
    num_frames: int | Sequence[int],
    cfg: TemporalGradientConfig,
    *,
    context: int,
    rng: np.random.Generator | None,
    test_mode: bool,
) -> np.ndarray:
    """(n, num_clips, clip_len) sampled raw indices, every one >= ``context`` (the modality's predecessor);
    ``num_frames`` is every video's frame count or one count per video."""
    clips = cfg.test_clips if test_mode else 1
    d = cfg.data
    counts = [num_frames] * n if isinstance(num_frames, (int, np.integer)) else list(num_frames)
    if len(counts) != n:
        raise ValueError(f"num_frames lists {len(counts)} counts for {n} videos")
    kwargs = {"clip_len": d.clip_len, "interval": d.frame_interval, "num_clips": clips, "test_mode": test_mode}
    return np.stack(
        [sample_clip_indices(int(f), rng=rng, min_index=max(context, 1), **kwargs) for f in counts]
    ).reshape(n, clips, d.clip_len)
