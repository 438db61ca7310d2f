"""Self-supervised pre-training of the Conformer: wav2vec 2.0 (Baevski et al., arXiv 2006.11477) or w2v-BERT
(Chung et al., arXiv 2108.06209), as BigSSL pre-trains its encoders (arXiv 2109.13226).

One step, shapes for a batch of B utterances with T' subsampled frames:

1. ``z = subsample(features)`` (B, T', d); the quantizer reads ``LayerNorm(z)`` **unmasked** →
   targets ``q`` (B, T', code_dim) and code ids (B, T', G).
2. Span masking of ``z``: wav2vec 2.0 replaces masked frames by a learned vector, w2v-BERT by random vectors.
3. wav2vec 2.0: all blocks → context ``c`` → Linear to code_dim; contrastive loss of ``c`` against ``q`` with K
   negatives drawn from other masked frames of the same utterance, plus 0.1 × the diversity loss.
   w2v-BERT: the first ``contrastive_layers`` blocks give the contrastive context (same loss); the remaining blocks
   predict the code ids at masked frames (one softmax per group); ``L = L_contrastive + mlm_weight · L_mlm``.

Codebook health (perplexity, used codes, diversity) is logged every step and a collapse (perplexity below a tenth
of G·V) is warned about. Under ``torchrun`` the model is wrapped in DDP and every rank reads its own
length-bucketed batches. The encoder is exported as ``encoder.safetensors`` for fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from thrifty.core import distributed
from thrifty.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from thrifty.core.distributed import DistInfo
from thrifty.core.run import MetricsLog, progress, seed_everything, write_json
from thrifty.methods.bigssl.config import BigSSLConfig
from thrifty.methods.bigssl.data import SpeechData, Split
from thrifty.methods.bigssl.loop import StepBatches, adamw, build_encoder, pretrain_dir, warmup_cosine
from thrifty.methods.bigssl.model import Conformer
from thrifty.methods.bigssl.ssl import (
    CodebookMonitor,
    GumbelProductQuantizer,
    MLMHead,
    apply_mask,
    contrastive_loss,
    mlm_loss,
    sample_negatives,
    span_mask,
    temperature_schedule,
    wav2vec2_loss,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SSLOutput:
    loss: torch.Tensor
    contrastive: torch.Tensor  # per masked frame
    accuracy: torch.Tensor
    diversity: torch.Tensor
    mlm: torch.Tensor
    mlm_accuracy: torch.Tensor
    masked: int
    quantizer: Any  # QuantizerOutput
    valid: torch.Tensor


class SSLModel(nn.Module):
    """The encoder plus what pre-training adds: quantizer, context projection, mask vector or MLM head."""

    def __init__(
        self,
        *,
        encoder: Conformer,
        objective: str,
        groups: int,
        codes: int,
        code_dim: int,
        contrastive_layers: int,
    ):
        super().__init__()
        self.encoder, self.objective = encoder, objective
        dim = encoder.dim
        self.feature_norm = nn.LayerNorm(dim)
        self.quantizer = GumbelProductQuantizer(dim_in=dim, groups=groups, codes=codes, dim_out=code_dim)
        self.project = nn.Linear(dim, code_dim)
        self.contrastive_layers = len(encoder.layers) if objective == "wav2vec2" else contrastive_layers
        if objective == "wav2vec2":
            self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())
        else:
            self.mlm_head = MLMHead(dim=dim, groups=groups, codes=codes)

    def forward(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        *,
        temperature: float,
        mask_prob: float,
        mask_span: int,
        num_negatives: int,
        kappa: float,
        diversity_weight: float,
        mlm_weight: float,
        generator: torch.Generator,
    ) -> SSLOutput:
        z, _, valid = self.encoder.frontend(feats, lengths)
        q = self.quantizer(self.feature_norm(z), valid, temperature=temperature, generator=generator)
        mask = span_mask(valid, mask_prob=mask_prob, span=mask_span, generator=generator)
        x = apply_mask(z, mask, mask_embedding=getattr(self, "mask_embedding", None), generator=generator)
        c = self.encoder.blocks(self.encoder.input_dropout(x), valid, slice(0, self.contrastive_layers))
        negatives, _ = sample_negatives(q.quantized, mask, num_negatives=num_negatives, generator=generator)
        con = contrastive_loss(self.project(c), q.quantized, negatives, mask, kappa=kappa)
        loss = wav2vec2_loss(con, q.diversity_loss, diversity_weight=diversity_weight)
        mlm = mlm_acc = torch.zeros(())
        if self.objective == "w2v_bert":
            m = self.encoder.blocks(c, valid, slice(self.contrastive_layers, None))
            mlm, mlm_acc = mlm_loss(self.mlm_head(m), q.ids.detach(), mask)
            loss = loss + mlm_weight * mlm
        count = int(con.count)
        return SSLOutput(
            loss=loss,
            contrastive=con.loss_sum.detach() / max(count, 1),
            accuracy=torch.as_tensor(con.accuracy).detach(),
            diversity=q.diversity_loss.detach(),
            mlm=mlm.detach(),
            mlm_accuracy=torch.as_tensor(mlm_acc).detach(),
            masked=count,
            quantizer=q,
            valid=valid,
        )


def build_ssl_model(cfg: BigSSLConfig) -> SSLModel:
    p = cfg.pretrain
    return SSLModel(
        encoder=build_encoder(cfg),
        objective=p.objective,
        groups=p.groups,
        codes=p.codes,
        code_dim=p.code_dim,
        contrastive_layers=p.contrastive_layers,
    )


def _loss_kwargs(cfg: BigSSLConfig) -> dict[str, Any]:
    p = cfg.pretrain
    return {
        "mask_prob": p.mask_prob,
        "mask_span": p.mask_span,
        "num_negatives": p.num_negatives,
        "kappa": p.kappa,
        "diversity_weight": p.diversity_weight,
        "mlm_weight": p.mlm_weight,
    }


@torch.no_grad()
def held_out_loss(model: SSLModel, split: Split, cfg: BigSSLConfig, *, temperature: float) -> dict[str, float]:
    """Pre-training loss and accuracies on held-out audio (fixed masks and negatives; eval mode, labels unused)."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(12345)
    order = sorted(range(len(split)), key=split.lengths.__getitem__)
    sums = {"loss": 0.0, "contrastive": 0.0, "accuracy": 0.0, "mlm": 0.0, "mlm_accuracy": 0.0}
    n = 0
    for start in range(0, len(order), 16):
        x, lengths = split.batch(order[start : start + 16])
        out = model(x, lengths, temperature=temperature, generator=g, **_loss_kwargs(cfg))
        k = len(lengths)
        for key in sums:
            sums[key] += float(getattr(out, key)) * k
        n += k
    model.train(was)
    return {key: v / max(n, 1) for key, v in sums.items()}


def pretrain(cfg: BigSSLConfig, data: SpeechData, run_dir: Path, metrics: MetricsLog, info: DistInfo) -> dict:
    """Pre-train (or resume, or reuse) the encoder; returns the unit's ``result.json``."""
    p = cfg.pretrain
    out = pretrain_dir(run_dir, p.objective, p.seed)
    unit = f"pretrain/{p.objective}/s{p.seed}"
    done = out / "result.json"
    if cfg.resume and done.exists() and (out / "encoder.safetensors").exists():
        return json.loads(done.read_text())
    seed_everything(p.seed + 1000 * info.rank)
    model = build_ssl_model(cfg).to(info.device)
    optimizer = adamw(model, lr=p.lr, weight_decay=p.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(p.warmup, p.max_steps))
    start, curve = 0, []
    ckpt = out / "checkpoints"
    if cfg.resume and (path := latest_checkpoint(ckpt)) is not None:
        state = load_checkpoint(path, model=model, optimizer=optimizer)
        start, curve = state["step"], state["extra"].get("curve", [])
        scheduler.last_epoch = start
        metrics.truncate(unit, start)
        log.info("pre-training resumes at step %d from %s", start, path)
    else:
        metrics.truncate(unit, -1)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if info.enabled else model
    unlabelled = data.unlabelled
    batches = StepBatches(
        unlabelled.lengths,
        max_frames=p.max_frames,
        seed=p.seed,
        rank=info.rank,
        world_size=info.world_size,
    )
    monitor = CodebookMonitor(groups=p.groups, codes=p.codes)
    dev = data.dev.get("pretrain_val", unit) if info.is_main else None
    t0, seen, alarmed = time.perf_counter(), 0, False
    with progress(
        p.max_steps, f"pre-training ({p.objective})", enabled=cfg.progress and info.is_main, start=start
    ) as advance:
        for step in range(start, p.max_steps):
            model.train()
            idx = batches(step)
            x, lengths = unlabelled.batch(idx)
            temperature = temperature_schedule(step, p.max_steps, start=p.temperature[0], end=p.temperature[1])
            g = torch.Generator().manual_seed(p.seed * 1_000_003 + step * 101 + info.rank)
            o = ddp(
                x.to(info.device), lengths.to(info.device), temperature=temperature, generator=g, **_loss_kwargs(cfg)
            )
            optimizer.zero_grad(set_to_none=True)
            o.loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0))
            optimizer.step()
            scheduler.step()
            seen += int(lengths.sum())
            health = monitor.update(o.quantizer, o.valid)
            if health["alarm"] and not alarmed:
                alarmed = True
                log.warning(
                    "codebook collapse alarm at step %d: perplexity %.1f < 10%% of G·V = %d (see the card's pitfalls:"
                    " lower the learning rate, raise diversity_weight, check the masking)",
                    step,
                    health["perplexity"],
                    p.groups * p.codes,
                )
            record = {
                "unit": unit,
                "step": step + 1,
                "loss": float(o.loss.detach()),
                "contrastive": float(o.contrastive),
                "accuracy": float(o.accuracy),
                "mlm": float(o.mlm),
                "mlm_accuracy": float(o.mlm_accuracy),
                "masked_frames": o.masked,
                "temperature": temperature,
                "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0],
                **{k: v for k, v in health.items() if k != "alarm"},
                "alarm": bool(health["alarm"]),
            }
            if info.is_main:
                metrics.log(record)
            if (step + 1) % p.eval_every == 0 or step + 1 == p.max_steps:
                if info.enabled:
                    distributed.sync_batchnorm_stats(model)
                if dev is not None:
                    val = held_out_loss(model, dev, cfg, temperature=temperature)
                    curve.append({"step": step + 1, **{f"val_{k}": v for k, v in val.items()}})
                    metrics.log({"unit": unit, "step": step + 1, **curve[-1]})
                if info.is_main:
                    save_checkpoint(ckpt, step=step + 1, model=model, optimizer=optimizer, extra={"curve": curve})
                distributed.barrier()
            advance(1, loss=record["loss"], acc=record["accuracy"], ppl=health["perplexity"])
    seconds = time.perf_counter() - t0
    result = {
        "objective": p.objective,
        "steps": p.max_steps,
        "seconds": round(seconds, 2),
        "frames_per_s": round(seen * info.world_size / max(seconds, 1e-9), 1),
        "unlabelled_hours": round(unlabelled.hours, 4),
        "curve": curve,
        "final": {k: v for k, v in record.items() if k != "unit"} if p.max_steps > start else {},
        "collapse_alarms": monitor.alarms,
        "max_perplexity": monitor.max_perplexity,
    }
    if info.is_main:
        save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(out / "encoder.safetensors"))
        write_json(out / "result.json", result)
    distributed.barrier()
    return result


def pretrain_loss_on_batch(model: SSLModel, x: torch.Tensor, lengths: torch.Tensor, cfg: BigSSLConfig) -> torch.Tensor:
    """One pre-training loss with fixed randomness — masks, negatives, Gumbel noise and dropout (tests: gradients,
    determinism); the global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        return model(x, lengths, temperature=cfg.pretrain.temperature[0], generator=g, **_loss_kwargs(cfg)).loss
