"""Self-supervised objectives of the BigSSL recipe: wav2vec 2.0 and w2v-BERT pieces.

* wav2vec 2.0 (Baevski et al., arXiv 2006.11477): span masking of the subsampled features
  (:func:`span_mask`, :func:`apply_mask`), a Gumbel product quantizer that turns the **unmasked** features into
  targets (:class:`GumbelProductQuantizer`), negatives drawn from the other masked frames of the same utterance
  (:func:`sample_negatives`), the cosine/κ contrastive loss (:func:`contrastive_loss`), the codebook diversity loss
  (:func:`perplexity`, :func:`diversity_loss`) and their sum ``L = L_m + 0.1·L_d`` (:func:`wav2vec2_loss`).
* w2v-BERT (Chung et al., arXiv 2108.06209): masked frames are replaced by random vectors
  (:func:`random_vectors_like`) and an MLM head predicts the quantizer's token ids at masked frames, one softmax per
  codebook group (:class:`MLMHead`, :func:`mlm_loss`, targets from :meth:`GumbelProductQuantizer.codes_for`).
* Codebook health (the collapse pitfall): :func:`codebook_alarm` and :class:`CodebookMonitor`.

Conventions (the encoder gives ``features (B, T, D)`` after 4× subsampling and ``valid (B, T)`` bool, True = real
frame, padding on the right):

* ``mask_prob`` is the wav2vec 2.0 paper's **per-frame start probability** p: an utterance of L valid frames gets
  ``int(p·L + u)`` span starts, u ~ U[0, 1) (probabilistic rounding), at least ``min_spans`` and never more than
  fit. With p = 0.065 and span 10 about ``1 − (1 − p)^10 ≈ 49%`` of the frames are masked. fairseq's and Hugging
  Face's ``mask_prob`` is a fraction of spans instead (``p_frac·L/span`` starts): fairseq's 0.65 equals p = 0.065
  here, Hugging Face's default ``mask_time_prob=0.05`` equals p = 0.005.
* Negatives never include the positive's own frame. When an utterance has a single masked frame, its negatives are
  the frame itself (visible in the returned indices). :func:`contrastive_loss` gives a negative identical to the
  positive a logit of −inf, so such a frame adds 0 to the loss. :func:`span_mask` with ``min_spans ≥ 2`` never
  produces one for L ≥ 2 (an utterance gets at least ``min(max(span, 2), L)`` masked frames).
* An utterance shorter than the span is masked entirely (span clipped to L, one start).
* The quantizer, the softmaxes and all losses run in fp32, with autocast disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CodebookMonitor",
    "ContrastiveOutput",
    "GumbelProductQuantizer",
    "MLMHead",
    "QuantizerOutput",
    "apply_mask",
    "codebook_alarm",
    "contrastive_loss",
    "diversity_loss",
    "gumbel_temperature",
    "mlm_loss",
    "perplexity",
    "random_vectors_like",
    "sample_negatives",
    "sample_span_starts",
    "span_mask",
    "temperature_schedule",
    "wav2vec2_loss",
]

_GUMBEL_EPS = 1e-6  # uniform noise is clamped to [eps, 1 − eps] so −log(−log u) stays finite
_LOG_FLOOR = 1e-12  # p·log(p) is evaluated as p·log(max(p, floor)): 0 at p = 0, finite gradient


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Random draws happen on the generator's device (a seeded CPU generator gives the same draws everywhere)."""
    return generator.device if generator is not None else fallback


# ----------------------------------------------------------------------------------------------------------------
# masking
# ----------------------------------------------------------------------------------------------------------------


def sample_span_starts(
    lengths: Tensor | list[int],
    *,
    mask_prob: float,
    span: int = 10,
    min_spans: int = 2,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Span starts per utterance, the random part of :func:`span_mask`.

    Args:
        lengths: ``(B,)`` valid lengths L.
        mask_prob: per-frame start probability p (see the module docstring).
        span: span length in frames. An utterance shorter than ``span`` uses a span of L (one start at 0).
        min_spans: the least number of starts, capped by the ``L − span + 1`` positions that fit.
        generator: optional RNG; draws happen on its device.

    Returns:
        ``B`` long tensors (on the draw device) of distinct, unsorted starts in ``[0, L − span]``; empty when L = 0.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if span < 1 or min_spans < 0:
        raise ValueError(f"span must be ≥ 1 and min_spans ≥ 0, got span={span}, min_spans={min_spans}")
    lens = [int(v) for v in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    device = _draw_device(generator, torch.device("cpu"))
    u = torch.rand(len(lens), generator=generator, device=device).tolist()
    starts: list[Tensor] = []
    for length, ub in zip(lens, u):
        if length <= 0:
            starts.append(torch.zeros(0, dtype=torch.long, device=device))
            continue
        positions = length - min(span, length) + 1
        n = int(mask_prob * length + ub)
        n = min(max(n, min_spans), positions)
        starts.append(torch.randperm(positions, generator=generator, device=device)[:n])
    return starts


def span_mask(
    valid: Tensor,
    *,
    mask_prob: float,
    span: int = 10,
    min_spans: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """wav2vec 2.0 time mask: spans of ``span`` frames from starts drawn without replacement; spans may overlap.

    Per utterance of L = ``valid[b].sum()`` frames, ``int(p·L + u)`` starts (u ~ U[0, 1)), at least ``min_spans`` and
    at most ``L − span + 1``, are drawn uniformly without replacement from ``[0, L − span]``; each masks
    ``[start, start + span)``. For long utterances the expected masked fraction is ``1 − (1 − p)^span``. Valid
    frames are assumed to be a prefix (right padding); the result is also and-ed with ``valid``.

    Args:
        valid: ``(B, T)`` bool, True = real frame.
        mask_prob: per-frame start probability p (0.065 in the wav2vec 2.0 paper).
        span: span length M in frames (10).
        min_spans: least number of starts per utterance (2).
        generator: optional RNG (draws on its device, so a seeded CPU generator is reproducible).

    Returns:
        ``(B, T)`` bool on ``valid.device``, True = masked.
    """
    if valid.dim() != 2:
        raise ValueError(f"valid must be (B, T), got shape {tuple(valid.shape)}")
    valid = valid.bool()
    B, T = valid.shape
    lengths = valid.sum(dim=1)
    starts = sample_span_starts(lengths, mask_prob=mask_prob, span=span, min_spans=min_spans, generator=generator)
    mask = torch.zeros(B, T, dtype=torch.bool)
    offsets = torch.arange(span)
    for b, s in enumerate(starts):
        if s.numel() == 0:
            continue
        length = int(lengths[b])
        idx = (s.cpu()[:, None] + offsets[None, : min(span, length)]).flatten()
        mask[b, idx] = True
    return mask.to(valid.device) & valid


def random_vectors_like(x: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """w2v-BERT input masking: masked frames become N(0, 1) random vectors.

    Args:
        x: ``(B, T, D)`` features.
        mask: ``(B, T)`` bool, True = masked.
        generator: optional RNG (draws on its device).

    Returns:
        ``(B, T, D)``, ``x`` at unmasked frames, a fresh N(0, 1) vector at each masked frame.
    """
    noise = torch.randn(x.shape, generator=generator, device=_draw_device(generator, x.device))
    return torch.where(mask.bool().unsqueeze(-1), noise.to(device=x.device, dtype=x.dtype), x)


def apply_mask(
    x: Tensor,
    mask: Tensor,
    *,
    mask_embedding: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Replace masked frames by ``mask_embedding`` (wav2vec 2.0, learned) or by random vectors (w2v-BERT) if None.

    Args:
        x: ``(B, T, D)``.
        mask: ``(B, T)`` bool, True = masked.
        mask_embedding: ``(D,)`` learned vector; gradients reach it through the masked frames.
        generator: RNG for the random vectors (unused with ``mask_embedding``).

    Returns:
        ``(B, T, D)``.
    """
    if mask_embedding is None:
        return random_vectors_like(x, mask, generator)
    if mask_embedding.shape != x.shape[-1:]:
        raise ValueError(f"mask_embedding must have shape ({x.shape[-1]},), got {tuple(mask_embedding.shape)}")
    return torch.where(mask.bool().unsqueeze(-1), mask_embedding.to(x.dtype), x)


# ----------------------------------------------------------------------------------------------------------------
# quantizer and codebook statistics
# ----------------------------------------------------------------------------------------------------------------


def perplexity(probs: Tensor) -> Tensor:
    """Summed per-group perplexity ``Σ_g exp(H(p̄_g))`` of code assignments averaged over N frames.

    Args:
        probs: ``(N, G, V)`` assignment probabilities (soft softmax probabilities or one-hot codes).

    Returns:
        Scalar fp32 tensor in ``[G, G·V]``: ``G·V`` for uniform use of every code, ``G`` when each group collapses to
        one code (1 for G = 1). N = 0 gives ``G`` (nothing used).
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be (N, G, V), got shape {tuple(probs.shape)}")
    p = probs.float()
    avg = p.sum(dim=0) / max(p.shape[0], 1)  # (G, V)
    entropy = -(avg * avg.clamp_min(_LOG_FLOOR).log()).sum(dim=-1)  # (G,)
    return entropy.exp().sum()


def diversity_loss(perplexity: Tensor, *, groups: int, codes: int) -> Tensor:
    """wav2vec 2.0 diversity loss ``L_d = (G·V − PPL) / (G·V)``: 0 at uniform code use, about 1 at collapse."""
    total = groups * codes
    return (total - perplexity) / total


def gumbel_temperature(step: int, *, start: float = 2.0, end: float = 0.5, decay: float = 0.999995) -> float:
    """fairseq's Gumbel temperature ``max(start · decay^step, end)``.

    With the paper's values (2 → 0.5, decay 0.999995) the floor is reached after about 277k updates, so the
    schedule suits full-scale runs; miniature budgets should use :func:`temperature_schedule`.
    """
    return max(start * decay**step, end)


def temperature_schedule(step: int, max_steps: int, *, start: float = 2.0, end: float = 0.5) -> float:
    """Geometric decay from ``start`` at step 0 to exactly ``end`` at ``max_steps`` (held afterwards).

    ``start · (end/start)^(min(step, max_steps)/max_steps)``: the same exponential shape as
    :func:`gumbel_temperature`, with the decay rate chosen so the floor is reached within a miniature budget.
    """
    if max_steps <= 0:
        return end
    frac = min(max(step, 0), max_steps) / max_steps
    return start * (end / start) ** frac


@dataclass
class QuantizerOutput:
    """Output of :class:`GumbelProductQuantizer`.

    Attributes:
        quantized: ``(B, T, dim_out)`` concatenation over groups of the selected codebook entries.
        ids: ``(B, T, G)`` long, the selected code per group (Gumbel-selected in training, argmax in eval).
        perplexity: scalar, ``Σ_g exp(H(p̄_g))`` over the soft (noise-free) softmax of the valid frames;
            differentiable.
        hard_perplexity: scalar, the same on the one-hot selected codes (detached).
        used_fraction: scalar, share of the ``G·V`` codes selected at least once among the valid frames (detached).
        diversity_loss: scalar, ``(G·V − perplexity) / (G·V)``; differentiable.
    """

    quantized: Tensor
    ids: Tensor
    perplexity: Tensor
    hard_perplexity: Tensor
    used_fraction: Tensor
    diversity_loss: Tensor


class GumbelProductQuantizer(nn.Module):
    """wav2vec 2.0 product quantizer: G codebooks of V entries, each ``dim_out / G`` wide, chosen by Gumbel softmax.

    A Linear maps features to ``G·V`` logits. In training the choice is a hard Gumbel softmax with a
    straight-through gradient (the forward uses the one-hot code, the backward the soft Gumbel probabilities); in
    eval it is the argmax of the logits. The module always computes in fp32 (autocast is disabled inside, the input
    is cast to float) and clamps the uniform noise, the Gumbel-NaN pitfall. Initialisation follows fairseq:
    projection weights N(0, 1), bias 0, codebook U[0, 1).
    """

    def __init__(self, *, dim_in: int, groups: int = 2, codes: int = 320, dim_out: int = 256) -> None:
        super().__init__()
        if dim_out % groups:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by groups ({groups})")
        self.groups = groups
        self.codes = codes
        self.dim_out = dim_out
        self.proj = nn.Linear(dim_in, groups * codes)
        self.codebook = nn.Parameter(torch.empty(groups, codes, dim_out // groups))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.proj.bias)
        nn.init.uniform_(self.codebook)

    def _logits(self, x: Tensor) -> Tensor:
        """``(B, T, dim_in)`` → ``(B, T, G, V)`` fp32 logits."""
        w = self.proj.weight.float()
        b = self.proj.bias.float()
        return F.linear(x.float(), w, b).unflatten(-1, (self.groups, self.codes))

    @torch.no_grad()
    def codes_for(self, x: Tensor) -> Tensor:
        """Argmax code ids ``(B, T, G)`` long of ``x (B, T, dim_in)``, without gradients or noise.

        These are the w2v-BERT MLM targets; they equal ``forward(...).ids`` in eval mode.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._logits(x).argmax(dim=-1)

    def forward(
        self,
        x: Tensor,
        valid: Tensor | None = None,
        *,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> QuantizerOutput:
        """Quantize ``x``.

        Args:
            x: ``(B, T, dim_in)`` features (the **unmasked** encoder features in wav2vec 2.0).
            valid: ``(B, T)`` bool frames that enter the statistics (perplexity, code use); None = all.
                Every frame is quantized regardless.
            temperature: Gumbel softmax temperature τ (training only).
            generator: optional RNG for the Gumbel noise (draws on its device).

        Returns:
            :class:`QuantizerOutput`.
        """
        B, T, _ = x.shape
        G, V = self.groups, self.codes
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        valid = valid.bool()
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self._logits(x)  # (B, T, G, V)
            soft = logits.softmax(dim=-1)
            ppl = perplexity(soft[valid])
            if self.training:
                if temperature <= 0:
                    raise ValueError(f"temperature must be > 0, got {temperature}")
                u = torch.rand(logits.shape, generator=generator, device=_draw_device(generator, logits.device))
                u = u.to(logits.device).clamp_(_GUMBEL_EPS, 1.0 - _GUMBEL_EPS)
                gumbel = -torch.log(-torch.log(u))
                y_soft = ((logits + gumbel) / temperature).softmax(dim=-1)
                ids = y_soft.argmax(dim=-1)
                y_hard = F.one_hot(ids, V).to(y_soft.dtype)
                onehot = y_hard - y_soft.detach() + y_soft  # straight-through
            else:
                ids = logits.argmax(dim=-1)
                y_hard = F.one_hot(ids, V).to(logits.dtype)
                onehot = y_hard
            quantized = torch.einsum("btgv,gvd->btgd", onehot, self.codebook.float()).reshape(B, T, self.dim_out)
            with torch.no_grad():
                hard = y_hard[valid]  # (N, G, V)
                hard_ppl = perplexity(hard)
                used = (hard.sum(dim=0) > 0).float().mean()
        return QuantizerOutput(
            quantized=quantized,
            ids=ids,
            perplexity=ppl,
            hard_perplexity=hard_ppl.detach(),
            used_fraction=used.detach(),
            diversity_loss=diversity_loss(ppl, groups=G, codes=V),
        )


# ----------------------------------------------------------------------------------------------------------------
# contrastive loss
# ----------------------------------------------------------------------------------------------------------------


def sample_negatives(
    targets: Tensor,
    mask: Tensor,
    *,
    num_negatives: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw K distractors per masked frame from the **other** masked frames of the same utterance.

    With M masked frames in an utterance, each masked frame gets K negatives drawn uniformly from the M − 1 others:
    without replacement when ``M − 1 ≥ K``, with replacement otherwise (fairseq and Hugging Face always draw with
    replacement). A frame's own index is never drawn, except when M = 1: then its K negatives are the frame itself,
    which :func:`contrastive_loss` neutralises (identical negatives get logit −inf) and callers can detect with
    ``indices == arange(T)``. Unmasked frames get index 0 and zero vectors.

    Args:
        targets: ``(B, T, D)`` candidate vectors (the quantized targets).
        mask: ``(B, T)`` bool, True = masked.
        num_negatives: K.
        generator: optional RNG (draws on its device).

    Returns:
        ``negatives (B, T, K, D)`` (``targets``' dtype, gradients flow to the drawn targets) and
        ``indices (B, T, K)`` long, the time index of each negative within its utterance.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be ≥ 1, got {num_negatives}")
    B, T, D = targets.shape
    K = num_negatives
    mask = mask.bool()
    draw = _draw_device(generator, targets.device)
    indices = torch.zeros(B, T, K, dtype=torch.long, device=targets.device)
    for b in range(B):
        pos = mask[b].nonzero().squeeze(1)  # (M,)
        M = pos.numel()
        if M == 0:
            continue
        if M == 1:
            choice = torch.zeros(1, K, dtype=torch.long, device=draw)
        elif M - 1 >= K:
            keys = torch.rand(M, M, generator=generator, device=draw)
            keys.fill_diagonal_(2.0)  # the frame itself sorts last, never among the K smallest
            choice = keys.topk(K, dim=1, largest=False).indices  # a random K-subset of the others, random order
        else:
            choice = torch.randint(0, M - 1, (M, K), generator=generator, device=draw)
            choice = choice + (choice >= torch.arange(M, device=draw)[:, None]).long()  # skip the frame itself
        indices[b, pos] = pos[choice.to(pos.device)]
    negatives = targets[torch.arange(B, device=targets.device)[:, None, None], indices]  # (B, T, K, D)
    negatives = negatives * mask[:, :, None, None].to(negatives.dtype)
    return negatives, indices


@dataclass
class ContrastiveOutput:
    """Output of :func:`contrastive_loss`.

    Attributes:
        loss_sum: scalar fp32, cross-entropy summed over the masked frames.
        count: scalar long, number of masked frames (the sample size).
        accuracy: scalar fp32, share of masked frames whose positive is strictly more similar than every negative.
        correct: scalar long, number of such frames (for aggregation across batches or ranks).
    """

    loss_sum: Tensor
    count: Tensor
    accuracy: Tensor
    correct: Tensor


def contrastive_loss(
    context: Tensor,
    targets: Tensor,
    negatives: Tensor,
    mask: Tensor,
    *,
    kappa: float = 0.1,
) -> ContrastiveOutput:
    """wav2vec 2.0 contrastive loss L_m, in fp32.

    For each masked frame t the logits are ``cos(c_t, q) / κ`` over ``[q_t, negatives...]`` and the loss is the
    cross-entropy with the positive as class 0, summed over masked frames. As in fairseq and Hugging Face, a
    negative equal to the positive in every element gets logit −inf, so it is never pushed away.

    Args:
        context: ``(B, T, D)`` context-network outputs (projected to the target dimension).
        targets: ``(B, T, D)`` positives (quantized targets).
        negatives: ``(B, T, K, D)`` from :func:`sample_negatives`.
        mask: ``(B, T)`` bool, True = masked (the frames scored).
        kappa: temperature κ.

    Returns:
        :class:`ContrastiveOutput`.
    """
    mask = mask.bool()
    with torch.autocast(device_type=context.device.type, enabled=False):
        c = context[mask].float()  # (N, D)
        pos = targets[mask].float()  # (N, D)
        neg = negatives[mask].float()  # (N, K, D)
        candidates = torch.cat([pos.unsqueeze(1), neg], dim=1)  # (N, K + 1, D)
        logits = F.cosine_similarity(c.unsqueeze(1), candidates, dim=-1) / kappa  # (N, K + 1)
        same = (neg == pos.unsqueeze(1)).all(dim=-1)  # (N, K)
        neg_logits = logits[:, 1:].masked_fill(same, float("-inf"))
        logits = torch.cat([logits[:, :1], neg_logits], dim=1)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        count = mask.sum()
        correct = (logits[:, 0] > neg_logits.max(dim=1).values).sum() if logits.shape[0] else count.new_zeros(())
    accuracy = correct.float() / count.clamp_min(1).float()
    return ContrastiveOutput(loss_sum=loss_sum, count=count, accuracy=accuracy.detach(), correct=correct.detach())


def wav2vec2_loss(contrastive: ContrastiveOutput, diversity: Tensor, *, diversity_weight: float = 0.1) -> Tensor:
    """Per-frame wav2vec 2.0 loss ``(L_m,sum + α · L_d · N) / N`` with N masked frames.

    The card's ``L = L_m + 0.1·L_d`` with fairseq's bookkeeping: the diversity term is scaled by the number of masked
    frames (so it weighs like a summed per-frame loss) and the total is normalised by the sample size N. A batch
    without masked frames gives 0.
    """
    count = contrastive.count.clamp_min(1).float()
    return (contrastive.loss_sum + diversity_weight * diversity * contrastive.count.float()) / count


# ----------------------------------------------------------------------------------------------------------------
# w2v-BERT masked prediction
# ----------------------------------------------------------------------------------------------------------------


class MLMHead(nn.Module):
    """w2v-BERT masked-prediction head: one ``Linear(dim → codes)`` per codebook group."""

    def __init__(self, *, dim: int, groups: int, codes: int) -> None:
        super().__init__()
        self.groups = groups
        self.codes = codes
        self.heads = nn.ModuleList(nn.Linear(dim, codes) for _ in range(groups))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, dim)`` → logits ``(B, T, G, V)``."""
        return torch.stack([head(x) for head in self.heads], dim=-2)


def mlm_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """w2v-BERT MLM loss: mean cross-entropy over (masked frame, group) pairs, in fp32.

    Args:
        logits: ``(B, T, G, V)`` from :class:`MLMHead`.
        ids: ``(B, T, G)`` long target code ids (:meth:`GumbelProductQuantizer.codes_for` of the unmasked features).
        mask: ``(B, T)`` bool, True = masked (the frames scored).

    Returns:
        ``loss`` (scalar; 0 without masked frames) and ``accuracy`` (share of the pairs whose argmax equals the id,
        detached).
    """
    mask = mask.bool()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        lg = logits[mask].float().flatten(0, 1)  # (N·G, V)
        tgt = ids[mask].flatten()  # (N·G,)
        if tgt.numel() == 0:
            zero = logits.float().sum() * 0.0
            return zero, zero.detach()
        loss = F.cross_entropy(lg, tgt)
        accuracy = (lg.argmax(dim=-1) == tgt).float().mean()
    return loss, accuracy.detach()


# ----------------------------------------------------------------------------------------------------------------
# codebook health
# ----------------------------------------------------------------------------------------------------------------


def codebook_alarm(perplexity: float, *, groups: int, codes: int, threshold: float = 0.1) -> bool:
    """True when the codebook perplexity is below ``threshold · G · V`` (the collapse alarm of the card)."""
    return float(perplexity) < threshold * groups * codes


class CodebookMonitor:
    """Tracks codebook health across steps: per-step statistics, the alarm, and the codes used since creation.

    Call :meth:`update` with each :class:`QuantizerOutput` (and its ``valid`` mask when the batch has padding).
    """

    def __init__(self, *, groups: int, codes: int, threshold: float = 0.1) -> None:
        self.groups = groups
        self.codes = codes
        self.threshold = threshold
        self.counts = torch.zeros(groups, codes, dtype=torch.long)
        self.steps = 0
        self.alarms = 0

    def update(self, out: QuantizerOutput, valid: Tensor | None = None) -> dict[str, float | bool]:
        """Record one step; returns its ``perplexity``, ``hard_perplexity``, ``used_fraction``, ``diversity_loss``,
        ``cumulative_used_fraction`` and ``alarm``."""
        ids = out.ids if valid is None else out.ids[valid.bool()]
        ids = ids.reshape(-1, self.groups).detach().cpu()
        for g in range(self.groups):
            self.counts[g] += torch.bincount(ids[:, g], minlength=self.codes)
        ppl = float(out.perplexity.detach())
        alarm = codebook_alarm(ppl, groups=self.groups, codes=self.codes, threshold=self.threshold)
        self.steps += 1
        self.alarms += int(alarm)
        return {
            "perplexity": ppl,
            "hard_perplexity": float(out.hard_perplexity),
            "used_fraction": float(out.used_fraction),
            "diversity_loss": float(out.diversity_loss.detach()),
            "cumulative_used_fraction": float((self.counts > 0).float().mean()),
            "alarm": alarm,
        }

    @property
    def max_perplexity(self) -> float:
        """``G · V``, the perplexity of uniform code use."""
        return float(self.groups * self.codes)

    def __repr__(self) -> str:
        used = float((self.counts > 0).float().mean())
        return f"CodebookMonitor(steps={self.steps}, alarms={self.alarms}, cumulative_used={used:.3f})"
