"""The learning-rate schedule of every AutoDistill training loop (MobileBERT's polynomial decay of power 1 after
a linear warm-up; arXiv 2004.02984): each flash-distillation stage and the IB-BERT teacher's pre-training."""

from __future__ import annotations


def lr_at(step: int, total: int, *, lr: float, end_lr: float, warmup_frac: float) -> float:
    """Linear warm-up over ``warmup_frac`` of the stage, then linear decay from ``lr`` to ``end_lr``."""
    warm = int(warmup_frac * total)
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return lr + (end_lr - lr) * frac
