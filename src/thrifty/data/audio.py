"""Real-format speech data for the BigSSL recipe's full-scale path: audio files, corpus layouts and manifests.

Audio is read with ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis, …) as ``float32`` mono in [-1, 1]; several
channels are averaged and a file at another rate is resampled with :func:`scipy.signal.resample_poly` (polyphase,
anti-aliased, by the reduced fraction ``target / source``). Any problem with a file (missing, not audio, corrupt,
truncated, empty) is an :class:`AudioError` whose message starts with the file's path, so one bad file in a
50,000-hour corpus can be found, or skipped with ``skip_bad=True`` and counted in the log.

Utterance lists (:class:`Utterance`) come from:

- :func:`librispeech`: ``LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac`` with
  ``<speaker>-<chapter>.trans.txt`` lines ``<utt-id> UPPERCASE TEXT``;
- :func:`unlabelled_folder`: any folder of audio, recursively (Libri-Light: ``<subset>/<speaker>/<book>/*.flac``
  with ``.json`` sidecars of VAD/SNR metadata);
- :func:`read_manifest`: a generic JSONL, CSV or TSV manifest (``path, duration, text`` and friends); written back by
  :func:`write_manifest`.

Transcripts are normalised with :func:`thrifty.data.transcripts.normalize_transcript`, so LibriSpeech's upper
case and user manifests end up in one alphabet (the BigSSL recipe's characters). :func:`validate` reads every header
once (filling missing durations, which the length-bucketed sampler of :mod:`thrifty.data.buckets` needs) before a
long run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from thrifty.data.transcripts import normalize_transcript

log = logging.getLogger(__name__)

PATH_KEYS = ("audio_filepath", "path", "audio")
TEXT_KEYS = ("text", "transcript", "sentence")
SIDECAR_DURATION_KEYS = ("duration", "duration_s", "duration_sec", "duration_seconds", "length_s")
_RIFF_FORMATS = ("WAV", "WAVEX")
_SOUNDFILE_ERRORS = (RuntimeError, TypeError, ValueError, OSError)  # LibsndfileError is a RuntimeError


class AudioError(ValueError):
    """An audio file, corpus folder or manifest is missing or malformed; the message names it."""


# ----------------------------------------------------------------------------------------------------------- files


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise AudioError(f"{path}: audio file not found")
    if not path.is_file():
        raise AudioError(f"{path}: expected an audio file, found a directory or special file")


def _check_wav_not_truncated(path: Path) -> None:
    """libsndfile quietly shortens a RIFF/WAVE file whose ``data`` chunk is cut; compare the declared size instead."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return  # not a plain RIFF/WAVE file (RF64, FLAC, …): libsndfile's own checks apply
            offset = 12
            for _ in range(256):  # chunks before ``data``: fmt, LIST, fact, …
                chunk = f.read(8)
                if len(chunk) < 8:
                    return  # no data chunk: libsndfile reports that itself
                cid, csize = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                offset += 8
                if cid == b"data":
                    available = size - offset
                    if csize not in (0, 0xFFFFFFFF) and available < csize:
                        raise AudioError(
                            f"{path}: truncated WAV file (the header declares {csize} bytes of samples, "
                            f"the file holds {max(available, 0)})"
                        )
                    return
                offset += csize + (csize & 1)  # chunks are padded to an even size
                f.seek(offset)
    except OSError as e:
        raise AudioError(f"{path}: cannot read the file ({e})") from None


def _check_tail_decodes(f: sf.SoundFile, path: Path) -> None:
    """Seek an open file to the last sample its header declares and decode it: a FLAC (or other compressed file)
    cut short anywhere keeps its full-length header, so only decoding its end shows the truncation. One seek and
    one frame's decode, not the whole file."""
    if not f.seekable():
        return
    try:
        f.seek(f.frames - 1)
        got = len(f.read(1, dtype="float32"))
    except _SOUNDFILE_ERRORS as e:
        raise AudioError(
            f"{path}: truncated or corrupt {f.format} file (the header declares {f.frames} samples, but its end "
            f"cannot be decoded: {e})"
        ) from None
    if got != 1:
        raise AudioError(f"{path}: truncated {f.format} file (the header declares {f.frames} samples, fewer are there)")


def audio_info(path: str | os.PathLike[str]) -> tuple[int, float]:
    """(sample rate in Hz, duration in seconds) of an audio file, from its header, checked against the data.

    Raises :class:`AudioError` naming the file when it is missing, not a readable audio file, truncated (WAV: from
    the chunk sizes; FLAC and other compressed formats: the last declared sample must decode) or has no samples.
    """
    p = Path(path)
    _check_exists(p)
    try:
        f = sf.SoundFile(str(p))
    except _SOUNDFILE_ERRORS as e:
        raise AudioError(f"{p}: not a readable audio file ({e})") from None
    with f:
        rate, frames, fmt = f.samplerate, f.frames, f.format
        if rate <= 0:
            raise AudioError(f"{p}: invalid sample rate {rate} in the header")
        if frames <= 0:
            raise AudioError(f"{p}: empty audio file (0 samples)")
        if fmt not in _RIFF_FORMATS:
            _check_tail_decodes(f, p)
    if fmt in _RIFF_FORMATS:
        _check_wav_not_truncated(p)
    return int(rate), frames / rate


def read_audio(path: str | os.PathLike[str], *, sample_rate: int = 16000) -> np.ndarray:
    """The samples of an audio file as a ``float32`` mono array in [-1, 1] at ``sample_rate`` Hz.

    Several channels are averaged; another rate is resampled with :func:`scipy.signal.resample_poly` by the reduced
    fraction ``sample_rate / file rate`` (the duration is kept: ``round(n · sample_rate / file rate)`` samples, up
    to one). Raises :class:`AudioError` naming the file when it is missing, unreadable, corrupt, truncated or empty.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    p = Path(path)
    _check_exists(p)
    try:
        with sf.SoundFile(str(p)) as f:
            rate, fmt = f.samplerate, f.format
            data = f.read(dtype="float32", always_2d=True)
    except _SOUNDFILE_ERRORS as e:
        raise AudioError(f"{p}: not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{p}: empty audio file (0 samples)")
    if fmt in _RIFF_FORMATS:
        _check_wav_not_truncated(p)
    if not np.isfinite(data).all():
        raise AudioError(f"{p}: audio contains NaN or infinite samples")
    x = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        x = resample_poly(x, sample_rate // g, int(rate) // g)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.clip(x, -1.0, 1.0, out=x)


# ------------------------------------------------------------------------------------------------------ utterances


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One audio file of a corpus.

    ``path`` is absolute; ``text`` is the normalised transcript, ``None`` for unlabelled audio; ``duration`` is in
    seconds, ``None`` until read (see :func:`validate`).
    """

    id: str
    path: str
    text: str | None
    duration: float | None
    speaker: str = ""


def _bad(message: str, skip_bad: bool, bad: list[str]) -> None:
    if not skip_bad:
        raise AudioError(message)
    bad.append(message)


def _report_skipped(what: str, bad: list[str]) -> None:
    if bad:
        log.warning("%s: skipped %d bad entries, e.g. %s", what, len(bad), bad[0])


def _subdirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name)


def _librispeech_root(root: Path, splits: Sequence[str]) -> Path:
    candidates = [root, root / "LibriSpeech"]
    for c in candidates:
        if c.is_dir() and all((c / s).is_dir() for s in splits):
            return c
    found = sorted({d.name for c in candidates if c.is_dir() for d in _subdirs(c) if d.name != "LibriSpeech"})
    missing = [s for s in splits if not any((c / s).is_dir() for c in candidates)]
    raise AudioError(
        f"{root}: LibriSpeech split(s) {', '.join(missing) or ', '.join(splits)} not found "
        f"(looked in {root} and {root / 'LibriSpeech'}); splits found: {', '.join(found) or 'none'}"
    )


def _read_transcripts(trans: Path, skip_bad: bool, bad: list[str]) -> dict[str, str]:
    texts: dict[str, str] = {}
    try:
        lines = trans.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        _bad(f"{trans}: cannot read the transcript file ({e})", skip_bad, bad)
        return texts
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            _bad(f"{trans}:{n}: expected '<utt-id> TEXT', got {line.strip()!r}", skip_bad, bad)
            continue
        texts[parts[0]] = normalize_transcript(parts[1])
    return texts


def librispeech(
    root: str | os.PathLike[str],
    splits: Sequence[str],
    *,
    with_durations: bool = False,
    skip_bad: bool = False,
) -> list[Utterance]:
    """The utterances of LibriSpeech ``splits`` (e.g. ``["train-clean-100", "dev-clean"]``), in split order and
    sorted by id within a split.

    ``root`` is the ``LibriSpeech`` folder or its parent. A transcript line without its ``.flac``, a ``.flac``
    without a transcript line, or a chapter without its ``.trans.txt`` is an :class:`AudioError` naming it; with
    ``skip_bad=True`` such utterances are left out, counted and logged. ``with_durations=True`` reads every header
    (slow on network storage for the 960 h; :func:`validate` does it later otherwise).
    """
    if isinstance(splits, str):
        splits = [splits]
    if not splits:
        raise ValueError("librispeech: give at least one split")
    if len(set(splits)) != len(splits):
        raise ValueError(f"librispeech: a split is listed twice in {list(splits)}")
    base = _librispeech_root(Path(root), splits)
    out: list[Utterance] = []
    bad: list[str] = []
    for split in splits:
        items: list[Utterance] = []
        for speaker_dir in _subdirs(base / split):
            for chapter_dir in _subdirs(speaker_dir):
                prefix = f"{speaker_dir.name}-{chapter_dir.name}"
                trans = chapter_dir / f"{prefix}.trans.txt"
                flacs = {f.name[: -len(".flac")]: f for f in chapter_dir.iterdir() if f.name.endswith(".flac")}
                if trans.is_file():
                    texts = _read_transcripts(trans, skip_bad, bad)
                else:
                    texts = {}
                    if flacs:
                        _bad(f"{trans}: transcript file not found ({len(flacs)} .flac files beside)", skip_bad, bad)
                        continue
                for uid in sorted(set(texts) - set(flacs)):
                    _bad(f"{chapter_dir / (uid + '.flac')}: audio file not found (listed in {trans})", skip_bad, bad)
                for uid in sorted(set(flacs) - set(texts)):
                    _bad(f"{flacs[uid]}: no transcript line for {uid} in {trans}", skip_bad, bad)
                for uid in sorted(set(flacs) & set(texts)):
                    path = flacs[uid].absolute()
                    duration = None
                    if with_durations:
                        try:
                            duration = audio_info(path)[1]
                        except AudioError as e:
                            _bad(str(e), skip_bad, bad)
                            continue
                    items.append(Utterance(uid, str(path), texts[uid], duration, speaker_dir.name))
        if not items and not bad:
            raise AudioError(f"{base / split}: no utterances found (expected <speaker>/<chapter>/*.flac)")
        out.extend(sorted(items, key=lambda u: u.id))
    _report_skipped(f"LibriSpeech {base}", bad)
    return out


def _first_key(row: dict[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in row), None)


def _manifest_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any] | None, str]], list[str]]:
    """(line number, row or None if unparseable, error) for each row, and the column names of a CSV/TSV header."""
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json", ".ndjson"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append((n, None, f"invalid JSON ({e.msg})"))
                    continue
                if not isinstance(row, dict):
                    rows.append((n, None, f"expected a JSON object, got {type(row).__name__}"))
                    continue
                rows.append((n, {str(k).strip().lower(): v for k, v in row.items()}, ""))
            return rows, []
        if suffix not in (".csv", ".tsv"):
            raise AudioError(f"{path}: unknown manifest format {suffix!r} (expected .jsonl, .json, .csv or .tsv)")
        if suffix == ".tsv":  # TSV manifests (e.g. Common Voice) do not quote fields; quotes are part of the text
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f, delimiter=",")
        header: list[str] | None = None
        for row in reader:
            if not row or not any(c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip().lower() for c in row]
                continue
            n = reader.line_num
            if len(row) != len(header):
                rows.append((n, None, f"expected {len(header)} fields, got {len(row)}"))
                continue
            rows.append((n, {k: (v if v.strip() else None) for k, v in zip(header, row)}, ""))
        if header is None:
            raise AudioError(f"{path}: empty manifest (expected a header row)")
        return rows, header


def read_manifest(path: str | os.PathLike[str], *, skip_bad: bool = False) -> list[Utterance]:
    """The utterances of a JSONL (``.jsonl``/``.json``, one object a line) or CSV/TSV (header row) manifest.

    Columns (case-insensitive): the audio path as ``audio_filepath``, ``path`` or ``audio`` (required; relative paths
    are taken from the manifest's folder); the transcript as ``text``, ``transcript`` or ``sentence`` (missing, null
    or blank → unlabelled, ``text=None``); optional ``duration`` (s), ``id`` (default: the path relative to the
    manifest's folder without extension) and ``speaker``. A row without a path, with an unparseable field or a
    repeated id is an :class:`AudioError` naming the manifest and line, or is skipped with ``skip_bad=True``. The
    audio files themselves are not opened (see :func:`validate`).
    """
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"{p}: manifest file not found")
    rows, header = _manifest_rows(p)
    columns = header or list(dict.fromkeys(k for _, row, _ in rows if row is not None for k in row))
    if (header or columns) and _first_key(dict.fromkeys(columns), PATH_KEYS) is None:
        raise AudioError(
            f"{p}: no audio path column (expected one of {', '.join(PATH_KEYS)}); columns found: {', '.join(columns)}"
        )
    base = p.parent.absolute()
    out: list[Utterance] = []
    bad: list[str] = []
    seen: set[str] = set()
    for n, row, error in rows:
        where = f"{p}:{n}"
        if row is None:
            _bad(f"{where}: {error}", skip_bad, bad)
            continue
        key = _first_key(row, PATH_KEYS)
        if key is None:
            _bad(
                f"{where}: no audio path (expected one of {', '.join(PATH_KEYS)}); keys: {', '.join(row)}",
                skip_bad,
                bad,
            )
            continue
        audio = row[key]
        if not isinstance(audio, str) or not audio.strip():
            _bad(f"{where}: empty or non-text audio path {audio!r}", skip_bad, bad)
            continue
        audio_path = Path(os.path.expanduser(audio.strip()))
        if not audio_path.is_absolute():
            audio_path = base / audio_path
        audio_path = Path(os.path.normpath(audio_path))
        text_key = _first_key(row, TEXT_KEYS)
        raw_text = row.get(text_key) if text_key else None
        if raw_text is not None and not isinstance(raw_text, str):
            _bad(f"{where}: transcript must be text, got {raw_text!r}", skip_bad, bad)
            continue
        text = normalize_transcript(raw_text) if raw_text is not None and raw_text.strip() else None
        duration = row.get("duration")
        if duration is not None:
            try:
                duration = float(duration)
            except (TypeError, ValueError):
                duration = math.nan
            if not math.isfinite(duration) or duration < 0:
                _bad(f"{where}: invalid duration {row.get('duration')!r} (expected seconds)", skip_bad, bad)
                continue
        uid = row.get("id")
        if uid is None or not str(uid).strip():
            rel = os.path.relpath(audio_path, base) if audio_path.is_relative_to(base) else audio_path.name
            uid = os.path.splitext(rel)[0].replace(os.sep, "/")
        uid = str(uid).strip()
        if uid in seen:
            _bad(f"{where}: id {uid!r} appears more than once", skip_bad, bad)
            continue
        seen.add(uid)
        speaker = row.get("speaker")
        out.append(Utterance(uid, str(audio_path), text, duration, "" if speaker is None else str(speaker).strip()))
    _report_skipped(f"manifest {p}", bad)
    if not out:
        raise AudioError(f"{p}: manifest has no usable rows")
    return out


def _sidecar_duration(audio: Path) -> float | None:
    sidecar = audio.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.debug("%s: unreadable sidecar ignored", sidecar)
        return None
    if not isinstance(meta, dict):
        return None
    for k in SIDECAR_DURATION_KEYS:
        v = meta.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
    return None


def unlabelled_folder(
    root: str | os.PathLike[str],
    *,
    extensions: Sequence[str] = (".flac", ".wav", ".ogg"),
    sidecar_durations: bool = False,
) -> list[Utterance]:
    """Every audio file under ``root`` (recursively, sorted by id), as unlabelled utterances.

    Made for Libri-Light (``root`` = a subset folder, ``<speaker>/<book>/*.flac``): the speaker is the first folder
    under ``root`` (``""`` for files directly in it) and the id the path relative to ``root`` without extension.
    Other files (Libri-Light's ``.json`` VAD/SNR sidecars) are ignored; with ``sidecar_durations=True`` a same-stem
    ``.json`` holding a positive number under ``duration`` (or ``duration_s``, …) gives the duration, which is
    otherwise ``None`` (:func:`validate` fills it from the headers).
    """
    base = Path(root)
    if not base.is_dir():
        raise AudioError(f"{base}: audio folder not found")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    base = base.absolute()
    out: list[Utterance] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(exts):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(base)
            speaker = rel.parts[0] if len(rel.parts) > 1 else ""
            duration = _sidecar_duration(path) if sidecar_durations else None
            out.append(Utterance(rel.with_suffix("").as_posix(), str(path), None, duration, speaker))
    out.sort(key=lambda u: u.id)
    if not out:
        raise AudioError(f"{base}: no audio files with extension {', '.join(exts)} found (searched recursively)")
    return out


def validate(
    utterances: Iterable[Utterance], *, skip_bad: bool = False, decode: bool = False
) -> tuple[list[Utterance], list[tuple[str, str]]]:
    """Check every utterance with :func:`audio_info` (its header, and for FLAC and other compressed files that the
    last declared sample decodes, so a file cut short is found here) and fill missing durations; ``decode=True``
    also decodes the whole file, which finds corruption in the middle of a file.

    Returns (good utterances, [(path, reason), …] of bad ones). A bad file (missing, unreadable, truncated, empty)
    raises :class:`AudioError` naming it, unless ``skip_bad=True``: then it is left out and listed, and the count is
    logged.
    """
    good: list[Utterance] = []
    bad: list[tuple[str, str]] = []
    for u in utterances:
        try:
            rate, duration = audio_info(u.path)
            if decode:
                read_audio(u.path, sample_rate=rate)
        except AudioError as e:
            if not skip_bad:
                raise
            bad.append((u.path, str(e)))
            continue
        good.append(u if u.duration is not None else dataclasses.replace(u, duration=duration))
    if bad:
        log.warning(
            "validate: %d of %d audio files are bad and were skipped, e.g. %s",
            len(bad),
            len(good) + len(bad),
            bad[0][1],
        )
    return good, bad


def write_manifest(utterances: Iterable[Utterance], path: str | os.PathLike[str]) -> Path:
    """Write utterances as a JSONL manifest that :func:`read_manifest` reads back (keys ``id``, ``path``, ``text``,
    ``duration``, ``speaker``; ``text`` null for unlabelled audio).

    Audio paths under the manifest's folder are written relative to it (so the folder can be moved), others
    absolute. The file is written to a temporary file beside it and renamed over ``path``, so a reader never sees a
    half-written manifest. Returns the manifest's path.
    """
    p = Path(path).absolute()
    p.parent.mkdir(parents=True, exist_ok=True)
    base = p.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=base)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for u in utterances:
                audio = Path(u.path).absolute()
                shown = audio.relative_to(base).as_posix() if audio.is_relative_to(base) else str(audio)
                row = {"id": u.id, "path": shown, "text": u.text, "duration": u.duration, "speaker": u.speaker}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
