"""Downstream evaluation of distilled students: the GLUE analogue (or real GLUE TSVs) with a pooled head.

Each encoder is frozen; a sentence is represented by the mean of its last hidden states over real tokens,
a pair by ``[u, v, |u−v|, u⊙v]``. A linear head is trained on standardised features with Adam (full batch);
the weight decay and the epoch are selected on validation accuracy, then the test split is scored once.
Seeds vary the head's initialisation. Deviation from the paper (which fine-tunes every student on GLUE): the
encoder stays frozen, so the CPU budget covers several students, tasks and seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from thrifty.methods.autodistill.data import Task, batched, tokenize_texts

WEIGHT_DECAYS = (0.0, 1e-3, 1e-2)


@torch.inference_mode()
def pooled_features(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer: Any,
    texts: list[str],
    *,
    seq_len: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Mean of the last hidden states over real tokens → (N, d); ``encode(ids, mask) -> (B, T, d)``."""
    ids, mask = tokenize_texts(tokenizer, texts, seq_len)
    out = []
    for sl in batched(len(texts), batch_size):
        h = encode(ids[sl], mask[sl]).float()
        m = mask[sl].unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


def task_features(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokenizer: Any, task: Task, *, seq_len: int
) -> dict[str, torch.Tensor]:
    feats = {}
    for split, texts in task.texts.items():
        u = pooled_features(encode, tokenizer, texts, seq_len=seq_len)
        if task.texts_b is not None:
            u = pair_features(u, pooled_features(encode, tokenizer, task.texts_b[split], seq_len=seq_len))
        feats[split] = u
    return feats


def macro_f1(pred: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def train_probe(
    feats: dict[str, torch.Tensor],
    labels: dict[str, list[int]],
    *,
    num_classes: int,
    seed: int,
    epochs: int,
    lr: float,
    eval_every: int = 10,
) -> dict[str, Any]:
    """Linear head on frozen features; (weight decay, epoch) chosen on validation accuracy; test read once."""
    mu = feats["train"].mean(0)
    sd = feats["train"].std(0).clamp_min(1e-6)
    x = {k: (v - mu) / sd for k, v in feats.items()}
    y = {k: torch.tensor(v) for k, v in labels.items()}
    best: dict[str, Any] = {"val_acc": -1.0}
    for wd in WEIGHT_DECAYS:
        torch.manual_seed(seed)
        head = torch.nn.Linear(x["train"].shape[1], num_classes)
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=wd)
        for epoch in range(1, epochs + 1):
            loss = F.cross_entropy(head(x["train"]), y["train"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch % eval_every == 0 or epoch == epochs:
                with torch.no_grad():
                    acc = float((head(x["val"]).argmax(-1) == y["val"]).float().mean())
                if acc > best["val_acc"]:
                    best = {"val_acc": acc, "weight_decay": wd, "epoch": epoch, "state": {
                        k: t.detach().clone() for k, t in head.state_dict().items()}}  # fmt: skip
    head = torch.nn.Linear(x["train"].shape[1], num_classes)
    head.load_state_dict(best.pop("state"))
    with torch.no_grad():
        pred = head(x["test"]).argmax(-1).numpy()
    truth = y["test"].numpy()
    return {
        **best,
        "test_acc": float((pred == truth).mean()),
        "test_macro_f1": macro_f1(pred, truth, num_classes),
        "test_pred": pred.tolist(),
    }
