"""The character vocabulary of the BigSSL recipe: CTC blank, space, apostrophe and a–z (the card's output units).

The characters are the transcript alphabet of :mod:`thrifty.data.transcripts`: transcripts are normalised to it first
(:func:`thrifty.data.transcripts.normalize_transcript`), the same way for the synthetic corpus, LibriSpeech's
upper-case transcripts and user manifests, so WER is computed on one convention.
"""

from __future__ import annotations

from thrifty.data.transcripts import TRANSCRIPT_CHARS

BLANK = 0
CHARS = TRANSCRIPT_CHARS
VOCAB = ("<blank>", *CHARS)  # id 0 is the CTC blank; ids 1.. are the characters
VOCAB_SIZE = len(VOCAB)
_ID = {c: i + 1 for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Token ids of an already normalised transcript; raises on a character outside the vocabulary."""
    try:
        return [_ID[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the vocabulary; normalise the transcript first") from None


def decode(ids: list[int] | tuple[int, ...]) -> str:
    """Characters of token ids (blanks dropped; no CTC collapsing, see ``decode.ctc_greedy``)."""
    return "".join(VOCAB[i] for i in ids if i != BLANK)
