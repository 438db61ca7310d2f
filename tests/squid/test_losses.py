"""SQUID losses and score: known values, orientation, weights, absent terms."""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.methods.squid.config import LossConfig
from thrifty.methods.squid.losses import (
    discriminator_loss,
    generator_loss,
    reconstruction_error,
    standardised_score,
)


def test_standardised_score_orientation_and_calibration():
    logits = torch.tensor([-3.0, 0.0, 1.0, 2.0, 50.0, -50.0])
    s = standardised_score(logits, mu=1.0, sigma=2.0)
    assert s[2] == pytest.approx(0.5)  # at the normal mean: 0.5
    # more real-looking reconstruction (higher D logit) => less anomalous
    assert torch.all(torch.diff(s[:5]) < 0)
    assert s.min() > 0 and s.max() < 1  # float64: no rounding to exactly 0 or 1
    assert s[5] > s[0]
    with pytest.raises(ValueError, match="sigma"):
        standardised_score(logits, mu=0.0, sigma=0.0)


def test_discriminator_loss_known_value():
    w = LossConfig(d_w=0.005)
    zeros = torch.zeros(4)
    assert discriminator_loss(zeros, zeros, w).item() == pytest.approx(0.005 * 2 * math.log(2))
    good = discriminator_loss(torch.full((4,), 20.0), torch.full((4,), -20.0), w)
    assert good.item() < 1e-8


def test_generator_loss_weights_and_absent_terms():
    x = torch.zeros(2, 1, 4, 4)
    out = {"recon": torch.full_like(x, 0.5), "teacher_recon": torch.full_like(x, 1.0), "dist_loss": torch.tensor(3.0)}
    w = LossConfig(recon_w=1.0, t_w=0.01, dist_w=0.001, g_w=0.005)
    terms = generator_loss(out, x, torch.zeros(2), w)
    assert terms["recon"].item() == pytest.approx(0.25)
    assert terms["teacher"].item() == pytest.approx(0.01)
    assert terms["dist"].item() == pytest.approx(0.003)
    assert terms["gan"].item() == pytest.approx(0.005 * math.log(2))
    assert terms["loss"].item() == pytest.approx(0.25 + 0.01 + 0.003 + 0.005 * math.log(2))
    plain = generator_loss({"recon": out["recon"]}, x, None, w)
    assert set(plain) == {"recon", "loss"}


def test_reconstruction_error_per_image():
    x = torch.zeros(3, 1, 2, 2)
    r = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.5)])
    assert reconstruction_error(r, x).tolist() == pytest.approx([0.0, 1.0, 0.25])
