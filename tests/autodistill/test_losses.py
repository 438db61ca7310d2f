"""Every term of MobileBERT's progressive-knowledge-transfer loss and the MLM distillation targets."""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.methods.autodistill.losses import (
    attention_kl,
    group_heads,
    hidden_mse,
    layer_transfer_loss,
    mean_loss,
    mixed_mlm_loss,
    mlm_distill_loss,
    soft_targets,
    variance_loss,
)


def _attn(b: int, h: int, t: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(b, h, t, t, generator=torch.Generator().manual_seed(seed)), -1)


def test_every_term_is_zero_for_identical_inputs() -> None:
    h = torch.randn(2, 5, 8)
    a = _attn(2, 4, 5, 0)
    total, terms = layer_transfer_loss(h, h.clone(), a, a.clone(), stage=0)
    assert all(abs(v) < 1e-6 for v in terms.values()), terms
    assert abs(float(total)) < 1e-4


def test_terms_match_hand_calculation() -> None:
    # one token, hidden 2: student (1, 3), teacher (0, 4)
    s = torch.tensor([[[1.0, 3.0]]])
    t = torch.tensor([[[0.0, 4.0]]])
    # means 2 and 2 -> beta 0; variances 1 and 4 -> gamma 3
    assert float(mean_loss(s, t)) == pytest.approx(0.0)
    assert float(variance_loss(s, t)) == pytest.approx(3.0)
    # after a parameter-free LayerNorm both are (-1, 1): MSE 0
    assert float(hidden_mse(s, t)) == pytest.approx(0.0, abs=1e-6)
    t2 = torch.tensor([[[4.0, 0.0]]])  # normalises to (1, -1): squared error 4 per element
    assert float(hidden_mse(s, t2)) == pytest.approx(4.0, rel=1e-5)
    # KL for one query: teacher (0.5, 0.5), student (0.25, 0.75)
    a_t = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    a_s = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(attention_kl(a_s, a_t)) == pytest.approx(expected, rel=1e-6)


def test_weights_and_stage_division() -> None:
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    a_s, a_t = _attn(2, 2, 4, 1), _attn(2, 2, 4, 2)
    total, terms = layer_transfer_loss(s, t, a_s, a_t, stage=2)
    expected = (100 * terms["hidden_mse"] + 5000 * terms["beta"] + 5 * terms["gamma"] + terms["attention_kl"]) / 3
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_group_heads_averages_consecutive_teacher_heads() -> None:
    a = _attn(1, 12, 3, 3)
    g = group_heads(a, 4)
    assert g.shape == (1, 4, 3, 3)
    assert torch.allclose(g[:, 1], a[:, 3:6].mean(1))
    assert torch.allclose(g.sum(-1), torch.ones(1, 4, 3))
    assert group_heads(a, 12) is a
    assert torch.allclose(group_heads(_attn(1, 2, 3, 4), 4)[:, 1], _attn(1, 2, 3, 4)[:, 0])


def test_soft_targets_sum_to_one_and_mix_hard_and_soft() -> None:
    labels = torch.tensor([1, 3])
    logits = torch.randn(2, 5)
    t = soft_targets(labels, logits, 0.5)
    assert torch.allclose(t.sum(-1), torch.ones(2))
    p = torch.softmax(logits, -1)
    assert float(t[0, 1]) == pytest.approx(0.5 + 0.5 * float(p[0, 1]))
    assert float(t[0, 0]) == pytest.approx(0.5 * float(p[0, 0]))


def test_mixed_loss_equals_cross_entropy_against_soft_targets() -> None:
    z = torch.randn(6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (6,))
    teacher = torch.randn(6, 11).half()
    a = mixed_mlm_loss(z, labels, teacher, 0.5)
    b = mlm_distill_loss(z, soft_targets(labels, teacher, 0.5))
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5)
    ga = torch.autograd.grad(a, z)[0]
    gb = torch.autograd.grad(mlm_distill_loss(z, soft_targets(labels, teacher, 0.5)), z)[0]
    assert torch.allclose(ga, gb, atol=1e-6)
    # gt_ratio 1 is plain cross-entropy
    with torch.no_grad():
        hard = float(mixed_mlm_loss(z, labels, teacher, 1.0))
        assert hard == pytest.approx(float(torch.nn.functional.cross_entropy(z, labels)), rel=1e-5)
