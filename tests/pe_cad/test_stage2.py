"""PE CAD stage 2: difference features, length fitting, masked pooling, the CC / MIL / E-ViT models."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.pe_cad.losses import rsna_weighted_bce
from thrifty.methods.pe_cad.stage2 import (
    EXAM_LABELS,
    EViT,
    GatedAttentionMIL,
    MaxMIL,
    PENet,
    Stage2Output,
    build_stage2,
    build_stage2_optimizer,
    cc_parameter_count,
    collate_exams,
    count_parameters,
    difference_features,
    fit_labels,
    fit_length,
    masked_max_pool,
    masked_softmax,
    prepare_exam,
    resize_sequence,
    source_positions,
    unfit_predictions,
)

KINDS = ("cc", "mil_attention", "mil_max", "evit")
D, L, HIDDEN = 8, 16, 16  # raw feature dim, fitted length, hidden width of the tiny models
LENGTHS = (16, 5, 11, 1)  # one full exam (every position and parameter is reached), three padded


def _tiny(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = dict(depth=1, num_heads=2) if kind == "evit" else {}
    extra.update(kw)
    return build_stage2(kind, in_dim=3 * D, hidden=HIDDEN, seq_len=L, **extra)


def _inputs(seed: int = 0, lengths=LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), L, 3 * D, generator=gen)
    valid = torch.arange(L) < torch.tensor(lengths)[:, None]
    return torch.where(valid[..., None], x, torch.zeros(())), valid


# ----------------------------------------------------------------------------------------------- difference features
def test_difference_features_of_a_constant_sequence_are_zero():
    f = torch.full((7, 5), 3.25)
    out = difference_features(f)
    assert out.shape == (7, 15)
    torch.testing.assert_close(out[:, :5], f)
    assert torch.count_nonzero(out[:, 5:]) == 0


def test_difference_features_order_and_ends():
    f = torch.tensor([[1.0], [2.0], [4.0]])
    out = difference_features(f)
    # [f_t, f_t − f_{t−1}, f_t − f_{t+1}], zero where the neighbour is missing (the release's block order)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, -2.0], [4.0, 2.0, 0.0]]))
    batched = difference_features(torch.stack((f, 2 * f)))
    torch.testing.assert_close(batched[1], 2 * out)
    torch.testing.assert_close(difference_features(torch.ones(1, 3)), torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0, 0]]))


# ------------------------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("s", [17, 40, 193])
@pytest.mark.parametrize("align_corners", [False, True])
def test_long_exam_is_exactly_l_rows_all_valid(s, align_corners):
    x = torch.randn(s, 6)
    fitted = fit_length(x, L, align_corners=align_corners)
    assert fitted.x.shape == (L, 6) and fitted.valid.shape == (L,)
    assert fitted.valid.all()
    assert (fitted.source_pos >= 0).all() and (fitted.source_pos <= s - 1).all()
    assert (fitted.source_pos.diff() > 0).all()


def test_linear_resize_with_aligned_corners_keeps_the_end_slices_and_a_ramp():
    s = 50
    ramp = torch.arange(s, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -2.0]])
    fitted = fit_length(ramp, L, align_corners=True)
    torch.testing.assert_close(fitted.x[0], ramp[0])
    torch.testing.assert_close(fitted.x[-1], ramp[-1])
    torch.testing.assert_close(fitted.x[:, 0], fitted.source_pos)  # a linear ramp is sampled exactly


def test_release_resize_is_cv2_half_pixel_linear():
    # cv2.resize(INTER_LINEAR) of [0, 1, 2, 3] to 2 rows reads positions 0.5 and 2.5; to 3 rows 1/6, 3/2, 17/6
    x = torch.arange(4, dtype=torch.float32)[:, None]
    torch.testing.assert_close(fit_length(x, 2).x[:, 0], torch.tensor([0.5, 2.5]))
    torch.testing.assert_close(resize_sequence(x[:, 0], 3), torch.tensor([1 / 6, 1.5, 17 / 6]))
    torch.testing.assert_close(source_positions(4, 3), torch.tensor([1 / 6, 1.5, 17 / 6]))
    # end positions are clamped, not extrapolated: a 5 -> 2 resize reads 0.75 and 3.25
    torch.testing.assert_close(resize_sequence(torch.arange(5.0), 2), torch.tensor([0.75, 3.25]))


@pytest.mark.parametrize("s", [1, 9, L])
def test_short_exam_is_zero_padded_with_a_validity_mask(s):
    x = torch.randn(s, 6) + 10
    fitted = fit_length(x, L)
    assert fitted.x.shape == (L, 6)
    torch.testing.assert_close(fitted.x[:s], x)
    assert torch.count_nonzero(fitted.x[s:]) == 0
    assert fitted.valid.tolist() == [True] * s + [False] * (L - s)
    assert fitted.source_pos.tolist() == [float(i) for i in range(s)] + [-1.0] * (L - s)


def test_tail_mode_keeps_the_last_rows():
    x = torch.arange(20.0)[:, None]
    fitted = fit_length(x, L, long_mode="tail")
    torch.testing.assert_close(fitted.x, x[4:])
    assert fitted.valid.all() and fitted.source_pos[0] == 4
    torch.testing.assert_close(fit_labels(x[:, 0], L, long_mode="tail"), x[4:, 0])
    back = unfit_predictions(fitted.x[:, 0], 20, long_mode="tail")
    torch.testing.assert_close(back, torch.cat((torch.full((4,), 4.0), x[4:, 0])))


def test_fit_labels_modes():
    y = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0])
    torch.testing.assert_close(fit_labels(y, 4), torch.tensor([0.0, 1.0, 0.5, 0.0]))  # soft, like the release
    torch.testing.assert_close(fit_labels(y, 4, mode="threshold"), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(fit_labels(y, 4, mode="nearest"), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(fit_labels(y[:3], 5), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="mode"):
        fit_labels(y, 4, mode="cubic")


def test_unfit_predictions_inverts_the_fit():
    p = torch.rand(L)
    torch.testing.assert_close(unfit_predictions(p, 9), p[:9])
    back = unfit_predictions(torch.full((L,), 0.3), 40)
    assert back.shape == (40,)
    torch.testing.assert_close(back, torch.full((40,), 0.3))
    ramp = torch.linspace(0, 1, 40)
    there = fit_length(ramp[:, None], L, align_corners=True).x[:, 0]
    torch.testing.assert_close(unfit_predictions(there, 40, align_corners=True), ramp)


def test_prepare_exam_resizes_before_differencing_and_zeroes_padding():
    long = torch.randn(40, D)
    fitted = prepare_exam(long, L)
    torch.testing.assert_close(fitted.x, difference_features(fit_length(long, L).x))
    short = torch.randn(6, D) + 5.0
    fitted = prepare_exam(short, L)
    assert fitted.x.shape == (L, 3 * D)
    torch.testing.assert_close(fitted.x[:6], difference_features(short))
    assert torch.count_nonzero(fitted.x[6:]) == 0
    assert torch.count_nonzero(fitted.x[5, 2 * D :]) == 0  # the last valid slice has no forward neighbour


def test_collate_exams_shapes_ratios_and_lengths():
    gen = torch.Generator().manual_seed(0)
    exams = []
    for s, pos in ((40, 10), (6, 3), (L, 0)):
        y = torch.zeros(s)
        y[:pos] = 1
        exams.append((torch.randn(s, D, generator=gen), y, torch.arange(9) % 2))
    batch = collate_exams(exams, length=L)
    assert batch.x.shape == (3, L, 3 * D) and batch.valid.shape == (3, L)
    assert batch.slice_labels.shape == (3, L) and batch.exam_labels.shape == (3, 9)
    assert batch.num_slices.tolist() == [40, 6, L]
    torch.testing.assert_close(batch.positive_ratio, torch.tensor([10 / 40, 3 / 6, 0.0]))
    assert batch.valid.sum(1).tolist() == [L, 6, L]
    assert batch.slice_labels.dtype == torch.float32 and batch.exam_labels.dtype == torch.float32
    with pytest.raises(ValueError, match="slice_labels"):
        collate_exams([(torch.randn(5, D), torch.zeros(4), torch.zeros(9))], length=L)


# ------------------------------------------------------------------------------------------------------- pooling
def test_masked_softmax_gives_padding_exactly_zero_and_sums_to_one():
    scores = torch.randn(3, L)
    valid = torch.arange(L) < torch.tensor([L, 4, 0])[:, None]
    scores[1, 4:] = torch.tensor([1e30, float("inf"), float("nan")] * 4)
    alpha = masked_softmax(scores, valid)
    assert torch.all(alpha[~valid] == 0)
    torch.testing.assert_close(alpha.sum(1), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.isfinite(alpha).all()


def test_padding_with_huge_values_never_wins_the_max_pool():
    h = -torch.rand(2, L, 3) - 1.0  # valid values all negative
    valid = torch.arange(L) < torch.tensor([5, 0])[:, None]
    h[:, 5:] = 1e30
    pooled = masked_max_pool(h, valid)
    torch.testing.assert_close(pooled[0], h[0, :5].max(dim=0).values)
    assert torch.all(pooled[1] == 0)


# -------------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_nine_exam_logits_and_attention_over_valid_slices(kind):
    model = _tiny(kind).eval()
    x, valid = _inputs()
    out = model(x, valid)
    assert isinstance(out, Stage2Output)
    assert out.slice_logits.shape == (4, L) and out.attention.shape == (4, L)
    assert out.exam_logits.shape == (4, len(EXAM_LABELS)) == (4, 9)
    assert torch.all(out.attention[~valid] == 0)
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(1), torch.ones(4))
    for t in (out.slice_logits, out.exam_logits):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("kind", KINDS)
def test_padding_content_changes_nothing(kind):
    model = _tiny(kind).eval()
    x, valid = _inputs()
    ref = model(x, valid)
    poisoned = torch.where(valid[..., None], x, torch.full_like(x, 1e30))
    poisoned[2, -1, 0] = float("inf")
    out = model(poisoned, valid)
    torch.testing.assert_close(out.exam_logits, ref.exam_logits)
    torch.testing.assert_close(out.slice_logits[valid], ref.slice_logits[valid])
    torch.testing.assert_close(out.attention, ref.attention)


def test_cc_huge_padded_states_never_win_the_max_pool():
    """In the CC model the pooled max comes from valid GRU states only (the release's unmasked max would pick the
    padded states, which here are made the largest)."""
    model = _tiny("cc").eval()
    x, valid = _inputs()
    h = model.gru(x)[0]
    h_poisoned = torch.where(valid[..., None], h, torch.full_like(h, 1e30))
    torch.testing.assert_close(masked_max_pool(h_poisoned, valid), masked_max_pool(h, valid))
    assert torch.all(masked_max_pool(h_poisoned, valid) < 1.0)  # GRU states are in (−1, 1)


def test_max_mil_winner_is_a_valid_slice():
    model = _tiny("mil_max").eval()
    x, valid = _inputs()
    out = model(x, valid)
    scores = model.instance_head(model.embed(x))[..., 1:]
    for b in range(x.shape[0]):
        n = int(valid[b].sum())
        torch.testing.assert_close(out.exam_logits[b], scores[b, :n].max(dim=0).values)


def test_pack_padding_makes_a_short_exam_independent_of_its_padding():
    model = _tiny("cc", pack_padding=True).eval()
    x, valid = _inputs()
    out = model(x, valid)
    alone = model(x[1:2, :5], valid[1:2, :5])  # exam 1 (5 slices) without padding
    torch.testing.assert_close(out.slice_logits[1, :5], alone.slice_logits[0])
    torch.testing.assert_close(out.exam_logits[1], alone.exam_logits[0])
    with pytest.raises(ValueError, match="prefix"):
        model(x, valid.flip(1))


def test_additive_attention_variant():
    model = _tiny("cc", attention="additive").eval()
    x, valid = _inputs()
    out = model(x, valid)
    assert torch.all(out.attention[~valid] == 0)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="seq_len"):
        PENet(in_dim=3 * D, hidden=HIDDEN)
    with pytest.raises(ValueError, match="attention"):
        PENet(in_dim=3 * D, hidden=HIDDEN, seq_len=L, attention="dot")


@pytest.mark.parametrize("kind", [*KINDS, "evit_positional"])
def test_gradients_reach_every_parameter(kind):
    model = _tiny("evit", positional=True) if kind == "evit_positional" else _tiny(kind)
    model.train()
    x, valid = _inputs()
    gen = torch.Generator().manual_seed(1)
    y = (torch.rand(4, L, generator=gen) > 0.5).float() * valid
    y[:, 0] = 1.0  # every exam has a positive slice, so every image weight is > 0
    out = model(x, valid)
    loss = rsna_weighted_bce(out, y, torch.rand(4, 9, generator=gen).round(), valid).total
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_parameter_budgets_match():
    for in_dim, hidden in ((3 * 128, 64), (3 * 2048, 512)):
        cc = count_parameters(build_stage2("cc", in_dim=in_dim, hidden=hidden, seq_len=64))
        assert cc == cc_parameter_count(in_dim=in_dim, hidden=hidden, seq_len=64)
        for kind in ("mil_attention", "mil_max"):
            if hidden == 512:  # counting without building: the MLP's first layer is the bulk
                continue
            n = count_parameters(build_stage2(kind, in_dim=in_dim, hidden=hidden))
            assert abs(n - cc) / cc < 0.01, (kind, n, cc)


def test_build_stage2_rejects_unknown_kinds_and_missing_lengths():
    with pytest.raises(ValueError, match="unknown"):
        build_stage2("rnn", in_dim=8, hidden=4)
    with pytest.raises(ValueError, match="seq_len"):
        build_stage2("evit", in_dim=8, hidden=4)
    assert isinstance(build_stage2("mil_attention", in_dim=8, hidden=4), GatedAttentionMIL)
    assert isinstance(build_stage2("mil_max", in_dim=8, hidden=4), MaxMIL)
    assert isinstance(build_stage2("evit", in_dim=8, hidden=4, seq_len=8, num_heads=1), EViT)
    model = build_stage2("cc", in_dim=8, hidden=4, seq_len=8)
    with pytest.raises(ValueError, match="longer"):
        model(torch.zeros(1, 9, 8), torch.ones(1, 9, dtype=torch.bool))


def test_evit_parts_average_in_probability():
    model = _tiny("evit").eval()
    x, valid = _inputs()
    out = model(x, valid)
    assert out.exam_logits_parts.shape == (4, 2, 9) and out.slice_logits_parts.shape == (4, 2, L)
    torch.testing.assert_close(out.exam_logits.sigmoid(), out.exam_logits_parts.sigmoid().mean(1))
    torch.testing.assert_close(out.slice_logits.sigmoid(), out.slice_logits_parts.sigmoid().mean(1))


# ------------------------------------------------------------------------------------------------------ training
def _toy_batch(seed: int = 0):
    """A separable toy task: feature 0 of a slice is +2 where it is positive, −2 elsewhere; exam labels follow from
    the positive slices (negative = none, indeterminate = 0, the other seven = any positive slice)."""
    gen = torch.Generator().manual_seed(seed)
    exams = []
    for i in range(12):
        s = int(torch.randint(6, 30, (1,), generator=gen))
        y = torch.zeros(s)
        if i % 2:
            start = int(torch.randint(0, s - 3, (1,), generator=gen))
            y[start : start + 3] = 1
        feats = 0.3 * torch.randn(s, D, generator=gen)
        feats[:, 0] += 4 * y - 2
        exam = torch.zeros(9)
        exam[0] = float(y.sum() == 0)
        exam[2:] = float(y.sum() > 0)
        exams.append((feats, y, exam))
    return collate_exams(exams, length=L)


def _train(kind: str, steps: int, seed: int = 0) -> list[float]:
    model = _tiny(kind, seed=seed)
    batch = _toy_batch()
    opt, _ = build_stage2_optimizer(model, lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(batch.x, batch.valid)
        parts = rsna_weighted_bce(out, batch.slice_labels, batch.exam_labels, batch.valid,
                                  num_slices=batch.num_slices, positive_ratio=batch.positive_ratio)  # fmt: skip
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        losses.append(parts.total.item())
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_on_a_separable_toy_task(kind):
    losses = _train(kind, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses[::8]


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic(kind):
    a, b = _train(kind, steps=3), _train(kind, steps=3)
    assert a == b
    x, valid = _inputs()
    m1, m2 = _tiny(kind, seed=5).eval(), _tiny(kind, seed=5).eval()
    torch.testing.assert_close(m1(x, valid).exam_logits, m2(x, valid).exam_logits, rtol=0, atol=0)


def test_optimizer_is_adam_with_step_decay():
    model = _tiny("cc")
    opt, sched = build_stage2_optimizer(model)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.8**2)
