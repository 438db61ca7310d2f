"""Noisy-student training as a reusable API (Park et al., *Improved Noisy Student Training for ASR*,
arXiv 2005.09629; BigSSL's ``-PS`` models, arXiv 2109.13226).

A generation: the teacher decodes the **clean** unlabelled audio (no SpecAugment; with LM fusion when enabled) →
each pseudo-label gets a length-normalised confidence → the confident ones are kept (:func:`filter_pseudo_labels`)
→ optionally balanced to the labelled length distribution (:func:`balance`) → mixed with the labelled subset
(:func:`mix`) → a student, initialised from the pre-trained checkpoint, trains on the mix **with** SpecAugment
(:func:`~thrifty.methods.bigssl.finetune.fit`) and teaches the next generation.

The filter (the card's form, unverified against the paper): fit ``s ≈ a·ℓ + b`` by least squares on the teacher's
dev scores (ℓ = characters of the hypothesis), let σ be the standard deviation of ``(s − aℓ − b)/√ℓ`` on dev, and
keep an unlabelled utterance when ``(s − aℓ − b)/(σ√ℓ) > τ``. Every generation persists its pseudo-labels
(``pseudo_labels.jsonl``: text, score, normalised score, kept) and, when the hidden truth exists (the synthetic
corpus), their WER — measured, never used for any decision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thrifty.core.run import MetricsLog, atomic_write_text, seed_everything, write_json
from thrifty.methods.bigssl.config import BigSSLConfig
from thrifty.methods.bigssl.data import SpeechData, Split
from thrifty.methods.bigssl.decode import word_error_rate
from thrifty.methods.bigssl.finetune import (
    ASRModel,
    build_model,
    evaluate,
    fit,
    frame_log_probs,
    greedy,
    load_model,
    transducer_decode,
)
from thrifty.methods.bigssl.finetune import beam as beam_search
from thrifty.methods.bigssl.lm import CharNGramLM
from thrifty.methods.bigssl.loop import finetune_dir, nst_dir, pretrain_dir
from thrifty.methods.bigssl.rnnt import TransducerModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PseudoLabel:
    index: int  # position in the unlabelled split
    id: str
    text: str
    score: float  # the decoder's score of the hypothesis (fused with the LM when it was used)
    normalized: float = float("nan")
    kept: bool = False

    @property
    def length(self) -> int:
        return max(len(self.text), 1)


def decode_scores(
    log_probs: list[np.ndarray], lm: CharNGramLM | None, *, fusion: dict[str, float] | None, beam: int
) -> list[tuple[str, float]]:
    """(text, score) per utterance: the fused beam's best hypothesis, or without fusion the greedy path's text and
    log-probability (the sum over frames of the best token's log-probability)."""
    if fusion is not None and lm is not None:
        return [(h.text, float(h.score)) for h in beam_search(log_probs, lm, width=beam, **fusion)]
    return [(text, float(lp.max(axis=1).sum())) for text, lp in zip(greedy(log_probs), log_probs)]


def teacher_decode(
    teacher: ASRModel,
    split: Split,
    lm: CharNGramLM | None,
    *,
    fusion: dict[str, float] | None,
    beam: int,
    device: torch.device,
) -> list[tuple[str, float]]:
    """(text, score) per utterance of ``split``: :func:`decode_scores` for a CTC teacher; greedy transducer search
    and its path log-probability for an RNN-T teacher (no LM fusion: the fused beam search is a CTC decoder)."""
    if isinstance(teacher, TransducerModel):
        return transducer_decode(teacher, split, device=device)
    return decode_scores(frame_log_probs(teacher, split, device=device), lm, fusion=fusion, beam=beam)


def fit_length_normaliser(scores: list[float], lengths: list[int]) -> tuple[float, float, float]:
    """Least-squares ``s ≈ a·ℓ + b`` and σ = std of ``(s − aℓ − b)/√ℓ``; returns (a, b, σ)."""
    s = np.asarray(scores, dtype=np.float64)
    ell = np.maximum(np.asarray(lengths, dtype=np.float64), 1.0)
    if len(s) < 2 or np.ptp(ell) == 0:
        a, b = 0.0, float(s.mean()) if len(s) else 0.0
    else:
        a, b = np.polyfit(ell, s, 1)
    resid = (s - a * ell - b) / np.sqrt(ell)
    sigma = float(resid.std()) if len(s) > 1 else 1.0
    return float(a), float(b), max(sigma, 1e-6)


def normalized_score(score: float, length: int, a: float, b: float, sigma: float) -> float:
    ell = max(length, 1)
    return (score - a * ell - b) / (sigma * np.sqrt(ell))


def filter_pseudo_labels(
    labels: list[PseudoLabel], *, a: float, b: float, sigma: float, tau: float
) -> list[PseudoLabel]:
    """Set ``normalized`` and ``kept`` (normalised score strictly above τ, non-empty text); returns the kept ones."""
    for p in labels:
        p.normalized = float(normalized_score(p.score, p.length, a, b, sigma))
        p.kept = bool(p.text) and p.normalized > tau
    return [p for p in labels if p.kept]


def balance(labels: list[PseudoLabel], reference_lengths: list[int], *, rng: np.random.Generator) -> list[PseudoLabel]:
    """Subsample ``labels`` so their word-count histogram follows the reference's (as many as the rarest bin
    allows); Improved NST balances its pseudo-labels so the student's data keeps the labelled distribution."""
    if not labels or not reference_lengths:
        return labels
    words = np.array([len(p.text.split()) for p in labels])
    ref = np.bincount(np.asarray(reference_lengths), minlength=words.max() + 1).astype(float)
    ref = ref[: words.max() + 1] / ref.sum()
    have = np.bincount(words, minlength=len(ref))
    usable = [(have[k] / ref[k]) for k in range(len(ref)) if ref[k] > 0 and have[k] > 0]
    total = int(min(usable)) if usable else 0
    if total == 0:
        return labels
    keep: list[PseudoLabel] = []
    for k in range(len(ref)):
        n = round(float(ref[k]) * total)
        members = [p for p, w in zip(labels, words) if w == k]
        if n and members:
            keep += [members[i] for i in sorted(rng.choice(len(members), size=min(n, len(members)), replace=False))]
    return sorted(keep, key=lambda p: p.index)


def mix(labelled: Split, unlabelled: Split, pseudo: list[PseudoLabel]) -> Split:
    """The labelled utterances plus the pseudo-labelled ones, as one training split."""
    chosen = unlabelled.subset([p.index for p in pseudo]).with_texts([p.text for p in pseudo], name="pseudo")
    return Split(
        "labelled+pseudo",
        labelled.ids + chosen.ids,
        labelled.feats + chosen.feats,
        labelled.texts + chosen.texts,
        labelled.meta + chosen.meta,
        labelled.normalizer,
    )


def write_pseudo_labels(path: Path, labels: list[PseudoLabel]) -> None:
    atomic_write_text(path, "".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in labels))


def teacher_dir(run_dir: Path, fraction: float, seed: int, generation: int) -> Path:
    """Generation 1 is taught by the pre-trained fine-tuned model; generation g by the student of g − 1."""
    return (
        finetune_dir(run_dir, "pretrained", fraction, seed)
        if generation == 1
        else nst_dir(run_dir, fraction, seed, generation - 1)
    )


def generation(
    fraction: float,
    seed: int,
    gen: int,
    cfg: BigSSLConfig,
    data: SpeechData,
    run_dir: Path,
    metrics: MetricsLog,
    lm: CharNGramLM | None,
    device: torch.device,
) -> dict[str, Any]:
    """One noisy-student generation for (fraction, seed); resumable; returns its ``result.json``."""
    out = nst_dir(run_dir, fraction, seed, gen)
    done = out / "result.json"
    if cfg.resume and done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    unit = f"nst/{fraction:g}/s{seed}/gen{gen}"
    source = teacher_dir(run_dir, fraction, seed, gen)
    teacher_result = json.loads((source / "result.json").read_text())
    teacher = load_model(source, cfg, device)
    fusion = teacher_result.get("fusion") if cfg.nst.fusion else None
    fusion = {"lm_weight": fusion["lm_weight"], "length_bonus": fusion["length_bonus"]} if fusion else None

    # 1. the teacher decodes the clean unlabelled audio and dev (dev fits the normaliser)
    unl = data.unlabelled
    if cfg.nst.max_unlabelled and len(unl) > cfg.nst.max_unlabelled:
        unl = unl.subset(list(range(cfg.nst.max_unlabelled)))
    decoded = teacher_decode(teacher, unl, lm, fusion=fusion, beam=cfg.decode.beam, device=device)
    dev = data.dev.get("nst_filter", unit)
    dev_decoded = teacher_decode(teacher, dev, lm, fusion=fusion, beam=cfg.decode.beam, device=device)
    a, b, sigma = fit_length_normaliser([s for _, s in dev_decoded], [max(len(t), 1) for t, _ in dev_decoded])

    # 2. filter, balance, cap
    labels = [PseudoLabel(i, unl.ids[i], text, score) for i, (text, score) in enumerate(decoded)]
    kept = filter_pseudo_labels(labels, a=a, b=b, sigma=sigma, tau=cfg.nst.tau)
    labelled = data.labelled_fraction(fraction)
    if cfg.nst.balance:
        kept = balance(kept, [len((t or "").split()) for t in labelled.texts], rng=np.random.default_rng(seed))
    if cfg.nst.max_pseudo and len(kept) > cfg.nst.max_pseudo:
        kept = sorted(sorted(kept, key=lambda p: -p.normalized)[: cfg.nst.max_pseudo], key=lambda p: p.index)
    chosen = {p.index for p in kept}
    for p in labels:
        p.kept = p.index in chosen
    write_pseudo_labels(out / "pseudo_labels.jsonl", labels)

    # 3. pseudo-label quality against the hidden truth (reported only)
    truth = data.unlabelled_truth.get("pseudo_label_quality", unit)
    quality: dict[str, Any] = {}
    if all(t is not None for t in truth):
        quality["pseudo_wer_all"] = word_error_rate([truth[p.index] for p in labels], [p.text for p in labels])
        if kept:
            quality["pseudo_wer_kept"] = word_error_rate([truth[p.index] for p in kept], [p.text for p in kept])
    stats = {
        "generation": gen,
        "teacher": str(source.relative_to(run_dir)),
        "fusion": fusion,
        "normaliser": {"a": a, "b": b, "sigma": sigma, "tau": cfg.nst.tau},
        "decoded": len(labels),
        "kept": len(kept),
        "kept_fraction": len(kept) / max(len(labels), 1),
        **quality,
    }
    metrics.log({"unit": unit, **{k: v for k, v in stats.items() if isinstance(v, int | float)}})

    # 4. the student: pre-trained initialisation, labelled + pseudo-labelled audio, SpecAugment
    seed_everything(seed + 7919 * gen)
    student = build_model(cfg, pretrain_dir(run_dir, cfg.pretrain.objective, cfg.pretrain.seed))
    train = mix(labelled, unl, kept)
    record = fit(
        student,
        train,
        data.dev.get("select", unit),
        cfg=cfg,
        max_steps=cfg.nst.max_steps,
        seed=seed + 7919 * gen,
        unit=unit,
        out=out,
        metrics=metrics,
        device=device,
        augment=cfg.specaugment,
        freeze_steps=cfg.finetune.freeze_steps,
        encoder_lr_scale=cfg.finetune.encoder_lr_scale,
    )
    result = {
        "fraction": fraction,
        "seed": seed,
        **stats,
        **record,
        **evaluate(student, data, lm, cfg, unit=unit, device=device),
    }
    write_json(done, result)
    return result
