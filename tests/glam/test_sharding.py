"""Building GLaM already sharded (single process): the sharding-independent initialisation, the
meta-device build that never allocates other ranks' experts, and gradient clipping. The 2-process
FSDP / expert-parallel runs are in ``test_distributed.py``."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.glam.baselines import ArmSpec, build_arms, build_model, param_counts
from thrifty.methods.glam.config import GlamConfig
from thrifty.methods.glam.expert_parallel import ShardedExperts
from thrifty.methods.glam.sharding import build_sharded, canonical_name, clip_grad_norm_, init_rule, init_weights

CPU = torch.device("cpu")


def _spec(arm: str = "moe", **model) -> ArmSpec:
    cfg = GlamConfig()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return next(s for s in build_arms(cfg) if s.name == arm)


@pytest.mark.parametrize("arm", ["moe", "dense-active"])
def test_init_rule_reproduces_the_constructors_scales(arm):
    torch.manual_seed(0)
    built = build_model(_spec(arm))
    fresh = build_sharded(_spec(arm), seed=0, device=CPU)
    for name, p in built.named_parameters():
        q = dict(fresh.named_parameters())[name]
        kind, std = init_rule(name, fresh)
        if kind == "ones":
            assert torch.equal(p, torch.ones_like(p)) and torch.equal(q, torch.ones_like(q)), name
        elif kind == "zeros":
            assert not p.any() and not q.any(), name
        else:
            assert q.std().item() == pytest.approx(p.std().item(), rel=0.1), name
            assert q.std().item() == pytest.approx(std, rel=0.1), name


def test_init_is_deterministic_and_seeded():
    a = build_sharded(_spec(), seed=1, device=CPU)
    b = build_sharded(_spec(), seed=1, device=CPU)
    c = build_sharded(_spec(), seed=2, device=CPU)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if init_rule(n, a)[0] == "normal":
            assert not torch.equal(p, r), n


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_sharded_build_draws_exactly_this_ranks_slice_of_the_full_model(world_size):
    spec = _spec()
    full = dict(build_sharded(spec, seed=5, device=CPU).named_parameters())
    E = spec.kwargs["moe"].num_experts
    for rank in range(world_size):
        part = build_sharded(spec, seed=5, device=CPU, rank=rank, world_size=world_size, shard_experts=True)
        assert all(m.local.num_experts == E // world_size for m in part.modules() if isinstance(m, ShardedExperts))
        for name, p in part.named_parameters():
            ref = full[canonical_name(name)]
            if ".experts.local." in name:
                e_loc = E // world_size
                ref = ref[rank * e_loc : (rank + 1) * e_loc]
            assert torch.equal(p, ref), (rank, name)


def test_meta_build_never_allocates_other_ranks_experts():
    """A model whose full experts would take 3.2 GB per MoE layer builds at once on rank 5 of 64,
    holding one expert per layer: the experts are never materialised whole."""
    cfg = GlamConfig()
    cfg.model.dim, cfg.model.ffn_dim, cfg.model.num_layers, cfg.model.num_heads = 1024, 4096, 2, 8
    cfg.moe.num_experts = 64
    spec = next(s for s in build_arms(cfg) if s.name == "moe")
    model = build_sharded(spec, seed=0, device=CPU, rank=5, world_size=64, shard_experts=True)
    counts = param_counts(spec)
    held = sum(p.numel() for p in model.parameters())
    assert held == counts["total"] - counts["expert"] + counts["expert"] // 64
    assert all(p.device == CPU and torch.isfinite(p).all() for p in model.parameters())


def test_clip_grad_norm_matches_torch_on_an_unsharded_model():
    torch.manual_seed(0)
    spec = _spec()
    a = build_sharded(spec, seed=0, device=CPU)
    b = build_sharded(spec, seed=0, device=CPU)
    x = torch.randint(0, spec.kwargs["vocab_size"], (2, 17))
    for m in (a, b):
        m(x[:, :-1], labels=x[:, 1:]).loss.backward()
    ours = clip_grad_norm_(a, 0.05)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4)  # fp32 sums in another order
    assert ours.item() > 0.05  # the clipping branch ran
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8, msg=n)


def test_init_weights_rejects_a_model_it_cannot_fill():
    model = build_sharded(_spec(), seed=0, device=CPU)
    model.blocks[0].ffn.experts.wi_0 = torch.nn.Parameter(torch.zeros(2, 3))  # not [E, d, f]
    with pytest.raises((RuntimeError, IndexError)):
        init_weights(model, seed=0)
