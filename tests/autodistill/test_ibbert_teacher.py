"""The in-domain IB-BERT teacher: corpus tokenizer, config, MLM pre-training, cached directory, its MLM head,
the unigram floor and how students are initialised from a MobileBERT-type teacher."""

from __future__ import annotations

import dataclasses
import json
import random
import types
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    MobileBertConfig,
    MobileBertForMaskedLM,
    MobileBertModel,
)

from thrifty.data.text import Document
from thrifty.methods.autodistill import ibbert
from thrifty.methods.autodistill.config import AutodistillConfig, SpaceConfig, TeacherConfig
from thrifty.methods.autodistill.data import MaskedBatches, masked_batches
from thrifty.methods.autodistill.space import Arch, build_encoder, distilbert_like, fold_layer_norm, space_choices
from thrifty.methods.autodistill.teacher import TeacherError, head_from_mlm, load_mlm_teacher
from thrifty.methods.autodistill.trial import unigram_accuracy

SENTENCES = (
    "the quick brown fox jumps over the lazy dog .",
    "a small grey cat sleeps near the warm fire .",
    "old kings ride their horses into the dark forest .",
)
SEQ_LEN = 16


def _docs() -> list[Document]:
    # Very repetitive text: each document cycles through the same three sentences, so a tiny model learns it fast.
    return [
        Document(source="toy", id=f"doc{i}", text=" ".join(SENTENCES[(i + k) % 3] for k in range(60))) for i in range(3)
    ]


def _tcfg(**kw) -> TeacherConfig:
    base = dict(vocab_size=150, num_layers=1, dim=32, intra_dim=64, num_heads=2, intermediate_size=64,
                embedding_size=16, steps=100, batch_size=4, lr=3e-3, warmup_frac=0.06, seed=0)  # fmt: skip
    return TeacherConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return _docs()


@pytest.fixture(scope="module")
def tok(docs):
    return ibbert.train_tokenizer(docs, vocab_size=150)


# --- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_vocabulary_and_special_tokens(tok) -> None:
    assert 5 < len(tok) <= 150
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4,
    )  # fmt: skip
    # every corpus word is known: no [UNK] when encoding corpus text
    assert 1 not in tok(SENTENCES[2])["input_ids"]


def test_tokenizer_adds_cls_sep_and_pair_token_types(tok) -> None:
    a, b = "the quick brown fox", "a small grey cat"
    body_a = tok(a, add_special_tokens=False)["input_ids"]
    body_b = tok(b, add_special_tokens=False)["input_ids"]
    assert body_a and body_b and not set(body_a + body_b) & {0, 1, 2, 3, 4}
    assert tok(a)["input_ids"] == [2, *body_a, 3]
    pair = tok(a, b)
    assert pair["input_ids"] == [2, *body_a, 3, *body_b, 3]
    assert pair["token_type_ids"] == [0] * (len(body_a) + 2) + [1] * (len(body_b) + 1)


def test_tokenizer_lower_cases(tok) -> None:
    assert tok("THE Quick BROWN fOx")["input_ids"] == tok("the quick brown fox")["input_ids"]


def test_tokenizer_round_trips_through_save_pretrained(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    for text in (SENTENCES[0], "Old Kings SLEEP near the fox .", "unseen zebra words"):
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    p1, p2 = again(SENTENCES[0], SENTENCES[1]), tok(SENTENCES[0], SENTENCES[1])
    assert (p1["input_ids"], p1["token_type_ids"]) == (p2["input_ids"], p2["token_type_ids"])
    assert again.mask_token_id == 4 and again.pad_token_id == 0


def test_tokenizer_ids_are_reproducible() -> None:
    # a corpus whose trained token *set* is stable (no frequency ties at the cut-off); only the ids move
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vor", "el", "an", "di", "po", "que", "zi", "ba", "nu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    weights = [1 / (i + 1) for i in range(len(words))]
    docs = [Document("toy", f"z{j}", " ".join(rng.choices(words, weights, k=3000))) for j in range(3)]
    vocabs = [ibbert.train_tokenizer(docs, vocab_size=200).get_vocab() for _ in range(4)]
    assert all(set(v) == set(vocabs[0]) for v in vocabs)
    assert all(v == vocabs[0] for v in vocabs)


@pytest.mark.parametrize("size", [5, 3, 0])
def test_tokenizer_needs_more_than_the_special_tokens(docs, size: int) -> None:
    with pytest.raises(ValueError):
        ibbert.train_tokenizer(docs, vocab_size=size)


# --- IB-BERT config ----------------------------------------------------------------------------------------------


def test_ibbert_config_is_an_inverted_bottleneck_bert_block() -> None:
    tc = _tcfg(num_layers=2)
    cfg = ibbert.ibbert_config(tc, 77)
    assert cfg.model_type == "mobilebert"
    assert cfg.intra_bottleneck_size > cfg.hidden_size
    assert (cfg.hidden_size, cfg.intra_bottleneck_size, cfg.num_hidden_layers, cfg.vocab_size) == (32, 64, 2, 77)
    assert cfg.embedding_size == 16 and cfg.num_attention_heads == 2
    assert cfg._attn_implementation == "eager"
    assert (cfg.hidden_act, cfg.normalization_type) == ("gelu", "layer_norm")
    torch.manual_seed(0)
    model = MobileBertForMaskedLM(cfg).eval()
    ids = torch.randint(5, 77, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    assert out.logits.shape == (2, 9, 77)
    assert torch.isfinite(out.logits).all()
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 9, 9)


# --- the MLM head ------------------------------------------------------------------------------------------------


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _tiny_mobilebert_mlm(act: str = "gelu") -> MobileBertForMaskedLM:
    torch.manual_seed(0)
    cfg = MobileBertConfig(
        vocab_size=90, hidden_size=32, embedding_size=16, intra_bottleneck_size=64, true_hidden_size=64,
        num_attention_heads=2, intermediate_size=64, num_hidden_layers=1, hidden_act=act,
        normalization_type="layer_norm",
    )  # fmt: skip
    return MobileBertForMaskedLM(cfg).eval()


def test_head_from_mobilebert_mlm_matches_its_head() -> None:
    model = _tiny_mobilebert_mlm()
    assert model.config.embedding_size < model.config.hidden_size
    _randomise(model.cls, 1)  # non-trivial head weights and biases
    head = head_from_mlm(model)
    assert head.embedding.shape == (90, 32)
    # MobileBERT's decoder is [tied word embeddings | extra columns]
    assert torch.equal(head.embedding[:, :16], model.get_input_embeddings().weight)
    h = torch.randn(11, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(head(h), model.cls(h), atol=1e-5)


def test_head_from_bert_mlm_matches_its_head() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=70, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = BertForMaskedLM(cfg).eval()
    _randomise(model.cls, 3)
    head = head_from_mlm(model)
    assert head.embedding.shape == (70, 32)
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(head(h), model.cls(h), atol=1e-5)


def test_head_from_mlm_rejects_a_non_gelu_head() -> None:
    with pytest.raises(TeacherError, match="relu"):
        head_from_mlm(_tiny_mobilebert_mlm(act="relu"))


# --- MLM pre-training --------------------------------------------------------------------------------------------


def _own_masked_accuracy(model: torch.nn.Module, batches: MaskedBatches) -> float:
    hit = total = 0
    with torch.no_grad():
        for ids, labels in zip(batches.ids, batches.labels):
            keep = labels != -100
            pred = model(input_ids=ids).logits.argmax(-1)
            hit += int((pred[keep] == labels[keep]).sum())
            total += int(keep.sum())
    return hit / total


def test_pretrain_lowers_the_mlm_loss_and_freezes_the_model(docs, tok) -> None:
    tc = _tcfg(steps=100)
    val = masked_batches(docs, tok, num_batches=2, batch_size=4, seq_len=SEQ_LEN, prob=0.15, seed=5)
    model, rec = ibbert.pretrain(tc, docs, tok, seq_len=SEQ_LEN, mask_prob=0.15, progress_bar=False, val=val,
                                 eval_every=50)  # fmt: skip
    curve = rec["loss_curve"]
    assert [p["step"] for p in curve] == [50, 100]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert rec["steps"] == 100
    assert rec["params"] == sum(p.numel() for p in model.parameters())
    assert isinstance(model, MobileBertForMaskedLM)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all("val_acc" in p and 0.0 <= p["val_acc"] <= 1.0 for p in curve)
    # the last recorded validation accuracy is the returned model's accuracy on the masked positions of ``val``
    assert curve[-1]["val_acc"] == pytest.approx(_own_masked_accuracy(model, val))


def test_pretrain_without_val_records_no_val_acc(docs, tok) -> None:
    _, rec = ibbert.pretrain(_tcfg(steps=3), docs, tok, seq_len=SEQ_LEN, mask_prob=0.15, progress_bar=False)
    assert rec["loss_curve"] and all("val_acc" not in p for p in rec["loss_curve"])
    assert rec["loss_curve"][-1]["step"] == 3


def test_pretrain_is_deterministic_for_a_seed(docs, tok) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        model, _ = ibbert.pretrain(_tcfg(steps=6, seed=seed), docs, tok, seq_len=SEQ_LEN, mask_prob=0.15,
                                   progress_bar=False)  # fmt: skip
        return model.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretrain_in_bf16_tracks_fp32_and_keeps_fp32_weights(docs, tok) -> None:
    def run(precision: str):
        return ibbert.pretrain(_tcfg(steps=100, precision=precision), docs, tok, seq_len=SEQ_LEN, mask_prob=0.15,
                               progress_bar=False)  # fmt: skip

    (m32, r32), (m16, r16) = run("fp32"), run("bf16")
    c32, c16 = r32["loss_curve"], r16["loss_curve"]
    assert c16[-1]["loss"] < 0.9 * c16[0]["loss"]
    assert c16[-1]["loss"] == pytest.approx(c32[-1]["loss"], rel=0.02)
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    # the same seed gives different weights: autocast really ran the matmuls in bf16
    a, b = m32.state_dict(), m16.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_cache_key_separates_bf16_and_keeps_fp32_keys() -> None:
    data = types.SimpleNamespace(seq_len=SEQ_LEN, mask_prob=0.15, holdout=0.1)
    fp32 = ibbert.teacher_settings(_tcfg(), data)
    bf16 = ibbert.teacher_settings(_tcfg(precision="bf16"), data)
    assert bf16 != fp32 and bf16["teacher"]["precision"] == "bf16"
    # teachers cached before ``precision`` existed were fp32: their key has no precision entry
    assert "precision" not in fp32["teacher"]


def test_teacher_precision_must_be_fp32_or_bf16() -> None:
    cfg = AutodistillConfig()
    cfg.teacher = dataclasses.replace(cfg.teacher, precision="fp16")
    with pytest.raises(ValueError, match=r"teacher\.precision"):
        cfg.validate()


# --- the cached teacher directory ---------------------------------------------------------------------------------

DATA_CFG = types.SimpleNamespace(seq_len=SEQ_LEN, mask_prob=0.15, holdout=0.1)


def test_ensure_teacher_writes_a_loadable_directory_once(docs, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "teacher"
    tc = _tcfg(steps=8)
    assert ibbert.ensure_teacher(root, tc, DATA_CFG, docs, progress_bar=False, val_docs=docs) == root
    info = json.loads((root / "teacher.json").read_text())
    assert info["steps"] == 8 and info["loss_curve"] and "val_acc" in info["loss_curve"][-1]
    assert info["settings"]["teacher"]["dim"] == 32

    encoder, tokenizer, head = load_mlm_teacher(root)
    assert head is not None
    assert isinstance(encoder, MobileBertModel)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert len(tokenizer) == info["vocab_size"] == encoder.config.vocab_size
    # the loaded head on the loaded encoder reproduces the saved MLM model's logits
    ids = torch.tensor([tokenizer(SENTENCES[0])["input_ids"]])
    full = AutoModelForMaskedLM.from_pretrained(root, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = head(encoder(input_ids=ids).last_hidden_state)
        assert torch.allclose(ours, full(input_ids=ids).logits, atol=1e-5)

    # second call: complete directory, nothing is trained or rewritten
    marker = root / "teacher.json"
    before = (marker.stat().st_mtime_ns, marker.read_bytes(), (root / "model.safetensors").read_bytes())

    def boom(*a, **k):
        raise AssertionError("the cached teacher was trained again")

    monkeypatch.setattr(ibbert, "pretrain", boom)
    monkeypatch.setattr(ibbert, "train_tokenizer", boom)
    assert ibbert.ensure_teacher(root, tc, DATA_CFG, docs, progress_bar=False) == root
    assert (marker.stat().st_mtime_ns, marker.read_bytes(), (root / "model.safetensors").read_bytes()) == before

    # an incomplete directory (no teacher.json) is trained again
    marker.unlink()
    with pytest.raises(AssertionError, match="trained again"):
        ibbert.ensure_teacher(root, tc, DATA_CFG, docs, progress_bar=False)


def test_load_mlm_teacher_without_a_head(tok, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)  # fmt: skip
    BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    encoder, tokenizer, head = load_mlm_teacher(tmp_path)
    assert head is None
    assert isinstance(encoder, BertModel)
    assert len(tokenizer) == len(tok)


def test_load_mlm_teacher_rejects_a_non_bert_model(tok, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(TeacherError):
        load_mlm_teacher(tmp_path)


# --- the unigram floor -------------------------------------------------------------------------------------------


def test_unigram_accuracy_uses_the_most_frequent_train_label() -> None:
    ign = -100
    train_labels = torch.tensor([[[7, ign, 9, 7], [ign, 7, 5, ign]], [[9, 7, ign, ign], [5, ign, ign, 7]]])
    # held-out labels: 9 is the most frequent here, but the guess comes from the train labels (7: 5 times)
    held_labels = torch.tensor([[[7, 9, 9, ign], [9, ign, 3, 7]], [[ign, ign, 9, 7], [ign, 2, ign, ign]]])
    train = MaskedBatches(torch.zeros_like(train_labels), train_labels)
    held = MaskedBatches(torch.zeros_like(held_labels), held_labels)
    acc, token = unigram_accuracy(train, held)
    assert token == 7
    scored = [x for x in held_labels.flatten().tolist() if x != ign]
    assert acc == pytest.approx(scored.count(7) / len(scored))  # 3 of 9


# --- students of a MobileBERT-type (IB-BERT) teacher --------------------------------------------------------------


@pytest.fixture(scope="module")
def ib_teacher() -> MobileBertModel:
    cfg = ibbert.ibbert_config(_tcfg(num_layers=4), 90)
    cfg.max_position_embeddings = 64
    torch.manual_seed(0)
    model = MobileBertModel(cfg, add_pooling_layer=False)
    _randomise(model, 7)  # LayerNorm weights and biases included, so copies are told apart by value
    return model.eval().requires_grad_(False)


def _nonorm_arch(t_cfg) -> Arch:
    """The widths of the teacher's block with MobileBERT's defaults (NoNorm, ReLU): a different block."""
    return Arch(num_layers=2, hidden_size=t_cfg.hidden_size, intra_bottleneck_size=t_cfg.intra_bottleneck_size,
                num_heads=t_cfg.num_attention_heads, intermediate_size=t_cfg.intermediate_size, num_ffn=1,
                embedding_size=t_cfg.embedding_size)  # fmt: skip


def test_searched_student_copies_the_embedding_but_not_its_norm_or_layers(ib_teacher) -> None:
    arch = _nonorm_arch(ib_teacher.config)
    assert (arch.norm, arch.act) == ("no_norm", "relu")
    enc, copied = build_encoder(arch, ib_teacher, seed=0)
    s, t = enc.state_dict(), ib_teacher.state_dict()
    for name in (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.embedding_transformation.weight",
        "embeddings.embedding_transformation.bias",
    ):
        assert torch.equal(s[name], t[name]), name
        assert name in copied
    for name in ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"):
        assert s[name].shape == t[name].shape
        assert not torch.equal(s[name], t[name]), name
        assert name not in copied
    assert not [n for n in copied if n.startswith("encoder.")]
    assert "embeddings.word_embeddings (PCA)" not in copied
    layer0 = [k for k in s if k.startswith("encoder.layer.0.")]
    assert layer0 and all(s[k].shape == t[k].shape for k in layer0)  # shapes agree, meaning does not
    assert not any(torch.equal(s[k], t[k]) for k in layer0)


def test_layer_norm_fold_is_exact_for_a_single_token(ib_teacher) -> None:
    """With one sample token its own mean and spread are the averages, so the NoNorm stand-in equals the
    teacher's LayerNorm output on that token."""
    ids = torch.tensor([[11]])
    enc, copied = build_encoder(_nonorm_arch(ib_teacher.config), ib_teacher, seed=0, sample_ids=ids)
    assert "embeddings.LayerNorm (teacher LayerNorm folded into NoNorm)" in copied
    torch.testing.assert_close(enc.eval().embeddings(input_ids=ids), ib_teacher.embeddings(input_ids=ids))


def test_nonorm_student_starts_at_the_teachers_embedding_scale(ib_teacher) -> None:
    """Over many tokens the folded NoNorm embedding stays close to the teacher's LayerNorm output; the unfolded
    one (x·1 + 0) is at the raw embedding's scale."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, ib_teacher.config.vocab_size, (4, 32), generator=g)
    arch = _nonorm_arch(ib_teacher.config)
    folded, _ = build_encoder(arch, ib_teacher, seed=0, sample_ids=ids)
    plain, copied = build_encoder(arch, ib_teacher, seed=0)
    assert not [n for n in copied if n.startswith("embeddings.LayerNorm")]
    target = ib_teacher.embeddings(input_ids=ids)
    with torch.no_grad():
        err = ((folded.eval().embeddings(input_ids=ids) - target).pow(2).mean() / target.pow(2).mean()).item()
        err_plain = ((plain.eval().embeddings(input_ids=ids) - target).pow(2).mean() / target.pow(2).mean()).item()
    assert err < 0.1 < err_plain, (err, err_plain)
    w, b = fold_layer_norm(ib_teacher, ids)
    assert w.shape == b.shape == (ib_teacher.config.hidden_size,)


def test_students_of_the_teachers_norm_type_copy_the_norm_instead_of_folding(ib_teacher) -> None:
    arch = dataclasses.replace(_nonorm_arch(ib_teacher.config), norm="layer_norm")
    enc, copied = build_encoder(arch, ib_teacher, seed=0, sample_ids=torch.tensor([[11, 12]]))
    assert "embeddings.LayerNorm.weight" in copied
    assert not [n for n in copied if "folded" in n]
    torch.testing.assert_close(enc.state_dict()["embeddings.LayerNorm.weight"],
                               ib_teacher.state_dict()["embeddings.LayerNorm.weight"])  # fmt: skip


def test_distilbert_like_student_of_an_ibbert_teacher(ib_teacher) -> None:
    t_cfg = ib_teacher.config
    arch = distilbert_like(t_cfg)
    assert arch.kind == "mobilebert"
    assert (arch.norm, arch.act) == ("layer_norm", "gelu")
    assert arch.num_layers == 2
    assert (arch.hidden_size, arch.intra_bottleneck_size, arch.num_heads, arch.intermediate_size) == (32, 64, 2, 64)
    assert (arch.embedding_size, arch.num_ffn) == (16, 1)

    enc, copied = build_encoder(arch, ib_teacher, seed=0)
    s, t = enc.state_dict(), ib_teacher.state_dict()
    for i, j in ((0, 0), (1, 2)):
        names = [k for k in s if k.startswith(f"encoder.layer.{i}.")]
        assert names
        for k in names:
            src = f"encoder.layer.{j}." + k[len(f"encoder.layer.{i}.") :]
            assert torch.equal(s[k], t[src]), k
            assert k in copied
    for name in ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", "embeddings.word_embeddings.weight"):
        assert torch.equal(s[name], t[name]), name
    # same embedding and first layer: the student's first two hidden states are the teacher's
    ids = torch.randint(5, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    enc.eval()
    with torch.no_grad():
        hs = enc(input_ids=ids, output_hidden_states=True).hidden_states
        ht = ib_teacher(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == 3 and len(ht) == 5
    assert torch.allclose(hs[0], ht[0], atol=1e-6) and torch.allclose(hs[1], ht[1], atol=1e-5)


# --- space and config -------------------------------------------------------------------------------------------


def test_space_choices_default_to_the_teacher_width() -> None:
    space = SpaceConfig(hidden_size=[])
    choices = space_choices(space, 48)
    assert choices["hidden_size"] == [48]
    assert choices["num_layers"] == sorted(set(space.num_layers))
    assert space_choices(SpaceConfig(hidden_size=[64, 32, 64]), 48)["hidden_size"] == [32, 64]


def _cfg(**teacher) -> AutodistillConfig:
    cfg = AutodistillConfig()
    cfg.teacher = dataclasses.replace(cfg.teacher, **teacher)
    return cfg


def test_config_teacher_source_validation() -> None:
    with pytest.raises(ValueError, match=r"teacher\.path"):
        _cfg(source="path", path="").validate()
    with pytest.raises(ValueError, match=r"teacher\.source"):
        _cfg(source="bert-base").validate()
    _cfg(source="path", path="/somewhere/bert").validate()
    _cfg(source="minilm").validate()
    _cfg().validate()


def test_config_accepts_the_old_teacher_head_stage_name() -> None:
    cfg = AutodistillConfig(stages=["teacher_head", "search"])
    cfg.validate()
    assert cfg.stages == ["teacher", "search"]
    with pytest.raises(ValueError, match="stages"):
        AutodistillConfig(stages=["teacher", "distil"]).validate()


def test_a_headless_mobilebert_path_teacher_is_fitted_or_refused(docs, tok, tmp_path: Path) -> None:
    from thrifty.methods.autodistill.teacher import fit_head, resolve_teacher

    cfg = MobileBertConfig(
        vocab_size=len(tok), hidden_size=32, embedding_size=16, intra_bottleneck_size=64, true_hidden_size=64,
        num_attention_heads=2, intermediate_size=64, num_hidden_layers=1, hidden_act="gelu",
        normalization_type="layer_norm", max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    MobileBertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    run_cfg = _cfg(source="path", path=str(tmp_path))
    try:
        t = resolve_teacher(run_cfg, None, tmp_path / "unused")
    except TeacherError:
        return  # refusing a MobileBERT teacher without its MLM head up front, with a clear message, is fine too
    assert t.head is None
    assert t.decoder.shape == (len(tok), 32)  # the documented (V, d) decoder
    batches = masked_batches(docs, tok, num_batches=1, batch_size=2, seq_len=SEQ_LEN, prob=0.15, seed=0)
    head = fit_head(t.encoder, batches, steps=2, lr=1e-3, positions=8, seed=0, progress_bar=False)
    h = t.encoder(input_ids=batches.ids[0]).last_hidden_state
    assert head(h[0]).shape == (SEQ_LEN, len(tok))
