"""Losses and anomaly scores of SQUID (Xiang et al., CVPR 2023, arXiv 2111.13495), as pure functions.

Generator: ``recon_w·MSE(x̂_s, x) + t_w·MSE(x̂_t, x) + dist_w·dist + g_w·BCE(D(x̂_s), 1)``.
Discriminator: ``d_w·[BCE(D(x), 1) + BCE(D(x̂_s), 0)]``.
Score: ``1 − σ((D(x̂_s) − μ)/σ)`` — higher is more anomalous; μ, σ are statistics of D on held-out normal
images (the release takes them from training images, which the discriminator has seen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from thrifty.methods.squid.config import LossConfig


def generator_loss(
    out: dict[str, torch.Tensor | None],
    x: torch.Tensor,
    fake_logits: torch.Tensor | None,
    w: LossConfig,
) -> dict[str, torch.Tensor]:
    """Weighted generator terms and their sum under ``"loss"``; absent terms (no teacher, no GAN) are skipped.

    Args:
        out: the generator's output dict (``recon`` (B,1,H,W), optional ``teacher_recon``, ``dist_loss``,
            ``mem_entropy``).
        x: (B, 1, H, W) input images.
        fake_logits: (B,) discriminator logits on ``out["recon"]`` (with gradient to the generator), or None.
    """
    terms = {"recon": w.recon_w * F.mse_loss(out["recon"], x)}
    if out.get("teacher_recon") is not None:
        terms["teacher"] = w.t_w * F.mse_loss(out["teacher_recon"], x)
    if out.get("dist_loss") is not None:
        terms["dist"] = w.dist_w * out["dist_loss"]
    if out.get("mem_entropy") is not None:
        terms["entropy"] = w.memae_entropy_w * out["mem_entropy"]
    if fake_logits is not None:
        terms["gan"] = w.g_w * F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    terms["loss"] = sum(terms.values())
    return terms


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, w: LossConfig) -> torch.Tensor:
    """``d_w·[BCE(D(x), 1) + BCE(D(x̂), 0)]``; pass ``fake_logits`` computed on a detached reconstruction."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return w.d_w * (real + fake)


def standardised_score(logits: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """``1 − σ((d − μ)/σ)`` = σ(−(d − μ)/σ), computed in float64 so it does not round to 1 for very fake-looking
    reconstructions: in (0, 1), higher = less real-looking = more anomalous."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    return torch.sigmoid(-(logits.double() - mu) / sigma)


def reconstruction_error(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error (B,): the AE / MemAE anomaly score."""
    return (recon - x).pow(2).flatten(1).mean(1)
