"""Synthetic CTPA exams: shapes, determinism, RSNA label rules, HU levels, emboli shapes, drift, helpers, errors."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from scipy import ndimage

from thrifty.data import ctpa_synth as cs

CROSS = ndimage.generate_binary_structure(2, 1)
IDX = {name: i for i, name in enumerate(cs.EXAM_LABELS)}
MIXED = cs.CTPASpec(positive_rate=1.0, chronic_rate=0.4, acute_and_chronic_rate=0.3, indeterminate_rate=0.0)


@pytest.fixture(scope="module")
def cohort() -> list[cs.Exam]:
    return cs.generate(120, seed=0)


@pytest.fixture(scope="module")
def mixed() -> list[cs.Exam]:
    return cs.generate(40, seed=2, spec=MIXED)


def _runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of ones."""
    padded = np.concatenate([[0], labels.astype(int), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def _ring(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(mask, CROSS) & ~mask


def _disk(shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _vessel(exam: cs.Exam, name: str) -> cs.Vessel:
    return next(v for v in exam.vessels if v.name == name)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


# ---------------------------------------------------------------------------------------------------------------
# shapes, determinism, ids


def test_label_names_are_the_rsna_exam_labels():
    assert cs.EXAM_LABELS == (
        "negative_exam_for_pe",
        "indeterminate",
        "leftsided_pe",
        "rightsided_pe",
        "central_pe",
        "rv_lv_ratio_gte_1",
        "rv_lv_ratio_lt_1",
        "chronic_pe",
        "acute_and_chronic_pe",
    )


def test_shapes_and_dtypes(cohort):
    for e in cohort[:10]:
        S = e.n_slices
        assert 24 <= S <= 80
        assert e.volume.shape == (S, 64, 64) and e.volume.dtype == np.int16
        assert e.slice_labels.shape == (S,) and e.slice_labels.dtype == np.uint8
        assert set(np.unique(e.slice_labels)) <= {0, 1}
        assert e.exam_labels.shape == (9,) and e.exam_labels.dtype == np.uint8
        assert set(e.labels) == set(cs.EXAM_LABELS) and list(e.labels.values()) == e.exam_labels.tolist()
        assert e.emboli_masks.shape == (S, 64, 64) and e.emboli_masks.dtype == bool
        assert len(e.spacing) == 3 and all(s > 0 for s in e.spacing)
        assert e.positions.shape == (S,) and e.positions.dtype == np.float64
        assert np.allclose(np.diff(e.positions), e.spacing[0])
        assert isinstance(e.study_id, str)
        assert e.volume.min() >= -1024 and e.volume.max() <= 3071
    assert len({e.n_slices for e in cohort}) > 20  # slice counts vary
    small = cs.generate_exam(0, spec=cs.CTPASpec(size=32, slices=(12, 12)))
    assert small.volume.shape == (12, 32, 32)
    assert cs.generate(0, seed=0) == []


def test_exam_is_a_function_of_seed_and_index():
    a, b = cs.generate_exam(5, index=2), cs.generate_exam(5, index=2)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.emboli_masks, b.emboli_masks)
    assert np.array_equal(a.exam_labels, b.exam_labels) and a.study_id == b.study_id and a.emboli == b.emboli
    for other in (cs.generate_exam(5, index=3), cs.generate_exam(6, index=2)):
        assert other.volume.shape != a.volume.shape or not np.array_equal(other.volume, a.volume)


def test_exam_i_does_not_depend_on_n():
    short, long = cs.generate(2, seed=7), cs.generate(5, seed=7)
    single = cs.generate_exam(7, index=1)
    for e in (short[1], single):
        assert np.array_equal(e.volume, long[1].volume) and np.array_equal(e.slice_labels, long[1].slice_labels)
        assert e.study_id == long[1].study_id


def test_study_ids_are_unique_and_uids_valid(cohort):
    ids = [e.study_id for e in cohort] + [e.study_id for e in cs.generate(5, seed=1)]
    assert len(set(ids)) == len(ids)
    uids = {e.study_uid for e in cohort}
    assert len(uids) == len(cohort)
    for uid in list(uids)[:10]:
        assert len(uid) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid)


def test_spacing_and_thorax_length(cohort):
    for e in cohort:
        assert 300 / 64 <= e.spacing[1] == e.spacing[2] <= 400 / 64
        assert 210 <= e.spacing[0] * e.n_slices <= 290  # thorax length spread over the slices


def test_exam_of_50_slices_is_fast():
    spec = cs.CTPASpec(slices=(50, 50), positive_rate=1.0)
    best = np.inf
    for i in range(5):
        t = time.perf_counter()
        e = cs.generate_exam(0, index=i, spec=spec)
        best = min(best, time.perf_counter() - t)
    assert e.volume.shape == (50, 64, 64)
    assert best < 0.1


# ---------------------------------------------------------------------------------------------------------------
# labels


def test_negative_iff_no_pe_and_not_indeterminate(cohort):
    for e in cohort:
        lab = e.labels
        has_pe = bool(e.slice_labels.any())
        assert lab["negative_exam_for_pe"] == int(not has_pe and not lab["indeterminate"])
        assert has_pe == bool(e.emboli) == bool(lab["leftsided_pe"] or lab["rightsided_pe"] or lab["central_pe"])
        if lab["negative_exam_for_pe"] or lab["indeterminate"]:
            assert e.exam_labels.sum() == 1  # nothing else, RV/LV labels included


def test_slice_labels_are_the_embolus_masks_in_runs_of_2_to_8(cohort):
    n_runs = 0
    for e in cohort:
        assert np.array_equal(e.slice_labels, e.emboli_masks.any(axis=(1, 2)).astype(np.uint8))
        runs = _runs(e.slice_labels)
        assert runs == [(em.start, em.length) for em in e.emboli]  # one run per embolus, never merged
        assert all(2 <= length <= 8 for _, length in runs)
        n_runs += len(runs)
    assert n_runs > 40


def test_positive_slice_share_and_exam_rates(cohort):
    positives = [e for e in cohort if e.emboli]
    shares = np.array([e.slice_labels.mean() for e in positives])
    assert (shares <= 0.15 + 1e-9).all() and (shares >= 0.05 - 1e-9).mean() >= 0.95
    assert 0.35 <= len(positives) / len(cohort) <= 0.65
    assert sum(e.labels["indeterminate"] for e in cohort) <= 10


def test_location_labels_follow_placement(cohort):
    seen = set()
    for e in cohort:
        locations = {em.location for em in e.emboli}
        seen |= locations
        for loc, name in (("central", "central_pe"), ("left", "leftsided_pe"), ("right", "rightsided_pe")):
            assert e.labels[name] == int(loc in locations)
        for em in e.emboli:
            host = _vessel(e, em.vessel)
            assert host.location == em.location
            x = np.nonzero(e.emboli_masks[em.start])[1].mean()
            if em.location == "right":  # patient's right is the image's left
                assert x < 32
            elif em.location == "left":
                assert x > 32
    assert seen == {"central", "left", "right"}


def test_rv_lv_labels_only_for_positives(cohort):
    for e in cohort:
        gte, lt = e.labels["rv_lv_ratio_gte_1"], e.labels["rv_lv_ratio_lt_1"]
        if e.emboli:
            assert gte + lt == 1 and gte == int(e.rv_lv_ratio >= 1)
        else:
            assert gte == lt == 0 and e.rv_lv_ratio < 1  # negatives have a normal heart
    assert any(e.labels["rv_lv_ratio_gte_1"] for e in cohort) and any(e.labels["rv_lv_ratio_lt_1"] for e in cohort)


def test_chronic_labels_are_exclusive_and_match_the_defects(mixed):
    counts = {"acute": 0, "chronic": 0, "mixed": 0}
    for e in mixed:
        lab = e.labels
        assert not (lab["chronic_pe"] and lab["acute_and_chronic_pe"])
        kinds = {k for em in e.emboli for k in em.kinds}
        if lab["chronic_pe"]:
            assert kinds == {"chronic"}
            counts["chronic"] += 1
        elif lab["acute_and_chronic_pe"]:
            assert kinds == {"acute", "chronic"}
            counts["mixed"] += 1
        else:
            assert kinds == {"acute"}  # acute only: both chronic labels 0
            counts["acute"] += 1
    assert min(counts.values()) >= 3


def test_indeterminate_exams_are_low_contrast_without_pe():
    spec = cs.CTPASpec(indeterminate_rate=1.0)
    for e in cs.generate(4, seed=3, spec=spec):
        assert e.exam_labels.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0]
        assert not e.slice_labels.any() and not e.emboli_masks.any() and not e.emboli
        assert 90 <= e.contrast_hu <= 150
        trunk = _vessel(e, "trunk")
        k = trunk.start + len(trunk.radii) // 2
        lumen = _disk(e.volume.shape[1:], trunk.centres[k - trunk.start], trunk.radii[k - trunk.start] - 0.5)
        assert 60 < np.median(e.volume[k][lumen]) < 180


# ---------------------------------------------------------------------------------------------------------------
# intensities and shapes


def test_defects_are_40_to_70_hu_and_darker_than_their_contrast(cohort):
    checked = 0
    for e in cohort:
        for em in e.emboli:
            assert 40 <= em.hu <= 70
            host = _vessel(e, em.vessel)
            for k in em.slices:
                m = e.emboli_masks[k]
                values = e.volume[k][m].astype(float)
                assert np.abs(values - em.hu).max() <= 5 * e.noise_hu + 1
                row = k - host.start
                lumen = _disk(m.shape, host.centres[row], host.radii[row]) & ~m
                assert not (m & ~_disk(m.shape, host.centres[row], host.radii[row] + 0.01)).any()  # inside the lumen
                if lumen.any():
                    assert np.median(e.volume[k][lumen]) > em.hu + 150
                checked += 1
    assert checked > 100
    defect = np.concatenate([e.volume[e.emboli_masks].astype(float) for e in cohort if e.emboli])
    assert 35 <= np.median(defect) <= 75


def test_contrast_and_lung_levels(cohort):
    for e in cohort[:30]:
        assert 250 <= e.contrast_hu <= 400 or e.labels["indeterminate"]
        assert 15 <= e.noise_hu <= 30
        trunk = _vessel(e, "trunk")
        rows = [j for j, k in enumerate(trunk.slices) if not e.emboli_masks[k].any()]
        j = rows[len(rows) // 2]
        lumen = _disk(e.volume.shape[1:], trunk.centres[j], trunk.radii[j] - 0.5)
        assert abs(np.median(e.volume[trunk.start + j][lumen]) - e.contrast_hu) < 25
        mid = e.volume[e.n_slices // 2]
        air = mid < -500
        lung = ndimage.binary_erosion(ndimage.binary_fill_holes(~air) & air)  # air enclosed by the body
        assert lung.sum() > 200
        assert -900 <= np.median(mid[lung]) <= -800
        assert np.median(mid[~ndimage.binary_fill_holes(~air)]) < -950  # outside the body


def test_acute_defects_are_surrounded_by_contrast_chronic_ones_touch_the_wall(mixed):
    frac: dict[str, list[float]] = {"acute": [], "chronic": []}
    for e in mixed:
        for em in e.emboli:
            for k, kind in zip(em.slices, em.kinds):
                m = e.emboli_masks[k]
                frac[kind].append(float((e.volume[k][_ring(m)] > 150).mean()))
    acute, chronic = np.array(frac["acute"]), np.array(frac["chronic"])
    assert len(acute) > 20 and len(chronic) > 20
    assert acute.mean() > 0.98 and (acute >= 0.8).all()  # the "polo mint": contrast all around (up to noise)
    assert (chronic < 1.0).all() and chronic.mean() < 0.75  # wall-adherent: part of the rim is not lumen


def test_chronic_defects_narrow_the_artery(mixed):
    ratios = []
    for e in mixed:
        for em in e.emboli:
            host = _vessel(e, em.vessel)
            for k, kind in zip(em.slices, em.kinds):
                if kind != "chronic":
                    continue
                near = [j for j in (k - 1, k + 1) if j in host.slices and not e.emboli_masks[j].any()]
                if not near:
                    continue
                row, nrow = k - host.start, near[0] - host.start
                ratios.append(host.radii[row] / host.radii[nrow])
                lumen_area = ((e.volume[k] > 150) | e.emboli_masks[k])[
                    _disk(e.volume.shape[1:], host.centres[row], host.radii[nrow] + 1)
                ].sum()
                neighbour = (e.volume[near[0]] > 150)[
                    _disk(e.volume.shape[1:], host.centres[nrow], host.radii[nrow] + 1)
                ].sum()
                ratios.append(lumen_area / max(neighbour, 1))
    assert len(ratios) > 10 and np.median(ratios) < 0.9


def test_vessels_drift_smoothly(cohort):
    drift = cs.CTPASpec().vessel_drift
    for e in cohort[:20]:
        names = {v.name for v in e.vessels}
        assert "trunk" in names and any(n.startswith("left_lobar") for n in names)
        assert any(n.startswith("right_lobar") for n in names) and any("_seg_" in n for n in names)
        for v in e.vessels:
            steps = np.linalg.norm(np.diff(v.centres, axis=0), axis=1)
            assert steps.max(initial=0) <= drift + 0.25, v.name
            assert (v.radii > 0).all()
            # the image has contrast at the recorded centres (outside defects)
            for j, k in enumerate(v.slices):
                y, x = np.rint(v.centres[j]).astype(int)
                if not e.emboli_masks[k, max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3].any():
                    assert e.volume[k, y, x] > 150 or e.labels["indeterminate"], (v.name, k)


def test_trunk_centroid_moves_little_between_slices():
    spec = cs.CTPASpec(noise_hu=(0.0, 0.0), positive_rate=0.0)
    for e in cs.generate(5, seed=4, spec=spec):
        trunk = _vessel(e, "trunk")
        cents = []
        for j, k in enumerate(trunk.slices):
            if k <= trunk.start + 1 or k >= trunk.slices[-1]:
                continue  # the lowest two slices overlap the heart, the top one the main pulmonary arteries
            bright, _ = ndimage.label(e.volume[k] > 0.9 * e.contrast_hu)  # the aorta is dimmer
            y, x = np.rint(trunk.centres[j]).astype(int)
            comp = bright == bright[y, x]
            cents.append(ndimage.center_of_mass(comp))
        shifts = np.linalg.norm(np.diff(np.array(cents), axis=0), axis=1)
        assert len(cents) >= 2 and shifts.max() < 1.5


def test_lobar_tree_branches_from_the_hila():
    e = cs.generate_exam(3, spec=cs.CTPASpec(positive_rate=0.0))
    for side in ("left", "right"):
        lobar = [v for v in e.vessels if v.name.startswith(f"{side}_lobar") and "_seg_" not in v.name]
        assert len(lobar) == 2
        for v in lobar:  # widest at the hilum (next to the bifurcation), narrower than the trunk
            assert v.radii.max() < _vessel(e, "trunk").radii.min()
            assert v.radii[np.argmin(np.abs(np.array(v.slices) - _vessel(e, "trunk").slices[-1]))] == v.radii.max()
            segs = [w for w in e.vessels if w.name.startswith(v.name + "_seg_")]
            assert segs and all(w.radii.max() < v.radii.max() for w in segs)
        xs = np.concatenate([v.centres[:, 1] for v in e.vessels if v.location == side])
        assert (xs > 32).all() if side == "left" else (xs < 32).all()


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_window():
    hu = np.array([-3000, -1000, -250, 100, 450, 1000, 3000], np.int16)
    w = cs.window(hu)
    assert w.dtype == np.float32 and w.shape == hu.shape
    assert w[3] == pytest.approx(0.5)
    assert w.tolist()[:3] == [0.0, 0.0, 0.0] and w.tolist()[4:] == [1.0, 1.0, 1.0]
    assert cs.window(np.array([-250 + 70.0]))[0] == pytest.approx(0.1)
    assert cs.window(np.array([0.0]), level=0, width=100)[0] == pytest.approx(0.5)
    vol = cs.generate_exam(0).volume
    wv = cs.window(vol)
    assert wv.shape == vol.shape and wv.min() >= 0 and wv.max() <= 1
    with pytest.raises(ValueError, match="width"):
        cs.window(hu, width=0)


def test_lung_bbox_covers_the_lungs(cohort):
    for e in cohort[:10]:
        y0, y1, x0, x1 = cs.lung_bbox(e.volume)
        assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 64
        assert (y1 - y0) * (x1 - x0) < 0.8 * 64 * 64  # tighter than the slice
        for k in range(e.n_slices):
            air = e.volume[k] < -500
            inside = ndimage.binary_fill_holes(~air) & air  # air enclosed by the body: the lungs
            ys, xs = np.nonzero(inside)
            if ys.size:
                assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
        # the box on one slice is also valid
        ky0, ky1, kx0, kx1 = cs.lung_bbox(e.volume[e.n_slices // 2])
        assert y0 <= ky0 < ky1 <= y1 and x0 <= kx0 < kx1 <= x1


def test_lung_bbox_falls_back_to_the_whole_slice():
    yy, xx = np.mgrid[:48, :40]
    body = ((yy - 24) / 18) ** 2 + ((xx - 20) / 16) ** 2 <= 1
    abdomen = np.where(body, 40, -1000).astype(np.int16)
    assert cs.lung_bbox(abdomen) == (0, 48, 0, 40)
    assert cs.lung_bbox(np.stack([abdomen] * 3)) == (0, 48, 0, 40)
    with_lung = abdomen.copy()
    with_lung[20:26, 10:16] = -850
    assert cs.lung_bbox(np.stack([abdomen, with_lung]), margin=0) == (20, 26, 10, 16)
    with pytest.raises(ValueError, match="shape"):
        cs.lung_bbox(np.zeros(5))


def test_defect_fraction_baseline_is_informative_but_imperfect(cohort):
    pos, neg = [], []
    for e in cohort:
        score = cs.defect_fraction(e.volume)
        assert score.shape == (e.n_slices,) and score.dtype == np.float64
        assert ((score >= 0) & (score <= 1)).all()
        pos.append(score[e.slice_labels == 1])
        neg.append(score[e.slice_labels == 0])
    pos_s, neg_s = np.concatenate(pos), np.concatenate(neg)
    assert pos_s.mean() > neg_s.mean()
    auc = _auc(pos_s, neg_s)
    assert 0.6 < auc < 0.98
    assert cs.defect_fraction(np.full((4, 4), -1000)).tolist() == [0.0]  # no contrast: 0
    yy, xx = np.mgrid[:16, :16]
    r = np.hypot(yy - 8, xx - 8)
    polo = np.where(r <= 2, 50, np.where(r <= 4, 300, -850)).astype(np.int16)
    eaten = np.where((r <= 4) & (xx > 9), 50, np.where(r <= 4, 300, -850)).astype(np.int16)  # wall-adherent
    clean = np.where(r <= 4, 300, -850).astype(np.int16)
    scores = cs.defect_fraction(np.stack([polo, eaten, clean]))
    assert scores[0] > 0.2 and scores[1] < scores[0] and scores[2] == 0


def test_defect_fraction_grid_scores_each_setting():
    yy, xx = np.mgrid[:16, :16]
    r = np.hypot(yy - 8, xx - 8)
    # a blurred-looking defect at 140 HU inside dim (180 HU) contrast: only wide HU ranges and a low contrast
    # threshold see it
    dim = np.where(r <= 2, 140, np.where(r <= 4, 180, -850)).astype(np.int16)[None]
    grid = cs.defect_fraction_grid(dim)
    assert grid.shape == (1, len(cs.DEFECT_FRACTION_GRID))
    for g, (lo, hi, contrast) in enumerate(cs.DEFECT_FRACTION_GRID):
        assert grid[0, g] == cs.defect_fraction(dim, hu_range=(lo, hi), contrast_hu=contrast)[0]
        assert (grid[0, g] > 0) == (hi >= 140 and contrast <= 180)
    assert cs.DEFECT_FRACTION_GRID[0] == (30.0, 80.0, 150.0)  # the default setting comes first
    with pytest.raises(ValueError, match="grid"):
        cs.defect_fraction_grid(dim, grid=())


# ---------------------------------------------------------------------------------------------------------------
# spec


def test_spec_defaults_follow_the_card():
    s = cs.CTPASpec()
    assert s.size == 64 and s.slices == (24, 80) and s.positive_rate == 0.5
    assert s.positive_slice_share == (0.05, 0.15) and s.embolus_length == (2, 8)
    assert s.defect_hu == (40.0, 70.0) and s.contrast_hu == (250.0, 400.0) and s.lung_hu == -850.0
    assert s.noise_hu == (15.0, 30.0) and s.indeterminate_rate == 0.03
    assert cs.CTPASpec.from_overrides(s.to_dict()) == s


def test_from_overrides():
    s = cs.CTPASpec.from_overrides({"slices": [30, 40], "noise_hu": [0, 5], "location_probs": [1, 0, 0]})
    assert s.slices == (30, 40) and s.noise_hu == (0.0, 5.0) and s.location_probs == (1.0, 0.0, 0.0)
    assert cs.CTPASpec.from_overrides(None) == cs.CTPASpec()
    with pytest.raises(ValueError, match="bogus"):
        cs.CTPASpec.from_overrides({"bogus": 1, "size": 64})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"size": 16}, "size"),
        ({"size": 64.5}, "size"),
        ({"slices": (80, 24)}, "slices"),
        ({"slices": (5, 10)}, "slices"),
        ({"positive_rate": 1.5}, "positive_rate"),
        ({"positive_slice_share": (0.0, 0.1)}, "positive_slice_share"),
        ({"embolus_length": (2, 2.5)}, "embolus_length"),
        ({"noise_hu": (30, 15)}, "noise_hu"),
        ({"noise_hu": 20}, "noise_hu"),
        ({"lung_hu": -200}, "lung_hu"),
        ({"rv_lv_ratio_gte_1": (0.9, 1.2)}, "rv_lv_ratio_gte_1"),
        ({"rv_lv_ratio_lt_1": (0.7, 1.0)}, "rv_lv_ratio_lt_1"),
        ({"chronic_rate": 0.7, "acute_and_chronic_rate": 0.5}, "acute_and_chronic_rate"),
        ({"defect_hu": (40, 300)}, "defect_hu"),
        ({"location_probs": (0.5, 0.5, 0.5)}, "location_probs"),
        ({"location_probs": (0.5, 0.5)}, "location_probs"),
        ({"vessel_drift": 0}, "vessel_drift"),
        ({"blur_sigma": float("nan")}, "blur_sigma"),
        ({"indeterminate_rate": True}, "indeterminate_rate"),
    ],
)
def test_bad_spec_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        cs.CTPASpec(**overrides)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        cs.generate_exam(-1)
    with pytest.raises(ValueError, match="index"):
        cs.generate_exam(0, index=1.5)
    with pytest.raises(ValueError, match="n must"):
        cs.generate(-2, seed=0)
    with pytest.raises(TypeError, match="spec"):
        cs.generate_exam(0, spec={"size": 64})


def test_knobs_change_the_exams():
    hard = cs.CTPASpec(noise_hu=(60.0, 60.0), blur_sigma=0.5, positive_rate=1.0)
    e = cs.generate_exam(1, spec=hard)
    assert e.noise_hu == 60.0 and e.emboli
    central = cs.CTPASpec(positive_rate=1.0, location_probs=(1.0, 0.0, 0.0))
    locs = [em.location for e in cs.generate(6, seed=0, spec=central) for em in e.emboli]
    assert locs.count("central") > len(locs) / 2
    none = cs.generate(10, seed=0, spec=cs.CTPASpec(positive_rate=0.0))
    assert all(e.labels["negative_exam_for_pe"] for e in none)
