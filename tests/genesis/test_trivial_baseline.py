"""The NCC task's trivial baseline (claim protocol): the central 3×3×3 mean intensity, and the phantom's hard
candidates keeping it at or below 80 AUC on validation (issue 17: it was 99.9 on the first phantom)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thrifty.methods.genesis.config import GenesisConfig
from thrifty.methods.genesis.data import load_cohorts, task_set
from thrifty.methods.genesis.trivial import centre_intensity, centre_intensity_auc


def test_centre_intensity_is_the_mean_of_the_central_voxels():
    cubes = np.zeros((2, 1, 5, 7, 7), dtype=np.float32)
    cubes[0, 0, 1:4, 2:5, 2:5] = 1.0  # exactly the central 3x3x3 block (centre index (2, 3, 3))
    cubes[1, 0, 2, 3, 3] = 27.0  # one voxel of 27: the same mean
    cubes[1, 0, 0, 0, 0] = 1000.0  # outside the centre: ignored
    np.testing.assert_allclose(centre_intensity(torch.from_numpy(cubes)), [1.0, 1.0])
    assert centre_intensity_auc(cubes[:, 0] * np.array([1, 0])[:, None, None, None], [1, 0]) == 100.0
    with pytest.raises(ValueError, match="cubes must be"):
        centre_intensity(np.zeros((2, 2, 2)))


def test_the_phantom_candidates_defeat_the_centre_intensity_baseline_on_validation(tmp_path):
    """The default data of the recipe (the target cohort's validation patients, as the recipe cuts them)."""
    cfg = GenesisConfig()
    d = cfg.data
    _, _, _, val, _ = load_cohorts(cfg, tmp_path)
    ts = task_set(
        val,
        cube=d.cube,
        negatives_per_positive=d.ncc_eval_negatives_per_positive,
        jitter=d.ncs_jitter,
        seed=d.seed * 1000 + 1,
    )
    labels = ts.ncc_labels.numpy()
    assert labels.sum() >= 20 and (labels == 0).sum() >= 60
    auc = centre_intensity_auc(ts.ncc_cubes, ts.ncc_labels)
    assert 50.0 < auc <= 80.0, f"centre-intensity AUC on validation is {auc:.1f}"
