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
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from thrifty.core.config import to_dict
from thrifty.core.run import cpu_name, data_root, resolve_device, write_json
from thrifty.data.text import Corpus
from thrifty.methods.autodistill.config import AutodistillConfig
from thrifty.methods.autodistill.data import MaskedBatches, load_corpus, masked_batches, split_docs
from thrifty.methods.autodistill.distill import Student, distill
from thrifty.methods.autodistill.latency import LatencyCache, machine_lock, measure_cached
from thrifty.methods.autodistill.space import Arch, build_encoder, count_flops, count_params
from thrifty.methods.autodistill.teacher import (
    MLMHead,
    TeacherCache,
    build_cache,
    cache_key,
    fit_head,
    load_teacher,
    mlm_accuracy,
    teacher_dir,
    teacher_fingerprint,
    word_embeddings,
)

log = logging.getLogger(__name__)


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

    @property
    def teacher_dim(self) -> int:
        return int(self.teacher.config.hidden_size)


def _save_batches(path: Path, batches: dict[str, MaskedBatches]) -> None:
    tensors = {f"{k}.{f}": getattr(b, f).contiguous() for k, b in batches.items() for f in ("ids", "labels")}
    save_file(tensors, str(path))


def _load_batches(path: Path) -> dict[str, MaskedBatches]:
    t = load_file(str(path))
    names = {k.split(".")[0] for k in t}
    return {n: MaskedBatches(t[f"{n}.ids"], t[f"{n}.labels"]) for n in names}


def prepare_context(cfg: AutodistillConfig, *, lock: Path | None = None) -> Context:
    """Load the teacher and reuse (or build and store) the fitted head, the teacher cache and the held-out
    masked batches, keyed by a digest of teacher, corpus and data/head settings."""
    d = cfg.data
    teacher, tokenizer = load_teacher(cfg.teacher.path)
    corpus = load_corpus(d.sources, d.files, text_field=d.text_field, holdout=d.holdout)
    key = cache_key(
        {
            "teacher": teacher_fingerprint(teacher_dir(cfg.teacher.path)),
            "corpus": corpus.digest,
            "data": to_dict(d),
            "head": {k: v for k, v in to_dict(cfg.teacher).items() if k != "path"},
        }
    )
    root = data_root(cfg) / f"autodistill-{key}"
    files = {n: root / f"{n}.safetensors" for n in ("head", "cache", "heldout")}
    info_file = root / "info.json"
    if all(f.is_file() for f in files.values()) and info_file.is_file():
        head = MLMHead(embedding=word_embeddings(teacher))
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
        cache = build_cache(
            teacher, head, batches("train", d.train_batches, d.mask_seed + 1), progress_bar=cfg.progress
        )
        held = {
            "val": batches("val", d.eval_batches, d.mask_seed + 2),
            "test": batches("test", d.eval_batches, d.mask_seed + 3),
        }
        encode = lambda ids: teacher(input_ids=ids).last_hidden_state
        info = {
            "key": key,
            "teacher_dir": str(teacher_dir(cfg.teacher.path)),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "teacher_layers": int(teacher.config.num_hidden_layers),
            "teacher_val_acc": mlm_accuracy(encode, head, held["val"])[0],
            "teacher_test_acc": mlm_accuracy(encode, head, held["test"])[0],
            "head_fit_acc": mlm_accuracy(encode, head, head_batches)[0],
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
    latency_cache = LatencyCache(data_root(cfg) / "autodistill-latency.json", cpu_name())
    return Context(cfg, teacher, tokenizer, head, cache, held["val"], held["test"], info, latency_cache, corpus, lock)


def build_student(ctx: Context, arch: Arch, *, seed: int) -> tuple[Student, list[str]]:
    """A fresh student on ``cfg.device`` (teacher tables copied as :func:`build_encoder` allows)."""
    encoder, copied = build_encoder(arch, ctx.teacher, seed=seed, embedding_init=ctx.cfg.distill.embedding_init)
    student = Student(encoder=encoder, head=ctx.head, teacher_dim=ctx.teacher_dim)
    return student.to(resolve_device(ctx.cfg.device)), copied


def measure_latency(ctx: Context, arch: Arch, encoder: nn.Module) -> dict[str, Any]:
    """Latency on this machine's CPU (the serving target) for every configured batch size, under the exclusive
    machine lock; a student trained on a GPU is timed from a CPU copy."""
    lc = ctx.cfg.latency
    if next(encoder.parameters()).device.type != "cpu":
        encoder = copy.deepcopy(encoder).cpu()
    out = {}
    with machine_lock(ctx.lock, exclusive=True):
        for b in lc.batch_sizes:
            out[str(b)] = measure_cached(
                encoder,
                arch.key,
                ctx.latency_cache,
                backend=lc.backend,
                batch=b,
                seq_len=lc.seq_len,
                threads=lc.num_threads,
                warmup=lc.warmup,
                repeats=lc.repeats,
                use_cache=lc.use_cache,
            )
    return out


def evaluate_arch(
    ctx: Context, arch: Arch, *, scale: int = 1, desc: str = "flash distillation"
) -> tuple[dict[str, Any], Student]:
    """Distil ``arch`` (``scale`` × the flash steps), score its validation MLM accuracy, time it.

    Returns a JSON-able record and the trained student."""
    cfg = ctx.cfg
    arch.validate()
    student, copied = build_student(ctx, arch, seed=cfg.seed)
    with machine_lock(ctx.lock, exclusive=False):
        record = distill(
            student, ctx.cache, cfg.distill, seed=cfg.seed, scale=scale, progress_bar=cfg.progress, desc=desc
        )
    val_acc, val_per_batch = mlm_accuracy(student.encode, student.head, ctx.val)
    latency = measure_latency(ctx, arch, student.encoder)
    objective = latency[str(cfg.latency.batch_sizes[0])]
    result = {
        "arch": arch.to_dict(),
        "key": arch.key,
        "label": arch.label,
        "scale": scale,
        "params": count_params(student.encoder),
        "flops": count_flops(student.encoder, cfg.latency.seq_len),
        "copied_from_teacher": len(copied),
        "val_acc": val_acc,
        "val_acc_per_batch": val_per_batch,
        "latency": latency,
        "latency_ms": objective["median_ms"],
        "latency_p90_ms": objective["p90_ms"],
        "distill": record,
    }
    return result, student
