"""Run under ``torchrun --nproc_per_node=2``: the temporal-gradient recipe's two clip streams and loss under DDP.
Every rank draws its own labelled and unlabelled clips (separate samplers, disjoint rows at each step) and, after a
few steps of ``compute_loss`` + SGD, every rank holds the same parameters although each started from its own
random initialisation (DDP broadcasts rank 0's). The control shows the check can fail: the same steps without DDP
leave the ranks apart. Prints DDP-TG-OK."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed
from thrifty.core.splits import AccessLog
from thrifty.methods.temporal_gradient.config import TemporalGradientConfig
from thrifty.methods.temporal_gradient.data import GuardedVideos, TGData, VideoSet, draw_step, stream_indices
from thrifty.methods.temporal_gradient.train import ARM_SPECS, build_model, compute_loss

STEPS = 3


def config() -> TemporalGradientConfig:
    cfg = TemporalGradientConfig()
    cfg.data.synthetic.num_frames, cfg.data.synthetic.size = 8, 16
    cfg.data.clip_len, cfg.data.frame_interval, cfg.data.crop_size = 4, 1, 16
    cfg.data.labelled_per_step = cfg.data.unlabelled_per_step = 4
    cfg.model.proj_dim = 16
    cfg.max_steps, cfg.loss.warmup_fraction, cfg.loss.threshold = STEPS, 0.0, 0.0
    cfg.validate()
    return cfg


def data() -> TGData:
    rng = np.random.default_rng(0)  # the same videos on every rank
    videos = rng.integers(0, 256, size=(24, 8, 16, 16, 3), dtype=np.uint8)
    train = VideoSet(videos, np.arange(24) % 10)
    held = GuardedVideos("val", train.subset(np.arange(4)), AccessLog())
    return TGData([str(c) for c in range(10)], train, held, held, seed=0, info={})


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def gathered(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def train(use_ddp: bool, cfg: TemporalGradientConfig, d: TGData, info: distributed.DistInfo) -> torch.Tensor:
    torch.manual_seed(100 + info.rank)  # each rank starts from its own weights
    model = build_model(cfg, ARM_SPECS["tg_full"], 10)
    net = DDP(model) if use_ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(7 + info.rank)
    labelled = np.arange(24)
    for step in range(1, STEPS + 1):
        clips = draw_step(d, labelled, cfg, seed=0, step=step, rank=info.rank, world=info.world_size, gen=gen,
                          unlabelled=True)  # fmt: skip
        loss = compute_loss(ARM_SPECS["tg_full"], net, clips, cfg, step=step).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flat(model)


def main() -> int:
    info = distributed.init(torch.device("cpu"))
    cfg, d = config(), data()
    world = info.world_size
    for step in (1, 2, 3):  # each stream deals disjoint rows to the ranks
        rows = torch.from_numpy(stream_indices(24, 2, seed=0, stream=1, step=step, rank=info.rank, world=world))
        a, b = gathered(rows, world)
        assert not set(a.tolist()) & set(b.tolist()), (step, a, b)
    with_ddp = gathered(train(True, cfg, d, info), world)
    assert torch.equal(with_ddp[0], with_ddp[1]), "DDP ranks drifted apart"
    without = gathered(train(False, cfg, d, info), world)
    assert not torch.allclose(without[0], without[1]), "the control did not differ: the check cannot fail"
    print(f"rank {info.rank}: DDP-TG-OK", flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
