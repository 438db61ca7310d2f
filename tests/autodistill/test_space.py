"""The MobileBERT search space: validity, configs, teacher initialisation, sizes."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.autodistill.config import SpaceConfig
from thrifty.methods.autodistill.space import (
    Arch,
    build_encoder,
    count_flops,
    count_params,
    distilbert_like,
    enumerate_space,
    hf_config,
    mobilebert_like,
)


def _arch(**kw) -> Arch:
    base = dict(num_layers=2, hidden_size=32, intra_bottleneck_size=16, num_heads=2, intermediate_size=24, num_ffn=2,
                embedding_size=8)  # fmt: skip
    return Arch(**{**base, **kw})


def test_heads_must_divide_the_bottleneck() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        _arch(intra_bottleneck_size=18, num_heads=4).validate()
    with pytest.raises(ValueError, match="does not divide"):
        Arch(num_layers=2, hidden_size=30, num_heads=4, intermediate_size=8, kind="bert").validate()
    with pytest.raises(ValueError, match=">= 1"):
        _arch(num_layers=0).validate()
    _arch().validate()


def test_enumerated_space_is_all_valid_and_complete() -> None:
    space = SpaceConfig(num_layers=[1, 2], intra_bottleneck_size=[6, 8], num_heads=[1, 3, 4], intermediate_size=[16],
                        num_ffn=[1], hidden_size=[32])  # fmt: skip
    archs = enumerate_space(space, 32)
    # valid (bottleneck, heads): (6,1) (6,3) (8,1) (8,4) -> 4 per layer count
    assert len(archs) == 8
    for a in archs:
        a.validate()
    assert len({a.key for a in archs}) == 8


def test_hf_config_carries_the_knobs_and_teacher_tables(teacher) -> None:
    cfg = hf_config(_arch(), teacher.config)
    assert (cfg.num_hidden_layers, cfg.intra_bottleneck_size, cfg.true_hidden_size) == (2, 16, 16)
    assert (cfg.num_feedforward_networks, cfg.embedding_size, cfg.vocab_size) == (2, 8, teacher.config.vocab_size)
    assert cfg.normalization_type == "no_norm"  # a MobileBERT default kept
    assert cfg._attn_implementation == "eager"


def test_distilbert_like_takes_every_other_teacher_layer(teacher) -> None:
    arch = distilbert_like(teacher.config)
    assert (arch.num_layers, arch.kind) == (2, "bert")
    enc, copied = build_encoder(arch, teacher, seed=0)
    t = teacher.state_dict()
    s = enc.state_dict()
    assert torch.equal(
        s["encoder.layer.1.attention.self.query.weight"], t["encoder.layer.2.attention.self.query.weight"]
    )
    assert torch.equal(s["embeddings.word_embeddings.weight"], t["embeddings.word_embeddings.weight"])
    assert "encoder.layer.0.output.dense.weight" in copied


def test_pca_embeddings_start_near_the_teacher_table(teacher) -> None:
    enc, copied = build_encoder(_arch(embedding_size=32), teacher, seed=0)  # full rank: exact reconstruction
    e_t = teacher.get_input_embeddings().weight
    ids = torch.tensor([[5, 6, 7]])
    emb = enc.embeddings
    centre = emb.embedding_transformation(
        torch.cat([torch.zeros(1, 3, 32), emb.word_embeddings(ids), torch.zeros(1, 3, 32)], -1)
    )
    assert torch.allclose(centre, e_t[ids], atol=1e-4)
    assert "embeddings.word_embeddings (PCA)" in copied
    assert "embeddings.LayerNorm.weight" not in copied  # NoNorm differs in meaning
    enc_r, copied_r = build_encoder(_arch(), teacher, seed=0, embedding_init="random")
    assert "embeddings.word_embeddings (PCA)" not in copied_r
    assert "embeddings.position_embeddings.weight" in copied_r


def test_sizes_grow_with_depth(teacher) -> None:
    small, _ = build_encoder(_arch(num_layers=1), teacher, seed=0)
    big, _ = build_encoder(_arch(num_layers=3), teacher, seed=0)
    assert count_params(big) > count_params(small)
    assert count_flops(big, 16) > count_flops(small, 16) > 0


def test_baselines_match_the_card() -> None:
    m = mobilebert_like()
    assert (m.num_layers, m.hidden_size, m.intra_bottleneck_size, m.num_heads, m.intermediate_size, m.num_ffn) == (
        6, 384, 96, 4, 384, 4,
    )  # fmt: skip
