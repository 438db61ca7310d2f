"""Losses of "Learning from Temporal Gradient for Semi-supervised Action Recognition", as pure functions.

Xiao et al., CVPR 2022 (arXiv 2111.13241); official code ``lambert-x/video-semisup``. What the release's
``Semi_AppSup_TempSup_SimCLR_Crossclip_PTV_Recognizer3D.forward_train`` computes under the main UCF-101
config (``..._align0123_1clip_cosine_weak_sameclip_precisebn_ptv_new_loss_half.py``), term by term:

* supervised: ``0.5·CE(z_rgb, y) + 0.5·CE(z_tg, y)`` on labelled clips (``cls_loss_weight`` default
  ``dict(labeled=0.5, unlabeled=0.5)``).
* pseudo-label: ``p = softmax((z_rgb^weak + z_tg^weak)/2)`` (``pseudo_label_metric='avg'``), kept where
  ``max p >= 0.3``; ``0.5·CE(z_rgb^strong, ŷ) + 0.5·CE(z_tg^strong, ŷ)`` averaged over the kept clips and
  multiplied by ``num_select / len(batch)``, i.e. summed over kept clips and divided by the full unlabelled
  batch; 0 while ``cur_epoch < warmup_epoch`` (30).
* alignment (``temp_align_indices=(0, 1, 2, 3)``, ``align_loss_func='Cosine'``, ``align_stop_grad='tg'``):
  ``CosineSimiLoss(dim=1)`` per stage on labelled + weak-unlabelled clips, TG features detached, weight 1
  per stage. On (N, C, T, H, W) maps ``dim=1`` is the channel axis, so the release takes the cosine
  between channel vectors at every (t, h, w) and averages over clips *and* positions — not a cosine of
  per-clip flattened maps. ``alignment_loss(mode="position")`` (default) does that; ``mode="flatten"`` is
  the per-clip flattening the method card assumed.
* contrast (``crossclip_contrast_loss=['crossview_sameclip']``, ``crossclip_contrast_range=['weak']``, one
  clip per video): ``SimCLRLoss_PTV_New(loss_weight=0.5)`` on the RGB and TG embeddings of the labelled and
  weak-unlabelled clips. That is ``0.5·[CE(a·bᵀ/τ, diag) + CE(b·aᵀ/τ, diag)]`` with τ = 0.5: each anchor is
  contrasted only with the N views of the *other* modality (no same-modality negatives), and the 0.5 turns
  the sum of the two directions into their mean. ``contrast_loss_weight`` defaults to 1, so the release's
  total contrast term equals ``nt_xent(..., same_modality_negatives=False)`` with weight 1.0.

Batching in the release: labelled, weak and strong clips go through each backbone in ONE concatenated forward
(``imgs_all = cat([labelled, weak, strong])``), so BN statistics cover all three; the contrast heads also run on
all of them before the labelled + weak rows are picked.

Deviations from the release:

* The release gathers the key embeddings over GPUs (``differentiable_all_gather``) so the negatives include
  other ranks' clips; these functions see one process's batch (gather before calling, if wanted).
* ``nt_xent(same_modality_negatives=True)`` offers the textbook SimCLR form (2N - 2 negatives) as an option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from thrifty.core.nn import contrastive_logits, nt_xent

__all__ = [
    "LOSS_WEIGHTS",
    "alignment_loss",
    "contrastive_logits",
    "nt_xent",
    "pseudo_label_loss",
    "pseudo_label_weight",
    "pseudo_labels",
    "supervised_loss",
]

# Weights the trainer applies to the terms below to reproduce the release's objective.
# "contrast" is 1.0, not the card's 0.5: the release's 0.5 (``loss_weight`` of SimCLRLoss_PTV_New) multiplies
# the SUM of the two directions, and ``nt_xent`` already returns their MEAN (see the module docstring).
LOSS_WEIGHTS: dict[str, float] = {"supervised": 1.0, "pseudo": 1.0, "align": 1.0, "contrast": 1.0}


def supervised_loss(logits_rgb: Tensor, logits_tg: Tensor | None, labels: Tensor) -> Tensor:
    """``0.5·CE(z_rgb, y) + 0.5·CE(z_tg, y)``, each CE averaged over the batch.

    Args:
        logits_rgb, logits_tg: (N, K) logits; ``logits_tg=None`` (an RGB-only arm) gives ``CE(z_rgb, y)``.
        labels: (N,) int64 class indices.
    Returns: scalar.
    """
    if logits_tg is None:
        return F.cross_entropy(logits_rgb, labels)
    return 0.5 * F.cross_entropy(logits_rgb, labels) + 0.5 * F.cross_entropy(logits_tg, labels)


@torch.no_grad()
def pseudo_labels(
    logits_rgb_weak: Tensor,
    logits_tg_weak: Tensor | None,
    *,
    threshold: float,
    modalities: Literal["avg", "rgb", "tg"] = "avg",
) -> tuple[Tensor, Tensor, Tensor]:
    """FixMatch-style hard pseudo-labels from the weak views (no gradient).

    ``p = softmax((z_rgb + z_tg)/2)`` for ``modalities="avg"`` (the release's ``pseudo_label_metric='avg'``:
    logits are averaged before the softmax), ``softmax(z_rgb)`` for ``"rgb"`` (ablation: RGB-only pseudo-labels;
    ``logits_tg_weak`` may then be None) and ``softmax(z_tg)`` for ``"tg"``.

    Args:
        logits_rgb_weak, logits_tg_weak: (N, K) logits of the weak views.
        threshold: keep a clip when ``max p >= threshold`` (the release's main configs: 0.3).
    Returns:
        labels (N,) int64 argmax of p; mask (N,) bool; probs (N, K) — all detached.
    """
    if modalities == "avg":
        if logits_tg_weak is None:
            raise ValueError("modalities='avg' needs logits_tg_weak")
        logits = (logits_rgb_weak + logits_tg_weak) / 2
    elif modalities == "rgb":
        logits = logits_rgb_weak
    elif modalities == "tg":
        if logits_tg_weak is None:
            raise ValueError("modalities='tg' needs logits_tg_weak")
        logits = logits_tg_weak
    else:
        raise ValueError(f"modalities must be 'avg', 'rgb' or 'tg'; got {modalities!r}")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    conf, labels = probs.max(dim=-1)
    return labels, conf >= threshold, probs


def pseudo_label_loss(
    logits_rgb_strong: Tensor, logits_tg_strong: Tensor | None, labels: Tensor, mask: Tensor
) -> Tensor:
    """``Σ_{kept i} [0.5·CE(z_rgb^strong_i, ŷ_i) + 0.5·CE(z_tg^strong_i, ŷ_i)] / N`` over the FULL batch N.

    Equal to the release's ``0.5 · mean_kept(CE) · num_select / len(batch)`` per modality; 0 when nothing is kept.

    Args:
        logits_rgb_strong, logits_tg_strong: (N, K) logits of the strong views; ``logits_tg_strong=None``
            (an RGB-only FixMatch arm) gives the single RGB term with weight 1.
        labels: (N,) pseudo-labels; mask: (N,) bool, which clips are kept.
    Returns: scalar (carries the graph even when nothing is kept, with zero gradient).
    """
    n = logits_rgb_strong.shape[0]
    if n == 0:
        return logits_rgb_strong.sum() * 0.0
    keep = mask.to(logits_rgb_strong.dtype)
    ce = F.cross_entropy(logits_rgb_strong, labels, reduction="none")
    if logits_tg_strong is not None:
        ce = 0.5 * ce + 0.5 * F.cross_entropy(logits_tg_strong, labels, reduction="none")
    return (ce * keep).sum() / n


def pseudo_label_weight(step: int, *, warmup_steps: int) -> float:
    """Weight of the pseudo-label term: 0.0 before ``warmup_steps``, 1.0 from then on.

    The release switches the term on when ``cur_epoch >= warmup_epoch`` (30 of 180 epochs).
    """
    return 0.0 if step < warmup_steps else 1.0


def alignment_loss(
    feats_rgb: Sequence[Tensor],
    feats_tg: Sequence[Tensor],
    *,
    mode: Literal["position", "flatten"] = "position",
) -> Tensor:
    """``Σ_s mean(1 − cos(f_rgb^s, stopgrad(f_tg^s)))`` over the given stages, weight 1 each.

    Args:
        feats_rgb, feats_tg: equal-length lists of (N, C_s, T_s, H_s, W_s) stage maps (any shape (N, C, ...)).
        mode: ``"position"`` — the release's ``CosineSimiLoss(dim=1)``: cosine between the C-dim channel vectors
            at each (t, h, w), averaged over clips and positions. ``"flatten"`` — cosine between each clip's
            flattened maps (C·T·H·W vectors), averaged over clips.
    Returns: scalar in [0, 2·S]; each stage contributes a value in [0, 2]. No gradient reaches ``feats_tg``.
    A zero vector has cosine 0 with anything (loss 1 there), as with the release's ``F.normalize``.
    """
    if len(feats_rgb) != len(feats_tg) or len(feats_rgb) == 0:
        raise ValueError(f"need the same non-zero number of stages; got {len(feats_rgb)} and {len(feats_tg)}")
    if mode not in ("position", "flatten"):
        raise ValueError(f"mode must be 'position' or 'flatten'; got {mode!r}")
    total = feats_rgb[0].new_zeros(())
    for f_rgb, f_tg in zip(feats_rgb, feats_tg):
        if f_rgb.shape != f_tg.shape:
            raise ValueError(f"stage shapes differ: {tuple(f_rgb.shape)} vs {tuple(f_tg.shape)}")
        f_tg = f_tg.detach()
        if mode == "flatten":
            f_rgb, f_tg = f_rgb.flatten(1), f_tg.flatten(1)  # (N, C·T·H·W)
        cos = (F.normalize(f_rgb, dim=1) * F.normalize(f_tg, dim=1)).sum(dim=1)  # (N,) or (N, T, H, W)
        total = total + (1.0 - cos).mean()
    return total
