"""CT phantom: determinism, HU per label, anatomy layout, pose variation, nodules, candidates, crops, cache, NIfTI."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from scipy import ndimage

from thrifty.data import ct_phantom as cp

CLEAN = cp.PhantomConfig(blur_sigma=0.0, noise_hu=0.0)  # no scanner: the label map's own intensities
UPRIGHT = cp.PhantomConfig(scale_jitter=0.0, rotation_deg=0.0, tilt_deg=0.0, shift_vox=0.0)


@pytest.fixture(scope="module")
def cohort() -> list[cp.Patient]:
    return cp.generate_cohort(6, seed=0)


@pytest.fixture(scope="module")
def clean() -> list[cp.Patient]:
    return cp.generate_cohort(3, seed=0, config=CLEAN)


def _median(p: cp.Patient, label: int, *, erode: bool = False) -> float:
    m = p.labels == label
    if erode:
        m = ndimage.binary_erosion(m)
    assert m.sum() > 20, f"too few {cp.LABELS[label]} voxels"
    return float(np.median(p.volume[m]))


def _ball(shape: tuple[int, ...], center: tuple[int, ...], radius: float) -> np.ndarray:
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((gi - c) ** 2 for gi, c in zip(g, center)) <= radius**2


def test_patient_is_a_function_of_seed_and_index(cohort):
    p = cohort[1]
    again = cp.generate_patient(1, seed=0)
    assert again.volume.dtype == np.float32 and again.volume.shape == cp.DEFAULT_SHAPE
    assert np.array_equal(again.volume, p.volume) and np.array_equal(again.labels, p.labels)
    assert again.nodules == p.nodules and again.candidates == p.candidates and again.pose == p.pose
    other_index, other_seed = cohort[2], cp.generate_patient(1, seed=1)
    for q in (other_index, other_seed):
        assert not np.array_equal(q.volume, p.volume)
        assert q.pose != p.pose and q.lung_mask.sum() != p.lung_mask.sum()


def test_switching_nodules_off_keeps_the_anatomy(cohort):
    p = cohort[0]
    q = cp.generate_patient(0, seed=0, with_nodules=False)
    assert p.nodules and not q.nodules and not q.nodule_mask.any()
    assert q.pose == p.pose and np.array_equal(q.lung_mask, p.lung_mask)
    away = ~np.any([_ball(p.shape, n.center, 2.2 * n.radius + 3) for n in p.nodules], axis=0)  # spikes included
    assert np.array_equal(q.labels[away], p.labels[away])
    assert np.allclose(q.volume[away], p.volume[away])
    assert all(c.label == 0 for c in q.candidates) and len(q.candidates) > 10


def test_label_codes():
    assert cp.LABELS == {
        0: "air",
        1: "body",
        2: "fat",
        3: "lung",
        4: "vessel",
        5: "airway",
        6: "heart",
        7: "aorta",
        8: "bone",
        9: "nodule",
    }
    assert (cp.AIR, cp.LUNG, cp.VESSEL, cp.BONE, cp.NODULE) == (0, 3, 4, 8, 9)


def test_hounsfield_units_per_label(cohort):
    for p in cohort:
        assert abs(_median(p, cp.AIR) + 1000) < 10
        assert abs(_median(p, cp.LUNG, erode=True) + 850) < 40
        assert abs(_median(p, cp.BODY) - 40) < 15
        assert _median(p, cp.BONE) >= 300
        assert -300 < _median(p, cp.FAT) < -50
        assert 0 < _median(p, cp.HEART) < 100 and 0 < _median(p, cp.AORTA) < 100
        assert _median(p, cp.VESSEL) > _median(p, cp.LUNG) + 300  # thin tubes: partial volume
        assert _median(p, cp.AIRWAY) < -600
        for n in p.nodules:
            if n.radius >= 3:  # the core of a nodule, away from its blurred rim
                core = p.volume[_ball(p.shape, n.center, n.radius - 1.5)]
                assert -30 < np.median(core) < 130
        assert 10 < float(np.std(p.volume[:3, :3, :3])) < 40  # the noise, in the air of a corner


def test_clean_volume_agrees_with_the_label_map(clean):
    for p in clean:
        vol, lab = p.volume, p.labels
        assert np.all(vol[lab == cp.AIR] == -1000)
        fat = vol[lab == cp.FAT]
        assert fat.min() >= -110 and fat.max() <= -90 and np.ptp(fat) == 0
        assert np.all(vol[lab == cp.BONE] >= 400) and np.percentile(vol[lab == cp.BONE], 90) >= 650
        assert 30 <= np.median(vol[lab == cp.BODY]) <= 50
        heart = vol[lab == cp.HEART]
        assert np.ptp(heart) > 0 and heart.min() >= 30 and heart.max() <= 50 + 25  # myocardium < blood pool
        assert np.all(vol[lab == cp.AIRWAY] == -1000)
        assert abs(np.median(vol[lab == cp.LUNG]) + 850) < 30
        for n in p.nodules:
            if n.attachment == "pleural":  # the chest wall cuts it: its ball reaches outside the lung
                continue
            inner = _ball(p.shape, n.center, 0.8 * n.radius - 0.5)
            if n.type == "part_solid":
                assert vol[n.center] == pytest.approx(n.core_hu, abs=1e-3) and -700 <= n.hu <= -300
                inner &= ~_ball(p.shape, n.center, n.core_radius + 0.5)
            if n.attachment == "vascular":
                inner &= lab == cp.NODULE  # a touching vessel may reach into the ball
            assert np.allclose(vol[inner], n.hu, atol=1e-3)
            assert (0 <= n.hu <= 100) if n.type == "solid" else (-700 <= n.hu <= -300)


def test_anatomy_is_laid_out_like_a_chest(cohort):
    for p in cohort:
        lab, n = ndimage.label(p.lung_mask)
        assert n == 2
        (z1, y1, x1), (z2, y2, x2) = ndimage.center_of_mass(p.lung_mask, lab, [1, 2])
        mid = np.argwhere(p.labels != cp.AIR).mean(axis=0)  # the body's centre
        assert min(x1, x2) < mid[2] - 6 and max(x1, x2) > mid[2] + 6  # one lung each side of the midline
        heart = np.argwhere(p.labels == cp.HEART).mean(axis=0)
        assert min(x1, x2) < heart[2] < max(x1, x2)
        assert heart[1] < max(y1, y2) and heart[0] < max(z1, z2)  # anterior and low
        bone = np.argwhere(p.labels == cp.BONE)
        spine = bone[np.abs(bone[:, 2] - mid[2]) < 4].mean(axis=0)
        assert spine[1] > max(y1, y2) > heart[1]  # spine posterior
        inside = np.unique(p.labels[p.lung_mask])
        assert set(inside.tolist()) <= {cp.BODY, cp.LUNG, cp.VESSEL, cp.AIRWAY, cp.NODULE}
        assert not np.any((p.labels == cp.VESSEL) & ~p.lung_mask)
        assert np.all(p.labels[[0, 0, -1, -1], [0, -1, 0, -1], [0, -1, -1, 0]] == cp.AIR)
        # the fat rim lies between the air and the rest of the body
        assert np.all(p.labels[ndimage.binary_dilation(p.labels == cp.AIR) & (p.labels != cp.AIR)] == cp.FAT)
        assert (p.labels == cp.AIRWAY).sum() > 100 and (p.labels == cp.AORTA).sum() > 100


def test_patients_vary_within_the_pose_bounds(cohort):
    cfg = cp.PhantomConfig()
    volumes = [int(p.lung_mask.sum()) for p in cohort]
    centroids = np.array([np.argwhere(p.lung_mask).mean(axis=0) for p in cohort])
    assert len(set(volumes)) == len(volumes) and np.ptp(centroids, axis=0).max() > 1.0
    centre = (np.array(cp.DEFAULT_SHAPE) - 1) / 2
    for p in cohort[:4]:
        pose = p.pose
        assert abs(pose.scale - 1) <= cfg.scale_jitter and abs(pose.yaw_deg) <= cfg.rotation_deg
        assert max(abs(v) for v in pose.shift) <= cfg.shift_vox
        ref = cp.generate_patient(p.index, seed=p.seed, with_nodules=False, config=UPRIGHT)
        assert ref.pose == cp.Pose(1.0, 0.0, 0.0, (0.0, 0.0, 0.0))
        ratio = p.lung_mask.sum() / ref.lung_mask.sum()
        assert 0.9**3 <= ratio <= 1.1**3 and abs(ratio / pose.scale**3 - 1) < 0.03
        ref_c = np.argwhere(ref.lung_mask).mean(axis=0)
        got = np.argwhere(p.lung_mask).mean(axis=0)
        assert np.abs(got - pose.to_voxel(ref_c - centre, p.shape)).max() < 0.5  # the pose explains the move
        moved = np.abs(got - ref_c)
        reach = np.abs(ref_c - centre) * 0.1 + np.linalg.norm(ref_c - centre) * np.sin(np.radians(8)) + 4.0
        assert np.all(moved <= reach)
    assert np.allclose(
        cohort[0].pose.to_canonical(cohort[0].pose.to_voxel(np.eye(3), cp.DEFAULT_SHAPE), cp.DEFAULT_SHAPE), np.eye(3)
    )


def test_nodules_are_in_the_lungs(cohort):
    lo, hi = cp.PhantomConfig().nodules_per_patient
    kinds = set()
    for p in cohort:
        assert np.array_equal(p.nodule_mask, p.labels == cp.NODULE)
        assert lo <= len(p.nodules) <= hi
        assert not np.any(p.nodule_mask & ~ndimage.binary_dilation(p.lung_mask))
        lab, n = ndimage.label(p.nodule_mask)
        assert n >= len(p.nodules)
        for nod in p.nodules:
            assert 1.5 <= nod.radius <= 5.0 and nod.type in cp.NODULE_TYPES and nod.attachment in cp.ATTACHMENTS
            assert p.nodule_mask[nod.center]
            blob = lab == lab[nod.center]
            if nod.attachment != "pleural":  # a juxta-pleural nodule is cut by the chest wall
                assert blob.sum() >= 0.6 * 4 / 3 * np.pi * nod.radius**3
            extent = np.abs(np.argwhere(blob) - np.array(nod.center)).max()
            assert extent <= (2.2 if nod.spiculated else 1.3) * nod.radius + 1
            kinds.add(nod.spiculated)
    assert kinds == {True, False}


def test_candidates_mark_nodules_and_false_positives(cohort):
    seen = set()
    for p in cohort:
        centers, labels = p.candidate_arrays()
        assert centers.shape == (len(p.candidates), 3) and len({tuple(c) for c in centers}) == len(centers)
        truth = {c.center for c in p.candidates if c.label == 1}
        assert truth == {n.center for n in p.nodules} and labels.sum() == len(p.nodules)
        fps = [c for c in p.candidates if c.label == 0]
        assert len(fps) >= 0.8 * cp.PhantomConfig().false_positives
        for c in fps:
            seen.add(c.kind)
            assert c.kind in cp.CANDIDATE_KINDS and c.kind != "nodule"
            assert p.lung_mask[c.center] and not p.nodule_mask[c.center]
            if c.kind in ("bifurcation", "crossing", "vessel", "blob"):
                assert p.labels[c.center] == cp.VESSEL
            for n in p.nodules:
                assert np.linalg.norm(np.subtract(c.center, n.center)) > 2 * n.radius
    assert {"bifurcation", "vessel", "crossing", "blob", "pleura"} <= seen


def test_crop_cube_pads_with_air():
    vol = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    cube = cp.crop_cube(vol, (3, 3, 4), size=4)
    assert cube.shape == (4, 4, 4) and cube[2, 2, 2] == vol[3, 3, 4]
    assert np.array_equal(cube, vol[1:5, 1:5, 2:6])
    corner = cp.crop_cube(vol, (0, 0, 0), size=(4, 6, 2))
    assert corner.shape == (4, 6, 2)
    assert np.array_equal(corner[2:, 3:, 1:], vol[:2, :3, :1])
    assert np.all(corner[:2] == -1000) and np.all(corner[:, :3] == -1000) and np.all(corner[:, :, :1] == -1000)
    assert np.all(cp.crop_cube(vol, (40, 0, 0), size=3) == -1000)
    mask = cp.crop_cube(vol > 100, (5, 6, 7), size=5, fill=False)
    assert mask.dtype == bool and mask[:2, :2, :2].all() and not mask[3:].any()
    with pytest.raises(cp.PhantomError):
        cp.crop_cube(vol, (1, 2), size=3)


def test_candidate_cubes(cohort):
    p = cohort[0]
    cubes, labels = cp.candidate_cubes(p, size=(8, 12, 12))
    assert cubes.shape == (len(p.candidates), 8, 12, 12) and cubes.dtype == np.float32
    assert labels.tolist() == [c.label for c in p.candidates]
    for cube, c in zip(cubes, p.candidates):
        assert cube[4, 6, 6] == p.volume[c.center]


def _assert_same(a: cp.Patient, b: cp.Patient) -> None:
    for f in dataclasses.fields(cp.Patient):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


def test_cache_round_trip_and_digest(cohort, tmp_path, monkeypatch):
    paths = cp.write_cohort(tmp_path / "c", cohort[:2])
    assert [p.name for p in paths] == ["patient_00000.npz", "patient_00001.npz"]
    for path, p in zip(paths, cohort):
        _assert_same(cp.read_patient(path), p)
    no_nod = cp.generate_patient(3, seed=0, with_nodules=False)
    _assert_same(cp.read_patient(cp.write_cohort(tmp_path / "c", [no_nod])[0]), no_nod)

    small = cp.PhantomConfig(false_positives=4)
    first = cp.cached_cohort(tmp_path / "cache", 2, seed=0, config=small)
    where = cp.cohort_dir(tmp_path / "cache", seed=0, config=small)
    assert sorted(f.name for f in where.iterdir()) == ["cohort.json", "patient_00000.npz", "patient_00001.npz"]

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached patient")

    monkeypatch.setattr(cp, "generate_patient", fail)
    again = cp.cached_cohort(tmp_path / "cache", 2, seed=0, config=small)
    for a, b in zip(first, again):
        _assert_same(a, b)
    monkeypatch.undo()
    keys = {
        cp.cohort_digest(seed=0, config=small),
        cp.cohort_digest(seed=1, config=small),
        cp.cohort_digest(seed=0, config=cp.PhantomConfig(false_positives=5)),
        cp.cohort_digest(seed=0, config=small, with_nodules=False),
        cp.cohort_digest(seed=0, config=small, shape=(32, 64, 64)),
    }
    assert len(keys) == 5 and cp.cohort_dir(tmp_path, seed=0, config=small).name.startswith("ct_phantom-")
    (where / "patient_00001.npz").write_bytes(b"garbage")  # a damaged file is regenerated, not trusted
    redo = cp.cached_cohort(tmp_path / "cache", 2, seed=0, config=small)
    _assert_same(redo[1], first[1])


def test_read_patient_errors(tmp_path):
    with pytest.raises(cp.PhantomError, match="does not exist"):
        cp.read_patient(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(cp.PhantomError, match="not a readable"):
        cp.read_patient(tmp_path / "bad.npz")


def test_nifti_carries_volume_and_spacing(cohort, tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    p = cohort[0]
    img = nib.load(str(cp.to_nifti(p, tmp_path / "p.nii.gz")))
    back = np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0)
    assert np.array_equal(back, p.volume)
    dz, dy, dx = p.spacing
    assert np.allclose(img.header.get_zooms(), (dx, dy, dz))
    assert np.allclose(np.abs(np.diag(img.affine))[:3], (dx, dy, dz))
    labels = nib.load(str(cp.to_nifti(p, tmp_path / "l.nii", what="labels")))
    assert labels.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(labels.dataobj).transpose(2, 1, 0), p.labels)
    with pytest.raises(cp.PhantomError):
        cp.to_nifti(p, tmp_path / "x.nii", what="pose")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match="nibabel"):
        cp.to_nifti(p, tmp_path / "y.nii")


def test_other_shapes_and_bad_arguments():
    p = cp.generate_patient(0, seed=2, shape=(32, 48, 40), config=cp.PhantomConfig(spacing=(2.0, 1.0, 1.0)))
    assert p.volume.shape == p.labels.shape == p.lung_mask.shape == (32, 48, 40)
    assert p.spacing == (2.0, 1.0, 1.0) and ndimage.label(p.lung_mask)[1] == 2
    with pytest.raises(cp.PhantomError):
        cp.generate_patient(0, shape=(8, 64, 64))
    with pytest.raises(cp.PhantomError):
        cp.generate_patient(-1)
    for bad in ({"scale_jitter": 0.7}, {"nodule_radius": (5.0, 2.0)}, {"spacing": (1.0, 1.0)}, {"noise_hu": -1}):
        with pytest.raises(cp.PhantomError):
            cp.PhantomConfig(**bad)
    assert cp.PhantomConfig.from_dict(cp.PhantomConfig().to_dict()) == cp.PhantomConfig()
    with pytest.raises(cp.PhantomError, match="unknown"):
        cp.PhantomConfig.from_dict({"colour": 1})


# --- hard candidates (issue 17): nodule types and attachments, vessel blobs ---------------------------------------


@pytest.fixture(scope="module")
def many() -> list[cp.Patient]:
    return cp.generate_cohort(30, seed=5)


def test_every_nodule_type_and_attachment_occurs_with_its_intensity_and_contact(many):
    nodules = [(p, n) for p in many for n in p.nodules]
    assert {n.type for _, n in nodules} == set(cp.NODULE_TYPES)
    assert {n.attachment for _, n in nodules} == set(cp.ATTACHMENTS)
    assert any(n.radius <= 2.5 for _, n in nodules)  # small nodules, barely thicker than the largest vessels
    for p, n in nodules:
        shell = ndimage.binary_dilation(p.labels == cp.NODULE, iterations=2) & (p.labels != cp.NODULE)
        blob = ndimage.label(p.nodule_mask)[0]
        own = ndimage.binary_dilation(blob == blob[n.center], iterations=2) & shell
        if n.attachment == "vascular":
            assert np.any(p.labels[own] == cp.VESSEL), "a juxta-vascular nodule touches a vessel"
        if n.attachment == "pleural":
            assert np.any(~p.lung_mask[own]), "a juxta-pleural nodule touches the lung's edge"
        if n.type == "ground_glass":
            assert -700 <= n.hu <= -300 and n.core_radius == 0
        if n.type == "part_solid":
            assert 0.3 * n.radius - 1e-3 <= n.core_radius <= 0.6 * n.radius + 1e-3 and 0 <= n.core_hu <= 100


def test_blobs_are_thick_vessel_false_positives(many):
    blobs = [(p, c) for p in many for c in p.candidates if c.kind == "blob"]
    assert len(blobs) >= len(many)
    for p, c in blobs:
        assert c.label == 0 and p.labels[c.center] == cp.VESSEL
        # at least radius 2 around the centre is vessel: a 3x3x3 core of vessel voxels (before blur and noise)
        box = tuple(slice(v - 1, v + 2) for v in c.center)
        core = p.labels[box]
        parenchyma = np.isin(core, (cp.LUNG, cp.VESSEL))  # airways, walls and the lung's edge may cut a blob
        assert (core[parenchyma] == cp.VESSEL).mean() >= 0.9


def test_new_fields_round_trip_and_bad_values_are_refused(many, tmp_path):
    p = next(q for q in many if any(n.type == "part_solid" for n in q.nodules))
    path = cp.write_cohort(tmp_path, [p])[0]
    assert cp.read_patient(path).nodules == p.nodules
    with pytest.raises(cp.PhantomError, match="ground_glass_hu"):
        cp.PhantomConfig(ground_glass_hu=(-300.0, 100.0))
    with pytest.raises(cp.PhantomError, match="juxta"):
        cp.PhantomConfig(juxta_vascular_fraction=0.7, juxta_pleural_fraction=0.5)
    with pytest.raises(cp.PhantomError, match="blob"):
        cp.PhantomConfig(blob_radius=(0.5, 2.0))
