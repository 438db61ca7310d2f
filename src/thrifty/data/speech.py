"""Offline synthetic English speech corpus for the BigSSL recipe (espeak-ng and flite, cached WAV + JSONL).

What it models: one of two tasks (``SpeechCorpusSpec.task``), spoken by rule-based synthesisers:

* ``sentences`` — read English sentences (Shakespeare, the King James Bible, Debian ``fortunes``; 5–15 words,
  normalised to a–z, apostrophe and space with :func:`~thrifty.data.transcripts.normalize_transcript`): an open
  vocabulary of tens of thousands of words;
* ``digits`` — connected digit strings as in TIDIGITS (``zero``/``oh``, ``one`` … ``nine``) and short command
  phrases from the Speech Commands vocabulary (``go left four two``), see :func:`digit_phrases`: a closed
  vocabulary of 23 words in which the voices, accents, speaking rates and pitches are the nuisance.

The synthesisers:

* **espeak-ng** (formant synthesis): 8 English accents (``en-us``, ``en-gb``, ``en-gb-scotland``, ...) × ~100
  voice *variants* (``m3``, ``f2``, ``Alex``, ...; each changes formants, pitch contour, breathiness), with
  speaking rate (wpm) and base pitch drawn per utterance;
* **flite** (diphone/cluster-unit voices ``kal16``, ``awb``, ``rms``, ``slt``) as an out-of-domain engine.

Optional corruptions: additive white or pink noise at an exact SNR and synthetic reverberation (an
exponentially decaying noise impulse response with a given RT60).

What it does not model: real speakers, spontaneous or conversational speech, disfluencies, real rooms or
microphones, background talkers, or the acoustic variability of natural speech. A "voice" here is a parameter
set of a synthesiser, so speaker/accent generalisation measured on this corpus (the test_in split has voice
variants unseen in training, test_ood a held-out accent plus another engine) is a proxy, not a claim about
human speech. WER numbers on it are not comparable with LibriSpeech numbers.

Splits (sentences disjoint across all of them, allocated from ``spec.seed``):

* ``unlabelled`` — the self-supervised pool. Its manifest *keeps the transcript* as the hidden truth used to
  measure pseudo-label quality; the recipe must not give it to training.
* ``labelled`` — the supervised pool (label fractions are nested subsets taken by the recipe);
* ``dev`` and ``test_in`` — in-domain accents, voice variants disjoint from training and from each other;
* ``test_ood`` — the held-out accent (any variant) and, when installed, flite voices (every other utterance).

The corpus lives in ``<root>/<spec_hash>/``: ``wav/<split>/<id>.wav`` (16-bit PCM), ``<split>.jsonl`` manifests
and ``complete.json`` (written last). Each utterance is a pure function of (spec, split, index) through its own
seeded RNG, so the output is identical for any number of workers, and a rebuild re-synthesises only missing
files. The cache key is the spec, not the engine versions or which voices are installed: a different espeak-ng build,
or a machine without flite, can give a different corpus under the same hash (``complete.json`` records the
voice inventory that was used).

Measured throughput (espeak-ng 1.51, flite 2.2, 16 kHz, 5–15-word sentences of ~2.9 s, on a 2-core machine
shared with other jobs): 40–85 utterances/s with ``workers=2`` (25 with ``workers=1``), including resampling and
WAV writing; espeak-ng's start-up per call dominates. The default 11,100-utterance corpus (~9 h of audio) takes
2–5 minutes once and is cached afterwards. Collecting the sentences takes ~4 s per process. The ``digits`` task's
utterances are shorter (1.7 s on average): the claim preset's 6,200 of them (3.0 h) took 48.5 s with ``workers=2``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
from scipy import signal

from thrifty.core.run import progress as progress_bar
from thrifty.data.text import SHIPPED, Document
from thrifty.data.transcripts import normalize_transcript

log = logging.getLogger(__name__)

SPLITS = ("unlabelled", "labelled", "dev", "test_in", "test_ood")
TASKS = ("sentences", "digits")
DIGIT_WORDS = ("zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")  # TIDIGITS
COMMAND_VERBS = ("go", "move", "turn", "look")
COMMAND_DIRECTIONS = ("up", "down", "left", "right", "forward", "backward", "on", "off")  # Speech Commands words
ENGLISH_ACCENTS = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
)
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
MANIFEST_FIELDS = (
    "id",
    "path",
    "duration",
    "text",
    "voice",
    "engine",
    "accent",
    "variant",
    "speed",
    "pitch",
    "snr_db",
    "reverb",
    "seed",
    "split",
)
_FORMAT_VERSION = 1  # bump when the generation changes, so old caches are not reused
_TIMEOUT_S = 120


# --- sentences ---------------------------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\n\s*\n")
_BRACKETED = re.compile(r"\[[^\]]*\]")
_SENTENCE_END = re.compile(r"[.!?;:]+")
_UNSPEAKABLE = re.compile(r"[0-9@#$%&*_=<>/\\|{}~^+]")  # digits and symbols have no single spoken form


def _split_sentences(doc: Document) -> list[str]:
    """Raw sentence candidates: paragraphs with line breaks joined, stage directions dropped, split at . ! ? ; :"""
    out = []
    for para in _PARAGRAPH.split(doc.text):
        para = _BRACKETED.sub(" ", para.replace("\n", " "))
        out += [s.strip() for s in _SENTENCE_END.split(para) if s.strip()]
    return out


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _sentences(sources: tuple[str, ...], min_words: int, max_words: int) -> tuple[str, ...]:
    kept: set[str] = set()
    for name in sources:
        n_before = len(kept)
        for doc in SHIPPED[name]():
            for raw in _split_sentences(doc):
                # all-caps lines are titles and speaker names; digits/symbols would need verbalisation
                if _UNSPEAKABLE.search(raw) or not any(c.islower() for c in raw):
                    continue
                s = normalize_transcript(raw)
                if min_words <= len(s.split()) <= max_words:
                    kept.add(s)
        log.debug("source %s: %d new sentences of %d-%d words", name, len(kept) - n_before, min_words, max_words)
    return tuple(sorted(kept, key=lambda s: (_stable_hash(s), s)))


def sentences(
    sources: Sequence[str] = ("shakespeare", "kjv", "fortunes"), *, min_words: int = 5, max_words: int = 15
) -> list[str]:
    """Normalised, de-duplicated sentences of ``min_words``..``max_words`` words from the shipped text corpora.

    Paragraphs are split at ``. ! ? ; :``; bracketed stage directions, all-caps lines (titles, speaker names)
    and sentences with digits or symbols are dropped. The order is a stable hash of the text, so the sources
    interleave and the list is the same on every machine with the same corpora.

    Raises:
        ValueError: an unknown source name or an empty word range.
        CorpusError: a source's package is not installed (the message says how to install it or drop it).
    """
    unknown = [s for s in sources if s not in SHIPPED]
    if unknown:
        raise ValueError(f"unknown text source(s) {unknown}; known sources: {', '.join(SHIPPED)}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}..{max_words}")
    return list(_sentences(tuple(dict.fromkeys(sources)), min_words, max_words))


def digit_phrases(
    count: int, *, min_words: int = 2, max_words: int = 6, seed: int = 0, command_share: float = 0.5
) -> list[str]:
    """``count`` distinct utterance texts of the ``digits`` task, ``min_words``..``max_words`` words each.

    Each text is, with probability ``command_share``, a command phrase (a verb of :data:`COMMAND_VERBS`, a
    direction of :data:`COMMAND_DIRECTIONS`, then the remaining words as digits: ``turn left three oh``), else a
    connected digit string (``four oh seven two``) in the TIDIGITS tradition. Word counts are uniform in the range.
    Texts are drawn in a fixed order from ``seed`` and repeats are skipped, so the first ``k`` texts are the same
    whatever ``count`` is (a longer list extends a shorter one): the corpus takes a prefix, the LM the texts after it.

    Raises:
        ValueError: an empty or too short word range, or more texts requested than the range can hold.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}..{max_words}")
    if command_share > 0 and min_words < 2:
        raise ValueError("command phrases have at least 2 words (verb, direction): set min_words >= 2")
    digits = len(DIGIT_WORDS)
    capacity = sum(digits**n for n in range(min_words, max_words + 1))
    if command_share > 0:
        capacity += sum(
            len(COMMAND_VERBS) * len(COMMAND_DIRECTIONS) * digits ** (n - 2) for n in range(min_words, max_words + 1)
        )
    if count > capacity // 2:  # beyond half the space, rejection sampling slows down and the texts stop looking random
        raise ValueError(
            f"{count} distinct digit phrases of {min_words}-{max_words} words requested; at most {capacity // 2}"
        )
    rng = np.random.default_rng([seed, 0x6469])
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        n = int(rng.integers(min_words, max_words + 1))
        if rng.random() < command_share:
            words = [
                COMMAND_VERBS[rng.integers(len(COMMAND_VERBS))],
                COMMAND_DIRECTIONS[rng.integers(len(COMMAND_DIRECTIONS))],
            ]
            words += [DIGIT_WORDS[i] for i in rng.integers(digits, size=n - 2)]
        else:
            words = [DIGIT_WORDS[i] for i in rng.integers(digits, size=n)]
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def task_texts(
    task: str, count: int, *, sources: Sequence[str], min_words: int, max_words: int, seed: int
) -> list[str]:
    """The first ``count`` texts of a task's fixed order (``sentences`` or ``digits``); the corpus takes a prefix of
    it in its own permutation, so a language model may use any text of the task that no split speaks."""
    if task == "sentences":
        return sentences(sources, min_words=min_words, max_words=max_words)
    if task == "digits":
        return digit_phrases(count, min_words=min_words, max_words=max_words, seed=seed)
    raise ValueError(f"unknown speech task {task!r}; expected one of {list(TASKS)}")


# --- voices and engines ---------------------------------------------------------------------------------------


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(
            f"{binary} is not installed; run `make setup` or `apt-get install {package}` to synthesise speech"
        )
    return path


@dataclasses.dataclass(frozen=True)
class Voice:
    """One synthesiser setting.

    ``name`` is what the engine is given: ``<accent>+<variant>`` (or ``<accent>``) for espeak-ng, a voice name
    such as ``kal16`` for flite. ``speed`` (words per minute) and ``pitch`` (0–99) apply to espeak-ng only.
    """

    engine: Literal["espeak", "flite"]
    name: str
    accent: str
    variant: str = ""
    speed: int = 175
    pitch: int = 50

    def __post_init__(self) -> None:
        if self.engine not in ("espeak", "flite"):
            raise ValueError(f"unknown engine {self.engine!r}; expected 'espeak' or 'flite'")
        if self.engine == "espeak":
            expected = f"{self.accent}+{self.variant}" if self.variant else self.accent
            if self.name != expected:
                raise ValueError(f"espeak voice name {self.name!r} does not match accent+variant {expected!r}")
            if not 0 <= self.pitch <= 99 or not 80 <= self.speed <= 450:
                raise ValueError(f"espeak pitch must be 0-99 and speed 80-450 wpm, got {self.pitch}, {self.speed}")

    @classmethod
    def espeak(cls, accent: str, variant: str = "", *, speed: int = 175, pitch: int = 50) -> Voice:
        """An espeak-ng voice ``accent+variant`` at ``speed`` wpm and base ``pitch``."""
        return cls("espeak", f"{accent}+{variant}" if variant else accent, accent, variant, int(speed), int(pitch))

    @classmethod
    def flite(cls, name: str) -> Voice:
        """A flite voice (``kal16``, ``awb``, ``rms``, ``slt``, ...); its accent is recorded as ``flite``."""
        return cls("flite", name, "flite")

    @property
    def label(self) -> str:
        """``engine:name``, e.g. ``espeak:en-us+m3`` (the manifest's ``voice`` field)."""
        return f"{self.engine}:{self.name}"


def _run_listing(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout + res.stderr  # flite prints its voice list on stdout, some builds on stderr


@functools.lru_cache(maxsize=1)
def espeak_accents() -> list[str]:
    """The English accents of :data:`ENGLISH_ACCENTS` that the installed espeak-ng has, in that order."""
    listing = _run_listing([_require("espeak-ng", "espeak-ng"), "--voices=en"])
    langs = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    return [a for a in ENGLISH_ACCENTS if a in langs]


@functools.lru_cache(maxsize=1)
def espeak_variants() -> list[str]:
    """espeak-ng voice variant names (``m3``, ``f2``, ``Alex``, ...), sorted: the ``!v/<name>`` file column."""
    listing = _run_listing([_require("espeak-ng", "espeak-ng"), "--voices=variant"])
    return sorted({m.group(1) for m in re.finditer(r"!v/(\S+)", listing)})


@functools.lru_cache(maxsize=1)
def flite_voices() -> list[str]:
    """The flite voices of :data:`FLITE_VOICES` that the installed flite has (empty when flite is missing)."""
    if shutil.which("flite") is None:
        return []
    listing = _run_listing(["flite", "-lv"])
    available = set(listing.split(":", 1)[-1].split())
    return [v for v in FLITE_VOICES if v in available]


# --- synthesis ---------------------------------------------------------------------------------------------


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of WAV bytes.

    espeak-ng's ``--stdout`` header declares a huge data length (it does not know the length when streaming);
    libsndfile clamps it to the bytes present, so every sample is read and nothing beyond.
    """
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return x.mean(axis=1), int(sr)


def _resample(x: np.ndarray, source: int, target: int) -> np.ndarray:
    if source == target:
        return x
    g = math.gcd(source, target)
    return signal.resample_poly(x, target // g, source // g).astype(np.float32)  # 22050 -> 16000: 320/441


def synthesize(text: str, voice: Voice, *, sample_rate: int = 16000) -> np.ndarray:
    """Speak ``text`` with ``voice``: float32 mono samples at ``sample_rate`` with peak at most 1.

    Raises:
        ValueError: empty text, or a voice/variant the installed engine does not have.
        RuntimeError: the engine is not installed (says how to install it) or fails (names voice and text).
    """
    if not text.strip():
        raise ValueError(f"nothing to synthesise for voice {voice.label}: empty text")
    if voice.engine == "espeak":
        exe = _require("espeak-ng", "espeak-ng")
        if voice.variant and voice.variant not in espeak_variants():
            raise ValueError(f"voice {voice.label}: espeak-ng has no variant {voice.variant!r}")
        # `--` ends the options, so a text starting with "-" is spoken, not parsed as a flag
        cmd = [exe, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", "--", text]
        res = subprocess.run(cmd, capture_output=True, check=False, timeout=_TIMEOUT_S)
        data = res.stdout
    else:
        exe = _require("flite", "flite")
        if voice.name not in flite_voices() and not Path(voice.name).is_file():
            raise ValueError(f"voice {voice.label}: flite has no voice {voice.name!r} (available: {flite_voices()})")
        with tempfile.TemporaryDirectory(prefix="thrifty-flite-") as tmp:
            out = Path(tmp) / "out.wav"
            res = subprocess.run(
                [exe, "-voice", voice.name, "-t", text, "-o", str(out)],
                capture_output=True,
                check=False,
                timeout=_TIMEOUT_S,
            )
            data = out.read_bytes() if out.is_file() else b""
    if res.returncode != 0 or len(data) <= 44:
        stderr = res.stderr.decode(errors="replace").strip()
        raise RuntimeError(
            f"{voice.engine} failed for voice {voice.label} on text {text!r} (exit {res.returncode}): {stderr}"
        )
    try:
        x, sr = _decode_wav(data)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise RuntimeError(f"{voice.engine} gave unreadable audio for voice {voice.label} on {text!r}: {err}") from None
    x = _resample(x, sr, sample_rate)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1.0:  # resampling can overshoot a full-scale input slightly
        x = x / peak
    return np.ascontiguousarray(x, dtype=np.float32)


# --- corruptions -------------------------------------------------------------------------------------------


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = f[1] if len(f) > 1 else 1.0
    return np.fft.irfft(spec / np.sqrt(f), n)


def add_noise(
    x: np.ndarray, *, snr_db: float, rng: np.random.Generator, color: Literal["white", "pink"] = "white"
) -> np.ndarray:
    """``x`` plus white or pink (1/f) Gaussian noise at exactly ``snr_db`` (mean powers over the whole clip).

    If the sum would exceed full scale it is scaled down as a whole, which keeps the SNR.

    Raises:
        ValueError: a silent input (no SNR is defined) or an unknown colour.
    """
    x = np.asarray(x, dtype=np.float64)
    p_signal = float(np.mean(x**2)) if x.size else 0.0
    if p_signal == 0.0:
        raise ValueError("cannot add noise at an SNR to a silent signal")
    if color == "white":
        noise = rng.standard_normal(x.shape)
    elif color == "pink":
        noise = _pink(x.size, rng).reshape(x.shape)
    else:
        raise ValueError(f"unknown noise colour {color!r}; expected 'white' or 'pink'")
    noise *= math.sqrt(p_signal / (float(np.mean(noise**2)) * 10 ** (snr_db / 10)))
    y = x + noise
    peak = float(np.max(np.abs(y)))
    if peak > 1.0:
        y /= peak
    return y.astype(np.float32)


def add_reverb(x: np.ndarray, *, rt60: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` convolved with a synthetic room response: a direct path plus Gaussian noise decaying 60 dB in ``rt60``.

    The output has the length of ``x`` (the tail past the end is cut) and the peak of ``x`` (at most 1).
    """
    if rt60 <= 0:
        raise ValueError(f"rt60 must be positive, got {rt60}")
    x = np.asarray(x, dtype=np.float64)
    n = max(2, round(rt60 * sample_rate))
    t = np.arange(n) / sample_rate
    ir = rng.standard_normal(n) * 10 ** (-3 * t / rt60)  # amplitude down 60 dB at t = rt60
    ir[0] = 1.0
    y = signal.fftconvolve(x, ir)[: x.size]
    peak_in, peak_out = float(np.max(np.abs(x))), float(np.max(np.abs(y)))
    if peak_out > 0:
        y *= min(peak_in, 1.0) / peak_out
    return y.astype(np.float32)


# --- corpus ------------------------------------------------------------------------------------------------


def _pair(value: Sequence[float], cast: type, name: str) -> tuple[Any, Any]:
    lo, hi = (cast(v) for v in value)
    if lo > hi:
        raise ValueError(f"{name} range [{lo}, {hi}] is empty")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class SpeechCorpusSpec:
    """Everything that determines the corpus (the cache key is :func:`spec_hash` of these fields).

    Ranges are ``(low, high)`` inclusive; lists are accepted and stored as tuples, so a YAML config that
    mirrors these fields hashes the same as the defaults.
    """

    unlabelled: int = 8000
    labelled: int = 2000
    dev: int = 300
    test_in: int = 500
    test_ood: int = 300
    sources: tuple[str, ...] = ("shakespeare", "kjv", "fortunes")
    min_words: int = 5
    max_words: int = 15
    speed: tuple[int, int] = (130, 200)  # words per minute (espeak-ng)
    pitch: tuple[int, int] = (30, 70)  # espeak-ng base pitch, 0-99
    noise_prob: float = 0.0
    snr_db: tuple[float, float] = (10.0, 30.0)
    noise_color: str = "white"
    reverb_prob: float = 0.0
    rt60: tuple[float, float] = (0.2, 0.8)
    held_out_accent: str = "en-gb-scotland"
    use_flite: bool = True
    sample_rate: int = 16000
    seed: int = 0
    task: str = "sentences"

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        for split in SPLITS:
            if int(getattr(self, split)) < 0:
                raise ValueError(f"{split} must be a non-negative utterance count")
            put(split, int(getattr(self, split)))
        put("sources", tuple(str(s) for s in self.sources))
        put("speed", _pair(self.speed, int, "speed"))
        put("pitch", _pair(self.pitch, int, "pitch"))
        put("snr_db", _pair(self.snr_db, float, "snr_db"))
        put("rt60", _pair(self.rt60, float, "rt60"))
        for name in ("noise_prob", "reverb_prob"):
            put(name, float(getattr(self, name)))
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.pitch[0] < 0 or self.pitch[1] > 99:
            raise ValueError(f"pitch range must lie in 0-99, got {self.pitch}")
        if self.noise_color not in ("white", "pink"):
            raise ValueError(f"noise_color must be 'white' or 'pink', got {self.noise_color!r}")
        if self.rt60[0] <= 0:
            raise ValueError(f"rt60 must be positive, got {self.rt60}")

    @property
    def total(self) -> int:
        """Utterances in all splits."""
        return sum(getattr(self, s) for s in SPLITS)


def spec_hash(spec: SpeechCorpusSpec) -> str:
    """12 hex digits of a SHA-256 over the spec's fields (and the generation format version)."""
    fields = dataclasses.asdict(spec)
    if fields["task"] == "sentences":
        del fields["task"]  # the task field came later: sentence corpora keep the hash they were cached under
    payload = json.dumps({"format": _FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class _Job:
    split: str
    index: int
    text: str
    voice: Voice
    snr_db: float | None
    rt60: float | None
    seed: int

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index:05d}"

    @property
    def relpath(self) -> str:
        return f"wav/{self.split}/{self.id}.wav"


def _utterance_seed(seed: int, split: str, index: int) -> int:
    return int(hashlib.sha256(f"{seed}/{split}/{index}".encode()).hexdigest()[:8], 16)


def _voice_pools(spec: SpeechCorpusSpec) -> dict[str, list[tuple[str, str]]]:
    """(engine-or-accent, variant) pools per split: variants partitioned ~70/15/15 into train/dev/test."""
    accents = espeak_accents()
    if spec.held_out_accent not in accents:
        raise ValueError(f"held_out_accent {spec.held_out_accent!r} is not an installed espeak-ng accent: {accents}")
    in_domain = [a for a in accents if a != spec.held_out_accent]
    variants = espeak_variants()
    if len(variants) < 3 or not in_domain:
        raise RuntimeError(f"espeak-ng needs >= 3 variants and 2 accents; found {len(variants)}, {accents}")
    order = np.random.default_rng([spec.seed, 0x766F]).permutation(len(variants))
    shuffled = [variants[i] for i in order]
    k = max(1, round(0.15 * len(variants)))
    parts = {"dev": shuffled[:k], "test": shuffled[k : 2 * k], "train": shuffled[2 * k :]}
    pools = {name: [(a, v) for a in in_domain for v in sorted(vs)] for name, vs in parts.items()}
    return {
        "unlabelled": pools["train"],
        "labelled": pools["train"],
        "dev": pools["dev"],
        "test_in": pools["test"],
        "test_ood": [(spec.held_out_accent, v) for v in variants],
    }


def _plan(spec: SpeechCorpusSpec) -> tuple[list[_Job], dict[str, Any]]:
    """Every utterance's text, voice and corruption, decided before any audio is made."""
    pool = task_texts(
        spec.task, spec.total, sources=spec.sources, min_words=spec.min_words, max_words=spec.max_words, seed=spec.seed
    )
    if len(pool) < spec.total:
        raise ValueError(
            f"the text sources {list(spec.sources)} have {len(pool)} distinct sentences of "
            f"{spec.min_words}-{spec.max_words} words, but the splits need {spec.total}; lower the counts, "
            "widen the word range or add sources"
        )
    order = np.random.default_rng([spec.seed, 0x7365]).permutation(len(pool))
    pools = _voice_pools(spec)
    flite = flite_voices() if spec.use_flite else []
    if spec.use_flite and not flite:
        log.warning("flite is not installed: test_ood uses only the held-out accent %s", spec.held_out_accent)
    jobs: list[_Job] = []
    start = 0
    for split in SPLITS:
        for i in range(getattr(spec, split)):
            seed = _utterance_seed(spec.seed, split, i)
            rng = np.random.default_rng(seed)
            # every draw happens for every utterance, so changing one probability never shifts the others
            accent, variant = pools[split][int(rng.integers(len(pools[split])))]
            u = float(rng.random())  # drawn even without flite, so its absence never shifts the other draws
            flite_voice = flite[int(u * len(flite))] if flite else None
            speed = int(rng.integers(spec.speed[0], spec.speed[1] + 1))
            pitch = int(rng.integers(spec.pitch[0], spec.pitch[1] + 1))
            noisy, snr = rng.random() < spec.noise_prob, round(float(rng.uniform(*spec.snr_db)), 2)
            reverb, rt60 = rng.random() < spec.reverb_prob, round(float(rng.uniform(*spec.rt60)), 3)
            if split == "test_ood" and flite_voice is not None and i % 2 == 1:
                voice = Voice.flite(flite_voice)
            else:
                voice = Voice.espeak(accent, variant, speed=speed, pitch=pitch)
            text = pool[int(order[start + i])]
            jobs.append(_Job(split, i, text, voice, snr if noisy else None, rt60 if reverb else None, seed))
        start += getattr(spec, split)
    inventory = {
        "accents": espeak_accents(),
        "variants": {k: sorted({v for _, v in p}) for k, p in pools.items() if k != "labelled"},
        "flite": flite,
        "sentences_available": len(pool),
    }
    return jobs, inventory


def _make(job: _Job, root: Path, spec: SpeechCorpusSpec) -> tuple[float, bool]:
    """Make one WAV unless a complete one exists; returns (duration in s, whether it was synthesised)."""
    path = root / job.relpath
    if path.is_file():
        try:
            info = sf.info(str(path))
            if info.samplerate == spec.sample_rate and info.frames > 0:
                return info.frames / info.samplerate, False
        except (sf.LibsndfileError, RuntimeError):
            pass
        log.warning("re-synthesising unreadable %s", path)
    x = synthesize(job.text, job.voice, sample_rate=spec.sample_rate)
    rng = np.random.default_rng([job.seed, 1])  # corruption noise: separate from the parameter draws
    if job.rt60 is not None:
        x = add_reverb(x, rt60=job.rt60, sample_rate=spec.sample_rate, rng=rng)
    if job.snr_db is not None:
        x = add_noise(x, snr_db=job.snr_db, rng=rng, color=spec.noise_color)  # type: ignore[arg-type]
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        sf.write(str(tmp), x, spec.sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(x) / spec.sample_rate, True


def _row(job: _Job, duration: float) -> dict[str, Any]:
    espeak = job.voice.engine == "espeak"
    return {
        "id": job.id,
        "path": job.relpath,
        "duration": round(duration, 3),
        "text": job.text,
        "voice": job.voice.label,
        "engine": job.voice.engine,
        "accent": job.voice.accent,
        "variant": job.voice.variant,
        "speed": job.voice.speed if espeak else None,
        "pitch": job.voice.pitch if espeak else None,
        "snr_db": job.snr_db,
        "reverb": job.rt60 is not None,
        "seed": job.seed,
        "split": job.split,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cached(out: Path, manifests: dict[str, Path]) -> bool:
    if not (out / "complete.json").is_file() or not all(p.is_file() for p in manifests.values()):
        return False
    try:
        return all(Path(r["path"]).is_file() for p in manifests.values() for r in read_manifest(p))
    except ValueError:
        return False


def build_corpus(root: Path, spec: SpeechCorpusSpec, *, workers: int = 2, progress: bool = True) -> dict[str, Path]:
    """Build (or reuse) the corpus of ``spec`` under ``root/<spec_hash>/``; returns split -> manifest path.

    A corpus whose ``complete.json``, manifests and WAV files all exist is returned without calling an engine.
    Otherwise only missing or unreadable WAVs are synthesised (``workers`` threads; each utterance is
    independent of scheduling), then the manifests and finally ``complete.json`` are written atomically.

    Raises:
        ValueError: too few sentences for the requested counts, or a held-out accent espeak-ng lacks.
        RuntimeError: espeak-ng is missing or fails on an utterance.
    """
    out = Path(root) / spec_hash(spec)
    manifests = {s: out / f"{s}.jsonl" for s in SPLITS}
    if _cached(out, manifests):
        log.info("speech corpus %s is cached", out)
        return manifests
    t0 = time.perf_counter()
    jobs, inventory = _plan(spec)
    for split in SPLITS:
        (out / "wav" / split).mkdir(parents=True, exist_ok=True)
    log.info("building speech corpus %s: %d utterances, %d workers", out, len(jobs), workers)
    durations: dict[int, float] = {}
    made = 0
    with (
        progress_bar(len(jobs), "speech corpus", enabled=progress) as advance,
        concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        futures = {pool.submit(_make, job, out, spec): k for k, job in enumerate(jobs)}
        try:
            for fut in concurrent.futures.as_completed(futures):
                durations[futures[fut]], new = fut.result()
                made += new
                advance(1, synthesised=made)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for k, job in enumerate(jobs):
        rows[job.split].append(_row(job, durations[k]))
    for split, path in manifests.items():
        _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]))
    seconds = time.perf_counter() - t0
    hours = {s: round(sum(r["duration"] for r in rows[s]) / 3600, 4) for s in SPLITS}
    complete = {
        "hash": out.name,
        "spec": dataclasses.asdict(spec),
        "counts": {s: len(rows[s]) for s in SPLITS},
        "hours": hours,
        "total_hours": round(sum(hours.values()), 4),
        "synthesised": made,
        "seconds": round(seconds, 2),
        "utterances_per_s": round(made / seconds, 2) if seconds > 0 else None,
        "workers": workers,
        "voices": inventory,
    }
    _write_atomic(out / "complete.json", json.dumps(complete, indent=2) + "\n")
    log.info("speech corpus %s: %.2f h, %d synthesised in %.1f s", out, complete["total_hours"], made, seconds)
    return manifests


def read_manifest(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a speech manifest (JSONL), with ``path`` made absolute against the manifest's directory.

    Raises:
        ValueError: a line that is not a JSON object with at least ``id``, ``path`` and ``text``.
    """
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("id", "path", "text")):
                raise ValueError(f"{path}:{lineno}: expected an object with string fields id, path and text")
            row["path"] = str((path.parent / row["path"]).resolve())
            rows.append(row)
    return rows


def corpus_stats(manifest_path: Path | str) -> dict[str, Any]:
    """Count, hours, mean duration (s), number of distinct voices and utterances per accent of one manifest."""
    rows = read_manifest(manifest_path)
    total = sum(float(r.get("duration", 0.0)) for r in rows)
    return {
        "count": len(rows),
        "hours": total / 3600,
        "mean_duration": total / len(rows) if rows else 0.0,
        "voices": len({r.get("voice") for r in rows}),
        "accents": dict(sorted(Counter(str(r.get("accent")) for r in rows).items())),
    }
