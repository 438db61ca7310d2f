"""Tests of the wav2vec 2.0 / w2v-BERT objective pieces (thrifty.methods.bigssl.ssl)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.bigssl.ssl import (
    CodebookMonitor,
    ContrastiveOutput,
    GumbelProductQuantizer,
    MLMHead,
    apply_mask,
    codebook_alarm,
    contrastive_loss,
    diversity_loss,
    gumbel_temperature,
    mlm_loss,
    perplexity,
    random_vectors_like,
    sample_negatives,
    sample_span_starts,
    span_mask,
    temperature_schedule,
    wav2vec2_loss,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _valid(lengths: list[int], T: int | None = None) -> torch.Tensor:
    T = T or max(lengths)
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------------------------------------ span masking


def test_span_mask_only_valid_frames_and_right_shape():
    valid = _valid([100, 37, 12, 5, 0], T=100)
    mask = span_mask(valid, mask_prob=0.065, span=10, min_spans=2, generator=_gen())
    assert mask.shape == valid.shape and mask.dtype == torch.bool
    assert not (mask & ~valid).any()
    assert mask[:4].any(dim=1).all()  # every non-empty utterance is masked somewhere
    assert not mask[4].any()
    assert mask[3, :5].all()  # shorter than the span: masked entirely


def test_span_starts_count_range_and_distinct():
    lengths = [200, 60, 25, 11, 10, 3]
    for seed in range(20):
        starts = sample_span_starts(lengths, mask_prob=0.01, span=10, min_spans=2, generator=_gen(seed))
        for length, s in zip(lengths, starts):
            positions = length - min(10, length) + 1
            assert s.numel() >= min(2, positions)
            assert s.unique().numel() == s.numel()
            assert int(s.min()) >= 0 and int(s.max()) <= length - min(10, length)


def test_span_starts_probabilistic_rounding_mean():
    # int(p·L + u) has expectation p·L exactly: 0.065·100 = 6.5 starts on average
    n = [s.numel() for s in sample_span_starts([100] * 4000, mask_prob=0.065, span=10, min_spans=0, generator=_gen())]
    assert set(n) == {6, 7}
    assert sum(n) / len(n) == pytest.approx(6.5, abs=0.05)


def test_span_mask_min_spans_with_zero_prob():
    valid = _valid([100] * 50)
    mask = span_mask(valid, mask_prob=0.0, span=10, min_spans=2, generator=_gen(3))
    counts = mask.sum(dim=1)
    # two distinct starts: between one span (full overlap impossible, starts differ → ≥ 11) and two spans
    assert (counts >= 11).all() and (counts <= 20).all()


def test_span_mask_matches_its_starts():
    valid = _valid([80, 50, 30])
    mask = span_mask(valid, mask_prob=0.065, span=10, min_spans=2, generator=_gen(7))
    starts = sample_span_starts(valid.sum(1), mask_prob=0.065, span=10, min_spans=2, generator=_gen(7))
    expected = torch.zeros_like(mask)
    for b, s in enumerate(starts):
        for st in s.tolist():
            expected[b, st : st + 10] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("p", [0.065, 0.02])
def test_span_mask_fraction_matches_analytic_expectation(p: float):
    span, L = 10, 2000
    mask = span_mask(_valid([L] * 64), mask_prob=p, span=span, min_spans=2, generator=_gen(11))
    expected = 1 - (1 - p) ** span  # 0.4887 for p = 0.065
    assert mask.float().mean().item() == pytest.approx(expected, abs=0.01)


def test_span_mask_deterministic_with_seed():
    valid = _valid([120, 90, 64])
    a = span_mask(valid, mask_prob=0.065, generator=_gen(5))
    b = span_mask(valid, mask_prob=0.065, generator=_gen(5))
    c = span_mask(valid, mask_prob=0.065, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_span_mask_convention_vs_hf_fraction_of_spans():
    """Our start probability p equals Hugging Face's mask_time_prob = p·span (a fraction of spans)."""
    wav2vec2 = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")
    import numpy as np

    np.random.seed(0)
    p, span, L = 0.065, 10, 1000
    hf = wav2vec2._compute_mask_indices((64, L), mask_prob=p * span, mask_length=span, min_masks=2)
    ours = span_mask(_valid([L] * 64), mask_prob=p, span=span, generator=_gen(0))
    assert ours.float().mean().item() == pytest.approx(float(hf.mean()), abs=0.015)


# ------------------------------------------------------------------------------------------------ schedules


def test_temperature_schedules():
    assert gumbel_temperature(0) == 2.0
    assert gumbel_temperature(1000) == pytest.approx(2.0 * 0.999995**1000)
    assert gumbel_temperature(10_000_000) == 0.5
    assert temperature_schedule(0, 100, start=2.0, end=0.5) == pytest.approx(2.0)
    assert temperature_schedule(50, 100, start=2.0, end=0.5) == pytest.approx(1.0)  # geometric midpoint
    assert temperature_schedule(100, 100, start=2.0, end=0.5) == pytest.approx(0.5)
    assert temperature_schedule(500, 100, start=2.0, end=0.5) == pytest.approx(0.5)
    assert temperature_schedule(3, 0) == 0.5


# ------------------------------------------------------------------------------------------------ quantizer


def _quantizer(dim_in: int = 16, groups: int = 2, codes: int = 8, dim_out: int = 12) -> GumbelProductQuantizer:
    torch.manual_seed(0)
    return GumbelProductQuantizer(dim_in=dim_in, groups=groups, codes=codes, dim_out=dim_out)


def _expected_quantized(q: GumbelProductQuantizer, ids: torch.Tensor) -> torch.Tensor:
    parts = [q.codebook[g][ids[..., g]] for g in range(q.groups)]  # each (B, T, dim_out / G)
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("training", [True, False])
def test_quantizer_outputs_are_codebook_entries_at_ids(training: bool):
    q = _quantizer()
    q.train(training)
    x = torch.randn(3, 7, 16)
    out = q(x, _valid([7, 5, 2]), temperature=1.0, generator=_gen())
    assert out.quantized.shape == (3, 7, 12)
    assert out.ids.shape == (3, 7, 2) and out.ids.dtype == torch.long
    assert int(out.ids.min()) >= 0 and int(out.ids.max()) < 8
    torch.testing.assert_close(out.quantized, _expected_quantized(q, out.ids), rtol=1e-6, atol=1e-6)


def test_quantizer_straight_through_gradients():
    q = _quantizer()
    q.train()
    x = torch.randn(2, 9, 16)
    out = q(x, temperature=2.0, generator=_gen())
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert q.proj.weight.grad is not None and q.proj.weight.grad.abs().sum() > 0
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0
    # only the selected codes receive codebook gradient
    used = torch.zeros(2, 8, dtype=torch.bool)
    for g in range(2):
        used[g, out.ids[..., g].unique()] = True
    assert (q.codebook.grad.abs().sum(-1)[~used] == 0).all()


def test_quantizer_diversity_loss_reaches_logits():
    q = _quantizer()
    out = q(torch.randn(2, 9, 16), temperature=1.0)
    out.diversity_loss.backward()
    assert q.proj.weight.grad.abs().sum() > 0


def test_quantizer_eval_is_argmax_and_deterministic():
    q = _quantizer().eval()
    x = torch.randn(2, 6, 16)
    a = q(x, temperature=1.0, generator=_gen(1))
    b = q(x, temperature=0.1, generator=_gen(2))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.quantized, b.quantized)
    logits = (x @ q.proj.weight.T + q.proj.bias).view(2, 6, 2, 8)
    assert torch.equal(a.ids, logits.argmax(-1))
    assert torch.equal(a.ids, q.codes_for(x))  # the w2v-BERT targets


def test_quantizer_training_is_stochastic_but_seeded():
    q = _quantizer().train()
    x = torch.randn(2, 30, 16) * 0.01  # near-uniform logits: the Gumbel noise decides
    a = q(x, temperature=1.0, generator=_gen(1)).ids
    b = q(x, temperature=1.0, generator=_gen(1)).ids
    c = q(x, temperature=1.0, generator=_gen(2)).ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_perplexity_uniform_and_collapsed():
    G, V = 2, 8
    q = _quantizer(groups=G, codes=V)
    with torch.no_grad():
        q.proj.weight.zero_()
        q.proj.bias.zero_()
    x = torch.randn(4, 10, 16)
    out = q(x, temperature=1.0)
    assert out.perplexity.item() == pytest.approx(G * V, rel=1e-5)
    assert out.diversity_loss.abs().item() < 1e-5
    with torch.no_grad():
        q.proj.bias.view(G, V)[:, 3] = 1e4  # every frame picks code 3 in each group
    out = q(x, temperature=1.0)
    # Σ_g exp(H) = G when collapsed (1 per group)
    assert out.perplexity.item() == pytest.approx(G, rel=1e-5)
    assert out.hard_perplexity.item() == pytest.approx(G, rel=1e-5)
    assert out.used_fraction.item() == pytest.approx(1 / V)
    assert (out.ids == 3).all()
    assert out.diversity_loss.item() == pytest.approx((G * V - G) / (G * V), rel=1e-5)
    # G = 1 collapsed → exactly 1
    assert perplexity(F.one_hot(torch.zeros(50, 1, dtype=torch.long), 16).float()).item() == pytest.approx(1.0)


def test_perplexity_function_and_diversity_loss():
    probs = torch.full((5, 2, 320), 1 / 320)
    assert perplexity(probs).item() == pytest.approx(640, rel=1e-5)
    assert diversity_loss(perplexity(probs), groups=2, codes=320).abs().item() < 1e-5
    # entropy reference: half the frames on code 0, half on code 1 in each group → exp(ln 2) = 2 per group
    ids = torch.tensor([0, 1] * 10)[:, None].expand(20, 2)
    assert perplexity(F.one_hot(ids, 4).float()).item() == pytest.approx(4.0, rel=1e-6)


def test_quantizer_statistics_ignore_invalid_frames():
    q = _quantizer(groups=1, codes=4, dim_out=4).eval()
    with torch.no_grad():
        q.proj.weight.zero_()
        q.proj.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    x = torch.randn(1, 6, 16)
    valid = torch.tensor([[True, True, True, False, False, False]])
    full = q(x, valid, temperature=1.0)
    with torch.no_grad():
        q.proj.weight[1, 0] = 1e3  # padding frames with x[..., 0] > 0 would pick code 1; they must not count
    x = x.clone()
    x[0, :3, 0] = -1.0
    x[0, 3:, 0] = 1.0
    out = q(x, valid, temperature=1.0)
    assert out.used_fraction.item() == pytest.approx(0.25)
    assert out.hard_perplexity.item() == pytest.approx(1.0)
    assert full.used_fraction.item() == pytest.approx(0.25)


def test_quantizer_no_nan_with_extreme_logits_and_low_temperature():
    q = _quantizer().train()
    with torch.no_grad():
        q.proj.weight.mul_(1e4)
    x = torch.randn(2, 20, 16) * 10
    for seed in range(5):
        q.zero_grad()
        out = q(x, temperature=1e-3, generator=_gen(seed))
        for t in (out.quantized, out.perplexity, out.hard_perplexity, out.diversity_loss):
            assert torch.isfinite(t).all()
        (out.quantized.sum() + out.diversity_loss).backward()
        assert torch.isfinite(q.proj.weight.grad).all() and torch.isfinite(q.codebook.grad).all()


def test_quantizer_runs_fp32_under_autocast():
    q = _quantizer().train()
    x = torch.randn(2, 5, 16).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = q(x, temperature=1.0, generator=_gen())
    assert out.quantized.dtype == torch.float32 and out.perplexity.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ negatives


def test_sample_negatives_exclude_positive_and_stay_in_utterance():
    B, T, D, K = 3, 40, 6, 20
    targets = torch.randn(B, T, D)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 5:30] = True  # 25 masked: 24 others ≥ K → distinct negatives
    mask[1, [2, 9, 17, 33]] = True  # 4 masked: 3 others < K → with replacement
    mask[2, 10:12] = True  # 2 masked: the negative is always the other one
    negs, idx = sample_negatives(targets, mask, num_negatives=K, generator=_gen())
    assert negs.shape == (B, T, K, D) and idx.shape == (B, T, K) and idx.dtype == torch.long
    for b in range(B):
        masked = set(mask[b].nonzero().squeeze(1).tolist())
        for t in masked:
            drawn = idx[b, t].tolist()
            assert t not in drawn
            assert set(drawn) <= masked
            torch.testing.assert_close(negs[b, t], targets[b, idx[b, t]])
    assert all(len(set(idx[0, t].tolist())) == K for t in range(5, 30))  # without replacement
    assert set(idx[1, 9].tolist()) == {2, 17, 33}  # 20 draws over 3 others: all appear (p fail ≈ 3·(2/3)^20)
    assert (idx[2, 10] == 11).all() and (idx[2, 11] == 10).all()
    assert (negs[~mask] == 0).all()


def test_sample_negatives_uniform_over_others():
    T, K = 6, 5
    mask = torch.ones(1, T, dtype=torch.bool)
    counts = torch.zeros(T, T)
    g = _gen(4)
    for _ in range(400):
        _, idx = sample_negatives(torch.randn(1, T, 3), mask, num_negatives=K, generator=g)
        for t in range(T):
            counts[t] += torch.bincount(idx[0, t], minlength=T).float()
    assert (counts.diagonal() == 0).all()
    off = counts[~torch.eye(T, dtype=torch.bool)] / (400 * K / (T - 1))
    assert off.min() > 0.85 and off.max() < 1.15


def test_sample_negatives_single_masked_frame_is_flagged_and_harmless():
    targets = torch.randn(1, 8, 4)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 3] = True
    negs, idx = sample_negatives(targets, mask, num_negatives=5, generator=_gen())
    assert (idx[0, 3] == 3).all()  # the convention: its own index
    out = contrastive_loss(torch.randn(1, 8, 4), targets, negs, mask)
    assert out.loss_sum.item() == 0.0 and int(out.count) == 1


def test_sample_negatives_deterministic_and_gradient():
    targets = torch.randn(2, 30, 4, requires_grad=True)
    mask = span_mask(_valid([30, 22]), mask_prob=0.065, generator=_gen(1))
    a, ia = sample_negatives(targets, mask, num_negatives=10, generator=_gen(9))
    b, ib = sample_negatives(targets, mask, num_negatives=10, generator=_gen(9))
    assert torch.equal(ia, ib) and torch.equal(a, b)
    a.sum().backward()
    assert targets.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ contrastive loss


def _reference_contrastive(c, pos, negs, kappa):
    """Brute-force per-frame loss with identical negatives removed."""
    total = 0.0
    for i in range(c.shape[0]):
        cands = [pos[i]] + [n for n in negs[i] if not torch.equal(n, pos[i])]
        sims = torch.stack([F.cosine_similarity(c[i], v, dim=0) for v in cands]) / kappa
        total += -(sims[0] - torch.logsumexp(sims, 0)).item()
    return total


def test_contrastive_loss_equal_similarities_gives_log_k_plus_one():
    K, D = 7, 16
    eye = torch.eye(D)
    context = eye[0].expand(1, 3, D).clone()  # orthogonal to every candidate
    targets = eye[1:4].unsqueeze(0)
    negatives = torch.stack([eye[4 : 4 + K] * (t + 1) for t in range(3)]).unsqueeze(0)  # distinct from positives
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = contrastive_loss(context, targets, negatives, mask, kappa=0.1)
    assert int(out.count) == 3
    assert out.loss_sum.item() / 3 == pytest.approx(math.log(K + 1), rel=1e-5)
    assert out.accuracy.item() == 0.0  # ties are not counted as correct


def test_contrastive_loss_perfect_prediction():
    K, D = 10, 16
    eye = torch.eye(D)
    targets = eye[:2].unsqueeze(0)  # (1, 2, D)
    context = targets * 3.0  # same direction as the positive
    negatives = eye[5 : 5 + K].expand(1, 2, K, D).clone()  # orthogonal to the context
    out = contrastive_loss(context, targets, negatives, torch.ones(1, 2, dtype=torch.bool), kappa=0.1)
    assert out.accuracy.item() == 1.0 and int(out.correct) == 2
    assert out.loss_sum.item() / 2 == pytest.approx(math.log(1 + K * math.exp(-10)), rel=1e-3)
    assert out.loss_sum.item() / 2 < 1e-3


def test_contrastive_loss_matches_reference_and_masks_identical_negatives():
    B, T, D, K = 2, 12, 8, 6
    torch.manual_seed(0)
    context = torch.randn(B, T, D, requires_grad=True)
    targets = torch.randn(B, T, D)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:9] = True
    mask[1, 4:7] = True
    negatives, _ = sample_negatives(targets, mask, num_negatives=K, generator=_gen())
    negatives[0, 3, 1] = targets[0, 3]  # an identical negative: logit −inf
    negatives[1, 5, :] = targets[1, 5]  # all identical: loss 0 for that frame
    out = contrastive_loss(context, targets, negatives, mask, kappa=0.1)
    ref = _reference_contrastive(context[mask].detach(), targets[mask], negatives[mask], 0.1)
    assert out.loss_sum.item() == pytest.approx(ref, rel=1e-5)
    assert int(out.count) == 10
    assert torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    assert context.grad[mask].abs().sum() > 0
    assert (context.grad[~mask] == 0).all()


def test_contrastive_loss_fp32_and_empty_mask():
    x = torch.randn(1, 4, 8).bfloat16()
    negs = torch.randn(1, 4, 3, 8).bfloat16()
    out = contrastive_loss(x, x.flip(1), negs, torch.ones(1, 4, dtype=torch.bool))
    assert out.loss_sum.dtype == torch.float32
    empty = contrastive_loss(x, x, negs, torch.zeros(1, 4, dtype=torch.bool))
    assert empty.loss_sum.item() == 0.0 and int(empty.count) == 0 and empty.accuracy.item() == 0.0
    assert wav2vec2_loss(empty, torch.tensor(0.5)).item() == 0.0


def test_wav2vec2_loss_formula():
    c = ContrastiveOutput(
        loss_sum=torch.tensor(30.0), count=torch.tensor(10), accuracy=torch.tensor(0.5), correct=torch.tensor(5)
    )
    loss = wav2vec2_loss(c, torch.tensor(0.4), diversity_weight=0.1)
    assert loss.item() == pytest.approx((30.0 + 0.1 * 0.4 * 10) / 10)  # = L_m/N + 0.1·L_d


# ------------------------------------------------------------------------------------------------ masking inputs


def test_apply_mask_learned_and_random():
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, False, False, True, False], [False] * 5])
    emb = nn.Parameter(torch.randn(4))
    y = apply_mask(x, mask, mask_embedding=emb)
    assert torch.equal(y[~mask], x[~mask])
    assert torch.equal(y[mask], emb.detach().expand(2, 4))
    y.sum().backward()
    assert torch.equal(emb.grad, torch.full((4,), 2.0))
    r = apply_mask(x, mask, generator=_gen())
    assert torch.equal(r[~mask], x[~mask]) and not torch.equal(r[mask], x[mask])
    assert torch.equal(r, random_vectors_like(x, mask, _gen()))


def test_random_vectors_are_standard_normal():
    x = torch.zeros(4, 500, 8)
    mask = torch.ones(4, 500, dtype=torch.bool)
    r = random_vectors_like(x, mask, _gen(2))
    assert r.mean().abs().item() < 0.05 and r.std().item() == pytest.approx(1.0, abs=0.05)


# ------------------------------------------------------------------------------------------------ w2v-BERT MLM


def test_mlm_head_and_loss():
    G, V, D = 2, 11, 8
    head = MLMHead(dim=D, groups=G, codes=V)
    x = torch.randn(3, 6, D)
    logits = head(x)
    assert logits.shape == (3, 6, G, V)
    torch.testing.assert_close(logits[..., 1, :], head.heads[1](x))
    ids = torch.randint(0, V, (3, 6, G), generator=_gen())
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 1:4] = True
    loss, acc = mlm_loss(torch.zeros(3, 6, G, V), ids, mask)
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6)
    onehot = F.one_hot(ids, V).float() * 20.0
    onehot[~mask] = 0.0
    onehot[~mask, :, 0] = 1.0  # unmasked frames are wrong but ignored
    loss, acc = mlm_loss(onehot, ids, mask)
    assert acc.item() == 1.0 and loss.item() < 1e-6
    empty_loss, _ = mlm_loss(logits, ids, torch.zeros(3, 6, dtype=torch.bool))
    assert empty_loss.item() == 0.0


def test_w2v_bert_targets_are_quantizer_codes():
    """A w2v-BERT step: targets from the unmasked features, random-vector masking, MLM on masked frames."""
    G, V, D = 2, 8, 16
    q = _quantizer(dim_in=D, groups=G, codes=V).train()
    head = MLMHead(dim=D, groups=G, codes=V)
    features = torch.randn(2, 30, D)
    valid = _valid([30, 24])
    mask = span_mask(valid, mask_prob=0.065, span=5, generator=_gen())
    targets = q.codes_for(features)
    q.eval()
    assert torch.equal(targets, q(features, valid, temperature=1.0).ids)
    masked_in = apply_mask(features, mask, generator=_gen(1))
    assert mask.any()
    assert (q.codes_for(masked_in)[mask] != targets[mask]).any()  # targets come from the unmasked features
    assert torch.equal(q.codes_for(masked_in)[~mask], targets[~mask])
    loss, acc = mlm_loss(head(masked_in), targets, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in head.parameters())
    assert q.proj.weight.grad is None  # targets carry no gradient


# ------------------------------------------------------------------------------------------------ codebook health


def test_codebook_alarm_and_monitor():
    assert codebook_alarm(50.0, groups=2, codes=320)  # < 64
    assert not codebook_alarm(64.0, groups=2, codes=320)
    q = _quantizer(groups=2, codes=8).eval()
    mon = CodebookMonitor(groups=2, codes=8, threshold=0.5)
    with torch.no_grad():
        q.proj.weight.zero_()
        q.proj.bias.view(2, 8)[:, 0] = 1e4
    stats = mon.update(q(torch.randn(2, 5, 16), temperature=1.0))
    assert stats["alarm"] and stats["perplexity"] == pytest.approx(2.0)
    assert stats["cumulative_used_fraction"] == pytest.approx(1 / 8)
    with torch.no_grad():
        q.proj.bias.zero_()
    stats = mon.update(q(torch.randn(2, 5, 16), temperature=1.0))
    assert not stats["alarm"] and stats["perplexity"] == pytest.approx(16.0, rel=1e-5)
    assert mon.steps == 2 and mon.alarms == 1


# ------------------------------------------------------------------------------------------------ end to end


def test_tiny_wav2vec2_training_lowers_loss():
    """Linear feature encoder + conv context net + quantizer + contrastive/diversity loss on piecewise-constant data."""
    torch.manual_seed(0)
    g = _gen(0)
    B, T, F_in, D, K = 4, 48, 12, 32, 10
    prototypes = torch.randn(6, F_in)

    def batch() -> torch.Tensor:
        seg = torch.randint(0, 6, (B, T // 8), generator=g).repeat_interleave(8, dim=1)  # 8-frame segments
        return prototypes[seg] + 0.1 * torch.randn(B, T, F_in, generator=g)

    encoder = nn.Linear(F_in, D)
    context_net = nn.Conv1d(D, D, kernel_size=9, padding=4)
    quantizer = GumbelProductQuantizer(dim_in=D, groups=2, codes=16, dim_out=D)
    mask_emb = nn.Parameter(torch.rand(D))
    params = [*encoder.parameters(), *context_net.parameters(), *quantizer.parameters(), mask_emb]
    opt = torch.optim.Adam(params, lr=1e-2)
    valid = torch.ones(B, T, dtype=torch.bool)
    losses, accs, ppls = [], [], []
    steps = 50
    for step in range(steps):
        feats = encoder(batch())
        mask = span_mask(valid, mask_prob=0.05, span=4, generator=g)
        ctx = context_net(apply_mask(feats, mask, mask_embedding=mask_emb).transpose(1, 2)).transpose(1, 2)
        qout = quantizer(feats, valid, temperature=temperature_schedule(step, steps, start=2.0, end=0.5), generator=g)
        negs, _ = sample_negatives(qout.quantized, mask, num_negatives=K, generator=g)
        c = contrastive_loss(ctx, qout.quantized, negs, mask)
        loss = wav2vec2_loss(c, qout.diversity_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        losses.append(loss.item())
        accs.append(c.accuracy.item())
        ppls.append(qout.perplexity.item())
    mean = lambda xs: sum(xs) / len(xs)
    assert mean(losses[:5]) == pytest.approx(math.log(K + 1), rel=0.15)  # chance level at the start
    assert mean(losses[-10:]) < 0.75 * mean(losses[:5])
    assert mean(accs[-10:]) > mean(accs[:5]) + 0.15
    assert not codebook_alarm(min(ppls), groups=2, codes=16)  # the diversity term keeps the codebook in use
