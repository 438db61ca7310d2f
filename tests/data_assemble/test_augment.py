"""Behavioural tests for the Label-Assemble weak / strong views (thrifty.methods.data_assemble.augment)."""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.methods.data_assemble.augment import (
    RELEASE_GAUSS_STD,
    STRONG,
    WEAK,
    ViewConfig,
    _rotate,
    augment,
    strong_view,
    weak_view,
)

# Everything off: rotation 0 and every probability / strength 0.
OFF = {"hflip": 0.0, "rotate_deg": 0.0, "pepper_p": 0.0, "gauss_p": 0.0, "brightness": 0.0, "contrast": 0.0}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_batch(b: int = 32, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth, asymmetric images in [0.1, 0.9]: a random Gaussian blob on a diagonal ramp."""
    g = _gen(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    centres = 0.2 + 0.6 * torch.rand(b, 2, generator=g)
    blob = torch.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) / 0.02)
    img = 0.1 + 0.4 * (0.7 * xx + 0.3 * yy) + 0.4 * blob
    return img.clamp(0.0, 1.0).unsqueeze(1)


@pytest.mark.parametrize("view", [weak_view, strong_view])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_views_keep_shape_dtype_range_and_input(view, dtype: torch.dtype) -> None:
    x = _smooth_batch(16, 24).to(dtype).expand(16, 3, 24, 24).contiguous()
    before = x.clone()
    y = view(x, generator=_gen(1))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.equal(x, before), "the input must not be modified"


def test_non_square_images_keep_shape() -> None:
    x = torch.rand(4, 1, 20, 36, generator=_gen(2))
    for cfg in (WEAK, STRONG):
        assert augment(x, cfg, generator=_gen(3)).shape == x.shape


@pytest.mark.parametrize("view", [weak_view, strong_view])
def test_deterministic_per_seed_and_different_across_seeds(view) -> None:
    x = _smooth_batch(16)
    a = view(x, generator=_gen(7))
    b = view(x, generator=_gen(7))
    c = view(x, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_draw_their_own_parameters() -> None:
    # One image repeated across the batch: with per-sample parameters the outputs must not all agree.
    x = _smooth_batch(1).expand(8, 1, 32, 32).contiguous()
    y = strong_view(x, generator=_gen(0))
    assert not all(torch.equal(y[0], y[i]) for i in range(1, 8))


def test_strong_view_differs_more_than_weak_view() -> None:
    x = _smooth_batch(64)
    weak = sum(float((weak_view(x, generator=_gen(s)) - x).abs().mean()) for s in range(3))
    strong = sum(float((strong_view(x, generator=_gen(s)) - x).abs().mean()) for s in range(3))
    assert strong > 1.5 * weak, (weak, strong)


def test_everything_off_is_the_identity() -> None:
    x = _smooth_batch(8)
    y = augment(x, ViewConfig(**OFF), generator=_gen())
    assert torch.equal(y, x)
    assert y is not x and y.data_ptr() != x.data_ptr()


def test_hflip_one_alone_is_an_exact_flip() -> None:
    x = _smooth_batch(8)
    y = augment(x, ViewConfig(**{**OFF, "hflip": 1.0}), generator=_gen())
    assert torch.equal(y, x.flip(-1))


def test_rotation_direction_and_aspect() -> None:
    # 90° on a square image is exactly torch.rot90 (counter-clockwise).
    x = torch.rand(2, 1, 16, 16, generator=_gen())
    assert torch.equal(_rotate(x, torch.tensor([90.0, 90.0])), torch.rot90(x, 1, dims=(-2, -1)))
    # Non-square (odd sizes, so the centre is a pixel): a dot 5 px right of centre goes 5 px up.
    img = torch.zeros(1, 1, 31, 47)
    img[0, 0, 15, 23 + 5] = 1.0
    rot = _rotate(img, torch.tensor([90.0]))
    assert rot.sum() == 1.0 and rot[0, 0, 15 - 5, 23] == 1.0


def test_rotation_pads_with_zero() -> None:
    x = torch.ones(1, 1, 32, 32)
    y = _rotate(x, torch.tensor([45.0]))
    assert y[0, 0, 0, 0] == 0.0 and y[0, 0, -1, -1] == 0.0  # corners come from outside: fill 0
    assert y[0, 0, 16, 16] == 1.0
    z = augment(x, ViewConfig(**{**OFF, "rotate_deg": 15.0}), generator=_gen())
    assert set(torch.unique(z).tolist()) <= {0.0, 1.0}  # nearest interpolation, zero fill


@pytest.mark.parametrize("snr", [0.9, 0.7])
def test_salt_and_pepper_fractions(snr: float) -> None:
    b, h, w = 8, 64, 64
    x = torch.full((b, 3, h, w), 0.5)
    y = augment(x, ViewConfig(**{**OFF, "pepper_p": 1.0, "pepper_snr": snr}), generator=_gen())
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2]), "one draw per pixel, all channels"
    n = b * h * w
    half = (1.0 - snr) / 2.0
    tol = 5.0 * math.sqrt(n * half * (1.0 - half))  # 5 binomial standard deviations
    zeros = int((y[:, 0] == 0.0).sum())
    ones = int((y[:, 0] == 1.0).sum())
    assert abs(zeros - n * half) < tol, (zeros, n * half)
    assert abs(ones - n * half) < tol, (ones, n * half)
    assert zeros + ones + int((y[:, 0] == 0.5).sum()) == n


def test_pepper_probability_selects_whole_images() -> None:
    x = torch.full((400, 1, 8, 8), 0.5)
    y = augment(x, ViewConfig(**{**OFF, "pepper_p": 0.25, "pepper_snr": 0.0}), generator=_gen())
    hit = (y != 0.5).flatten(1).all(dim=1)  # snr 0: a selected image has every pixel replaced
    assert ((y != 0.5).flatten(1).any(dim=1) == hit).all()
    assert abs(float(hit.float().mean()) - 0.25) < 5.0 * math.sqrt(0.25 * 0.75 / 400)


def test_gaussian_noise() -> None:
    x = torch.full((16, 1, 32, 32), 0.5)
    assert torch.equal(augment(x, ViewConfig(**{**OFF, "gauss_p": 0.0, "gauss_std": 0.2}), generator=_gen()), x)
    y = augment(x, ViewConfig(**{**OFF, "gauss_p": 1.0, "gauss_std": 0.05}), generator=_gen())
    assert abs(float(y.mean()) - 0.5) < 0.005 and abs(float(y.std()) - 0.05) < 0.003
    assert WEAK.gauss_std == pytest.approx(1.0 / 255.0) and WEAK.gauss_mean == 0.0
    assert math.isclose(RELEASE_GAUSS_STD, 1.0 / 255.0)
    # Clamped to [0, 1] at both ends.
    edge = torch.cat([torch.zeros(4, 1, 16, 16), torch.ones(4, 1, 16, 16)])
    z = augment(edge, ViewConfig(**{**OFF, "gauss_p": 1.0, "gauss_std": 0.3}), generator=_gen())
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0


def test_erasing_zeroes_one_rectangle_in_the_scale_range() -> None:
    b, h, w = 32, 128, 128
    x = torch.full((b, 2, h, w), 0.75)
    cfg = ViewConfig(**{**OFF, "erase_p": 1.0})
    y = augment(x, cfg, generator=_gen())
    assert torch.equal(y[:, 0], y[:, 1])
    assert set(torch.unique(y).tolist()) <= {0.0, 0.75}
    erased = 0
    for i in range(b):
        zero = y[i, 0] == 0.0
        if not zero.any():  # all ten tries rejected: the release leaves the image untouched
            continue
        erased += 1
        rows = torch.nonzero(zero.any(dim=1)).flatten()
        cols = torch.nonzero(zero.any(dim=0)).flatten()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(zero.sum()) == int(box), "erased pixels must form a filled rectangle"
        frac = float(zero.float().mean())
        assert 0.02 * 0.85 <= frac <= 0.33 * 1.15, frac  # rounding of h and w
        aspect = float(rows.numel() / cols.numel())
        assert 0.3 * 0.8 <= aspect <= 3.3 * 1.2, aspect
    assert erased >= 0.9 * b


def test_erasing_value_and_probability() -> None:
    x = torch.full((200, 1, 32, 32), 0.7)
    y = augment(x, ViewConfig(**{**OFF, "erase_p": 0.5, "erase_value": 0.25}), generator=_gen())
    touched = (y == 0.25).flatten(1).any(dim=1)
    assert abs(float(touched.float().mean()) - 0.5) < 5.0 * math.sqrt(0.25 / 200)


def test_brightness_factor_in_range() -> None:
    x = torch.full((64, 1, 8, 8), 0.4)
    y = augment(x, ViewConfig(**{**OFF, "brightness": 0.5}), generator=_gen())
    ratio = y / x
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image)), "one factor per image"
    f = per_image[:, 0]
    assert float(f.min()) >= 0.5 - 1e-6 and float(f.max()) <= 1.5 + 1e-6
    assert float(f.min()) < 0.75 and float(f.max()) > 1.25  # the range is actually used


def test_contrast_keeps_constant_images_and_scales_around_the_mean() -> None:
    const = torch.rand(16, 1, 1, 1, generator=_gen()).expand(16, 1, 8, 8).contiguous()
    y = augment(const, ViewConfig(**{**OFF, "contrast": 0.5}), generator=_gen())
    assert torch.allclose(y, const, atol=1e-6)
    x = 0.4 + 0.2 * _smooth_batch(64)  # stays inside [0.4, 0.6]: no clamping at factor <= 1.5
    y = augment(x, ViewConfig(**{**OFF, "contrast": 0.5}), generator=_gen())
    mx = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(y.mean(dim=(1, 2, 3), keepdim=True), mx, atol=1e-5)
    f = ((y - mx) * (x - mx)).flatten(1).sum(1) / ((x - mx) ** 2).flatten(1).sum(1)
    assert float(f.min()) >= 0.5 - 1e-4 and float(f.max()) <= 1.5 + 1e-4
    assert torch.allclose(y, mx + f.view(-1, 1, 1, 1) * (x - mx), atol=1e-5)


def test_release_constants() -> None:
    assert (WEAK.hflip, WEAK.rotate_deg, WEAK.pepper_snr, WEAK.pepper_p, WEAK.gauss_p) == (0.5, 10.0, 0.9, 0.1, 0.3)
    assert (WEAK.brightness, WEAK.contrast, WEAK.erase_p) == (0.0, 0.0, 0.0)
    assert (STRONG.hflip, STRONG.rotate_deg, STRONG.pepper_snr, STRONG.pepper_p, STRONG.gauss_p) == (
        0.5,
        15.0,
        0.7,
        0.5,
        0.5,
    )
    assert (STRONG.brightness, STRONG.contrast, STRONG.erase_p) == (0.5, 0.5, 0.5)
    assert STRONG.erase_scale == (0.02, 0.33) and STRONG.erase_ratio == (0.3, 3.3)
    assert WEAK.rotate_mode == STRONG.rotate_mode == "nearest"
    assert ViewConfig() == WEAK


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(1, 8, 8), r"\(B, C, H, W\)"),
        (torch.rand(1, 1, 1, 8, 8), r"\(B, C, H, W\)"),
        (torch.full((1, 1, 4, 4), 1.5), r"\[0, 1\]"),
        (torch.full((1, 1, 4, 4), -0.1), r"\[0, 1\]"),
        (torch.full((1, 1, 4, 4), float("nan")), r"\[0, 1\]"),
        (torch.ones(1, 1, 4, 4, dtype=torch.uint8), "floating-point"),
        (torch.rand(1, 0, 4, 4), "non-empty"),
    ],
)
def test_bad_input_raises(x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weak_view(x, generator=_gen())


def test_bad_config_and_arguments() -> None:
    with pytest.raises(TypeError):
        ViewConfig(0.5)  # keyword-only
    for bad in (
        {"hflip": 1.5},
        {"pepper_snr": -0.1},
        {"rotate_deg": -1.0},
        {"gauss_std": float("nan")},
        {"erase_scale": (0.5, 0.1)},
        {"erase_ratio": (0.0, 1.0)},
        {"rotate_mode": "cubic"},
    ):
        with pytest.raises(ValueError):
            ViewConfig(**bad)
    with pytest.raises(TypeError):
        weak_view(torch.rand(1, 1, 4, 4), generator=0)  # type: ignore[arg-type]


def test_empty_batch() -> None:
    x = torch.rand(0, 1, 8, 8)
    assert strong_view(x, generator=_gen()).shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = _smooth_batch(16)
    for cfg in (WEAK, STRONG):
        cpu = augment(x, cfg, generator=_gen(5))
        gpu = augment(x.cuda(), cfg, generator=_gen(5))
        assert gpu.device.type == "cuda" and gpu.dtype == x.dtype
        # Same parameters; nearest rotation may pick a neighbour on a handful of rounding ties.
        assert float((gpu.cpu() != cpu).float().mean()) < 0.01
