"""Run under ``torchrun --nproc_per_node=2``: the PE CAD recipe's smoke preset under DDP, its samplers and parameters
watched. Usage: ``ddp_check.py OUT_DIR DATA_DIR``.

Checks made on every rank while the process group is up (each rank prints DDP-PE-OK once the whole recipe finished
and every check passed):

* **pretraining** — before the recipe, a small ViT (no BatchNorm) pretrained ``supervised`` and ``ssl:simclr`` on 2
  ranks equals the same pretraining in one process (losses and weights), on a set whose last batch has a single
  slice (rank 1's share is empty: it runs one slice at weight 0); in the recipe, every pretraining's two ranks end
  with the same weights and draw complementary shares of each batch;
* **stage 1** — at the end of every unit (its ``count_parameters`` call) the ranks hold identical parameters, and
  at every step their draws are disjoint, in rank order make up the global batch (the same on both ranks), and
  within an epoch no slice is drawn twice;
* **stage 2** — the ranks hold identical parameters after every unit; in every epoch each training exam is drawn by
  exactly one rank, once.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from thrifty.core import distributed
from thrifty.core.registry import load_config
from thrifty.methods.pe_cad import pretrain as pre
from thrifty.methods.pe_cad import train as recipe
from thrifty.methods.pe_cad.stage1 import ShardedBatchSampler, build_backbone, shard_rows

failures: list[str] = []
checked: dict[str, int] = {"pretrain": 0, "stage1": 0, "stage2": 0}
samplers: list[RecordingSampler] = []
stage2: dict[str, object] = {"train_batch": None, "n": 0, "batch_size": 0, "draws": []}


class RecordingSampler(ShardedBatchSampler):
    """The recipe's sampler, remembering what it handed out at every step."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.drawn: list[tuple[int, list[int]]] = []
        samplers.append(self)

    def batch_at(self, step: int) -> torch.Tensor:
        batch = super().batch_at(step)
        self.drawn.append((step, batch.tolist()))
        return batch


def gathered_objects(obj: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def same_parameters(model: torch.nn.Module, what: str) -> None:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    if not all(torch.equal(parts[0], q) for q in parts[1:]):
        failures.append(f"{what}: the ranks' parameters differ after DDP training")


def check_sampler(s: ShardedBatchSampler, what: str) -> None:
    ranks = gathered_objects(s.drawn)
    world = dist.get_world_size()
    if any(len(r) != len(ranks[0]) for r in ranks) or not ranks[0]:
        failures.append(f"{what}: the ranks drew {[len(r) for r in ranks]} batches")
        return
    per_epoch = -(-s.n // s.batch_size)
    seen: dict[int, set[int]] = {}
    for k, (step, _) in enumerate(ranks[0]):
        batch = s.global_batch(step).tolist()
        shares = []
        for r in range(world):
            rows = shard_rows(len(batch), rank=r, world_size=world)
            drawn = ranks[r][k][1]
            expected = batch[rows] if rows.stop > rows.start else batch[:1]
            if drawn != expected:
                failures.append(f"{what}: rank {r} drew {drawn} at step {step}, its share of {batch} is {expected}")
            shares.append(batch[rows])
        flat = [i for share in shares for i in share]
        if flat != batch or len(set(flat)) != len(flat):
            failures.append(f"{what}: at step {step} the ranks' shares {shares} do not make up the batch {batch}")
        epoch = seen.setdefault(step // per_epoch, set())
        if epoch & set(flat):
            failures.append(f"{what}: slice(s) {sorted(epoch & set(flat))} drawn twice in one epoch")
        epoch |= set(flat)
    if all(ranks[0][k][1] == ranks[1][k][1] for k in range(len(ranks[0]))):
        failures.append(f"{what}: both ranks drew the same batches")


def check_stage2_draws(what: str) -> None:
    ranks = gathered_objects(stage2["draws"])
    n, bs = int(stage2["n"]), int(stage2["batch_size"])
    per_epoch = -(-n // bs)
    if any(len(r) != len(ranks[0]) for r in ranks) or len(ranks[0]) % per_epoch:
        failures.append(f"{what}: the ranks ran {[len(r) for r in ranks]} steps, {per_epoch} per epoch expected")
        return
    for start in range(0, len(ranks[0]), per_epoch):
        drawn = []
        for k in range(start, start + per_epoch):
            # a share is real unless the batch had fewer exams than ranks (then the last ranks run one at weight 0)
            m = min(bs, n - (k - start) * bs)
            for r in range(len(ranks)):
                rows = shard_rows(m, rank=r, world_size=len(ranks))
                if rows.stop > rows.start:
                    drawn += ranks[r][k]
        if sorted(drawn) != list(range(n)):
            failures.append(f"{what}: epoch {start // per_epoch + 1} drew exams {sorted(drawn)}, not each once")
    stage2["draws"] = []


def check_pretraining_equals_one_process() -> None:
    """A ViT (no BatchNorm) pretrained on 2 ranks equals the same pretraining in one process."""
    gen = torch.Generator().manual_seed(5)
    slices = torch.rand(17, 3, 32, 32, generator=gen)  # batches of 8, 8 and 1: rank 1's last share is empty
    labels = pre.slice_level_labels([9, 8], num_bins=3)
    kw = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
    for init, extra in (("supervised", {"labels": labels, "num_classes": 3}), ("ssl:simclr", {"proj_dim": 8})):
        runs = []
        for world in (1, dist.get_world_size()):
            model = build_backbone("small_vit", image_size=32, seed=0, **kw)
            place = {"rank": dist.get_rank(), "world_size": world} if world > 1 else {}
            runs.append(pre.initialise(model, init, slices=slices, steps=3, batch_size=8, lr=1e-3, seed=1,
                                       **extra, **place))  # fmt: skip
        (one, many), what = runs, f"pretraining {init}"
        if not torch.allclose(torch.tensor(one.losses), torch.tensor(many.losses), rtol=1e-4, atol=1e-5):
            failures.append(f"{what}: losses on 2 ranks {many.losses} differ from one process's {one.losses}")
        worst = max(float((one.state_dict[k].float() - many.state_dict[k].float()).abs().max()) for k in one.state_dict)
        if worst > 1e-4:
            failures.append(f"{what}: weights on 2 ranks differ from one process's by up to {worst:.2e}")
    samplers.clear()


def main() -> int:
    out, data = sys.argv[1], sys.argv[2]
    distributed.init(torch.device("cpu"))  # the recipe joins this process group and shuts it down at its end
    check_pretraining_equals_one_process()
    real_count, real_snapshot, real_take, real_stage2 = recipe.count_parameters, pre._snapshot, recipe.take, \
        recipe.stage2_unit  # fmt: skip

    def count_spy(model: torch.nn.Module) -> int:  # every rank, at the end of every stage-1 and stage-2 unit
        if stage2["train_batch"] is not None:
            check_stage2_draws("stage 2")
            same_parameters(model, "stage 2")
            checked["stage2"] += 1
        else:
            check_sampler(samplers[-1], "stage 1")
            same_parameters(model, "stage 1")
            checked["stage1"] += 1
        return real_count(model)

    def snapshot_spy(model: torch.nn.Module) -> dict[str, torch.Tensor]:  # every rank, at the end of a pretraining
        check_sampler(samplers[-1], "pretraining")
        same_parameters(model, "pretraining")
        checked["pretrain"] += 1
        return real_snapshot(model)

    def take_spy(batch, idx):
        if batch is stage2["train_batch"]:
            stage2["draws"].append(idx.tolist())
        return real_take(batch, idx)

    def stage2_spy(kind, seed, features_arm, cfg, feats, *args, **kwargs):
        stage2.update(train_batch=feats["batch/train"], n=len(feats["train"]), batch_size=cfg.stage2.batch_size)
        try:
            return real_stage2(kind, seed, features_arm, cfg, feats, *args, **kwargs)
        finally:
            stage2["train_batch"] = None

    recipe.ShardedBatchSampler = pre.ShardedBatchSampler = RecordingSampler
    recipe.count_parameters, pre._snapshot, recipe.take, recipe.stage2_unit = count_spy, snapshot_spy, take_spy, \
        stage2_spy  # fmt: skip
    args = [f"out_dir={out}", f"data_dir={data}", "progress=false", "num_threads=1", "seeds=[0]"]
    cfg = load_config("pe_cad", "smoke", args)[1]
    results = recipe.train(cfg)  # shuts the process group down at the end
    arms, kinds = cfg.stage1.arms, cfg.stage2.kinds
    pretrained = sum(1 for a in arms if not a.endswith("-random"))
    if checked != {"pretrain": pretrained, "stage1": len(arms), "stage2": len(kinds)}:
        failures.append(f"the unit checks ran {checked}, expected {pretrained} / {len(arms)} / {len(kinds)}")
    if results["cost"]["world_size"] != 2:
        failures.append(f"world size {results['cost']['world_size']}")
    if failures:
        print("FAILED: " + "; ".join(failures), flush=True)
        return 1
    print("DDP-PE-OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
