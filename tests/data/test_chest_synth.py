"""Chest radiograph cartoon: shapes, determinism, prefix property, prevalences, masks, findings, domains, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from thrifty.data import chest_synth as cs

ZERO = dict.fromkeys(cs.FINDINGS, 0.0)
COL = {f: k for k, f in enumerate(cs.FINDINGS)}
N_PAIRS = 120  # coupled positive / negative twins per finding


@pytest.fixture(scope="module")
def cohort() -> cs.ChestBatch:
    """Default prevalences except the nodule (an override must leave the other findings at their defaults)."""
    return cs.generate(1500, seed=1, prevalence={"nodule": 0.3})


@pytest.fixture(scope="module")
def negatives() -> cs.ChestBatch:
    return cs.generate(N_PAIRS, seed=21, prevalence=ZERO)


def _twin(finding: str, **kw) -> cs.ChestBatch:
    """Same patients as ``negatives`` (same seed) with ``finding`` present in every image."""
    return cs.generate(N_PAIRS, seed=21, prevalence={**ZERO, finding: 1.0}, **kw)


def _rise(batch: cs.ChestBatch, base: cs.ChestBatch, col: int) -> np.ndarray:
    """Each image's mean intensity rise over its own ``col`` region, against the same patient without it."""
    return np.array([(p[0][k] - q[0][k]).mean() for p, q, k in zip(batch.images, base.images, batch.masks[:, col])])


def _auc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each column of ``scores`` (n, k) for binary ``y``."""
    y = y.astype(bool)
    ranks = scores.argsort(0).argsort(0) + 1.0
    n_pos, n_neg = y.sum(), (~y).sum()
    return (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _highpass_var(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the variance of the Laplacian (fine texture: markings, noise) inside its mask."""
    return np.array([ndimage.laplace(img.astype(np.float64))[m].var() for img, m in zip(images, masks)])


def test_api_constants():
    assert cs.FINDINGS[-1] == cs.TARGET == "ground_glass" and len(cs.FINDINGS) == 7
    assert set(cs.DEFAULT_PREVALENCE) == set(cs.FINDINGS)
    assert all(0.02 <= p <= 0.30 for p in cs.DEFAULT_PREVALENCE.values())
    assert set(cs.DOMAINS) == {"A", "B"}
    assert dataclasses.is_dataclass(cs.Domain) and dataclasses.fields(cs.Domain)[0].name == "name"


@pytest.mark.parametrize("domain", ["A", "B"])
def test_shapes_dtypes_and_range(domain):
    b = cs.generate(6, seed=0, domain=domain)
    assert len(b) == 6
    assert b.images.shape == (6, 1, 64, 64) and b.images.dtype == np.float32
    assert b.labels.shape == (6, 7) and b.labels.dtype == np.uint8 and set(np.unique(b.labels)) <= {0, 1}
    assert b.masks.shape == (6, 7, 64, 64) and b.masks.dtype == bool
    assert b.ids.shape == (6,) and b.ids.dtype == np.int64
    assert np.isfinite(b.images).all() and b.images.min() >= 0.0 and b.images.max() <= 1.0
    assert b.images.std() > 0.1  # a picture, not a flat field
    other = cs.generate(2, seed=0, size=40, domain=domain)
    assert other.images.shape == (2, 1, 40, 40) and other.masks.shape == (2, 7, 40, 40)
    empty = cs.generate(0, seed=0)
    assert len(empty) == 0 and empty.images.shape == (0, 1, 64, 64)


def test_deterministic_per_seed():
    a, b = cs.generate(12, seed=5), cs.generate(12, seed=5)
    for field in ("images", "labels", "masks", "ids"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    c = cs.generate(12, seed=6)
    assert not np.array_equal(a.images, c.images)
    assert not np.intersect1d(a.ids, c.ids).size
    assert all(not np.array_equal(a.images[i], a.images[j]) for i in range(12) for j in range(i))


def test_prefix_property_and_subset():
    big, small = cs.generate(10, seed=3), cs.generate(5, seed=3)
    sub = big.subset(range(5))
    for field in ("images", "labels", "masks", "ids"):
        assert np.array_equal(getattr(sub, field), getattr(small, field))
    assert np.array_equal(big.ids, 3 * 1_000_000 + np.arange(10))
    picked = big.subset([7, 2])
    assert np.array_equal(picked.images, big.images[[7, 2]]) and np.array_equal(picked.ids, big.ids[[7, 2]])
    by_mask = big.subset(np.arange(10) % 2 == 1)
    assert np.array_equal(by_mask.ids, big.ids[1::2]) and len(big.subset(slice(2, 5))) == 3


def test_prevalence_zero_and_one():
    none = cs.generate(30, seed=2, prevalence=ZERO)
    assert not none.labels.any() and not none.masks.any()
    every = cs.generate(30, seed=2, prevalence=dict.fromkeys(cs.FINDINGS, 1.0))
    assert every.labels.all()
    assert every.masks.any(axis=(2, 3)).all()


def test_prevalence_within_binomial_tolerance(cohort):
    n = len(cohort)
    expected = {**cs.DEFAULT_PREVALENCE, "nodule": 0.3}
    for f, k in COL.items():
        p = expected[f]
        tol = 4.5 * np.sqrt(p * (1 - p) / n)
        assert abs(cohort.labels[:, k].mean() - p) < tol, f


def test_findings_drawn_independently(cohort):
    y = cohort.labels.astype(float)
    corr = np.corrcoef(y.T)
    off = corr[~np.eye(7, dtype=bool)]
    assert np.abs(off).max() < 4.5 / np.sqrt(len(cohort))


def test_mask_present_iff_label(cohort):
    present = cohort.masks.any(axis=(2, 3))
    assert np.array_equal(present, cohort.labels.astype(bool))


def test_masks_have_plausible_size_and_place(cohort):
    size = cohort.images.shape[-1]
    y = cohort.labels.astype(bool)
    nod = cohort.masks[y[:, COL["nodule"]], COL["nodule"]].sum(axis=(1, 2))
    assert nod.min() >= np.pi * 1.5**2 and nod.max() <= np.pi * 4.5**2  # radius 2–4 px at 64², times the pose scale
    rows = np.arange(size)[None, :, None]
    for f in ("effusion", "atelectasis"):  # basal findings sit in the lower half
        m = cohort.masks[y[:, COL[f]], COL[f]]
        centroid_row = (m * rows).sum(axis=(1, 2)) / m.sum(axis=(1, 2))
        assert (centroid_row > size / 2).mean() > 0.9, f
    gg = cohort.masks[y[:, COL["ground_glass"]], COL["ground_glass"]]
    assert gg[:, :, : size // 2].any(axis=(1, 2)).all() and gg[:, :, size // 2 :].any(axis=(1, 2)).all()  # bilateral
    for f in ("nodule", "pneumothorax", "consolidation", "atelectasis"):  # unilateral
        m = cohort.masks[y[:, COL[f]], COL[f]]
        both = m[:, :, : size // 2 - 2].any(axis=(1, 2)) & m[:, :, size // 2 + 2 :].any(axis=(1, 2))
        assert not both.any(), f


def test_a_finding_changes_the_image_only_around_its_mask(negatives):
    for f in ("nodule", "effusion", "pneumothorax", "consolidation", "ground_glass"):
        pos = _twin(f)
        assert pos.labels[:, COL[f]].all() and np.array_equal(pos.ids, negatives.ids)
        diff = np.abs(pos.images[:, 0] - negatives.images[:, 0])
        near = np.stack([ndimage.binary_dilation(m, iterations=2) for m in pos.masks[:, COL[f]]])
        assert (diff[~near] > 0.02).mean() < 0.005, f
        assert diff[near].mean() > 5 * diff[~near].mean(), f


def test_opacities_brighten_their_region(negatives):
    for f in ("nodule", "effusion", "consolidation", "atelectasis"):
        raised = _rise(_twin(f), negatives, COL[f])
        assert (raised > 0).mean() > 0.9 and raised.mean() > 0.04, f


def test_cardiomegaly_enlarges_the_heart_beyond_half_the_thorax():
    # the ground-glass mask spans both lungs out to their lateral margins: a ruler for the thoracic width
    both = {**ZERO, "ground_glass": 1.0}
    big = cs.generate(N_PAIRS, seed=21, prevalence={**both, "cardiomegaly": 1.0})
    small = cs.generate(N_PAIRS, seed=21, prevalence=both)
    assert big.labels[:, COL["cardiomegaly"]].all() and not small.labels[:, COL["cardiomegaly"]].any()
    assert not small.masks[:, COL["cardiomegaly"]].any()

    def span(m: np.ndarray) -> float:  # leftmost to rightmost True column
        cols = np.flatnonzero(m.any(axis=0))
        return cols[-1] - cols[0] + 1.0 if cols.size else 0.0

    heart = np.array([max(span(row[None]) for row in m) for m in big.masks[:, COL["cardiomegaly"]]])  # widest row
    thorax = np.array([span(m) for m in big.masks[:, COL["ground_glass"]]])
    ratio = heart / thorax
    assert np.median(ratio) > 0.5 and (ratio > 0.46).mean() > 0.95 and ratio.max() < 0.7
    # the enlarged heart takes over lung: brighter there than in the twin with a normal heart
    m = big.masks[:, COL["cardiomegaly"]]
    gain = np.array([(p[0][k] - q[0][k]).mean() for p, q, k in zip(big.images, small.images, m)])
    assert (gain > 0).mean() > 0.95
    # strength shrinks the margin to the threshold but never breaks the rule
    weak = cs.generate(40, seed=21, prevalence={**both, "cardiomegaly": 1.0}, strength={"cardiomegaly": 0.0})
    weak_heart = weak.masks[:, COL["cardiomegaly"]].sum(axis=(1, 2))
    assert weak.labels[:, COL["cardiomegaly"]].all() and (weak_heart <= m[:40].sum(axis=(1, 2))).all()


def test_pneumothorax_crescent_is_darker_and_textureless(negatives):
    """Twins differ only by the pneumothorax (same anatomy, texture and scanner noise): inside the crescent, away
    from its edges (the chest wall and the pleural line), the lung markings are gone."""
    clean = cs.Domain("clean", gamma=(1.0, 1.0), contrast=1.0, brightness=0.0, noise_std=0.0, blur_sigma=0.0)
    for domain, neg, max_ratio in (
        ("A", negatives, 0.92),
        (clean, cs.generate(N_PAIRS, seed=21, prevalence=ZERO, domain=clean), 0.75),
    ):
        pos = _twin("pneumothorax", domain=domain)
        inner = np.stack([ndimage.binary_erosion(m, iterations=2) for m in pos.masks[:, COL["pneumothorax"]]])
        wide = inner.sum(axis=(1, 2)) >= 5
        assert wide.mean() > 0.8  # most crescents are several pixels thick
        inner, pos_img, neg_img = inner[wide], pos.images[wide, 0], neg.images[wide, 0]
        var_pos, var_neg = _highpass_var(pos_img, inner), _highpass_var(neg_img, inner)
        assert var_pos.mean() < max_ratio * var_neg.mean() and (var_pos < var_neg).mean() > 0.8
        darker = np.array([(p[k] - q[k]).mean() for p, q, k in zip(pos_img, neg_img, inner)])
        assert (darker < 0).mean() > 0.95


def test_ground_glass_haze_is_peripheral_and_grows_with_strength(negatives):
    effects = []
    for s in (0.5, 1.0, 2.0):
        pos = _twin("ground_glass", strength={"ground_glass": s})
        m = pos.masks[:, COL["ground_glass"]]
        raised = np.array([(p[0][k] - q[0][k]).mean() for p, q, k in zip(pos.images, negatives.images, m)])
        assert (raised > 0).mean() > 0.95
        effects.append(raised.mean())
        if s == 1.0:  # lung markings stay visible through the haze
            keep = _highpass_var(pos.images[:, 0], m) / _highpass_var(negatives.images[:, 0], m)
            assert np.median(keep) > 0.8
            # the haze sits in the periphery: the lung just inside the mask changes far less
            ring = np.stack([ndimage.binary_dilation(k, iterations=3) & ~k for k in m])
            outside = np.array([(p[0][k] - q[0][k]).mean() for p, q, k in zip(pos.images, negatives.images, ring)])
            assert outside.mean() < 0.5 * raised.mean()
    assert effects[0] < effects[1] < effects[2]
    assert effects[2] > 3 * effects[0]


def test_ground_glass_is_not_solved_by_a_pixel_or_the_mean(cohort):
    y = cohort.labels[:, COL["ground_glass"]]
    x = cohort.images.reshape(len(cohort), -1).astype(np.float64)
    assert _auc(x.mean(axis=1, keepdims=True), y)[0] < 0.7
    assert _auc(x, y).max() < 0.85


def test_domains_render_the_same_patients_differently():
    a = cs.generate(60, seed=4, domain="A")
    b = cs.generate(60, seed=4, domain=cs.DOMAINS["B"])
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.masks, b.masks)
    assert b.images.mean() > a.images.mean() + 0.03

    def contrast(img: np.ndarray) -> float:
        return ndimage.gaussian_filter(img[0], 1.5).std()

    def noise(img: np.ndarray) -> float:  # in a flat patch of abdomen, beside the spine
        patch = img[0, -8:-2, 16:26]
        return (patch - patch.mean()).std()

    ca, cb = (np.array([contrast(i) for i in x.images]) for x in (a, b))
    na, nb = (np.array([noise(i) for i in x.images]) for x in (a, b))
    assert (cb < ca).mean() > 0.9  # flatter (and brighter, above)
    assert 0.8 < np.median(nb) / np.median(na) < 1.25  # with A's noise: the scanner is not one noise statistic
    flat = cs.Domain("flat", gamma=(1.0, 1.0), contrast=1.0, brightness=0.0, noise_std=0.0, blur_sigma=0.0)
    f1, f2 = cs.generate(3, seed=4, domain=flat), cs.generate(3, seed=4, domain=flat)
    assert np.array_equal(f1.images, f2.images) and np.array_equal(f1.labels, a.labels[:3])


@pytest.mark.parametrize("style", ["lobar", "peripheral"])
def test_consolidation_styles_are_unilateral_and_local_and_change_nothing_else(negatives, style):
    size = negatives.images.shape[-1]
    c = COL["consolidation"]
    look = _twin("consolidation", consolidation=style)
    assert look.labels[:, c].all() and np.array_equal(look.ids, negatives.ids)
    m = look.masks[:, c]
    both = m[:, :, : size // 2 - 2].any(axis=(1, 2)) & m[:, :, size // 2 + 2 :].any(axis=(1, 2))
    assert m.any(axis=(1, 2)).all() and not both.any()  # one lung, unlike the bilateral target
    diff = np.abs(look.images[:, 0] - negatives.images[:, 0])
    near = np.stack([ndimage.binary_dilation(k, iterations=2) for k in m])
    assert (diff[~near] > 0.02).mean() < 0.005 and diff[near].mean() > 5 * diff[~near].mean()
    assert (_rise(look, negatives, c) > 0).mean() > 0.9
    # a style changes consolidation positives only: without consolidation every style draws the same images
    none = {**ZERO, "effusion": 1.0, "ground_glass": 1.0}
    a = cs.generate(20, seed=3, prevalence=none)
    b = cs.generate(20, seed=3, prevalence=none, consolidation=style)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)


def test_lobar_consolidation_is_larger_and_fainter_than_dense(negatives):
    c = COL["consolidation"]
    dense, lobar = _twin("consolidation"), _twin("consolidation", consolidation="lobar")
    assert np.median(lobar.masks[:, c].sum(axis=(1, 2))) > 1.5 * np.median(dense.masks[:, c].sum(axis=(1, 2)))
    assert np.median(_rise(lobar, negatives, c)) < 0.75 * np.median(_rise(dense, negatives, c))


def test_peripheral_consolidation_is_the_target_haze_in_one_lung(negatives):
    c, g = COL["consolidation"], COL["ground_glass"]
    look = _twin("consolidation", consolidation="peripheral")
    haze = _twin("ground_glass")  # the same patients: the haze's mask covers both lungs' periphery
    m, h = look.masks[:, c], haze.masks[:, g]
    inside = (m & h).sum(axis=(1, 2)) / m.sum(axis=(1, 2))
    assert np.median(inside) > 0.8  # where the haze lies
    assert np.median(m.sum(axis=(1, 2))) < 0.65 * np.median(h.sum(axis=(1, 2)))  # about half of it: one side
    # as faint as the haze at the same strength, per pixel of its region
    ratio = np.median(_rise(look, negatives, c)) / np.median(_rise(haze, negatives, g))
    assert 0.6 < ratio < 1.6


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"prevalence": {"tumour": 0.1}}, "tumour"),
        ({"strength": {"fracture": 2.0}}, "fracture"),
        ({"prevalence": {"nodule": 1.5}}, "nodule"),
        ({"prevalence": {"effusion": -0.1}}, "effusion"),
        ({"prevalence": {"effusion": float("nan")}}, "effusion"),
        ({"strength": {"ground_glass": -1.0}}, "ground_glass"),
        ({"domain": "C"}, "'C'"),
        ({"consolidation": "wispy"}, "'wispy'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_key(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        cs.generate(2, seed=0, **kwargs)


def test_bad_domain_and_counts_raise():
    with pytest.raises(ValueError, match="gamma"):
        cs.Domain("bad", gamma=(1.2, 0.8), contrast=1.0, brightness=0.0, noise_std=0.0, blur_sigma=0.0)
    with pytest.raises(ValueError, match="noise_std"):
        cs.Domain("bad", gamma=(1.0, 1.0), contrast=1.0, brightness=0.0, noise_std=-0.1, blur_sigma=0.0)
    for kwargs in ({"n": -1, "seed": 0}, {"n": 2, "seed": -1}, {"n": 2, "seed": 0, "size": 8}):
        with pytest.raises(ValueError):
            cs.generate(**kwargs)
