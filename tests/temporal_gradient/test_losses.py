"""Temporal-gradient losses: known values, the release's normalisations, stop-gradient, warm-up and the
cross-modal contrastive batch (N clips -> 2N views, diagonal positives)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.temporal_gradient.losses import (
    LOSS_WEIGHTS,
    alignment_loss,
    contrastive_logits,
    nt_xent,
    pseudo_label_loss,
    pseudo_label_weight,
    pseudo_labels,
    supervised_loss,
)


def _logits(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


# ---- supervised ---------------------------------------------------------------------------------------------


def test_supervised_loss_is_the_mean_of_the_two_modalities() -> None:
    z_rgb, z_tg, y = _logits(5, 4, 0), _logits(5, 4, 1), torch.tensor([0, 1, 2, 3, 0])
    expected = 0.5 * F.cross_entropy(z_rgb, y) + 0.5 * F.cross_entropy(z_tg, y)
    assert torch.allclose(supervised_loss(z_rgb, z_tg, y), expected)
    assert torch.allclose(supervised_loss(z_rgb, None, y), F.cross_entropy(z_rgb, y))
    # uniform logits: ln K
    assert supervised_loss(torch.zeros(3, 10), torch.zeros(3, 10), torch.tensor([1, 2, 3])).item() == pytest.approx(
        math.log(10)
    )


# ---- pseudo-labels ------------------------------------------------------------------------------------------


def test_pseudo_labels_are_the_argmax_of_the_softmax_of_averaged_logits() -> None:
    z_rgb = _logits(16, 5, 0).requires_grad_()
    z_tg = _logits(16, 5, 1).requires_grad_()
    labels, mask, probs = pseudo_labels(z_rgb, z_tg, threshold=0.3)
    p = torch.softmax((z_rgb.detach() + z_tg.detach()) / 2, dim=-1)
    assert torch.allclose(probs, p)
    assert torch.equal(labels, p.argmax(dim=-1))
    assert torch.equal(mask, p.max(dim=-1).values >= 0.3)
    assert 0 < mask.sum() < 16  # the threshold bites on this draw
    assert not labels.requires_grad and not probs.requires_grad and mask.dtype == torch.bool
    # averaging logits is not averaging probabilities: a hand example where the two disagree
    a, b = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 3.0]])
    lab, _, pr = pseudo_labels(a, b, threshold=0.0)
    assert torch.allclose(pr, torch.softmax(torch.tensor([[2.0, 1.5, 1.5]]), -1)) and lab.item() == 0


def test_pseudo_label_modalities_and_threshold_edges() -> None:
    z_rgb, z_tg = _logits(8, 4, 2), _logits(8, 4, 3)
    lab, mask, probs = pseudo_labels(z_rgb, None, threshold=0.5, modalities="rgb")
    assert torch.allclose(probs, torch.softmax(z_rgb, -1)) and torch.equal(lab, z_rgb.argmax(-1))
    assert torch.equal(pseudo_labels(z_rgb, z_tg, threshold=0.5, modalities="rgb")[0], lab)  # TG ignored
    lab_tg, _, _ = pseudo_labels(z_rgb, z_tg, threshold=0.5, modalities="tg")
    assert torch.equal(lab_tg, z_tg.argmax(-1))
    assert pseudo_labels(z_rgb, z_tg, threshold=0.0)[1].all()
    assert not pseudo_labels(z_rgb, z_tg, threshold=1.01)[1].any()
    # max p exactly at the threshold is kept (release: >=)
    _, m, _ = pseudo_labels(torch.zeros(1, 4), torch.zeros(1, 4), threshold=0.25)
    assert m.item()
    with pytest.raises(ValueError, match="logits_tg_weak"):
        pseudo_labels(z_rgb, None, threshold=0.3)
    with pytest.raises(ValueError, match="modalities"):
        pseudo_labels(z_rgb, z_tg, threshold=0.3, modalities="both")  # type: ignore[arg-type]


def test_pseudo_label_loss_sums_kept_clips_over_the_full_batch() -> None:
    z_rgb = _logits(6, 4, 4).requires_grad_()
    z_tg = _logits(6, 4, 5).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    mask = torch.tensor([True, False, True, False, False, True])
    loss = pseudo_label_loss(z_rgb, z_tg, y, mask)
    per = 0.5 * F.cross_entropy(z_rgb, y, reduction="none") + 0.5 * F.cross_entropy(z_tg, y, reduction="none")
    assert torch.allclose(loss, per[mask].sum() / 6)
    # the release's form: 0.5 · mean over kept · num_select / batch, per modality
    release = sum(0.5 * F.cross_entropy(z[mask], y[mask]) * mask.sum() / len(mask) for z in (z_rgb, z_tg))
    assert torch.allclose(loss, release)
    loss.backward()
    assert torch.all(z_rgb.grad[~mask] == 0) and torch.all(z_tg.grad[~mask] == 0)
    assert torch.all(z_rgb.grad[mask].abs().sum(-1) > 0)
    # RGB-only arm: the single RGB term
    assert torch.allclose(
        pseudo_label_loss(z_rgb, None, y, mask), F.cross_entropy(z_rgb, y, reduction="none")[mask].sum() / 6
    )
    # nothing kept: exactly 0, still differentiable
    none_kept = pseudo_label_loss(z_rgb, z_tg, y, torch.zeros(6, dtype=torch.bool))
    assert none_kept.item() == 0.0 and none_kept.requires_grad


def test_pseudo_label_term_is_zero_before_warmup_ends() -> None:
    assert [pseudo_label_weight(s, warmup_steps=3) for s in range(6)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert pseudo_label_weight(0, warmup_steps=0) == 1.0
    z, y = _logits(4, 3, 6), torch.tensor([0, 1, 2, 0])
    term = pseudo_label_weight(2, warmup_steps=3) * pseudo_label_loss(z, z, y, torch.ones(4, dtype=torch.bool))
    assert term.item() == 0.0


# ---- alignment ----------------------------------------------------------------------------------------------


def _stage_maps(seed: int, n: int = 3, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, 8, 4, 8, 8), (n, 16, 2, 4, 4), (n, 32, 1, 2, 2), (n, 64, 1, 1, 1)]
    # |x| + 0.01: non-negative like post-ReLU maps, but with no all-zero channel vector (see the zero-vector test)
    return [(torch.randn(*s, generator=g).abs() + 0.01).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("mode", ["position", "flatten"])
def test_alignment_zero_for_identical_and_bounded(mode: str) -> None:
    f = _stage_maps(0)
    assert alignment_loss(f, [x.clone() for x in f], mode=mode).item() == pytest.approx(0.0, abs=1e-6)
    # opposite features: 2 per stage; scaling the TG maps changes nothing (cosine)
    g = [torch.randn_like(x) for x in f]
    assert alignment_loss(g, [-x for x in g], mode=mode).item() == pytest.approx(8.0, abs=1e-5)
    assert torch.allclose(alignment_loss(f, g, mode=mode), alignment_loss(f, [3.0 * x for x in g], mode=mode))
    for s in range(4):
        v = alignment_loss(f[s : s + 1], g[s : s + 1], mode=mode).item()
        assert 0.0 <= v <= 2.0


def test_alignment_zero_channel_vector_counts_as_orthogonal() -> None:
    # the release normalises with F.normalize, so an all-zero (dead ReLU) position has cosine 0 even with itself
    f = torch.ones(1, 4, 2, 1, 1)
    f[:, :, 1] = 0.0
    assert alignment_loss([f], [f.clone()]).item() == pytest.approx(0.5)
    assert alignment_loss([f], [f.clone()], mode="flatten").item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_position_vs_flatten_hand_values() -> None:
    # one clip, C = 2 channels, two positions: channel vectors (1, 0), (0, 1) vs (1, 0), (1, 0)
    rgb = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 2, 1, 1)  # (N=1, C=2, T=2, 1, 1)
    tg = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 2, 1, 1)
    # position: cos at t=0 is cos((1,0),(1,0)) = 1, at t=1 cos((0,1),(1,0)) = 0 -> mean(1 - cos) = 0.5
    assert alignment_loss([rgb], [tg], mode="position").item() == pytest.approx(0.5)
    # flatten: cos((1,0,0,1),(1,1,0,0)) = 1/2 -> 0.5 as well; a case where they differ:
    tg2 = torch.tensor([[2.0, 0.0], [0.0, 0.5]]).reshape(1, 2, 2, 1, 1)  # per position cos = 1, 1
    assert alignment_loss([rgb], [tg2], mode="position").item() == pytest.approx(0.0, abs=1e-7)
    flat_cos = (2.0 * 1 + 0.5 * 1) / (math.sqrt(2) * math.sqrt(4.25))
    assert alignment_loss([rgb], [tg2], mode="flatten").item() == pytest.approx(1 - flat_cos, rel=1e-6)
    # matches torch's CosineSimilarity(dim=1) on the raw maps, as the release's CosineSimiLoss
    f, g = _stage_maps(1), _stage_maps(2)
    release = sum(
        1 - torch.nn.CosineSimilarity(dim=1)(F.normalize(a, dim=1), F.normalize(b, dim=1)).mean() for a, b in zip(f, g)
    )
    assert torch.allclose(alignment_loss(f, g), release, atol=1e-6)


def test_alignment_sends_no_gradient_to_tg_features() -> None:
    f_rgb, f_tg = _stage_maps(3, requires_grad=True), _stage_maps(4, requires_grad=True)
    alignment_loss(f_rgb, f_tg).backward()
    assert all(x.grad is None for x in f_tg)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in f_rgb)
    with pytest.raises(ValueError, match="stage shapes"):
        alignment_loss(f_rgb[:1], f_tg[1:2])


# ---- contrastive --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("same_modality_negatives", [False, True])
def test_n_clips_give_2n_views(same_modality_negatives: bool) -> None:
    n = 5
    logits, targets = contrastive_logits(
        _logits(n, 8, 0), _logits(n, 8, 1), same_modality_negatives=same_modality_negatives
    )
    assert logits.shape == (2 * n, 2 * n)
    assert torch.isneginf(logits.diagonal()).all()  # self-similarity masked
    assert torch.equal(targets, torch.tensor([5, 6, 7, 8, 9, 0, 1, 2, 3, 4]))
    finite = torch.isfinite(logits).sum(dim=1)
    # candidates per anchor: the positive plus N-1 (release) or 2N-2 (SimCLR) negatives
    assert torch.all(finite == (2 * n - 1 if same_modality_negatives else n))
    assert torch.isfinite(logits[torch.arange(2 * n), targets]).all()


def test_nt_xent_matches_hand_computation() -> None:
    tau = 0.5
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # normalised: (1,1)/√2, (0,1)
    s = 1 / math.sqrt(2)
    # cosines: a0·b0 = s, a0·b1 = 0, a1·b0 = s, a1·b1 = 1; a0·a1 = 0; b0·b1 = s
    ab = [[s, 0.0], [s, 1.0]]
    ce = lambda pos, negs: -pos / tau + math.log(sum(math.exp(v / tau) for v in [pos, *negs]))
    # release form: each anchor against the other modality only, mean over the 2N anchors
    rows = [ce(ab[0][0], [ab[0][1]]), ce(ab[1][1], [ab[1][0]]), ce(ab[0][0], [ab[1][0]]), ce(ab[1][1], [ab[0][1]])]
    assert nt_xent(a, b, temperature=tau).item() == pytest.approx(sum(rows) / 4, rel=1e-6)
    # SimCLR form adds the same-modality negatives a0·a1 = 0 and b0·b1 = s
    rows2 = [
        ce(ab[0][0], [ab[0][1], 0.0]),
        ce(ab[1][1], [ab[1][0], 0.0]),
        ce(ab[0][0], [ab[1][0], s]),
        ce(ab[1][1], [ab[0][1], s]),
    ]
    assert nt_xent(a, b, temperature=tau, same_modality_negatives=True).item() == pytest.approx(
        sum(rows2) / 4, rel=1e-6
    )


def test_nt_xent_equals_the_release_simclr_ptv_new_with_half_weight() -> None:
    a, b, tau = _logits(6, 8, 2), _logits(6, 8, 3), 0.5
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    diag = torch.arange(6)
    release = 0.5 * (F.cross_entropy(an @ bn.t() / tau, diag) + F.cross_entropy(bn @ an.t() / tau, diag))
    assert torch.allclose(nt_xent(a, b, temperature=tau), release, atol=1e-6)
    assert LOSS_WEIGHTS["contrast"] == 1.0  # the release's contrast_loss_weight on this (already halved) value


@pytest.mark.parametrize("same_modality_negatives", [False, True])
def test_positives_are_the_diagonal(same_modality_negatives: bool) -> None:
    kw = dict(temperature=0.5, same_modality_negatives=same_modality_negatives)
    a = F.normalize(_logits(8, 16, 4), dim=1)
    b = F.normalize(a + 0.1 * _logits(8, 16, 5), dim=1)  # aligned: b_i close to a_i
    aligned = nt_xent(a, b, **kw)
    perm = torch.roll(torch.arange(8), 1)
    assert nt_xent(a, b[perm], **kw) > aligned + 0.5  # mismatched rows raise the loss
    random = torch.stack([nt_xent(a, _logits(8, 16, 10 + s), **kw) for s in range(5)]).mean()
    assert aligned < random
    # gradients reach both embeddings; loss is symmetric in (a, b)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    nt_xent(a_, b_, **kw).backward()
    assert a_.grad.abs().sum() > 0 and b_.grad.abs().sum() > 0
    assert torch.allclose(nt_xent(a, b, **kw), nt_xent(b, a, **kw), atol=1e-6)


def test_nt_xent_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8))
