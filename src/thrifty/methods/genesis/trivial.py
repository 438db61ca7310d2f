"""The training-free baseline of the Genesis recipe's NCC task (the claim protocol's trivial baseline).

Models Genesis / Semantic Genesis / TransVW (arXiv 2004.07882, 2007.06959, 2102.10680) report nodule
false-positive reduction (NCC) AUC for learned models only. A miniature earns that comparison only if no
training-free rule solves it: on the first phantom the mean intensity of the candidate's central 3×3×3 voxels gave
99.9 test AUC, because every false positive was a thin vessel or air. :func:`centre_intensity` is that rule; the
phantom's hard candidates (ground-glass and part-solid, small, juxta-vascular and juxta-pleural nodules; blob-like
vessel segments) are accepted only while it stays at or below 80 AUC on validation (a test checks it).
"""

from __future__ import annotations

import numpy as np
import torch

from thrifty.core.metrics import roc_auc

CENTRE = 3  # side of the central cube whose mean is the score


def centre_intensity(cubes: torch.Tensor | np.ndarray, *, side: int = CENTRE) -> np.ndarray:
    """Mean intensity of the central ``side``³ voxels of each cube: (N, 1, d, h, w) or (N, d, h, w) → (N,).

    The centre is at index ``(d//2, h//2, w//2)``, where :func:`~thrifty.data.ct_phantom.crop_cube` puts the
    candidate; higher = more nodule-like (solid tissue against air or parenchyma).
    """
    x = cubes.detach().cpu().numpy() if isinstance(cubes, torch.Tensor) else np.asarray(cubes)
    if x.ndim == 5:
        x = x[:, 0]
    if x.ndim != 4 or min(x.shape[1:]) < side:
        raise ValueError(f"cubes must be (N, [1,] d, h, w) with every side >= {side}, got {tuple(x.shape)}")
    lo = [s // 2 - side // 2 for s in x.shape[1:]]
    centre = x[:, lo[0] : lo[0] + side, lo[1] : lo[1] + side, lo[2] : lo[2] + side]
    return centre.reshape(len(x), -1).mean(axis=1)


def centre_intensity_auc(cubes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """NCC AUC (%) of :func:`centre_intensity` as the score (1 = nodule)."""
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return 100.0 * roc_auc(centre_intensity(cubes).tolist(), y.astype(int).tolist())
