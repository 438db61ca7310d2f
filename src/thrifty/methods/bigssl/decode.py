"""CTC decoding for the BigSSL recipe: greedy best-path, prefix beam search with LM shallow fusion, WER/CER.

- Greedy decoding takes the per-frame argmax, collapses repeats and drops blanks (Graves et al., *Connectionist
  Temporal Classification*, ICML 2006).
- Prefix beam search sums the probability of every alignment of a prefix, tracking the log-probability of the prefix
  ending in a blank and in a non-blank separately (Hannun et al., *First-Pass Large Vocabulary Continuous Speech
  Recognition using Bi-Directional Recurrent DNNs*, arXiv 1408.2873). A repeated character is only doubled when a
  blank separates the two.
- Shallow fusion scores a hypothesis ``y`` as ``log p_CTC(y|x) + λ·log p_LM(y) + β·|y|`` (the card's "Scores"; the
  noisy-student teacher is "fused with an LM", Park et al., arXiv 2005.09629). The LM term of a character is added
  when it is appended, and ``λ·log P(</s> | y)`` when the search ends.
- WER and CER come from ``jiwer`` when it is importable, else from a small Levenshtein fallback that counts the same
  way (corpus-level edits / reference units; with empty references, the number of inserted units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from thrifty.methods.bigssl import tokens
from thrifty.methods.bigssl.lm import ALPHABET, CharNGramLM

__all__ = [
    "Hypothesis",
    "beam_search_batch",
    "char_error_rate",
    "ctc_greedy",
    "ctc_prefix_beam_search",
    "greedy_texts",
    "word_error_rate",
]

_NEG_INF = float("-inf")
_END_INDEX = len(ALPHABET) - 1


# ---------------------------------------------------------------------------------------------------- greedy
def ctc_greedy(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best-path decoding: argmax per frame within ``lengths``, collapse repeats, drop blanks.

    ``log_probs``: (B, T, V) (log-)probabilities or logits; ``lengths``: (B,) valid frames. Returns token ids.
    """
    best = log_probs.detach().argmax(dim=-1).cpu()  # (B, T)
    out: list[list[int]] = []
    for b, n in enumerate(lengths.detach().cpu().tolist()):
        path = best[b, : int(n)]
        if path.numel() == 0:
            out.append([])
            continue
        collapsed = torch.unique_consecutive(path)
        out.append([int(i) for i in collapsed.tolist() if i != tokens.BLANK])
    return out


def greedy_texts(log_probs: Tensor, lengths: Tensor) -> list[str]:
    """Greedy transcripts, (B, T, V) + (B,) -> B strings."""
    return [tokens.decode(ids) for ids in ctc_greedy(log_probs, lengths)]


# ---------------------------------------------------------------------------------------------------- beam search
@dataclass
class Hypothesis:
    """One beam-search result. ``score = ctc_log_prob + lm_weight * lm_log_prob + length_bonus * len(text)``;
    ``lm_log_prob`` includes the end symbol (0 without an LM); ``ids`` are the token ids of ``text``."""

    text: str
    score: float
    ctc_log_prob: float
    lm_log_prob: float
    ids: tuple[int, ...] = ()


def _logaddexp(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


def ctc_prefix_beam_search(
    log_probs: np.ndarray | Tensor,
    *,
    beam: int = 8,
    lm: CharNGramLM | None = None,
    lm_weight: float = 0.5,
    length_bonus: float = 1.0,
    prune: float = -12.0,
) -> list[Hypothesis]:
    """CTC prefix beam search with optional character-LM shallow fusion; best hypothesis first.

    ``log_probs``: (T, V) log-softmaxed frame posteriors of one utterance (blank = 0, ids 1.. are
    :data:`~thrifty.methods.bigssl.tokens.CHARS`, so V <= 29). ``beam`` prefixes survive each frame, ranked by the
    fused score ``log p_CTC + lm_weight·log p_LM + length_bonus·|y|`` (``lm_weight`` is ignored without ``lm``).
    Non-blank tokens whose frame log-prob is below ``prune`` are skipped (the blank never is).
    """
    if isinstance(log_probs, Tensor):
        log_probs = log_probs.detach().to(device="cpu", dtype=torch.float64).numpy()
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be (T, V), got shape {lp.shape}")
    num_frames, vocab = lp.shape
    if vocab > tokens.VOCAB_SIZE:
        raise ValueError(f"V={vocab} exceeds the character vocabulary ({tokens.VOCAB_SIZE})")
    if beam < 1:
        raise ValueError("beam must be >= 1")
    weight = lm_weight if lm is not None else 0.0
    blank = tokens.BLANK
    chars = tokens.VOCAB

    # prefix (str) -> [log p(prefix, ends in blank), log p(prefix, ends in non-blank)]
    beams: dict[str, list[float]] = {"": [0.0, _NEG_INF]}
    ids_of: dict[str, tuple[int, ...]] = {"": ()}
    lm_score: dict[str, float] = {"": 0.0}  # cumulative log p_LM of each prefix ever created
    lm_dist: dict[str, list[float]] = {}

    def next_char_scores(prefix: str) -> list[float]:
        dist = lm_dist.get(prefix)
        if dist is None:
            assert lm is not None
            dist = lm.log_probs(prefix).tolist()
            lm_dist[prefix] = dist
        return dist

    def fused(prefix: str, pb: float, pnb: float) -> float:
        return _logaddexp(pb, pnb) + weight * lm_score[prefix] + length_bonus * len(prefix)

    for t in range(num_frames):
        row = lp[t].tolist()
        candidates = [c for c in range(vocab) if c != blank and row[c] >= prune]
        p_blank = row[blank]
        nxt: dict[str, list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            # blank: the prefix is unchanged and now ends in blank
            entry = nxt.setdefault(prefix, [_NEG_INF, _NEG_INF])
            entry[0] = _logaddexp(entry[0], total + p_blank)
            last = ids_of[prefix][-1] if prefix else -1
            for c in candidates:
                p = row[c]
                if c == last:
                    # repeat without a blank collapses into the same prefix ...
                    entry = nxt.setdefault(prefix, [_NEG_INF, _NEG_INF])
                    entry[1] = _logaddexp(entry[1], pnb + p)
                    # ... and a doubled character needs the path to end in blank first
                    extend_from = pb
                else:
                    extend_from = total
                if extend_from == _NEG_INF:
                    continue
                new = prefix + chars[c]
                if new not in lm_score:
                    ids_of[new] = (*ids_of[prefix], c)
                    lm_score[new] = lm_score[prefix] + (next_char_scores(prefix)[c - 1] if lm is not None else 0.0)
                entry = nxt.setdefault(new, [_NEG_INF, _NEG_INF])
                entry[1] = _logaddexp(entry[1], extend_from + p)
        if len(nxt) > beam:
            ranked = sorted(nxt.items(), key=lambda kv: fused(kv[0], kv[1][0], kv[1][1]), reverse=True)
            nxt = dict(ranked[:beam])
        beams = nxt

    out: list[Hypothesis] = []
    for prefix, (pb, pnb) in beams.items():
        ctc = _logaddexp(pb, pnb)
        lm_lp = lm_score[prefix] + next_char_scores(prefix)[_END_INDEX] if lm is not None else 0.0
        score = ctc + weight * lm_lp + length_bonus * len(prefix)
        out.append(Hypothesis(text=prefix, score=score, ctc_log_prob=ctc, lm_log_prob=lm_lp, ids=ids_of[prefix]))
    out.sort(key=lambda h: h.score, reverse=True)
    return out


def beam_search_batch(log_probs: Tensor, lengths: Tensor, **kwargs: object) -> list[Hypothesis]:
    """Best hypothesis per utterance. ``log_probs``: (B, T, V) log-softmaxed; ``lengths``: (B,) valid frames;
    ``kwargs`` go to :func:`ctc_prefix_beam_search`."""
    lp = log_probs.detach().to(device="cpu", dtype=torch.float64).numpy()
    results = []
    for b, n in enumerate(lengths.detach().cpu().tolist()):
        hyps = ctc_prefix_beam_search(lp[b, : int(n)], **kwargs)  # type: ignore[arg-type]
        results.append(hyps[0])
    return results


# ---------------------------------------------------------------------------------------------------- error rates
def _levenshtein(ref: Sequence[str], hyp: Sequence[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _error_rate(refs: Sequence[Sequence[str]], hyps: Sequence[Sequence[str]]) -> float:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = sum(_levenshtein(r, h) for r, h in zip(refs, hyps))
    n_ref = sum(len(r) for r in refs)
    if n_ref == 0:  # jiwer's convention: the number of inserted units
        return float(sum(len(h) for h in hyps))
    return edits / n_ref


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def _jiwer(name: str) -> object | None:
    """``jiwer.wer`` / ``jiwer.cer`` when jiwer is installed, else None (the Levenshtein fallback is used)."""
    try:
        import jiwer
    except ImportError:
        return None
    return getattr(jiwer, name)


def word_error_rate(refs: str | Sequence[str], hyps: str | Sequence[str], *, use_jiwer: bool = True) -> float:
    """Corpus-level WER (word edits / reference words). Empty hypotheses count as all-deletions."""
    refs, hyps = _as_list(refs), _as_list(hyps)
    if use_jiwer and (fn := _jiwer("wer")) is not None:
        return float(fn(refs, hyps))
    return _error_rate([r.split() for r in refs], [h.split() for h in hyps])


def char_error_rate(refs: str | Sequence[str], hyps: str | Sequence[str], *, use_jiwer: bool = True) -> float:
    """Corpus-level CER (character edits, spaces included, after stripping the ends / reference characters)."""
    refs, hyps = _as_list(refs), _as_list(hyps)
    if use_jiwer and (fn := _jiwer("cer")) is not None:
        return float(fn(refs, hyps))
    return _error_rate([list(r.strip()) for r in refs], [list(h.strip()) for h in hyps])
