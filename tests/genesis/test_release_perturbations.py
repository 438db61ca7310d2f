"""The Semantic Genesis / TransVW releases' perturbations and self-discovery (issue 17, part 3).

* Elastic deformation in-plane only (SemanticGenesis ``pytorch/utils/purturbation.py``, ``elastic_transform``):
  depth never moves, rows and columns do, sampling equals the release's ``map_coordinates(order=1,
  mode="reflect")``, and the miniature's (α, σ) give the RMS displacement the docstrings state.
* Visual-word placement (``self_discovery/pattern_generator_3D.py``, ``get_random_coordinate``): the release's
  depth-weighted dense score, corner range, spacing and reference fallback.
* Multi-resolution crops (same file, lines 337–439): an exact crop and two rescaled crops per training instance,
  in-plane side and offset in the release's ranges, depth exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from thrifty.methods.genesis import transforms as T
from thrifty.methods.genesis.config import PretrainConfig
from thrifty.methods.genesis.data import dense_score
from thrifty.methods.genesis.discovery import (
    VisualWord,
    crop_instances,
    discover_visual_words,
    placement_corners,
    rescaled_side_range,
)

CUBE = (16, 32, 32)  # the miniature's (d, h, w)
STATED_RMS = 0.53  # in-plane RMS displacement of the miniature's (α, σ), voxels (transforms.elastic, config)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ elastic


def test_elastic_never_moves_depth():
    depth_only = torch.rand(3, 1, CUBE[0], 1, 1, generator=gen(0)).expand(3, 1, *CUBE).contiguous()
    out = T.elastic(depth_only, alpha=991.0, sigma=8.0, generator=gen(1))  # the release's large displacement
    torch.testing.assert_close(out, depth_only, rtol=0, atol=1e-6)
    # output slice z reads input slice z only: changing every other slice leaves it as it was
    x = torch.rand(2, 1, *CUBE, generator=gen(2))
    y = x.clone()
    y[:, :, 1:] = torch.rand(2, 1, CUBE[0] - 1, *CUBE[1:], generator=gen(3))
    a = T.elastic(x, alpha=200.0, sigma=4.0, generator=gen(4))
    b = T.elastic(y, alpha=200.0, sigma=4.0, generator=gen(4))
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and not torch.equal(a[:, :, 1:], b[:, :, 1:])
    disp = T.elastic_displacement((2, *CUBE), alpha=40.0, sigma=4.0, generator=gen(5))
    assert disp.shape == (2, 2, *CUBE)  # rows and columns only: depth has no component


def test_elastic_moves_rows_and_columns():
    cfg = PretrainConfig()
    for axis in (3, 4):  # a ramp along H, then along W: bilinear sampling of a ramp reads the displacement
        shape = [1, 1, 1, 1, 1]
        shape[axis] = CUBE[axis - 2]
        ramp = torch.arange(CUBE[axis - 2], dtype=torch.float64).view(shape).expand(4, 1, *CUBE).contiguous()
        out = T.elastic(ramp, alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, generator=gen(6))
        inner = (slice(None), slice(None), slice(None), slice(4, -4), slice(4, -4))  # no reflection at the border
        shift = (out - ramp)[inner]
        assert shift.abs().max() > 0.3 and shift.abs().mean() > 0.05
    disp = T.elastic_displacement((4, *CUBE), alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, generator=gen(6))
    assert (disp.flatten(2).abs().mean(dim=2) > 0.1).all()  # both channels of every sample move


def test_elastic_sampling_matches_the_release():
    x = torch.rand(2, 1, *CUBE, generator=gen(7), dtype=torch.float64)
    disp = T.elastic_displacement((2, *CUBE), alpha=1500.0, sigma=3.0, generator=gen(8), dtype=torch.float64)
    assert disp.abs().max() > 2 * CUBE[1]  # far outside the slice: several reflections
    out = T.warp_inplane(x, disp)
    for i in range(2):
        img = x[i, 0].numpy()
        d, h, w = np.meshgrid(*(np.arange(s) for s in img.shape), indexing="ij")
        coords = [d, h + disp[i, 0].numpy(), w + disp[i, 1].numpy()]
        ref = map_coordinates(img, coords, order=1, mode="reflect")  # the release's sampling, depth as is
        np.testing.assert_allclose(out[i, 0].numpy(), ref, atol=1e-12)


def test_miniature_rms_displacement_is_the_stated_one():
    cfg = PretrainConfig()
    assert (cfg.elastic_alpha, cfg.elastic_sigma) == (40.0, 4.0)
    disp = T.elastic_displacement(
        (256, *CUBE), alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, generator=gen(9), dtype=torch.float64
    )
    rms = float(disp.pow(2).sum(dim=1).mean().sqrt())
    assert rms == pytest.approx(STATED_RMS, abs=0.02)
    assert float(disp.pow(2).mean().sqrt()) == pytest.approx(0.37, abs=0.02)  # per axis
    # the release's values on the miniature's cube: the ~4 voxels the miniature avoids
    big = T.elastic_displacement((32, *CUBE), alpha=991.0, sigma=8.0, generator=gen(10), dtype=torch.float64)
    assert float(big.pow(2).sum(dim=1).mean().sqrt()) == pytest.approx(3.9, abs=0.4)


def test_elastic_is_seeded():
    x = torch.rand(3, 1, *CUBE, generator=gen(11))
    a = T.elastic(x, alpha=40.0, sigma=4.0, generator=gen(12))
    assert torch.equal(a, T.elastic(x, alpha=40.0, sigma=4.0, generator=gen(12)))
    assert not torch.equal(a, T.elastic(x, alpha=40.0, sigma=4.0, generator=gen(13)))
    p = T.semantic_genesis(x, alpha=40.0, sigma=4.0, generator=gen(14))
    q = T.semantic_genesis(x, alpha=40.0, sigma=4.0, generator=gen(14))
    assert all(torch.equal(p[k], q[k]) for k in p)


# ------------------------------------------------------------------------------------------------ placement


def release_dense_sum(window: np.ndarray, depth: int, lookahead: int = 3) -> float:
    """``pattern_generator_3D.py`` lines 248–266, literally: the summed d_img of a (depth + 2, h, w) window."""
    thr = (-150.0 + 1000.0) / 2000.0
    d_img = np.zeros((depth, *window.shape[1:]))
    for d, i, j in itertools.product(range(depth), range(window.shape[1]), range(window.shape[2])):
        for k in range(lookahead):
            if window[d + k, i, j] >= thr:
                d_img[d, i, j] = k
                break
            if k == lookahead - 1:
                d_img[d, i, j] = k
    return float((1.0 - d_img / (lookahead - 1)).sum())


def test_dense_score_is_the_releases():
    rng = np.random.default_rng(0)
    for density in (0.05, 0.3, 0.7):
        window = np.where(rng.random((6 + 2, 5, 7)) < density, 0.6, 0.05)  # tissue or lung, (d + 2, h, w)
        assert dense_score(window) * window[2:].size == pytest.approx(release_dense_sum(window, 6))
    # one voxel: dense itself 1, dense in the next slice only 0.5, in the one after only 0
    for k, score in enumerate((1.0, 0.5, 0.0)):
        column = np.zeros((3, 1, 1))
        column[k] = 1.0
        assert dense_score(column) == score


def test_placement_corner_range_is_the_releases():
    # start in [m, V - s - 1 - m] in-plane and [m_z, D - d - 3 - 1 - m_z] in depth (lines 230-233)
    assert placement_corners((48, 64, 64), CUBE, margin=(2, 4, 4)) == ((2, 4, 4), (26, 27, 27))
    # the release's own setting: 64x64x32 cubes, len_border 100, len_border_z 30
    assert placement_corners((300, 512, 512), (32, 64, 64), margin=(30, 100, 100)) == ((30, 100, 100), (234, 347, 347))
    with pytest.raises(ValueError, match="does not fit"):
        placement_corners((19, 64, 64), CUBE)


def lung_phantom(n: int, *, dense: Sequence[int] = ()) -> np.ndarray:
    """(n, 24, 40, 40) in [0, 1]: tissue (0.55) with a lung block (0.075) in rows/cols 4..27, slices 0..23;
    patients in ``dense`` are tissue everywhere."""
    v = np.full((n, 24, 40, 40), 0.55, dtype=np.float32)
    v[:, :, 4:28, 4:28] = 0.075
    v[list(dense)] = 0.55
    return v


def test_words_sit_on_mostly_lung_cubes_spaced_as_the_release():
    cube, t = (8, 16, 16), 0.15
    vols = lung_phantom(6)
    words = discover_visual_words(
        embeddings_train=torch.randn(6, 4, generator=gen(15)),
        volumes_train=vols,
        num_classes=5,
        top_k_train=3,
        cube_size=cube,
        max_dense_fraction=t,
        margin=(1, 2, 2),
        seed=0,
    )
    lo, hi = placement_corners(vols.shape[1:], cube, margin=(1, 2, 2))
    corners = []
    for w in words:
        z, y, x = (c - s // 2 for c, s in zip(w.coordinate, cube))
        assert all(a <= c <= b for a, c, b in zip(lo, (z, y, x), hi))
        window = vols[w.reference, z : z + cube[0] + 2, y : y + cube[1], x : x + cube[2]]
        assert release_dense_sum(window, cube[0]) <= t * math.prod(cube)  # line 266: sum > lung_max · volume fails
        corners.append((z, y, x))
    assert all(math.dist(a, b) >= 5 for a, b in itertools.combinations(corners, 2))


def test_a_reference_without_a_lung_cube_is_given_up():
    vols = lung_phantom(4, dense=[1])  # patient 1 has no cube that passes
    kw = dict(
        embeddings_train=torch.zeros(4, 2),
        volumes_train=vols,
        top_k_train=2,
        cube_size=(8, 16, 16),
        max_dense_fraction=0.15,
        coordinate_min_distance=1,
    )
    for seed in range(4):
        words = discover_visual_words(**kw, num_classes=3, seed=seed)
        refs = [w.reference for w in words]
        assert sorted(refs) == [0, 2, 3]  # patient 1 abandoned after max_tries draws, never reused
    with pytest.raises(ValueError, match="max_dense_fraction"):
        discover_visual_words(**kw, num_classes=4, seed=0)


# ------------------------------------------------------------------------------------------------ crops


def coordinate_volume(axis: int, n: int = 2) -> np.ndarray:
    """(n, 20, 64, 64) float32 whose value is the voxel's index along ``axis`` (0 z, 1 y, 2 x), plus 100·patient."""
    shape = [1, 1, 1]
    shape[axis] = (20, 64, 64)[axis]
    idx = np.arange(shape[axis], dtype=np.float32).reshape(shape)
    return np.broadcast_to(idx, (20, 64, 64))[None] + 100.0 * np.arange(n, dtype=np.float32)[:, None, None, None]


WORDS = [
    VisualWord(class_id=0, coordinate=(10, 32, 32), reference=0, members=(0, 1), distances=(0.0, 1.0)),
    VisualWord(class_id=1, coordinate=(9, 28, 36), reference=1, members=(1, 0), distances=(0.0, 1.0)),
]
CROP = (8, 32, 32)


def test_crop_count_and_exact_crops():
    vols = np.random.default_rng(1).random((2, 20, 64, 64)).astype(np.float32)
    cubes, labels = crop_instances(vols, WORDS, cube_size=CROP, fill=0.0, multi_resolution=True, jitter=5, seed=0)
    k = 4  # 2 words x 2 members
    assert cubes.shape == (3 * k, 1, *CROP)  # an exact and two rescaled crops per instance
    assert labels.tolist() == [0, 0, 1, 1] * 3
    i = 0
    for w in WORDS:
        z, y, x = (c - s // 2 for c, s in zip(w.coordinate, CROP))
        for m in w.members:
            np.testing.assert_array_equal(cubes[i, 0].numpy(), vols[m, z : z + 8, y : y + 32, x : x + 32])
            i += 1
    single, _ = crop_instances(vols, WORDS, cube_size=CROP, fill=0.0, jitter=5, seed=0)
    assert torch.equal(single, cubes[:k])  # without multi-resolution: the exact crops only, never jittered


def test_rescaled_crops_keep_depth_and_move_in_plane():
    assert rescaled_side_range(64) == (50, 80) and rescaled_side_range(32) == (25, 40)
    kw = dict(cube_size=CROP, fill=-1.0, multi_resolution=True, jitter=5)
    # depth: every rescaled slice holds exactly the exact crop's slice index (no depth shift, no depth rescale)
    zc, _ = crop_instances(coordinate_volume(0), WORDS * 8, **kw, generator=gen(16))
    for i, cube in enumerate(zc[:, 0]):
        w = (WORDS * 8)[(i % 32) // 2]
        z0 = w.coordinate[0] - CROP[0] // 2 + 100 * w.members[i % 2]
        expected = torch.arange(CROP[0], dtype=torch.float32).view(-1, 1, 1) + z0
        torch.testing.assert_close(cube, expected.expand(CROP), rtol=0, atol=1e-4)
    # in-plane: read each rescaled crop's side and corner offset back from a coordinate volume
    for axis in (1, 2):
        cubes, _ = crop_instances(coordinate_volume(axis), WORDS * 8, **kw, generator=gen(17 + axis))
        sides, offsets = [], []
        for i, cube in enumerate(cubes[32:, 0]):
            w = (WORDS * 8)[(i % 32) // 2]
            profile = cube[0, :, 0] if axis == 1 else cube[0, 0, :]
            assert float(cube.min()) > -1.0  # inside the volume: nothing padded
            side = float(profile[20] - profile[10]) * 32 / 10  # bilinear, align_corners=False: slope side / 32
            start = float(profile[10]) - (10.5 * side / 32 - 0.5) - 100 * w.members[i % 2]
            sides.append(round(side))
            offsets.append(round(start) - (w.coordinate[axis] - CROP[axis] // 2))
            assert abs(side - round(side)) < 1e-3 and abs(start - round(start)) < 1e-3
        assert set(sides) <= set(range(25, 40)) and len(set(sides)) > 5
        assert set(offsets) <= set(range(-5, 5)) and len(set(offsets)) > 3  # np.random.randint(-d, d): -d … d - 1


def test_rescaled_crops_are_seeded():
    vols = np.random.default_rng(2).random((2, 20, 64, 64)).astype(np.float32)
    kw = dict(cube_size=CROP, fill=0.0, multi_resolution=True, jitter=5)
    a, la = crop_instances(vols, WORDS, **kw, generator=gen(20))
    b, lb = crop_instances(vols, WORDS, **kw, generator=gen(20))
    c, _ = crop_instances(vols, WORDS, **kw, generator=gen(21))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.equal(a[:4], c[:4]) and not torch.equal(a[4:], c[4:])
