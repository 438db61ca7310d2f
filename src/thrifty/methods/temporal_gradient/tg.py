"""Temporal gradient (TG) and other motion modalities of Xiao et al., *Learning from Temporal Gradient for
Semi-supervised Action Recognition* (CVPR 2022, arXiv 2111.13241).

TG is the frame difference ``TG_t = (I_{t-1} - I_t + 255) / 2`` on uint8 frames, i.e. ``(I_{t-1} - I_t + 1) / 2``
on frames in [0, 1]: a static pixel maps to mid-grey (0.5) and the result stays in [0, 1], so TG is fed to a
network exactly like RGB and normalised with RGB's mean and std.

The official release (lambert-x/video-semisup) precomputes TG offline
(``tools/data/build_rawframes_temporal_gradient.py`` L73-94): for 1-based raw frame files ``img_k`` it writes
``tempgrad_k = uint8((img_k - img_{k+1} + 255) / 2)`` as JPEG, and ``RawFrameDecode_Custom``
(``mmaction/datasets/pipelines/custom_temporal.py`` L326-345) loads ``tempgrad_k`` at the same index as the RGB
frame ``img_k``, with ``SampleFrames_Custom(total_frames_offset=-1)`` (L234) keeping ``k + 1`` inside the video. So
the release pairs the RGB frame at sampled index ``s`` with ``(I_s - I_{s+1} + 255) / 2`` -- its *following* raw
frame. Here :func:`temporal_gradient` computes the gradient exactly, on the fly, at each sampled ``t`` from its
*preceding* frame, ``(I_{t-step} - I_t + 1) / 2``; passing ``indices + 1`` reproduces the release's pairing.

Shapes: a video is float in [0, 1] with shape ``(..., C, F, H, W)`` (channels, then all F raw frames); sampled
indices are a LongTensor ``(T,)`` (the same frames for every video) or ``(N, T)`` (per video, for a video batch
``(N, C, F, H, W)``); every modality returns ``(..., C, T, H, W)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "MODALITIES",
    "RGB_MEAN",
    "RGB_STD",
    "Modality",
    "gather_frames",
    "motion_modality",
    "normalise",
    "register_modality",
    "standardise_clip",
    "temporal_gradient",
    "temporal_gradient_uint8",
]

#: The release's ``img_norm_cfg`` (config ``r3d_r18_8x8x1_180e_ucf101_rgb_offlinetg_5percent_...``, L83-84:
#: mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375] on 0-255, RGB order) converted to [0, 1]. The same
#: config normalises TG ("imgs_diff") with these values too (``Normalize_Diff``, L97, ``raw_to_diff=False``).
RGB_MEAN: tuple[float, float, float] = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)
RGB_STD: tuple[float, float, float] = (58.395 / 255.0, 57.12 / 255.0, 57.375 / 255.0)


def _check_video(video: Tensor, *, name: str = "video") -> None:
    if not isinstance(video, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.ndim < 4:
        raise ValueError(f"{name} must have shape (..., C, F, H, W), got {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(
            f"{name} must be floating point in [0, 1], got {video.dtype} (use temporal_gradient_uint8 for uint8)"
        )
    if video.numel() and (bool(torch.isnan(video).any()) or video.min() < 0 or video.max() > 1):
        raise ValueError(f"{name} values must lie in [0, 1]")


def _check_indices(indices: Tensor, video: Tensor, *, first: int) -> None:
    if not isinstance(indices, Tensor) or indices.dtype != torch.long:
        raise ValueError("indices must be a LongTensor of shape (T,) or (N, T)")
    if indices.ndim == 2:
        if video.ndim != 5 or video.shape[0] != indices.shape[0]:
            raise ValueError(
                f"indices of shape (N, T)={tuple(indices.shape)} need a video batch (N, C, F, H, W) with the same "
                f"N, got video shape {tuple(video.shape)}"
            )
    elif indices.ndim != 1:
        raise ValueError(f"indices must have shape (T,) or (N, T), got {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    num_frames = video.shape[-3]
    lo, hi = int(indices.min()), int(indices.max())
    if lo < first:
        raise ValueError(f"sampled index {lo} < {first}: it has no frame {first} steps before it")
    if hi >= num_frames:
        raise ValueError(f"sampled index {hi} out of range for a video of {num_frames} frames")


def _gather(video: Tensor, indices: Tensor) -> Tensor:
    """Frames of ``video`` (..., C, F, H, W) at ``indices`` (T,) or (N, T), already validated -> (..., C, T, H, W)."""
    if indices.ndim == 1:
        return video.index_select(-3, indices.to(video.device))
    n, c, _, h, w = video.shape
    idx = indices.to(video.device)[:, None, :, None, None].expand(n, c, indices.shape[1], h, w)
    return torch.gather(video, 2, idx)


def gather_frames(video: Tensor, indices: Tensor) -> Tensor:
    """The raw frames at the sampled indices (the "rgb" modality).

    Args:
        video: (..., C, F, H, W) float in [0, 1].
        indices: LongTensor (T,) or (N, T) (the latter for video (N, C, F, H, W)), each in [0, F).

    Returns:
        (..., C, T, H, W), a copy.
    """
    _check_video(video)
    _check_indices(indices, video, first=0)
    return _gather(video, indices)


def temporal_gradient(video: Tensor, indices: Tensor, *, step: int = 1) -> Tensor:
    """Exact temporal gradient ``(I_{t-step} - I_t + 1) / 2`` at every sampled frame ``t``.

    For uint8 frames this is the paper's ``(I_{t-1} - I_t + 255) / 2`` divided by 255; the output lies in [0, 1] and
    a static pixel gives exactly 0.5. ``step > 1`` is a multi-step difference. No JPEG round trip, no truncation.

    Args:
        video: (..., C, F, H, W) float in [0, 1] (all raw frames, so each sampled ``t`` has its predecessor).
        indices: LongTensor (T,) or (N, T) (the latter for video (N, C, F, H, W)); each index must satisfy
            ``step <= t < F``, else ValueError.
        step: frame distance of the difference, >= 1.

    Returns:
        (..., C, T, H, W) in [0, 1], same dtype as ``video``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    _check_video(video)
    _check_indices(indices, video, first=step)
    prev = _gather(video, indices - step)
    cur = _gather(video, indices)
    return (prev - cur + 1.0) * 0.5


def temporal_gradient_uint8(frames: Tensor) -> Tensor:
    """The release's offline per-frame TG on uint8 frames: ``floor((I_k - I_{k+1} + 255) / 2)`` for k = 0..F-2.

    This mirrors ``tools/data/build_rawframes_temporal_gradient.py`` L83-94 of lambert-x/video-semisup: float
    difference plus 255, halved, then ``astype(np.uint8)`` (which truncates, so a static pixel gives 127, not 127.5).
    Entry ``k`` is what the release stores as ``tempgrad_{k+1:05d}.jpg`` and loads beside RGB frame ``k`` (0-based).
    The release then writes it as JPEG, which is lossy; we do not copy that (there is no JPEG step here), and the
    training path uses the exact float :func:`temporal_gradient` instead.

    Args:
        frames: uint8 (..., C, F, H, W) with F >= 2.

    Returns:
        uint8 (..., C, F - 1, H, W).
    """
    if not isinstance(frames, Tensor) or frames.dtype != torch.uint8:
        raise ValueError("frames must be a uint8 torch.Tensor")
    if frames.ndim < 4 or frames.shape[-3] < 2:
        raise ValueError(f"frames must have shape (..., C, F, H, W) with F >= 2, got {tuple(frames.shape)}")
    x = frames.to(torch.int16)
    prev, cur = x[..., :-1, :, :], x[..., 1:, :, :]
    return torch.div(prev - cur + 255, 2, rounding_mode="floor").to(torch.uint8)


@dataclasses.dataclass(frozen=True)
class Modality:
    """A motion (or appearance) modality: ``fn(video (..., C, F, H, W), indices (T,) | (N, T)) -> (..., C, T, H, W)``.

    ``context`` is how many raw frames before the first sampled index ``fn`` reads (1 for TG), so a sampler can
    keep every sampled index ``>= context``.
    """

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    context: int = 0

    def __call__(self, video: Tensor, indices: Tensor) -> Tensor:
        return self.fn(video, indices)


#: Registered modalities by name; extend with :func:`register_modality`.
MODALITIES: dict[str, Modality] = {}


def register_modality(
    name: str, fn: Callable[[Tensor, Tensor], Tensor], *, context: int = 0, overwrite: bool = False
) -> Modality:
    """Register ``fn(video, indices) -> (..., C, T, H, W)`` under ``name``.

    Args:
        name: registry key (non-empty).
        fn: the modality; must accept the shapes of :func:`temporal_gradient`.
        context: raw frames needed before the first sampled index (>= 0).
        overwrite: replace an existing entry instead of raising ValueError.

    Returns:
        The registered :class:`Modality`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("modality name must be a non-empty string")
    if not callable(fn):
        raise ValueError(f"modality {name!r}: fn must be callable")
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"modality {name!r}: context must be an int >= 0, got {context!r}")
    if name in MODALITIES and not overwrite:
        raise ValueError(f"modality {name!r} is already registered (pass overwrite=True to replace it)")
    modality = Modality(name=name, fn=fn, context=context)
    MODALITIES[name] = modality
    return modality


def motion_modality(name: str, video: Tensor, indices: Tensor) -> Tensor:
    """Compute the registered modality ``name`` ("tg", "tg2", "rgb", ...) of ``video`` at ``indices``.

    Args:
        name: a key of :data:`MODALITIES`; an unknown name raises ValueError listing the known ones.
        video: (..., C, F, H, W) float in [0, 1].
        indices: LongTensor (T,) or (N, T).

    Returns:
        (..., C, T, H, W).
    """
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(sorted(MODALITIES))}")
    return MODALITIES[name](video, indices)


def _tg1(video: Tensor, indices: Tensor) -> Tensor:
    return temporal_gradient(video, indices, step=1)


def _tg2(video: Tensor, indices: Tensor) -> Tensor:
    return temporal_gradient(video, indices, step=2)


register_modality("tg", _tg1, context=1)
register_modality("tg2", _tg2, context=2)
register_modality("rgb", gather_frames, context=0)


def normalise(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Channel-wise ``(x - mean) / std``.

    Args:
        x: (N, C, T, H, W) or (C, T, H, W) float (RGB or TG, both in [0, 1]; the card normalises TG with
            :data:`RGB_MEAN` / :data:`RGB_STD`).
        mean: C values.
        std: C positive values.

    Returns:
        Same shape as ``x``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point torch.Tensor")
    if x.ndim not in (4, 5):
        raise ValueError(f"x must have shape (N, C, T, H, W) or (C, T, H, W), got {tuple(x.shape)}")
    channels = x.shape[-4]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).flatten()
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).flatten()
    if m.numel() != channels or s.numel() != channels:
        raise ValueError(f"mean and std need {channels} values each, got {m.numel()} and {s.numel()}")
    if bool((s <= 0).any()):
        raise ValueError("std must be positive")
    return (x - m.view(channels, 1, 1, 1)) / s.view(channels, 1, 1, 1)


def standardise_clip(x: Tensor, *, eps: float = 1e-3) -> Tensor:
    """Per-clip, per-channel standardisation: each clip's channel minus its mean over (T, H, W), divided by its std.

    The synthetic miniature's RGB input (``data.rgb_norm: clip``): its videos draw their background and object
    colours and their brightness at random, and a fixed dataset normalisation leaves each clip a large random
    per-channel offset that the tiny R3D-18 does not learn past (see the recipe README, calibration pilot).

    Args:
        x: (N, C, T, H, W) float.
        eps: the smallest std divided by (a constant clip maps to zeros).

    Returns:
        Same shape; every (clip, channel) has mean 0 and std 1 (or is 0 where constant).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 5:
        raise ValueError(f"x must be a floating-point (N, C, T, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if x.numel() == 0:
        return x.clone()
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    std = x.std(dim=(2, 3, 4), keepdim=True, correction=0)
    return (x - mean) / std.clamp_min(eps)
