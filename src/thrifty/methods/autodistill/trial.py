"""What every AutoDistill worker needs (teacher, head, cache, held-out batches) and how one architecture is
evaluated: build → flash (or longer) distillation → held-out MLM accuracy → measured latency.

The context is rebuilt from files under the data directory, so search worker processes load the very same
teacher cache and masks as the main process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from thrifty.core.config import to_dict
from thrifty.core.run import cpu_name, data_root, resolve_device, write_json
from thrifty.data.text import Corpus
from thrifty.methods.autodistill.config import AutodistillConfig
from thrifty.methods.autodistill.data import MaskedBatches, load_corpus, masked_batches, split_docs
from thrifty.methods.autodistill.distill import Student, distill
from thrifty.methods.autodistill.ibbert import read_teacher_info
from thrifty.methods.autodistill.latency import LatencyCache, interleaved_latency, machine_lock, measure
from thrifty.methods.autodistill.space import Arch, build_encoder, count_flops, count_params, mobilebert_like
from thrifty.methods.autodistill.teacher import (
    MLMHead,
    TeacherCache,
    build_cache,
    cache_key,
    fit_head,
    mlm_accuracy,
    resolve_teacher,
)

log = logging.getLogger(__name__)
HEAD_KEYS = ("head_batches", "head_steps", "head_lr", "head_positions")
#: cached batches whose tokens give the teacher embedding statistics a NoNorm student starts from
NORM_FOLD_BATCHES = 8


@dataclasses.dataclass
class Context:
    """Everything a trial reads; built once per process by :func:`prepare_context`."""

    cfg: AutodistillConfig
    teacher: nn.Module
    tokenizer: Any
    head: MLMHead
    cache: TeacherCache
    val: MaskedBatches
    test: MaskedBatches
    info: dict[str, Any]
    latency_cache: LatencyCache
    corpus: Corpus
    lock: Path | None = None
    _reference: nn.Module | None = None

    @property
    def teacher_dim(self) -> int:
        return int(self.teacher.config.hidden_size)

    @property
    def reference_arch(self) -> Arch:
        """The fixed architecture every latency is a ratio to: the MobileBERT-like baseline."""
        return mobilebert_like(self.teacher_dim, embedding_size=self.cfg.space.embedding_size)

    @property
    def reference_encoder(self) -> nn.Module:
        if self._reference is None:
            self._reference, _ = build_encoder(self.reference_arch, self.teacher, seed=0, embedding_init="random")
            self._reference.eval()
        return self._reference


def _save_batches(path: Path, batches: dict[str, MaskedBatches]) -> None:
    tensors = {f"{k}.{f}": getattr(b, f).contiguous() for k, b in batches.items() for f in ("ids", "labels")}
    save_file(tensors, str(path))


def _load_batches(path: Path) -> dict[str, MaskedBatches]:
    t = load_file(str(path))
    names = {k.split(".")[0] for k in t}
    return {n: MaskedBatches(t[f"{n}.ids"], t[f"{n}.labels"]) for n in names}


def unigram_accuracy(train: MaskedBatches, held: MaskedBatches) -> tuple[float, int]:
    """The trivial baseline: always predict the most frequent masked token of the distillation batches.
    Returns (its accuracy on ``held``, the token id)."""
    labels = train.labels[train.labels != -100]
    token = int(torch.bincount(labels).argmax())
    target = held.labels[held.labels != -100]
    return float((target == token).float().mean()), token


def prepare_context(cfg: AutodistillConfig, *, lock: Path | None = None) -> Context:
    """Load (an IB-BERT teacher: pre-train once) the teacher and reuse (or build and store) its MLM head (fitted
    when it has none), the teacher cache and the held-out masked batches, keyed by a digest of teacher,
    corpus and data/head settings."""
    d = cfg.data
    longest = cfg.distill.final_steps * cfg.distill.long_factor
    if d.train_batches < longest:
        log.warning(
            "data.train_batches (%d) is smaller than the longer distillation's MLM stage (%d steps): it will see "
            "cached masked batches more than once, and students memorise their labels",
            d.train_batches,
            longest,
        )
    corpus = load_corpus(d.sources, d.files, text_field=d.text_field, holdout=d.holdout)
    t = resolve_teacher(cfg, corpus, data_root(cfg))
    teacher, tokenizer = t.encoder, t.tokenizer
    key = cache_key(
        {
            "teacher": t.fingerprint,
            "corpus": corpus.digest,
            "data": to_dict(d),
            "head": "own" if t.head is not None else {k: getattr(cfg.teacher, k) for k in HEAD_KEYS},
        }
    )
    root = data_root(cfg) / f"autodistill-{key}"
    files = {n: root / f"{n}.safetensors" for n in ("head", "cache", "heldout")}
    info_file = root / "info.json"
    if all(f.is_file() for f in files.values()) and info_file.is_file():
        head = MLMHead(embedding=t.decoder, eps=getattr(teacher.config, "layer_norm_eps", 1e-12))
        head.load_state_dict(load_file(str(files["head"])), strict=False)
        cache = TeacherCache.load(files["cache"])
        held = _load_batches(files["heldout"])
        info = json.loads(info_file.read_text())
        log.info("reusing the teacher head and cache in %s", root)
    else:
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()

        def batches(split: str, n: int, seed: int) -> MaskedBatches:
            return masked_batches(
                split_docs(corpus, split),
                tokenizer,
                num_batches=n,
                batch_size=d.batch_size,
                seq_len=d.seq_len,
                prob=d.mask_prob,
                seed=seed,
            )

        encode = lambda ids: teacher(input_ids=ids).last_hidden_state
        extra: dict[str, Any] = {}
        if t.head is None:
            head_batches = batches("train", cfg.teacher.head_batches, d.mask_seed)
            head = fit_head(
                teacher,
                head_batches,
                steps=cfg.teacher.head_steps,
                lr=cfg.teacher.head_lr,
                positions=cfg.teacher.head_positions,
                seed=d.mask_seed,
                progress_bar=cfg.progress,
            )
            extra["head_fit_acc"] = mlm_accuracy(encode, head, head_batches)[0]
        else:
            head = t.head
        train_batches = batches("train", d.train_batches, d.mask_seed + 1)
        cache = build_cache(teacher, head, train_batches, progress_bar=cfg.progress)
        held = {
            "val": batches("val", d.eval_batches, d.mask_seed + 2),
            "test": batches("test", d.eval_batches, d.mask_seed + 3),
        }
        unigram_val, token = unigram_accuracy(train_batches, held["val"])
        info = {
            "key": key,
            "teacher_source": cfg.teacher.source,
            "teacher_name": t.name,
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "teacher_layers": int(teacher.config.num_hidden_layers),
            "teacher_dim": int(teacher.config.hidden_size),
            "vocab_size": len(tokenizer),
            "teacher_val_acc": mlm_accuracy(encode, head, held["val"])[0],
            "teacher_test_acc": mlm_accuracy(encode, head, held["test"])[0],
            "unigram_val_acc": unigram_val,
            "unigram_test_acc": unigram_accuracy(train_batches, held["test"])[0],
            "unigram_token": tokenizer.convert_ids_to_tokens(token),
            **extra,
            "corpus": corpus.manifest,
            "corpus_digest": corpus.digest,
            "cache_mb": sum(t.numel() * t.element_size() for t in (cache.hidden, cache.attentions, cache.logits))
            / 2**20,
            "build_seconds": time.perf_counter() - t0,
        }
        state = {k: v for k, v in head.state_dict().items() if k != "embedding"}
        save_file(state, str(files["head"]))
        cache.save(files["cache"])
        _save_batches(files["heldout"], held)
        write_json(info_file, info)
    if cfg.teacher.source == "ibbert":
        info["teacher_pretraining"] = read_teacher_info(t.directory)
    latency_cache = LatencyCache(data_root(cfg) / "autodistill-latency.json", cpu_name())
    return Context(cfg, teacher, tokenizer, head, cache, held["val"], held["test"], info, latency_cache, corpus, lock)


def build_student(ctx: Context, arch: Arch, *, seed: int) -> tuple[Student, list[str]]:
    """A fresh student on ``cfg.device`` (teacher tables copied as :func:`build_encoder` allows)."""
    encoder, copied = build_encoder(
        arch,
        ctx.teacher,
        seed=seed,
        embedding_init=ctx.cfg.distill.embedding_init,
        sample_ids=ctx.cache.ids[:NORM_FOLD_BATCHES].flatten(0, 1),
    )
    student = Student(encoder=encoder, head=ctx.head, teacher_dim=ctx.teacher_dim)
    return student.to(resolve_device(ctx.cfg.device)), copied


def measure_latency(ctx: Context, arch: Arch, encoder: nn.Module) -> dict[str, Any]:
    """Latency on this machine's CPU (the serving target) for every configured batch size, relative to the
    reference architecture timed in alternation with it (:func:`~.latency.interleaved_latency`), under the
    exclusive machine lock; a student trained on a GPU is timed from a CPU copy. Each result holds the
    candidate's own median/p90 ms, ``ratio`` (median per-round ratio to the reference) with its interval, and
    the reference's median ms in that session."""
    lc = ctx.cfg.latency
    if next(encoder.parameters()).device.type != "cpu":
        encoder = copy.deepcopy(encoder).cpu()
    reference = ctx.reference_arch

    def against_reference(batch: int) -> dict[str, Any]:
        shape = dict(batch=batch, seq_len=lc.seq_len, threads=lc.num_threads, warmup=lc.warmup)
        if lc.backend == "torch":
            res = interleaved_latency(
                {"reference": ctx.reference_encoder, "candidate": encoder}, reference="reference",
                rounds=lc.rounds, runs_per_round=lc.runs_per_round, **shape,
            )  # fmt: skip
            cand, ref = res["models"]["candidate"], res["models"]["reference"]
            rec = {"backend": "torch", "protocol": "interleaved", **shape,
                   **{k: cand[k] for k in ("median_ms", "p90_ms", "mean_ms", "cv", "runs")},
                   "ratio": cand["ratio_median"], "ratio_ci95": cand["ratio_ci95"]}  # fmt: skip
        else:
            cand = measure(encoder, backend=lc.backend, repeats=lc.repeats, **shape)
            ref = measure(ctx.reference_encoder, backend=lc.backend, repeats=lc.repeats, **shape)
            rec = {**cand, "protocol": "back-to-back", "ratio": cand["median_ms"] / ref["median_ms"],
                   "ratio_ci95": [math.nan, math.nan]}  # fmt: skip
        return {**rec, "reference_ms": ref["median_ms"], "reference": reference.label}

    out = {}
    with machine_lock(ctx.lock, exclusive=True):
        for b in lc.batch_sizes:
            key = ctx.latency_cache.key(f"{arch.key}|vs-{reference.key}|r{lc.rounds}", lc.backend, b, lc.seq_len,
                                        lc.num_threads)  # fmt: skip
            out[str(b)] = ctx.latency_cache.get_or_measure(
                key, lambda b=b: against_reference(b), min_runs=lc.rounds * lc.runs_per_round, use_cache=lc.use_cache
            )
    return out


def evaluate_arch(
    ctx: Context, arch: Arch, *, scale: int = 1, desc: str = "flash distillation", seed: int | None = None
) -> tuple[dict[str, Any], Student]:
    """Distil ``arch`` (``scale`` × the flash steps) with distillation seed ``seed`` (default ``cfg.seed``),
    score its validation MLM accuracy, time it.

    Returns a JSON-able record and the trained student."""
    cfg = ctx.cfg
    seed = cfg.seed if seed is None else seed
    arch.validate()
    student, copied = build_student(ctx, arch, seed=seed)
    with machine_lock(ctx.lock, exclusive=False):
        record = distill(student, ctx.cache, cfg.distill, seed=seed, scale=scale, progress_bar=cfg.progress, desc=desc)
    val_acc, val_per_batch = mlm_accuracy(student.encode, student.head, ctx.val)
    latency = measure_latency(ctx, arch, student.encoder)
    objective = latency[str(cfg.latency.batch_sizes[0])]
    result = {
        "arch": arch.to_dict(),
        "key": arch.key,
        "label": arch.label,
        "scale": scale,
        "seed": seed,
        "params": count_params(student.encoder),
        "flops": count_flops(student.encoder, cfg.latency.seq_len),
        "copied_from_teacher": len(copied),
        "val_acc": val_acc,
        "val_acc_per_batch": val_per_batch,
        "latency": latency,
        "latency_ratio": objective["ratio"],
        "latency_ms": objective["median_ms"],
        "latency_p90_ms": objective["p90_ms"],
        "distill": record,
    }
    return result, student
