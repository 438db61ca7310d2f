"""The character vocabulary of the BigSSL recipe: CTC blank, space, apostrophe and a–z (the card's output units).

Transcripts are normalised to that alphabet first (:func:`normalize_transcript`), the same way for the synthetic
corpus, LibriSpeech's upper-case transcripts and user manifests, so WER is computed on one convention.
"""

from __future__ import annotations

import re
import unicodedata

BLANK = 0
CHARS = " '" + "abcdefghijklmnopqrstuvwxyz"
VOCAB = ("<blank>", *CHARS)  # id 0 is the CTC blank; ids 1.. are the characters
VOCAB_SIZE = len(VOCAB)
_ID = {c: i + 1 for i, c in enumerate(CHARS)}
_DROP = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r"\s+")


def normalize_transcript(text: str) -> str:
    """Lower-case, strip accents, keep a–z, apostrophe and single spaces (other characters become spaces).

    >>> normalize_transcript("O Romeo, Romeo! Wherefore art thou—Romeo?")
    'o romeo romeo wherefore art thou romeo'
    """
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn").lower()
    text = text.replace("`", "'").replace("-", " ")
    text = _DROP.sub(" ", text)
    text = " ".join(w.strip("'") for w in _SPACES.split(text))  # quotes, not apostrophes inside words
    return _SPACES.sub(" ", text).strip()


def encode(text: str) -> list[int]:
    """Token ids of an already normalised transcript; raises on a character outside the vocabulary."""
    try:
        return [_ID[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the vocabulary; normalise the transcript first") from None


def decode(ids: list[int] | tuple[int, ...]) -> str:
    """Characters of token ids (blanks dropped; no CTC collapsing, see ``decode.ctc_greedy``)."""
    return "".join(VOCAB[i] for i in ids if i != BLANK)
