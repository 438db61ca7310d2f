"""PE CAD stage 1: 3-slice stacking and lung-box crop, the release's augmentations as seeded torch ops, the
backbones' interface / sizes / gradients, and the fine-tuning loop and feature extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thrifty.methods.pe_cad import stage1 as S


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# stacking and crop


def test_stack_slices_centre_and_replicated_edges() -> None:
    vol = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 4, 6).contiguous()  # slice k holds k
    for i in range(5):
        s = S.stack_slices(vol, i)
        assert s.shape == (3, 4, 6)
        assert torch.equal(s[1], vol[i])  # centre channel = slice i
        assert s[:, 0, 0].tolist() == [max(i - 1, 0), i, min(i + 1, 4)]
    assert S.stack_slices(vol, 0)[:, 0, 0].tolist() == [0, 0, 1]
    assert S.stack_slices(vol, 4)[:, 0, 0].tolist() == [3, 4, 4]
    with pytest.raises(IndexError):
        S.stack_slices(vol, 5)


def test_stack_all_matches_stack_slices() -> None:
    vol = np.random.default_rng(0).random((7, 8, 9)).astype(np.float32)
    out = S.stack_all(vol)
    assert out.shape == (7, 3, 8, 9)
    for i in range(7):
        assert torch.equal(out[i], S.stack_slices(vol, i))
    one = S.stack_all(vol[:1])  # a one-slice exam replicates itself on both sides
    assert torch.equal(one[0], torch.as_tensor(vol[0]).expand(3, 8, 9))


def test_crop_resize_crops_the_box_and_resizes() -> None:
    x = torch.rand(3, 3, 20, 30, generator=gen())
    box = (4, 2, 14, 12)  # (x0, y0, x1, y1): a 10 x 10 crop
    same = S.crop_resize(x, box, 10)
    assert torch.allclose(same, x[..., 2:12, 4:14], atol=1e-6)  # same size: the crop itself
    up = S.crop_resize(x, box, 16)
    assert up.shape == (3, 3, 16, 16)
    const = S.crop_resize(torch.full((2, 3, 20, 30), 0.25), box, 7)
    assert torch.allclose(const, torch.full_like(const, 0.25))
    per_image = S.crop_resize(x, [box, (0, 0, 10, 10), box], 10)
    assert torch.allclose(per_image[1], x[1, :, :10, :10], atol=1e-6)
    assert torch.allclose(per_image[2], same[2])
    with pytest.raises(ValueError):
        S.crop_resize(x, (5, 5, 5, 9), 8)


# ----------------------------------------------------------------------------------------------------------------
# augmentations


def test_random_contrast_scales_each_image_within_limit() -> None:
    x = 0.1 + 0.7 * torch.rand(64, 3, 8, 8, generator=gen(1))  # x * 1.2 stays below 1: no clipping
    y = S.random_contrast(x, limit=0.2, generator=gen(2))
    ratio = (y / x).view(64, -1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # one factor per image
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6
    assert ratio.std() > 0.05  # factors differ between images
    bright = S.random_contrast(torch.full((64, 1, 2, 2), 0.95), generator=gen(2))
    assert bright.max() == 1.0  # clipped to [0, 1] like albumentations' float path
    assert S.random_contrast(torch.full((64, 1, 2, 2), 0.95), clip=False, generator=gen(2)).max() > 1.0


def test_shift_scale_rotate_identity_and_shift_geometry() -> None:
    x = torch.rand(4, 3, 16, 24, generator=gen())
    ident = S.shift_scale_rotate(x, shift=0.0, scale=0.0, rotate=0.0, generator=gen())
    assert torch.allclose(ident, x, atol=1e-5)
    # a pure shift moves a point by (dx W, dy H) pixels, with dx = -theta[0, 2] / 2 and dy = -theta[1, 2] / 2
    h, w = 40, 40
    img = torch.zeros(1, 1, h, w)
    img[0, 0, 20, 20] = 1.0
    for seed in range(5):
        theta = S.ssr_theta(1, h, w, shift=0.2, scale=0.0, rotate=0.0, generator=gen(seed))
        out = S.shift_scale_rotate(img, shift=0.2, scale=0.0, rotate=0.0, generator=gen(seed))
        dx, dy = float(-theta[0, 0, 2] / 2 * w), float(-theta[0, 1, 2] / 2 * h)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        mass = out[0, 0].sum()
        cy, cx = float((out[0, 0] * ys).sum() / mass), float((out[0, 0] * xs).sum() / mass)
        assert abs(cx - (20 + dx)) < 1e-3 and abs(cy - (20 + dy)) < 1e-3


def test_shift_scale_rotate_rotation_and_zoom_ranges() -> None:
    theta = S.ssr_theta(2000, 32, 32, generator=gen(3)).double()
    lin = theta[:, :, :2]
    det = torch.linalg.det(lin)  # = 1 / s² for a square image
    s = det.rsqrt()
    assert s.min() >= 0.8 - 1e-6 and s.max() <= 1.2 + 1e-6
    ang = torch.rad2deg(torch.atan2(lin[:, 0, 1], lin[:, 0, 0]))
    assert ang.abs().max() <= 20 + 1e-4 and ang.abs().max() > 19
    shifts = -torch.linalg.solve(lin, theta[:, :, 2]) / 2
    assert shifts.abs().max() <= 0.2 + 1e-6 and shifts.abs().max() > 0.19


def test_cutout_zeroes_exactly_the_holes() -> None:
    size = 50
    x = torch.ones(200, 3, size, size)
    y, boxes = S.cutout(x, holes=2, frac=0.4, generator=gen(4))
    assert y.shape == x.shape and boxes.shape == (200, 2, 4)
    side = int(0.4 * size)
    rows = torch.arange(size).view(1, size, 1)
    cols = torch.arange(size).view(1, 1, size)
    for i in range(200):
        mask = torch.zeros(size, size, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes[i].tolist():
            assert 0 <= x0 <= x1 <= size and 0 <= y0 <= y1 <= size
            assert x1 - x0 == min(side, size - x0) and y1 - y0 == min(side, size - y0)
            mask |= ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[0]
        zero = y[i] == 0
        assert torch.equal(zero, mask.expand(3, size, size))  # all channels, exactly the holes
        frac = float(mask.float().mean())
        assert frac <= 2 * 0.4**2 + 1e-9
    # unclipped holes cover 0.4² of the image each, so an image's zero fraction is 0.16..0.32 without clipping
    inner = ((boxes[..., 2] - boxes[..., 0] == side) & (boxes[..., 3] - boxes[..., 1] == side)).all(dim=1)
    fracs = (y[:, 0] == 0).float().mean(dim=(1, 2))
    assert inner.any()
    assert (fracs[inner] >= 0.16 - 1e-9).all() and (fracs[inner] <= 0.32 + 1e-9).all()


def test_augment_shapes_and_determinism() -> None:
    x = torch.rand(6, 3, 32, 32, generator=gen())
    a = S.augment(x, generator=gen(7))
    b = S.augment(x, generator=gen(7))
    c = S.augment(x, generator=gen(8))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert (a == 0).float().mean() > 0.05  # cutout (and out-of-image borders) ran


def test_imagenet_normalisation_only_with_flag() -> None:
    x = torch.rand(2, 3, 8, 8, generator=gen())
    assert torch.equal(S.normalise(x, imagenet=False), x)
    y = S.normalise(x, imagenet=True)
    mean = torch.tensor(S.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(S.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(y * std + mean, x, atol=1e-6)
    off = S.AugmentConfig(contrast=0.0, shift=0.0, scale=0.0, rotate=0.0, cutout_holes=0)
    assert torch.allclose(S.augment(x, generator=gen(), config=off), x, atol=1e-5)
    assert torch.allclose(S.augment(x, generator=gen(), config=off, imagenet=True), y, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# backbones


@pytest.mark.parametrize(
    ("name", "dim", "lo", "hi"), [("small_cnn", 128, 200_000, 400_000), ("small_vit", 96, 450_000, 490_000)]
)
def test_mini_backbones_shapes_params_gradients(name: str, dim: int, lo: int, hi: int) -> None:
    m = S.build_backbone(name, image_size=64, seed=0)
    assert lo <= S.count_parameters(m) <= hi
    x = torch.rand(3, 3, 64, 64, generator=gen())
    f = m.features(x)
    assert f.shape == (3, dim) and m.feature_dim == dim
    logits = m(x)
    assert logits.shape == (3,)
    assert torch.allclose(logits, m.classify(f), atol=1e-6)
    fmap = m.feature_map(x)
    assert fmap.shape == (3, m.map_channels, 64 // m.map_stride, 64 // m.map_stride)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1.0, 1.0]))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in m.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


def test_build_backbone_seeded_and_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    a = S.build_backbone("small_cnn", image_size=64, seed=5)
    b = S.build_backbone("small_cnn", image_size=64, seed=5)
    c = S.build_backbone("small_cnn", image_size=64, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    u1 = S.build_backbone("small_cnn", image_size=64).state_dict()  # unseeded builds draw from the global RNG
    u2 = S.build_backbone("small_cnn", image_size=64).state_dict()
    assert any(not torch.equal(u1[k], u2[k]) for k in u1)


def test_small_cnn_width_changes_size() -> None:
    assert 200_000 <= S.count_parameters(S.SmallCNN(width=28)) <= 400_000
    assert S.count_parameters(S.SmallCNN(width=32)) > 400_000


@pytest.mark.parametrize("name", ["vgg19", "drn_d_105", "nope"])
def test_unknown_backbones_raise(name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown backbone {name!r}"):
        S.build_backbone(name, image_size=64)


@pytest.mark.parametrize(("name", "dim"), [("seresnext50", 2048), ("resnet50", 2048), ("densenet121", 1024)])
def test_monai_full_backbones(name: str, dim: int) -> None:
    m = S.build_backbone(name, image_size=64, seed=0)
    x = torch.rand(2, 3, 64, 64, generator=gen())
    m.eval()
    with torch.no_grad():
        assert m.features(x).shape == (2, dim)
        assert m(x).shape == (2,)


# ----------------------------------------------------------------------------------------------------------------
# training and features


def _toy_pe(n: int = 96, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives bright, negatives dark, plus noise: separable under contrast, shifts and cutout."""
    g = gen(11)
    y = (torch.rand(n, generator=g) < 0.5).float()
    base = 0.25 + 0.5 * y.view(n, 1, 1, 1)
    x = (base + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return x, y


def test_linear_warmup_decay() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1.0)
    sched = S.linear_warmup_decay(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_epoch_batches_cover_each_epoch() -> None:
    batches = S.epoch_batches(10, 4, 7, gen())
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:6]).tolist()) == list(range(10))


def test_train_stage1_loss_falls_and_is_deterministic() -> None:
    x, y = _toy_pe()
    runs = []
    for _ in range(2):
        m = S.build_backbone("small_cnn", image_size=32, seed=0)
        losses = S.train_stage1(m, x, y, steps=24, batch_size=16, lr=4e-3, seed=3)
        runs.append((losses, m.state_dict()))
    losses = runs[0][0]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_extract_features_eval_mode() -> None:
    x, _ = _toy_pe(n=10)
    m = S.build_backbone("small_cnn", image_size=32, seed=0)
    m.train()
    f, p = S.extract_features(m, x, batch_size=4)
    assert f.shape == (10, 128) and p.shape == (10,)
    assert m.training  # mode restored
    m.eval()
    with torch.no_grad():
        assert torch.allclose(f, m.features(x), atol=1e-5)
        assert torch.allclose(p, torch.sigmoid(m(x)), atol=1e-5)
    f2, _ = S.extract_features(m, x, batch_size=3)  # batch size does not matter in eval mode
    assert torch.allclose(f, f2, atol=1e-5)
