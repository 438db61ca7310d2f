"""Training-free baselines: known values of the mean-image distance, and the per-cell nearest neighbour flags one
odd cell that the whole-image distance dilutes."""

from __future__ import annotations

import torch

from thrifty.methods.squid.trivial import CellNN, cell_vectors, mean_image_scores


def test_mean_image_score_known_values():
    bank = torch.stack([torch.zeros(1, 6, 6), torch.ones(1, 6, 6)])  # mean image = 0.5 everywhere
    images = torch.stack([torch.full((1, 6, 6), 0.5), torch.ones(1, 6, 6)])
    torch.testing.assert_close(mean_image_scores(bank, images), torch.tensor([0.0, 0.25]))


def test_cell_vectors_are_each_positions_cells():
    x = torch.arange(2 * 36, dtype=torch.float32).view(2, 1, 6, 6)
    v = cell_vectors(x, 3)
    assert v.shape == (9, 2, 4)
    torch.testing.assert_close(v[1, 0], x[0, 0, 0:2, 2:4].reshape(-1))  # position 1 = top row, middle column
    torch.testing.assert_close(v[8, 1], x[1, 0, 4:6, 4:6].reshape(-1))


def _layouts(n: int, seed: int) -> torch.Tensor:
    """Images of 3x3 cells, each position with its own pattern (a 'digit') plus small noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(9, 4, 4, generator=torch.Generator().manual_seed(123))
    cells = base.unsqueeze(0) + 0.05 * torch.randn(n, 9, 4, 4, generator=g)
    return cells.view(n, 3, 3, 4, 4).permute(0, 1, 3, 2, 4).reshape(n, 1, 12, 12)


def test_cell_nn_flags_a_swapped_cell_and_bank_images_score_lowest():
    bank, stats, normal = _layouts(64, 0), _layouts(32, 1), _layouts(16, 2)
    nn = CellNN(bank, 3, stats)
    assert nn.mu.shape == (9,) and (nn.sigma > 0).all()
    assert nn.distances(bank[:4]).abs().max() < 1e-6  # a bank image is its own nearest neighbour
    swapped = normal.clone()
    swapped[:, :, 0:4, 0:4], swapped[:, :, 0:4, 4:8] = normal[:, :, 0:4, 4:8], normal[:, :, 0:4, 0:4]
    s_normal, s_swapped = nn.score(normal), nn.score(swapped)
    assert s_swapped.min() > s_normal.max()  # every swap is separated
    # the per-cell z-max separates them far more than the whole-image distance to the mean does
    m_normal, m_swapped = mean_image_scores(bank, normal), mean_image_scores(bank, swapped)
    assert (s_swapped.mean() - s_normal.mean()) / s_normal.std() > (m_swapped.mean() - m_normal.mean()) / m_normal.std()
