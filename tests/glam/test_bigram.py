"""The GLaM works-claim baseline: an interpolated Kneser-Ney bigram, checked against hand arithmetic."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from thrifty.methods.glam.bigram import KneserNeyBigram, fit_on_validation, mixture_loss, mixture_mean

V = 4
STREAM = np.array([0, 1, 0, 1, 2, 0, 1, 3])


def _model(discount: float = 0.75) -> KneserNeyBigram:
    return KneserNeyBigram.fit([STREAM], vocab_size=V, discount=discount)


def _p(model: KneserNeyBigram, v: int, w: int) -> float:
    return float(np.exp(model.log_prob(np.array([v]), np.array([w]))[0]))


def _reference_kn(streams, vocab: int, discount: float):
    """An independent, dictionary-based interpolated Kneser-Ney: ``P(w | v)`` as a function."""
    pairs = Counter()
    for s in streams:
        for a, b in zip(list(s[:-1]), list(s[1:])):
            pairs[(int(a), int(b))] += 1
    c_ctx = Counter()
    succ = Counter()
    pred = Counter()
    for (a, b), n in pairs.items():
        c_ctx[a] += n
        succ[a] += 1
        pred[b] += 1
    p_cont = {w: (pred[w] + 1) / (len(pairs) + vocab) for w in range(vocab)}

    def prob(v: int, w: int) -> float:
        if c_ctx[v] == 0:
            return p_cont[w]
        return max(pairs[(v, w)] - discount, 0) / c_ctx[v] + discount * succ[v] / c_ctx[v] * p_cont[w]

    return prob


# --------------------------------------------------------------------------- hand arithmetic

# STREAM's pairs: (0,1) x3, (1,0), (1,2), (2,0), (1,3); 5 distinct pairs.
# c(0) = 3, c(1) = 3, c(2) = 1, c(3) = 0; N1+(0.) = 1, N1+(1.) = 3, N1+(2.) = 1.
# N1+(.0) = 2 (after 1 and 2), N1+(.1) = 1, N1+(.2) = 1, N1+(.3) = 1.
# P_cont(w) = (N1+(.w) + 1) / (5 + 4): 3/9, 2/9, 2/9, 2/9.


def test_counts_of_the_hand_stream():
    m = _model()
    assert m.pair_codes.tolist() == [0 * V + 1, 1 * V + 0, 1 * V + 2, 1 * V + 3, 2 * V + 0]
    assert m.pair_counts.tolist() == [3, 1, 1, 1, 1]
    assert m.context_counts.tolist() == [3, 3, 1, 0]
    assert m.context_types.tolist() == [1, 3, 1, 0]
    assert m.continuation == pytest.approx([3 / 9, 2 / 9, 2 / 9, 2 / 9])


@pytest.mark.parametrize(
    "v,w,expected",
    [
        # (3 - 0.75)/3 + 0.75 * 1/3 * 2/9 = 0.75 + 1/18
        (0, 1, 0.75 + 1 / 18),
        # unseen pair after 0: 0 + 0.75 * 1/3 * 3/9 = 1/12
        (0, 0, 1 / 12),
        # (1 - 0.75)/3 + 0.75 * 3/3 * 2/9 = 1/12 + 1/6
        (1, 2, 1 / 12 + 1 / 6),
        # (1 - 0.75)/3 + 0.75 * 3/3 * 3/9 = 1/12 + 1/4
        (1, 0, 1 / 12 + 1 / 4),
        # unseen pair after 1: 0.75 * 2/9 = 1/6
        (1, 1, 1 / 6),
        # (1 - 0.75)/1 + 0.75 * 1/1 * 3/9 = 1/4 + 1/4
        (2, 0, 0.5),
        # context 3 never seen as a left context: P_cont
        (3, 0, 3 / 9),
        (3, 3, 2 / 9),
    ],
)
def test_log_prob_matches_hand_computation(v, w, expected):
    m = _model(0.75)
    assert _p(m, v, w) == pytest.approx(expected, rel=1e-12)
    assert float(m.log_prob(np.array(v), np.array(w))) == pytest.approx(math.log(expected), rel=1e-12)


def test_log_prob_with_discount_one():
    # D = 1: P(1|0) = (3 - 1)/3 + 1 * 1/3 * 2/9 = 2/3 + 2/27; seen-once pairs keep only the back-off mass
    m = _model(1.0)
    assert _p(m, 0, 1) == pytest.approx(2 / 3 + 2 / 27)
    assert _p(m, 2, 0) == pytest.approx(1 * 1 / 1 * 3 / 9)
    assert _p(m, 1, 3) == pytest.approx(1 * 3 / 3 * 2 / 9)


def test_log_prob_keeps_shape_of_2d_input():
    m = _model()
    prev = np.array([[0, 1], [2, 3]])
    nxt = np.array([[1, 2], [0, 0]])
    lp = m.log_prob(prev, nxt)
    assert lp.shape == (2, 2)
    assert np.exp(lp) == pytest.approx(np.array([[0.75 + 1 / 18, 0.25], [0.5, 3 / 9]]))


def test_with_discount_changes_only_the_discount():
    m = _model(0.75)
    m2 = m.with_discount(0.5)
    assert m2.discount == 0.5
    assert m.discount == 0.75
    # (3 - 0.5)/3 + 0.5 * 1/3 * 2/9
    assert _p(m2, 0, 1) == pytest.approx(2.5 / 3 + 1 / 27)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("discount", [0.1, 0.5, 0.75, 0.9, 1.0])
def test_each_context_sums_to_one_on_hand_stream(discount):
    m = _model(discount)
    for v in range(V):  # 0-2 seen as contexts, 3 unseen
        total = np.exp(m.log_prob(np.full(V, v), np.arange(V))).sum()
        assert total == pytest.approx(1.0, abs=1e-12), v


@pytest.mark.parametrize("discount", [0.3, 0.75, 1.0])
def test_each_context_sums_to_one_and_matches_reference_on_random_streams(discount):
    rng = np.random.default_rng(0)
    vocab = 13
    # token 12 never appears, so context 12 is unseen; 11 only appears last, so it is never a left context
    streams = [rng.integers(0, 11, size=n) for n in (40, 25, 1, 9)]
    streams[1][-1] = 11
    m = KneserNeyBigram.fit(streams, vocab_size=vocab, discount=discount)
    ref = _reference_kn(streams, vocab, discount)
    prev, nxt = np.meshgrid(np.arange(vocab), np.arange(vocab), indexing="ij")
    p = np.exp(m.log_prob(prev, nxt))
    assert p.sum(axis=1) == pytest.approx(np.ones(vocab), abs=1e-12)
    assert np.all(p > 0)
    expected = np.array([[ref(v, w) for w in range(vocab)] for v in range(vocab)])
    assert p == pytest.approx(expected, rel=1e-12)
    assert m.context_counts[11] == 0 and m.context_counts[12] == 0


# --------------------------------------------------------------------------- streams


def test_pairs_never_cross_streams():
    a, b = np.array([0, 1, 0]), np.array([1, 2])
    apart = KneserNeyBigram.fit([a, b], vocab_size=V)
    joined = KneserNeyBigram.fit([np.concatenate([a, b])], vocab_size=V)
    # the only difference is the boundary pair (0, 1): last token of a, first of b
    boundary = 0 * V + 1
    apart_counts = dict(zip(apart.pair_codes.tolist(), apart.pair_counts.tolist()))
    joined_counts = dict(zip(joined.pair_codes.tolist(), joined.pair_counts.tolist()))
    assert apart_counts == {0 * V + 1: 1, 1 * V + 0: 1, 1 * V + 2: 1}
    expected = dict(apart_counts)
    expected[boundary] += 1
    assert joined_counts == expected
    assert (joined.context_counts - apart.context_counts).tolist() == [1, 0, 0, 0]
    assert apart.pair_counts.sum() == (len(a) - 1) + (len(b) - 1)


def test_single_token_streams_add_no_pairs():
    m = KneserNeyBigram.fit([STREAM, np.array([3]), np.array([], dtype=np.int64)], vocab_size=V)
    assert m.pair_counts.sum() == len(STREAM) - 1
    assert m.context_counts[3] == 0


def test_fit_without_any_pair_raises():
    with pytest.raises(ValueError, match="two or more"):
        KneserNeyBigram.fit([np.array([1]), np.array([2])], vocab_size=V)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("discount", [0.0, -0.5, 1.5, float("nan")])
def test_bad_discount_raises(discount):
    with pytest.raises(ValueError, match="discount"):
        KneserNeyBigram.fit([STREAM], vocab_size=V, discount=discount)
    with pytest.raises(ValueError, match="discount"):
        _model().with_discount(discount)


def test_fit_on_validation_rejects_bad_discount_in_grid():
    windows = {"a": np.array([[0, 1, 0]])}
    with pytest.raises(ValueError, match="discount"):
        fit_on_validation([STREAM], windows, {"a": 1.0}, vocab_size=V, discounts=(0.5, 1.2))


@pytest.mark.parametrize("bad", [[0, 4], [1, -1], [2, 5], [4, 0], [0, -1], [-1, 0], [1, 2, 3, 7, 1]])
def test_fit_with_out_of_range_token_raises(bad):
    # [0, 4]: the pair code 0 * 4 + 4 = 4 is the valid code of the pair (1, 0), and [1, -1] gives 1 * 4 - 1 = 3,
    # the code of (0, 3); out-of-range ids must be refused, not counted as another pair
    with pytest.raises(ValueError, match="token ids"):
        KneserNeyBigram.fit([STREAM, np.array(bad)], vocab_size=V)


@pytest.mark.parametrize("prev,nxt", [([0, 4], [1, 1]), ([0, 1], [1, 4]), ([-1], [0]), ([0], [-1])])
def test_log_prob_with_out_of_range_token_raises(prev, nxt):
    with pytest.raises(ValueError, match="token ids"):
        _model().log_prob(np.array(prev), np.array(nxt))


def test_log_prob_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        _model().log_prob(np.array([0, 1]), np.array([1]))


# --------------------------------------------------------------------------- losses and discount choice


def _mean_nll(prob, windows: np.ndarray) -> float:
    nll = [-math.log(prob(int(r[t]), int(r[t + 1]))) for r in windows for t in range(len(r) - 1)]
    return sum(nll) / len(nll)


def test_window_loss_sums_target_nll():
    m = _model(0.75)
    windows = np.array([[0, 1, 2], [2, 0, 0]])
    total, n = m.window_loss(windows)
    # targets: P(1|0), P(2|1), P(0|2), P(0|0)
    expected = -(math.log(0.75 + 1 / 18) + math.log(0.25) + math.log(0.5) + math.log(1 / 12))
    assert n == 4
    assert total == pytest.approx(expected)
    assert m.window_loss(np.zeros((0, 3), dtype=np.int64)) == (0.0, 0)


def test_mixture_loss_overall_is_weighted_mean_over_finite_sources():
    m = _model(0.75)
    windows = {
        "a": np.array([[0, 1, 2], [2, 0, 0]]),
        "b": np.array([[1, 0, 1]]),
        "empty": np.zeros((0, 3), dtype=np.int64),
    }
    weights = {"a": 0.6, "b": 0.3, "empty": 0.1}
    out = mixture_loss(m, windows, weights)
    la = -(math.log(0.75 + 1 / 18) + math.log(0.25) + math.log(0.5) + math.log(1 / 12)) / 4
    lb = -(math.log(1 / 12 + 1 / 4) + math.log(0.75 + 1 / 18)) / 2
    assert out["a"] == pytest.approx(la)
    assert out["b"] == pytest.approx(lb)
    assert math.isnan(out["empty"])
    # the weights of the sources with a value are renormalised: (0.6 la + 0.3 lb) / 0.9
    assert out["overall"] == pytest.approx((0.6 * la + 0.3 * lb) / 0.9)
    assert set(out) == {"a", "b", "empty", "overall"}


def test_mixture_mean_ignores_nan_and_missing_sources():
    assert mixture_mean({"a": 2.0, "b": math.nan}, {"a": 1.0, "b": 3.0}) == pytest.approx(2.0)
    assert mixture_mean({"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 3.0}) == pytest.approx(3.5)
    assert mixture_mean({"a": 2.0}, {"a": 1.0, "c": 5.0}) == pytest.approx(2.0)


def test_mixture_mean_without_any_finite_source_is_nan():
    # nothing was measured: a loss of 0 would read as a perfect model
    assert math.isnan(mixture_mean({"a": math.nan}, {"a": 1.0}))
    m = _model()
    assert math.isnan(mixture_loss(m, {"a": np.zeros((0, 3), dtype=np.int64)}, {"a": 1.0})["overall"])


def test_fit_on_validation_picks_lowest_validation_loss():
    rng = np.random.default_rng(3)
    vocab = 9
    train = [rng.integers(0, vocab, size=60), rng.integers(0, 5, size=40)]
    val = {"x": rng.integers(0, vocab, size=(6, 5)), "y": rng.integers(0, 5, size=(4, 5))}
    weights = {"x": 0.25, "y": 0.75}
    discounts = (0.05, 0.3, 1.0, 0.5, 0.9)
    model, tried = fit_on_validation(train, val, weights, vocab_size=vocab, discounts=discounts)

    direct = {}
    for d in discounts:
        ref = _reference_kn(train, vocab, d)
        direct[d] = (0.25 * _mean_nll(ref, val["x"]) + 0.75 * _mean_nll(ref, val["y"])) / 1.0
    assert set(tried) == set(discounts)
    for d in discounts:
        assert tried[d] == pytest.approx(direct[d], rel=1e-12)
    best = min(direct, key=direct.get)
    assert best != discounts[0]  # the choice is not just the first one tried
    assert len({round(v, 9) for v in direct.values()}) == len(discounts)  # no ties
    assert model.discount == best
    # the returned model is fitted on the training counts
    assert model.pair_counts.sum() == sum(len(s) - 1 for s in train)
