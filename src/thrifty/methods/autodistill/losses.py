"""Distillation losses of MobileBERT's progressive knowledge transfer, as used by AutoDistill's flash distillation.

Layer-wise transfer (per student layer k against its mapped teacher layer), with the factors of the MobileBERT
release (tensorflow/models ``official/projects/mobilebert``)::

    100 · MSE(LN(h_t), LN(h_s)) + 5000 · mean((μ_s − μ_t)²) + 5 · mean|σ²_s − σ²_t| + 1 · KL(A_t ‖ A_s)

divided by (k + 1). LN is a LayerNorm without parameters; μ and σ² are taken over the hidden axis per token;
A are attention distributions. The release computes the attention term as the cross-entropy −Σ A_t log A_s,
which differs from KL by the teacher's entropy (a constant for the student, so the gradients are equal); we
use KL so a perfect student scores 0.

MLM distillation (last stage): cross-entropy against ``gt_ratio · onehot(label) + (1 − gt_ratio) ·
softmax(teacher logits)``.

All functions are pure; shapes: hidden (B, T, d), attention (B, H, T, T), logits (M, V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_layer_norm(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the layer-normalised hidden states (B, T, d)."""
    return (plain_layer_norm(h_t) - plain_layer_norm(h_s)).pow(2).mean()


def mean_loss(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """β term: squared difference of per-token means over the hidden axis, averaged."""
    return (h_s.mean(-1) - h_t.mean(-1)).pow(2).mean()


def variance_loss(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """γ term: absolute difference of per-token (population) variances over the hidden axis, averaged."""
    return (h_s.var(-1, unbiased=False) - h_t.var(-1, unbiased=False)).abs().mean()


def group_heads(a_t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Teacher attention (B, H_t, T, T) → (B, num_heads, T, T).

    Equal head counts pass through; when ``num_heads`` divides ``H_t`` consecutive groups of teacher heads
    are averaged; when ``H_t`` divides ``num_heads`` teacher heads are repeated; otherwise every student head
    is compared with the mean over all teacher heads (a flagged deviation: PKT assumes equal head counts)."""
    h_t = a_t.shape[1]
    if num_heads == h_t:
        return a_t
    if h_t % num_heads == 0:
        return a_t.unflatten(1, (num_heads, h_t // num_heads)).mean(2)
    if num_heads % h_t == 0:
        return a_t.repeat_interleave(num_heads // h_t, dim=1)
    return a_t.mean(1, keepdim=True).expand(-1, num_heads, -1, -1)


def attention_kl(a_s: torch.Tensor, a_t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(A_t ‖ A_s) summed over keys, averaged over batch, heads and queries; teacher heads grouped to
    the student's count with :func:`group_heads`."""
    a_t = group_heads(a_t.float(), a_s.shape[1])
    kl = torch.xlogy(a_t, a_t) - a_t * torch.log(a_s.clamp_min(eps))
    return kl.sum(-1).mean()


def layer_transfer_loss(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    a_s: torch.Tensor,
    a_t: torch.Tensor,
    *,
    stage: int,
    hidden_weight: float = 100.0,
    beta_weight: float = 5000.0,
    gamma_weight: float = 5.0,
    attention_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage-``stage`` layer-wise loss and its (unweighted) terms for logging."""
    h_t = h_t.float()
    terms = {
        "hidden_mse": hidden_mse(h_s, h_t),
        "beta": mean_loss(h_s, h_t),
        "gamma": variance_loss(h_s, h_t),
        "attention_kl": attention_kl(a_s, a_t),
    }
    total = (
        hidden_weight * terms["hidden_mse"]
        + beta_weight * terms["beta"]
        + gamma_weight * terms["gamma"]
        + attention_weight * terms["attention_kl"]
    ) / (stage + 1)
    return total, {k: float(v.detach()) for k, v in terms.items()}


def soft_targets(labels: torch.Tensor, teacher_logits: torch.Tensor, gt_ratio: float) -> torch.Tensor:
    """``gt_ratio``·one-hot(labels) + (1−gt_ratio)·softmax(teacher_logits): (M,) and (M, V) → (M, V)."""
    probs = torch.softmax(teacher_logits.float(), dim=-1)
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return gt_ratio * onehot + (1.0 - gt_ratio) * probs


def mlm_distill_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (M, V) student logits against (M, V) target distributions, averaged over M."""
    return -(targets * torch.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def mixed_mlm_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, gt_ratio: float
) -> torch.Tensor:
    """:func:`mlm_distill_loss` against :func:`soft_targets`, without materialising the (M, V) targets:
    −Σ t·log q = logsumexp(z) − gt·z[label] − (1−gt)·Σ p_t·z, since the targets sum to 1."""
    z = student_logits.float()
    p = torch.softmax(teacher_logits.float(), dim=-1)
    hard = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    soft = (p * z).sum(-1)
    return (torch.logsumexp(z, dim=-1) - gt_ratio * hard - (1.0 - gt_ratio) * soft).mean()
