"""Synthetic speech corpus: sentences, espeak-ng/flite synthesis, corruptions, splits, manifests and caching."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from thrifty.data import speech
from thrifty.data.speech import SpeechCorpusSpec, Voice

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")

TINY = SpeechCorpusSpec(
    unlabelled=12, labelled=8, dev=4, test_in=4, test_ood=4, noise_prob=0.5, reverb_prob=0.5, speed=(140, 190)
)


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean = clean.astype(np.float64)
    noise = noisy.astype(np.float64) - clean
    return float(10 * np.log10(np.mean(clean**2) / np.mean(noise**2)))


# --- sentences ---------------------------------------------------------------------------------------------


def test_sentences_are_normalised_in_range_and_unique():
    sents = speech.sentences()
    assert len(sents) > 20_000  # the default corpus needs 11,100
    assert len(set(sents)) == len(sents)
    assert all(re.fullmatch(r"[a-z']+( [a-z']+)*", s) for s in sents)
    assert all(5 <= len(s.split()) <= 15 for s in sents)
    assert sents == speech.sentences(["shakespeare", "kjv", "fortunes"])  # a list spells the same sources


def test_sentences_are_deterministic_and_respect_the_word_range():
    a = speech.sentences(("kjv",), min_words=7, max_words=8)
    b = list(speech._sentences.__wrapped__(("kjv",), 7, 8))  # recomputed from the text, bypassing the cache
    assert a == b
    assert a and all(len(s.split()) in (7, 8) for s in a)
    assert a != sorted(a)  # hash order, not alphabetical, so sources and books interleave


def test_unknown_source_raises_listing_the_known_ones():
    with pytest.raises(ValueError, match="shakespeare"):
        speech.sentences(("shakespeare", "wikipedia"))
    with pytest.raises(ValueError):
        speech.sentences(("kjv",), min_words=9, max_words=3)


# --- engines -----------------------------------------------------------------------------------------------


@needs_espeak
def test_voice_inventories():
    accents = speech.espeak_accents()
    assert "en-us" in accents and set(accents) <= set(speech.ENGLISH_ACCENTS)
    variants = speech.espeak_variants()
    assert len(variants) >= 20 and {"m3", "f2"} <= set(variants)
    assert not any(v.startswith("!") or "/" in v for v in variants)
    if shutil.which("flite"):
        assert set(speech.flite_voices()) <= set(speech.FLITE_VOICES) and speech.flite_voices()


@needs_espeak
def test_espeak_synthesis_is_16k_float32_with_plausible_duration():
    text = "the quick brown fox jumps over the lazy dog today"
    x = speech.synthesize(text, Voice.espeak("en-us", "m3", speed=160, pitch=50))
    assert x.dtype == np.float32 and x.ndim == 1
    seconds = len(x) / 16000
    assert 0.15 * 10 <= seconds <= 1.0 * 10
    assert np.sqrt(np.mean(x**2)) > 1e-3 and np.max(np.abs(x)) <= 1.0
    fast = speech.synthesize(text, Voice.espeak("en-us", "m3", speed=300, pitch=50))
    assert len(fast) < 0.8 * len(x)
    at_8k = speech.synthesize(text, Voice.espeak("en-us", "m3", speed=160, pitch=50), sample_rate=8000)
    assert abs(len(at_8k) - len(x) / 2) <= 2


@needs_espeak
def test_espeak_stdout_wav_is_read_to_its_real_length():
    # espeak-ng's --stdout header declares a bogus (huge) data size; every sample must be read, nothing more
    data = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", "--", "hello world"], capture_output=True).stdout
    x, sr = speech._decode_wav(data)
    assert sr == 22050 and len(x) == (len(data) - 44) // 2


@needs_espeak
def test_text_starting_with_a_dash_is_spoken_not_parsed():
    x = speech.synthesize("-v hello there my friend", Voice.espeak("en-us"))
    y = speech.synthesize("hello there my friend", Voice.espeak("en-us"))
    assert len(x) >= len(y) * 0.9 and np.sqrt(np.mean(x**2)) > 1e-3


@needs_flite
def test_flite_synthesis():
    x = speech.synthesize("there ye shall meet about this weighty business", Voice.flite("kal16"))
    assert x.dtype == np.float32 and 0.15 * 8 <= len(x) / 16000 <= 1.0 * 8
    assert np.sqrt(np.mean(x**2)) > 1e-3 and np.max(np.abs(x)) <= 1.0
    with pytest.raises(ValueError, match="no-such-voice"):
        speech.synthesize("hello", Voice.flite("no-such-voice"))


@needs_espeak
def test_bad_voice_raises_naming_the_voice():
    with pytest.raises(RuntimeError, match="xx-nonexistent"):
        speech.synthesize("hello world", Voice.espeak("xx-nonexistent"))
    with pytest.raises(ValueError, match="notavariant"):
        speech.synthesize("hello world", Voice.espeak("en-us", "notavariant"))
    with pytest.raises(ValueError):
        speech.synthesize("   ", Voice.espeak("en-us"))
    with pytest.raises(ValueError):
        Voice("espeak", "en-us+m1", "en-us", "m3")  # name disagrees with accent+variant
    with pytest.raises(ValueError):
        Voice.espeak("en-us", pitch=120)


def test_missing_engine_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="make setup"):
        speech.synthesize("hello world", Voice.espeak("en-us"))
    with pytest.raises(RuntimeError, match="flite"):
        speech.synthesize("hello world", Voice.flite("kal16"))


# --- corruptions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("color", ["white", "pink"])
@pytest.mark.parametrize("snr", [0.0, 12.5, 30.0])
def test_add_noise_hits_the_requested_snr(color: str, snr: float):
    t = np.arange(16000) / 16000
    x = (0.05 * np.sin(2 * np.pi * 220 * t) * (t > 0.3)).astype(np.float32)  # with silence, as speech has
    y = speech.add_noise(x, snr_db=snr, rng=np.random.default_rng(0), color=color)  # type: ignore[arg-type]
    assert y.dtype == np.float32 and y.shape == x.shape
    assert abs(_snr_db(x, y) - snr) < 0.1


def test_add_noise_keeps_full_scale_and_rejects_silence():
    x = np.sin(np.linspace(0, 200, 8000)).astype(np.float32)
    y = speech.add_noise(x, snr_db=0.0, rng=np.random.default_rng(1))
    assert np.max(np.abs(y)) <= 1.0
    with pytest.raises(ValueError):
        speech.add_noise(np.zeros(100, np.float32), snr_db=10, rng=np.random.default_rng(0))
    a = speech.add_noise(x * 0.1, snr_db=10, rng=np.random.default_rng(5))
    b = speech.add_noise(x * 0.1, snr_db=10, rng=np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_add_reverb_decays_by_the_rt60_and_keeps_the_peak():
    sr, rt60 = 16000, 0.3
    x = np.zeros(sr, np.float32)
    x[0] = 0.5
    y = speech.add_reverb(x, rt60=rt60, sample_rate=sr, rng=np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.max(np.abs(y)) == pytest.approx(0.5, abs=1e-6)

    def level(a: float, b: float) -> float:
        seg = y[int(a * sr) : int(b * sr)].astype(np.float64)
        return 10 * np.log10(np.mean(seg**2))

    drop = level(0.05, 0.1) - level(0.25, 0.3)  # 0.2 s apart: 60 dB * 0.2 / 0.3 = 40 dB expected
    assert 30 < drop < 50


# --- spec --------------------------------------------------------------------------------------------------


def test_spec_hash_is_stable_and_lists_equal_tuples():
    a = SpeechCorpusSpec()
    b = SpeechCorpusSpec(sources=["shakespeare", "kjv", "fortunes"], speed=[130, 200], snr_db=[10, 30])
    assert speech.spec_hash(a) == speech.spec_hash(b)
    assert re.fullmatch(r"[0-9a-f]{12}", speech.spec_hash(a))
    assert speech.spec_hash(a) != speech.spec_hash(SpeechCorpusSpec(seed=1))
    assert a.total == 8000 + 2000 + 300 + 500 + 300
    for bad in ({"speed": (200, 130)}, {"noise_prob": 1.5}, {"pitch": (30, 120)}, {"dev": -1}):
        with pytest.raises(ValueError):
            SpeechCorpusSpec(**bad)  # type: ignore[arg-type]


# --- corpus ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    return speech.build_corpus(tmp_path_factory.mktemp("speech"), TINY, workers=2, progress=False)


def _rows(manifests: dict[str, Path]) -> dict[str, list[dict]]:
    return {s: speech.read_manifest(p) for s, p in manifests.items()}


def test_corpus_layout_and_manifest_rows(tiny: dict[str, Path]):
    assert list(tiny) == list(speech.SPLITS)
    root = tiny["dev"].parent
    assert root.name == speech.spec_hash(TINY) and (root / "complete.json").is_file()
    rows = _rows(tiny)
    assert {s: len(r) for s, r in rows.items()} == {s: getattr(TINY, s) for s in speech.SPLITS}
    for split, rs in rows.items():
        for r in rs:
            assert tuple(r) == speech.MANIFEST_FIELDS and r["split"] == split
            assert r["text"] == speech.normalize_transcript(r["text"]) and 5 <= len(r["text"].split()) <= 15
            info = sf.info(r["path"])
            assert Path(r["path"]).is_absolute() and info.samplerate == 16000 and info.subtype == "PCM_16"
            assert r["duration"] == pytest.approx(info.frames / 16000, abs=1e-3)
            assert r["voice"] == f"{r['engine']}:" + (
                f"{r['accent']}+{r['variant']}" if r["engine"] == "espeak" else r["voice"].split(":")[1]
            )
            if r["engine"] == "espeak":
                assert 140 <= r["speed"] <= 190 and 30 <= r["pitch"] <= 70
            if r["snr_db"] is not None:
                assert 10 <= r["snr_db"] <= 30
    raw = [json.loads(line) for line in tiny["labelled"].read_text().splitlines()]
    assert all(r["path"] == f"wav/labelled/{r['id']}.wav" for r in raw)  # stored relative to the manifest
    everything = [r for rs in rows.values() for r in rs]
    assert any(r["snr_db"] is not None for r in everything) and any(r["snr_db"] is None for r in everything)
    assert any(r["reverb"] for r in everything) and not all(r["reverb"] for r in everything)
    assert all(r["text"] for r in rows["unlabelled"])  # the hidden truth is kept for pseudo-label WER
    stats = speech.corpus_stats(tiny["unlabelled"])
    assert stats["count"] == 12 and stats["hours"] == pytest.approx(
        sum(r["duration"] for r in rows["unlabelled"]) / 3600
    )
    assert sum(stats["accents"].values()) == 12 and 1 <= stats["voices"] <= 12
    complete = json.loads((root / "complete.json").read_text())
    assert complete["counts"] == {s: getattr(TINY, s) for s in speech.SPLITS} and complete["utterances_per_s"] > 0


def test_splits_are_disjoint_in_sentences_and_test_voices_unseen(tiny: dict[str, Path]):
    rows = _rows(tiny)
    texts = {s: [r["text"] for r in rs] for s, rs in rows.items()}
    all_texts = [t for ts in texts.values() for t in ts]
    assert len(set(all_texts)) == len(all_texts)  # no sentence in two splits (or twice in one)
    train_voices = {r["voice"] for s in ("unlabelled", "labelled") for r in rows[s]}
    train_variants = {r["variant"] for s in ("unlabelled", "labelled") for r in rows[s]}
    assert not {r["voice"] for r in rows["test_in"]} & train_voices
    assert not {r["variant"] for r in rows["test_in"] + rows["dev"]} & train_variants
    held_out = TINY.held_out_accent
    assert {r["accent"] for r in rows["test_ood"]} <= {held_out, "flite"}
    assert all(r["accent"] != held_out for s in speech.SPLITS[:4] for r in rows[s])
    if speech.flite_voices():
        assert {r["engine"] for r in rows["test_ood"]} == {"espeak", "flite"}
    # the whole variant partition, not just the variants the few sampled rows hit
    variants = json.loads((tiny["dev"].parent / "complete.json").read_text())["voices"]["variants"]
    train, dev, test = set(variants["unlabelled"]), set(variants["dev"]), set(variants["test_in"])
    assert train and dev and test and not (train & dev) and not (train & test) and not (dev & test)
    assert len(train) > len(dev) + len(test)


def test_rebuild_is_a_cache_hit(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    def boom(*args, **kwargs):
        raise AssertionError("a cached corpus must not synthesise")

    monkeypatch.setattr(speech, "synthesize", boom)
    monkeypatch.setattr(speech, "sentences", boom)
    assert speech.build_corpus(tiny["dev"].parent.parent, TINY, progress=False) == tiny


def test_a_deleted_wav_is_the_only_one_regenerated_identically(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    manifests = {s: p.read_bytes() for s, p in tiny.items()}
    victim = Path(speech.read_manifest(tiny["test_in"])[2]["path"])
    before = victim.read_bytes()
    victim.unlink()
    calls = []
    real = speech.synthesize
    monkeypatch.setattr(speech, "synthesize", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert speech.build_corpus(tiny["dev"].parent.parent, TINY, workers=2, progress=False) == tiny
    assert len(calls) == 1
    assert victim.read_bytes() == before
    assert {s: p.read_bytes() for s, p in tiny.items()} == manifests


def test_same_spec_elsewhere_gives_identical_manifests_and_audio(tiny: dict[str, Path], tmp_path: Path):
    other = speech.build_corpus(tmp_path, TINY, workers=1, progress=False)  # other worker count too
    for split in speech.SPLITS:
        assert other[split].read_bytes() == tiny[split].read_bytes()
    for a, b in zip(speech.read_manifest(tiny["dev"]), speech.read_manifest(other["dev"])):
        assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()


@needs_espeak
def test_an_interrupted_build_leaves_no_partial_files_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = SpeechCorpusSpec(unlabelled=6, labelled=2, dev=1, test_in=1, test_ood=2, seed=7)
    real, calls = speech.synthesize, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("engine died")
        return real(*args, **kwargs)

    monkeypatch.setattr(speech, "synthesize", flaky)
    with pytest.raises(RuntimeError, match="engine died"):
        speech.build_corpus(tmp_path, spec, workers=2, progress=False)
    out = tmp_path / speech.spec_hash(spec)
    assert not (out / "complete.json").exists() and not list(out.glob("*.jsonl"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    wavs = list(out.rglob("*.wav"))
    assert 1 <= len(wavs) <= 4 and all(sf.info(str(p)).frames > 0 for p in wavs)
    monkeypatch.setattr(speech, "synthesize", real)
    manifests = speech.build_corpus(tmp_path, spec, workers=2, progress=False)
    assert sum(len(speech.read_manifest(p)) for p in manifests.values()) == 12


def test_too_few_sentences_and_unknown_held_out_accent_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(speech, "sentences", lambda *a, **k: ["one two three four five", "six seven eight nine ten"])
    with pytest.raises(ValueError, match="2 distinct sentences"):
        speech.build_corpus(tmp_path, SpeechCorpusSpec(unlabelled=2, labelled=1, dev=0, test_in=0, test_ood=0))
    if shutil.which("espeak-ng"):
        small = SpeechCorpusSpec(unlabelled=1, labelled=1, dev=0, test_in=0, test_ood=0, held_out_accent="en-xx")
        with pytest.raises(ValueError, match="en-xx"):
            speech.build_corpus(tmp_path, small)


def test_read_manifest_rejects_malformed_rows(tmp_path: Path):
    good = {"id": "a", "path": "wav/a.wav", "text": "hello there"}
    (tmp_path / "m.jsonl").write_text(json.dumps(good) + "\n\n")
    assert speech.read_manifest(tmp_path / "m.jsonl")[0]["path"] == str((tmp_path / "wav/a.wav").resolve())
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        speech.read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(ValueError, match="path"):
        speech.read_manifest(tmp_path / "bad2.jsonl")


@needs_espeak
def test_missing_flite_changes_only_the_flite_utterances(monkeypatch: pytest.MonkeyPatch, caplog):
    with_flite, _ = speech._plan(TINY)
    monkeypatch.setattr(speech, "flite_voices", lambda: [])
    without, inventory = speech._plan(TINY)
    assert inventory["flite"] == [] and "flite is not installed" in caplog.text
    assert all(j.voice.engine == "espeak" for j in without)
    for a, b in zip(with_flite, without):
        if a.voice.engine == "espeak":
            assert a == b  # same text, voice, speed, pitch and corruptions
        else:
            assert a.split == "test_ood" and b.voice.accent == TINY.held_out_accent and a.text == b.text


# --- the digits task -------------------------------------------------------------------------------------------

DIGITS_VOCAB = {*speech.DIGIT_WORDS, *speech.COMMAND_VERBS, *speech.COMMAND_DIRECTIONS}


def test_digit_phrases_are_distinct_closed_vocabulary_and_in_range():
    texts = speech.digit_phrases(3000, min_words=2, max_words=6, seed=3)
    assert len(texts) == len(set(texts)) == 3000
    words = [t.split() for t in texts]
    assert all(2 <= len(w) <= 6 for w in words)
    assert {x for w in words for x in w} == DIGITS_VOCAB  # every word of the vocabulary occurs, nothing else
    commands = [w for w in words if w[0] in speech.COMMAND_VERBS]
    assert all(w[1] in speech.COMMAND_DIRECTIONS and set(w[2:]) <= set(speech.DIGIT_WORDS) for w in commands)
    assert 0.4 < len(commands) / len(words) < 0.6  # command_share 0.5
    assert {len(w) for w in words if w[0] in speech.DIGIT_WORDS} == {2, 3, 4, 5, 6}


def test_digit_phrases_extend_as_a_prefix_and_depend_on_the_seed():
    short = speech.digit_phrases(50, seed=1)
    assert speech.digit_phrases(400, seed=1)[:50] == short  # the LM's texts come after the corpus's prefix
    assert speech.digit_phrases(50, seed=2) != short


def test_digit_phrases_refuse_impossible_requests():
    with pytest.raises(ValueError, match="at most"):
        speech.digit_phrases(100, min_words=1, max_words=1, command_share=0.0)  # 11 one-digit strings exist
    with pytest.raises(ValueError, match="min_words"):
        speech.digit_phrases(5, min_words=1, max_words=3)  # a command needs a verb and a direction
    with pytest.raises(ValueError, match="task"):
        SpeechCorpusSpec(task="poems")


def test_sentence_corpora_keep_the_cache_hash_they_had_before_the_task_field():
    # values computed with the previous release of this module (before `task` existed), so caches stay valid
    assert speech.spec_hash(SpeechCorpusSpec()) == "e8c34d1313d9"
    tiny = SpeechCorpusSpec(unlabelled=20, labelled=12, dev=6, test_in=6, test_ood=6, max_words=8)
    assert speech.spec_hash(tiny) == "51a700bab9d0"
    assert speech.spec_hash(dataclasses.replace(tiny, task="digits")) != "51a700bab9d0"


@needs_espeak
def test_digits_corpus_speaks_disjoint_digit_phrases(tmp_path):
    spec = SpeechCorpusSpec(
        unlabelled=6, labelled=4, dev=2, test_in=2, test_ood=2, task="digits", min_words=2, max_words=4
    )
    manifests = speech.build_corpus(tmp_path, spec, workers=1, progress=False)
    rows = {s: speech.read_manifest(p) for s, p in manifests.items()}
    texts = [r["text"] for rs in rows.values() for r in rs]
    assert len(texts) == len(set(texts)) == spec.total
    assert all(set(t.split()) <= DIGITS_VOCAB for t in texts)
    for rs in rows.values():
        for r in rs:
            assert sf.info(r["path"]).frames > 0.3 * 16000  # at least two spoken words
