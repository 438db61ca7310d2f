"""Losses of Label-Assemble (Kang et al., arXiv 2109.12265), as pure functions.

The paper's loss for a batch with targets y ∈ {0,1}^(B×L) and a mask m (1 = label given):

    L = BCE(a_w, y) over m = 1  +  ‖a_w − ã_w‖² over m = 0  +  ‖a_s − ã_w‖² over m = 0

where a_w / a_s are the sigmoid outputs on the weak / strong view and ã_w = sharpen(a_w) (τ = 0.5, t = 4:
a > τ → a + (1 − a)/t, otherwise a − a/t), detached (our choice: the sharpened target is not back-propagated
through). Each term is averaged over its own entries; a term with no entries is 0 (kept in the graph, so every
DDP rank runs the same backward). All weights are 1 by default.

:func:`release_compat_loss` reproduces the official release (``MrGiovanni/LabelAssemble`` ``loss.py``) for
comparison: there every term is computed only for samples whose source is the target source and only for the
class of interest (so assembled and unlabelled samples contribute nothing, and the pseudo-label and consistency
terms act on labelled entries, never on missing ones), the sharpened target is not detached, and the summed
terms are divided by the number of (sample, class) pairs. It is a documented regression arm, not the method.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def sharpen(a: torch.Tensor, *, tau: float = 0.5, t: float = 4.0) -> torch.Tensor:
    """The card's sharpening of probabilities ``a`` (any shape): ``a + (1-a)/t`` where ``a > tau``, else
    ``a - a/t`` (0.8 → 0.85, 0.2 → 0.15, 0.5 → 0.375 at the defaults). Not detached here."""
    return torch.where(a > tau, a + (1.0 - a) / t, a - a / t)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (same shape, bool); 0 (still in the graph) when the mask is empty."""
    count = mask.sum()
    if int(count) == 0:
        return values.sum() * 0.0
    return (values * mask).sum() / count


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE between ``sigmoid(logits)`` and ``targets`` (B, L) averaged over the given entries ``mask`` (B, L);
    a missing entry contributes no loss and no gradient to its logit."""
    per = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return _masked_mean(per, mask)


def pseudo_label_term(probs_weak: torch.Tensor, sharpened: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """‖a_w − ã_w‖² averaged over the ``missing`` entries (B, L); ``sharpened`` is treated as a constant."""
    return _masked_mean((probs_weak - sharpened.detach()) ** 2, missing)


def consistency_term(probs_strong: torch.Tensor, sharpened: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """‖a_s − ã_w‖² averaged over the ``missing`` entries (B, L); ``sharpened`` is treated as a constant."""
    return _masked_mean((probs_strong - sharpened.detach()) ** 2, missing)


@dataclasses.dataclass
class LossParts:
    """The total loss and its terms (scalars; ``pseudo``/``consistency`` are 0 when not used)."""

    total: torch.Tensor
    bce: torch.Tensor
    pseudo: torch.Tensor
    consistency: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name).detach()) for f in dataclasses.fields(self)}


def assemble_loss(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float = 0.5,
    t: float = 4.0,
    pseudo_weight: float = 1.0,
    consistency_weight: float = 1.0,
    teacher_logits: torch.Tensor | None = None,
) -> LossParts:
    """The paper's loss. ``logits_weak``/``logits_strong`` (B, L) on the two views of the same images,
    ``targets`` (B, L) in {0, 1}, ``mask`` (B, L) bool (True = given). ``logits_strong=None`` (or both weights
    0) gives the naive masked BCE alone. ``teacher_logits`` (B, L), when given, are a mean teacher's on the weak
    view: the sharpened target is taken from them instead of from ``logits_weak`` (the optional EMA teacher)."""
    bce = masked_bce(logits_weak, targets, mask)
    zero = logits_weak.sum() * 0.0
    pseudo = consistency = zero
    missing = ~mask
    if pseudo_weight or (consistency_weight and logits_strong is not None):
        probs_weak = torch.sigmoid(logits_weak)
        source = probs_weak if teacher_logits is None else torch.sigmoid(teacher_logits)
        target = sharpen(source.detach(), tau=tau, t=t)
        if pseudo_weight:
            pseudo = pseudo_label_term(probs_weak, target, missing)
        if consistency_weight and logits_strong is not None:
            consistency = consistency_term(torch.sigmoid(logits_strong), target, missing)
    total = bce + pseudo_weight * pseudo + consistency_weight * consistency
    return LossParts(total=total, bce=bce, pseudo=pseudo, consistency=consistency)


def release_compat_loss(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    from_target_source: torch.Tensor,
    class_index: int,
    tau: float = 0.5,
    t: float = 4.0,
) -> LossParts:
    """The release's ``SemiLoss`` (``MrGiovanni/LabelAssemble`` ``loss.py``): over the pairs (row of the target
    source ``from_target_source`` (B,) bool, column ``class_index``) whose label is given, the sum of
    BCE(a_w, y) + (a_w − ã)² + (a_s − ã)² divided by the number of pairs, with ã = sharpen(a_w) *not* detached
    (as released). Rows of other sources, other columns and missing labels add nothing; the pseudo-label and
    consistency terms therefore only ever see labelled entries. A batch without such a pair gives 0 (the
    release divides 0 by 0)."""
    pairs = torch.zeros_like(mask)
    pairs[from_target_source.to(torch.bool), class_index] = True
    pairs &= mask
    bce = masked_bce(logits_weak, targets, pairs)
    probs_weak = torch.sigmoid(logits_weak)
    target = sharpen(probs_weak, tau=tau, t=t)
    pseudo = _masked_mean((probs_weak - target) ** 2, pairs)
    consistency = logits_weak.sum() * 0.0
    if logits_strong is not None:
        consistency = _masked_mean((torch.sigmoid(logits_strong) - target) ** 2, pairs)
    return LossParts(total=bce + pseudo + consistency, bce=bce, pseudo=pseudo, consistency=consistency)
