"""The best constant predictor's pretext loss (issue 17: a pretext has trained only when its held-out loss is clearly
below it), checked against closed forms computed independently of the loss code."""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.methods.genesis.config import GenesisConfig
from thrifty.methods.genesis.pretrain import pretext_constant_loss


def _cubes(n: int = 40) -> torch.Tensor:
    return torch.rand(n, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))


def test_restoration_constant_is_the_variance_of_the_targets():
    cubes = _cubes()
    # in-painting restores the cube itself: the best constant is its mean, its MSE the population variance
    expected = float(cubes.double().var(unbiased=False))
    assert pretext_constant_loss("inpaint", cubes, None, GenesisConfig(), visual_words=False) == pytest.approx(
        expected, rel=1e-5
    )


def test_rotation_constant_is_the_entropy_of_the_drawn_rotations():
    cubes = _cubes(64)
    loss = pretext_constant_loss("rotation", cubes, None, GenesisConfig(), visual_words=False)
    assert 0 < loss <= math.log(4) + 1e-6  # at most the uniform guess's cross-entropy


def test_visual_words_add_lambda_cls_times_the_word_entropy():
    cubes = _cubes(40)
    words = torch.tensor([0] * 30 + [1] * 10)
    cfg = GenesisConfig()
    base = pretext_constant_loss("inpaint", cubes, None, cfg, visual_words=False)
    with_words = pretext_constant_loss("inpaint", cubes, words, cfg, visual_words=True, num_words=2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert with_words == pytest.approx(cfg.pretrain.lambda_rec * base + cfg.pretrain.lambda_cls * entropy, rel=1e-5)
