"""Masking statistics, packed sequences, corpus splits and the GLUE-analogue tasks on the shipped corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from thrifty.data.text import CorpusError, load_shakespeare
from thrifty.methods.autodistill.data import GENRE, build_task, load_corpus, mask_tokens, sample_sequences, split_docs
from thrifty.methods.autodistill.teacher import load_teacher


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(["shakespeare", "kjv", "fortunes"], [], text_field="text", holdout=0.1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_teacher()[1]


def test_masking_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 64), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    masked, labels = mask_tokens(ids, special_ids=[0, 1, 2, 3], mask_id=3, vocab_size=1000, prob=0.15, seed=0)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # specials never masked
    assert chosen.sum(1).eq(round(0.15 * 62)).all()
    assert torch.equal(labels[chosen], ids[chosen])
    frac_mask = float((masked[chosen] == 3).float().mean())
    frac_kept = float((masked[chosen] == ids[chosen]).float().mean())
    assert 0.75 < frac_mask < 0.85 and 0.06 < frac_kept < 0.15
    assert torch.equal(masked[~chosen], ids[~chosen])
    again = mask_tokens(ids, special_ids=[0, 1, 2, 3], mask_id=3, vocab_size=1000, prob=0.15, seed=0)
    assert torch.equal(again[0], masked)


def test_sequences_are_packed_and_deterministic(corpus, tokenizer) -> None:
    docs = split_docs(corpus, "val")
    a = sample_sequences(docs, tokenizer, num=5, seq_len=32, seed=3)
    b = sample_sequences(docs, tokenizer, num=5, seq_len=32, seed=3)
    assert a.shape == (5, 32) and torch.equal(a, b)
    assert (a[:, 0] == tokenizer.cls_token_id).all() and (a[:, -1] == tokenizer.sep_token_id).all()
    assert not (a == tokenizer.pad_token_id).any()


def test_splits_hold_out_whole_documents(corpus) -> None:
    ids = {split: {(d.source, d.id) for d in split_docs(corpus, split)} for split in ("train", "val", "test")}
    assert ids["val"] and ids["test"]
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])


def test_genre_table_names_real_plays() -> None:
    stems = {d.id for d in load_shakespeare()}
    assert set(GENRE) <= stems
    assert {"sonnets", "rape_of_lucrece", "pericles"}.isdisjoint(GENRE)


@pytest.mark.parametrize("name", ["genre", "testament", "topic", "source", "same_work"])
def test_tasks_are_balanced_with_disjoint_regions(corpus, name: str) -> None:
    task = build_task(name, corpus, per_class=6, seed=0)
    k = len(task.classes)
    n_train = 12 if name == "same_work" else 6 * k
    assert len(task.texts["train"]) == len(task.labels["train"]) == n_train
    assert set(task.labels["train"]) == set(range(k))
    assert not set(task.texts["train"]) & set(task.texts["test"])
    assert task.pairs == (name == "same_work")
    assert build_task(name, corpus, per_class=6, seed=0).texts == task.texts


def test_user_files_join_the_corpus_and_bad_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one document of plain text " * 50)
    with (tmp_path / "b.jsonl").open("w") as fh:
        for i in range(4):
            fh.write(json.dumps({"text": f"line {i} " * 40}) + "\n")
    corpus = load_corpus([], [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], text_field="text", holdout=0.2)
    assert sum(len(v) for v in corpus.splits["files"].values()) == 5
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        load_corpus([], [str(tmp_path / "bad.jsonl")], text_field="text", holdout=0.2)
    with pytest.raises(ValueError, match="nothing to distil"):
        load_corpus([], [], text_field="text", holdout=0.1)


def test_glue_folders_become_probe_tasks(tmp_path: Path) -> None:
    from thrifty.methods.autodistill.data import glue_task_data

    rte = tmp_path / "RTE"
    rte.mkdir()
    rows = [f"{i}\tpremise {i}\thypothesis {i}\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(20)]
    (rte / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows[:6]) + "\n")
    task = glue_task_data(str(tmp_path), "rte", seed=0)
    assert task.pairs and task.classes == ["entailment", "not_entailment"]
    assert len(task.texts["val"]) == 2 and len(task.texts["train"]) == 18 and len(task.texts["test"]) == 6
    assert not set(task.texts["val"]) & set(task.texts["train"])
    assert task.labels["test"] == [1, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="regression"):
        glue_task_data(str(tmp_path), "STS-B", seed=0)
