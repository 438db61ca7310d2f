"""Run under ``torchrun --nproc_per_node=2``: the MT-TransUNet recipe's smoke preset under DDP, with the unit's
two-stream sampler and parameters watched. Usage: ``ddp_check.py OUT_DIR DATA_DIR``.

Every rank draws half of each global batch (2 masked + 2 mask-free images of the smoke preset's 8): the masked
indices from the masked stream and the mask-free ones from the mask-free stream, and the two ranks' draws of each
stream are disjoint within an epoch (one epoch = 4 steps: 16 masked images, 8 per rank, 2 per batch); after
training every rank holds the same parameters although their batches differed. The checks run inside the unit (its
call of ``count_parameters``, where every rank still holds its model and the process group is up); each rank prints
DDP-MT-OK once the whole recipe finished and every check passed."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from thrifty.core.registry import load_config
from thrifty.methods.mt_transunet import train as recipe

STEPS = 4
drawn: list[list[int]] = []
streams: dict[str, int] = {}
failures: list[str] = []
checked: list[str] = []


class RecordingSampler(recipe.TwoStreamBatchSampler):
    """The recipe's sampler, remembering every batch it hands out and the streams' extent."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        streams.update(primary=len(self.primary), total=len(self.primary) + len(self.secondary),
                       primary_per_batch=self.primary_per_batch, per_batch=self.primary_per_batch
                       + self.secondary_per_batch)  # fmt: skip
        drawn.clear()

    def batch_at(self, step: int) -> list[int]:
        batch = super().batch_at(step)
        drawn.append(batch)
        return batch


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def check_unit(model: torch.nn.Module) -> None:
    """Called by every rank at the end of a unit's training (``count_parameters``)."""
    batches = drawn[:STEPS]  # the loop draws one batch per step
    p, n_primary, n_total = streams["primary_per_batch"], streams["primary"], streams["total"]
    if len(batches) != STEPS or any(len(b) != streams["per_batch"] for b in batches):
        failures.append(f"drew {[len(b) for b in batches]} indices per step, expected {STEPS} x 4")
        return
    if streams["per_batch"] != 4 or p != 2:
        failures.append(f"a rank's batch is {p} + {streams['per_batch'] - p}, expected 2 + 2 (global 8 over 2 ranks)")
    mine = torch.tensor(batches)
    ranks = gathered(mine)
    for r, b in enumerate(ranks):
        if not (b[:, :p] < n_primary).all() or not ((b[:, p:] >= n_primary) & (b[:, p:] < n_total)).all():
            failures.append(f"rank {r} drew an index from the wrong stream: {b.tolist()}")
    for name, cols in (("masked", slice(0, p)), ("mask-free", slice(p, None))):
        a, b = set(ranks[0][:, cols].flatten().tolist()), set(ranks[1][:, cols].flatten().tolist())
        if a & b:
            failures.append(f"the ranks' {name} draws over one epoch overlap: {sorted(a & b)}")
    if torch.equal(ranks[0], ranks[1]):
        failures.append("both ranks drew the same batches")
    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    params = gathered(flat)
    if not torch.equal(params[0], params[1]):
        failures.append("the ranks' parameters differ after DDP training")
    checked.append("unit")


def main() -> int:
    out, data = sys.argv[1], sys.argv[2]
    real_count = recipe.count_parameters

    def spy(model: torch.nn.Module) -> int:
        if drawn:  # a unit's end (the eval stage's architecture table also counts, on rank 0 only)
            check_unit(model)
            drawn.clear()
        return real_count(model)

    recipe.TwoStreamBatchSampler = RecordingSampler
    recipe.count_parameters = spy
    args = [f"out_dir={out}", f"data_dir={data}", "progress=false", "num_threads=1", "arms=[seg+cls+dual]",
            "seeds=[0]", f"max_steps={STEPS}", "eval_every=2"]  # fmt: skip
    cfg = load_config("mt_transunet", "smoke", args)[1]
    results = recipe.train(cfg)  # shuts the process group down at the end
    if checked != ["unit"]:
        failures.append(f"the unit checks ran {len(checked)} times, expected once")
    if results["cost"]["world_size"] != 2:
        failures.append(f"world size {results['cost']['world_size']}")
    if failures:
        print("FAILED: " + "; ".join(failures), flush=True)
        return 1
    print("DDP-MT-OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
