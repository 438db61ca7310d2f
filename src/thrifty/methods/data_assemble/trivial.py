"""The training-free baseline of the "Data, assemble" recipe (the claim protocol's trivial baseline).

Nearest neighbours in pixel space: an image's target score is the distance-weighted vote of its ``k`` nearest
target-source images (source A, the only images with the target label; Euclidean distance on raw pixels,
weights 1/distance). Nothing is learnt, and it sees exactly the labels the target-only arm sees. Any learnt arm
must beat it clearly; if it nearly solved the task, the miniature would be too easy.

Calibration note (validation, see the recipe README): hand-made intensity rules (the mean of the peripheral
lung ring, ring minus core, the global mean) score the synthetic target at chance (AUC 0.41–0.54), as the
generator intends, so the pixel-space neighbour vote is the stronger of the training-free baselines.
"""

from __future__ import annotations

import torch


def pixel_knn_scores(
    train_images: torch.Tensor, train_labels: torch.Tensor, images: torch.Tensor, *, k: int = 5,
    batch_size: int = 256,
) -> torch.Tensor:  # fmt: skip
    """Scores (N,) for ``images`` (N, C, H, W): the 1/distance-weighted mean of ``train_labels`` (M,) in {0, 1}
    over the ``k`` nearest ``train_images`` (M, C, H, W) in Euclidean pixel distance."""
    if train_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"train images {tuple(train_images.shape)} and images {tuple(images.shape)} differ in shape")
    if len(train_images) != len(train_labels) or len(train_images) == 0:
        raise ValueError("pixel_knn_scores needs one label per training image and at least one image")
    bank = train_images.flatten(1).double()
    y = train_labels.double()
    k = min(k, len(bank))
    out = []
    for i in range(0, len(images), batch_size):
        d = torch.cdist(images[i : i + batch_size].flatten(1).double(), bank)  # (b, M)
        dist, idx = d.topk(k, dim=1, largest=False)
        w = 1.0 / (dist + 1e-6)
        out.append((w * y[idx]).sum(1) / w.sum(1))
    return torch.cat(out).float()
