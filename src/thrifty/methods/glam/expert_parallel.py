"""Expert parallelism for GLaM's MoE layers: experts sharded over ranks, tokens exchanged all-to-all.

GShard/GLaM place different experts on different devices. Each rank routes its own tokens (its groups)
exactly as the single-process layer does, fills the ``[E, G·C, d]`` expert buffer, and sends the rows
of expert ``e`` to the rank that owns ``e`` with one ``all_to_all_single``; the owner runs its
``E / world`` experts on the rows from every rank and a second all-to-all returns the outputs, which
are combined locally. The result equals the single-process layer applied to the same groups (tested
with 2 gloo processes). Gradients flow back through the collectives (the all-to-all's adjoint is an all-to-all).

Training notes (:func:`shard_model`, :func:`ddp_for_expert_parallel`; building already sharded, FSDP,
clipping and gathering live in :mod:`~thrifty.methods.glam.sharding`):

* expert weights are excluded from DDP's all-reduce (each rank owns different experts);
* an expert receives tokens from every rank, so its gradient is the *sum* of the ranks' gradients;
  a hook divides it by the world size to match DDP's averaging of the other parameters;
* checkpoints are per rank (``checkpoints/rank<r>``), and resuming needs the same world size;
  ``sharding.gather_full_state`` rebuilds the unsharded weights so the final model loads on one process.

Dropless mode has variable per-expert sizes and is not supported here (a clear error says so).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from thrifty.methods.glam.moe import Experts, MoELayer


def _exchange(x: torch.Tensor) -> torch.Tensor:
    """Equal-split ``all_to_all_single`` along dim 0 (contiguous first: the collective ignores strides)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out


class _AllToAll(torch.autograd.Function):
    """All-to-all whose adjoint is itself: the gradient is exchanged back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _exchange(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _exchange(grad)


class ShardedExperts(nn.Module):
    """Stands in for :class:`Experts` (same call signature, ``[E, n, d] -> [E, n, d]``) while holding
    only this rank's ``E / world`` experts."""

    def __init__(self, local: Experts, *, rank: int, world_size: int) -> None:
        super().__init__()
        self.local = local
        self.rank, self.world_size = rank, world_size

    @property
    def num_experts(self) -> int:
        return self.local.num_experts * self.world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, n, d = x.shape
        W, e_loc = self.world_size, self.local.num_experts
        send = x.reshape(W, e_loc, n, d)  # chunk w holds the rows for rank w's experts
        recv = _AllToAll.apply(send)  # [W (source rank), e_loc, n, d]
        y = self.local(recv.permute(1, 0, 2, 3).reshape(e_loc, W * n, d))
        back = y.reshape(e_loc, W, n, d).permute(1, 0, 2, 3)  # [W (destination), e_loc, n, d]
        return _AllToAll.apply(back).reshape(E, n, d)


def shard_layer(layer: MoELayer, *, rank: int, world_size: int) -> MoELayer:
    """Replace ``layer.experts`` by this rank's slice (in place); returns the layer."""
    if layer.mode == "dropless":
        raise ValueError("expert parallelism supports the capacity and top1 modes, not dropless")
    E = layer.num_experts
    if E % world_size:
        raise ValueError(f"num_experts {E} is not divisible by world size {world_size}")
    if isinstance(layer.experts, ShardedExperts):
        return layer
    full = layer.experts
    e_loc = E // world_size
    with torch.device(full.wi_0.device):  # on "meta" nothing is allocated: the model is built sharded
        local = Experts(num_experts=e_loc, dim=full.wi_0.shape[1], ffn_dim=full.wi_0.shape[2])
    sl = slice(rank * e_loc, (rank + 1) * e_loc)
    with torch.no_grad():
        for name in ("wi_0", "wi_1", "wo"):
            getattr(local, name).copy_(getattr(full, name)[sl])
    layer.experts = ShardedExperts(local, rank=rank, world_size=world_size)  # type: ignore[assignment]
    return layer


def expert_param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".experts.local." in f".{n}"]


def shard_model(model: nn.Module, *, rank: int, world_size: int) -> nn.Module:
    """Shard every MoE layer of ``model`` in place (build the optimiser after this)."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            shard_layer(m, rank=rank, world_size=world_size)
    return model


def rescale_expert_gradients(model: nn.Module, *, world_size: int) -> nn.Module:
    """Divide expert gradients by the world size (they sum every rank's tokens) so they match the
    data-parallel mean of the other parameters; returns ``model``."""
    names = expert_param_names(model)
    for n, p in model.named_parameters():
        if n in names:
            p.register_hook(lambda g: g / world_size)
    return model


def ddp_for_expert_parallel(model: nn.Module, *, world_size: int) -> nn.Module:
    """DDP over the replicated parameters only; expert gradients are rescaled to DDP's mean."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rescale_expert_gradients(model, world_size=world_size)
    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
    return DDP(model)
