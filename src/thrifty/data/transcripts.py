"""Transcript normalisation shared by the speech data sources (synthetic corpus, LibriSpeech, user manifests).

Every transcript is reduced to one alphabet, :data:`TRANSCRIPT_CHARS` (space, apostrophe and a–z), by
:func:`normalize_transcript`, so word error rates are computed on one convention whichever source the text came from.
Recipes build their output vocabularies on this alphabet (e.g. ``thrifty.methods.bigssl.tokens``).
"""

from __future__ import annotations

import re
import unicodedata

TRANSCRIPT_CHARS = " '" + "abcdefghijklmnopqrstuvwxyz"
"""Every character a normalised transcript may contain."""

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
