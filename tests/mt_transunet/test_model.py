"""MT-TransUNet network: shapes, tokens, attentions, gradients, determinism, the R50 hybrid and its .npz loader."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from thrifty.methods.mt_transunet.config import ModelConfig
from thrifty.methods.mt_transunet.model import (
    MTOutput,
    R50Stem,
    build_model,
    count_parameters,
    export_transunet_npz,
    load_transunet_npz,
)


def _small_r50(**kw) -> ModelConfig:
    """An R50 hybrid that is cheap on CPU: one unit per stage, a 1-layer dim-48 Transformer."""
    base = dict(backbone="r50_vit_b16", dim=48, num_layers=1, num_heads=4, mlp_dim=96, resnet_units=[1, 1, 1],
                decoder_channels=[32, 16, 16, 8])  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def _check_output(out: MTOutput, *, b: int, size: int, grid: int, layers: int, heads: int, classes: int = 3) -> None:
    n = grid * grid
    assert out.cls_logits.shape == (b, classes)
    assert out.seg_logits.shape == (b, 2, size, size)
    assert out.sdf.shape == (b, 1, size, size)
    assert out.ds_logits.shape == (b, 2, grid, grid)
    assert out.sdf.min() >= -1.0 and out.sdf.max() <= 1.0
    assert len(out.attentions) == layers
    for att in out.attentions:
        assert att.shape == (b, heads, 1 + n, 1 + n)
        assert (att >= 0).all()
        torch.testing.assert_close(att.sum(-1), torch.ones(b, heads, 1 + n))


@pytest.mark.parametrize(
    ("stem", "decoder", "size", "grid"),
    [([16, 32, 64], [64, 32, 16], 64, 8), ([16, 32, 64], [64, 32, 16], 32, 4), ([16, 32], [32, 16], 32, 8)],
)
def test_mini_output_shapes_sdf_range_and_attentions(stem, decoder, size, grid):
    torch.manual_seed(0)
    cfg = ModelConfig(stem_channels=stem, decoder_channels=decoder)
    model = build_model(cfg, image_size=size)
    out = model(torch.rand(2, 3, size, size))
    _check_output(out, b=2, size=size, grid=grid, layers=cfg.num_layers, heads=cfg.num_heads)


def test_non_square_input():
    torch.manual_seed(0)
    out = build_model(ModelConfig(pos_embed="learned"))(torch.rand(2, 3, 32, 64))
    assert out.seg_logits.shape == (2, 2, 32, 64) and out.sdf.shape == (2, 1, 32, 64)
    assert out.ds_logits.shape == (2, 2, 4, 8) and out.attentions[-1].shape == (2, 4, 33, 33)


def test_cls_token_present_and_position_parameter_only_when_learned():
    model = build_model(ModelConfig())
    params = dict(model.named_parameters())
    assert params["cls_token"].shape == (1, 1, 96)
    assert not [name for name in params if "pos" in name]
    assert model.pos_embed is None

    learned = build_model(ModelConfig(pos_embed="learned"))
    pos = [name for name in dict(learned.named_parameters()) if "pos" in name]
    assert pos == ["pos_embed"]
    assert learned.pos_embed.shape == (1, 1 + 8 * 8, 96)
    # built for 64², it still runs at 32² (the grid embedding is resized to 4x4)
    torch.manual_seed(0)
    out = learned(torch.rand(1, 3, 32, 32))
    assert out.attentions[0].shape == (1, 4, 17, 17)


def test_learned_position_embedding_changes_the_output():
    torch.manual_seed(0)
    model = build_model(ModelConfig(pos_embed="learned")).eval()
    x = torch.rand(2, 3, 64, 64)
    before = model(x).cls_logits
    with torch.no_grad():
        model.pos_embed.normal_()
    assert not torch.allclose(model(x).cls_logits, before)


@pytest.mark.parametrize("pos_embed", ["none", "learned"])
def test_every_parameter_gets_a_gradient_from_all_four_heads(pos_embed):
    torch.manual_seed(0)
    model = build_model(ModelConfig(pos_embed=pos_embed))
    out = model(torch.rand(4, 3, 64, 64))
    # random weights: a plain sum would be blind behind BatchNorm (the sum of a normalised map is constant)
    loss = sum((t * torch.randn_like(t)).sum() for t in (out.cls_logits, out.seg_logits, out.sdf, out.ds_logits))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deterministic_under_manual_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(ModelConfig())
        outs.append((model(torch.rand(2, 3, 64, 64)), model.state_dict()))
    (a, sa), (b, sb) = outs
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for field in ("cls_logits", "seg_logits", "sdf", "ds_logits"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert all(torch.equal(x, y) for x, y in zip(a.attentions, b.attentions))


def test_bad_input_size_and_bad_configs_raise():
    model = build_model(ModelConfig())
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="backbone"):
        build_model(ModelConfig(backbone="vit"))
    with pytest.raises(ValueError, match="decoder_channels"):
        build_model(ModelConfig(decoder_channels=[64, 32]))
    with pytest.raises(ValueError, match="num_heads"):
        build_model(ModelConfig(dim=90))
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model(ModelConfig(), image_size=60)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model(_small_r50(), image_size=72)
    with pytest.raises(ValueError, match="r50_vit_b16"):
        build_model(ModelConfig(weights="x.npz"))


def test_mini_default_size_is_small():
    n = count_parameters(build_model(ModelConfig()))
    assert 0.4e6 < n < 1.0e6


def test_r50_stem_gives_the_14x14_grid_and_release_skips_at_224():
    torch.manual_seed(0)
    stem = R50Stem(units=[1, 1, 1])
    with torch.no_grad():
        feat, skips = stem(torch.rand(1, 3, 224, 224))
    assert feat.shape == (1, 1024, 14, 14)
    assert [tuple(s.shape[1:]) for s in skips] == [(512, 28, 28), (256, 56, 56), (64, 112, 112)]
    # the 55x55 stage-1 map is zero-padded at the bottom/right to 56x56 (the release's right_size fix)
    assert skips[1][0, :, 55, :].abs().sum() == 0 and skips[1][0, :, :55, :55].abs().sum() > 0


def test_small_r50_model_builds_and_runs():
    torch.manual_seed(0)
    cfg = _small_r50()
    model = build_model(cfg, image_size=64)
    assert model.stride == 16 and model.grid == 4
    assert model.decoder.conv_more[0].out_channels == 512  # the release's head_channels
    assert [b.skip_channels for b in model.decoder.blocks] == [512, 256, 64, 0]  # n_skip = 3
    out = model(torch.rand(2, 3, 64, 64))
    _check_output(out, b=2, size=64, grid=4, layers=1, heads=4)


def _copy_left(src: torch.nn.Module, dst: torch.nn.Module, names: list[str]) -> None:
    sp = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name in names:
                p.copy_(sp[name])


def test_npz_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    src = build_model(_small_r50(), image_size=64).eval()
    with torch.no_grad():
        src.cls_token.normal_()
    path = tmp_path / "r50.npz"
    keys = export_transunet_npz(src, path)
    att0 = "Transformer/encoderblock_0/"
    for key in ("embedding/kernel", "cls", "conv_root/kernel", "gn_root/scale", "block1/unit1/conv1/kernel",
                "block1/unit1/conv_proj/kernel", "Transformer/encoder_norm/scale", "block3/unit1/gn3/bias",
                f"{att0}MultiHeadDotProductAttention_1/query/kernel", f"{att0}MlpBlock_3/Dense_0/kernel",
                f"{att0}LayerNorm_2/bias"):  # fmt: skip
        assert key in keys
    with np.load(path) as npz:  # the release's layouts
        assert npz["embedding/kernel"].shape == (1, 1, 1024, 48)
        assert npz["conv_root/kernel"].shape == (7, 7, 3, 64)
        assert npz["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (48, 4, 12)
        assert npz["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (4, 12, 48)

    torch.manual_seed(1)
    dst = build_model(_small_r50(), image_size=64).eval()
    left = load_transunet_npz(dst, path)
    assert "cls_token" not in left and "cls_head.weight" in left and "decoder.conv_more.0.weight" in left
    assert not [n for n in left if n.startswith(("stem.", "encoder.", "patch_embed."))]
    _copy_left(src, dst, left)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = src(x), dst(x)
    for field in ("cls_logits", "seg_logits", "sdf", "ds_logits"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)

    torch.manual_seed(1)
    release = build_model(_small_r50(), image_size=64)
    assert "cls_token" in load_transunet_npz(release, path, load_cls=False)  # the release leaves CLS at zeros
    assert release.cls_token.abs().sum() == 0


def test_npz_layouts_follow_flax_semantics(tmp_path):
    """q/k/v kernels (in, heads, hd) act as ``x @ K.reshape(in, -1)``; out kernels (heads, hd, out) as
    ``ctx @ K.reshape(-1, out)``; conv kernels are HWIO."""
    torch.manual_seed(0)
    model = build_model(_small_r50(), image_size=64)
    path = tmp_path / "r50.npz"
    export_transunet_npz(model, path)
    rng = np.random.default_rng(0)
    arrays = dict(np.load(path))
    att = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
    q, qb = rng.normal(size=(48, 4, 12)).astype(np.float32), rng.normal(size=(4, 12)).astype(np.float32)
    o = rng.normal(size=(4, 12, 48)).astype(np.float32)
    root = rng.normal(size=(7, 7, 3, 64)).astype(np.float32)
    arrays.update({f"{att}/query/kernel": q, f"{att}/query/bias": qb, f"{att}/out/kernel": o, "conv_root/kernel": root})
    np.savez(path, **arrays)
    load_transunet_npz(model, path)
    x = rng.normal(size=(5, 48)).astype(np.float32)
    attn = model.encoder.layers[0].attn
    with torch.no_grad():
        got_q = attn.query(torch.from_numpy(x)).numpy()
        got_o = attn.out(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got_q, x @ q.reshape(48, 48) + qb.reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_o, x @ o.reshape(48, 48) + arrays[f"{att}/out/bias"], rtol=1e-5, atol=1e-5)
    w = model.stem.root.conv.weight.detach().numpy()
    assert w[5, 2, 1, 6] == root[1, 6, 2, 5]


def test_npz_position_embedding_resized_when_learned_and_ignored_when_none(tmp_path):
    torch.manual_seed(0)
    src = build_model(_small_r50(pos_embed="learned"), image_size=64)  # grid 4
    with torch.no_grad():
        src.pos_embed.normal_()
    path = tmp_path / "pos.npz"
    assert "Transformer/posembed_input/pos_embedding" in export_transunet_npz(src, path)
    big = build_model(_small_r50(pos_embed="learned"), image_size=128)  # grid 8
    assert "pos_embed" not in load_transunet_npz(big, path)
    assert big.pos_embed.shape == (1, 65, 48)
    torch.testing.assert_close(big.pos_embed[:, 0], src.pos_embed[:, 0])
    none = build_model(_small_r50(), image_size=64)
    left = load_transunet_npz(none, path)
    assert none.pos_embed is None and not [n for n in left if "pos" in n]


def test_npz_wrong_shape_missing_key_and_missing_file_raise(tmp_path):
    torch.manual_seed(0)
    model = build_model(_small_r50(), image_size=64)
    path = tmp_path / "r50.npz"
    export_transunet_npz(model, path)
    arrays = dict(np.load(path))
    bad_key = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
    np.savez(tmp_path / "bad.npz", **{**arrays, bad_key: np.zeros((48, 95), np.float32)})
    before = model.encoder.layers[0].ffn.fc1.weight.clone()
    with pytest.raises(ValueError, match=bad_key):
        load_transunet_npz(model, tmp_path / "bad.npz")
    assert torch.equal(model.encoder.layers[0].ffn.fc1.weight, before)  # nothing half-loaded
    del arrays["block2/unit1/gn_proj/scale"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(KeyError, match="block2/unit1/gn_proj/scale"):
        load_transunet_npz(model, tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_transunet_npz(model, tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="r50_vit_b16"):
        load_transunet_npz(build_model(ModelConfig()), path)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"not an \.npz"):
        load_transunet_npz(model, tmp_path / "array.npy")


def test_build_model_loads_cfg_weights(tmp_path):
    torch.manual_seed(0)
    src = build_model(_small_r50(), image_size=64)
    path = tmp_path / "r50.npz"
    export_transunet_npz(src, path)
    torch.manual_seed(1)
    dst = build_model(dataclasses.replace(_small_r50(), weights=str(path)), image_size=64)
    assert torch.equal(dst.stem.root.conv.weight, src.stem.root.conv.weight)
    assert torch.equal(dst.encoder.layers[0].attn.key.weight, src.encoder.layers[0].attn.key.weight)
