"""Pretext batches, the pre-training network and its loss (one pipeline, two switches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.genesis.pretext import NUM_ROTATIONS, PretextNet, make_batch, pretext_loss

CUBES = torch.rand(4, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pretext", ["genesis", "inpaint", "shuffle", "rotation"])
@pytest.mark.parametrize("visual_words", [False, True])
def test_batches_are_deterministic_and_shaped(pretext: str, visual_words: bool) -> None:
    a = make_batch(pretext, CUBES, visual_words=visual_words, generator=_gen(3))
    b = make_batch(pretext, CUBES, visual_words=visual_words, generator=_gen(3))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k])
    assert a["input"].shape == CUBES.shape
    if pretext == "rotation":
        assert a["rotation"].shape == (4,) and a["rotation"].dtype == torch.long
    else:
        assert a["target"].shape == CUBES.shape
        assert not torch.equal(a["input"], a["target"])  # something was perturbed


def test_genesis_off_is_models_genesis_and_on_targets_the_undeformed_cube() -> None:
    on = make_batch("genesis", CUBES, visual_words=True, generator=_gen(1))
    assert torch.equal(on["target"], CUBES)  # Semantic Genesis: the target is the original, undeformed cube
    off = make_batch("genesis", CUBES, visual_words=False, generator=_gen(1))
    # Models Genesis flips input and target alike: the target is a flipped copy of the original cube
    for t, x in zip(off["target"], CUBES):
        assert any(torch.equal(t, x.flip(dims)) for dims in [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)])


def test_inpaint_and_shuffle_keep_the_target_and_preserve_what_they_should() -> None:
    ip = make_batch("inpaint", CUBES, visual_words=False, generator=_gen(2))
    changed = (ip["input"] != CUBES).flatten(1).any(1)
    assert changed.all()  # at least one box per cube
    sh = make_batch("shuffle", CUBES, visual_words=False, generator=_gen(2))
    assert torch.equal(sh["target"], CUBES)
    assert sh["input"].shape == CUBES.shape


def test_rotation_label_undoes_the_rotation() -> None:
    b = make_batch("rotation", CUBES, visual_words=False, generator=_gen(5))
    for x, y, k in zip(b["input"], CUBES, b["rotation"].tolist()):
        assert torch.equal(torch.rot90(x, -k, dims=(2, 3)), y)
    many = make_batch("rotation", CUBES.repeat(16, 1, 1, 1, 1), visual_words=False, generator=_gen(6))["rotation"]
    assert set(many.tolist()) == set(range(NUM_ROTATIONS))


def test_rotation_needs_square_planes() -> None:
    with pytest.raises(ValueError, match="square"):
        make_batch("rotation", torch.rand(2, 1, 8, 16, 8), visual_words=False, generator=_gen())


def test_unknown_pretext_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown pretext"):
        make_batch("jigsaw", CUBES, visual_words=False, generator=_gen())


@pytest.mark.parametrize(("pretext", "words"), [("genesis", 0), ("genesis", 5), ("rotation", 0), ("rotation", 5)])
def test_heads_follow_the_switches_and_every_parameter_gets_a_gradient(pretext: str, words: int) -> None:
    torch.manual_seed(0)
    net = PretextNet(pretext=pretext, num_words=words, width=0.125)
    assert (net.net.word_head is None) == (words == 0)
    assert (net.rotation_head is None) == (pretext != "rotation")
    batch = make_batch(pretext, CUBES, visual_words=words > 0, generator=_gen())
    out = net(batch["input"])
    assert ("restoration" in out) == (pretext != "rotation")
    assert ("words" in out) == (words > 0)
    labels = torch.arange(4) % words if words else None
    loss = pretext_loss(out, batch, words=labels)["loss"]
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_rotation_network_has_no_decoder_to_export() -> None:
    net = PretextNet(pretext="rotation", width=0.125)
    assert not any(k.startswith("net.decoder") for k in net.state_dict())


def test_loss_is_the_weighted_sum_of_its_terms() -> None:
    torch.manual_seed(0)
    out = {"restoration": torch.rand(4, 1, 8, 8, 8), "words": torch.randn(4, 3)}
    batch = {"target": torch.rand(4, 1, 8, 8, 8)}
    words = torch.tensor([0, 1, 2, 1])
    terms = pretext_loss(out, batch, words=words, lambda_rec=1.0, lambda_cls=0.01)
    expected = F.mse_loss(out["restoration"], batch["target"]) + 0.01 * F.cross_entropy(out["words"], words)
    assert torch.allclose(terms["loss"], expected)
    rot = pretext_loss({"rotation": torch.randn(4, 4)}, {"rotation": torch.tensor([0, 1, 2, 3])}, rotation_weight=2.0)
    assert torch.allclose(rot["loss"], 2.0 * rot["rot"])
    with pytest.raises(ValueError, match="word labels"):
        pretext_loss(out, batch, words=None)


@pytest.mark.parametrize(("pretext", "words"), [("genesis", 4), ("inpaint", 0), ("rotation", 0)])
def test_loss_falls_on_a_fixed_batch(pretext: str, words: int) -> None:
    torch.manual_seed(0)
    net = PretextNet(pretext=pretext, num_words=words, width=0.125)
    batch = make_batch(pretext, CUBES, visual_words=words > 0, generator=_gen())
    labels = torch.arange(4) % words if words else None
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = pretext_loss(net(batch["input"]), batch, words=labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
