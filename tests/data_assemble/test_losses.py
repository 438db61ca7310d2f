"""The card's loss tests: sharpening values, masking of missing labels, the release-compat defect."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.data_assemble.losses import (
    assemble_loss,
    consistency_term,
    masked_bce,
    pseudo_label_term,
    release_compat_loss,
    sharpen,
)


def test_sharpening_values_from_the_card():
    a = torch.tensor([0.8, 0.2, 0.5, 1.0, 0.0])
    out = sharpen(a, tau=0.5, t=4.0)
    # 0.8 -> 0.8 + 0.2/4; 0.2 -> 0.2 - 0.2/4; 0.5 takes the "otherwise" branch: 0.5 - 0.5/4
    assert torch.allclose(out, torch.tensor([0.85, 0.15, 0.375, 1.0, 0.0]))


def test_sharpening_moves_towards_the_nearer_extreme_and_stays_in_range():
    a = torch.rand(1000)
    out = sharpen(a)
    assert ((out >= 0) & (out <= 1)).all()
    assert (out[a > 0.5] >= a[a > 0.5]).all()
    assert (out[a <= 0.5] <= a[a <= 0.5]).all()


def _grad(fn, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    fn(logits).backward()
    return logits.grad


def test_missing_label_gives_zero_bce_gradient():
    logits = torch.randn(4, 3)
    y = torch.randint(0, 2, (4, 3)).float()
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    g = _grad(lambda z: masked_bce(z, y, mask), logits)
    assert (g[~mask] == 0).all()
    assert (g[mask] != 0).all()


def test_masked_bce_equals_mean_over_given_entries():
    logits = torch.randn(5, 4)
    y = torch.randint(0, 2, (5, 4)).float()
    mask = torch.rand(5, 4) > 0.4
    p = torch.sigmoid(logits)
    expected = -(y * p.log() + (1 - y) * (1 - p).log())[mask].mean()
    assert torch.allclose(masked_bce(logits, y, mask), expected, atol=1e-6)


def test_provided_label_gets_no_pseudo_or_consistency_term():
    logits_w, logits_s = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.zeros(4, 3)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)

    def unsupervised(zw: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        parts = assemble_loss(zw, zs, y, mask)
        return parts.pseudo + parts.consistency

    zw = logits_w.clone().requires_grad_(True)
    zs = logits_s.clone().requires_grad_(True)
    unsupervised(zw, zs).backward()
    assert (zw.grad[mask] == 0).all() and (zs.grad[mask] == 0).all()
    assert (zw.grad[~mask] != 0).all() and (zs.grad[~mask] != 0).all()


def test_terms_average_over_their_own_entries_with_unit_weights():
    torch.manual_seed(0)
    zw, zs = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.randint(0, 2, (6, 4)).float()
    mask = torch.rand(6, 4) > 0.5
    parts = assemble_loss(zw, zs, y, mask)
    aw, as_ = torch.sigmoid(zw), torch.sigmoid(zs)
    target = sharpen(aw)
    assert torch.allclose(parts.pseudo, ((aw - target) ** 2)[~mask].mean())
    assert torch.allclose(parts.consistency, ((as_ - target) ** 2)[~mask].mean())
    assert torch.allclose(parts.total, parts.bce + parts.pseudo + parts.consistency)


def test_sharpened_target_is_a_constant():
    aw = torch.tensor([[0.7, 0.3]], requires_grad=True)
    target = sharpen(aw.detach())
    missing = torch.ones(1, 2, dtype=torch.bool)
    pseudo_label_term(aw, target, missing).backward()
    # d/da (a - c)^2 / 2 = (a - c): the target does not move with a
    assert torch.allclose(aw.grad, (aw.detach() - target))
    s = torch.tensor([[0.6, 0.1]], requires_grad=True)
    consistency_term(s, target, missing).backward()
    assert torch.allclose(s.grad, (s.detach() - target))


def test_no_strong_view_is_the_naive_loss_plus_pseudo_term_only():
    zw = torch.randn(3, 2)
    y = torch.ones(3, 2)
    mask = torch.tensor([[1, 0], [1, 0], [1, 1]], dtype=torch.bool)
    parts = assemble_loss(zw, None, y, mask)
    assert float(parts.consistency) == 0.0
    naive = assemble_loss(zw, None, y, mask, pseudo_weight=0.0)
    assert torch.allclose(naive.total, masked_bce(zw, y, mask))


def test_empty_terms_are_zero_and_keep_the_graph():
    zw = torch.randn(2, 3, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)  # nothing missing
    parts = assemble_loss(zw, zw * 2, torch.zeros(2, 3), mask)
    assert float(parts.pseudo.detach()) == 0.0 and float(parts.consistency.detach()) == 0.0
    parts.total.backward()
    assert zw.grad is not None


def test_release_compat_gives_zero_loss_to_assembled_sources():
    torch.manual_seed(1)
    zw, zs = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    y = torch.randint(0, 2, (4, 3)).float()
    mask = torch.ones(4, 3, dtype=torch.bool)
    from_target = torch.tensor([True, False, False, True])
    parts = release_compat_loss(zw, zs, y, mask, from_target_source=from_target, class_index=2)
    parts.total.backward()
    # rows of other sources and other classes add no loss: their gradients are exactly zero
    assert (zw.grad[~from_target] == 0).all() and (zs.grad[~from_target] == 0).all()
    assert (zw.grad[:, :2] == 0).all()
    assert (zw.grad[from_target, 2] != 0).all()


def test_release_compat_is_the_release_sum_over_labelled_pairs():
    zw, zs = torch.randn(3, 2), torch.randn(3, 2)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    from_target = torch.tensor([True, True, False])
    parts = release_compat_loss(zw, zs, y, mask, from_target_source=from_target, class_index=0)
    aw, as_ = torch.sigmoid(zw[:2, 0]), torch.sigmoid(zs[:2, 0])
    target = torch.where(aw > 0.5, aw + (1 - aw) / 4, aw - aw / 4)
    bce = -(y[:2, 0] * aw.log() + (1 - y[:2, 0]) * (1 - aw).log())
    expected = (bce + (aw - target) ** 2 + (as_ - target) ** 2).sum() / 2
    assert torch.allclose(parts.total, expected, atol=1e-6)


def test_release_compat_without_target_rows_is_zero_not_nan():
    z = torch.randn(2, 2, requires_grad=True)
    parts = release_compat_loss(
        z, z, torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool),
        from_target_source=torch.tensor([False, False]), class_index=1,
    )  # fmt: skip
    assert float(parts.total) == 0.0
    parts.total.backward()
    assert (z.grad == 0).all()


@pytest.mark.parametrize("bad_mask_dtype", [torch.bool])
def test_assemble_loss_is_finite_at_extreme_logits(bad_mask_dtype):
    z = torch.tensor([[60.0, -60.0]])
    parts = assemble_loss(z, z, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]], dtype=bad_mask_dtype))
    assert torch.isfinite(parts.total)


def test_a_teachers_logits_replace_the_networks_own_as_the_sharpened_target():
    torch.manual_seed(0)
    zw = torch.randn(4, 3, requires_grad=True)
    zs = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    y = torch.zeros(4, 3)
    mask = torch.tensor([[True, False, False]] * 4)
    parts = assemble_loss(zw, zs, y, mask, teacher_logits=teacher)
    target = sharpen(torch.sigmoid(teacher.detach()))
    missing = ~mask
    expected = ((torch.sigmoid(zw) - target) ** 2)[missing].mean() + ((torch.sigmoid(zs) - target) ** 2)[missing].mean()
    assert torch.allclose(parts.pseudo + parts.consistency, expected, atol=1e-6)
    parts.total.backward()
    assert teacher.grad is None  # the target is a constant
    # a teacher equal to the network gives the paper's loss
    same = assemble_loss(zw, zs, y, mask, teacher_logits=zw.detach())
    assert torch.allclose(same.total, assemble_loss(zw, zs, y, mask).total)
