"""Run under ``torchrun --nproc_per_node=2``: SQUID trained with DDP keeps identical memory queues on every
rank (all-gathered, rank order); with ``gather=False`` (rank-local queues) they differ. Prints DDP-QUEUE-OK."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed
from thrifty.methods.squid.config import LossConfig
from thrifty.methods.squid.losses import discriminator_loss, generator_loss
from thrifty.methods.squid.memory import MemoryQueue, update_queues
from thrifty.methods.squid.model import Discriminator, NetSettings, PatchUNet


def run(gather: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    info = distributed.init(torch.device("cpu"))
    torch.manual_seed(0)  # same initial weights and queues on every rank
    model = PatchUNet(NetSettings(image_size=24, base_filters=4, num_slots=8, decoder_slots=8, num_heads=4))
    disc = Discriminator(image_size=24)
    queues = [m for m in model.modules() if isinstance(m, MemoryQueue)]
    for q in queues:
        q.gather = gather
    ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), 1e-3)
    w = LossConfig()
    torch.manual_seed(100 + info.rank)  # different data (and shortcut masks) per rank
    last_pending = None
    for _ in range(3):
        x = torch.rand(2, 1, 24, 24)
        out = ddp(x)
        opt_d.zero_grad()
        discriminator_loss(disc(x), disc(out["recon"].detach()), w).backward()
        distributed.average_gradients(disc)
        opt_d.step()
        loss = generator_loss(out, x, disc(out["recon"]), w)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        last_pending = queues[0]._pending.clone()  # this rank's features of the last step, (B, P, D)
        update_queues(model)

    def bn_stats_equal() -> bool:
        bn = torch.cat([b.flatten() for n, b in model.named_buffers() if "running_" in n])
        bns = [torch.empty_like(bn) for _ in range(info.world_size)]
        dist.all_gather(bns, bn)
        return all(torch.equal(b, bns[0]) for b in bns)

    assert not bn_stats_equal(), "ranks saw different data, so their BatchNorm statistics should differ"
    distributed.sync_batchnorm_stats(model)
    assert bn_stats_equal(), "BatchNorm statistics differ after sync"
    q = queues[0]
    mem = q.memory.clone()
    gathered = [torch.empty_like(mem) for _ in range(info.world_size)]
    dist.all_gather(gathered, mem)
    if gather:
        assert int(q.count) == 3 * 2 * info.world_size, int(q.count)
        assert int(q.ptr) == (3 * 2 * info.world_size) % q.num_slots, int(q.ptr)
        pend = [torch.empty_like(last_pending) for _ in range(info.world_size)]
        dist.all_gather(pend, last_pending)
        newest = q.ordered()[:, -2 * info.world_size :]  # (P, 2·world, D), oldest first
        assert torch.equal(newest, torch.cat(pend).transpose(0, 1)), "last block is not rank-ordered"
    return mem, gathered


def main() -> int:
    mem, gathered = run(gather=True)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        print("queues differ across ranks with gather=True", flush=True)
        return 1
    mem_local, gathered_local = run(gather=False)
    if all(torch.equal(g, gathered_local[0]) for g in gathered_local):
        print("rank-local queues unexpectedly identical: the check cannot fail", flush=True)
        return 1
    print("DDP-QUEUE-OK", flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
