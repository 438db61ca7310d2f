"""Run with ``torchrun --nproc_per_node=2``: the gathered cross-modal NT-Xent of two gloo ranks equals one process's
loss on the whole batch, and the DDP-averaged gradient of each rank's embeddings equals that process's gradient
(``all_gather_with_grad``). Prints GATHER-OK once per rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from thrifty.core import distributed
from thrifty.methods.temporal_gradient.losses import nt_xent


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    full_a, full_b = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)  # same on every rank
    rows = slice(rank * 4, rank * 4 + 4)

    a = full_a[rows].clone().requires_grad_(True)
    b = full_b[rows].clone().requires_grad_(True)
    loss = nt_xent(distributed.all_gather_with_grad(a), distributed.all_gather_with_grad(b), temperature=0.5)
    loss.backward()
    grads = torch.cat([a.grad, b.grad]) / world  # what DDP's averaging of parameter gradients amounts to

    ref_a, ref_b = full_a.clone().requires_grad_(True), full_b.clone().requires_grad_(True)
    ref = nt_xent(ref_a, ref_b, temperature=0.5)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    torch.testing.assert_close(grads, torch.cat([ref_a.grad[rows], ref_b.grad[rows]]))

    # the check can fail: without gathering each rank's loss sees only its own negatives
    local = nt_xent(full_a[rows], full_b[rows], temperature=0.5)
    assert not torch.allclose(local, ref), "the local loss should differ from the global one"
    dist.barrier()
    print("GATHER-OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
