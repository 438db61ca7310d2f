"""Launched by tests/glam/test_distributed.py through torchrun (2 gloo processes).

Each rank feeds its own tokens to an expert-parallel MoE layer (2 of 4 experts per rank, tokens
exchanged all-to-all) and checks outputs and gradients against the single-process layer applied to
all ranks' tokens. Exits non-zero on any mismatch; prints EP-MATCH on success.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from thrifty.methods.glam.expert_parallel import ShardedExperts, shard_layer
from thrifty.methods.glam.moe import MoELayer

WORLD = 2


def main(dispatch: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)
        full = MoELayer(
            dim=16, ffn_dim=24, num_experts=4, group_size=16, capacity_factor=1.0, dispatch=dispatch, mode=mode
        )
        n = 32  # tokens per rank: 2 groups of 16 on every rank, the same groups the full layer sees
        x_all = torch.randn(WORLD * n, 16)
        w_all = torch.randn(WORLD * n, 16)
        ep = shard_layer(copy.deepcopy(full), rank=rank, world_size=WORLD)
        assert isinstance(ep.experts, ShardedExperts) and ep.experts.local.num_experts == 2

        mine = slice(rank * n, (rank + 1) * n)
        x = x_all[mine].clone().requires_grad_()
        out = ep(x)
        ((out.hidden * w_all[mine]).sum() + out.aux_loss).backward()

        x_ref = x_all.clone().requires_grad_()
        ref = full(x_ref)
        # the full layer's aux is the mean over all groups; each rank's is the mean over its own
        ((ref.hidden * w_all).sum() + WORLD * ref.aux_loss).backward()

        torch.testing.assert_close(out.hidden, ref.hidden[mine], atol=1e-6, rtol=1e-5)
        # capacity factor 1 makes the exchange carry real drops (expert choice: tokens no expert took)
        assert out.stats["both_dropped" if mode == "expert_choice" else "drop_rate"] > 0
        torch.testing.assert_close(x.grad, x_ref.grad[mine], atol=1e-6, rtol=1e-5)
        # router grads: each rank sees its own tokens' share; their sum is the full gradient
        g = ep.router.weight.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, full.router.weight.grad, atol=1e-5, rtol=1e-4)
        # expert grads: the owner receives every rank's tokens, so it holds the full gradient of its slice
        sl = slice(rank * 2, rank * 2 + 2)
        for name in ("wi_0", "wi_1", "wo"):
            torch.testing.assert_close(
                getattr(ep.experts.local, name).grad, getattr(full.experts, name).grad[sl], atol=1e-5, rtol=1e-4
            )
        print(f"EP-MATCH rank {rank} {dispatch} {mode}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
