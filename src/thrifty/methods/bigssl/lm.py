"""Character n-gram language model with interpolated Witten-Bell smoothing, for shallow fusion in CTC beam search.

The BigSSL card's noisy-student loop decodes the teacher "fused with an LM" (Park et al., *Improved Noisy Student
Training*, arXiv 2005.09629); our miniature uses a character 5-gram trained on text disjoint from dev and test.

Smoothing is interpolated Witten-Bell (Witten & Bell, 1991; the interpolated form as in Chen & Goodman, *An Empirical
Study of Smoothing Techniques for Language Modeling*, 1998)::

    P(w | h) = (c(h, w) + N1+(h ·) · P(w | h')) / (c(h) + N1+(h ·))

where ``h'`` drops the oldest character of ``h``, ``c(h)`` is the count of the history, ``N1+(h ·)`` the number of
distinct characters seen after it, and the recursion ends in a uniform distribution over the alphabet (the 28
characters of :data:`~thrifty.methods.bigssl.tokens.CHARS` plus the end symbol :data:`END`). Histories never seen in
training back off to the lower order with weight 1, so every distribution sums to one.

Each sentence is padded with ``order - 1`` start symbols (never predicted) and ends with :data:`END`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from thrifty.core.run import atomic_write_text
from thrifty.methods.bigssl.tokens import CHARS

END = "</s>"
ALPHABET: tuple[str, ...] = (*CHARS, END)  # index i < 28 is CHARS[i]; the last index is END
_BOS = "^"  # internal start-of-sentence padding (never in CHARS)
_EOS = "$"  # internal one-character stand-in for END inside n-gram keys
_INDEX = {c: i for i, c in enumerate(CHARS)} | {_EOS: len(CHARS), END: len(CHARS)}
_FORMAT = "thrifty.bigssl.char_ngram_lm/1"


class CharNGramLM:
    """Character n-gram LM (interpolated Witten-Bell). ``order`` counts the predicted character: 5 means 4 of history.

    >>> lm = CharNGramLM(order=3).fit(["ab ab", "ba"])
    >>> round(sum(math.exp(lm.log_prob("a", c)) for c in ALPHABET), 9)
    1.0
    """

    def __init__(self, *, order: int = 5) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order
        self._ngrams: Counter[str] = Counter()  # full-order n-grams "<order-1 history chars><target>" -> count
        # per context length k (0..order-1): context string -> {target char: count}
        self._tables: list[dict[str, dict[str, int]]] = [{} for _ in range(order)]
        self._cache: dict[str, np.ndarray] = {}
        self._fitted = False

    # ------------------------------------------------------------------ training
    def fit(self, texts: Iterable[str]) -> CharNGramLM:
        """Count n-grams of already normalised ``texts`` (a–z, space, apostrophe); replaces any previous fit."""
        n = self.order
        pad = _BOS * (n - 1)
        grams: Counter[str] = Counter()
        allowed = set(CHARS)
        for text in texts:
            if not set(text) <= allowed:
                bad = sorted(set(text) - allowed)
                raise ValueError(f"characters {bad!r} are not in the LM alphabet; normalise the text first")
            padded = pad + text + _EOS
            grams.update(padded[i : i + n] for i in range(len(text) + 1))
        self._set_counts(grams)
        return self

    def _set_counts(self, grams: Counter[str]) -> None:
        n = self.order
        self._ngrams = grams
        self._tables = []
        for k in range(n):  # context length k: the last k history characters
            table: dict[str, dict[str, int]] = {}
            for gram, count in grams.items():
                ctx, w = gram[n - 1 - k : n - 1], gram[-1]
                row = table.get(ctx)
                if row is None:
                    table[ctx] = {w: count}
                else:
                    row[w] = row.get(w, 0) + count
            self._tables.append(table)
        self._cache = {}
        self._fitted = True

    # ------------------------------------------------------------------ queries
    def _key(self, history: str) -> str:
        """The last ``order - 1`` characters of ``history``, start-padded."""
        k = self.order - 1
        if k == 0:
            return ""
        return (_BOS * k + history[-k:])[-k:]

    def log_probs(self, history: str) -> np.ndarray:
        """Natural-log distribution over :data:`ALPHABET` after ``history`` (the text so far): shape (29,), cached.

        The returned array is shared with the cache; do not modify it.
        """
        key = self._key(history)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if not self._fitted:
            raise RuntimeError("CharNGramLM is not fitted; call fit() or from_json() first")
        size = len(ALPHABET)
        p = np.full(size, 1.0 / size)
        for k in range(self.order):  # lowest order first: P_k interpolates with P_{k-1}
            row = self._tables[k].get(key[len(key) - k :] if k else "")
            if row is None:  # unseen history: back off entirely (weight 1 on the lower order)
                continue
            counts = np.zeros(size)
            for w, c in row.items():
                counts[_INDEX[w]] = c
            total, distinct = float(sum(row.values())), float(len(row))
            p = (counts + distinct * p) / (total + distinct)
        out = np.log(p)
        out.flags.writeable = False
        self._cache[key] = out
        return out

    def log_prob(self, history: str, char: str) -> float:
        """Natural log of P(``char`` | ``history``); ``char`` is one of :data:`~thrifty.methods.bigssl.tokens.CHARS`
        or :data:`END`. Only the last ``order - 1`` characters of ``history`` matter (start padding is implicit)."""
        try:
            idx = _INDEX[char]
        except KeyError:
            raise ValueError(f"{char!r} is not in the LM alphabet") from None
        return float(self.log_probs(history)[idx])

    def sentence_log_prob(self, text: str) -> float:
        """Natural log-probability of a whole sentence, including the end symbol."""
        total = 0.0
        for i, c in enumerate(text):
            total += self.log_prob(text[:i], c)
        return total + self.log_prob(text, END)

    def perplexity(self, texts: Iterable[str]) -> float:
        """Per-character perplexity (the end symbol counts as a character)."""
        total, count = 0.0, 0
        for text in texts:
            total += self.sentence_log_prob(text)
            count += len(text) + 1
        if count == 0:
            raise ValueError("perplexity of an empty corpus")
        return math.exp(-total / count)

    # ------------------------------------------------------------------ persistence
    def to_json(self, path: str | Path) -> None:
        """Write the order and the full-order n-gram counts as JSON (atomic; lower orders are re-derived on load)."""
        if not self._fitted:
            raise RuntimeError("CharNGramLM is not fitted")
        data = {
            "format": _FORMAT,
            "order": self.order,
            "start": _BOS,
            "end": _EOS,
            "ngrams": dict(sorted(self._ngrams.items())),
        }
        atomic_write_text(Path(path), json.dumps(data, ensure_ascii=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> CharNGramLM:
        """Load a model written by :meth:`to_json`."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a {_FORMAT} file (format={data.get('format')!r})")
        lm = cls(order=int(data["order"]))
        grams = Counter({str(g): int(c) for g, c in data["ngrams"].items()})
        if any(len(g) != lm.order for g in grams):
            raise ValueError(f"{path}: n-gram keys must have length {lm.order}")
        lm._set_counts(grams)
        return lm

    def __repr__(self) -> str:
        return f"CharNGramLM(order={self.order}, ngrams={len(self._ngrams)})"
