"""Fine-tuning and evaluation of the BigSSL recipe: CTC (the CPU default) or RNN-T (``finetune.decoder``).

:func:`fit` trains a :class:`~thrifty.methods.bigssl.model.CTCModel` or a
:class:`~thrifty.methods.bigssl.rnnt.TransducerModel` on one labelled split with SpecAugment, scores greedy dev
WER/CER every ``eval_every`` steps and keeps the best step (dev chooses; nothing else does). It is shared by the
fine-tuning units and the noisy-student students. :func:`evaluate` then tunes the LM fusion weights (λ, β) on dev
(CTC only: the prefix beam search with shallow fusion is a CTC decoder) and reads each test set once: greedy (and for
CTC fused-beam) WER/CER with ``jiwer``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from thrifty.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from thrifty.core.run import MetricsLog, seed_everything, write_json
from thrifty.methods.bigssl.config import BigSSLConfig
from thrifty.methods.bigssl.data import SpeechData, Split
from thrifty.methods.bigssl.decode import char_error_rate, ctc_prefix_beam_search, greedy_texts, word_error_rate
from thrifty.methods.bigssl.features import SpecAugmentConfig, spec_augment
from thrifty.methods.bigssl.lm import CharNGramLM
from thrifty.methods.bigssl.loop import StepBatches, adamw, build_encoder, finetune_dir, pretrain_dir, tri_stage
from thrifty.methods.bigssl.model import CTCModel, ctc_loss
from thrifty.methods.bigssl.rnnt import TransducerModel
from thrifty.methods.bigssl.tokens import decode as decode_ids

log = logging.getLogger(__name__)
ASRModel = CTCModel | TransducerModel


def build_model(cfg: BigSSLConfig, init: Path | None) -> ASRModel:
    """A fresh fine-tuning model of ``finetune.decoder``; ``init`` (a pre-training unit directory) loads its
    exported encoder."""
    encoder = build_encoder(cfg)
    if init is not None:
        state = load_file(str(init / "encoder.safetensors"))
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{init / 'encoder.safetensors'} does not fit the encoder: {missing[:3]} {unexpected[:3]}")
    if cfg.finetune.decoder == "ctc":
        return CTCModel(encoder=encoder)
    r = cfg.rnnt
    return TransducerModel(
        encoder=encoder,
        pred_dim=r.pred_dim,
        pred_hidden=r.pred_hidden,
        pred_layers=r.pred_layers,
        joint_dim=r.joint_dim,
        chunk_size=r.chunk_size,
    )


def training_loss(model: ASRModel, x: torch.Tensor, lengths: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """The fine-tuning loss of a batch: CTC or the transducer NLL, each per label and averaged over utterances."""
    if isinstance(model, TransducerModel):
        return model.loss(x, lengths, targets)
    log_probs, out_lengths = model(x, lengths)
    return ctc_loss(log_probs, out_lengths, targets)


@torch.no_grad()
def transducer_decode(
    model: TransducerModel, split: Split, *, device: torch.device, batch_size: int = 32
) -> list[tuple[str, float]]:
    """Greedy RNN-T (text, path log-probability) per utterance in eval mode, in the split's order."""
    was = model.training
    model.eval()
    order = sorted(range(len(split)), key=split.lengths.__getitem__)
    out: list[tuple[str, float] | None] = [None] * len(split)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x, lengths = split.batch(idx)
        hyps, scores = model.greedy(x.to(device), lengths.to(device))
        for row, i in enumerate(idx):
            out[i] = (decode_ids(hyps[row]), scores[row])
    model.train(was)
    return out  # type: ignore[return-value]


def greedy_hypotheses(model: ASRModel, split: Split, *, device: torch.device) -> list[str]:
    """Greedy transcripts of a split (CTC best path, or greedy transducer search)."""
    if isinstance(model, TransducerModel):
        return [text for text, _ in transducer_decode(model, split, device=device)]
    return greedy(frame_log_probs(model, split, device=device))


@torch.no_grad()
def frame_log_probs(model: CTCModel, split: Split, *, device: torch.device, batch_size: int = 32) -> list[np.ndarray]:
    """Per-utterance CTC log-probabilities (T'_i, V) in eval mode, in the split's order."""
    was = model.training
    model.eval()
    order = sorted(range(len(split)), key=split.lengths.__getitem__)  # one lengths list, not one per comparison
    out: list[np.ndarray | None] = [None] * len(split)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x, lengths = split.batch(idx)
        lp, out_lengths = model(x.to(device), lengths.to(device))
        for row, i in enumerate(idx):
            out[i] = lp[row, : int(out_lengths[row])].cpu().numpy()
    model.train(was)
    return out  # type: ignore[return-value]


def greedy(log_probs: list[np.ndarray]) -> list[str]:
    return [greedy_texts(torch.from_numpy(lp)[None], torch.tensor([lp.shape[0]]))[0] for lp in log_probs]


def beam(log_probs: list[np.ndarray], lm: CharNGramLM | None, *, lm_weight: float, length_bonus: float, width: int):
    """Best fused hypothesis per utterance."""
    return [
        ctc_prefix_beam_search(lp, beam=width, lm=lm, lm_weight=lm_weight, length_bonus=length_bonus)[0]
        for lp in log_probs
    ]


def tune_fusion(
    log_probs: list[np.ndarray], refs: list[str], lm: CharNGramLM, cfg: BigSSLConfig
) -> tuple[float, float, list[dict[str, float]]]:
    """(λ, β) of the grid with the lowest dev WER (ties: the first in grid order)."""
    grid = []
    for lm_weight in cfg.decode.lm_weights:
        for bonus in cfg.decode.length_bonuses:
            hyps = beam(log_probs, lm, lm_weight=lm_weight, length_bonus=bonus, width=cfg.decode.beam)
            grid.append(
                {"lm_weight": lm_weight, "length_bonus": bonus, "wer": word_error_rate(refs, [h.text for h in hyps])}
            )
    best = min(grid, key=lambda r: r["wer"])
    return best["lm_weight"], best["length_bonus"], grid


def fit(
    model: ASRModel,
    train: Split,
    dev: Split,
    *,
    cfg: BigSSLConfig,
    max_steps: int,
    seed: int,
    unit: str,
    out: Path,
    metrics: MetricsLog,
    device: torch.device,
    augment: SpecAugmentConfig | None,
    freeze_steps: int = 0,
    encoder_lr_scale: float = 1.0,
) -> dict[str, Any]:
    """Train with CTC or RNN-T; every ``eval_every`` steps score greedy dev WER and CER and keep the weights that are
    best on ``finetune.select_metric`` (``out/model.safetensors``). The encoder gets no update during the first
    ``freeze_steps`` steps (a pre-trained encoder under a random head) and learns at ``encoder_lr_scale`` × the
    head's rate. Resumable from ``out/checkpoints``. Returns the training record."""
    f = cfg.finetune
    model.to(device)
    optimizer = adamw(model, lr=f.lr, weight_decay=f.weight_decay, scales={"encoder.": encoder_lr_scale})
    warmup = max(1, round(f.warmup * max_steps))
    hold = round(f.hold * max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tri_stage(warmup, hold, max_steps))
    ckpt = out / "checkpoints"
    start, curve, best = 0, [], {"step": 0, "dev_wer": float("inf"), "dev_cer": float("inf")}
    if cfg.resume and (path := latest_checkpoint(ckpt)) is not None:
        state = load_checkpoint(path, model=model, optimizer=optimizer)
        start, curve, best = state["step"], state["extra"]["curve"], state["extra"]["best"]
        scheduler.last_epoch = start
        metrics.truncate(unit, start)
    else:
        metrics.truncate(unit, -1)
    batches = StepBatches(train.lengths, max_frames=f.max_frames, seed=seed)
    refs = [t or "" for t in dev.texts]
    t0, frames = time.perf_counter(), 0
    for step in range(start, max_steps):
        model.train()
        idx = batches(step)
        x, lengths = train.batch(idx)
        if augment is not None:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            x = spec_augment(x, lengths, augment, generator=g)
        loss = training_loss(model, x.to(device), lengths.to(device), train.targets(idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < freeze_steps:
            for p in model.encoder.parameters():
                p.grad = None  # AdamW skips parameters without a gradient: no update, no weight decay
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0))
        optimizer.step()
        scheduler.step()
        frames += int(lengths.sum())
        metrics.log({"unit": unit, "step": step + 1, "loss": float(loss.detach()), "grad_norm": grad_norm})
        if (step + 1) % f.eval_every == 0 or step + 1 == max_steps:
            hyps = greedy_hypotheses(model, dev, device=device)
            wer = word_error_rate(refs, hyps)
            cer = char_error_rate(refs, hyps)
            curve.append({"step": step + 1, "dev_wer": wer, "dev_cer": cer, "loss": float(loss.detach())})
            metrics.log({"unit": unit, "step": step + 1, "dev_wer": wer, "dev_cer": cer})
            key = f"dev_{f.select_metric}"
            if best["step"] == 0 or curve[-1][key] < best[key]:
                best = {"step": step + 1, "dev_wer": wer, "dev_cer": cer}
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
            save_checkpoint(ckpt, step=step + 1, model=model, optimizer=optimizer, extra={"curve": curve, "best": best})
    seconds = time.perf_counter() - t0
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    return {
        "best_step": best["step"],
        "dev_wer": best["dev_wer"],
        "dev_cer": best.get("dev_cer"),
        "curve": curve,
        "train_seconds": round(seconds, 2),
        "frames_per_s": round(frames / max(seconds, 1e-9), 1),
        "train_utterances": len(train),
        "train_hours": round(train.hours, 4),
    }


def evaluate(
    model: ASRModel, data: SpeechData, lm: CharNGramLM | None, cfg: BigSSLConfig, *, unit: str, device: torch.device
) -> dict[str, Any]:
    """Tune (λ, β) on dev (CTC with an LM), then score every test set once: greedy and fused beam search. A
    calibration pilot (``finetune.test=false``) reads nothing and returns ``{"test": {}}``."""
    res: dict[str, Any] = {"test": {}}
    if not cfg.finetune.test:
        return res
    fusion = None
    ctc = isinstance(model, CTCModel)
    if ctc and lm is not None and cfg.decode.use_lm:
        dev = data.dev.get("tune", unit)
        dev_lp = frame_log_probs(model, dev, device=device)
        lm_weight, bonus, grid = tune_fusion(dev_lp, [t or "" for t in dev.texts], lm, cfg)
        fusion = {"lm_weight": lm_weight, "length_bonus": bonus}
        res["fusion"] = {**fusion, "dev_grid": grid}
    for name, guarded in data.tests.items():
        split = guarded.get("test", unit)
        refs = [t or "" for t in split.texts]
        lp = frame_log_probs(model, split, device=device) if ctc else None
        hyps = greedy(lp) if lp is not None else greedy_hypotheses(model, split, device=device)
        scores = {"greedy_wer": word_error_rate(refs, hyps), "greedy_cer": char_error_rate(refs, hyps)}
        if fusion is not None and lp is not None:
            fused = [h.text for h in beam(lp, lm, width=cfg.decode.beam, **fusion)]
            scores.update(lm_wer=word_error_rate(refs, fused), lm_cer=char_error_rate(refs, fused))
        scores["examples"] = [{"ref": r, "greedy": h} for r, h in list(zip(refs, hyps))[:3]]
        res["test"][name] = scores
    return res


def finetune(
    init: str,
    fraction: float,
    seed: int,
    cfg: BigSSLConfig,
    data: SpeechData,
    run_dir: Path,
    metrics: MetricsLog,
    lm: CharNGramLM | None,
    device: torch.device,
) -> dict[str, Any]:
    """One fine-tuning unit: ``init`` (scratch | pretrained) at ``fraction`` of the labelled pool, ``seed``."""
    out = finetune_dir(run_dir, init, fraction, seed)
    done = out / "result.json"
    if cfg.resume and done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    unit = f"finetune/{init}/{fraction:g}/s{seed}"
    seed_everything(seed)
    source = pretrain_dir(run_dir, cfg.pretrain.objective, cfg.pretrain.seed) if init == "pretrained" else None
    model = build_model(cfg, source)
    train = data.labelled_fraction(fraction)
    record = fit(
        model,
        train,
        data.dev.get("select", unit),
        cfg=cfg,
        max_steps=cfg.finetune.max_steps,
        seed=seed,
        unit=unit,
        out=out,
        metrics=metrics,
        device=device,
        augment=cfg.specaugment if cfg.finetune.specaugment else None,
        freeze_steps=cfg.finetune.freeze_steps if source is not None else 0,
        encoder_lr_scale=cfg.finetune.encoder_lr_scale if source is not None else 1.0,
    )
    scores = evaluate(model, data, lm, cfg, unit=unit, device=device)
    result = {"init": init, "fraction": fraction, "seed": seed, **record, **scores}
    write_json(done, result)
    return result


def load_model(path: Path, cfg: BigSSLConfig, device: torch.device) -> ASRModel:
    """A fine-tuned model's kept weights (``model.safetensors`` of a unit)."""
    model = build_model(cfg, None)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device)
