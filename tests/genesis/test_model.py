"""Models Genesis / Semantic Genesis / TransVW networks: shapes, widths, gradients, training progress, eval-mode
BatchNorm independence from the batch, and the safetensors weight exchange of the encoder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.genesis.model import (
    EncoderClassifier,
    UNet3D,
    WeightsError,
    YNet3D,
    build_model,
    card_path,
    count_parameters,
    encoder_state_dict,
    load_encoder,
    load_weights,
    resolve_widths,
    save_weights,
)

MINI = dict(width=0.125)  # level widths 8, 16, 32, 64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_miniature_widths_and_parameter_count():
    assert resolve_widths(width=0.125) == (8, 16, 32, 64)
    assert resolve_widths(width=1.0) == (64, 128, 256, 512)
    assert resolve_widths(widths=(8, 16, 32, 64)) == (8, 16, 32, 64)
    mini = UNet3D(**MINI)
    n = count_parameters(mini)
    assert 250_000 < n < 350_000, n  # 298,701
    assert UNet3D(widths=(8, 16, 32, 64)).state_dict().keys() == mini.state_dict().keys()
    # full size: the official Models Genesis U-Net has ~19.08M parameters (ours drops the conv biases before BN)
    assert 18.9e6 < count_parameters(UNet3D()) < 19.2e6
    # first conv of a level outputs half the level width, the second the full width
    first, second = mini.encoder.levels[1][0][0], mini.encoder.levels[1][1][0]
    assert (first.in_channels, first.out_channels, second.out_channels) == (8, 8, 16)


@pytest.mark.parametrize("shape", [(2, 1, 16, 32, 32), (2, 1, 32, 64, 64)])
@torch.no_grad()
def test_output_shapes(shape):
    x = torch.rand(shape)
    unet = UNet3D(**MINI)
    out = unet(x)
    assert out.shape == shape
    ynet = YNet3D(**MINI, num_classes=7)
    restoration, logits = ynet(x)
    assert restoration.shape == shape and logits.shape == (2, 7)
    clf = EncoderClassifier(**MINI)
    assert clf(x).shape == (2, 1)
    bottleneck, skips = unet.encoder(x)
    d, h, w = shape[2:]
    assert bottleneck.shape == (2, 64, d // 8, h // 8, w // 8)
    assert [s.shape[1:] for s in skips] == [
        (8, d, h, w),
        (16, d // 2, h // 2, w // 2),
        (32, d // 4, h // 4, w // 4),
    ]
    assert UNet3D(**MINI, out_channels=3)(x).shape == (2, 3, *shape[2:])


def test_sigmoid_output_in_unit_interval_and_logits_option():
    x = torch.randn(2, 1, 16, 32, 32) * 5
    out = UNet3D(**MINI)(x)
    assert out.min() >= 0 and out.max() <= 1
    logits = UNet3D(**MINI, final_activation="none")(x)
    assert logits.min() < 0 < logits.max()
    with pytest.raises(ValueError, match="final_activation"):
        UNet3D(**MINI, final_activation="softmax")


@pytest.mark.parametrize("shape", [(1, 1, 12, 32, 32), (1, 1, 16, 30, 32), (1, 1, 16, 32, 4), (1, 1, 32, 32)])
def test_bad_input_sizes_raise_value_error(shape):
    with pytest.raises(ValueError, match=r"multiple of 8|5-D"):
        UNet3D(**MINI)(torch.rand(shape))
    with pytest.raises(ValueError, match=r"multiple of 8|5-D"):
        EncoderClassifier(**MINI)(torch.rand(shape))


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="input channel"):
        UNet3D(**MINI)(torch.rand(1, 2, 16, 16, 16))


def test_bad_widths_raise():
    with pytest.raises(ValueError, match="4 encoder levels"):
        UNet3D(widths=(8, 16, 32))
    with pytest.raises(ValueError, match="even"):
        UNet3D(widths=(8, 16, 33, 64))
    with pytest.raises(ValueError, match="positive"):
        UNet3D(width=0.0)


def _assert_all_grads_finite_nonzero(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_every_parameter_gets_a_gradient():
    x = torch.rand(2, 1, 16, 16, 16)
    target = torch.rand_like(x)

    unet = UNet3D(**MINI)
    F.mse_loss(unet(x), target).backward()
    _assert_all_grads_finite_nonzero(unet)

    ynet = YNet3D(**MINI, num_classes=5)
    restoration, logits = ynet(x)
    (F.mse_loss(restoration, target) + F.cross_entropy(logits, torch.tensor([1, 3]))).backward()
    _assert_all_grads_finite_nonzero(ynet)

    clf = EncoderClassifier(**MINI, dropout=0.2)
    F.binary_cross_entropy_with_logits(clf(x), torch.tensor([[0.0], [1.0]])).backward()
    _assert_all_grads_finite_nonzero(clf)


def test_restoration_loss_falls_on_a_fixed_batch():
    x = torch.rand(4, 1, 16, 16, 16)
    target = x  # restoring the untransformed cube (the identity part of the Genesis restoration task)
    model = UNet3D(**MINI)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # ~0.12 on CPU


def test_classifier_loss_falls_on_a_fixed_batch():
    x = torch.rand(8, 1, 16, 16, 16)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.float32)[:, None]
    model = EncoderClassifier(**MINI)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def _warm_running_stats(model: nn.Module) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, 16, 16, 16) * 2 + 0.5)
    model.eval()


@pytest.mark.parametrize("factory", [lambda: UNet3D(**MINI), lambda: EncoderClassifier(**MINI)])
def test_eval_output_does_not_depend_on_the_rest_of_the_batch(factory):
    """The official ContBatchNorm3d normalised with batch statistics in eval; ours must not."""
    model = factory()
    _warm_running_stats(model)
    batch = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad():
        alone = model(batch[:1])
        together = model(batch)[:1]
        other = model(torch.cat([batch[:1], torch.randn(3, 1, 16, 16, 16) * 10]))[:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, other, atol=1e-5, rtol=1e-4)


def test_batch_dependence_check_catches_batch_statistics_in_eval():
    """Sanity check of the test above: a BN that always uses batch statistics (the official defect) fails it."""

    class AlwaysBatchStats(nn.BatchNorm3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    model = UNet3D(**MINI)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm3d):
                setattr(parent, name, AlwaysBatchStats(child.num_features))
    model.eval()
    batch = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad():
        alone = model(batch[:1])
        other = model(torch.cat([batch[:1], torch.randn(3, 1, 16, 16, 16) * 10]))[:1]
    assert not torch.allclose(alone, other, atol=1e-4)


def test_ynet_without_visual_words_has_no_head():
    ynet = YNet3D(**MINI, num_classes=0)
    assert ynet.word_head is None
    assert not any("word_head" in k for k in ynet.state_dict())
    assert count_parameters(ynet) == count_parameters(UNet3D(**MINI))
    restoration, logits = ynet(torch.rand(1, 1, 16, 16, 16))
    assert logits is None and restoration.shape == (1, 1, 16, 16, 16)
    with_head = YNet3D(**MINI, num_classes=4)
    assert with_head.head_channels == 128  # 1024 × 0.125
    assert YNet3D(**MINI, num_classes=4, head_channels=32).word_head[0][0].out_channels == 32


def test_encoder_round_trips_bit_identically_and_loads_into_other_models(tmp_path):
    source = YNet3D(**MINI, num_classes=3)
    _warm_running_stats(source)  # non-trivial BN buffers travel too
    enc = encoder_state_dict(source)
    assert enc and all(not k.startswith("encoder.") for k in enc)
    assert any(k.endswith("running_var") for k in enc)
    path = save_weights(enc, tmp_path / "genesis_encoder.safetensors", {"cube": [64, 64, 32], "part": "encoder"})
    state, card = load_weights(path)
    assert card["cube"] == [64, 64, 32] and card["part"] == "encoder" and card["num_tensors"] == len(enc)
    assert state.keys() == enc.keys()
    for k in enc:
        assert state[k].dtype == enc[k].dtype and torch.equal(state[k], enc[k]), k

    fresh = UNet3D(**MINI)
    assert load_encoder(fresh, state) == ([], [])
    clf = EncoderClassifier(**MINI)
    load_encoder(clf, state)
    for target in (fresh, clf):
        for k, v in encoder_state_dict(target).items():
            assert torch.equal(v, enc[k]), k
    # the loaded encoder computes the same features as the source's
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().encoder(x)[0], source.eval().encoder(x)[0], rtol=0, atol=0)


def test_load_encoder_accepts_a_whole_model_state_dict_and_rejects_mismatches():
    unet = UNet3D(**MINI)
    clf = EncoderClassifier(**MINI)
    load_encoder(clf, unet.state_dict())  # "encoder."-prefixed keys; the decoder's keys are ignored
    assert all(torch.equal(v, unet.state_dict()[f"encoder.{k}"]) for k, v in encoder_state_dict(clf).items())
    with pytest.raises(ValueError, match="shape"):
        load_encoder(UNet3D(width=0.25), encoder_state_dict(unet))
    partial = dict(list(encoder_state_dict(unet).items())[:-3])
    with pytest.raises(ValueError, match="missing"):
        load_encoder(UNet3D(**MINI), partial)
    missing, unexpected = load_encoder(UNet3D(**MINI), partial, strict=False)
    assert len(missing) == 3 and unexpected == []


def test_whole_model_weights_and_card(tmp_path):
    model = YNet3D(**MINI, num_classes=6, final_activation="none")
    path = save_weights(model, tmp_path / "run" / "ynet.safetensors", {"cube_size": [64, 64, 32], "epochs": 2})
    assert card_path(path).name == "ynet.json"
    card = json.loads(card_path(path).read_text())
    assert card["architecture"] == "YNet3D" and card["widths"] == [8, 16, 32, 64] and card["num_classes"] == 6
    assert card["cube_size"] == [64, 64, 32] and card["final_activation"] == "none"
    assert card["num_parameters"] == count_parameters(model)
    state, card = load_weights(path)
    rebuilt = build_model(card)
    assert isinstance(rebuilt, YNet3D)
    rebuilt.load_state_dict(state)
    x = torch.rand(1, 1, 16, 16, 16)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], model(x)[0], rtol=0, atol=0)


def test_load_weights_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match=r"missing\.safetensors"):
        load_weights(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    card_path(bad).write_text("{}")
    with pytest.raises(WeightsError, match=r"bad\.safetensors"):
        load_weights(bad)
    good = save_weights(encoder_state_dict(UNet3D(**MINI)), tmp_path / "good.safetensors", {})
    card_path(good).unlink()
    with pytest.raises(WeightsError, match=r"good\.json"):
        load_weights(good)
