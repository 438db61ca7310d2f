"""Audio files and speech corpus layouts: read_audio resamples and mixes down faithfully, bad files are AudioErrors
naming the file, and LibriSpeech trees, manifests (JSONL/CSV/TSV) and Libri-Light-like folders become the expected
utterances."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from thrifty.data.audio import (
    AudioError,
    Utterance,
    audio_info,
    librispeech,
    read_audio,
    read_manifest,
    unlabelled_folder,
    validate,
    write_manifest,
)


def tone(path: Path, *, rate: int, seconds: float = 0.5, freq: float = 440.0, channels: int = 1, **kw) -> Path:
    t = np.arange(round(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    data = x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, **kw)
    return path


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[spectrum.argmax()])


# ------------------------------------------------------------------------------------------------------ read_audio


@pytest.mark.parametrize(
    ("rate", "ext"), [(8000, "wav"), (16000, "flac"), (22050, "wav"), (44100, "flac"), (48000, "ogg")]
)
def test_read_audio_resamples_keeping_duration_and_pitch(tmp_path: Path, rate: int, ext: str) -> None:
    path = tone(tmp_path / f"a.{ext}", rate=rate, seconds=0.75, freq=440.0)
    x = read_audio(path, sample_rate=16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.size - 12000) <= 1  # 0.75 s at 16 kHz
    assert abs(peak_hz(x, 16000) - 440.0) < 3.0
    assert np.abs(x).max() <= 1.0
    assert 0.4 < np.abs(x[1000:-1000]).max() < 0.6  # amplitude kept (no gain from resampling)
    assert audio_info(path) == (rate, pytest.approx(0.75, abs=1 / rate))


def test_read_audio_other_target_rate(tmp_path: Path) -> None:
    x = read_audio(tone(tmp_path / "a.wav", rate=16000, seconds=1.0, freq=1000.0), sample_rate=8000)
    assert x.size == 8000 and abs(peak_hz(x, 8000) - 1000.0) < 3.0


def test_read_audio_mixes_stereo_to_mono(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    t = np.arange(16000) / 16000
    left, right = 0.6 * np.sin(2 * np.pi * 300 * t), 0.2 * np.ones_like(t)
    sf.write(str(path), np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    x = read_audio(path)
    assert x.shape == (16000,) and x.dtype == np.float32
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-6)


def test_read_audio_clips_float_overs(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    sf.write(str(path), np.array([0.5, 1.5, -2.0, 0.0] * 100), 16000, subtype="FLOAT")
    x = read_audio(path)
    assert x.max() == 1.0 and x.min() == -1.0


def _corrupt(tmp_path: Path) -> dict[str, Path]:
    good = tone(tmp_path / "good.wav", rate=16000, subtype="PCM_16")
    raw = good.read_bytes()
    rng = np.random.default_rng(0)
    files = {
        "random": tmp_path / "random_bytes.wav",
        "header_only": tmp_path / "header_only.wav",
        "cut": tmp_path / "cut_samples.wav",
        "cut_header": tmp_path / "cut_header.wav",
        "zero_bytes": tmp_path / "zero_bytes.wav",
        "flac_cut": tmp_path / "cut.flac",
    }
    files["random"].write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    files["header_only"].write_bytes(raw[:44])
    files["cut"].write_bytes(raw[: len(raw) // 2])
    files["cut_header"].write_bytes(raw[:30])
    files["zero_bytes"].write_bytes(b"")
    flac = tone(tmp_path / "full.flac", rate=16000, seconds=1.0).read_bytes()
    files["flac_cut"].write_bytes(flac[: len(flac) // 2])
    return files


@pytest.mark.parametrize("kind", ["random", "header_only", "cut", "cut_header", "zero_bytes", "flac_cut"])
def test_bad_files_are_audio_errors_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = _corrupt(tmp_path)[kind]
    with pytest.raises(AudioError, match=path.name):
        read_audio(path)
    if kind != "flac_cut":  # a FLAC cut after its header only shows when decoding
        with pytest.raises(AudioError, match=path.name):
            audio_info(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    for fn in (read_audio, audio_info):
        with pytest.raises(AudioError, match=r"empty\.wav.*0 samples"):
            fn(empty)
        with pytest.raises(AudioError, match=r"nowhere\.flac.*not found"):
            fn(tmp_path / "nowhere.flac")
    assert issubclass(AudioError, ValueError)


# ----------------------------------------------------------------------------------------------------- librispeech


def fake_librispeech(base: Path, split: str = "train-clean-100") -> Path:
    """2 speakers × 2 chapters × 2 utterances under base/LibriSpeech/<split>."""
    root = base / "LibriSpeech"
    for spk in ("19", "201"):
        for ch in ("198", "1240"):
            folder = root / split / spk / ch
            lines = []
            for k in range(2):
                uid = f"{spk}-{ch}-{k:04d}"
                tone(folder / f"{uid}.flac", rate=16000, seconds=0.1 + 0.05 * k)
                lines.append(f"{uid} HELLO WORLD IT'S {spk} CHAPTER {ch}, PART {k}")
            (folder / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_librispeech_reads_ids_texts_paths(tmp_path: Path) -> None:
    root = fake_librispeech(tmp_path)
    utts = librispeech(root, ["train-clean-100"])
    assert [u.id for u in utts] == sorted(u.id for u in utts)
    assert len(utts) == 8 and len({u.id for u in utts}) == 8
    u = next(u for u in utts if u.id == "201-1240-0001")
    assert u.text == "hello world it's chapter part"  # digits are not in the alphabet
    assert u.speaker == "201" and u.duration is None
    assert Path(u.path).is_absolute() and Path(u.path).is_file() and u.path.endswith("201-1240-0001.flac")
    # the parent of LibriSpeech works as root too; durations on request
    again = librispeech(tmp_path, ["train-clean-100"], with_durations=True)
    assert [a.id for a in again] == [u.id for u in utts]
    assert again[0].duration == pytest.approx(0.1) and again[1].duration == pytest.approx(0.15)


def test_librispeech_missing_split_lists_found(tmp_path: Path) -> None:
    fake_librispeech(tmp_path)
    with pytest.raises(AudioError, match=r"dev-clean.*splits found: train-clean-100"):
        librispeech(tmp_path, ["train-clean-100", "dev-clean"])


def test_librispeech_missing_flac_and_missing_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = fake_librispeech(tmp_path)
    chapter = root / "train-clean-100" / "19" / "198"
    (chapter / "19-198-0001.flac").unlink()
    with pytest.raises(AudioError, match=r"19-198-0001\.flac.*not found"):
        librispeech(root, ["train-clean-100"])
    with caplog.at_level(logging.WARNING):
        utts = librispeech(root, ["train-clean-100"], skip_bad=True)
    assert len(utts) == 7 and "19-198-0001" not in {u.id for u in utts}
    assert "skipped 1 bad" in caplog.text
    # a flac without a transcript line
    tone(chapter / "19-198-0001.flac", rate=16000, seconds=0.1)
    tone(chapter / "19-198-0007.flac", rate=16000, seconds=0.1)
    with pytest.raises(AudioError, match=r"19-198-0007\.flac: no transcript line"):
        librispeech(root, ["train-clean-100"])
    utts = librispeech(root, ["train-clean-100"], skip_bad=True)
    assert len(utts) == 8 and "19-198-0007" not in {u.id for u in utts}


# ------------------------------------------------------------------------------------------------------- manifests


def _audio_set(folder: Path) -> list[Path]:
    return [tone(folder / "clips" / f"c{i}.wav", rate=16000, seconds=0.1 * (i + 1)) for i in range(3)]


def test_jsonl_manifest_relative_paths_and_unlabelled(tmp_path: Path) -> None:
    clips = _audio_set(tmp_path)
    rows = [
        {"audio_filepath": "clips/c0.wav", "text": "Hello, World!", "duration": 0.1, "speaker": "s1"},
        {"path": str(clips[1]), "transcript": "SECOND one", "id": "two"},
        {"audio": "clips/c2.wav"},  # unlabelled
        {"audio": "clips/c2.wav", "sentence": "  ", "id": "blank"},  # blank text: unlabelled too
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    utts = read_manifest(manifest)
    assert [u.id for u in utts] == ["clips/c0", "two", "clips/c2", "blank"]
    assert [u.text for u in utts] == ["hello world", "second one", None, None]
    assert [u.duration for u in utts] == [0.1, None, None, None]
    assert utts[0].speaker == "s1" and utts[1].speaker == ""
    assert [Path(u.path) for u in utts[:3]] == clips
    assert all(Path(u.path).is_absolute() for u in utts)


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_csv_tsv_manifests(tmp_path: Path, ext: str) -> None:
    clips = _audio_set(tmp_path)
    manifest = tmp_path / "sub" / f"m.{ext}"
    manifest.parent.mkdir()
    with manifest.open("w", newline="") as f:
        w = csv.writer(f, delimiter="," if ext == "csv" else "\t", lineterminator="\n")
        w.writerow(["Path", "duration", "text"])  # header names are case-insensitive
        w.writerow(["../clips/c0.wav", "0.1", "don't stop"])
        w.writerow(["../clips/c1.wav", "", "Two, words"])
        w.writerow(["../clips/c2.wav", "0.3", ""])
    utts = read_manifest(manifest)
    assert [Path(u.path) for u in utts] == clips
    assert [u.text for u in utts] == ["don't stop", "two words", None]
    assert [u.duration for u in utts] == [0.1, None, 0.3]
    assert [u.id for u in utts] == ["c0", "c1", "c2"]  # outside the manifest's folder: the file stem


def test_manifest_missing_column_and_bad_rows(tmp_path: Path) -> None:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,words\na.wav,hi\n")
    with pytest.raises(AudioError, match=r"bad\.csv.*columns found: file, words"):
        read_manifest(bad_csv)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"file": "a.wav", "text": "hi"}) + "\n")
    with pytest.raises(AudioError, match=r"bad\.jsonl.*columns found: file, text"):
        read_manifest(bad_jsonl)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"path": "a.wav", "text": "ok"}\nnot json\n{"path": "b.wav", "duration": "long"}\n')
    with pytest.raises(AudioError, match=r"mixed\.jsonl:2.*invalid JSON"):
        read_manifest(mixed)
    assert [u.id for u in read_manifest(mixed, skip_bad=True)] == ["a"]
    (tmp_path / "list.txt").write_text("a.wav\n")
    with pytest.raises(AudioError, match=r"list\.txt.*unknown manifest format"):
        read_manifest(tmp_path / "list.txt")
    with pytest.raises(AudioError, match="not found"):
        read_manifest(tmp_path / "absent.jsonl")


def test_write_read_manifest_round_trip(tmp_path: Path) -> None:
    clips = _audio_set(tmp_path / "data")
    outside = tone(tmp_path / "elsewhere" / "x.flac", rate=8000)
    utts = [
        Utterance("a", str(clips[0]), "hello there", 0.1, "spk"),
        Utterance("b", str(clips[1]), None, None),
        Utterance("c", str(outside), "far away", 0.5, "o"),
    ]
    manifest = write_manifest(utts, tmp_path / "data" / "train.jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert rows[0]["path"] == "clips/c0.wav" and rows[2]["path"] == str(outside)  # relative when under its folder
    assert [p.name for p in manifest.parent.iterdir() if p.is_file()] == ["train.jsonl"]  # no temp left over
    assert read_manifest(manifest) == utts
    # the folder can move: relative paths follow it
    os.rename(tmp_path / "data", tmp_path / "moved")
    moved = read_manifest(tmp_path / "moved" / "train.jsonl")
    assert moved[0].path == str(tmp_path / "moved" / "clips" / "c0.wav") and Path(moved[0].path).is_file()


# ------------------------------------------------------------------------------------------ folders and validate


def test_unlabelled_folder_libri_light_layout(tmp_path: Path) -> None:
    root = tmp_path / "small"
    for spk, book, n in (("100", "alice", 2), ("2003", "moby", 1)):
        for k in range(n):
            path = tone(root / spk / book / f"{book}_{k}.flac", rate=16000, seconds=0.1)
            meta = {"speaker": spk, "snr": 12.5, "voice_activity": [[0.0, 0.1]]}
            if spk == "100" and k == 0:
                meta["duration"] = 0.1
            path.with_suffix(".json").write_text(json.dumps(meta))
    tone(root / "top.wav", rate=16000, seconds=0.1)
    (root / "notes.txt").write_text("not audio")
    utts = unlabelled_folder(root)
    assert [u.id for u in utts] == ["100/alice/alice_0", "100/alice/alice_1", "2003/moby/moby_0", "top"]
    assert [u.speaker for u in utts] == ["100", "100", "2003", ""]
    assert all(u.text is None and u.duration is None and Path(u.path).is_file() for u in utts)
    with_meta = unlabelled_folder(root, sidecar_durations=True)
    assert [u.duration for u in with_meta] == [0.1, None, None, None]
    assert [u.id for u in unlabelled_folder(root, extensions=(".wav",))] == ["top"]
    (tmp_path / "void" / "deep").mkdir(parents=True)
    with pytest.raises(AudioError, match=r"void.*no audio files"):
        unlabelled_folder(tmp_path / "void")


def test_validate_fills_durations_and_skips_bad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _corrupt(tmp_path)
    good = [tone(tmp_path / f"g{i}.wav", rate=16000, seconds=0.2 * (i + 1)) for i in range(2)]
    utts = [
        Utterance("g0", str(good[0]), "a", None),
        Utterance("r", str(files["random"]), "b", None),
        Utterance("g1", str(good[1]), None, 9.0),  # a known duration is kept
        Utterance("e", str(files["header_only"]), "c", None),
    ]
    with pytest.raises(AudioError, match=r"random_bytes\.wav"):
        validate(utts)
    with caplog.at_level(logging.WARNING):
        ok, bad = validate(utts, skip_bad=True)
    assert [u.id for u in ok] == ["g0", "g1"]
    assert ok[0].duration == pytest.approx(0.2) and ok[1].duration == 9.0
    assert [p for p, _ in bad] == [str(files["random"]), str(files["header_only"])]
    assert "not a readable audio file" in bad[0][1] and "header_only.wav" in bad[1][1]
    assert "2 of 4" in caplog.text
    # a FLAC cut after its header: the duration check decodes its last sample and names it, as a full decode does
    flac = [Utterance("f", str(files["flac_cut"]), None, None)]
    with pytest.raises(AudioError, match=r"cut\.flac: truncated"):
        validate(flac)
    with pytest.raises(AudioError, match=r"cut\.flac"):
        validate(flac, decode=True)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_flac_is_named_when_durations_are_read(tmp_path: Path, fraction: float) -> None:
    """A FLAC cut short keeps its full-length header: audio_info and librispeech(with_durations=True) decode the
    last declared sample and name the file before any training starts."""
    root = fake_librispeech(tmp_path)
    victim = root / "train-clean-100" / "19" / "198" / "19-198-0001.flac"
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * fraction)])
    assert sf.info(str(victim)).frames > 0  # the header still declares every sample
    with pytest.raises(AudioError, match=r"19-198-0001\.flac: truncated"):
        audio_info(victim)
    with pytest.raises(AudioError, match=r"19-198-0001\.flac: truncated"):
        librispeech(root, ["train-clean-100"], with_durations=True)
    kept = librispeech(root, ["train-clean-100"], with_durations=True, skip_bad=True)
    assert len(kept) == 7 and "19-198-0001" not in {u.id for u in kept}
    intact = root / "train-clean-100" / "19" / "198" / "19-198-0000.flac"
    assert audio_info(intact)[1] == pytest.approx(0.1)
