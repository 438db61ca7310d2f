"""The pooled linear probe: padding ignored, selection on validation only, macro-F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thrifty.methods.autodistill.downstream import macro_f1, pair_features, pooled_features, train_probe


class _Tok:
    pad_token_id = 0

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[int(w) for w in t.split()][:max_length] for t in texts]
        ids = torch.zeros(len(rows), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_mean_pooling_ignores_padding() -> None:
    encode = lambda ids, mask: ids.unsqueeze(-1).float().expand(-1, -1, 2)
    f = pooled_features(encode, _Tok(), ["2 4", "3 3 3 9"], seq_len=6)
    assert torch.allclose(f, torch.tensor([[3.0, 3.0], [4.5, 4.5]]))
    u, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    assert pair_features(u, v).tolist() == [[1.0, -2.0, 3.0, 1.0, 2.0, 3.0, 3.0, -2.0]]


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 5, generator=g) + torch.nn.functional.one_hot(y, 5).float() * 4
    return x, y.tolist()


def test_probe_learns_separable_classes_and_selects_on_validation() -> None:
    feats, labels = {}, {}
    for i, split in enumerate(("train", "val", "test")):
        feats[split], labels[split] = _blobs(60, i)
    res = train_probe(feats, labels, num_classes=3, seed=0, epochs=60, lr=0.05)
    assert res["test_acc"] > 0.9 and res["val_acc"] > 0.9
    # scrambling the test labels changes the test score but not what was selected
    scrambled = {**labels, "test": list(np.random.default_rng(0).permutation(labels["test"]))}
    res2 = train_probe(feats, scrambled, num_classes=3, seed=0, epochs=60, lr=0.05)
    assert (res2["weight_decay"], res2["epoch"], res2["val_acc"]) == (res["weight_decay"], res["epoch"], res["val_acc"])


def test_macro_f1_known_value() -> None:
    pred = np.array([0, 0, 1, 1])
    gold = np.array([0, 1, 1, 1])
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp0 fn1 -> 4/5
    assert macro_f1(pred, gold, 2) == pytest.approx((2 / 3 + 4 / 5) / 2)
