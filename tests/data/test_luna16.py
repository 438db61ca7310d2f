"""LUNA16 reader: a LUNA16-layout folder written from phantoms (MetaImage scans, annotations.csv, candidates.csv)
is read back into the recipe's frame with its nodules, candidates and lungs where the phantom put them, bad layouts
are clear errors, and the Genesis recipe runs end to end on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.data.ct_phantom import Patient, generate_cohort
from thrifty.data.luna16 import Luna16Error, cached_scans, lung_mask_from_hu

ORIGIN_XYZ = (-160.0, -140.0, -320.0)


def write_scan(folder: Path, uid: str, p: Patient) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dz, dy, dx = p.spacing
    d, h, w = p.shape
    (folder / f"{uid}.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\n"
        f"Offset = {ORIGIN_XYZ[0]} {ORIGIN_XYZ[1]} {ORIGIN_XYZ[2]}\n"
        f"ElementSpacing = {dx} {dy} {dz}\nDimSize = {w} {h} {d}\nElementType = MET_SHORT\n"
        f"ElementDataFile = {uid}.raw\n"
    )
    np.round(p.volume).astype("<i2").tofile(folder / f"{uid}.raw")


def world(p: Patient, zyx) -> tuple[float, float, float]:
    """(x, y, z) mm of a voxel (z, y, x)."""
    z, y, x = (o + c * s for o, c, s in zip(ORIGIN_XYZ[::-1], zyx, p.spacing))
    return x, y, z


def write_luna16(root: Path, subsets: dict[int, int], *, seed: int = 3) -> dict[str, Patient]:
    """``subsets[k]`` phantom patients in ``root/subset<k>``; returns uid → patient."""
    patients = generate_cohort(sum(subsets.values()), seed=seed)
    by_uid, ann, cand, i = (
        {},
        ["seriesuid,coordX,coordY,coordZ,diameter_mm"],
        ["seriesuid,coordX,coordY,coordZ,class"],
        0,
    )
    for k, n in subsets.items():
        for p in patients[i : i + n]:
            uid = f"1.3.6.1.4.1.14519.5.2.1.{k}.{p.index:04d}"
            write_scan(root / f"subset{k}", uid, p)
            by_uid[uid] = p
            for nod in p.nodules:
                ann.append(
                    f"{uid},{','.join(f'{v:.3f}' for v in world(p, nod.center))},{2 * nod.radius * p.spacing[2]:.3f}"
                )
            for c in p.candidates:
                cand.append(f"{uid},{','.join(f'{v:.3f}' for v in world(p, c.center))},{c.label}")
        i += n
    (root / "annotations.csv").write_text("\n".join(ann) + "\n")
    (root / "candidates.csv").write_text("\n".join(cand) + "\n")
    return by_uid


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> tuple[Path, dict[str, Patient]]:
    root = tmp_path_factory.mktemp("luna16")
    return root, write_luna16(root, {0: 3, 1: 3, 2: 2, 3: 2})


def test_scans_come_back_in_the_frame_with_their_labels(luna, tmp_path) -> None:
    root, truth = luna
    scans = cached_scans(root, tmp_path, subsets=[0, 1], shape=(48, 64, 64))
    assert len(scans) == 6 and [s.subset for s in scans] == [0, 0, 0, 1, 1, 1]
    for s in scans:
        p = truth[s.uid]
        assert np.allclose(s.volume, np.round(p.volume), atol=1e-3)  # same frame as the file: no resampling
        assert [n.center for n in s.nodules] == [n.center for n in p.nodules]
        centers, labels = s.candidate_arrays()
        pc, pl = p.candidate_arrays()
        assert np.array_equal(centers, pc) and np.array_equal(labels, pl)
        inter = (s.nodule_mask & p.nodule_mask).sum()
        # annotated spheres cover the phantom's nodules: one diameter in mm over anisotropic voxels (2.5 mm in z,
        # 1.5 in-plane) gives an ellipsoid 0.6 as deep as the phantom's isotropic nodule, and spikes reach beyond it
        assert inter / p.nodule_mask.sum() > 0.4
        dice = 2 * (s.lung_mask & p.lung_mask).sum() / (s.lung_mask.sum() + p.lung_mask.sum())
        assert dice > 0.8  # the HU heuristic finds the phantom's lungs
    again = cached_scans(root, tmp_path, subsets=[0, 1], shape=(48, 64, 64))  # from the cache
    assert all(np.array_equal(a.volume, b.volume) for a, b in zip(scans, again))


def test_a_smaller_frame_keeps_nodules_at_their_place(luna, tmp_path) -> None:
    root, truth = luna
    (s,) = cached_scans(root, tmp_path, subsets=[2], shape=(24, 32, 32), max_scans=1)
    p = truth[s.uid]
    assert s.volume.shape == (24, 32, 32)
    for a, b in zip(s.nodules, p.nodules):
        assert np.abs(np.array(a.center) - (np.array(b.center) + 0.5) / 2 + 0.5).max() <= 1


def test_lung_mask_excludes_air_outside_the_body() -> None:
    hu = np.full((10, 20, 20), -1000.0, dtype=np.float32)
    hu[:, 3:-3, 3:-3] = 40.0  # body, cut by the first and last slice like a real scan
    hu[3:-3, 6:-6, 6:-6] = -850.0  # lung inside
    hu[:, 9:11, 9:11] = -1000.0  # a trachea-like tube through every slice, the first and last included
    mask = lung_mask_from_hu(hu)
    assert mask[5, 10, 10] and mask[0, 10, 10] and not mask[0, 0, 0]
    assert mask.sum() == 4 * 8 * 8 + 6 * 2 * 2  # lung plus the tube in the slices where it leaves the lung


def test_bad_layouts_are_clear_errors(tmp_path, luna) -> None:
    with pytest.raises(Luna16Error, match="does not exist"):
        cached_scans(tmp_path / "nope", tmp_path, subsets=[0], shape=(8, 8, 8))
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX\n")
    with pytest.raises(Luna16Error, match="needs columns"):
        cached_scans(tmp_path, tmp_path, subsets=[0], shape=(8, 8, 8))
    root, _ = luna
    with pytest.raises(Luna16Error, match="subset7"):
        cached_scans(root, tmp_path, subsets=[7], shape=(8, 8, 8))


def test_config_refuses_pretraining_on_target_test_subsets() -> None:
    with pytest.raises(ConfigError, match="may not be pre-trained on"):
        load_config("genesis", "smoke", ["data.source=luna16", "data.root=/x", "data.pretrain_subsets=[0,9]"])
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config("genesis", "smoke", ["data.source=luna16"])


def test_genesis_runs_on_a_luna16_folder(luna, tmp_path, data_dir) -> None:
    root, _ = luna
    module, cfg = load_config(
        "genesis",
        "smoke",
        [
            f"out_dir={tmp_path}",
            f"data_dir={data_dir}",
            "progress=false",
            "data.source=luna16",
            f"data.root={root}",
            "data.pretrain_subsets=[0,1]",
            "data.target_subsets=[[0,1],[2],[3]]",
            "data.pretrain_val_fraction=0.34",
            "discovery.top_k_val=1",
        ],
    )
    res = module.train(cfg)
    run_dir = Path(res["run_dir"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["unlabelled_cohort"]["luna16_subsets"] == [0, 1]
    assert len(manifest["pretrain_train"]) == 4 and len(manifest["pretrain_val"]) == 2
    assert all(".2." in uid for uid in manifest["target_val"]) and all(".3." in uid for uid in manifest["target_test"])
    assert not set(manifest["target_test"]) & set(manifest["pretrain_train"] + manifest["pretrain_val"])
    assert {c["id"] for c in res["claims"]} >= {"genesis_off_beats_scratch_ncc", "genesis_on_beats_scratch_ncs"}
