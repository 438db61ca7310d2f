"""Genesis image transforms: shapes and ranges, seeding, and the invariants of each transform (flip shared by input
and target, shuffles permute only inside their windows, monotone Bézier curves, paintings change only their
masks, elastic identity at alpha = 0) and of the Models / Semantic Genesis pipelines."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from thrifty.methods.genesis import transforms as T

SHAPE = (2, 1, 16, 32, 32)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(SHAPE, generator=gen(1234))


def all_flips(v: torch.Tensor) -> list[torch.Tensor]:
    """The 8 combinations of flips of one cube (C, D, H, W) along its spatial axes."""
    out = []
    for k in range(4):
        for dims in itertools.combinations((1, 2, 3), k):
            out.append(v.flip(dims) if dims else v)
    return out


def is_some_flip(a: torch.Tensor, v: torch.Tensor) -> bool:
    return any(torch.equal(a, f) for f in all_flips(v))


def box_extent(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(first, last) index covered on each spatial axis by a mask (1, D, H, W)."""
    m = mask[0]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = m.any(dim=other).nonzero().flatten()
        out.append((int(idx.min()), int(idx.max())))
    return out


def window_mask(windows: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:
    """Union of the windows (K, 6) of one sample as a (D, H, W) bool mask (built by slicing)."""
    m = torch.zeros(spatial, dtype=torch.bool)
    for z, y, v, sd, sh, sw in windows.tolist():
        m[z : z + sd, y : y + sh, v : v + sw] = True
    return m


TRANSFORMS = {
    "flip": lambda v, g: T.flip(v, v.clone(), prob=0.9, generator=g)[0],
    "local_shuffle": lambda v, g: T.local_shuffle(v, prob=1.0, generator=g)[0],
    "local_shuffle_partition": lambda v, g: T.local_shuffle(v, prob=1.0, overlap="partition", generator=g)[0],
    "local_shuffle_loop": lambda v, g: T.local_shuffle_loop(v, prob=1.0, num_windows=200, generator=g)[0],
    "nonlinear": lambda v, g: T.nonlinear(v, prob=1.0, generator=g),
    "inpaint": lambda v, g: T.inpaint(v, min_boxes=1, generator=g)[0],
    "outpaint": lambda v, g: T.outpaint(v, generator=g)[0],
    "painting": lambda v, g: T.painting(v, prob=1.0, generator=g),
    "elastic": lambda v, g: T.elastic(v, generator=g),
    "models_genesis": lambda v, g: T.models_genesis(v, generator=g)["input"],
    "semantic_genesis": lambda v, g: T.semantic_genesis(v, generator=g)["input"],
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_shape_dtype_range_and_seeding(name, x):
    fn = TRANSFORMS[name]
    x4 = torch.cat([x, x.flip(2)])  # 4 samples: a different seed changing none of them is negligible
    a = fn(x4, gen(0))
    assert a.shape == x4.shape and a.dtype == x4.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x4)
    assert torch.equal(a, fn(x4, gen(0)))
    assert not torch.equal(a, fn(x4, gen(1)))
    assert torch.equal(x4, torch.cat([x, x.flip(2)]))  # the input is not modified in place


@pytest.mark.parametrize("name", ["flip", "local_shuffle", "nonlinear", "inpaint", "elastic"])
def test_each_sample_gets_its_own_draws(name):
    same = torch.rand(1, 1, 16, 32, 32, generator=gen(5)).expand(4, -1, -1, -1, -1).contiguous()
    out = TRANSFORMS[name](same, gen(3))
    assert any(not torch.equal(out[0], out[i]) for i in range(1, 4))


# ----------------------------------------------------------------------------------------------------------------
# flip


def test_flip_is_shared_by_input_and_target_and_an_involution():
    x = torch.rand(8, 1, 8, 12, 16, generator=gen(2))
    a, b = T.flip(x, x, prob=0.7, generator=gen(7))
    assert torch.equal(a, b)
    assert all(is_some_flip(a[i], x[i]) for i in range(8))
    assert any(not torch.equal(a[i], x[i]) for i in range(8))
    again, _ = T.flip(a, a, prob=0.7, generator=gen(7))  # the same draws undo the flips
    assert torch.equal(again, x)
    unchanged, _ = T.flip(x, x, prob=0.0, generator=gen(7))
    assert torch.equal(unchanged, x)


def test_flip_applies_the_same_flips_to_different_targets():
    x = torch.rand(6, 1, 8, 12, 16, generator=gen(3))
    y = torch.rand(6, 2, 8, 12, 16, generator=gen(4))
    a, b = T.flip(x, y, prob=0.8, generator=gen(0))
    for i in range(6):  # x has distinct voxels, so its flips are distinct: k names the flip applied
        k = [k for k, f in enumerate(all_flips(x[i])) if torch.equal(a[i], f)]
        assert len(k) == 1
        assert torch.equal(b[i], all_flips(y[i])[k[0]])


# ----------------------------------------------------------------------------------------------------------------
# local shuffle


@pytest.mark.parametrize("overlap", ["last", "partition"])
def test_single_window_permutes_its_values_and_nothing_else(x, overlap):
    out, windows = T.local_shuffle(x, prob=1.0, num_windows=1, max_frac=0.3, overlap=overlap, generator=gen(4))
    assert windows.shape == (2, 1, 6)
    for i in range(2):
        z, y, v, sd, sh, sw = windows[i, 0].tolist()
        assert 1 <= sd <= 4 and 1 <= sh <= 9 and 1 <= sw <= 9  # ⌊0.3 · (16, 32, 32)⌋
        assert z + sd <= 16 and y + sh <= 32 and v + sw <= 32
        inside = window_mask(windows[i], (16, 32, 32))
        assert torch.equal(out[i, 0][~inside], x[i, 0][~inside])
        assert torch.equal(out[i, 0][inside].sort().values, x[i, 0][inside].sort().values)


def test_window_sides_follow_max_frac():
    x = torch.rand(1, 1, 20, 40, 64)
    _, windows = T.local_shuffle(x, prob=1.0, num_windows=3000, generator=gen(0))
    sides = windows[0, :, 3:]
    assert sides.min() == 1
    assert sides.max(dim=0).values.tolist() == [2, 4, 6]  # every allowed side is drawn in 3000 windows
    assert ((windows[0, :, :3] + sides) <= torch.tensor([20, 40, 64])).all()


def test_partition_shuffle_preserves_the_cube_multiset(x):
    out, windows = T.local_shuffle(x, prob=1.0, num_windows=2000, max_frac=0.2, overlap="partition", generator=gen(5))
    for i in range(2):
        assert torch.equal(out[i].flatten().sort().values, x[i].flatten().sort().values)
        inside = window_mask(windows[i], (16, 32, 32))
        assert torch.equal(out[i, 0][~inside], x[i, 0][~inside])
        assert (out[i, 0][inside] != x[i, 0][inside]).float().mean() > 0.5


def test_last_writer_shuffle_reads_every_window_from_the_input(x):
    out, windows = T.local_shuffle(x, prob=1.0, num_windows=2000, max_frac=0.2, generator=gen(5))
    for i in range(2):
        inside = window_mask(windows[i], (16, 32, 32))
        assert torch.equal(out[i, 0][~inside], x[i, 0][~inside])
        assert torch.isin(out[i], x[i]).all()  # values are copied from the input, never invented
        assert (out[i, 0][inside] != x[i, 0][inside]).float().mean() > 0.5


@pytest.mark.parametrize("overlap", ["last", "partition"])
def test_vectorised_shuffle_equals_the_window_loop(overlap):
    x = torch.rand(3, 2, 12, 24, 30, generator=gen(8))  # two channels share the permutation
    a, wa = T.local_shuffle(x, prob=0.7, num_windows=150, max_frac=0.25, overlap=overlap, generator=gen(9))
    b, wb = T.local_shuffle_loop(x, prob=0.7, num_windows=150, max_frac=0.25, overlap=overlap, generator=gen(9))
    ab, wab = T.local_shuffle(  # all samples in one vectorised call (the default off-CPU)
        x, prob=0.7, num_windows=150, max_frac=0.25, overlap=overlap, group=3, generator=gen(9)
    )
    assert (wa[:, :, 3:].sum(dim=(1, 2)) > 0).sum() >= 2
    assert torch.equal(wa, wb) and torch.equal(wa, wab)
    assert torch.equal(a, b) and torch.equal(a, ab)
    assert not torch.equal(a, x)
    if overlap == "partition":
        for i in range(3):
            assert torch.equal(b[i, 0].flatten().sort().values, x[i, 0].flatten().sort().values)
    for i in range(3):  # the channels move together: channel 1 − channel 0 is carried along
        src = x[i, 1] - x[i, 0]
        assert torch.isin(b[i, 1] - b[i, 0], src).all()


def test_shuffle_prob_zero_and_per_sample_selection(x):
    out, windows = T.local_shuffle(x, prob=0.0, generator=gen(0))
    assert torch.equal(out, x) and not windows.any()
    x8 = torch.rand(8, 1, 8, 20, 20, generator=gen(1))
    out, windows = T.local_shuffle(x8, prob=0.5, generator=gen(2))
    shuffled = windows[:, :, 3:].sum(dim=(1, 2)) > 0
    assert 0 < shuffled.sum() < 8
    for i in range(8):
        assert torch.equal(out[i], x8[i]) != bool(shuffled[i])


# ----------------------------------------------------------------------------------------------------------------
# Bézier intensity


def bernstein_curve(p1: np.ndarray, p2: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pts = [np.zeros(2), p1, p2, np.ones(2)]
    curve = sum(np.outer(np.array([1, 3, 3, 1])[i] * (1 - t) ** (3 - i) * t**i, pts[i]) for i in range(4))
    return curve[:, 0], curve[:, 1]


def test_bezier_lut_forward_and_reversed():
    cp = torch.rand(16, 2, 2, generator=gen(3), dtype=torch.float64)
    cp[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # extreme control points
    cp[1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    fwd = T.bezier_lut(cp, 1001)
    rev = T.bezier_lut(cp, 1001, reverse=True)
    assert fwd.shape == rev.shape == (16, 1001)
    assert (fwd[:, 0] == 0).all() and (fwd[:, -1] == 1).all() and (fwd.diff(dim=1) >= 0).all()
    assert (rev[:, 0] == 1).all() and (rev[:, -1] == 0).all() and (rev.diff(dim=1) <= 0).all()
    assert fwd.min() >= 0 and fwd.max() <= 1 and rev.min() >= 0 and rev.max() <= 1
    grid = np.linspace(0, 1, 1001)
    t = np.linspace(0.05, 0.95, 19)
    for i in range(2, 16):  # the table follows the curve: f(bx(t)) = by(t), r(bx(t)) = by(1 − t)
        bx, by = bernstein_curve(cp[i, 0].numpy(), cp[i, 1].numpy(), t)
        _, by_rev = bernstein_curve(cp[i, 0].numpy(), cp[i, 1].numpy(), 1 - t)
        np.testing.assert_allclose(np.interp(bx, grid, fwd[i].numpy()), by, atol=2e-3)
        np.testing.assert_allclose(np.interp(bx, grid, rev[i].numpy()), by_rev, atol=2e-3)
    ident = T.bezier_lut(torch.tensor([[1 / 3, 1 / 3], [2 / 3, 2 / 3]]), 101)
    np.testing.assert_allclose(ident.numpy(), np.linspace(0, 1, 101), atol=1e-6)  # collinear points: identity


@pytest.mark.parametrize("reverse_prob", [0.0, 1.0])
def test_nonlinear_is_a_monotone_map_per_sample(x, reverse_prob):
    out = T.nonlinear(x, prob=1.0, reverse_prob=reverse_prob, generator=gen(6))
    assert out.min() >= 0 and out.max() <= 1
    for i in range(2):
        order = x[i].flatten().argsort()
        mapped = out[i].flatten()[order]
        diffs = mapped.diff()
        assert (diffs >= -1e-6).all() if reverse_prob == 0 else (diffs <= 1e-6).all()
        assert not torch.allclose(out[i], x[i], atol=1e-3)
    assert torch.equal(T.nonlinear(x, prob=0.0, generator=gen(6)), x)


def test_apply_lut_endpoints_and_identity():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 1, 1, 4)
    lut = torch.linspace(0, 1, 11).view(1, 11)
    assert torch.allclose(T.apply_lut(x, lut), x)
    assert torch.allclose(T.apply_lut(x, lut.flip(1)), 1 - x)


# ----------------------------------------------------------------------------------------------------------------
# in- and out-painting


def test_inpaint_changes_only_its_mask_and_boxes_have_the_right_size():
    x = torch.rand(6, 1, 16, 32, 32, generator=gen(2))
    out, mask = T.inpaint(x, min_boxes=1, max_boxes=1, generator=gen(3))
    assert mask.shape == (6, 1, 16, 32, 32) and mask.dtype == torch.bool
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert (out[mask] != x[mask]).all()
    for i in range(6):
        ext = box_extent(mask[i])
        for (lo, hi), size in zip(ext, (16, 32, 32)):
            assert size // 6 <= hi - lo + 1 <= size // 3
            assert lo >= 3 and hi <= size - 4  # the release keeps boxes 3 voxels off the border
        assert mask[i].sum() == np.prod([hi - lo + 1 for lo, hi in ext])  # one solid box


def test_inpaint_box_count_is_geometric():
    x = torch.rand(64, 1, 12, 24, 24, generator=gen(4))
    _, mask = T.inpaint(x, generator=gen(5))
    covered = mask.flatten(1).float().mean(dim=1)
    assert (covered > 0).float().mean() > 0.8  # 0.95 chance of a first box
    assert covered.max() > 2 * (2 * 4 * 4) / (12 * 24 * 24)  # some samples have several boxes
    _, none = T.inpaint(x, continue_prob=0.0, generator=gen(5))
    assert not none.any()


def test_outpaint_keeps_its_boxes_and_replaces_the_rest():
    x = torch.rand(6, 2, 14, 28, 35, generator=gen(6))
    out, keep = T.outpaint(x, min_boxes=1, max_boxes=1, generator=gen(7))
    k = keep.expand_as(x)
    assert torch.equal(out[k], x[k])
    assert (out[~k] != x[~k]).all()
    for i in range(6):
        for (lo, hi), size in zip(box_extent(keep[i]), (14, 28, 35)):
            assert size - 4 * size // 7 <= hi - lo + 1 <= size - 3 * size // 7
    out, keep = T.outpaint(x, generator=gen(8))  # up to 5 boxes, the first always
    k = keep.expand_as(x)
    assert keep.flatten(1).any(dim=1).all()
    assert torch.equal(out[k], x[k])


def test_painting_probabilities(x):
    assert torch.equal(T.painting(x, prob=0.0, generator=gen(0)), x)
    x8 = torch.rand(8, 1, 16, 32, 32, generator=gen(1))
    out = T.painting(x8, prob=1.0, outpaint_rate=1.0, generator=gen(2))
    changed = (out != x8).flatten(1).float().mean(dim=1)
    assert (changed > 0.5).all()  # out-painting replaces most of the cube
    out = T.painting(x8, prob=1.0, outpaint_rate=0.0, generator=gen(2))
    changed = (out != x8).flatten(1).float().mean(dim=1)
    assert (changed < 0.5).all()  # ≤ 5 in-painted boxes of at most 1/27 of the cube each


# ----------------------------------------------------------------------------------------------------------------
# elastic deformation


def test_elastic_alpha_zero_is_identity(x):
    out = T.elastic(x, alpha=0.0, generator=gen(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_elastic_displacements_are_smooth():
    # trilinear sampling of a ramp along W is exact, so away from the W borders the output minus the ramp is the
    # W displacement (in voxels, times the slope 1/31)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 1, 32).expand(2, 1, 16, 32, 32).contiguous()

    def roughness(alpha: float, sigma: float) -> float:
        out = T.elastic(ramp, alpha=alpha, sigma=sigma, generator=gen(1))
        assert out.min() >= 0 and out.max() <= 1
        shift = ((out - ramp) * 31)[..., 8:24]
        assert shift.abs().max() > 0.1
        return float(shift.diff(dim=-1).abs().mean() / shift.abs().mean())

    assert roughness(100.0, 4.0) < 0.5  # neighbours move together
    assert roughness(0.4, 0.0) > 1.0  # unsmoothed i.i.d. U[-1, 1] shifts: E|a − b| / E|a| = 4/3


def test_gaussian_smoothing_matches_scipy():
    field = torch.rand(2, 10, 20, 24, generator=gen(2), dtype=torch.float64)
    ours = T._smooth3d(field, 3.0)
    for i in range(2):
        ref = gaussian_filter(field[i].numpy(), 3.0, mode="constant", cval=0.0)
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-10)
    assert T.gaussian_kernel1d(8.0).numel() == 65
    assert abs(float(T.gaussian_kernel1d(8.0).sum()) - 1) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# pipelines


def test_presets_are_frozen():
    assert T.PRESETS["models_genesis"] == T.MGProbs(flip=0.4, shuffle=0.5, nonlinear=0.9, paint=0.9, outpaint_rate=0.8)
    assert isinstance(T.PRESETS["semantic_genesis"], T.SGProbs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        T.PRESETS["models_genesis"].flip = 0.0


def test_models_genesis_target_is_the_flipped_original():
    x = torch.rand(6, 1, 16, 32, 32, generator=gen(3))
    out = T.models_genesis(x, generator=gen(4))
    assert set(out) == {"input", "target"}
    for i in range(6):
        assert is_some_flip(out["target"][i], x[i])
    assert not torch.equal(out["input"], out["target"])
    only_flip = T.MGProbs(flip=0.9, shuffle=0.0, nonlinear=0.0, paint=0.0)
    out = T.models_genesis(x, generator=gen(4), probs=only_flip)
    assert torch.equal(out["input"], out["target"])
    assert any(not torch.equal(out["target"][i], x[i]) for i in range(6))
    out = T.models_genesis(x, generator=gen(4), probs=dataclasses.replace(T.MGProbs(), flip=0.0))
    assert torch.equal(out["target"], x)


def test_semantic_genesis_applies_exactly_one_perturbation():
    x = torch.rand(16, 1, 16, 32, 32, generator=gen(5))
    out = T.semantic_genesis(x, generator=gen(6), alpha=0.0)  # no deformation: the perturbation is visible alone
    assert set(out) == {"input", "target", "choice"}
    assert torch.equal(out["target"], x)
    choice = out["choice"]
    assert choice.shape == (16,) and set(choice.tolist()) == {0, 1, 2, 3}
    deformed = T.elastic(x, alpha=0.0, generator=gen(6))  # the pipeline's first draws: its deformed cube, exactly
    torch.testing.assert_close(deformed, x, atol=1e-5, rtol=0)
    for i in range(16):
        inp, ref = out["input"][i], deformed[i]
        changed = inp != ref
        c = int(choice[i])
        if c == 0:  # 5 windows of at most 1 × 3 × 3 voxels
            assert 0 < changed.sum() <= 45
        elif c == 1:  # a Bézier curve: monotone in the input
            mapped = inp.flatten()[ref.flatten().argsort()].diff()
            assert (mapped >= -1e-4).all() or (mapped <= 1e-4).all()
        elif c == 2:  # one in-painted box
            lo_hi = box_extent(changed)
            assert changed.sum() == np.prod([hi - lo + 1 for lo, hi in lo_hi])
            assert changed.float().mean() < 1 / 27 + 1e-6
        else:  # out-painting with one kept box
            kept = ~changed
            assert kept.sum() == np.prod([hi - lo + 1 for lo, hi in box_extent(kept)])
            assert changed.float().mean() > 0.5


def test_semantic_genesis_deforms_only_the_input():
    x = torch.rand(4, 1, 16, 32, 32, generator=gen(7))
    probs = T.SGProbs(shuffle=1.0, nonlinear=0.0, inpaint=0.0, outpaint=0.0)
    out = T.semantic_genesis(x, generator=gen(8), probs=probs, shuffle_windows=0)
    assert (out["choice"] == 0).all()
    assert torch.equal(out["target"], x)
    assert not torch.allclose(out["input"], x, atol=1e-3)  # elastic deformation only
    assert torch.equal(out["input"], T.elastic(x, generator=gen(8)))
