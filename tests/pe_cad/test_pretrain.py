"""PE CAD initialisations without ImageNet: the supervised source task, SimCLR's NT-Xent (positives = the pairs
(k, k + N) of the 2N views), the Genesis-style restoration pair built from the Genesis transforms, falling pretext
losses, determinism, and the init dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.pe_cad import pretrain as P
from thrifty.methods.pe_cad.stage1 import AugmentConfig, build_backbone


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def toy_slices(n: int = 64, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3-slice stacks of a bright disc on a darker body, at random positions; label = the disc's radius class
    (0..3), a stand-in source task the images show."""
    g = gen(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    radius = 3.0 + 2.0 * labels.float()
    cy = size / 2 + (torch.rand(n, generator=g) - 0.5) * size / 3
    cx = size / 2 + (torch.rand(n, generator=g) - 0.5) * size / 3
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    d2 = (ys - cy.view(n, 1, 1)) ** 2 + (xs - cx.view(n, 1, 1)) ** 2
    disc = (d2 <= radius.view(n, 1, 1) ** 2).float()
    img = 0.3 + 0.5 * disc
    stack = torch.stack([img * 0.95, img, img * 1.05], dim=1)
    return (stack + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1), labels


def _falls(losses: list[float], k: int = 4, ratio: float = 0.9) -> bool:
    return all(math.isfinite(v) for v in losses) and np.mean(losses[-k:]) < ratio * np.mean(losses[:k])


# ----------------------------------------------------------------------------------------------------------------
# NT-Xent


def test_simclr_positives_are_the_diagonal_pairs() -> None:
    t = P.simclr_targets(4)
    assert t.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert torch.equal(t[t], torch.arange(8))  # a pairing: positive of the positive is the view itself


def test_nt_xent_matches_the_formula() -> None:
    z1, z2 = torch.randn(5, 7, generator=gen(1)), torch.randn(5, 7, generator=gen(2))
    tau = 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = 10
    total = 0.0
    for k in range(n2):
        pos = (k + 5) % n2
        den = sum(math.exp(float(z[k] @ z[j]) / tau) for j in range(n2) if j != k)
        total += -(float(z[k] @ z[pos]) / tau - math.log(den))
    assert float(P.nt_xent(z1, z2, temperature=tau)) == pytest.approx(total / n2, rel=1e-5)


def test_nt_xent_rewards_matching_views() -> None:
    z = torch.eye(6)  # orthogonal embeddings
    matched = P.nt_xent(z, z.clone())
    shuffled = P.nt_xent(z, z[torch.tensor([1, 2, 3, 4, 5, 0])])
    assert matched < shuffled
    with pytest.raises(ValueError):
        P.nt_xent(z, z[:3])


# ----------------------------------------------------------------------------------------------------------------
# supervised source task


def test_slice_level_labels() -> None:
    lab = P.slice_level_labels([4, 8, 3], num_bins=4)
    assert lab.tolist() == [0, 1, 2, 3, 0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2]
    assert P.slice_level_labels([]).numel() == 0


# ----------------------------------------------------------------------------------------------------------------
# Genesis-style pair


def test_genesis_pair_2d_shapes_flip_and_determinism() -> None:
    x, _ = toy_slices(16, 32)
    a = P.genesis_pair_2d(x, generator=gen(5))
    b = P.genesis_pair_2d(x, generator=gen(5))
    assert a["input"].shape == x.shape and a["target"].shape == x.shape
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    assert a["input"].min() >= 0 and a["input"].max() <= 1
    for i in range(16):  # target = the stack flipped along H and/or W (never across channels)
        flips = [x[i], x[i].flip(1), x[i].flip(2), x[i].flip((1, 2))]
        assert any(torch.equal(a["target"][i], f) for f in flips)
    assert not torch.equal(a["input"], a["target"])
    never = P.genesis_pair_2d(
        x, generator=gen(5), flip_prob=0, shuffle_prob=0, nonlinear_prob=0, paint_prob=0
    )  # all perturbations off: the identity
    assert torch.equal(never["input"], x) and torch.equal(never["target"], x)


def test_restoration_decoder_shapes() -> None:
    dec = P.RestorationDecoder(128, stride=16)
    out = dec(torch.randn(2, 128, 2, 2))
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError):
        P.RestorationDecoder(8, stride=12)


# ----------------------------------------------------------------------------------------------------------------
# pretext training


def _run(kind: str, *, seed: int = 0, steps: int = 16, backbone: str = "small_cnn") -> tuple[P.PretrainResult, dict]:
    x, y = toy_slices(64, 32)
    m = build_backbone(backbone, image_size=32, seed=0)
    if kind == "supervised":
        res = P.pretrain_supervised(m, x, y, steps=steps, batch_size=16, lr=2e-3, seed=seed)
    elif kind == "simclr":
        # milder views than the stage-1 defaults (no cutout), so that a few steps on toy data show the fall
        mild = AugmentConfig(cutout_holes=0, rotate=10.0, shift=0.1)
        res = P.pretrain_simclr(m, x, steps=steps, batch_size=16, lr=2e-3, seed=seed, augmentation=mild)
    else:
        res = P.pretrain_restoration(m, x, steps=steps, batch_size=16, lr=2e-3, seed=seed)
    return res, m.state_dict()


@pytest.mark.parametrize("kind", ["supervised", "simclr", "restoration"])
def test_pretext_losses_fall_and_return_backbone_state(kind: str) -> None:
    res, state = _run(kind, steps=24)
    assert len(res.losses) == 24
    assert _falls(res.losses), res.losses
    assert set(res.state_dict) == set(state)  # the backbone only, no pretext head
    assert all(torch.equal(res.state_dict[k], v) for k, v in state.items())
    init = build_backbone("small_cnn", image_size=32, seed=0).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in res.state_dict.items())


@pytest.mark.parametrize("kind", ["supervised", "simclr", "restoration"])
def test_pretext_is_deterministic(kind: str) -> None:
    a, _ = _run(kind, steps=3)
    b, _ = _run(kind, steps=3)
    c, _ = _run(kind, steps=3, seed=1)
    assert a.losses == b.losses and a.losses != c.losses
    assert all(torch.equal(v, b.state_dict[k]) for k, v in a.state_dict.items())


def test_vit_pretexts_run() -> None:
    for kind in ("simclr", "restoration"):
        res, _ = _run(kind, steps=2, backbone="small_vit")
        assert len(res.losses) == 2 and all(math.isfinite(v) for v in res.losses)


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def test_initialise_dispatch() -> None:
    x, y = toy_slices(16, 32)
    m = build_backbone("small_cnn", image_size=32, seed=0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = P.initialise(m, "random")
    assert res.losses == [] and all(torch.equal(before[k], v) for k, v in res.state_dict.items())
    with pytest.raises(NotImplementedError):
        P.initialise(m, "imagenet")
    with pytest.raises(NotImplementedError):
        P.initialise(m, "ssl:barlowtwins")
    with pytest.raises(ValueError):
        P.initialise(m, "supervised", slices=x)  # no labels
    with pytest.raises(ValueError):
        P.initialise(m, "bogus")
    for init in ("supervised", "ssl:simclr", "ssl:genesis"):
        out = P.initialise(m, init, slices=x, labels=y, steps=2, batch_size=8, seed=0)
        assert len(out.losses) == 2
