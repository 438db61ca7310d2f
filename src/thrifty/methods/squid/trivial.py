"""Training-free anomaly baselines for the SQUID recipe (the claim protocol's trivial baselines).

Neither learns anything; both only look at normal training images, so a learned detector that cannot beat them
has not learned the anatomy (SQUID, Xiang et al., CVPR 2023, arXiv 2111.13495, reports neither).

- :func:`mean_image_scores`: the squared distance to the mean normal image (per-pixel MSE).
- :class:`CellNN`: per cell of a ``grid``×``grid`` layout, the distance to the nearest bank cell *at the same
  position* (per-pixel MSE), standardised per position with statistics of held-out normal images (the recipe
  uses the validation normals, as for SQUID's per-cell score; images that share digit instances with the bank
  would sit closer to it than new images do); the image score is the largest standardised distance, so one odd
  cell is not diluted by eight normal ones.

Shapes: images (N, 1, H, W) float in [0, 1] with H = W divisible by ``grid``.
"""

from __future__ import annotations

import torch

from thrifty.methods.squid.model import patchify


def mean_image_scores(bank: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(N,) per-pixel MSE of ``images`` to the mean of the normal ``bank`` images."""
    mean = bank.mean(0, keepdim=True)
    return (images - mean).pow(2).flatten(1).mean(1)


def cell_vectors(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, 1, H, W) → (grid², N, cell²): each position's cells as pixel vectors."""
    n = images.shape[0]
    return patchify(images, grid).reshape(n, grid * grid, -1).transpose(0, 1).contiguous()


class CellNN:
    """Nearest normal cell at the same position; ``score(images)`` → (N,) largest per-cell z-score."""

    def __init__(self, bank: torch.Tensor, grid: int, stats_images: torch.Tensor) -> None:
        """``bank`` and ``stats_images`` are normal images (held out from each other): the bank is searched, the
        others give each position's mean and standard deviation of the nearest-cell distance (σ floored at 1% of
        the mean)."""
        self.grid = grid
        self.bank = cell_vectors(bank, grid)  # (P, N, D)
        d = self.distances(stats_images)
        self.mu = d.mean(0)
        self.sigma = torch.maximum(d.std(0), 0.01 * self.mu + 1e-12)

    def distances(self, images: torch.Tensor, *, chunk: int = 64) -> torch.Tensor:
        """(N, grid²) per-pixel MSE to the nearest bank cell at the same position."""
        out = []
        dim = self.bank.shape[-1]
        for i in range(0, images.shape[0], chunk):
            cells = cell_vectors(images[i : i + chunk], self.grid)  # (P, b, D)
            out.append(torch.cdist(cells, self.bank).min(dim=2).values.pow(2).T / dim)
        return torch.cat(out)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return ((self.distances(images) - self.mu) / self.sigma).max(1).values
