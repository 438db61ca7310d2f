"""Unit and small end-to-end tests of the BigSSL recipe: the noisy-student filter, balance and mix, decoding scores,
pre-training gradients and determinism, the schedule and step batches, config validation, label fractions, data
hygiene and the three data sources (synthetic, manifest, LibriSpeech layout).

References are computed independently of the code under test (exact fractions, hand-written greedy decoding, the
normalised score formula of the method card)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.core.splits import AccessLog
from thrifty.data.audio import AudioError
from thrifty.methods.bigssl import pretrain as pretrain_mod
from thrifty.methods.bigssl.data import SpeechData, Split, fraction_size, prepare_data
from thrifty.methods.bigssl.decode import ctc_prefix_beam_search
from thrifty.methods.bigssl.features import Normalizer
from thrifty.methods.bigssl.lm import CharNGramLM
from thrifty.methods.bigssl.loop import StepBatches, tri_stage, warmup_cosine
from thrifty.methods.bigssl.nst import (
    PseudoLabel,
    balance,
    decode_scores,
    filter_pseudo_labels,
    fit_length_normaliser,
    mix,
)
from thrifty.methods.bigssl.pretrain import build_ssl_model, held_out_loss, pretrain_loss_on_batch
from thrifty.methods.bigssl.tokens import CHARS, VOCAB, VOCAB_SIZE

SR = 16000


def smoke(tmp: Path, data_dir: Path, *overrides: str):
    return load_config(
        "bigssl",
        "smoke",
        [f"out_dir={tmp}", f"data_dir={data_dir}", "progress=false", "device=cpu", "num_threads=1", *overrides],
    )


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> SpeechData:
    """The smoke corpus (50 synthetic utterances), prepared once for the module."""
    _, cfg = smoke(tmp_path_factory.mktemp("smoke-runs"), data_dir)
    return prepare_data(cfg, data_dir, AccessLog())


# ================================================================================================ NST: filter


def test_fit_length_normaliser_recovers_line_and_noise_scale():
    rng = np.random.default_rng(0)
    a, b, noise = -0.8, 3.0, 0.5
    ell = rng.integers(5, 80, size=4000)
    s = a * ell + b + noise * np.sqrt(ell) * rng.standard_normal(ell.size)
    fa, fb, sigma = fit_length_normaliser(s.tolist(), ell.tolist())
    assert fa == pytest.approx(a, abs=0.01)
    assert fb == pytest.approx(b, abs=0.4)
    assert sigma == pytest.approx(noise, rel=0.05)


def test_fit_length_normaliser_scale_follows_noise():
    rng = np.random.default_rng(1)
    ell = rng.integers(3, 60, size=3000)
    eps = rng.standard_normal(ell.size)
    sigmas = [fit_length_normaliser((-ell + k * np.sqrt(ell) * eps).tolist(), ell.tolist())[2] for k in (0.2, 1.0)]
    assert sigmas[1] / sigmas[0] == pytest.approx(5.0, rel=0.02)


def _labels(rng: np.random.Generator, n: int) -> list[PseudoLabel]:
    words = ["a", "to", "the", "cat", "sat", "upon", "mats", "of", "gold"]
    out = []
    for i in range(n):
        k = int(rng.integers(0, 7))
        text = " ".join(rng.choice(words, size=k)) if k else ""
        out.append(PseudoLabel(i, f"u{i}", text, float(rng.normal(-1.0 * max(len(text), 1), 4.0))))
    return out


def test_filter_keeps_exactly_the_items_above_tau():
    a, b, sigma, tau = -1.0, 2.0, 0.5, 0.5
    labels = _labels(np.random.default_rng(2), 300)
    # boundary: exactly at τ (−4 + 2 + 0.5·0.5·2 = −1.5 → z = 0.5) is not kept; an empty text never is
    labels.append(PseudoLabel(300, "edge", "abcd", -1.5))
    labels.append(PseudoLabel(301, "empty", "", 1e6))
    expected = {}
    for p in labels:
        ell = max(len(p.text), 1)
        expected[p.index] = (p.score - a * ell - b) / (sigma * math.sqrt(ell))
    assert expected[300] == 0.5
    keep = {i for i, z in expected.items() if z > tau and labels[i].text}
    kept = filter_pseudo_labels(labels, a=a, b=b, sigma=sigma, tau=tau)
    assert [p.index for p in kept] == sorted(keep)
    assert 0 < len(keep) < len(labels)  # the example is not degenerate
    for p in labels:
        assert p.normalized == pytest.approx(expected[p.index], rel=1e-12, abs=1e-12)
        assert p.kept == (p.index in keep)
    assert all(p.text for p in kept)
    assert 300 not in keep and 301 not in keep


def test_filter_never_keeps_empty_texts_even_at_minus_infinity_tau():
    labels = [PseudoLabel(i, str(i), "" if i % 3 == 0 else "hi", float(-i)) for i in range(30)]
    kept = filter_pseudo_labels(labels, a=0.0, b=0.0, sigma=1.0, tau=-math.inf)
    assert [p.index for p in kept] == [i for i in range(30) if i % 3]


# ================================================================================================ NST: balance


def _by_words(counts: dict[int, int], start: int = 0) -> list[PseudoLabel]:
    out = []
    for k, n in counts.items():
        for _ in range(n):
            i = start + len(out)
            out.append(PseudoLabel(i, f"u{i}", " ".join(["w"] * k), 0.0))
    rng = np.random.default_rng(3)
    order = rng.permutation(len(out))
    return [PseudoLabel(j, f"u{j}", out[o].text, 0.0) for j, o in enumerate(order)]


def _check_balanced(chosen: list[PseudoLabel], labels: list[PseudoLabel], reference: list[int]) -> None:
    have = Counter(len(p.text.split()) for p in labels)
    got = Counter(len(p.text.split()) for p in chosen)
    ref = Counter(reference)
    bins = [k for k in ref if have[k] > 0]
    weight = sum(ref[k] for k in bins)
    n = len(chosen)
    # a subset of the input, without repeats, in index order
    assert len({p.index for p in chosen}) == n
    assert {id(p) for p in chosen} <= {id(p) for p in labels}
    assert [p.index for p in chosen] == sorted(p.index for p in chosen)
    # nothing from lengths the reference does not have
    assert set(got) <= set(bins)
    # proportional to the reference histogram, up to the per-bin rounding
    for k in bins:
        assert abs(got[k] - n * ref[k] / weight) <= 0.5 * len(bins) + 0.5, (k, got, ref)
    # as many as the rarest bin allows: the limiting bin is (almost) used up
    limiting = min(bins, key=lambda k: have[k] / ref[k])
    assert got[limiting] >= have[limiting] - 1


def test_balance_follows_reference_histogram():
    labels = _by_words({1: 30, 2: 50, 3: 20, 4: 40, 7: 9})
    reference = [1] * 10 + [2] * 20 + [3] * 10  # 1 : 2 : 1, no 4- or 7-word utterances
    chosen = balance(labels, reference, rng=np.random.default_rng(0))
    _check_balanced(chosen, labels, reference)
    assert Counter(len(p.text.split()) for p in chosen) == {1: 20, 2: 40, 3: 20}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_random_histograms(seed: int):
    rng = np.random.default_rng(100 + seed)
    labels = _by_words({k: int(rng.integers(5, 60)) for k in range(1, 9)})
    reference = rng.integers(1, 9, size=200).tolist()
    chosen = balance(labels, reference, rng=np.random.default_rng(seed))
    _check_balanced(chosen, labels, reference)


def test_balance_is_deterministic_under_a_seeded_rng():
    labels = _by_words({1: 40, 2: 60, 3: 30})
    reference = [1, 2, 2, 3]
    first = [p.index for p in balance(labels, reference, rng=np.random.default_rng(7))]
    again = [p.index for p in balance(labels, reference, rng=np.random.default_rng(7))]
    other = [p.index for p in balance(labels, reference, rng=np.random.default_rng(8))]
    assert first == again
    assert len(other) == len(first) and other != first  # the seed chooses which, not how many


# ================================================================================================ NST: mix


def _split(name: str, n: int, texts: list[str | None] | None, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(20 + 3 * i, 80, generator=g).half() for i in range(n)]
    meta = [{"duration": 0.1 * i, "speaker": f"{name}{i}"} for i in range(n)]
    return Split(name, [f"{name}-{i}" for i in range(n)], feats, texts or [None] * n, meta, Normalizer.fit(feats))


def test_mix_appends_pseudo_labelled_utterances():
    labelled = _split("lab", 3, ["one", "two words", "three more words"], 0)
    unlabelled = _split("unl", 6, None, 1)
    before = (list(unlabelled.ids), list(unlabelled.texts), [f.clone() for f in unlabelled.feats])
    pseudo = [PseudoLabel(4, "unl-4", "pseudo four", 0.0), PseudoLabel(1, "unl-1", "pseudo one", 0.0)]
    mixed = mix(labelled, unlabelled, pseudo)

    assert len(mixed) == 5
    assert mixed.ids == ["lab-0", "lab-1", "lab-2", "unl-4", "unl-1"]
    assert mixed.texts == ["one", "two words", "three more words", "pseudo four", "pseudo one"]
    for got, want in zip(mixed.feats, [*labelled.feats, unlabelled.feats[4], unlabelled.feats[1]]):
        assert torch.equal(got, want)
    assert mixed.meta == [*labelled.meta, unlabelled.meta[4], unlabelled.meta[1]]
    assert mixed.normalizer is labelled.normalizer
    assert [t.tolist() for t in mixed.targets([3, 4])] == [
        [CHARS.index(c) + 1 for c in "pseudo four"],
        [CHARS.index(c) + 1 for c in "pseudo one"],
    ]
    # the unlabelled split is left as it was: no transcripts leak into it
    assert unlabelled.ids == before[0] and unlabelled.texts == before[1] == [None] * 6
    assert all(torch.equal(a, b) for a, b in zip(unlabelled.feats, before[2]))


def test_mix_on_the_prepared_smoke_data(smoke_data: SpeechData):
    labelled = smoke_data.labelled_fraction(0.5)
    unl = smoke_data.unlabelled
    pseudo = [PseudoLabel(i, unl.ids[i], f"pseudo number {w}", 0.0) for i, w in [(0, "one"), (5, "two")]]
    mixed = mix(labelled, unl, pseudo)
    assert mixed.ids == [*labelled.ids, unl.ids[0], unl.ids[5]]
    assert mixed.texts[len(labelled) :] == ["pseudo number one", "pseudo number two"]
    assert all(t is None for t in unl.texts)
    x, lengths = mixed.batch([0, len(labelled)])
    assert x.shape == (2, int(lengths.max()), 80) and torch.isfinite(x).all()


# ================================================================================================ NST: decode_scores


def _reference_greedy(lp: np.ndarray) -> tuple[str, float]:
    text, prev, score = [], None, 0.0
    for row in lp:
        t = int(np.argmax(row))
        score += float(row[t])
        if t != prev and t != 0:
            text.append(VOCAB[t])
        prev = t
    return "".join(text), score


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_decode_scores_without_fusion_is_greedy():
    rng = np.random.default_rng(0)
    lps = [_log_softmax(rng.normal(0, 3, size=(t, VOCAB_SIZE))) for t in (1, 7, 25, 60)]
    # repeats collapse unless a blank separates them: a a _ a b b _ _ b → "aabb"
    path = [3, 3, 0, 3, 4, 4, 0, 0, 4]
    peaky = np.full((len(path), VOCAB_SIZE), -20.0)
    peaky[np.arange(len(path)), path] = -0.01
    lps.append(peaky)
    lm = CharNGramLM(order=3).fit(["a b c"])
    for lm_arg, fusion in [(None, None), (lm, None), (None, {"lm_weight": 0.5, "length_bonus": 1.0})]:
        out = decode_scores(lps, lm_arg, fusion=fusion, beam=4)
        assert len(out) == len(lps)
        for lp, (text, score) in zip(lps, out):
            want_text, want_score = _reference_greedy(lp)
            assert text == want_text
            assert score == pytest.approx(want_score, rel=1e-9, abs=1e-9)
    assert out[-1][0] == "aabb"


def test_decode_scores_with_fusion_returns_the_fused_beam_best():
    sentences = ["the cat sat on the mat", "a cat and a hat", "the cat is fat", "that cat sat"]
    lm = CharNGramLM(order=4).fit(sentences)
    # acoustics: "the c?t" with an ambiguous frame where 'o' is slightly more likely than 'a'
    frames: list[dict[str, float]] = []
    for c in "the c":
        frames += [{c: 0.0}, {"": 0.0}]
    frames += [{"o": math.log(0.55), "a": math.log(0.45)}, {"": 0.0}, {"t": 0.0}]
    lp = np.full((len(frames), VOCAB_SIZE), -30.0)
    for t, f in enumerate(frames):
        for c, v in f.items():
            lp[t, 0 if c == "" else CHARS.index(c) + 1] = v
    lp = _log_softmax(lp)
    ((greedy_text, _),) = decode_scores([lp], lm, fusion=None, beam=8)
    assert greedy_text == "the cot"
    fusion = {"lm_weight": 1.0, "length_bonus": 0.0}
    ((text, score),) = decode_scores([lp], lm, fusion=fusion, beam=8)
    assert text == "the cat"
    best = ctc_prefix_beam_search(lp, beam=8, lm=lm, **fusion)[0]
    assert (text, score) == (best.text, pytest.approx(best.score))
    # the fused score is log p_CTC + λ log p_LM (+ β|y|): check it against the LM's own sentence probability
    assert score == pytest.approx(best.ctc_log_prob + lm.sentence_log_prob("the cat"), abs=1e-6)
    assert best.ctc_log_prob == pytest.approx(math.log(0.45), abs=1e-3)


# ================================================================================================ pre-training


def _ssl(objective: str, tmp: Path, data_dir: Path, *extra: str):
    _, cfg = smoke(tmp, data_dir, f"pretrain.objective={objective}", *extra)
    torch.manual_seed(0)
    return build_ssl_model(cfg), cfg


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([120, 97, 75])
    x = torch.randn(3, 120, 80, generator=g)
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0.0
    return x, lengths


@pytest.mark.parametrize("objective", ["wav2vec2", "w2v_bert"])
def test_every_parameter_gets_a_finite_gradient(objective: str, tmp_path: Path, data_dir: Path):
    model, cfg = _ssl(objective, tmp_path, data_dir)
    if objective == "wav2vec2":
        assert hasattr(model, "mask_embedding") and not hasattr(model, "mlm_head")
    else:
        assert hasattr(model, "mlm_head") and not hasattr(model, "mask_embedding")
        assert model.contrastive_layers == cfg.pretrain.contrastive_layers < len(model.encoder.layers)
    x, lengths = _batch()
    loss = pretrain_loss_on_batch(model, x, lengths, cfg)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing and not zero and not bad, f"no grad: {missing}; all-zero grad: {zero}; non-finite: {bad}"


@pytest.mark.parametrize("objective", ["wav2vec2", "w2v_bert"])
def test_pretrain_loss_is_deterministic(objective: str, tmp_path: Path, data_dir: Path):
    model, cfg = _ssl(objective, tmp_path, data_dir)
    x, lengths = _batch()
    model.eval()
    with torch.no_grad():
        assert (
            pretrain_loss_on_batch(model, x, lengths, cfg).item()
            == pretrain_loss_on_batch(model, x, lengths, cfg).item()
        )
    # training mode: masks, negatives and Gumbel noise come from the fixed generator; dropout from the global RNG
    model.train()
    values = []
    for _ in range(2):
        torch.manual_seed(123)
        values.append(pretrain_loss_on_batch(model, x, lengths, cfg).item())
    assert values[0] == values[1]
    # without dropout nothing else is random
    model_nodrop, cfg_nodrop = _ssl(objective, tmp_path, data_dir, "model.dropout=0.0")
    model_nodrop.train()
    torch.manual_seed(1)
    first = pretrain_loss_on_batch(model_nodrop, x, lengths, cfg_nodrop).item()
    torch.manual_seed(2)
    assert pretrain_loss_on_batch(model_nodrop, x, lengths, cfg_nodrop).item() == first


def test_pretrain_loss_on_batch_is_deterministic_in_training_mode(tmp_path: Path, data_dir: Path):
    model, cfg = _ssl("wav2vec2", tmp_path, data_dir)
    x, lengths = _batch()
    assert (
        pretrain_loss_on_batch(model, x, lengths, cfg).item() == pretrain_loss_on_batch(model, x, lengths, cfg).item()
    )


def test_w2v_bert_mlm_targets_are_the_quantizer_ids(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    model, cfg = _ssl("w2v_bert", tmp_path, data_dir)
    x, lengths = _batch(1)
    seen: dict[str, torch.Tensor] = {}
    original = pretrain_mod.mlm_loss

    def spy(logits, ids, mask):
        seen["ids"], seen["mask"], seen["logits"] = ids.clone(), mask.clone(), logits.detach()
        return original(logits, ids, mask)

    monkeypatch.setattr(pretrain_mod, "mlm_loss", spy)
    model.eval()
    with torch.no_grad():
        out = pretrain_loss_on_batch(model, x, lengths, cfg)
        z, _, valid = model.encoder.frontend(x, lengths)
        expected = model.quantizer.codes_for(model.feature_norm(z))
    assert torch.isfinite(out)
    assert seen["ids"].shape == expected.shape == (3, z.shape[1], cfg.pretrain.groups)
    assert torch.equal(seen["ids"], expected)
    assert seen["logits"].shape == (*expected.shape, cfg.pretrain.codes)
    assert seen["mask"].any() and not (seen["mask"] & ~valid).any()  # scored only at masked, real frames


@pytest.mark.parametrize("objective", ["wav2vec2", "w2v_bert"])
def test_adam_steps_lower_the_pretraining_loss(objective: str, tmp_path: Path, data_dir: Path):
    model, cfg = _ssl(objective, tmp_path, data_dir)
    x, lengths = _batch(2)

    def loss_with_fixed_dropout() -> float:
        torch.manual_seed(0)  # masks, negatives and noise are fixed by the function; dropout by this seed
        with torch.no_grad():
            return pretrain_loss_on_batch(model, x, lengths, cfg).item()

    before = loss_with_fixed_dropout()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = pretrain_loss_on_batch(model, x, lengths, cfg)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = loss_with_fixed_dropout()
    assert all(math.isfinite(v) for v in losses)
    assert after < 0.8 * before, (before, after, losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_held_out_loss_is_finite_and_deterministic(smoke_data: SpeechData, tmp_path: Path, data_dir: Path):
    for objective in ("wav2vec2", "w2v_bert"):
        model, cfg = _ssl(objective, tmp_path, data_dir)
        model.train()
        dev = smoke_data.dev.get("pretrain_val", "test")
        first = held_out_loss(model, dev, cfg, temperature=1.0)
        second = held_out_loss(model, dev, cfg, temperature=1.0)
        assert set(first) == {"loss", "contrastive", "accuracy", "mlm", "mlm_accuracy"}
        assert all(math.isfinite(v) for v in first.values()), first
        assert first == second
        assert model.training  # the mode is restored
        assert 0.0 <= first["accuracy"] <= 1.0 and first["loss"] > 0
        assert (first["mlm"] > 0) == (objective == "w2v_bert")


# ================================================================================================ schedule and batches


@pytest.mark.parametrize(("warmup", "max_steps"), [(10, 100), (1, 7), (30, 300)])
def test_warmup_cosine_shape(warmup: int, max_steps: int):
    f = warmup_cosine(warmup, max_steps)
    values = [f(s) for s in range(max_steps + 5)]
    rise = values[:warmup]
    assert all(v == pytest.approx((s + 1) / warmup) for s, v in enumerate(rise))  # linear
    assert values[warmup - 1] == pytest.approx(1.0) and values[warmup] == pytest.approx(1.0)
    assert max(values) <= 1.0 + 1e-12
    tail = values[warmup : max_steps + 1]
    assert all(a > b for a, b in itertools.pairwise(tail))  # strictly decreasing after the warm-up
    assert values[max_steps] == pytest.approx(0.0, abs=1e-12)
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in values[max_steps:])
    mid = (warmup + max_steps) / 2
    if mid == int(mid):
        assert f(int(mid)) == pytest.approx(0.5)  # the cosine's half-way point


def _lengths(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(30, 400, size=n).tolist()


def _epochs(sb: StepBatches, steps: int) -> dict[int, list[list[int]]]:
    out: dict[int, list[list[int]]] = {}
    for s in range(steps):
        out.setdefault(sb.epoch_of(s), []).append(sb(s))
    return out


def test_step_batches_resume_gives_the_same_batches():
    lengths = _lengths(57, 0)
    fresh = StepBatches(lengths, max_frames=1500, seed=3)
    sequence = [fresh(s) for s in range(60)]
    for s in (0, 1, 17, 33, 59):
        assert StepBatches(lengths, max_frames=1500, seed=3)(s) == sequence[s]
    backwards = StepBatches(lengths, max_frames=1500, seed=3)
    assert [backwards(s) for s in reversed(range(60))] == sequence[::-1]
    other_seed = StepBatches(lengths, max_frames=1500, seed=4)
    assert [other_seed(s) for s in range(10)] != sequence[:10]


def test_step_batches_cover_every_index_once_per_epoch():
    lengths = _lengths(57, 1)
    sb = StepBatches(lengths, max_frames=1500, seed=0)
    epochs = _epochs(sb, 80)
    assert len(epochs) >= 3
    for e in sorted(epochs)[:-1]:  # the last may be partial
        flat = [i for batch in epochs[e] for i in batch]
        assert sorted(flat) == list(range(len(lengths))), e
    for batches in epochs.values():
        for batch in batches:
            assert max(lengths[i] for i in batch) * len(batch) <= 1500
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_step_batches_ranks_are_disjoint_within_an_epoch():
    # 32 utterances → 8 quantile buckets of 4; each bucket fits one batch (4 × ≤ 50 frames ≤ 200): 8 batches, even
    lengths = np.random.default_rng(2).integers(10, 51, size=32).tolist()
    ranks = [StepBatches(lengths, max_frames=200, seed=5, rank=r, world_size=2) for r in (0, 1)]
    per_rank = [_epochs(sb, 12) for sb in ranks]
    for e in (0, 1):
        a = [i for batch in per_rank[0][e] for i in batch]
        b = [i for batch in per_rank[1][e] for i in batch]
        assert len(per_rank[0][e]) == len(per_rank[1][e])
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(32))
    # the same global order: rank 1 resumed at a later step sees what it would have seen
    assert StepBatches(lengths, max_frames=200, seed=5, rank=1, world_size=2)(9) == ranks[1](9)


# ================================================================================================ config validation


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["stages=[data,bogus]"], "stages"),
        (["pretrain.objective=hubert"], "pretrain.objective"),
        (["finetune.init=random"], "finetune.init"),
        (["finetune.inits=[scratch,imagenet]"], "finetune.init"),
        (["data.source=s3"], "data.source"),
        (["finetune.fractions=[0.0,1.0]"], "finetune.fractions"),
        (["finetune.fractions=[0.5,1.5]"], "finetune.fractions"),
        (["finetune.fractions=[-0.1]"], "finetune.fractions"),
        (["finetune.fractions=[]"], "finetune.fractions"),
        (["nst.fractions=[0.25]"], "nst.fractions"),
        (["pretrain.objective=w2v_bert", "pretrain.contrastive_layers=2"], "pretrain.contrastive_layers"),
        (["pretrain.objective=w2v_bert", "pretrain.contrastive_layers=5"], "pretrain.contrastive_layers"),
        (["pretrain.objective=w2v_bert", "pretrain.contrastive_layers=0"], "pretrain.contrastive_layers"),
        (["pretrain.objective=w2v_bert", "model.size=smoke"], "pretrain.contrastive_layers"),
        (["finetune.decoder=lstm"], "finetune.decoder"),
        (["finetune.encoder_lr_scale=0"], "finetune.encoder_lr_scale"),
        (["rnnt.chunk_size=0"], "rnnt.chunk_size"),
        (["data.task=poems"], "data.task"),
        (["data.min_words=1"], "data.min_words"),
    ],
)
def test_config_validation_names_the_key(overrides: list[str], key: str, tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config("bigssl", "smoke", [f"out_dir={tmp_path}", *overrides])
    assert key in str(err.value), str(err.value)
    bad_value = overrides[0].split("=", 1)[1].strip("[]").split(",")[-1]
    if key in ("stages", "pretrain.objective", "finetune.init", "data.source", "finetune.decoder", "data.task"):
        assert bad_value in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["pretrain.objective=w2v_bert", "pretrain.contrastive_layers=1"],
        ["pretrain.objective=w2v_bert", "model.num_layers=4", "pretrain.contrastive_layers=3"],
        ["pretrain.objective=wav2vec2", "pretrain.contrastive_layers=9"],  # ignored by wav2vec 2.0
        ["nst.fractions=[0.5]", "finetune.fractions=[0.5,1.0]"],
        ["data.source=librispeech", "stages=[data,finetune]", "finetune.init=scratch"],
        ["data.task=sentences", "data.min_words=1", "data.max_words=8"],
        ["finetune.decoder=rnnt", "rnnt.pred_layers=2", "finetune.encoder_lr_scale=0.25"],
    ],
)
def test_config_validation_accepts_valid_settings(overrides: list[str], tmp_path: Path):
    _, cfg = load_config("bigssl", "smoke", [f"out_dir={tmp_path}", *overrides])
    assert cfg.preset == "smoke"


# ================================================================================================ fractions


def test_fraction_size_matches_exact_arithmetic():
    for pool in range(1, 301):
        sizes = []
        for f in (0.01, 0.03, 0.1, 0.25, 0.5, 1.0):
            expected = max(1, math.ceil(Fraction(str(f)) * pool))
            assert fraction_size(f, pool) == expected, (f, pool)
            sizes.append(expected)
        assert sizes == sorted(sizes) and sizes[-1] == pool


def test_label_fractions_are_nested_prefixes(smoke_data: SpeechData):
    pool = smoke_data.labelled
    fractions = [0.01, 0.03, 0.1, 1.0]
    subsets = [smoke_data.labelled_fraction(f) for f in fractions]
    assert [len(s) for s in subsets] == [max(1, math.ceil(Fraction(str(f)) * len(pool))) for f in fractions]
    assert subsets[-1].ids == pool.ids
    for small, big in itertools.pairwise(subsets):
        n = len(small)
        assert big.ids[:n] == small.ids and big.texts[:n] == small.texts
        assert all(torch.equal(a, b) for a, b in zip(big.feats[:n], small.feats))
    assert smoke_data.labelled_fraction(0.5).ids == smoke_data.labelled_fraction(0.5).ids
    assert all(t for t in pool.texts)


# ================================================================================================ data hygiene


def test_prepared_smoke_data_hygiene(smoke_data: SpeechData):
    data = smoke_data
    assert len(data.unlabelled) == 20 and len(data.labelled) == 12
    assert set(data.tests) == {"test_in", "test_ood"}
    # the unlabelled transcripts are hidden; the truth only opens for the pseudo-label quality report
    assert all(t is None for t in data.unlabelled.texts)
    with pytest.raises(PermissionError):
        data.unlabelled_truth.get("train", "u")
    truth = data.unlabelled_truth.get("pseudo_label_quality", "u")
    assert len(truth) == len(data.unlabelled) and all(truth)
    # test sets are read for testing only; dev for its purposes only
    for guarded in data.tests.values():
        with pytest.raises(PermissionError):
            guarded.get("select", "u")
    with pytest.raises(PermissionError):
        data.dev.get("test", "u")
    dev = data.dev.get("select", "u")
    tests = {name: g.get("test", "u") for name, g in data.tests.items()}
    # no test sentence is a training sentence (labelled or the hidden unlabelled ones), nor LM text
    train_texts = set(data.labelled.texts) | set(truth)
    test_texts = {t for s in tests.values() for t in s.texts}
    assert test_texts and not test_texts & train_texts
    assert not set(dev.texts) & (train_texts | test_texts)
    held_out = train_texts | test_texts | set(dev.texts)
    assert data.lm_texts and not set(data.lm_texts) & held_out
    # the normaliser was fit on the training audio: normalised labelled + unlabelled frames are standardised
    frames = torch.cat([f.float() for f in data.labelled.feats + data.unlabelled.feats])
    z = data.normalizer(frames)
    assert z.mean(0).abs().max() < 1e-3
    assert (z.std(0) - 1).abs().max() < 1e-3
    for split in (data.labelled, data.unlabelled, dev, *tests.values()):
        assert split.normalizer is data.normalizer
    # and not on dev / test audio: including them would move the statistics
    everything = Normalizer.fit([f.float() for f in data.labelled.feats + data.unlabelled.feats + dev.feats])
    assert not torch.allclose(everything.mean, data.normalizer.mean, atol=1e-4)


def test_guarded_reads_are_logged(tmp_path: Path, data_dir: Path, smoke_data: SpeechData):
    _, cfg = smoke(tmp_path, data_dir)
    access = AccessLog()
    data = prepare_data(cfg, data_dir, access)  # cached: features and corpus are reused
    assert data.labelled.ids == smoke_data.labelled.ids  # the labelled order is fixed by the data seed
    data.dev.get("select", "unit-a")
    with pytest.raises(PermissionError):
        data.tests["test_in"].get("tune", "unit-a")
    data.tests["test_in"].get("test", "unit-b")
    assert [(e["split"], e["purpose"], e["unit"]) for e in access.entries] == [
        ("dev", "select", "unit-a"),
        ("test_in", "test", "unit-b"),
    ]


# ================================================================================================ real-format sources


def _tone(path: Path, seconds: float, freq: float, seed: int, *, fmt: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), SR, format=fmt)


TEXTS = [
    "one two three",
    "a cat sat",
    "hello there world",
    "go home now",
    "red blue green",
    "the sun is up",
    "we can run",
    "big dog barks",
    "see the sea",
    "it is cold",
    "i am here",
    "on the hill",
]


@pytest.fixture(scope="module")
def manifest_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Twelve short tones with made-up texts and manifests in three formats (JSONL, CSV)."""
    root = tmp_path_factory.mktemp("manifest-corpus")
    for i, text in enumerate(TEXTS):
        _tone(root / "audio" / f"u{i}.wav", 0.5 + 0.04 * len(text), 180 + 35 * i, i)
    (root / "bad.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt this is not audio at all")

    def jsonl(name: str, idx: list[int], key: str = "audio_filepath", extra: list[dict] = ()) -> Path:
        rows = [{key: f"audio/u{i}.wav", "text": TEXTS[i].upper() + "!"} for i in idx] + list(extra)
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    paths = {
        "labelled": jsonl("labelled.jsonl", [0, 1, 2, 3, 4, 5]),
        "labelled_bad": jsonl("labelled_bad.jsonl", [0, 1, 2, 3, 4, 5], extra=[{"path": "bad.wav", "text": "bad"}]),
        "dev": jsonl("dev.jsonl", [8, 9, 10], key="path"),
        "unlabelled": root / "unlabelled.csv",
        "test": root / "mytest.csv",
    }
    paths["unlabelled"].write_text("path\n" + "".join(f"audio/u{i}.wav\n" for i in range(6, 12)))
    paths["test"].write_text("path,text\n" + "".join(f"audio/u{i}.wav,{TEXTS[i]}\n" for i in (9, 10, 11)))
    return paths


def _manifest_overrides(paths: dict[str, Path], labelled: str = "labelled") -> list[str]:
    return [
        "data.source=manifest",
        f"data.labelled_manifest={paths[labelled]}",
        f"data.unlabelled_manifest={paths['unlabelled']}",
        f"data.dev_manifest={paths['dev']}",
        f"data.test_manifests=[{paths['test']}]",
        "pretrain.max_steps=2",
        "finetune.max_steps=2",
        "nst.max_steps=2",
        "seeds=[0,1]",
    ]


def test_manifest_source_end_to_end(manifest_corpus: dict[str, Path], tmp_path: Path, data_dir: Path):
    module, cfg = smoke(tmp_path, data_dir, *_manifest_overrides(manifest_corpus), "run_name=manifest")
    result = module.train(cfg)
    run = tmp_path / "bigssl" / "manifest"
    saved = json.loads((run / "results.json").read_text())
    assert saved["wer"] == result["wer"]
    assert set(saved["data"]) == {"unlabelled", "labelled", "dev", "mytest"}
    assert saved["data"]["labelled"]["utterances"] == 6 and saved["data"]["unlabelled"]["utterances"] == 6
    assert set(saved["wer"]) == {"scratch", "pretrained", "pretrained+nst"}
    for per_fraction in saved["wer"].values():
        assert set(per_fraction) == {"0.5", "1.0"}
        for per_test in per_fraction.values():
            assert set(per_test) == {"mytest"} and per_test["mytest"] >= 0.0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["source"] == "manifest" and manifest["bad_files_skipped"] == 0
    assert manifest["fractions"] == {"0.5": 3, "1.0": 6}
    access = [json.loads(line) for line in (run / "access_log.jsonl").read_text().splitlines()]
    assert {e["purpose"] for e in access if e["split"] == "mytest"} == {"test"}
    assert {e["purpose"] for e in access if e["split"] == "unlabelled_truth"} <= {"pseudo_label_quality"}
    gen = json.loads((run / "units" / "nst" / "50pct-s0" / "gen1" / "result.json").read_text())
    assert "pseudo_wer_all" not in gen  # the unlabelled manifest has no transcripts: nothing to measure
    labels = [json.loads(line) for line in (run / "units" / "nst" / "50pct-s0" / "gen1" / "pseudo_labels.jsonl").open()]
    assert len(labels) == 6 and {p["index"] for p in labels} == set(range(6))


def test_manifest_source_corrupt_file(manifest_corpus: dict[str, Path], tmp_path: Path, data_dir: Path):
    overrides = _manifest_overrides(manifest_corpus, labelled="labelled_bad")
    module, cfg = smoke(tmp_path, data_dir, *overrides, "run_name=strict")
    with pytest.raises(AudioError, match=r"bad\.wav"):
        module.train(cfg)
    # skipping bad files: the run goes through and reports the one it skipped
    light = ["stages=[data,finetune,evaluate]", "finetune.init=scratch", "finetune.fractions=[1.0]", "run_name=skip"]
    module, cfg = smoke(tmp_path, data_dir, *overrides, "data.skip_bad=true", *light)
    result = module.train(cfg)
    manifest = json.loads((tmp_path / "bigssl" / "skip" / "manifest.json").read_text())
    assert manifest["bad_files_skipped"] == 1
    assert manifest["sizes"]["labelled"]["utterances"] == 6
    assert (tmp_path / "bigssl" / "skip" / "results.json").exists()
    assert set(result["wer"]["scratch"]["1.0"]) == {"mytest"}


def _manifest_data(root: Path, tests: list[Path], data_dir: Path, tmp: Path, extra: list[str] = ()) -> SpeechData:
    _, cfg = smoke(
        tmp,
        data_dir,
        "data.source=manifest",
        f"data.labelled_manifest={root / 'labelled.jsonl'}",
        f"data.unlabelled_manifest={root / 'unlabelled.csv'}",
        f"data.dev_manifest={root / 'dev.jsonl'}",
        "data.test_manifests=[" + ",".join(str(p) for p in tests) + "]",
        *extra,
    )
    return prepare_data(cfg, data_dir, AccessLog())


@pytest.mark.parametrize("clash", ["dev", "same_stem"])
def test_manifest_test_sets_never_replace_other_splits(
    clash: str, manifest_corpus: dict[str, Path], tmp_path: Path, data_dir: Path
):
    root = manifest_corpus["labelled"].parent
    other = tmp_path / "other"
    other.mkdir()
    name = "dev.csv" if clash == "dev" else manifest_corpus["test"].name
    (other / name).write_text(f"path,text\n{root / 'audio' / 'u11.wav'},on the hill\n")
    data = _manifest_data(root, [manifest_corpus["test"], other / name], data_dir, tmp_path)
    assert data.dev.get("select", "u").ids == ["audio/u8", "audio/u9", "audio/u10"]  # dev.jsonl's utterances
    assert sum(len(t) for t in data.tests.values()) == 4  # both test manifests: 3 + 1 utterances


def test_strict_run_fails_even_after_a_skip_bad_run(manifest_corpus: dict[str, Path], tmp_path: Path, data_dir):
    # a private copy of the corpus: the feature cache is keyed by paths, and this test must not poison the others
    root = tmp_path / "corpus"
    shutil.copytree(manifest_corpus["labelled"].parent, root)
    args = (root, [root / manifest_corpus["test"].name], data_dir, tmp_path)
    bad = [f"data.labelled_manifest={root / manifest_corpus['labelled_bad'].name}"]
    assert _manifest_data(*args, [*bad, "data.skip_bad=true"]).manifest["bad_files_skipped"] == 1
    with pytest.raises(AudioError, match=r"bad\.wav"):
        _manifest_data(*args, bad)


def _librispeech_tree(root: Path) -> None:
    """A tiny LibriSpeech layout: <split>/<speaker>/<chapter>/<spk>-<ch>-<utt>.flac + <spk>-<ch>.trans.txt."""
    layout = {"train-clean-100": (2, 4), "train-clean-360": (2, 3), "dev-clean": (1, 3), "test-clean": (1, 3)}
    k = 0
    for split, (speakers, per_chapter) in layout.items():
        for s in range(speakers):
            speaker, chapter = f"{100 + 10 * k + s}", f"{200 + s}"
            folder = root / "LibriSpeech" / split / speaker / chapter
            lines = []
            for u in range(per_chapter):
                uid = f"{speaker}-{chapter}-{u:04d}"
                text = TEXTS[(k + u) % len(TEXTS)]
                _tone(folder / f"{uid}.flac", 0.5 + 0.04 * len(text), 150 + 30 * ((k + u) % 17), k + u, fmt="FLAC")
                lines.append(f"{uid} {text.upper()}")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
            k += per_chapter


def test_librispeech_source_end_to_end(tmp_path: Path, data_dir: Path):
    root = tmp_path / "corpora"
    _librispeech_tree(root)
    module, cfg = smoke(
        tmp_path,
        data_dir,
        "data.source=librispeech",
        f"data.root={root}",
        "data.labelled_splits=[train-clean-100]",
        "data.unlabelled_splits=[train-clean-360]",
        "data.dev_split=dev-clean",
        "data.test_splits=[test-clean]",
        "pretrain.max_steps=2",
        "finetune.max_steps=2",
        "nst.max_steps=2",
        "seeds=[0,1]",
        "run_name=libri",
    )
    result = module.train(cfg)
    run = tmp_path / "bigssl" / "libri"
    saved = json.loads((run / "results.json").read_text())
    assert saved["data"]["labelled"]["utterances"] == 8
    assert saved["data"]["unlabelled"]["utterances"] == 6
    assert saved["data"]["dev"]["utterances"] == 3 and saved["data"]["test-clean"]["utterances"] == 3
    assert set(result["wer"]["pretrained+nst"]["1.0"]) == {"test-clean"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["source"] == "librispeech" and manifest["bad_files_skipped"] == 0
    # the unlabelled LibriSpeech split keeps its transcripts as hidden truth: the pseudo-label WER is measured
    gen = json.loads((run / "units" / "nst" / "100pct-s1" / "gen1" / "result.json").read_text())
    assert gen["pseudo_wer_all"] >= 0.0 and gen["decoded"] == 6
    lm = json.loads((run / "units" / "lm.json").read_text())
    assert lm["ngrams"]  # the LM is trained on the labelled (normalised, lower-case) transcripts
    assert all(set(g) <= set(CHARS) | {"^", "$"} for g in lm["ngrams"])


def test_freeze_steps_keep_the_encoder_fixed_while_the_head_learns(smoke_data: SpeechData, tmp_path: Path, data_dir):
    from thrifty.core.run import MetricsLog
    from thrifty.methods.bigssl.finetune import build_model, fit

    _, cfg = smoke(tmp_path, data_dir, "finetune.eval_every=3")
    model = build_model(cfg, None)
    encoder0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head0 = model.head.weight.detach().clone()
    train = smoke_data.labelled_fraction(1.0)
    dev = smoke_data.dev.get("select", "test")
    kw = {
        "cfg": cfg,
        "seed": 0,
        "unit": "u",
        "metrics": MetricsLog(tmp_path / "m.jsonl"),
        "device": torch.device("cpu"),
    }
    fit(model, train, dev, max_steps=3, out=tmp_path, augment=None, freeze_steps=3, **kw)
    params = {k: v for k, v in model.encoder.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, encoder0[k]) for k, v in params.items())
    assert not torch.equal(model.head.weight, head0)
    (tmp_path / "b").mkdir()
    fit(model, train, dev, max_steps=3, out=tmp_path / "b", augment=None, freeze_steps=1, **kw)
    assert any(not torch.equal(v, encoder0[k]) for k, v in params.items())


def test_tri_stage_rises_holds_then_decays_to_the_final_scale():
    f = tri_stage(10, 40, 100, final_scale=0.05)
    values = [f(s) for s in range(101)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[10:50] == pytest.approx([1.0] * 40)
    tail = values[50:]
    assert all(b < a for a, b in itertools.pairwise(tail))
    assert tail[-1] == pytest.approx(0.05)
    assert tail[25] == pytest.approx(0.05**0.5)  # exponential: halfway in steps is the geometric mean


def test_trivial_baselines_score_blank_and_the_most_frequent_word() -> None:
    from thrifty.methods.bigssl.train import trivial_baselines

    labelled = ["one two two", "two oh", "go left two"]  # "two" is the most frequent word
    refs = {"a": ["two one", "nine"], "b": ["two"]}
    out = trivial_baselines(labelled, refs)
    assert out["blank"] == {"a": 1.0, "b": 1.0}  # every reference word deleted
    # "two" for "two one": one deletion; for "nine": one substitution -> 2 errors / 3 words
    assert out["most_frequent_word"]["a"] == pytest.approx(2 / 3)
    assert out["most_frequent_word"]["b"] == 0.0


def test_best_cell_is_chosen_on_mean_dev_wer_and_the_works_claim_uses_its_test_wer() -> None:
    from thrifty.methods.bigssl.config import BigSSLConfig
    from thrifty.methods.bigssl.train import best_cell, make_claims

    def unit(dev: float, test: float) -> dict:
        return {"dev_wer": dev, "test": {"test_in": {"greedy_wer": test, "greedy_cer": test / 2}}}

    results = {
        "scratch": {1.0: {0: unit(0.40, 0.30), 1: unit(0.42, 0.31)}},
        "pretrained": {1.0: {0: unit(0.20, 0.90), 1: unit(0.22, 0.95)}},  # best on dev, bad on test
    }
    assert best_cell(results) == ("pretrained", 1.0)
    cfg = BigSSLConfig(preset="test", seeds=[0, 1])
    cfg.finetune.fractions = [1.0]
    trivial = {"blank": {"test_in": 1.0}, "most_frequent_word": {"test_in": 0.97}}
    works = next(c for c in make_claims(cfg, results, ["test_in"], trivial) if c.id == "best_model_works")
    assert works.measured == pytest.approx(92.5 - 97.0)  # the dev-chosen cell's test WER minus the better baseline
    assert works.baseline == "trivial output" and not works.holds  # 4.5 points is not more than 50


def test_adamw_scales_the_encoder_learning_rate_and_keeps_decay_off_1d_parameters() -> None:
    from thrifty.methods.bigssl.loop import adamw

    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(3, 4))
    model.add_module("head", torch.nn.Linear(4, 2))
    opt = adamw(model, lr=1e-3, weight_decay=0.1, scales={"encoder.": 0.25})
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    enc_w, enc_b = model.encoder.weight, model.encoder.bias
    assert by_param[id(enc_w)]["lr"] == pytest.approx(2.5e-4) and by_param[id(enc_w)]["weight_decay"] == 0.1
    assert by_param[id(enc_b)]["lr"] == pytest.approx(2.5e-4) and by_param[id(enc_b)]["weight_decay"] == 0.0
    assert by_param[id(model.head.weight)]["lr"] == pytest.approx(1e-3)
    assert len(by_param) == 4  # every parameter in exactly one group
