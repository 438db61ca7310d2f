"""What every in-project stage-1 backbone of PE CAD (Xception, SeXception, VGG16, DRN-A-50, DRN-D-54) must do, at a
small width: every parameter gets a finite, non-zero gradient, and ``build_backbone`` is seeded without touching the
global RNG."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.pe_cad import stage1 as S
from thrifty.methods.pe_cad.drn import DRNA50, DRND54
from thrifty.methods.pe_cad.vgg import VGG16
from thrifty.methods.pe_cad.xception import SeXception, Xception

SMALL = 0.125  # width multiplier for the fast checks
BACKBONES = {"xception": Xception, "sexception": SeXception, "vgg16": VGG16, "drn_a_50": DRNA50, "drn_d_54": DRND54}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cls", list(BACKBONES.values()))
def test_gradients_reach_every_parameter(cls: type[nn.Module]) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = cls(width=SMALL)
    x = torch.rand(3, 3, 64, 64, generator=gen(1))
    loss = F.binary_cross_entropy_with_logits(m(x), torch.tensor([0.0, 1.0, 1.0]))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in m.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


@pytest.mark.parametrize("name", list(BACKBONES))
def test_seeded_builds_are_deterministic(name: str) -> None:
    state = torch.random.get_rng_state()
    a = S.build_backbone(name, image_size=64, seed=3, width=SMALL)
    b = S.build_backbone(name, image_size=64, seed=3, width=SMALL)
    c = S.build_backbone(name, image_size=64, seed=4, width=SMALL)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = torch.rand(2, 3, 64, 64, generator=gen())
    assert torch.equal(a(x), b(x))  # train mode: batch statistics, same batch -> same logits
