"""GLaM losses as pure functions (arXiv 2112.06905; GShard arXiv 2006.16668).

* :func:`load_balancing_loss` — GShard's auxiliary loss ``E² · mean_e(f_e · P_e)`` per group, where
  ``f_e`` is the fraction of tokens whose *top-1* choice is expert ``e`` (before the capacity cut) and
  ``P_e`` the mean router probability of ``e``. It is 1 at uniform routing and ``E`` at collapse.
  Padding is excluded from both terms; ``norm="nonpad"`` divides by the number of real tokens,
  ``norm="legacy"`` by the full group size (Mesh-TensorFlow's behaviour).
* :func:`z_loss` — ``mean(logsumexp(logits)²)`` over real tokens; GLaM/Praxis apply it (weight 1e-4)
  to the LM output softmax. The same function serves the optional router z-loss.
* :func:`lm_loss` — token-level cross-entropy ignoring padding (label ``-100``).
* :func:`lm_and_z_loss` — both of the above from one ``logsumexp`` pass, with a hand-written backward
  (one softmax pass instead of autograd's three passes over the ``[N, V]`` logits); tested against the
  two separate functions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def load_balancing_loss(
    raw_gates: torch.Tensor,
    top1_mask: torch.Tensor,
    nonpad: torch.Tensor,
    *,
    norm: Literal["nonpad", "legacy"] = "nonpad",
) -> torch.Tensor:
    """GShard load-balancing loss, averaged over groups.

    Args:
        raw_gates: ``[G, S, E]`` router softmax (fp32).
        top1_mask: ``[G, S, E]`` one-hot of each token's top-1 expert, before the capacity cut.
        nonpad: ``[G, S]`` bool, True for real tokens.
        norm: ``nonpad`` (mean over real tokens) or ``legacy`` (mean over all S positions).

    Returns:
        Scalar tensor; differentiable with respect to ``raw_gates`` (``f_e`` is a constant).
    """
    num_experts = raw_gates.shape[-1]
    w = nonpad.to(raw_gates.dtype).unsqueeze(-1)  # [G, S, 1]
    if norm == "nonpad":
        denom = w.sum(dim=1).clamp_min(1.0)  # [G, 1]; an all-padding group contributes 0
    elif norm == "legacy":
        denom = torch.full_like(w.sum(dim=1), float(raw_gates.shape[1]))
    else:
        raise ValueError(f"aux_norm must be 'nonpad' or 'legacy', not {norm!r}")
    density = (top1_mask.to(raw_gates.dtype) * w).sum(dim=1) / denom  # [G, E]
    proxy = (raw_gates * w).sum(dim=1) / denom  # [G, E]
    return (density * proxy).mean() * num_experts * num_experts


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(logsumexp(logits, -1)²)`` over positions where ``mask`` is True (all if None)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    sq = lse.square()
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; ``labels`` already shifted, ``-100`` ignored.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


class _LMAndZLoss(torch.autograd.Function):
    """Cross-entropy and z-loss sharing ``lse = logsumexp(logits)``; the backward recomputes softmax once."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):  # type: ignore[override]
        valid = labels != IGNORE_INDEX
        n = valid.sum().clamp_min(1).to(logits.dtype)
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
        vf = valid.to(logits.dtype)
        ce = ((lse - target) * vf).sum() / n
        z = (lse.square() * vf).sum() / n
        ctx.save_for_backward(logits, lse, labels, vf, n)
        return ce, z

    @staticmethod
    def backward(ctx, g_ce: torch.Tensor, g_z: torch.Tensor):  # type: ignore[override]
        logits, lse, labels, vf, n = ctx.saved_tensors
        coef = (g_ce + 2.0 * g_z * lse) * vf / n  # [N]
        grad = torch.softmax(logits, dim=-1).mul_(coef.unsqueeze(1))
        grad.scatter_add_(1, labels.clamp_min(0).unsqueeze(1), (-g_ce * vf / n).unsqueeze(1))
        return grad, None


def lm_and_z_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and mean ``logsumexp²`` over positions whose label is not ``-100``.

    Args:
        logits: ``[B, T, V]`` (computed in fp32).
        labels: ``[B, T]``.

    Returns:
        ``(ce, z)``; equal to ``lm_loss(logits, labels)`` and ``z_loss(logits, labels != -100)``.
    """
    flat = logits.float().flatten(0, 1)
    return _LMAndZLoss.apply(flat, labels.flatten())
