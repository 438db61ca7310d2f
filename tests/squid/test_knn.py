"""PatchCore-like kNN baseline: coreset covers every cluster, bank images score zero, novel images score high,
chunked scoring equals one-shot scoring."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.squid.knn import PatchKNN, PositionKNN, greedy_coreset, locally_aware


def test_greedy_coreset_picks_one_point_per_separated_cluster():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    pts = torch.cat([c + torch.randn(50, 2) for c in centres])
    idx = greedy_coreset(pts, 3, seed=1)
    clusters = {int(i) // 50 for i in idx}
    assert clusters == {0, 1, 2}
    assert len(greedy_coreset(pts, 500)) == 150  # asking for more than there is keeps everything


def test_bank_images_score_zero_and_novel_images_score_higher():
    torch.manual_seed(0)
    normal = [torch.rand(6, 4, 8, 8)]
    knn = PatchKNN.fit(normal, coreset_fraction=1.0)
    assert torch.allclose(knn.score(normal), torch.zeros(6), atol=1e-3)
    novel = [normal[0][:2] + 3.0]
    assert (knn.score(novel) > 1.0).all()
    assert torch.allclose(knn.score(normal, chunk=1), knn.score(normal, chunk=64))


def test_locally_aware_features_are_resized_and_pooled():
    a, b = torch.ones(2, 3, 8, 8), torch.zeros(2, 5, 4, 4)
    f = locally_aware([a, b])
    assert f.shape == (2, 64, 8)
    assert torch.allclose(f[0, 27, :3], torch.ones(3))  # interior location: 3x3 average of ones


def test_position_aware_knn_sees_a_swap_that_the_pooled_bank_misses():
    """Bank images hold feature A in their top half and B in the bottom half. An image with the halves swapped
    has only features (and 3x3 neighbourhoods) that the pooled PatchCore bank holds somewhere, so it scores at
    the noise level; the position-aware bank compares each location with its own bank and flags it."""
    torch.manual_seed(0)
    a, b = torch.tensor([5.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 5.0, 0.0, 0.0])
    layout = torch.cat([a.view(4, 1, 1).expand(4, 3, 6), b.view(4, 1, 1).expand(4, 3, 6)], dim=1)  # (4, 6, 6)
    maps = [layout + 0.05 * torch.randn(8, 4, 6, 6)]
    pooled = PatchKNN.fit(maps, coreset_fraction=1.0)
    positional = PositionKNN.fit(maps)
    assert positional.bank.shape == (36, 8, 4)
    assert torch.allclose(positional.score(maps), torch.zeros(8), atol=1e-3)
    swapped = torch.cat([layout[:, 3:], layout[:, :3]], dim=1).unsqueeze(0) + 0.05 * torch.randn(1, 4, 6, 6)
    assert pooled.score([swapped]) < 0.2
    assert positional.score([swapped]) > 2.0
    assert torch.allclose(positional.score(maps, chunk=3), positional.score(maps, chunk=64))
    with pytest.raises(ValueError, match="locations"):
        positional.score([torch.rand(1, 4, 5, 5)])
