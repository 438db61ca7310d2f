"""Stage 2 of the PE CAD recipe: an exam's sequence of slice features -> per-slice PE and nine exam-label logits.

Islam et al., *Seeking an Optimal Approach for Computer-aided Pulmonary Embolism Detection* (arXiv 2109.07029;
MLMI 2021, extended in MedIA 2023); official code ``Nahid1992/CAD_PE``. Written here from a reading of
``second_stage/seresnext50_192.py`` (CC model, data pipeline, loss), ``second_stage/seresnext50_192_EViT_CEFEavg_V.py``
with ``second_stage/modified_vit_models.py`` and ``second_stage/models_vit/modeling_exp_CEFE_avg{,_V}.py`` (E-ViT);
no code copied. The data flow for one exam of S slices with D-dim stage-1 features::

    fit_length / prepare_exam     (S, D) -> (L, D): S > L linearly resized to L; S <= L zero-padded, ``valid`` mask
    difference_features           (L, D) -> (L, 3D) = [f_t, f_t − f_{t−1}, f_t − f_{t+1}] on the valid prefix
    collate_exams                 -> Stage2Batch x (B, L, 3D), valid (B, L), slice/exam labels, lengths, ratios
    model(x, valid)               -> Stage2Output slice_logits (B, L), exam_logits (B, 9), attention (B, L)

What the release does, and what we do:

* **Difference features** (``PEDataset.__getitem__``): block 2 is ``x[1:] − x[:-1]`` (f_t − f_{t−1}, zero at the
  first step) and block 3 is ``x[:-1] − x[1:]`` (f_t − f_{t+1}, zero at the last step); the block order is therefore
  [f, backward, forward], which we keep (the card lists forward first; the set of features is the same). The release
  computes them *after* resizing/padding, over the whole L rows: for a padded exam the last valid slice gets a
  forward difference of f_last − 0 = f_last and the first padding row a backward difference of −f_last. We compute
  them over the valid prefix only (zero at both of its ends, padding rows all zero), so padding carries nothing and a
  short exam's boundary looks like a long exam's.
* **Length** (``PEDataset``): S > L -> ``cv2.resize(..., INTER_LINEAR)`` along the slice axis, i.e. half-pixel
  linear interpolation without antialiasing; :func:`fit_length` does the same with ``F.interpolate(mode="linear",
  align_corners=False)`` (``align_corners=True`` is offered and keeps both end slices exactly). S <= L -> zero rows
  after the exam and a 0/1 mask. The per-slice labels of a long exam are resized the same (linear) way, giving *soft*
  targets in [0, 1] (:func:`fit_labels` ``mode="linear"``; ``"nearest"`` and ``"threshold"`` are ablations). At
  evaluation the release resizes the L slice probabilities back to S with the same ``cv2`` call
  (:func:`unfit_predictions`). The E-ViT file instead keeps the *last* L = 512 slices of a long exam
  (``long_mode="tail"``).
* **CC model** (``PENet``): one-layer bidirectional ``nn.GRU(3D, hidden)`` (hidden 512), batch-first, no dropout
  (the ``SpatialDropout`` is commented out); a per-slice ``Linear(2·hidden, 1)`` on every step; ``max_pool`` and
  ``att_pool`` over the steps, concatenated to 4·hidden and fed to nine ``Linear(4·hidden, 1)`` (one
  ``Linear(4·hidden, 9)`` here, the same function and per-row init). The release's ``Attention`` scores a step as
  ``e_t = tanh(wᵀh_t + b_t)`` with a single vector ``w`` (Xavier-uniform) and a *per-position* bias ``b`` (length
  ``seq_len``, zeros), and weights ``α = exp(e)·mask / Σ exp(e)·mask + 1e-10``: :class:`ReleaseAttention`, our
  default. The card's ``e_t = uᵀ tanh(W h_t)`` is :class:`AdditiveAttention` (``attention="additive"``).
* **Exam labels** in the release's head order (also the card's): negative, indeterminate, left, right, central,
  RV/LV >= 1, RV/LV < 1, chronic, acute-and-chronic (:data:`EXAM_LABELS`, RSNA column names).
* **Optimiser**: Adam, lr 5e-4, ``StepLR(step_size=1, gamma=0.8)`` stepped once per epoch, 25 epochs, batch 64
  (:func:`build_stage2_optimizer`).
* **E-ViT** (MedIA; ``PENet_ViT_BASE_withAtten_withFCs_CEFE_avg``): three stacked ``Linear`` layers without
  activations (6144 -> 3072 -> 1536 -> 768), ten learned tokens prepended (zeros init; token 0 for the slice
  labels, 1..9 one per exam label), a ViT-B encoder (12 layers, 12 heads, MLP 3072, pre-norm, final LayerNorm
  eps 1e-6) *without* position embeddings (``embedding=False``), an additive key mask (the ``_V`` variant).
  Token 0 -> ``Linear(768, 512)`` slice logits; token k -> ``Linear(768, 1)`` exam logit k; the slice tokens ->
  concat(max-pool, release attention-pool) -> ``Linear(1536, 512)`` slice logits and nine ``Linear(1536, 1)`` exam
  logits. Each exam label thus gets two logits; training averages their BCEs (``ComulativeBCELoss``) and evaluation
  averages their probabilities. :class:`EViT` keeps this structure at a small size.

Deviations (deliberate):

* Padding never influences a valid output: padded input rows are zeroed before any layer (they may hold anything,
  even inf), the max-pool is masked (the release's is not: padded GRU states can win it), attention weights of
  padding are exactly 0 (the release gives them 1e-10), and the E-ViT's key mask covers padding. The GRU still runs
  over the zero rows as in the release; ``pack_padding=True`` packs the sequence so the backward direction starts at
  the last valid slice.
* The E-ViT's input projection is one ``Linear`` (the release's three activation-free layers are one linear map);
  tokens start from N(0, 0.02²) rather than zeros; its per-slice logits average (in probability) a per-token head
  (as in the CC model) with the class-token head, where the release's slice logits come from position-indexed maps of
  pooled vectors only. Position embeddings are off by default, as in the release (``positional=True`` adds them).
* **MIL** is not in the release (the paper compares it, the code is not published): :class:`GatedAttentionMIL`
  (Ilse et al., ICML 2018: ``e_t = wᵀ(tanh(V h_t) ⊙ σ(U h_t))``, masked softmax, bag = Σ α_t h_t) and
  :class:`MaxMIL` (per-slice scores per exam label, masked max over slices) are our documented hypothesis. Each slice
  is embedded independently by a two-layer MLP to the BiGRU's width 2·hidden, with the first layer's width chosen so
  that the parameter count matches the CC model's (:func:`matched_embed_dim`); the heads are the CC model's (a
  per-slice logit and nine exam logits). The card's MIL trains on exam labels only: pass ``image_weight=0`` to the
  loss for that (the per-slice head then gets no gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from thrifty.core.nn import count_parameters as count_parameters  # re-exported

__all__ = [
    "EXAM_LABELS",
    "AdditiveAttention",
    "EViT",
    "FittedSequence",
    "GatedAttention",
    "GatedAttentionMIL",
    "MaxMIL",
    "PENet",
    "ReleaseAttention",
    "Stage2Batch",
    "Stage2Output",
    "build_stage2",
    "build_stage2_optimizer",
    "cc_parameter_count",
    "collate_exams",
    "count_parameters",
    "difference_features",
    "fit_labels",
    "fit_length",
    "masked_max_pool",
    "masked_softmax",
    "matched_embed_dim",
    "prepare_exam",
    "resize_sequence",
    "source_positions",
    "unfit_predictions",
]

#: the nine exam labels, in the release's head order (RSNA-STR ``train.csv`` column names)
EXAM_LABELS: tuple[str, ...] = (
    "negative_exam_for_pe",
    "indeterminate",
    "leftsided_pe",
    "rightsided_pe",
    "central_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "chronic_pe",
    "acute_and_chronic_pe",
)
NUM_EXAM_LABELS = len(EXAM_LABELS)

LongMode = Literal["resize", "tail"]
LabelMode = Literal["linear", "nearest", "threshold"]
StageKind = Literal["cc", "mil_attention", "mil_max", "evit"]


# ------------------------------------------------------------------------------------------------------ sequences
def _as_float(x: Tensor | Sequence[float]) -> Tensor:
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.float32)


def difference_features(feats: Tensor) -> Tensor:
    """(..., S, D) -> (..., S, 3D) = [f_t, f_t − f_{t−1}, f_t − f_{t+1}], the differences zero where the neighbour
    does not exist (t = 0 and t = S − 1). The block order is the release's (``PEDataset``)."""
    f = _as_float(feats)
    if f.ndim < 2 or f.shape[-2] == 0:
        raise ValueError(f"expected (..., S, D) with S >= 1, got shape {tuple(f.shape)}")
    step = f[..., 1:, :] - f[..., :-1, :]  # f_{t+1} − f_t, (..., S − 1, D)
    backward = F.pad(step, (0, 0, 1, 0))  # row t: f_t − f_{t−1}
    forward = F.pad(-step, (0, 0, 0, 1))  # row t: f_t − f_{t+1}
    return torch.cat((f, backward, forward), dim=-1)


def resize_sequence(x: Tensor, length: int, *, align_corners: bool = False) -> Tensor:
    """Linear resize along the first axis: (S,) or (S, F) -> (length,) or (length, F), float.

    ``align_corners=False`` is ``cv2.resize(..., INTER_LINEAR)`` (what the release calls): output row i reads source
    position ``clamp((i + 0.5)·S/length − 0.5, 0, S − 1)``, no antialiasing. ``align_corners=True`` reads
    ``i·(S − 1)/(length − 1)`` and so keeps the first and last rows exactly."""
    t = _as_float(x)
    if t.ndim not in (1, 2) or t.shape[0] == 0:
        raise ValueError(f"expected (S,) or (S, F) with S >= 1, got shape {tuple(t.shape)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    s = t.shape[0]
    flat = t.reshape(s, -1)
    if s == length:
        out = flat.clone()
    elif s == 1:
        out = flat.expand(length, -1).clone()
    else:
        out = F.interpolate(flat.T[None], size=length, mode="linear", align_corners=align_corners)[0].T
    return out.reshape(length, *t.shape[1:])


def source_positions(
    num_slices: int, length: int, *, long_mode: LongMode = "resize", align_corners: bool = False
) -> Tensor:
    """(length,) float: the source slice coordinate each of the ``length`` fitted rows reads (fractional for a
    resized exam), −1 for padding rows. Matches :func:`fit_length` with the same arguments."""
    s, n = int(num_slices), int(length)
    if s < 1 or n < 1:
        raise ValueError(f"num_slices and length must be >= 1, got {s} and {n}")
    i = torch.arange(n, dtype=torch.float64)
    if s <= n:
        pos = torch.where(i < s, i, torch.full_like(i, -1.0))
    elif long_mode == "tail":
        pos = i + (s - n)
    elif long_mode != "resize":
        raise ValueError(f"unknown long_mode {long_mode!r}")
    elif align_corners:
        pos = i * (s - 1) / (n - 1) if n > 1 else torch.zeros_like(i)
    else:
        pos = ((i + 0.5) * s / n - 0.5).clamp(0.0, s - 1)
    return pos.to(torch.float32)


class FittedSequence(NamedTuple):
    """An exam brought to exactly L rows.

    Attributes:
        x: (L, F) fitted rows (zeros after a short exam).
        valid: (L,) bool, True on rows that come from the exam (all True for an exam with S >= L).
        source_pos: (L,) float, the source slice coordinate of each row (:func:`source_positions`), −1 on padding.
    """

    x: Tensor
    valid: Tensor
    source_pos: Tensor


def _check_long_mode(long_mode: str) -> None:
    if long_mode not in ("resize", "tail"):
        raise ValueError(f"long_mode must be 'resize' or 'tail', got {long_mode!r}")


def fit_length(
    x: Tensor, length: int, *, long_mode: LongMode = "resize", align_corners: bool = False
) -> FittedSequence:
    """(S, F) -> :class:`FittedSequence` with exactly ``length`` rows. S > length: linear resize (the release's CC
    pipeline; ``long_mode="tail"`` keeps the last ``length`` rows, as its E-ViT does); S <= length: the S rows then
    zero rows, ``valid`` marking the first S."""
    _check_long_mode(long_mode)
    t = _as_float(x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"expected (S, F) with S >= 1, got shape {tuple(t.shape)}")
    s = t.shape[0]
    pos = source_positions(s, length, long_mode=long_mode, align_corners=align_corners)
    if s > length:
        out = (
            t[s - length :].clone() if long_mode == "tail" else resize_sequence(t, length, align_corners=align_corners)
        )
        return FittedSequence(out, torch.ones(length, dtype=torch.bool), pos)
    out = t.new_zeros((length, t.shape[1]))
    out[:s] = t
    return FittedSequence(out, torch.arange(length) < s, pos)


def fit_labels(
    labels: Tensor,
    length: int,
    *,
    mode: LabelMode = "linear",
    long_mode: LongMode = "resize",
    align_corners: bool = False,
    threshold: float = 0.5,
) -> Tensor:
    """Per-slice labels (S,) -> (length,) float, consistent with :func:`fit_length`. S <= length: zero-padded. S >
    length, resized: ``"linear"`` — the release's ``cv2`` linear resize of ``y_pe``, soft targets in [0, 1];
    ``"nearest"`` — source slice ``floor(i·S/length)``; ``"threshold"`` — linear, then ``>= threshold`` -> {0, 1}."""
    _check_long_mode(long_mode)
    if mode not in ("linear", "nearest", "threshold"):
        raise ValueError(f"mode must be 'linear', 'nearest' or 'threshold', got {mode!r}")
    y = _as_float(labels)
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError(f"expected (S,) with S >= 1, got shape {tuple(y.shape)}")
    s = y.shape[0]
    if s <= length:
        return F.pad(y, (0, length - s))
    if long_mode == "tail":
        return y[s - length :].clone()
    if mode == "nearest":
        return F.interpolate(y[None, None], size=length, mode="nearest")[0, 0]
    soft = resize_sequence(y, length, align_corners=align_corners)
    return (soft >= threshold).to(y.dtype) if mode == "threshold" else soft


def unfit_predictions(
    pred: Tensor, num_slices: int, *, long_mode: LongMode = "resize", align_corners: bool = False
) -> Tensor:
    """Fitted per-row predictions (L,) or (L, F) -> the exam's S slices. S <= L: the first S rows. S > L, resized:
    linear resize back to S (the release's evaluation, ``cv2.resize(pred, (1, S), INTER_LINEAR)``; resize
    probabilities, not logits, to match it). ``long_mode="tail"``: the dropped first S − L slices repeat the first
    kept row's prediction (our choice; the release's E-ViT scores only the kept slices)."""
    _check_long_mode(long_mode)
    p = _as_float(pred)
    n, s = p.shape[0], int(num_slices)
    if s <= n:
        return p[:s]
    if long_mode == "tail":
        return torch.cat((p[:1].expand(s - n, *p.shape[1:]), p), dim=0)
    return resize_sequence(p, s, align_corners=align_corners)


def prepare_exam(
    feats: Tensor, length: int, *, long_mode: LongMode = "resize", align_corners: bool = False
) -> FittedSequence:
    """Raw slice features (S, D) -> (length, 3D) model input, in the release's order: fit the raw features to
    ``length`` rows first (resize or pad), then take :func:`difference_features` over the valid rows (so a resized
    exam's differences are between resized neighbours, as in the release). Padding rows are zero in all three
    blocks."""
    fitted = fit_length(feats, length, long_mode=long_mode, align_corners=align_corners)
    n = int(fitted.valid.sum())
    out = fitted.x.new_zeros((length, 3 * fitted.x.shape[1]))
    out[:n] = difference_features(fitted.x[:n])
    return FittedSequence(out, fitted.valid, fitted.source_pos)


@dataclasses.dataclass
class Stage2Batch:
    """A collated batch of B exams fitted to L rows (K exam labels, F = 3D input features).

    Attributes:
        x: (B, L, F) model input.
        valid: (B, L) bool.
        slice_labels: (B, L) float fitted per-slice PE labels (soft for resized exams with ``label_mode="linear"``).
        exam_labels: (B, K) float.
        num_slices: (B,) long, each exam's original slice count S.
        positive_ratio: (B,) float, fraction of the exam's original S slices that are PE-positive (what the RSNA
            image weight uses).
    """

    x: Tensor
    valid: Tensor
    slice_labels: Tensor
    exam_labels: Tensor
    num_slices: Tensor
    positive_ratio: Tensor

    def to(self, device: torch.device | str) -> Stage2Batch:
        return Stage2Batch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def collate_exams(
    exams: Sequence[tuple[Tensor, Tensor, Tensor]],
    *,
    length: int,
    label_mode: LabelMode = "linear",
    long_mode: LongMode = "resize",
    align_corners: bool = False,
) -> Stage2Batch:
    """Exams given as ``(feats (S_i, D), slice_labels (S_i,), exam_labels (K,))`` -> :class:`Stage2Batch`, each
    exam through :func:`prepare_exam` and :func:`fit_labels` with the same settings."""
    if not exams:
        raise ValueError("collate_exams needs at least one exam")
    xs, valids, ys, exam_ys, lengths, ratios = [], [], [], [], [], []
    for feats, slice_labels, exam_labels in exams:
        y = _as_float(slice_labels)
        if y.ndim != 1 or y.shape[0] != torch.as_tensor(feats).shape[0]:
            raise ValueError("slice_labels must be (S,) with the features' S")
        fitted = prepare_exam(feats, length, long_mode=long_mode, align_corners=align_corners)
        xs.append(fitted.x.to(torch.float32))
        valids.append(fitted.valid)
        ys.append(
            fit_labels(y, length, mode=label_mode, long_mode=long_mode, align_corners=align_corners).to(torch.float32)
        )
        exam_ys.append(_as_float(exam_labels).to(torch.float32).reshape(-1))
        lengths.append(y.shape[0])
        ratios.append(float(y.to(torch.float64).mean()))
    return Stage2Batch(
        x=torch.stack(xs),
        valid=torch.stack(valids),
        slice_labels=torch.stack(ys),
        exam_labels=torch.stack(exam_ys),
        num_slices=torch.tensor(lengths, dtype=torch.long),
        positive_ratio=torch.tensor(ratios, dtype=torch.float32),
    )


# ------------------------------------------------------------------------------------------------------- pooling
def masked_softmax(scores: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the last axis of ``scores`` (B, L) restricted to ``valid`` (B, L): padding gets exactly 0,
    whatever its score (inf and NaN included); each row with a valid entry sums to 1; a row with none is all 0."""
    v = valid.to(torch.bool)
    filled = scores.masked_fill(~v, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * v


def masked_max_pool(h: Tensor, valid: Tensor) -> Tensor:
    """Max over the steps of ``h`` (B, L, C) restricted to ``valid`` (B, L) -> (B, C); padding never wins, whatever
    it holds; a row without valid steps gives 0."""
    v = valid.to(torch.bool)
    filled = h.masked_fill(~v[..., None], float("-inf"))
    pooled = filled.max(dim=1).values
    return torch.where(v.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


class _AttentionPool(nn.Module):
    """Base of the attention pools: (h (B, L, C), valid (B, L)) -> (pooled (B, C), weights (B, L))."""

    def scores(self, h: Tensor) -> Tensor:  # (B, L, C) -> (B, L)
        raise NotImplementedError

    def forward(self, h: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        alpha = masked_softmax(self.scores(h), valid)
        return torch.einsum("bl,blc->bc", alpha, h), alpha


class ReleaseAttention(_AttentionPool):
    """The release's ``Attention``: ``e_t = tanh(wᵀh_t + b_t)`` with one vector ``w`` (dim,) (Xavier-uniform, as
    the release's (dim, 1) tensor) and a per-position bias ``b`` (seq_len,) (zeros); α = masked softmax(e). Inputs
    may be shorter than ``seq_len`` (the first L biases are used), not longer."""

    def __init__(self, *, dim: int, seq_len: int) -> None:
        super().__init__()
        weight = torch.empty(dim, 1)
        nn.init.xavier_uniform_(weight)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(seq_len))

    def scores(self, h: Tensor) -> Tensor:
        n = h.shape[1]
        if n > self.bias.shape[0]:
            raise ValueError(f"sequence of {n} steps is longer than the attention's seq_len {self.bias.shape[0]}")
        return torch.tanh((h @ self.weight)[..., 0] + self.bias[:n])


class AdditiveAttention(_AttentionPool):
    """The card's form ``e_t = uᵀ tanh(W h_t + c)``: W (attn_dim, dim) with bias, u (attn_dim,) without."""

    def __init__(self, *, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, attn_dim)
        self.u = nn.Linear(attn_dim, 1, bias=False)

    def scores(self, h: Tensor) -> Tensor:
        return self.u(torch.tanh(self.proj(h)))[..., 0]


class GatedAttention(_AttentionPool):
    """Ilse et al. (2018) gated attention: ``e_t = wᵀ(tanh(V h_t) ⊙ σ(U h_t))``."""

    def __init__(self, *, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, attn_dim)
        self.u = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)

    def scores(self, h: Tensor) -> Tensor:
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))[..., 0]


def _zero_padding(x: Tensor, valid: Tensor) -> Tensor:
    """``x`` (B, L, F) with the rows outside ``valid`` (B, L) set to exactly 0 (inf/NaN there included)."""
    return torch.where(valid.to(torch.bool)[..., None], x, x.new_zeros(()))


def _mean_probability_logit(parts: Tensor) -> Tensor:
    """(B, P, N) logits -> (B, N): the logit of the mean of their sigmoids (computed in log space)."""
    log_p = torch.logsumexp(F.logsigmoid(parts), dim=1)
    log_q = torch.logsumexp(F.logsigmoid(-parts), dim=1)
    return log_p - log_q


# -------------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class Stage2Output:
    """What every stage-2 model returns (B exams, L rows, K exam labels).

    Attributes:
        slice_logits: (B, L) per-slice PE logits (rows outside ``valid`` are meaningless).
        exam_logits: (B, K) exam-label logits, in :data:`EXAM_LABELS` order.
        attention: (B, L) the pooling weights over slices: exactly 0 on padding, summing to 1 over valid slices.
        slice_logits_parts: (B, P, L) or None — for a model with P slice predictors (E-ViT) the logits whose BCEs
            the loss averages; ``slice_logits`` is then the logit of their mean probability.
        exam_logits_parts: (B, P, K) or None — the same for the exam labels.
    """

    slice_logits: Tensor
    exam_logits: Tensor
    attention: Tensor
    slice_logits_parts: Tensor | None = None
    exam_logits_parts: Tensor | None = None


class PENet(nn.Module):
    """The conventional-classification (CC) model: bidirectional GRU over the slice features, a per-slice PE head on
    every step, and exam heads on concat(masked max-pool, attention-pool) of the GRU states.

    ``x`` (B, L, in_dim), ``valid`` (B, L) -> :class:`Stage2Output`. ``attention``: ``"release"``
    (:class:`ReleaseAttention`, needs ``seq_len`` >= L) or ``"additive"`` (:class:`AdditiveAttention` with
    ``attn_dim``, default ``hidden``). ``pack_padding`` packs the GRU input (``valid`` must then be a prefix)."""

    def __init__(
        self,
        *,
        in_dim: int,
        hidden: int = 512,
        num_layers: int = 1,
        num_exam_labels: int = NUM_EXAM_LABELS,
        seq_len: int | None = None,
        attention: Literal["release", "additive"] = "release",
        attn_dim: int | None = None,
        gru_dropout: float = 0.0,
        pack_padding: bool = False,
    ) -> None:
        super().__init__()
        self.pack_padding = pack_padding
        self.gru = nn.GRU(
            in_dim,
            hidden,
            num_layers=num_layers,
            bidirectional=True,
            batch_first=True,
            dropout=gru_dropout if num_layers > 1 else 0.0,
        )
        width = 2 * hidden
        if attention == "release":
            if seq_len is None:
                raise ValueError("attention='release' has a per-position bias: give seq_len")
            self.attention: _AttentionPool = ReleaseAttention(dim=width, seq_len=seq_len)
        elif attention == "additive":
            self.attention = AdditiveAttention(dim=width, attn_dim=attn_dim or hidden)
        else:
            raise ValueError(f"attention must be 'release' or 'additive', got {attention!r}")
        self.slice_head = nn.Linear(width, 1)
        self.exam_head = nn.Linear(2 * width, num_exam_labels)

    def _encode(self, x: Tensor, valid: Tensor) -> Tensor:
        if not self.pack_padding:
            return self.gru(x)[0]
        n = x.shape[1]
        lengths = valid.sum(dim=1)
        if not torch.equal(valid, torch.arange(n, device=valid.device) < lengths[:, None]):
            raise ValueError("pack_padding needs every row's valid steps to be a prefix")
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=n)[0]

    def forward(self, x: Tensor, valid: Tensor) -> Stage2Output:
        valid = valid.to(torch.bool)
        h = self._encode(_zero_padding(x, valid), valid)  # (B, L, 2H)
        slice_logits = self.slice_head(h)[..., 0]
        att_pool, alpha = self.attention(h, valid)
        pooled = torch.cat((masked_max_pool(h, valid), att_pool), dim=-1)  # (B, 4H), the release's order
        return Stage2Output(slice_logits=slice_logits, exam_logits=self.exam_head(pooled), attention=alpha)


def cc_parameter_count(*, in_dim: int, hidden: int, num_exam_labels: int = NUM_EXAM_LABELS, seq_len: int = 0) -> int:
    """Parameters of a one-layer :class:`PENet` with the release's attention (``seq_len`` 0 leaves out its
    per-position bias): GRU 6·H·(in_dim + H + 2), slice head 2H + 1, exam head 4H·K + K, attention 2H + seq_len."""
    h, k = hidden, num_exam_labels
    return 6 * h * (in_dim + h + 2) + (2 * h + 1) + (4 * h * k + k) + (2 * h + seq_len)


def matched_embed_dim(
    *, in_dim: int, hidden: int, num_exam_labels: int = NUM_EXAM_LABELS, other_params: int = 0
) -> int:
    """Width E of the MIL instance MLP ``Linear(in_dim, E) -> Linear(E, 2·hidden)`` that makes a MIL model with
    ``other_params`` parameters outside that MLP as large as the CC model (:func:`cc_parameter_count`)."""
    target = cc_parameter_count(in_dim=in_dim, hidden=hidden, num_exam_labels=num_exam_labels)
    return max(1, round((target - other_params - 2 * hidden) / (in_dim + 1 + 2 * hidden)))


class _InstanceMIL(nn.Module):
    """Shared part of the MIL models: each slice embedded independently to 2·hidden by
    ``Linear(in_dim, E) -> ReLU -> dropout -> Linear(E, 2·hidden) -> ReLU`` (E = :func:`matched_embed_dim` for the
    model's ``other_params`` unless given)."""

    def __init__(
        self,
        *,
        in_dim: int,
        hidden: int,
        num_exam_labels: int,
        embed_dim: int | None,
        dropout: float,
        other_params: int,
    ) -> None:
        super().__init__()
        e = embed_dim or matched_embed_dim(
            in_dim=in_dim, hidden=hidden, num_exam_labels=num_exam_labels, other_params=other_params
        )
        self.embed = nn.Sequential(
            nn.Linear(in_dim, e), nn.ReLU(), nn.Dropout(dropout), nn.Linear(e, 2 * hidden), nn.ReLU()
        )


class GatedAttentionMIL(_InstanceMIL):
    """Gated attention-MIL (Ilse et al., 2018; our hypothesis of the paper's MIL): instance embeddings h_t, a
    per-slice PE head on each, a gated attention pool over the valid slices, nine exam heads on the pooled bag.

    ``x`` (B, L, in_dim), ``valid`` (B, L) -> :class:`Stage2Output`."""

    def __init__(
        self,
        *,
        in_dim: int,
        hidden: int = 512,
        num_exam_labels: int = NUM_EXAM_LABELS,
        embed_dim: int | None = None,
        attn_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        w, a, k = 2 * hidden, attn_dim or hidden, num_exam_labels
        heads = (w + 1) + (w * k + k) + 2 * (w * a + a) + (a + 1)  # slice, exam, V, U, w
        super().__init__(in_dim=in_dim, hidden=hidden, num_exam_labels=k, embed_dim=embed_dim, dropout=dropout,
                         other_params=heads)  # fmt: skip
        self.attention = GatedAttention(dim=w, attn_dim=a)
        self.slice_head = nn.Linear(2 * hidden, 1)
        self.exam_head = nn.Linear(2 * hidden, num_exam_labels)

    def forward(self, x: Tensor, valid: Tensor) -> Stage2Output:
        valid = valid.to(torch.bool)
        h = self.embed(_zero_padding(x, valid))
        bag, alpha = self.attention(h, valid)
        return Stage2Output(slice_logits=self.slice_head(h)[..., 0], exam_logits=self.exam_head(bag), attention=alpha)


class MaxMIL(_InstanceMIL):
    """Max-MIL (our hypothesis): instance embeddings h_t, one ``Linear(2·hidden, 1 + K)`` giving each slice a PE
    logit and K exam-label scores; exam logit k = masked max over slices of score k (the max of the slice
    probabilities, in logit space). ``attention`` is the share of the K labels whose max each slice wins (padding
    never wins; it sums to 1 over valid slices). Labels that are not "any slice" properties (negative,
    indeterminate, RV/LV) are max-pooled too: that is the hypothesis under test.

    ``x`` (B, L, in_dim), ``valid`` (B, L) -> :class:`Stage2Output`."""

    def __init__(
        self,
        *,
        in_dim: int,
        hidden: int = 512,
        num_exam_labels: int = NUM_EXAM_LABELS,
        embed_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        heads = (2 * hidden + 1) * (1 + num_exam_labels)
        super().__init__(in_dim=in_dim, hidden=hidden, num_exam_labels=num_exam_labels, embed_dim=embed_dim,
                         dropout=dropout, other_params=heads)  # fmt: skip
        self.num_exam_labels = num_exam_labels
        self.instance_head = nn.Linear(2 * hidden, 1 + num_exam_labels)

    def forward(self, x: Tensor, valid: Tensor) -> Stage2Output:
        valid = valid.to(torch.bool)
        scores = self.instance_head(self.embed(_zero_padding(x, valid)))  # (B, L, 1 + K)
        exam_scores = scores[..., 1:]
        exam_logits = masked_max_pool(exam_scores, valid)
        winner = exam_scores.masked_fill(~valid[..., None], float("-inf")).argmax(dim=1)  # (B, K)
        share = F.one_hot(winner, num_classes=x.shape[1]).to(x.dtype).mean(dim=1)  # (B, L)
        share = share * valid.any(dim=1, keepdim=True)
        return Stage2Output(slice_logits=scores[..., 0], exam_logits=exam_logits, attention=share)


class EViT(nn.Module):
    """A small E-ViT (MedIA): a pre-norm Transformer over the projected slice features with one class token (for
    the slice labels) and K exam tokens prepended; padding is masked out of every attention.

    Outputs (each a pair of predictors, averaged in probability as the release's evaluation does):

    * exam logits: exam token k -> its own ``Linear(hidden, 1)``; and the slice tokens -> concat(masked max-pool,
      :class:`ReleaseAttention` pool) -> ``Linear(2·hidden, K)``;
    * slice logits: a per-token ``Linear(hidden, 1)``; and the class token -> ``Linear(hidden, seq_len)``.

    ``x`` (B, L, in_dim) with L <= ``seq_len``, ``valid`` (B, L) -> :class:`Stage2Output` with both ``*_parts``."""

    def __init__(
        self,
        *,
        in_dim: int,
        hidden: int = 768,
        num_exam_labels: int = NUM_EXAM_LABELS,
        seq_len: int,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        positional: bool = False,
    ) -> None:
        super().__init__()
        self.num_exam_labels = num_exam_labels
        self.seq_len = seq_len
        self.proj = nn.Linear(in_dim, hidden)
        self.tokens = nn.Parameter(torch.zeros(1, 1 + num_exam_labels, hidden))
        nn.init.trunc_normal_(self.tokens, std=0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, hidden)) if positional else None
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            hidden,
            num_heads,
            dim_feedforward=round(hidden * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(hidden, eps=1e-6), enable_nested_tensor=False
        )
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear's init, one row per exam token
        self.token_exam_weight = nn.Parameter(torch.empty(num_exam_labels, hidden).uniform_(-bound, bound))
        self.token_exam_bias = nn.Parameter(torch.empty(num_exam_labels).uniform_(-bound, bound))
        self.cls_slice_head = nn.Linear(hidden, seq_len)
        self.slice_head = nn.Linear(hidden, 1)
        self.attention = ReleaseAttention(dim=hidden, seq_len=seq_len)
        self.exam_head = nn.Linear(2 * hidden, num_exam_labels)

    def forward(self, x: Tensor, valid: Tensor) -> Stage2Output:
        valid = valid.to(torch.bool)
        b, n, _ = x.shape
        if n > self.seq_len:
            raise ValueError(f"sequence of {n} steps is longer than seq_len {self.seq_len}")
        k = self.num_exam_labels
        h = self.proj(_zero_padding(x, valid))
        if self.pos_embed is not None:
            h = h + self.pos_embed[:, :n]
        h = torch.cat((self.tokens.expand(b, -1, -1), h), dim=1)
        pad = torch.cat((valid.new_zeros(b, 1 + k), ~valid), dim=1)  # True = ignored key
        h = self.encoder(h, src_key_padding_mask=pad)
        cls, exam_tok, slices = h[:, 0], h[:, 1 : 1 + k], h[:, 1 + k :]
        exam_from_tokens = (exam_tok * self.token_exam_weight).sum(-1) + self.token_exam_bias
        att_pool, alpha = self.attention(slices, valid)
        exam_from_slices = self.exam_head(torch.cat((masked_max_pool(slices, valid), att_pool), dim=-1))
        exam_parts = torch.stack((exam_from_tokens, exam_from_slices), dim=1)  # (B, 2, K)
        slice_parts = torch.stack((self.slice_head(slices)[..., 0], self.cls_slice_head(cls)[:, :n]), dim=1)
        return Stage2Output(
            slice_logits=_mean_probability_logit(slice_parts),
            exam_logits=_mean_probability_logit(exam_parts),
            attention=alpha,
            slice_logits_parts=slice_parts,
            exam_logits_parts=exam_parts,
        )


def build_stage2(
    kind: StageKind,
    *,
    in_dim: int,
    hidden: int,
    num_exam_labels: int = NUM_EXAM_LABELS,
    seq_len: int | None = None,
    **kwargs,
) -> nn.Module:
    """One interface for the stage-2 arms: ``"cc"`` (:class:`PENet`), ``"mil_attention"``
    (:class:`GatedAttentionMIL`), ``"mil_max"`` (:class:`MaxMIL`), ``"evit"`` (:class:`EViT`). Every model maps
    ``(x (B, L, in_dim), valid (B, L))`` to :class:`Stage2Output`. ``seq_len`` (the fitted length L) is needed by
    ``"cc"`` with the release's attention and by ``"evit"``; the MIL models ignore it. Other keywords go to the
    model's constructor."""
    common = dict(in_dim=in_dim, hidden=hidden, num_exam_labels=num_exam_labels)
    if kind == "cc":
        return PENet(**common, seq_len=seq_len, **kwargs)
    if kind == "mil_attention":
        return GatedAttentionMIL(**common, **kwargs)
    if kind == "mil_max":
        return MaxMIL(**common, **kwargs)
    if kind == "evit":
        if seq_len is None:
            raise ValueError("kind='evit' needs seq_len")
        return EViT(**common, seq_len=seq_len, **kwargs)
    raise ValueError(f"unknown stage-2 kind {kind!r}; expected 'cc', 'mil_attention', 'mil_max' or 'evit'")


def build_stage2_optimizer(
    model: nn.Module, *, lr: float = 5e-4, step_size: int = 1, gamma: float = 0.8
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.StepLR]:
    """The release's stage-2 optimiser: Adam(lr 5e-4) with ``StepLR(step_size=1, gamma=0.8)``, the scheduler stepped
    once per epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
