"""GLaM's claims from unit results: paired differences by seed, directions, and the >= 2 seed rule."""

from __future__ import annotations

import pytest

from thrifty.core.registry import load_config
from thrifty.methods.glam.train import make_claims


def unit(test: float, *, both=0.0, entropy=1.0, over1=0.0) -> dict:
    layer = {"both_dropped": both, "load_entropy": entropy, "over_capacity_1": over1}
    return {"test": {"overall": test}, "moe_tail": [layer, layer]}


def test_claims_are_paired_by_seed_with_the_right_directions():
    cfg = load_config("glam", "cpu", [])[1]
    results = {
        "moe": {0: unit(4.80, entropy=0.99), 1: unit(4.90, entropy=0.98), 2: unit(5.00, entropy=0.99)},
        "dense-active": {0: unit(4.90), 1: unit(5.00), 2: unit(5.11)},
        "ablation-aux0": {
            0: unit(4.9, entropy=0.80, over1=0.30),
            1: unit(5.0, entropy=0.85, over1=0.40),
            2: unit(5.1, entropy=0.90, over1=0.35),
        },
    }
    claims = {c.id: c for c in make_claims(cfg, results)}
    moe = claims["moe_beats_dense_active"]
    assert moe.values == pytest.approx((-0.10, -0.10, -0.11))
    assert moe.measured == pytest.approx(-0.31 / 3) and moe.holds  # interval entirely below 0
    assert claims["load_near_uniform"].measured == pytest.approx((0.99 + 0.98 + 0.99) / 3)
    assert claims["drops_rare"].holds
    ent = claims["aux_raises_load_entropy"]
    assert ent.direction == "greater" and ent.values == pytest.approx((0.19, 0.13, 0.09))
    over = claims["aux_lowers_top1_overflow"]
    assert over.direction == "less" and over.values == pytest.approx((-0.30, -0.40, -0.35)) and over.holds
    assert "dense_params_lower_loss" not in claims  # that arm did not run


def test_single_seed_runs_make_no_claims():
    cfg = load_config("glam", "ablations", [])[1]
    results = {"moe": {0: unit(5.0)}, "ablation-aux0": {0: unit(5.1, over1=0.3)}}
    assert make_claims(cfg, results) == []
