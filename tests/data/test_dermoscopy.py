"""Dermoscopy cartoon: shapes, determinism, prefix property, class shares and rules, domains, overlap, SDF, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from thrifty.data import dermoscopy as dm

MEL, SK, NEV = (dm.CLASSES.index(c) for c in ("melanoma", "seborrheic_keratosis", "nevus"))
PARAMS = ("radius", "asymmetry", "border_irregularity", "num_colours", "off_centre", "edge_blur")
BALANCED = (1 / 3, 1 / 3, 1 / 3)
CROSS = ndimage.generate_binary_structure(2, 1)


@pytest.fixture(scope="module")
def cohort() -> dict[str, np.ndarray]:
    return dm.generate(600, seed=3)


def _gaps(spec: dm.LesionSpec, n: int = 300) -> dict[str, float]:
    """Melanoma mean minus nevus mean of each diagnostic parameter, on a balanced cohort."""
    out = dm.generate(n, seed=11, spec=spec)
    lab = out["labels"]
    return {k: out[k][lab == MEL].mean() - out[k][lab == NEV].mean() for k in PARAMS}


def _disc(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return ((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / (a | b).sum()


def _inner_boundary(fg: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (the image edge counts as foreground)."""
    return fg & ~ndimage.binary_erosion(fg, CROSS, border_value=1)


# ---------------------------------------------------------------------------------------------------------------
# generator


def test_shapes_and_dtypes():
    for size in (32, 64):
        out = dm.generate(5, seed=0, size=size)
        assert out["images"].shape == (5, size, size, 3) and out["images"].dtype == np.uint8
        assert out["masks"].shape == (5, size, size) and out["masks"].dtype == np.uint8
        assert out["labels"].shape == (5,) and out["labels"].dtype == np.int64
        assert set(np.unique(out["masks"])) <= {0, 1}
        assert ((out["labels"] >= 0) & (out["labels"] < len(dm.CLASSES))).all()
        for k in PARAMS:
            assert out[k].shape == (5,) and out[k].dtype == np.float64 and np.isfinite(out[k]).all()
    empty = dm.generate(0, seed=0)
    assert empty["images"].shape == (0, 64, 64, 3) and empty["labels"].shape == (0,)


def test_deterministic_and_seed_dependent():
    a, b = dm.generate(8, seed=5), dm.generate(8, seed=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = dm.generate(8, seed=6)
    assert not np.array_equal(a["images"], c["images"])
    assert not np.array_equal(a["masks"], c["masks"])


def test_image_i_does_not_depend_on_n():
    small, big = dm.generate(4, seed=9), dm.generate(12, seed=9, domain="isic")
    for k in small:
        np.testing.assert_array_equal(small[k], big[k][:4])


def test_images_are_not_trivial(cohort):
    imgs = cohort["images"][:50].astype(float)
    assert imgs.std(axis=(1, 2, 3)).min() > 3  # lesion, illumination, texture
    assert not np.array_equal(imgs[0], imgs[1])
    # the lesion is darker than the surrounding skin on average
    m = cohort["masks"][:50].astype(bool)
    inside = np.array([img[mi].mean() for img, mi in zip(imgs, m)])
    outside = np.array([img[~mi].mean() for img, mi in zip(imgs, m)])
    assert (inside < outside).mean() > 0.9


def test_class_shares_follow_class_probs(cohort):
    shares = np.bincount(cohort["labels"], minlength=3) / len(cohort["labels"])
    np.testing.assert_allclose(shares, dm.LesionSpec().class_probs, atol=0.06)
    assert np.argmax(shares) == NEV
    only_sk = dm.generate(30, seed=1, spec=dm.LesionSpec(class_probs=(0.0, 1.0, 0.0)))
    assert (only_sk["labels"] == SK).all()


def test_masks_nonempty_binary_and_inside(cohort):
    m = cohort["masks"]
    assert set(np.unique(m)) == {0, 1}
    area = m.mean(axis=(1, 2))
    assert (area > 0.01).all() and (area < 0.7).all()
    touches = m[:, 0].any(1) | m[:, -1].any(1) | m[:, :, 0].any(1) | m[:, :, -1].any(1)
    assert touches.mean() < 0.05
    # one connected lesion per image (the outline is a star-shaped polar curve)
    for mask in m[:40]:
        assert ndimage.label(mask)[1] == 1


def test_class_rules_hold_on_average(cohort):
    lab, m = cohort["labels"], cohort["masks"].astype(bool)
    mel, sk, nev = lab == MEL, lab == SK, lab == NEV
    for k in ("radius", "asymmetry", "border_irregularity", "num_colours", "off_centre"):
        assert cohort[k][mel].mean() > cohort[k][nev].mean(), k
    assert cohort["edge_blur"][sk].mean() < 0.5 * cohort["edge_blur"][nev].mean()  # sharply demarcated
    assert (cohort["num_colours"][mel] >= 3).mean() > 0.6
    assert (cohort["num_colours"][nev] == 1).mean() > 0.5

    # the same rules measured on the masks: larger, less round, more off-centre
    area = m.sum(axis=(1, 2)).astype(float)
    perimeter = np.array([_inner_boundary(mi).sum() for mi in m], float)
    roundness = perimeter / np.sqrt(area)  # a disc minimises it
    centroid = np.array([ndimage.center_of_mass(mi) for mi in m])
    off = np.hypot(*(centroid - (m.shape[1] - 1) / 2).T)
    assert area[mel].mean() > 1.3 * area[nev].mean()
    assert roundness[mel].mean() > roundness[nev].mean()
    assert off[mel].mean() > off[nev].mean()

    # colours, measured on the images: melanomas hold darker (black) and bluer (blue-grey veil) pixels
    img = cohort["images"].astype(float)
    dark = np.array([np.percentile(im[mi].sum(-1), 5) for im, mi in zip(img, m)])
    blue = np.array([(im[mi][:, 2] > im[mi][:, 0]).mean() for im, mi in zip(img, m)])
    assert dark[mel].mean() < dark[nev].mean() - 20
    assert blue[mel].mean() > 0.03 and blue[mel].mean() > 10 * blue[nev].mean()


def test_seborrheic_keratosis_has_bright_dots(cohort):
    """Milia-like dots: lesion pixels much brighter than the lesion's median, mostly in keratoses."""
    lab, m = cohort["labels"], cohort["masks"].astype(bool)
    grey = cohort["images"].astype(float).sum(-1)
    eroded = [ndimage.binary_erosion(mi, CROSS, iterations=2) for mi in m]
    bright = np.array([(g[e] > np.median(g[e]) + 120).mean() if e.any() else 0 for g, e in zip(grey, eroded)])
    assert bright[lab == SK].mean() > 3 * bright[lab == NEV].mean()


def test_hairs_change_images_not_masks_or_labels():
    bald = dm.generate(20, seed=4, spec=dm.LesionSpec(hair_prob=0.0))
    hairy = dm.generate(20, seed=4, spec=dm.LesionSpec(hair_prob=1.0))
    np.testing.assert_array_equal(bald["masks"], hairy["masks"])
    np.testing.assert_array_equal(bald["labels"], hairy["labels"])
    diff = (bald["images"].astype(int) - hairy["images"].astype(int)).any(-1)
    assert diff.any(axis=(1, 2)).all()  # every image gained hairs
    # hairs are thin dark lines: they darken a small fraction of the pixels, over skin and lesion alike
    darker = bald["images"].astype(int).sum(-1) - hairy["images"].astype(int).sum(-1) > 60
    assert 0.002 < darker.mean() < 0.2
    assert darker[~bald["masks"].astype(bool)].any()


def test_size_changes_resolution_not_content():
    small, large = dm.generate(12, seed=2, size=32), dm.generate(12, seed=2, size=128)
    np.testing.assert_array_equal(small["labels"], large["labels"])
    np.testing.assert_allclose(small["radius"], large["radius"])
    np.testing.assert_allclose(small["masks"].mean(axis=(1, 2)), large["masks"].mean(axis=(1, 2)), atol=0.02)


def test_ph2_domain_shifts_appearance_only():
    spec = dm.LesionSpec(hair_prob=0.0)
    isic, ph2 = dm.generate(80, seed=7, spec=spec), dm.generate(80, seed=7, domain="ph2", spec=spec)
    np.testing.assert_array_equal(isic["masks"], ph2["masks"])
    np.testing.assert_array_equal(isic["labels"], ph2["labels"])
    for k in PARAMS:
        np.testing.assert_array_equal(isic[k], ph2[k])

    def skin(out):
        return np.array([im[mi == 0].mean(0) for im, mi in zip(out["images"].astype(float), out["masks"])])

    s_isic, s_ph2 = skin(isic), skin(ph2)
    shift = s_ph2.mean(0) - s_isic.mean(0)
    assert np.abs(shift).max() > 15  # a clear colour shift
    assert shift[2] > 15  # pinker / cooler: more blue than the tan ISIC skin
    assert (s_ph2[:, 2] - s_ph2[:, 1]).mean() > (s_isic[:, 2] - s_isic[:, 1]).mean() + 10


def test_overlap_pulls_classes_together():
    gap0 = _gaps(dm.LesionSpec(class_probs=BALANCED, overlap=0.0))
    gap_default = _gaps(dm.LesionSpec(class_probs=BALANCED))
    gap1 = _gaps(dm.LesionSpec(class_probs=BALANCED, overlap=1.0))
    for k in ("radius", "asymmetry", "border_irregularity", "num_colours", "off_centre"):
        assert gap0[k] > gap_default[k] > 0, k
        assert abs(gap1[k]) < 0.2 * gap0[k], k


def test_overlap_one_makes_images_uninformative():
    """With overlap 1 the mean image statistics of melanomas and nevi agree within noise."""
    out = dm.generate(300, seed=12, spec=dm.LesionSpec(class_probs=BALANCED, overlap=1.0, hair_prob=0.0))
    lab = out["labels"]
    area = out["masks"].mean(axis=(1, 2))
    se = np.sqrt(area[lab == MEL].var() / (lab == MEL).sum() + area[lab == NEV].var() / (lab == NEV).sum())
    assert abs(area[lab == MEL].mean() - area[lab == NEV].mean()) < 4 * se


# ---------------------------------------------------------------------------------------------------------------
# normalised SDF


def _check_sdf(mask: np.ndarray, sdf: np.ndarray) -> None:
    fg = mask.astype(bool)
    boundary = _inner_boundary(fg)
    assert sdf.dtype == np.float32 and sdf.shape == mask.shape
    assert (sdf[fg & ~boundary] < 0).all()
    assert (sdf[~fg] > 0).all()
    assert (sdf[boundary] == 0).all()
    assert sdf.min() >= -1 and sdf.max() <= 1
    assert np.isclose(sdf.min(), -1) and np.isclose(sdf.max(), 1)
    soft = 1 / (1 + np.exp(np.clip(1500.0 * sdf.astype(np.float64), -500, 500)))
    assert _iou(soft >= 0.5, fg) > 0.95


def test_sdf_of_a_disc():
    mask = _disc(64, 27.3, 35.1, 14.0)
    _check_sdf(mask, dm.normalised_sdf(mask))


def test_sdf_of_generated_lesions(cohort):
    masks = cohort["masks"][:20]
    sdf = dm.normalised_sdf(masks)
    assert sdf.shape == masks.shape
    for mask, s in zip(masks, sdf):
        _check_sdf(mask, s)
    np.testing.assert_array_equal(sdf[3], dm.normalised_sdf(masks[3]))  # (H, W) input gives the same map


def test_sdf_matches_brute_force_distances():
    rng = np.random.default_rng(0)
    mask = (ndimage.gaussian_filter(rng.standard_normal((18, 18)), 2.0) > 0.05).astype(np.uint8)
    mask[0, :] = 0  # make sure both sides are present
    mask[9, 9] = 1
    fg = mask.astype(bool)
    pts = np.argwhere(np.ones_like(fg))
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).reshape(fg.size, fg.size)
    flat = fg.ravel()
    d_in = np.where(flat, d[:, ~flat].min(axis=1), 0.0)  # fg pixel -> nearest bg pixel
    d_out = np.where(~flat, d[:, flat].min(axis=1), 0.0)  # bg pixel -> nearest fg pixel
    expected = (d_out / d_out.max() - d_in / d_in.max()).reshape(fg.shape)
    expected[_inner_boundary(fg)] = 0
    np.testing.assert_allclose(dm.normalised_sdf(mask), expected, atol=1e-6)


def test_sdf_degenerate_masks_give_zeros():
    for mask in (np.zeros((16, 16), np.uint8), np.ones((16, 16), np.uint8)):
        sdf = dm.normalised_sdf(mask)
        assert sdf.dtype == np.float32 and sdf.shape == (16, 16) and not sdf.any()
    batch = np.stack([np.zeros((32, 32), np.uint8), _disc(32, 16, 16, 6)])
    sdf = dm.normalised_sdf(batch)
    assert not sdf[0].any() and sdf[1].min() < 0 < sdf[1].max()
    with pytest.raises(ValueError, match="shape"):
        dm.normalised_sdf(np.zeros((2, 2, 2, 2)))


# ---------------------------------------------------------------------------------------------------------------
# errors and spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": -1}, "n must"),
        ({"n": 2.5}, "n must"),
        ({"n": 2, "domain": "mars"}, r"unknown domain 'mars'.*isic.*ph2"),
        ({"n": 2, "size": 8}, "size"),
        ({"n": 2, "seed": -3}, "seed"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    kwargs.setdefault("seed", 0)
    with pytest.raises(ValueError, match=match):
        dm.generate(**kwargs)


def test_spec_validation():
    with pytest.raises(ValueError, match=r"class_probs.*sum to 1"):
        dm.LesionSpec(class_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"class_probs.*3 entries"):
        dm.LesionSpec(class_probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="class_probs"):
        dm.LesionSpec(class_probs=(1.2, -0.2, 0.0))
    with pytest.raises(ValueError, match="overlap"):
        dm.LesionSpec(overlap=1.5)
    with pytest.raises(ValueError, match="radius_range"):
        dm.LesionSpec(radius_range=(0.3, 0.1))
    with pytest.raises(ValueError, match="noise_std"):
        dm.LesionSpec(noise_std=-0.1)
    with pytest.raises(ValueError, match="hair_prob"):
        dm.LesionSpec(hair_prob=float("nan"))
    with pytest.raises(ValueError, match="max_hairs"):
        dm.LesionSpec(max_hairs=0)
    with pytest.raises(TypeError, match="LesionSpec"):
        dm.generate(1, seed=0, spec={"overlap": 0.5})


def test_from_overrides():
    spec = dm.LesionSpec.from_overrides({"overlap": 0.5, "class_probs": [0.3, 0.3, 0.4]})
    assert spec == dm.LesionSpec(overlap=0.5, class_probs=(0.3, 0.3, 0.4))
    assert isinstance(spec.class_probs, tuple)
    assert dm.LesionSpec.from_overrides({}) == dm.LesionSpec()
    with pytest.raises(ValueError, match=r"unknown.*'bogus'.*valid keys:.*overlap.*hair_prob"):
        dm.LesionSpec.from_overrides({"bogus": 1, "overlap": 0.1})
    with pytest.raises(ValueError, match="overlap"):
        dm.LesionSpec.from_overrides({"overlap": -0.2})
