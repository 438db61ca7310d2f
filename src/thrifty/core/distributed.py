"""torchrun / DDP helpers: one code path for a laptop (1 process) and a cluster (N processes).

``torchrun --nproc_per_node=N -m thrifty run RECIPE ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`init` reads them and starts a process group (gloo on CPU, NCCL on CUDA). Without them
everything degrades to a single process and the collectives below are no-ops.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` and ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> DistInfo:
    """Start (or join) the process group when launched by torchrun; otherwise a 1-process DistInfo.

    CUDA processes use their ``LOCAL_RANK`` GPU and NCCL; CPU processes use gloo.
    """
    if not launched_by_torchrun():
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        # CUDA tensors go through NCCL; small CPU-side reductions (metrics, eval sums) through gloo
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown() -> None:
    """Tear the process group down once every rank has reached this point (a rank that leaves while a peer
    is still in gloo's teardown can abort that peer, seen as SIGABRT in a loaded CI run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns a new tensor; identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_min_int(value: int) -> int:
    """Minimum of an integer over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def shard_rows(n: int, info: DistInfo) -> slice:
    """Rows of a global batch of ``n`` that belong to this rank (contiguous, equal sizes).

    Raises:
        ValueError: when ``n`` is not divisible by the world size.
    """
    if n % info.world_size:
        raise ValueError(f"global batch_size {n} is not divisible by world size {info.world_size}")
    per = n // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce-mean every gradient of ``module`` in one flat bucket (identity without a process group).

    For modules that cannot sit under DDP, e.g. a GAN discriminator called twice per backward.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 in rank order (identity without a process group).

    Every rank must pass a tensor of the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: :func:`all_gather_cat`. Backward: the gradient of the whole gathered tensor summed over ranks, this
    rank's rows returned (every rank holds a copy of the loss built from the gathered tensor)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = t.shape[0]
        return all_gather_cat(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_cat` through which gradients flow back to every rank's rows (identity without a process
    group; works on gloo, which has no reduce-scatter).

    If every rank computes the same loss from the gathered tensor and DDP then averages parameter gradients over the
    ``W`` ranks, each rank's rows receive ``W`` times their share and the average is exactly the gradient of one
    process computing the loss on the whole batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


def sync_batchnorm_stats(module: torch.nn.Module) -> None:
    """Average BatchNorm running means and variances over ranks (identity without a process group).

    DDP with ``broadcast_buffers=False`` lets each rank's running statistics drift apart; call this before
    evaluating so every rank evaluates the same model.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf /= dist.get_world_size()


def with_sync_bn(model: torch.nn.Module, *, enabled: bool, device: torch.device) -> torch.nn.Module:
    """``model`` with every BatchNorm converted to ``SyncBatchNorm`` when ``enabled`` and on CUDA (the only device
    SyncBN runs on; its parameters, buffers and state-dict keys carried over); unchanged otherwise."""
    if enabled and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
