"""Feature-kNN anomaly detectors, the SQUID recipe's third baseline: PatchCore-like (Roth et al., CVPR 2022) or
position-aware.

Features: mid-level maps of a trained encoder (here the skip-free AE's, on the whole image), resized to the first
level's resolution, concatenated and averaged over each 3×3 neighbourhood (PatchCore's locally aware patch
features). The memory bank holds the feature vectors of normal training images, reduced by greedy k-center
coreset selection. An image's score is the largest, over its locations, of the distance to the nearest bank
vector. That pooled bank has no notion of *where* a feature belongs, so it cannot see swapped digits; the
position-aware variant (:class:`PositionKNN`, the default on DigitAnatomy, whose anomalies are about position)
keeps one bank per location and compares a location only with the bank's features at that same location.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def greedy_coreset(features: torch.Tensor, size: int, *, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Indices of ``size`` rows of ``features`` (N, C) chosen by greedy k-center on a random projection."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    x = features
    if features.shape[1] > proj_dim:
        x = features @ (torch.randn(features.shape[1], proj_dim, generator=g) / proj_dim**0.5)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    dist = torch.cdist(x, x[chosen[-1]].unsqueeze(0)).squeeze(1)
    for _ in range(size - 1):
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(x, x[nxt].unsqueeze(0)).squeeze(1))
    return torch.tensor(chosen)


def locally_aware(maps: list[torch.Tensor]) -> torch.Tensor:
    """Maps (B, C_i, h_i, w_i) → (B, h·w, ΣC_i) at the first map's resolution, 3×3-averaged."""
    size = maps[0].shape[-2:]
    feats = [
        F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else m for m in maps
    ]
    f = F.avg_pool2d(torch.cat(feats, dim=1), 3, stride=1, padding=1)
    return f.flatten(2).transpose(1, 2)


class PatchKNN:
    """Memory bank of locally aware features; ``score(maps)`` → (B,) max nearest-neighbour distance."""

    def __init__(self, bank: torch.Tensor) -> None:
        self.bank = bank

    @classmethod
    def fit(cls, maps: list[torch.Tensor], *, coreset_fraction: float, seed: int = 0) -> PatchKNN:
        feats = locally_aware(maps).reshape(-1, sum(m.shape[1] for m in maps))
        keep = greedy_coreset(feats, max(1, round(coreset_fraction * feats.shape[0])), seed=seed)
        return cls(feats[keep])

    def score(self, maps: list[torch.Tensor], *, chunk: int = 16) -> torch.Tensor:
        """(B,) scores; images are scored ``chunk`` at a time so the distance matrix stays small."""
        out = []
        for i in range(0, maps[0].shape[0], chunk):
            feats = locally_aware([m[i : i + chunk] for m in maps])  # (b, L, C)
            b, n, c = feats.shape
            nearest = torch.cdist(feats.reshape(-1, c), self.bank).min(dim=1).values.view(b, n)
            out.append(nearest.max(dim=1).values)
        return torch.cat(out)


class PositionKNN:
    """One bank per location: ``bank`` (L, N, C) holds the locally aware features of N normal images at each of
    L locations; ``score(maps)`` → (B,) the largest, over locations, of the distance to the nearest bank feature
    *at the same location*."""

    def __init__(self, bank: torch.Tensor) -> None:
        self.bank = bank

    @classmethod
    def fit(cls, maps: list[torch.Tensor]) -> PositionKNN:
        return cls(locally_aware(maps).transpose(0, 1).contiguous())  # (L, N, C)

    def score(self, maps: list[torch.Tensor], *, chunk: int = 16) -> torch.Tensor:
        """(B,) scores, ``chunk`` images at a time."""
        out = []
        for i in range(0, maps[0].shape[0], chunk):
            feats = locally_aware([m[i : i + chunk] for m in maps]).transpose(0, 1)  # (L, b, C)
            if feats.shape[0] != self.bank.shape[0]:
                raise ValueError(f"images give {feats.shape[0]} locations, the bank has {self.bank.shape[0]}")
            nearest = torch.cdist(feats, self.bank).min(dim=2).values  # (L, b)
            out.append(nearest.max(dim=0).values)
        return torch.cat(out)
