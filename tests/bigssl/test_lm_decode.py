"""Character Witten-Bell n-gram LM, CTC greedy and prefix beam search (exactness against ``F.ctc_loss`` and brute
force, shallow fusion, length bonus), and WER/CER (jiwer against the fallback)."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.bigssl import tokens
from thrifty.methods.bigssl.decode import (
    Hypothesis,
    beam_search_batch,
    char_error_rate,
    ctc_greedy,
    ctc_prefix_beam_search,
    greedy_texts,
    word_error_rate,
)
from thrifty.methods.bigssl.lm import ALPHABET, END, CharNGramLM

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "house", "it's", "quick", "brown", "fox", "jumps"]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def lm() -> CharNGramLM:
    return CharNGramLM(order=5).fit(corpus())


def scramble(text: str, seed: int = 0) -> str:
    chars = list(text)
    random.Random(seed).shuffle(chars)
    return "".join(chars)


# ---------------------------------------------------------------------------------------------------- LM
@pytest.mark.parametrize("order", [1, 2, 3, 5])
@pytest.mark.parametrize("history", ["", "t", "the ca", "qzx'", "zzzzzzzz", "jumps the quick brown"])
def test_lm_distribution_sums_to_one(order: int, history: str) -> None:
    model = CharNGramLM(order=order).fit(corpus(50))
    total = sum(math.exp(model.log_prob(history, c)) for c in ALPHABET)
    assert total == pytest.approx(1.0, abs=1e-12)
    assert np.exp(model.log_probs(history)).sum() == pytest.approx(1.0, abs=1e-12)
    assert all(model.log_prob(history, c) < 0 for c in ALPHABET)  # smoothing: nothing gets probability 0 or 1


def test_lm_witten_bell_by_hand() -> None:
    model = CharNGramLM(order=2).fit(["ab"])
    size = len(ALPHABET)
    # unigram: counts a=1, b=1, </s>=1, so c()=3 and N1+()=3, interpolated with uniform
    p1 = {c: ((1.0 if c in ("a", "b", END) else 0.0) + 3 / size) / 6 for c in ALPHABET}
    # after "a": c(a,b)=1, c(a)=1, N1+(a·)=1
    assert math.exp(model.log_prob("a", "b")) == pytest.approx((1 + p1["b"]) / 2, rel=1e-12)
    assert math.exp(model.log_prob("a", "z")) == pytest.approx(p1["z"] / 2, rel=1e-12)
    # sentence start "<s>" was followed by "a" once
    assert math.exp(model.log_prob("", "a")) == pytest.approx((1 + p1["a"]) / 2, rel=1e-12)
    # unseen history "z": backs off to the unigram entirely; only the last order-1 characters matter
    assert math.exp(model.log_prob("z", "b")) == pytest.approx(p1["b"], rel=1e-12)
    assert model.log_prob("zza", "b") == model.log_prob("a", "b")


def test_lm_prefers_training_text(lm: CharNGramLM) -> None:
    texts = corpus()
    for i, text in enumerate(texts[:10]):
        mixed = scramble(text, seed=i)
        assert mixed != text
        assert lm.sentence_log_prob(text) > lm.sentence_log_prob(mixed)
    shuffled = [scramble(t, seed=i) for i, t in enumerate(texts)]
    ppl_train, ppl_shuffled = lm.perplexity(texts), lm.perplexity(shuffled)
    assert 1.0 < ppl_train < 3.0 < ppl_shuffled
    # perplexity is per character including the end symbol
    n = sum(len(t) + 1 for t in texts[:5])
    assert lm.perplexity(texts[:5]) == pytest.approx(math.exp(-sum(map(lm.sentence_log_prob, texts[:5])) / n))


def test_lm_json_round_trip(lm: CharNGramLM, tmp_path) -> None:
    path = tmp_path / "lm.json"
    lm.to_json(path)
    assert [p.name for p in tmp_path.iterdir()] == ["lm.json"]  # no temporary file left behind
    assert json.loads(path.read_text())["order"] == 5
    loaded = CharNGramLM.from_json(path)
    for history in ["", "the ", "qqq", "it's a dog that ran to the house"]:
        assert np.array_equal(loaded.log_probs(history), lm.log_probs(history))
    for text in corpus(5, seed=1):
        assert loaded.sentence_log_prob(text) == lm.sentence_log_prob(text)


def test_lm_order_one_ignores_history() -> None:
    model = CharNGramLM(order=1).fit(["aab", "ab"])
    assert model.log_prob("", "a") == model.log_prob("bbb", "a")
    assert model.log_prob("", "a") > model.log_prob("", "b") > model.log_prob("", "z")
    assert model.perplexity(["ab"]) > 1.0


def test_lm_rejects_unnormalised_text() -> None:
    with pytest.raises(ValueError, match="normalise"):
        CharNGramLM(order=3).fit(["Hello, world"])
    with pytest.raises(ValueError):
        CharNGramLM(order=3).fit(["ab"]).log_prob("a", "X")


def test_lm_fit_speed() -> None:
    import time

    texts = corpus(5000, seed=3)
    start = time.perf_counter()
    CharNGramLM(order=5).fit(texts)
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------------------------------- greedy
def one_hot_log_probs(paths: list[list[int]], vocab: int = tokens.VOCAB_SIZE) -> torch.Tensor:
    t = max(len(p) for p in paths)
    logits = torch.zeros(len(paths), t, vocab)
    for b, path in enumerate(paths):
        for i, k in enumerate(path):
            logits[b, i, k] = 5.0
    return logits.log_softmax(-1)


def test_ctc_greedy_collapses_repeats_and_blanks() -> None:
    a, b = tokens.encode("ab")
    blank = tokens.BLANK
    paths = [[a, a, blank, a, b, b, blank], [blank, b, a, a, b, b, b]]
    lp = one_hot_log_probs(paths)
    assert ctc_greedy(lp, torch.tensor([7, 4])) == [[a, a, b], [b, a]]
    assert greedy_texts(lp, torch.tensor([7, 7])) == ["aab", "bab"]
    assert greedy_texts(lp, torch.tensor([0, 1])) == ["", ""]


# ---------------------------------------------------------------------------------------------------- beam search
def random_log_probs(t: int, v: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(t, v, generator=gen, dtype=torch.float64) * scale).log_softmax(-1)


def ctc_log_likelihood(lp: torch.Tensor, ids: tuple[int, ...]) -> float:
    target = torch.tensor([list(ids)], dtype=torch.long) if ids else torch.zeros(1, 0, dtype=torch.long)
    nll = F.ctc_loss(
        lp[:, None, :],
        target,
        torch.tensor([lp.shape[0]]),
        torch.tensor([len(ids)]),
        blank=0,
        reduction="sum",
        zero_infinity=False,
    )
    return -float(nll)


def brute_force_label_probs(lp: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Total probability of every label sequence, summing all V^T paths."""
    probs = lp.exp().numpy()
    t, v = probs.shape
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(v), repeat=t):
        labels = tuple(k for i, k in enumerate(path) if k != 0 and (i == 0 or path[i - 1] != k))
        totals[labels] = totals.get(labels, 0.0) + float(np.prod(probs[np.arange(t), path]))
    return totals


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_beam_search_is_exact_with_a_large_beam(seed: int) -> None:
    lp = random_log_probs(6, 5, seed)
    hyps = ctc_prefix_beam_search(lp, beam=100_000, length_bonus=0.0, prune=-math.inf)
    assert hyps == sorted(hyps, key=lambda h: h.score, reverse=True)
    for hyp in hyps[:20]:
        assert tokens.encode(hyp.text) == list(hyp.ids)
        assert hyp.ctc_log_prob == pytest.approx(ctc_log_likelihood(lp, hyp.ids), abs=1e-4)
        assert hyp.score == hyp.ctc_log_prob and hyp.lm_log_prob == 0.0
    brute = brute_force_label_probs(lp)
    best = max(brute, key=brute.__getitem__)
    assert hyps[0].ids == best
    assert math.exp(hyps[0].ctc_log_prob) == pytest.approx(brute[best], rel=1e-9)
    assert sum(math.exp(h.ctc_log_prob) for h in hyps) == pytest.approx(1.0, rel=1e-9)  # every sequence survived


def test_prefix_beam_search_small_beam_finds_peaky_best() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = [tokens.BLANK, *tokens.encode("hello"), tokens.BLANK]
    path = [ids[i] for i in (0, 1, 1, 0, 2, 3, 3, 0, 4, 5, 5, 6)]  # h e l _ l o
    logits = torch.randn(len(path), tokens.VOCAB_SIZE, generator=gen)
    logits[torch.arange(len(path)), path] += 6.0
    lp = logits.log_softmax(-1)
    assert ctc_prefix_beam_search(lp, beam=4, length_bonus=0.0)[0].text == "hello"
    # the batch API gives the same best hypothesis, respecting lengths
    batch = torch.stack([lp, torch.roll(lp, 1, dims=0)])
    results = beam_search_batch(batch, torch.tensor([12, 5]), beam=4, length_bonus=0.0)
    assert isinstance(results[0], Hypothesis) and results[0].text == "hello"
    assert results[1] == ctc_prefix_beam_search(batch[1, :5], beam=4, length_bonus=0.0)[0]


def test_prefix_beam_search_prune() -> None:
    lp = random_log_probs(8, tokens.VOCAB_SIZE, seed=4, scale=0.1)
    assert ctc_prefix_beam_search(lp, prune=0.0)[0].text == ""  # every non-blank token skipped


def test_shallow_fusion_prefers_lm_order() -> None:
    a, b = tokens.encode("ab")
    probs = torch.full((2, 5), 1e-6, dtype=torch.float64)
    probs[:, a] = probs[:, b] = 0.5  # "ab", "ba", "a", "b" all equally likely acoustically
    lp = (probs / probs.sum(-1, keepdim=True)).log()
    plain = ctc_prefix_beam_search(lp, beam=16, length_bonus=0.0)
    scores = {h.text: h.score for h in plain}
    assert scores["ab"] == pytest.approx(scores["ba"], abs=1e-12)
    for text in ("ab", "ba"):
        model = CharNGramLM(order=3).fit([text] * 20 + ["a b"])
        hyps = ctc_prefix_beam_search(lp, beam=16, lm=model, lm_weight=1.0, length_bonus=0.0)
        assert hyps[0].text == text
        for h in hyps:
            assert h.lm_log_prob == pytest.approx(model.sentence_log_prob(h.text), abs=1e-9)
            assert h.score == pytest.approx(h.ctc_log_prob + 1.0 * h.lm_log_prob, abs=1e-9)
    # lm_weight is ignored without an LM and a zero weight recovers the plain scores
    model = CharNGramLM(order=3).fit(["ab"])
    zero = ctc_prefix_beam_search(lp, beam=16, lm=model, lm_weight=0.0, length_bonus=0.0)
    assert {h.text: h.score for h in zero} == pytest.approx(scores)
    assert ctc_prefix_beam_search(lp, beam=16, lm_weight=5.0, length_bonus=0.0) == plain


def test_length_bonus_lengthens_hypotheses() -> None:
    a = tokens.encode("a")[0]
    probs = torch.full((4, 5), 1e-4, dtype=torch.float64)
    probs[:, tokens.BLANK], probs[:, a] = 0.85, 0.15
    lp = (probs / probs.sum(-1, keepdim=True)).log()
    lengths = [len(ctc_prefix_beam_search(lp, beam=8, length_bonus=bonus)[0].text) for bonus in (0.0, 1.0, 3.0, 6.0)]
    assert lengths[0] == 0
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    best = ctc_prefix_beam_search(lp, beam=8, length_bonus=3.0)[0]
    assert best.score == pytest.approx(best.ctc_log_prob + 3.0 * len(best.text))


# ---------------------------------------------------------------------------------------------------- WER / CER
@pytest.mark.parametrize("use_jiwer", [True, False])
def test_error_rates_known_values(use_jiwer: bool) -> None:
    assert word_error_rate("a b c d", "a x c", use_jiwer=use_jiwer) == pytest.approx(2 / 4)
    assert word_error_rate(["a b c d", "e f"], ["a x c", "e f"], use_jiwer=use_jiwer) == pytest.approx(2 / 6)
    assert word_error_rate(["the cat"], [""], use_jiwer=use_jiwer) == pytest.approx(1.0)
    assert word_error_rate(["the cat"], ["the  cat "], use_jiwer=use_jiwer) == 0.0
    assert char_error_rate("abc", "abd", use_jiwer=use_jiwer) == pytest.approx(1 / 3)
    assert char_error_rate(["a b"], ["ab"], use_jiwer=use_jiwer) == pytest.approx(1 / 3)
    assert char_error_rate(["abcd", "xy"], ["", "xy"], use_jiwer=use_jiwer) == pytest.approx(4 / 6)


def test_jiwer_and_fallback_agree() -> None:
    pytest.importorskip("jiwer")
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 4)
        refs = [" ".join(rng.choice(WORDS[:5]) for _ in range(rng.randint(1, 6))) for _ in range(n)]
        hyps = [" ".join(rng.choice(WORDS[:5]) for _ in range(rng.randint(0, 6))) for _ in range(n)]
        for fn in (word_error_rate, char_error_rate):
            assert fn(refs, hyps, use_jiwer=True) == pytest.approx(fn(refs, hyps, use_jiwer=False), abs=1e-12)
    for refs, hyps in [([""], ["a b"]), ([""], [""]), (["", "a"], ["b", "a"])]:
        for fn in (word_error_rate, char_error_rate):
            assert fn(refs, hyps, use_jiwer=True) == pytest.approx(fn(refs, hyps, use_jiwer=False))
