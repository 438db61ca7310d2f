"""Flash distillation: which parameters each stage trains, gradients, determinism, loss going down."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from thrifty.methods.autodistill.config import DistillConfig
from thrifty.methods.autodistill.distill import (
    Student,
    distill,
    first_layers,
    lr_at,
    set_stage_trainable,
    teacher_layer,
)
from thrifty.methods.autodistill.losses import layer_transfer_loss, mixed_mlm_loss
from thrifty.methods.autodistill.space import Arch, build_encoder


def _student(teacher, head, *, layers: int = 2, seed: int = 0) -> Student:
    arch = Arch(num_layers=layers, hidden_size=32, intra_bottleneck_size=16, num_heads=2, intermediate_size=24,
                num_ffn=2, embedding_size=8)  # fmt: skip
    enc, _ = build_encoder(arch, teacher, seed=seed)
    return Student(encoder=enc, head=head, teacher_dim=32)


def _snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_layer_map_is_uniform_and_in_range() -> None:
    assert [teacher_layer(k, 2, 6) for k in range(2)] == [3, 6]
    assert [teacher_layer(k, 3, 6) for k in range(3)] == [2, 4, 6]
    assert [teacher_layer(k, 6, 3) for k in range(6)] == [1, 1, 2, 2, 2, 3]  # round half to even at 1.5 and 2.5


def test_schedule_warms_up_then_decays_to_end() -> None:
    lrs = [lr_at(s, 10, lr=1.0, end_lr=0.0, warmup_frac=0.2) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_stage_k_updates_only_layer_k(teacher, head, cache) -> None:
    s = _student(teacher, head)
    params = set_stage_trainable(s, 1, freeze_lower=True)
    names = {n for n, p in s.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("encoder.encoder.layer.1.") for n in names)
    assert len(params) == len(names)
    before = _snapshot(s)
    opt = torch.optim.SGD(params, lr=0.1)
    with first_layers(s, 2):
        out = s.encoder(input_ids=cache.ids[0], output_hidden_states=True, output_attentions=True)
        loss, _ = layer_transfer_loss(out.hidden_states[2], cache.hidden[0, 4], out.attentions[1],
                                      cache.attentions[0, 3], stage=1)  # fmt: skip
    loss.backward()
    for n, p in s.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}"
        else:
            assert p.grad is None, f"{n} got a gradient in stage 1"
    opt.step()
    after = _snapshot(s)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= names
    assert all(p.grad is None for p in teacher.parameters())
    assert len(s.layers) == 2  # first_layers restored the full stack


def test_final_stage_reaches_every_student_parameter(teacher, head, cache) -> None:
    s = _student(teacher, head)
    set_stage_trainable(s, None, freeze_lower=True)
    labels = cache.labels[0]
    keep = labels != -100
    loss = mixed_mlm_loss(s.head(s.encode(cache.ids[0])[keep]), labels[keep], cache.batch_logits(0), 0.5)
    loss.backward()
    missing = [n for n, p in s.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # the pooler does not exist; position rows beyond the sequence and unused token types get no gradient
    missing = [n for n in missing if "position_embeddings" not in n and "token_type" not in n]
    assert not missing, missing
    assert not s.head.embedding.requires_grad  # the decoder stays tied to the frozen teacher table
    assert all(p.grad is None for p in teacher.parameters())


def test_unfrozen_lower_layers_train_too(teacher, head) -> None:
    s = _student(teacher, head)
    set_stage_trainable(s, 1, freeze_lower=False)
    names = {n for n, p in s.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.encoder.layer.0.") for n in names)
    assert any(n.startswith("encoder.embeddings.") for n in names)


def test_distillation_is_deterministic_and_lowers_the_loss(teacher, head, cache) -> None:
    cfg = DistillConfig(steps_per_stage=6, final_steps=8, lr=3e-3)
    runs = []
    for _ in range(2):
        s = _student(teacher, head)
        rec = distill(s, cache, cfg, seed=3, progress_bar=False)
        runs.append((rec, _snapshot(s)))
    (rec_a, w_a), (rec_b, w_b) = runs
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)
    assert rec_a["stages"] == rec_b["stages"]
    assert [st["stage"] for st in rec_a["stages"]] == [0, 1, "mlm"]
    assert rec_a["steps"] == 2 * 6 + 8
    # a longer run ends with a lower layer-transfer loss in stage 0
    s = _student(teacher, head)
    longer = distill(s, cache, dataclasses.replace(cfg), seed=3, scale=4, progress_bar=False)
    assert longer["stages"][0]["loss"] < rec_a["stages"][0]["loss"]
    other = _student(teacher, head)
    distill(other, cache, cfg, seed=4, progress_bar=False)
    assert any(not torch.equal(w_a[n], p) for n, p in _snapshot(other).items())


def test_mlm_stage_reads_each_cached_batch_at_most_once(teacher, head, cache) -> None:
    """The MLM stage starts a fresh pass over the cache, so a stage no longer than the cache never repeats a
    batch's fixed masked labels (repeats let students memorise them), whatever the layer stages drew before."""
    seen: list[int] = []
    spy = copy.copy(cache)
    spy.batch_logits = lambda b: (seen.append(b), cache.batch_logits(b))[1]
    for steps_per_stage in (1, 3):  # the layer stages stop mid-pass
        seen.clear()
        cfg = DistillConfig(steps_per_stage=steps_per_stage, final_steps=len(cache), lr=3e-3)
        distill(_student(teacher, head), spy, cfg, seed=5, progress_bar=False)
        assert sorted(seen) == list(range(len(cache))), seen
