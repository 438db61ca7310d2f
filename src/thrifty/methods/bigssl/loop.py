"""Small pieces the BigSSL stages share: the encoder from the config, the learning-rate schedule, step-indexed
length-bucketed batches (so a resumed run draws the same batches) and unit directories."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from thrifty.data.buckets import LengthBucketBatches
from thrifty.methods.bigssl.config import BigSSLConfig
from thrifty.methods.bigssl.model import Conformer


def build_encoder(cfg: BigSSLConfig) -> Conformer:
    s = cfg.model.shape()
    return Conformer(
        dim=s.dim,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        ffn_dim=s.ffn_dim,
        kernel_size=s.kernel_size,
        dropout=cfg.model.dropout,
        positions=s.positions,
        subsample_channels=cfg.model.subsample_channels or None,
    )


def warmup_cosine(warmup: int, max_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def tri_stage(warmup: int, hold: int, max_steps: int, *, final_scale: float = 0.05) -> Callable[[int], float]:
    """wav2vec 2.0's fine-tuning schedule: linear warm-up over ``warmup`` steps, the peak held for ``hold`` steps,
    then exponential decay to ``final_scale`` × peak at ``max_steps`` (the release's phases: 10% / 40% / 50%)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < warmup + hold:
            return 1.0
        progress = (step - warmup - hold) / max(1, max_steps - warmup - hold)
        return final_scale ** min(1.0, progress)

    return factor


def adamw(
    model: torch.nn.Module, *, lr: float, weight_decay: float, scales: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW without decay on biases, norms and other 1-D parameters. ``scales`` maps a parameter-name prefix (e.g.
    ``"encoder."``) to a learning-rate multiplier for the parameters under it (the first matching prefix wins)."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((v for k, v in (scales or {}).items() if name.startswith(k)), 1.0)
        groups.setdefault((scale, p.dim() >= 2), []).append(p)
    return torch.optim.AdamW(
        [
            {"params": ps, "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0}
            for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
        ],
        lr=lr,
    )


class StepBatches:
    """The batch of a global step: epochs of :class:`LengthBucketBatches` laid end to end, so step ``s`` gives the
    same indices whether the run started at 0 or resumed at ``s``."""

    def __init__(self, lengths: list[int], *, max_frames: int, seed: int, rank: int = 0, world_size: int = 1):
        longest = max(lengths)
        self.sampler = LengthBucketBatches(
            lengths=lengths,
            max_frames=max(max_frames, longest),
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_buckets=min(10, max(1, len(lengths) // 4)),
        )
        self._epochs: list[list[list[int]]] = []

    def __call__(self, step: int) -> list[int]:
        while True:
            offset = 0
            for epoch in self._epochs:
                if step < offset + len(epoch):
                    return epoch[step - offset]
                offset += len(epoch)
            self.sampler.set_epoch(len(self._epochs))
            self._epochs.append(list(self.sampler))

    def epoch_of(self, step: int) -> int:
        self(step)
        offset = 0
        for e, epoch in enumerate(self._epochs):
            offset += len(epoch)
            if step < offset:
                return e
        return len(self._epochs) - 1


def fraction_tag(fraction: float) -> str:
    return f"{fraction * 100:g}pct"


def finetune_dir(run_dir: Path, init: str, fraction: float, seed: int) -> Path:
    return run_dir / "units" / "finetune" / f"{init}-{fraction_tag(fraction)}-s{seed}"


def nst_dir(run_dir: Path, fraction: float, seed: int, generation: int) -> Path:
    return run_dir / "units" / "nst" / f"{fraction_tag(fraction)}-s{seed}" / f"gen{generation}"


def pretrain_dir(run_dir: Path, objective: str, seed: int) -> Path:
    return run_dir / "units" / "pretrain" / f"{objective}-s{seed}"
