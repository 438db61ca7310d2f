"""Clip augmentation of the temporal-gradient recipe (Xiao et al., CVPR 2022): shared crop/flip, test views, strong
view."""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.methods.temporal_gradient.augment import (
    STRONG_OPS,
    CropFlip,
    apply_crop_flip,
    resize_short,
    sample_crop_flip,
    strong_augment,
    strong_augment_pair,
    three_crop,
)
from thrifty.methods.temporal_gradient.tg import temporal_gradient


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coords(n: int, t: int, height: int, width: int) -> torch.Tensor:
    """(n, 2, t, H, W): channel 0 = row index, channel 1 = column index."""
    rows = torch.arange(height, dtype=torch.float64).view(height, 1).expand(height, width)
    cols = torch.arange(width, dtype=torch.float64).view(1, width).expand(height, width)
    return torch.stack([rows, cols]).view(1, 2, 1, height, width).expand(n, 2, t, height, width).clone()


def _source_coord(start: int, length: int, out: int) -> torch.Tensor:
    """Source coordinate of each output pixel for a half-pixel-centre bilinear resize of a crop (clamped)."""
    o = torch.arange(out, dtype=torch.float64)
    src = ((o + 0.5) * length / out - 0.5).clamp(0, length - 1)
    return start + src


# ---------------------------------------------------------------------------------------------- crop and flip


def test_crop_boxes_inside_and_area_ratio_within_bounds() -> None:
    height, width = 256, 340
    params = sample_crop_flip(500, height, width, generator=_gen(1))
    assert params.boxes.shape == (500, 4) and params.flips.shape == (500,)
    top, left, h, w = params.boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all())
    assert bool((top + h <= height).all() and (left + w <= width).all())
    area = (h * w).double() / (height * width)
    ratio = w.double() / h.double()
    tol = 0.03  # rounding w and h to pixels
    assert bool((area >= 0.08 * (1 - tol)).all() and (area <= 1.0).all())
    assert bool((ratio >= 0.75 * (1 - tol)).all() and (ratio <= 4 / 3 * (1 + tol)).all())
    assert area.min() < 0.2 and area.max() > 0.8  # the whole area range is used
    assert 0.4 < params.flips.double().mean() < 0.6


def test_crop_fallback_is_centre_square() -> None:
    params = sample_crop_flip(5, 1, 100, generator=_gen(0))  # no candidate of area >= 8 px fits a 1-pixel row
    assert params.boxes.tolist() == [[0, 49, 1, 1]] * 5


def test_same_cropflip_gives_same_geometry() -> None:
    n, t, height, width, out = 6, 3, 24, 30, 9
    params = sample_crop_flip(n, height, width, generator=_gen(3), flip_p=0.5)
    assert params.flips.any() and not params.flips.all()
    coords = apply_crop_flip(_coords(n, t, height, width), params, out)
    assert coords.shape == (n, 2, t, out, out)
    for i, (top, left, h, w) in enumerate(params.boxes.tolist()):
        rows = _source_coord(top, h, out).view(out, 1).expand(out, out)
        cols = _source_coord(left, w, out).view(1, out).expand(out, out)
        if params.flips[i]:
            cols = cols.flip(-1)  # flipping reverses the last axis
        for f in range(t):
            torch.testing.assert_close(coords[i, 0, f], rows)
            torch.testing.assert_close(coords[i, 1, f], cols)

    # two different modalities (RGB and its TG) get identical geometry: processing them jointly along the channel
    # axis equals processing each one alone with the same CropFlip
    video = torch.rand(n, 3, 6, height, width, generator=_gen(4))
    idx = torch.tensor([1, 3, 5])
    rgb, tg = video[:, :, idx], temporal_gradient(video, idx)
    joint = apply_crop_flip(torch.cat([rgb, tg], dim=1), params, out)
    torch.testing.assert_close(joint[:, :3], apply_crop_flip(rgb, params, out))
    torch.testing.assert_close(joint[:, 3:], apply_crop_flip(tg, params, out))
    # and a static clip's TG stays 0.5 (up to float rounding of the bilinear weights) after the crop and flip
    static = temporal_gradient(video[:, :, :1].expand(-1, -1, 4, -1, -1), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(apply_crop_flip(static, params, out), torch.full((n, 3, 3, out, out), 0.5))


def test_crop_without_resize_is_exact_slice() -> None:
    x = torch.rand(2, 3, 2, 10, 12, generator=_gen(5))
    params = CropFlip(
        boxes=torch.tensor([[1, 2, 4, 4], [6, 8, 4, 4]]), flips=torch.tensor([False, True]), height=10, width=12
    )
    out = apply_crop_flip(x, params, 4)
    assert torch.equal(out[0], x[0, :, :, 1:5, 2:6])
    assert torch.equal(out[1], x[1, :, :, 6:10, 8:12].flip(-1))


def test_crop_flip_determinism_and_errors() -> None:
    a = sample_crop_flip(8, 64, 80, generator=_gen(7))
    b = sample_crop_flip(8, 64, 80, generator=_gen(7))
    c = sample_crop_flip(8, 64, 80, generator=_gen(8))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips)
    assert not torch.equal(a.boxes, c.boxes)
    x = torch.rand(8, 3, 2, 64, 80, generator=_gen(0))
    with pytest.raises(ValueError):
        apply_crop_flip(x[:4], a, 16)  # wrong N
    with pytest.raises(ValueError):
        apply_crop_flip(x[..., :60], a, 16)  # wrong image size
    with pytest.raises(ValueError):
        apply_crop_flip(x[0], a, 16)  # wrong ndim
    with pytest.raises(ValueError):
        sample_crop_flip(2, 64, 80, generator=_gen(0), scale=(0.5, 0.2))
    with pytest.raises(ValueError):
        sample_crop_flip(2, 64, 80, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CropFlip(boxes=torch.tensor([[0, 0, 65, 10]]), flips=torch.tensor([False]), height=64, width=80)


# ----------------------------------------------------------------------------------------------- test views


def test_resize_short_and_three_crop_positions() -> None:
    x = torch.rand(2, 3, 2, 30, 40, generator=_gen(9))
    r = resize_short(x, 15)
    assert r.shape == (2, 3, 2, 15, 20)
    assert resize_short(x.transpose(-1, -2), 15).shape == (2, 3, 2, 20, 15)
    assert resize_short(x, 30).shape == x.shape and torch.equal(resize_short(x, 30), x)
    assert resize_short(torch.rand(1, 1, 1, 3, 5), 4).shape[-2:] == (4, 7)  # int(5 * 4 / 3 + 0.5) = 7

    landscape = _coords(1, 2, 10, 17).float()
    crops = three_crop(landscape, 10)
    assert crops.shape == (1, 3, 2, 2, 10, 10)
    assert [int(crops[0, k, 1, 0, 0, 0]) for k in range(3)] == [0, 3, 6]  # left, centre, right: step (17-10)//2
    assert torch.equal(crops[0, :, 0], landscape[0, 0, :, :, :10].expand(3, 2, 10, 10))  # rows untouched
    portrait = _coords(1, 1, 16, 10).float()
    crops = three_crop(portrait, 10)
    assert [int(crops[0, k, 0, 0, 0, 0]) for k in range(3)] == [0, 3, 6]  # top, centre, bottom
    square = three_crop(x[..., :30], 30)
    assert torch.equal(square[:, 0], square[:, 2])
    with pytest.raises(ValueError):
        three_crop(x, 20)
    with pytest.raises(ValueError):
        three_crop(x[0], 30)


# ---------------------------------------------------------------------------------------------- strong view


def _clips(n: int = 6, seed: int = 11) -> torch.Tensor:
    """Random clips in [0.05, 0.95], so autocontrast, equalize and solarize all have something to change."""
    return 0.05 + 0.9 * torch.rand(n, 3, 4, 16, 16, generator=_gen(seed))


def test_strong_augment_shape_range_and_change() -> None:
    x = _clips(12)
    before = x.clone()
    y = strong_augment(x, generator=_gen(0))
    assert torch.equal(x, before)  # the input is not modified in place
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    ident = strong_augment(x, generator=_gen(0), num_ops=0)
    assert torch.equal(ident, x)
    change = (y - x).abs().mean(dim=(1, 2, 3, 4))
    assert bool((change > 1e-3).all())  # each clip gets 2 ops; every op changes a random clip


@pytest.mark.parametrize("op", STRONG_OPS)
def test_each_op_keeps_range_changes_clip_and_is_constant_in_time(op: str) -> None:
    x = _clips(3)
    y = strong_augment(x, generator=_gen(1), num_ops=1, ops=[op])
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 1e-3
    static = x[:, :, :1].expand(-1, -1, 5, -1, -1).contiguous()
    s = strong_augment(static, generator=_gen(2), num_ops=1, ops=[op])
    assert torch.equal(s, s[:, :, :1].expand_as(s))  # a static clip stays static


def test_strong_static_clip_stays_static_and_frames_share_ops() -> None:
    x = _clips(8)
    static = x[:, :, :1].expand(-1, -1, 6, -1, -1).contiguous()
    s = strong_augment(static, generator=_gen(3))
    assert torch.equal(s, s[:, :, :1].expand_as(s))
    # pointwise ops give the same map on every frame: a ramp's frames stay ordered identically after brightness
    ramp = (0.2 + 0.1 * torch.arange(4, dtype=torch.float32)).view(1, 1, 4, 1, 1).expand(1, 3, 4, 8, 8).contiguous()
    b = strong_augment(ramp, generator=_gen(0), num_ops=1, ops=["brightness"])
    torch.testing.assert_close(b, (ramp * 1.72).clamp(0, 1))


def test_strong_determinism_and_independent_pair() -> None:
    x = _clips(6)
    a = strong_augment(x, generator=_gen(5))
    b = strong_augment(x, generator=_gen(5))
    c = strong_augment(x, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = _gen(5)
    rgb_s, tg_s = strong_augment_pair(x, x, generator=g)
    assert torch.equal(rgb_s, a)  # RGB consumes the generator first ...
    assert not torch.equal(tg_s, a)  # ... and TG gets its own, independent draws (as in the release)
    g2 = _gen(5)
    strong_augment(x, generator=g2)
    assert torch.equal(tg_s, strong_augment(x, generator=g2))


def test_strong_op_values() -> None:
    x = torch.tensor([0.0, 40 / 255, 100 / 255, 231 / 255, 1.0]).view(1, 1, 1, 1, 5).expand(1, 3, 2, 3, 5).clone()
    post = strong_augment(x, generator=_gen(0), num_ops=1, ops=["posterize"])[0, 0, 0, 0] * 255
    torch.testing.assert_close(post, torch.tensor([0.0, 32, 96, 224, 224]))  # 3 bits: v & ~31
    sol = strong_augment(x, generator=_gen(0), num_ops=1, ops=["solarize"])[0, 0, 0, 0] * 255
    torch.testing.assert_close(sol, torch.tensor([0.0, 40, 100, 24, 0]))  # invert v >= 230.4
    inv = strong_augment(x, generator=_gen(0), num_ops=1, ops=["invert"])
    torch.testing.assert_close(inv, 1 - x)
    ac = strong_augment(0.25 + 0.5 * x, generator=_gen(0), num_ops=1, ops=["autocontrast"])
    torch.testing.assert_close(ac, x)
    narrow = 0.4 + 0.2 * torch.rand(1, 3, 2, 32, 32, generator=_gen(1))
    eq = strong_augment(narrow, generator=_gen(0), num_ops=1, ops=["equalize"])
    assert eq.min() == 0 and 0.9 <= eq.max() <= 1  # the narrow histogram is spread over the full range
    for c in range(3):
        order = narrow[0, c].flatten().argsort()
        assert bool((eq[0, c].flatten()[order].diff() >= 0).all())  # a monotone per-channel map
    cut = strong_augment(torch.zeros(4, 3, 2, 20, 20), generator=_gen(0), num_ops=1, ops=["cutout"])
    filled = (cut[:, 0, 0] > 0).flatten(1).sum(1)
    side = math.floor(0.18 * 20)
    assert bool((filled <= (side + 1) ** 2).all() and (filled > 0).any())
    assert torch.allclose(cut[cut > 0], torch.tensor(128 / 255))


def test_strong_translate_moves_by_release_fraction() -> None:
    bar = torch.zeros(1, 1, 2, 20, 40)
    bar[..., 18:22] = 1.0  # a vertical bar, column centroid 19.5
    cols = torch.arange(40, dtype=torch.float32)
    for seed in range(4):
        y = strong_augment(bar, generator=_gen(seed), num_ops=1, ops=["translate_x"])[0, 0, 0]
        centroid = float((y.sum(0) * cols).sum() / y.sum())
        assert abs(abs(centroid - 19.5) - 0.2 * 0.9 * 40) < 1e-3  # imgaug TranslateX percent=0.18 of the width
        torch.testing.assert_close(y.sum(1), bar[0, 0, 0].sum(1))  # rows untouched


def test_strong_magnitude_and_errors() -> None:
    x = _clips(4)
    geo = ["shear_x", "shear_y", "translate_x", "translate_y", "rotate"]
    assert torch.allclose(strong_augment(x, generator=_gen(0), ops=geo, magnitude=0.0), x, atol=1e-5)
    weak = (strong_augment(x, generator=_gen(0), ops=geo, magnitude=0.2) - x).abs().mean()
    strong = (strong_augment(x, generator=_gen(0), ops=geo, magnitude=0.9) - x).abs().mean()
    assert strong > weak
    with pytest.raises(ValueError):
        strong_augment(x * 1.5, generator=_gen(0))
    with pytest.raises(ValueError):
        strong_augment(x - 0.5, generator=_gen(0))
    with pytest.raises(ValueError):
        strong_augment(x[0], generator=_gen(0))
    with pytest.raises(ValueError):
        strong_augment(x, generator=_gen(0), num_ops=16)
    with pytest.raises(ValueError):
        strong_augment(x, generator=_gen(0), magnitude=1.5)
    with pytest.raises(ValueError):
        strong_augment(x, generator=_gen(0), ops=["blur"])
