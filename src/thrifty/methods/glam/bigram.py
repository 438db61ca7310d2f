"""The trivial baseline of the GLaM recipe: an interpolated Kneser-Ney bigram over the same BPE tokens.

A language model that cannot beat a smoothed bigram has not learnt anything a count table would not
give. The recipe's "works" claim is that the MoE LM's held-out test loss is below this bigram's on
the *same* target tokens (the evaluation windows of :func:`thrifty.methods.glam.train.evaluate`, each
target predicted from the token before it) by a stated margin.

Smoothing is interpolated Kneser-Ney (Chen & Goodman 1998, one discount)::

    P(w | v) = max(c(v,w) - D, 0) / c(v) + D · N1+(v·) / c(v) · P_cont(w)      if c(v) > 0
    P(w | v) = P_cont(w)                                                      otherwise
    P_cont(w) = (N1+(·w) + 1) / (N1+(··) + V)     (continuation counts, add-one so no token has P = 0)

Counts come from the training streams of every source pooled (raw token counts, not reweighted to
the mixture; at most :data:`MAX_TOKENS_PER_STREAM` leading tokens of each); the discount ``D`` is chosen
on the validation windows from a small grid. The table is sparse (sorted pair codes), so memory grows
with the distinct pairs seen, not with ``V²``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

DISCOUNTS: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0)
# Counts come from at most this many leading tokens of each training stream, so the baseline stays a few
# seconds and a few GB at paper scale (billions of tokens); the shipped corpora (< 1.3M each) are whole.
MAX_TOKENS_PER_STREAM = 20_000_000


@dataclasses.dataclass(frozen=True)
class KneserNeyBigram:
    """Sparse bigram counts and the statistics interpolated Kneser-Ney needs.

    Attributes:
        vocab_size: ``V``.
        pair_codes: sorted ``v·V + w`` of every pair seen in training, ``[P]`` int64.
        pair_counts: ``c(v, w)`` aligned with ``pair_codes``, ``[P]`` float64.
        context_counts: ``c(v)`` (as a left context), ``[V]``.
        context_types: ``N1+(v·)``, distinct successors of ``v``, ``[V]``.
        continuation: ``P_cont(w)``, ``[V]``.
        discount: ``D``.
    """

    vocab_size: int
    pair_codes: np.ndarray
    pair_counts: np.ndarray
    context_counts: np.ndarray
    context_types: np.ndarray
    continuation: np.ndarray
    discount: float = 0.75

    @classmethod
    def fit(cls, streams: Sequence[np.ndarray], *, vocab_size: int, discount: float = 0.75) -> KneserNeyBigram:
        """Count the adjacent pairs of each 1-D token stream (pairs never cross streams)."""
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], not {discount}")
        streams = [np.asarray(s) for s in streams if len(s) > 1]
        if not streams:
            raise ValueError("KneserNeyBigram.fit needs at least one stream of two or more tokens")
        # checked per token: a pair code in [0, V²) can still hide an id out of range, e.g. (0, V) -> (1, 0)
        if any(s.min() < 0 or s.max() >= vocab_size for s in streams):
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        flat = np.concatenate([s[:-1].astype(np.int64) * vocab_size + s[1:].astype(np.int64) for s in streams])
        pair_codes, counts = np.unique(flat, return_counts=True)
        left, right = pair_codes // vocab_size, pair_codes % vocab_size
        context_counts = np.bincount(left, weights=counts, minlength=vocab_size)
        context_types = np.bincount(left, minlength=vocab_size).astype(np.float64)
        cont_types = np.bincount(right, minlength=vocab_size).astype(np.float64)
        continuation = (cont_types + 1.0) / (len(pair_codes) + vocab_size)
        return cls(
            vocab_size=vocab_size,
            pair_codes=pair_codes,
            pair_counts=counts.astype(np.float64),
            context_counts=context_counts,
            context_types=context_types,
            continuation=continuation,
            discount=discount,
        )

    def with_discount(self, discount: float) -> KneserNeyBigram:
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], not {discount}")
        return dataclasses.replace(self, discount=discount)

    def log_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """``log P(nxt | prev)`` elementwise (natural log); any shape, same for both arguments."""
        prev = np.asarray(prev, dtype=np.int64)
        nxt = np.asarray(nxt, dtype=np.int64)
        V = self.vocab_size
        if prev.shape != nxt.shape:
            raise ValueError(f"prev {prev.shape} and nxt {nxt.shape} must have the same shape")
        if prev.size and (min(prev.min(), nxt.min()) < 0 or max(prev.max(), nxt.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V})")
        code = prev * V + nxt
        at = np.searchsorted(self.pair_codes, code).clip(max=max(len(self.pair_codes) - 1, 0))
        c_pair = np.where(self.pair_codes[at] == code, self.pair_counts[at], 0.0)
        c_ctx = self.context_counts[prev]
        p_cont = self.continuation[nxt]
        seen = c_ctx > 0
        safe = np.where(seen, c_ctx, 1.0)
        backoff = self.discount * self.context_types[prev] / safe  # the mass taken from seen pairs
        interp = np.maximum(c_pair - self.discount, 0.0) / safe + backoff * p_cont
        return np.log(np.where(seen, interp, p_cont))

    def window_loss(self, windows: np.ndarray) -> tuple[float, int]:
        """Summed NLL (nats) and count of the targets ``windows[:, 1:]`` of ``[n, T+1]`` windows."""
        if windows.size == 0:
            return 0.0, 0
        lp = self.log_prob(windows[:, :-1], windows[:, 1:])
        return float(-lp.sum()), int(lp.size)


def mixture_loss(
    bigram: KneserNeyBigram, windows: Mapping[str, np.ndarray], weights: Mapping[str, float]
) -> dict[str, float]:
    """Mean target NLL per source and mixture-weighted ``overall`` (the LM evaluation's weighting)."""
    out: dict[str, float] = {}
    for source, w in windows.items():
        total, n = bigram.window_loss(w)
        out[source] = total / n if n else math.nan
    out["overall"] = mixture_mean(out, weights)
    return out


def mixture_mean(per_source: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Mixture-weighted mean over the sources with a finite value (weights renormalised over them)."""
    present = {s: w for s, w in weights.items() if math.isfinite(per_source.get(s, math.nan))}
    if not present:  # nothing measured: not a loss of 0
        return math.nan
    return sum(per_source[s] * w for s, w in present.items()) / max(sum(present.values()), 1e-12)


def fit_on_validation(
    train_streams: Sequence[np.ndarray],
    val_windows: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    *,
    vocab_size: int,
    discounts: Sequence[float] = DISCOUNTS,
    max_tokens_per_stream: int = MAX_TOKENS_PER_STREAM,
) -> tuple[KneserNeyBigram, dict[float, float]]:
    """Fit the counts once (on each stream's first ``max_tokens_per_stream`` tokens) and keep the discount
    with the lowest mixture validation loss.

    Returns:
        The chosen model and the validation loss of every discount tried.
    """
    base = KneserNeyBigram.fit([s[:max_tokens_per_stream] for s in train_streams], vocab_size=vocab_size)
    tried = {d: mixture_loss(base.with_discount(d), val_windows, weights)["overall"] for d in discounts}
    best = min(tried, key=lambda d: tried[d])
    return base.with_discount(best), tried
