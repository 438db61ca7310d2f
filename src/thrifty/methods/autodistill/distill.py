"""Flash distillation: MobileBERT progressive knowledge transfer followed by MLM distillation (AutoDistill,
arXiv 2201.08539; MobileBERT, arXiv 2004.02984).

A student with L layers is trained in L + 1 stages from the cached teacher outputs:

* stage k < L trains student layer k against teacher layer ``round((k+1)·L_t/L)`` with
  :func:`~thrifty.methods.autodistill.losses.layer_transfer_loss`; the embeddings and layers below k are
  frozen (``freeze_lower``) and layers above k are not run at all;
* the last stage trains everything on MLM against 0.5·one-hot + 0.5·teacher probabilities.

Steps draw the cached batches in seeded random passes; the MLM stage starts a fresh pass, so it sees each
batch's labels (masked once, when the cache was built) at most once when the cache holds at least
``final_steps × scale`` batches. Cycling a small cache several times lets students memorise its masked labels:
with 96 cached batches the 4× longer MLM stage made 2.5 passes and lowered held-out accuracy (README).

Each stage gets a fresh optimiser with linear warm-up and linear decay to ``end_lr`` (the release's polynomial
schedule of power 1). Deviations: AdamW (weight decay 0.01) instead of LAMB; no next-sentence objective; a
student narrower than the teacher is compared through a learned projection (PKT assumes equal widths); the
student's MLM head starts as a copy of the head fitted on the teacher, its decoder tied to the teacher's frozen
word embeddings.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from thrifty.core.run import progress
from thrifty.methods.autodistill.losses import layer_transfer_loss, mixed_mlm_loss
from thrifty.methods.autodistill.schedule import lr_at
from thrifty.methods.autodistill.teacher import MLMHead, TeacherCache


class Student(nn.Module):
    """A student encoder with the MLM head (and, when narrower than the teacher, a projection to its width).

    ``encode(ids: (B, T), attention_mask=None) -> (B, T, d_teacher)``; ``forward(ids) -> (B, T, V)`` logits."""

    def __init__(self, *, encoder: nn.Module, head: MLMHead, teacher_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = copy.deepcopy(head, memo={id(head.embedding): head.embedding})  # share the frozen table
        self.head.requires_grad_(True)
        dim = encoder.config.hidden_size
        self.proj = nn.Linear(dim, teacher_dim) if dim != teacher_dim else nn.Identity()
        _install_output_hooks(encoder)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(ids))


def _install_output_hooks(encoder: nn.Module) -> None:
    """transformers 5 records hidden states and attentions with hooks installed lazily on the first forward;
    install them now on *every* layer, so a first forward through :func:`first_layers` cannot leave the upper
    layers unhooked."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older transformers return per-layer outputs without hooks
        return
    maybe_install_capturing_hooks(encoder)


@contextlib.contextmanager
def first_layers(student: Student, n: int) -> Iterator[None]:
    """Run only the first ``n`` encoder layers inside the block (stage k needs layers 0..k)."""
    enc = student.encoder.encoder
    full = enc.layer
    enc.layer = nn.ModuleList(list(full)[:n])
    try:
        yield
    finally:
        enc.layer = full


def teacher_layer(k: int, student_layers: int, teacher_layers: int) -> int:
    """Uniform layer map: student layer k (0-based) → teacher hidden-state index in 1..L_t."""
    return max(1, min(teacher_layers, round((k + 1) * teacher_layers / student_layers)))


def set_stage_trainable(student: Student, stage: int | None, *, freeze_lower: bool) -> list[nn.Parameter]:
    """Flags for a stage; ``None`` is the final (MLM) stage where everything trains. Returns trainable params."""
    student.requires_grad_(False)
    if stage is None:
        student.requires_grad_(True)
        student.head.embedding.requires_grad_(False)
    else:
        student.layers[stage].requires_grad_(True)
        student.proj.requires_grad_(True)
        if not freeze_lower:
            student.encoder.embeddings.requires_grad_(True)
            for layer in list(student.layers)[:stage]:
                layer.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]


def _optimiser(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=params[0].device.type in ("cpu", "cuda"))


def distill(
    student: Student,
    cache: TeacherCache,
    cfg: Any,
    *,
    seed: int,
    scale: int = 1,
    progress_bar: bool = True,
    desc: str = "flash distillation",
) -> dict[str, Any]:
    """Progressive layer-wise transfer then MLM distillation; ``cfg`` is a ``DistillConfig``; ``scale``
    multiplies every stage's steps (the longer distillation). Returns per-stage mean losses and timings."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n_batches = len(cache)
    order = iter(())

    def next_batch() -> int:
        nonlocal order
        try:
            return next(order)
        except StopIteration:
            order = iter(torch.randperm(n_batches, generator=g).tolist())
            return next(order)

    dev = next(student.parameters()).device  # the cache stays on the CPU; each batch moves to the student
    num_layers = len(student.layers)
    stage_steps = cfg.steps_per_stage * scale
    final_steps = cfg.final_steps * scale
    total = num_layers * stage_steps + final_steps
    weights = dict(
        hidden_weight=cfg.hidden_weight,
        beta_weight=cfg.beta_weight,
        gamma_weight=cfg.gamma_weight,
        attention_weight=cfg.attention_weight,
    )
    sched = dict(lr=cfg.lr, end_lr=cfg.end_lr, warmup_frac=cfg.warmup_frac)
    stages: list[dict[str, Any]] = []
    student.train()
    t0 = time.perf_counter()
    with progress(total, desc, enabled=progress_bar) as advance:
        for k in range(num_layers if stage_steps else 0):
            params = set_stage_trainable(student, k, freeze_lower=cfg.freeze_lower)
            opt = _optimiser(params, cfg.lr)
            t_idx = teacher_layer(k, num_layers, cache.num_layers)
            sums: dict[str, float] = {}
            with first_layers(student, k + 1):
                for step in range(stage_steps):
                    b = next_batch()
                    ids = cache.ids[b].to(dev)
                    out = student.encoder(input_ids=ids, output_hidden_states=True, output_attentions=True)
                    loss, terms = layer_transfer_loss(
                        student.proj(out.hidden_states[k + 1]),
                        cache.hidden[b, t_idx].to(dev),
                        out.attentions[k],
                        cache.attentions[b, t_idx - 1].to(dev),
                        stage=k,
                        **weights,
                    )
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, stage_steps, **sched)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    for name, v in {"loss": float(loss.detach()), **terms}.items():
                        sums[name] = sums.get(name, 0.0) + v
                    advance(stage=f"{k + 1}/{num_layers + 1}", loss=f"{float(loss.detach()):.3f}")
            stages.append({"stage": k, "teacher_layer": t_idx, **{n: v / stage_steps for n, v in sums.items()}})
        params = set_stage_trainable(student, None, freeze_lower=cfg.freeze_lower)
        opt = _optimiser(params, cfg.lr)
        order = iter(())  # a fresh pass: no cached batch (and its fixed mask) twice while final_steps <= len(cache)
        total_loss = 0.0
        for step in range(final_steps):
            b = next_batch()
            labels = cache.labels[b].to(dev)
            keep = labels != -100
            logits = student.head(student.encode(cache.ids[b].to(dev))[keep])
            loss = mixed_mlm_loss(logits, labels[keep], cache.batch_logits(b).to(dev), cfg.gt_ratio)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, final_steps, **sched)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach())
            advance(stage=f"{num_layers + 1}/{num_layers + 1}", loss=f"{float(loss.detach()):.3f}")
        stages.append({"stage": "mlm", "loss": total_loss / max(1, final_steps)})
    student.eval()
    student.requires_grad_(False)
    return {"stages": stages, "steps": total, "seconds": time.perf_counter() - t0}
