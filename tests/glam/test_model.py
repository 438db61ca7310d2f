"""GLaM model-level behaviour: shapes, gradients, causality, padding, losses, FLOP/param accounting."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from thrifty.core.registry import load_config
from thrifty.methods.glam.baselines import (
    ArmSpec,
    build_arms,
    build_model,
    count_params,
    flops_per_token,
    param_counts,
)
from thrifty.methods.glam.losses import lm_and_z_loss, lm_loss, z_loss
from thrifty.methods.glam.model import GlamLM, MoESettings, relative_position_bucket

DEFAULT_MOE = MoESettings(num_experts=4, group_size=64)


def tiny(moe: MoESettings | None = DEFAULT_MOE, **kw) -> GlamLM:
    torch.manual_seed(0)
    args = dict(vocab_size=97, dim=32, num_layers=2, num_heads=4, ffn_dim=48, moe=moe)
    args.update(kw)
    return GlamLM(**args)


def test_relative_position_bucket_known_values():
    n = torch.arange(0, 300)
    b = relative_position_bucket(-n, num_buckets=32, max_distance=128)
    assert torch.equal(b[:16], torch.arange(16))  # exact buckets for the 16 nearest distances
    # log-spaced beyond: bucket = 16 + floor(log(n/16) / log(128/16) * 16)
    for d in (16, 20, 40, 64, 100, 127):
        expected = 16 + int(math.log(d / 16) / math.log(128 / 16) * 16)
        assert b[d].item() == expected
    assert (b[128:] == 31).all()
    assert (b[1:] >= b[:-1]).all()
    # the future (positive relative positions) never gets its own bucket in a causal model
    assert (relative_position_bucket(torch.arange(1, 10)) == 0).all()


def test_forward_shapes_and_structure():
    m = tiny(num_layers=4)
    out = m(torch.randint(0, 97, (3, 10)), labels=torch.randint(0, 97, (3, 10)))
    assert out.logits.shape == (3, 10, 97)
    assert [b.is_moe for b in m.blocks] == [True, False, True, False]  # first layer of each pair
    assert len(out.moe_stats) == 2
    assert all(p.ndim for p in m.parameters())
    # no biases anywhere
    assert not any(name.endswith("bias") for name, _ in m.named_parameters())
    with pytest.raises(ValueError, match="even"):
        tiny(num_layers=3)


def test_initial_loss_is_log_vocab():
    m = tiny()
    out = m(torch.randint(0, 97, (4, 16)), labels=torch.randint(0, 97, (4, 16)))
    assert abs(out.lm_loss.item() - math.log(97)) < 0.05


def test_every_parameter_gets_a_finite_gradient():
    m = tiny(moe=MoESettings(num_experts=4, group_size=512, capacity_factor=2.0))
    out = m(torch.randint(0, 97, (8, 32)), labels=torch.randint(0, 97, (8, 32)))
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_causal_future_tokens_do_not_change_past_logits():
    m = tiny(moe=MoESettings(num_experts=4, capacity_factor=8.0, group_size=512)).eval()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 97, (2, 4))
    with torch.no_grad():
        a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=1e-5)


def test_padding_never_changes_real_tokens():
    # capacity large enough that no slot is dropped, so group size does not matter
    m = tiny(moe=MoESettings(num_experts=4, capacity_factor=8.0, group_size=4096)).eval()
    x = torch.randint(0, 97, (2, 10))
    padded = torch.cat([x, torch.randint(0, 97, (2, 6))], dim=1)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :10] = True
    labels = torch.cat([x.roll(-1, 1), torch.zeros(2, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = m(x, labels=labels[:, :10])
        out = m(padded, labels=labels, padding_mask=mask)
    torch.testing.assert_close(out.logits[:, :10], ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lm_loss, ref.lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
    assert all(s["load"].sum() == 2 * 20 for s in out.moe_stats)  # only the 20 real tokens x top-2


def test_fused_lm_and_z_loss_matches_reference_values_and_gradients():
    torch.manual_seed(1)
    logits = (3 * torch.randn(4, 7, 53)).requires_grad_()
    labels = torch.randint(0, 53, (4, 7))
    labels[0, :3] = -100
    ce, z = lm_and_z_loss(logits, labels)
    (ce + 0.37 * z).backward()
    g_fused = logits.grad.clone()
    logits.grad = None
    ce_ref = lm_loss(logits, labels)
    z_ref = z_loss(logits, labels != -100)
    (ce_ref + 0.37 * z_ref).backward()
    torch.testing.assert_close(ce, ce_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g_fused, logits.grad, atol=1e-7, rtol=1e-5)
    assert torch.all(g_fused[0, :3] == 0)  # ignored positions get no gradient


def test_aux_loss_is_in_the_objective_whenever_its_weight_is_positive():
    x = torch.randint(0, 97, (4, 16))
    m = tiny(aux_weight=0.5, z_weight=0.0)
    out = m(x, labels=x)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss)
    out.loss.backward()
    g_with = m.blocks[0].ffn.router.weight.grad.clone()
    m0 = tiny(aux_weight=0.0, z_weight=0.0)
    out0 = m0(x, labels=x)
    torch.testing.assert_close(out0.loss, out0.lm_loss)
    assert out0.aux_loss.item() > 0  # still computed and reported, just not weighted in
    out0.loss.backward()
    assert not torch.allclose(g_with, m0.blocks[0].ffn.router.weight.grad)


def test_z_loss_weight_applies_to_the_output_softmax():
    x = torch.randint(0, 97, (2, 8))
    m = tiny(aux_weight=0.0, z_weight=0.25)
    out = m(x, labels=x)
    expected_z = torch.logsumexp(out.logits.float(), -1).square().mean()
    torch.testing.assert_close(out.z_loss, expected_z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.25 * out.z_loss)


def quick_cfg(*overrides: str):
    return load_config("glam", "quick", list(overrides))[1]


@pytest.mark.parametrize("preset", ["smoke", "quick", "full"])
def test_dense_active_matches_moe_activated_flops_within_one_percent(preset):
    cfg = load_config("glam", preset, [])[1]
    arms = {a.name: a for a in build_arms(cfg)}
    fm = flops_per_token(arms["moe"], cfg.model.seq_len)["forward_activated"]
    fd = flops_per_token(arms["dense-active"], cfg.model.seq_len)["forward_activated"]
    assert abs(fd - fm) / fm < 0.01


@pytest.mark.parametrize("preset", ["smoke", "quick", "ablations"])
def test_analytic_param_counts_equal_counting_the_module(preset):
    cfg = load_config("glam", preset, [])[1]
    for spec in build_arms(cfg):
        assert param_counts(spec) == count_params(build_model(spec)), spec.name


def test_dense_params_matches_moe_total_params():
    cfg = quick_cfg()
    arms = {a.name: a for a in build_arms(cfg)}
    pm = count_params(build_model(arms["moe"]))["total"]
    pd = count_params(build_model(arms["dense-params"]))["total"]
    assert abs(pd - pm) / pm < 0.001
    # and the moe's activated params are those of dense-active (up to the router)
    pa = count_params(build_model(arms["moe"]))["active"]
    pda = count_params(build_model(arms["dense-active"]))["total"]
    assert abs(pa - pda) / pda < 0.01


@pytest.mark.parametrize(("arm", "mode"), [("dense-active", "capacity"), ("moe", "capacity"), ("moe", "expert_choice")])
def test_analytic_flops_match_flop_counter(arm, mode):
    cfg = load_config("glam", "smoke", [f"moe.mode={mode}"])[1]
    spec: ArmSpec = {a.name: a for a in build_arms(cfg)}[arm]
    model = build_model(spec)
    B, T = 4, cfg.model.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (B, T))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    counted = counter.get_total_flops() / (B * T)
    analytic = flops_per_token(spec, T, batch_tokens=B * T)["forward_executed"]
    assert abs(counted - analytic) / analytic < 0.02, (counted, analytic)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    x = torch.randint(0, 97, (4, 16))
    grads = []
    for ckpt in (False, True):
        m = tiny(activation_checkpointing=ckpt)
        out = m(x, labels=x)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_keeps_router_and_losses_in_fp32():
    m = tiny()
    x = torch.randint(0, 97, (2, 16))
    seen = {}
    layer = m.blocks[0].ffn
    original = layer.route

    def spy(xg, nonpad):
        r, logits = original(xg, nonpad)
        seen["logits"], seen["gates"] = logits.dtype, r.raw_gates.dtype
        return r, logits

    layer.route = spy
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = m(x, labels=torch.randint(0, 97, (2, 16)))
    assert out.logits.dtype == torch.bfloat16  # the matmuls ran in bf16
    assert seen == {"logits": torch.float32, "gates": torch.float32}
    assert out.lm_loss.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert abs(out.lm_loss.item() - math.log(97)) < 0.1
