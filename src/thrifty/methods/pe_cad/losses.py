"""The RSNA-STR PE competition-weighted BCE of the PE CAD recipe (Islam et al., arXiv 2109.07029), as pure functions.

For a batch of B exams fitted to L rows (``valid`` (B, L)), K = 9 exam labels with weights ω_k and an image weight
w_img (0.0736 in the release)::

    w_b      = w_img · q_b · max(S_b / L, 1)        q_b: fraction of exam b's S_b original slices that are positive
    num      = Σ_b Σ_{t valid} w_b · BCE(z_bt, y_bt) + Σ_b Σ_k ω_k · BCE(e_bk, y_bk)
    den      = Σ_b Σ_{t valid} w_b                   + B · Σ_k ω_k
    total    = num / den                                                         (normalisation="metric", default)

This is the competition metric's normalisation (weighted sum / sum of weights), applied to the fitted rows: the
factor S_b / L on a resized exam (L rows standing for S_b > L slices) gives the exam the image weight of its S_b
original slices, as at evaluation. With all predictions at probability ½ the total is exactly ln 2.

What the release does (``second_stage/seresnext50_192.py``):

* Training: ``loss_pe = Σ BCE·mask·w_b / Σ mask`` (divided by the number of valid rows, not by the weights) and
  ``loss_k = ω_k · mean_b BCE(e_bk)``, the objective being ``loss_pe + Σ_k loss_k`` — ``normalisation="release"``
  reproduces it. The weights ``w_b`` are computed as above (``positive_ratio · adjustment``).
* Validation ("Kaggle loss"): the metric at the original resolution — the L slice probabilities resized back to
  S_b, every original slice weighted w_img·q_b, every exam label ω_k, ``Σ w·BCE / Σ w`` over the whole set —
  :func:`rsna_weighted_log_loss`.
* The ω_k and w_img are the competition's constants (``loss_weight_dict``); the nine ω_k sum to 1. We do not restate
  them: ``exam_weights`` is a mapping from :data:`EXAM_LABELS` names (or a length-K sequence) given by the user; the
  default is uniform, ω_k = 1/K, which keeps the same total exam weight relative to w_img.

Soft slice targets (the release's linear resize of the labels of a long exam) are accepted as they are. Where the
model returns several predictors (``*_parts``, the E-ViT), each term's BCE is the mean over its parts, as the
release's ``ComulativeBCELoss`` (0.5·BCE(cls) + 0.5·BCE(rest)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from thrifty.methods.pe_cad.stage2 import EXAM_LABELS, Stage2Output

__all__ = ["DEFAULT_IMAGE_WEIGHT", "LossParts", "image_weights", "resolve_exam_weights", "rsna_weighted_bce",
           "rsna_weighted_log_loss"]  # fmt: skip

#: the image-level weight of the RSNA metric (the release's ``loss_weight_dict['pe_present_on_image']``)
DEFAULT_IMAGE_WEIGHT = 0.0736

ExamWeights = Mapping[str, float] | Sequence[float] | Tensor | None


def resolve_exam_weights(
    exam_weights: ExamWeights, num_labels: int, *, names: Sequence[str] = EXAM_LABELS, device=None
) -> Tensor:
    """ω (K,) float from ``exam_weights``: None -> uniform 1/K; a mapping must name exactly the K labels ``names``
    (:data:`EXAM_LABELS` for K = 9); a sequence/tensor must have K entries. Weights must be finite and >= 0 with a
    positive sum."""
    if exam_weights is None:
        w = torch.full((num_labels,), 1.0 / num_labels, dtype=torch.float64)
    elif isinstance(exam_weights, Mapping):
        if len(names) != num_labels:
            raise ValueError(f"a mapping of exam weights needs {num_labels} label names, have {len(names)}")
        missing, extra = set(names) - set(exam_weights), set(exam_weights) - set(names)
        if missing or extra:
            raise ValueError(f"exam_weights must name exactly {list(names)}; missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")  # fmt: skip
        w = torch.tensor([float(exam_weights[n]) for n in names], dtype=torch.float64)
    else:
        w = torch.as_tensor(exam_weights, dtype=torch.float64).reshape(-1)
        if w.numel() != num_labels:
            raise ValueError(f"expected {num_labels} exam weights, got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"exam weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w.to(device=device, dtype=torch.float32)


def image_weights(
    slice_labels: Tensor,
    valid: Tensor,
    *,
    image_weight: float = DEFAULT_IMAGE_WEIGHT,
    num_slices: Tensor | None = None,
    positive_ratio: Tensor | None = None,
) -> Tensor:
    """Per-exam image weight w_b (B,) = ``image_weight · q_b · max(S_b / L, 1)``.

    ``positive_ratio`` q (B,) should come from the original slices (:class:`~.stage2.Stage2Batch` has it); when None
    it is the mean of ``slice_labels`` over the valid rows (exact for exams that were padded, approximate for resized
    ones). ``num_slices`` S (B,): when None, no length adjustment (as if S <= L)."""
    v = valid.to(torch.bool)
    n = v.shape[1]
    if positive_ratio is None:
        y = torch.where(v, slice_labels, torch.zeros_like(slice_labels))
        q = y.sum(dim=1) / v.sum(dim=1).clamp(min=1)
    else:
        q = positive_ratio.to(slice_labels.dtype)
    if num_slices is None:
        adjust = torch.ones_like(q)
    else:
        adjust = (num_slices.to(q.dtype) / n).clamp(min=1.0)
    return image_weight * q * adjust


def _bce_parts(logits: Tensor, parts: Tensor | None, target: Tensor) -> Tensor:
    """Elementwise BCE-with-logits of ``logits`` (B, N) — or the mean over P of ``parts`` (B, P, N) — against
    ``target`` (B, N)."""
    if parts is None:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return F.binary_cross_entropy_with_logits(parts, target[:, None].expand_as(parts), reduction="none").mean(dim=1)


@dataclasses.dataclass
class LossParts:
    """The objective and its pieces (scalars unless noted).

    Attributes:
        total: what to back-propagate.
        image: the image term — weighted mean slice BCE (``"metric"``) or ``Σ w·BCE / #valid`` (``"release"``).
        exam: the exam term — weighted mean exam BCE (``"metric"``) or ``Σ_k ω_k · mean_b BCE`` (``"release"``).
        image_weight_sum: Σ of the slice weights in the batch (the image share of the metric's denominator).
        exam_weight_sum: B · Σ_k ω_k.
        per_label: (K,) unweighted mean BCE of each exam label over the batch (for logging).
    """

    total: Tensor
    image: Tensor
    exam: Tensor
    image_weight_sum: Tensor
    exam_weight_sum: Tensor
    per_label: Tensor

    def floats(self, names: Sequence[str] = EXAM_LABELS) -> dict[str, float]:
        out = {f.name: float(getattr(self, f.name).detach()) for f in dataclasses.fields(self) if f.name != "per_label"}
        labels = (
            list(names) if len(names) == self.per_label.numel() else [str(i) for i in range(self.per_label.numel())]
        )
        out.update({f"exam/{n}": float(v) for n, v in zip(labels, self.per_label.detach().tolist())})
        return out


def rsna_weighted_bce(
    out: Stage2Output,
    slice_labels: Tensor,
    exam_labels: Tensor,
    valid: Tensor,
    *,
    image_weight: float = DEFAULT_IMAGE_WEIGHT,
    exam_weights: ExamWeights = None,
    num_slices: Tensor | None = None,
    positive_ratio: Tensor | None = None,
    normalisation: Literal["metric", "release"] = "metric",
) -> LossParts:
    """The competition-weighted BCE of a batch (see the module docstring).

    Args:
        out: the model's :class:`Stage2Output` (``slice_logits`` (B, L), ``exam_logits`` (B, K), optional parts).
        slice_labels: (B, L) fitted per-slice targets in [0, 1] (soft allowed); rows outside ``valid`` are ignored.
        exam_labels: (B, K) targets in [0, 1].
        valid: (B, L) bool; padded rows contribute nothing (their logits may be anything, NaN included, and get a
            zero gradient).
        image_weight: w_img; 0 trains on exam labels only (the card's MIL).
        exam_weights: ω, see :func:`resolve_exam_weights` (default uniform 1/K).
        num_slices: (B,) original slice counts S_b for the ``max(S_b / L, 1)`` factor (None: no factor).
        positive_ratio: (B,) q_b from the original slices (None: from ``slice_labels`` over ``valid``).
        normalisation: ``"metric"`` (weighted sum / sum of weights) or ``"release"`` (the release's training sum).
    """
    v = valid.to(torch.bool)
    slice_labels = slice_labels.to(out.slice_logits.dtype)
    exam_labels = exam_labels.to(out.exam_logits.dtype)
    b, k = exam_labels.shape
    zero_logits = out.slice_logits.new_zeros(())
    slice_logits = torch.where(v, out.slice_logits, zero_logits)
    slice_parts = out.slice_logits_parts
    if slice_parts is not None:
        slice_parts = torch.where(v[:, None], slice_parts, zero_logits)
    y = torch.where(v, slice_labels, torch.zeros_like(slice_labels))
    slice_bce = _bce_parts(slice_logits, slice_parts, y) * v  # (B, L), exactly 0 on padding
    exam_bce = _bce_parts(out.exam_logits, out.exam_logits_parts, exam_labels)  # (B, K)

    w_b = image_weights(y, v, image_weight=image_weight, num_slices=num_slices, positive_ratio=positive_ratio)
    w_slice = w_b[:, None] * v  # (B, L)
    omega = resolve_exam_weights(exam_weights, k, device=exam_bce.device).to(exam_bce.dtype)

    image_num = (w_slice * slice_bce).sum()
    image_den = w_slice.sum()
    exam_num = (exam_bce * omega).sum()
    exam_den = omega.sum() * b
    if normalisation == "metric":
        total = (image_num + exam_num) / (image_den + exam_den)
        image = image_num / image_den.clamp(min=torch.finfo(image_den.dtype).tiny)
        exam = exam_num / exam_den
    elif normalisation == "release":
        image = image_num / v.sum().clamp(min=1)
        exam = (omega * exam_bce.mean(dim=0)).sum()
        total = image + exam
    else:
        raise ValueError(f"normalisation must be 'metric' or 'release', got {normalisation!r}")
    return LossParts(
        total=total,
        image=image,
        exam=exam,
        image_weight_sum=image_den.detach(),
        exam_weight_sum=exam_den.detach(),
        per_label=exam_bce.detach().mean(dim=0),
    )


def rsna_weighted_log_loss(
    slice_probs: Sequence[Tensor],
    slice_labels: Sequence[Tensor],
    exam_probs: Tensor,
    exam_labels: Tensor,
    *,
    image_weight: float = DEFAULT_IMAGE_WEIGHT,
    exam_weights: ExamWeights = None,
) -> float:
    """The RSNA metric at the original resolution, as the release's validation "Kaggle loss": every original slice
    of exam i gets weight ``image_weight · q_i`` (q_i its positive fraction), every exam label ω_k; the result is
    ``Σ w·BCE(p, y) / Σ w`` over all of them, BCE on probabilities with the log clamped at −100 (``nn.BCELoss``).

    Args:
        slice_probs: one (S_i,) tensor of slice PE probabilities per exam (e.g. :func:`~.stage2.unfit_predictions`
            of the sigmoid of the fitted logits).
        slice_labels: one (S_i,) tensor of {0, 1} labels per exam.
        exam_probs: (N, K) exam-label probabilities.
        exam_labels: (N, K) exam labels.
    """
    if len(slice_probs) != len(slice_labels) or len(slice_probs) != exam_probs.shape[0]:
        raise ValueError("need one slice_probs and slice_labels entry per exam row")
    k = exam_probs.shape[1]
    omega = resolve_exam_weights(exam_weights, k).to(torch.float64)
    p_exam, y_exam = exam_probs.to(torch.float64), exam_labels.to(torch.float64)
    num = float((F.binary_cross_entropy(p_exam, y_exam, reduction="none") * omega).sum())
    den = float(omega.sum()) * exam_probs.shape[0]
    for p, y in zip(slice_probs, slice_labels):
        p, y = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        if p.shape != y.shape or p.ndim != 1:
            raise ValueError(f"slice probabilities {tuple(p.shape)} and labels {tuple(y.shape)} must be equal (S,)")
        w = image_weight * float(y.mean())
        num += w * float(F.binary_cross_entropy(p, y, reduction="sum"))
        den += w * p.numel()
    if not math.isfinite(num) or den <= 0:
        raise ValueError("the weighted log loss is undefined for these inputs")
    return num / den
