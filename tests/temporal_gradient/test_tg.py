"""Temporal gradient (Xiao et al., CVPR 2022, arXiv 2111.13241): exact values, shapes, registry, normalisation."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.temporal_gradient.tg import (
    MODALITIES,
    RGB_MEAN,
    RGB_STD,
    gather_frames,
    motion_modality,
    normalise,
    register_modality,
    standardise_clip,
    temporal_gradient,
    temporal_gradient_uint8,
)


def _video(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_static_video_gives_half() -> None:
    frame = _video(3, 1, 6, 5)
    video = frame.expand(3, 10, 6, 5).clone()
    tg = temporal_gradient(video, torch.tensor([1, 4, 9]))
    assert tg.shape == (3, 3, 6, 5)
    assert torch.equal(tg, torch.full_like(tg, 0.5))


@pytest.mark.parametrize("delta", [0.01, 0.05, 0.1])
def test_brightness_ramp_gives_half_minus_delta_over_two(delta: float) -> None:
    base = 0.1 + 0.2 * _video(2, 3, 1, 4, 4)
    video = (base + delta * torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1)).clamp(0, 1)
    assert video.max() <= 1.0
    tg = temporal_gradient(video, torch.tensor([1, 3, 5, 7]))
    torch.testing.assert_close(tg, torch.full_like(tg, 0.5 - delta / 2), atol=1e-6, rtol=0)


def test_hand_computed_example() -> None:
    # one channel, 3 frames of 1x2 pixels
    video = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.25]]]])  # (C=1, F=3, H=1, W=2)
    tg = temporal_gradient(video, torch.tensor([1, 2]))
    expected = torch.tensor([[[[0.25, 0.875]], [[0.25, 0.5]]]])  # (0-0.5+1)/2, (1-0.25+1)/2; (0.5-1+1)/2, 0.5
    torch.testing.assert_close(tg, expected)
    tg2 = temporal_gradient(video, torch.tensor([2]), step=2)
    torch.testing.assert_close(tg2, torch.tensor([[[[0.0, 0.875]]]]))  # (0-1+1)/2, (1-0.25+1)/2


def test_batched_matches_unbatched_and_per_video_indices() -> None:
    video = _video(4, 3, 12, 5, 6)
    idx = torch.tensor([2, 5, 8, 11])
    batched = temporal_gradient(video, idx)
    assert batched.shape == (4, 3, 4, 5, 6)
    for n in range(4):
        torch.testing.assert_close(batched[n], temporal_gradient(video[n], idx))
    per_video = torch.tensor([[1, 2], [3, 4], [5, 6], [10, 11]])
    out = temporal_gradient(video, per_video)
    assert out.shape == (4, 3, 2, 5, 6)
    for n in range(4):
        torch.testing.assert_close(out[n], temporal_gradient(video[n], per_video[n]))
    # extra leading dims are fine with (T,) indices
    assert temporal_gradient(video.unsqueeze(0), idx).shape == (1, 4, 3, 4, 5, 6)


def test_range_and_no_grad_needed() -> None:
    video = _video(2, 3, 6, 4, 4)
    tg = temporal_gradient(video, torch.tensor([1, 2, 3]))
    assert tg.min() >= 0 and tg.max() <= 1
    assert not tg.requires_grad
    extreme = torch.zeros(1, 2, 1, 1)
    extreme[:, 0] = 1.0
    assert temporal_gradient(extreme, torch.tensor([1])).item() == 1.0


def test_index_errors() -> None:
    video = _video(3, 6, 4, 4)
    with pytest.raises(ValueError, match="no frame"):
        temporal_gradient(video, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no frame"):
        temporal_gradient(video, torch.tensor([1, 3]), step=2)
    with pytest.raises(ValueError, match="out of range"):
        temporal_gradient(video, torch.tensor([6]))
    with pytest.raises(ValueError):
        temporal_gradient(video, torch.tensor([1.0]))
    with pytest.raises(ValueError):
        temporal_gradient(video, torch.tensor([[1, 2]]))  # (N, T) indices need a 5-D batch
    with pytest.raises(ValueError):
        temporal_gradient(video * 2, torch.tensor([1]))
    with pytest.raises(ValueError):
        temporal_gradient(video, torch.tensor([1]), step=0)


def test_uint8_release_form() -> None:
    frames = torch.tensor([10, 10, 11, 0, 255], dtype=torch.uint8).view(1, 5, 1, 1)  # (C, F, H, W)
    tg = temporal_gradient_uint8(frames)
    assert tg.dtype == torch.uint8 and tg.shape == (1, 4, 1, 1)
    # floor((I_k - I_{k+1} + 255) / 2): static -> 127 (truncated 127.5), as astype(np.uint8) does in the release
    assert tg.flatten().tolist() == [127, 127, 133, 0]
    # it is the exact float TG at t = k + 1, times 255, truncated
    video = frames.float() / 255
    exact = temporal_gradient(video, torch.arange(1, 5)) * 255
    assert torch.equal(torch.floor(exact + 1e-4).to(torch.uint8), tg)
    with pytest.raises(ValueError):
        temporal_gradient_uint8(video)


def test_registry_builtins_and_custom() -> None:
    video = _video(2, 3, 10, 4, 4)
    idx = torch.tensor([2, 6, 9])
    assert {"tg", "tg2", "rgb"} <= set(MODALITIES)
    torch.testing.assert_close(motion_modality("tg", video, idx), temporal_gradient(video, idx))
    torch.testing.assert_close(motion_modality("tg2", video, idx), temporal_gradient(video, idx, step=2))
    torch.testing.assert_close(motion_modality("rgb", video, idx), video[:, :, idx])
    torch.testing.assert_close(gather_frames(video, idx), video[:, :, idx])
    assert MODALITIES["tg"].context == 1 and MODALITIES["tg2"].context == 2 and MODALITIES["rgb"].context == 0

    with pytest.raises(ValueError, match=r"known: .*rgb.*tg"):
        motion_modality("flow", video, idx)
    with pytest.raises(ValueError, match="already registered"):
        register_modality("tg", lambda v, i: v)
    try:
        register_modality("tg3_test", lambda v, i: temporal_gradient(v, i, step=3), context=3)
        torch.testing.assert_close(
            motion_modality("tg3_test", video, idx[1:]), temporal_gradient(video, idx[1:], step=3)
        )
    finally:
        MODALITIES.pop("tg3_test", None)


def test_normalise_uses_release_constants() -> None:
    assert pytest.approx((0.485, 0.456, 0.406), abs=1e-3) == RGB_MEAN  # the ImageNet statistics
    assert pytest.approx((0.229, 0.224, 0.225), abs=1e-3) == RGB_STD
    x = _video(2, 3, 4, 5, 5)
    out = normalise(x, RGB_MEAN, RGB_STD)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (x[:, c] - RGB_MEAN[c]) / RGB_STD[c])
    torch.testing.assert_close(normalise(x[0], RGB_MEAN, RGB_STD), out[0])
    # a static video's TG (0.5) normalises to (0.5 - mean) / std, per channel
    tg = torch.full((3, 2, 2, 2), 0.5)
    torch.testing.assert_close(
        normalise(tg, RGB_MEAN, RGB_STD)[:, 0, 0, 0], (0.5 - torch.tensor(RGB_MEAN)) / torch.tensor(RGB_STD)
    )
    with pytest.raises(ValueError):
        normalise(x[0, 0], RGB_MEAN, RGB_STD)
    with pytest.raises(ValueError):
        normalise(x, RGB_MEAN[:2], RGB_STD[:2])
    with pytest.raises(ValueError):
        normalise(x, RGB_MEAN, (1.0, 0.0, 1.0))


def test_standardise_clip_per_clip_and_channel() -> None:
    x = _video(3, 3, 4, 5, 5)
    # give every clip and channel its own offset and scale: standardising must undo them exactly
    offset, scale = _video(3, 3, 1, 1, 1, seed=1), 0.1 + _video(3, 3, 1, 1, 1, seed=2)
    out = standardise_clip(x * scale + offset)
    torch.testing.assert_close(out, standardise_clip(x), atol=1e-5, rtol=1e-4)
    flat = out.flatten(2)
    torch.testing.assert_close(flat.mean(-1), torch.zeros(3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(-1, correction=0), torch.ones(3, 3), atol=1e-5, rtol=0)
    # a clip's result does not depend on its batch-mates
    torch.testing.assert_close(standardise_clip(x[1:2]), standardise_clip(x)[1:2])
    # a constant clip maps to zeros (no division by zero), an empty batch stays empty
    torch.testing.assert_close(
        standardise_clip(torch.full((1, 3, 2, 2, 2), 0.3)), torch.zeros(1, 3, 2, 2, 2), atol=1e-4, rtol=0
    )
    assert standardise_clip(torch.zeros(0, 3, 2, 4, 4)).shape == (0, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="N, C, T, H, W"):
        standardise_clip(x[0])
