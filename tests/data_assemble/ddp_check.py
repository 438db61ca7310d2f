"""Run under ``torchrun --nproc_per_node=2``: the recipe's batches and loss under DDP. Every rank draws its own
batch (``draw_batch`` seeded by rank) with the same per-role composition, and after a few steps of
``compute_loss`` + Adam every rank holds the same parameters, although each started from its own random
initialisation (DDP broadcasts rank 0's). The control shows the check can fail: the same steps without DDP leave
the ranks' parameters apart. Prints DDP-ASSEMBLE-OK."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed
from thrifty.data.chest_synth import FINDINGS, TARGET
from thrifty.methods.data_assemble.config import ROLES, DataAssembleConfig, ModelConfig
from thrifty.methods.data_assemble.data import LabelledImages, draw_batch, role_counts
from thrifty.methods.data_assemble.model import build_model
from thrifty.methods.data_assemble.train import ARM_SPECS, compute_loss

STEPS = 3
GLOBAL_BATCH = 8


def sources() -> dict[str, LabelledImages]:
    """The same three sources on every rank, with the synthetic label protocol."""
    gen = torch.Generator().manual_seed(0)
    t = FINDINGS.index(TARGET)
    out = {}
    for role in ROLES:
        n = 16
        given = torch.zeros(n, len(FINDINGS), dtype=torch.bool)
        if role == "target":
            given[:, t] = True
        elif role == "assembled":
            given[:, [j for j in range(len(FINDINGS)) if j != t]] = True
        labels = (torch.rand(n, len(FINDINGS), generator=gen) < 0.3).float()
        out[role] = LabelledImages(torch.rand(n, 1, 32, 32, generator=gen), labels, given, np.arange(n))
    return out


def gathered(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_steps(arm: str, info: distributed.DistInfo, *, use_ddp: bool) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    cfg = DataAssembleConfig()
    spec = ARM_SPECS[arm]
    train = sources()
    counts = role_counts(GLOBAL_BATCH // info.world_size, cfg.data.ratios, list(spec.roles))
    torch.manual_seed(1 + info.rank if use_ddp else 1)  # DDP: a different start on every rank
    model = build_model(ModelConfig(), num_labels=len(FINDINGS), head=spec.head)
    net = DDP(model) if use_ddp else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(7919 + info.rank)
    drawn = []
    for step in range(1, STEPS + 1):
        batch = draw_batch(train, counts, seed=0, step=step, rank=info.rank)
        drawn.append(torch.cat([batch.images.flatten(), batch.roles.float()]))
        parts = compute_loss(spec, net, batch, cfg, gen, FINDINGS.index(TARGET))
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()
    return model, drawn


def main() -> int:
    info = distributed.init(torch.device("cpu"))
    torch.set_num_threads(1)
    world = info.world_size
    if world < 2:
        print("run me under torchrun --nproc_per_node=2", flush=True)
        return 1
    for arm in ("assemble", "assemble_adapter", "release_compat"):
        model, drawn = train_steps(arm, info, use_ddp=True)
        params = gathered(flat_params(model), world)
        if not all(torch.equal(p, params[0]) for p in params):
            print(f"{arm}: parameters differ across ranks after {STEPS} DDP steps", flush=True)
            return 1
        for step, mine in enumerate(drawn, start=1):
            batches = gathered(mine, world)
            if torch.equal(batches[0], batches[1]):
                print(f"{arm}: ranks drew the same batch at step {step}", flush=True)
                return 1
            n = len(mine) - GLOBAL_BATCH // world  # the roles, at the end: the same composition on every rank
            if not torch.equal(batches[0][n:], batches[1][n:]):
                print(f"{arm}: ranks drew different role compositions at step {step}", flush=True)
                return 1
        local, _ = train_steps(arm, info, use_ddp=False)
        params = gathered(flat_params(local), world)
        if torch.equal(params[0], params[1]):
            print(f"{arm}: without DDP the ranks still agree: the check cannot fail", flush=True)
            return 1
    print("DDP-ASSEMBLE-OK", flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
