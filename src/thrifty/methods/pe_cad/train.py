"""The PE CAD recipe: slice classifiers (CNN vs ViT, scratch vs pretrained) and exam models (CC vs MIL) on CTPA.

Islam et al., *Seeking an Optimal Approach for Computer-Aided Pulmonary Embolism Detection* (arXiv 2109.07029;
official code ``Nahid1992/CAD_PE``). ``train`` reads top to bottom:

1. **data** — windowed, lung-cropped slices of the train / val / test exams, split by study (:mod:`.data`), held
   in memory (``data.store: memory``) or preprocessed once into one file per exam and read lazily (``exams``,
   :mod:`.exam_store`; sharded over the ranks under ``torchrun``);
2. **pretraining** — for each stage-1 arm that is not randomly initialised, one backbone pretrained on the
   training slices without their PE labels (``supervised`` on the slice's cranio-caudal level, ``ssl:simclr``,
   ``ssl:genesis``), cached under the data directory by the digest of its settings and shared by every seed, as one
   ImageNet checkpoint is in the paper;
3. **stage 1** — every arm × seed fine-tunes on ``pe_present_on_image`` (BCE, Adam 4e-4, linear decay, the
   release's augmentation); the step with the best validation image AUC is kept; the test split is read once;
4. **features** — per seed, the stage-1 arm with the best validation image AUC (``stage2.features: best``) gives
   the penultimate features of every slice of every exam, cached in its unit directory;
5. **stage 2** — every kind × seed on those features: ``cc`` (the release's BiGRU with the slice term of the RSNA
   loss), ``mil_attention`` / ``mil_max`` (exam labels only, ``image_weight`` 0: their image AUC is not
   applicable), optionally ``evit``; the epoch with the best validation mean exam AUC is kept; test read once;
6. **eval** — the trivial baseline (defect fraction per slice, its maximum per exam), the card's claims paired over
   seeds, tables and figures.

Every unit (``units/stage1/<arm>/seed<k>``, ``units/stage2/<kind>/seed<k>``) writes ``result.json`` last, so a
rerun reuses finished units and trains only what is missing.

**Scale-out.** The same ``train`` runs under ``torchrun --nproc_per_node=W`` (DDP; gloo on CPU, NCCL on CUDA):

* *batches* — every batch size in the config is the **effective (global) batch = per-rank batch x W**; each rank
  takes its contiguous share of every global batch (:func:`~.stage1.shard_rows`), the global batches being the
  ones one process draws from the same seed, and the learning rates stay as configured: a run on W ranks trains on
  the samples one process would, and ``batch_size`` (with the learning rate, by whatever rule one prefers) is raised
  explicitly to use more ranks for a larger batch;
* *pretraining* (:mod:`.pretrain`) — every rank trains on its shard of each batch with gradients averaged, SimCLR's
  projections gathered with their gradients; rank 0 writes the cache;
* *stage 1* — ``DistributedDataParallel`` over slices (:class:`~.stage1.ShardedBatchSampler`; the augmentation
  draws of the whole batch are made on every rank and each applies its rows', so the ranks augment as one process
  does); BatchNorm normalises with each rank's batch statistics, or with the global batch's under
  ``stage1.sync_bn: true`` (``SyncBatchNorm``, CUDA only), and its running statistics are averaged over ranks before
  every evaluation; validation and test slices are scored sharded over ranks and gathered, so every rank selects
  the same step;
* *features* — exams are dealt round-robin to the ranks; each writes one safetensors file per exam
  (``features/<split>/<study>.safetensors``) and rank 0 an ``index.json`` per split once all are there; every
  process reads the per-exam files back (:func:`~.data.load_feature_split`, one code path for 1 or W processes) or,
  with ``data.store: exams``, only their labels (:func:`~.data.open_feature_split`);
* *stage 2* — ``DistributedDataParallel`` over exams: each rank takes its share of every batch of exams, its loss
  weighted by the global batch's normaliser (the RSNA loss is a weighted sum over the batch divided by the batch's
  sum of weights) so the averaged gradient is one process's on the whole batch; evaluation sharded and gathered;
  with ``data.store: exams`` a rank reads the features of its share of each batch and of each evaluation only
  (:class:`ExamBatches`), so its memory does not grow with the split;
* only rank 0 writes files (unit files, metrics, access log, results, figures); the others wait at barriers.

Without BatchNorm (the ViT, every stage-2 model) W ranks reproduce one process to floating-point rounding; a CNN
differs by BatchNorm's per-rank batch statistics only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import cache, distributed
from thrifty.core.claims import Claim, format_mean_ci, paired_claim, value_claim, works_claim
from thrifty.core.config import ConfigError
from thrifty.core.distributed import DistInfo
from thrifty.core.metrics import roc_auc
from thrifty.core.run import (
    MetricsLog,
    data_root,
    finish_run,
    new_summary,
    open_run,
    progress,
    seed_everything,
    write_json,
)
from thrifty.core.splits import AccessLog
from thrifty.data.ctpa_synth import DEFECT_FRACTION_GRID, EXAM_LABELS
from thrifty.methods.pe_cad import figures
from thrifty.methods.pe_cad.config import BACKBONE_FAMILIES, AugmentConfig, PECadConfig, parse_arm
from thrifty.methods.pe_cad.data import (
    FEATURE_FORMAT,
    Exams,
    FeatureFiles,
    Features,
    GuardedFeatures,
    PECadData,
    exam_feature_digest,
    exam_feature_name,
    feature_index,
    load_feature_split,
    open_feature_split,
    prepare_data,
    save_exam_features,
    stack_view,
    write_feature_index,
)
from thrifty.methods.pe_cad.exam_store import after_shards, dealt, remove_stale_temps
from thrifty.methods.pe_cad.losses import LossParts, rsna_weighted_bce, rsna_weighted_log_loss
from thrifty.methods.pe_cad.pretrain import initialise, slice_level_labels
from thrifty.methods.pe_cad.stage1 import (
    ShardedBatchSampler,
    augment,
    build_backbone,
    count_parameters,
    gather_shards,
    linear_warmup_decay,
    shard_rows,
)
from thrifty.methods.pe_cad.stage2 import (
    Stage2Batch,
    Stage2Output,
    build_stage2,
    build_stage2_optimizer,
    collate_exams,
    unfit_predictions,
)

log = logging.getLogger(__name__)

RECIPE = "pe_cad"
Config = PECadConfig
PAPER = {
    "title": "Seeking an Optimal Approach for Computer-Aided Pulmonary Embolism Detection",
    "arxiv": "2109.07029",
}
TRIVIAL = "defect fraction per slice (training-free); exam score = its maximum"
PRETRAIN_VERSION = 1
#: the parameters of a stage-1 classification head: a fresh one per fine-tuning run, never pretrained
HEAD_PREFIXES = ("head.", "vit.classification_head.")
#: stage-2 kinds that train the per-slice head (the others train on exam labels only)
SLICE_TRAINED = ("cc", "evit")
PRETRAIN_METHODS = {"supervised": "supervised", "ssl:simclr": "simclr", "ssl:genesis": "genesis"}
SHORT_LABELS = ("negative", "indeterminate", "left", "right", "central", "RV/LV≥1", "RV/LV<1", "chronic",
                "acute+chronic")  # fmt: skip


# --- small helpers ----------------------------------------------------------------------------------------


def arm_dirname(arm: str) -> str:
    return arm.replace(":", "_")


def stage1_dir(run_dir: Path, arm: str, seed: int) -> Path:
    return run_dir / "units" / "stage1" / arm_dirname(arm) / f"seed{seed}"


def stage2_dir(run_dir: Path, kind: str, seed: int) -> Path:
    return run_dir / "units" / "stage2" / kind / f"seed{seed}"


def auc_points(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC in points (0-100); None when the labels hold one class only (the AUC is undefined)."""
    y = np.asarray(labels).astype(np.int64).ravel()
    if y.size == 0 or y.min() == y.max():
        return None
    return 100.0 * roc_auc(np.asarray(scores, dtype=np.float64).ravel(), y)


def _finite(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _score(value: float | None) -> float:
    """A selection score: undefined values never win."""
    return value if value is not None and math.isfinite(value) else -math.inf


def backbone_spec(cfg: PECadConfig, family: str) -> tuple[str, dict[str, Any]]:
    """The ``build_backbone`` name and keyword arguments of a backbone family."""
    s1 = cfg.stage1
    name = s1.cnn if family == "cnn" else s1.vit
    if name == "small_cnn":
        return name, dataclasses.asdict(s1.small_cnn)
    if name == "small_vit":
        return name, dataclasses.asdict(s1.small_vit)
    return name, {}


def build_stage1_model(cfg: PECadConfig, family: str, seed: int) -> nn.Module:
    name, kwargs = backbone_spec(cfg, family)
    return build_backbone(name, image_size=cfg.stage1.image_size, seed=seed, **kwargs)


def stage1_augmentation(cfg: PECadConfig) -> AugmentConfig | None:
    """The stage-1 fine-tuning augmentation (``stage1.augment``); None when disabled."""
    return augmentation_from(cfg.stage1.augment)


def augmentation_from(a: AugmentConfig) -> AugmentConfig | None:
    """A configured augmentation (``stage1.augment`` or ``pretrain.augment``), or None when it is disabled."""
    return a if a.enabled else None


def _place(info: DistInfo | None) -> tuple[int, int]:
    return (info.rank, info.world_size) if info is not None else (0, 1)


@torch.no_grad()
def score_slices(
    model: nn.Module,
    exams: Exams,
    *,
    batch_size: int,
    device: torch.device,
    features: bool = False,
    info: DistInfo | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stage-1 PE probabilities (N,) of every slice of ``exams`` in eval mode, no augmentation, and with
    ``features`` their penultimate features (N, D) (``save_features1.py``). Under DDP (``info``) each rank scores
    its contiguous share of the slices and every rank gets all N, gathered in order."""
    rank, world = _place(info)
    mine = shard_rows(exams.num_slices, rank=rank, world_size=world)
    was = model.training
    model.eval()
    probs, feats = [], []
    for i in range(mine.start, mine.stop, batch_size):
        f = model.features(exams.stacks(slice(i, min(i + batch_size, mine.stop))).to(device))
        probs.append(torch.sigmoid(model.classify(f)).float().cpu())
        if features:
            feats.append(f.float().cpu())
    model.train(was)
    p = torch.cat(probs) if probs else torch.zeros(0)
    fs = torch.cat(feats) if feats else torch.zeros(0, getattr(model, "feature_dim", 0))
    if world > 1:
        p = gather_shards(p.to(device), exams.num_slices, rank=rank, world_size=world).cpu()
        if features:
            fs = gather_shards(fs.to(device), exams.num_slices, rank=rank, world_size=world).cpu()
    return p.numpy(), (fs.numpy() if features and exams.num_slices else None)


@torch.no_grad()
def exam_features(
    model: nn.Module, exams: Exams, exam: int, *, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exam's penultimate features (S, D) and PE probabilities (S,) in eval mode, no augmentation, batched
    over its S slices (the per-exam unit of the sharded extraction)."""
    a, b = int(exams.offsets[exam]), int(exams.offsets[exam + 1])
    was = model.training
    model.eval()
    feats, probs = [], []
    for i in range(a, b, batch_size):
        f = model.features(exams.stacks(slice(i, min(i + batch_size, b))).to(device))
        feats.append(f.float().cpu())
        probs.append(torch.sigmoid(model.classify(f)).float().cpu())
    model.train(was)
    return torch.cat(feats), torch.cat(probs)


# --- pretraining ------------------------------------------------------------------------------------------


def pretrain_settings(cfg: PECadConfig, family: str, init: str, data: PECadData) -> dict[str, Any]:
    """What a pretrained backbone depends on (its cache key)."""
    name, kwargs = backbone_spec(cfg, family)
    pre = cfg.pretrain
    method = getattr(pre, PRETRAIN_METHODS[init])
    extra: dict[str, Any] = {}
    if init == "supervised":
        extra = {"bins": pre.supervised_bins, "augment": dataclasses.asdict(pre.augment)}
    elif init == "ssl:simclr":
        extra = {"temperature": pre.temperature, "proj_dim": pre.proj_dim,
                 "augment": dataclasses.asdict(pre.augment)}  # fmt: skip
    return {"backbone": name, "backbone_kwargs": kwargs, "image_size": cfg.stage1.image_size, "init": init,
            "steps": method.steps, "batch_size": method.batch_size, "lr": method.lr, "seed": pre.seed,
            "data": data.digest, "version": PRETRAIN_VERSION, **extra}  # fmt: skip


def pretrained_backbone(
    cfg: PECadConfig,
    family: str,
    init: str,
    data: PECadData,
    root: Path,
    device: torch.device,
    *,
    info: DistInfo | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone state pretrained with ``init`` on the training slices (labels unused, except the non-PE
    source task of ``supervised``) and its record; read from the cache when it holds these settings. Under DDP
    (``info``) every rank pretrains on its shard of each (global, ``pretrain.<method>.batch_size``) batch, rank 0
    writes the cache and every rank returns the same state."""
    rank, world = _place(info)
    settings = pretrain_settings(cfg, family, init, data)
    directory = cache.cache_dir(root, "pe_cad-pretrain", settings)
    weights, record_file = directory / "backbone.safetensors", directory / "pretrain.json"
    cached = weights.is_file() and record_file.is_file()
    if world > 1:  # every rank takes the same branch (a rank that saw no cache makes all of them pretrain)
        cached = bool(distributed.all_reduce_min_int(int(cached)))
    if cached:
        return load_file(str(weights)), json.loads(record_file.read_text()) | {"cached": True}
    log.info("pretraining %s-%s once (cached in %s)", family, init, directory)
    pre = cfg.pretrain
    method = getattr(pre, PRETRAIN_METHODS[init])
    backbone = build_stage1_model(cfg, family, seed=pre.seed).to(device)
    slices = stack_view(data.train)  # (N, 3, H, W) gathered per batch: the unlabelled training slices
    kwargs: dict[str, Any] = {}
    labels = None
    if init == "supervised":
        labels = slice_level_labels(data.train.slice_counts.tolist(), num_bins=pre.supervised_bins)
        kwargs = {"num_classes": pre.supervised_bins, "augmentation": augmentation_from(pre.augment)}
    elif init == "ssl:simclr":
        kwargs = {"temperature": pre.temperature, "proj_dim": pre.proj_dim,
                  "augmentation": augmentation_from(pre.augment)}  # fmt: skip
    seed_everything(pre.seed)
    t0 = time.perf_counter()
    if world > 1:
        kwargs |= {"rank": rank, "world_size": world}
    result = initialise(backbone, init, slices=slices, labels=labels, steps=method.steps,
                        batch_size=method.batch_size, lr=method.lr, seed=pre.seed, **kwargs)  # fmt: skip
    seconds = time.perf_counter() - t0
    k = max(1, min(10, len(result.losses) // 4))
    record = {"family": family, "init": init, "settings": settings, "seconds": seconds, "steps": method.steps,
              "loss_first": float(np.mean(result.losses[:k])), "loss_last": float(np.mean(result.losses[-k:])),
              "losses": [round(v, 5) for v in result.losses]}  # fmt: skip
    state = {key: v.detach().cpu().contiguous() for key, v in result.state_dict.items()}
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".backbone.{os.getpid()}.tmp"
        save_file(state, str(tmp))
        tmp.replace(weights)
        write_json(record_file, record)
    if world > 1:
        distributed.barrier()
    return state, record | {"cached": False}


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a pretrained backbone into ``model``, keeping ``model``'s own (freshly drawn) classification head."""
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    missing = sorted(k for k in own if k not in body and not k.startswith(HEAD_PREFIXES))
    if missing:
        raise ValueError(f"the pretrained state lacks {missing[:5]} (a different backbone?)")
    model.load_state_dict({**own, **body})


# --- stage 1 ----------------------------------------------------------------------------------------------


def stage1_unit(
    arm: str,
    seed: int,
    cfg: PECadConfig,
    data: PECadData,
    run_dir: Path,
    metrics: MetricsLog,
    device: torch.device,
    pretrained: dict[str, dict[str, torch.Tensor]],
    *,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """Fine-tune one stage-1 arm with one seed; keep the step with the best validation image AUC; test once.

    DDP (``info`` with W > 1): ``DistributedDataParallel`` over slices. ``stage1.batch_size`` is the effective
    batch (per-rank batch x W): each rank takes its shard of every global batch (:class:`ShardedBatchSampler`) and
    its rows of the batch's augmentation draws, its mean loss weighted by its share, so the averaged gradient is one
    process's on the global batch and ``stage1.lr`` applies unchanged. BatchNorm running statistics are averaged
    over ranks before every evaluation; with ``stage1.sync_bn`` (CUDA) BatchNorm is ``SyncBatchNorm`` and normalises
    with the global batch's statistics (:func:`with_sync_bn`). Validation and test are scored sharded and gathered,
    so all ranks select the same step; rank 0 writes the unit's files."""
    rank, world = _place(info)
    is_main = rank == 0
    unit = f"stage1/{arm}/seed{seed}"
    unit_dir = stage1_dir(run_dir, arm, seed)
    done = unit_dir / "result.json"
    if cfg.resume and done.exists():
        log.info("%s: finished earlier, reusing %s", unit, done)
        return json.loads(done.read_text())
    metrics.truncate(unit, 0)
    family, init = parse_arm(arm)
    s1 = cfg.stage1
    seed_everything(seed)
    model = build_stage1_model(cfg, family, seed).to(device)
    if init != "random":
        load_pretrained(model, pretrained[arm])
    model = with_sync_bn(model, enabled=s1.sync_bn, world_size=world, device=device)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=s1.lr)
    sched = linear_warmup_decay(opt, warmup_steps=s1.warmup_steps, total_steps=s1.steps)
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    aug = stage1_augmentation(cfg)
    train = data.train
    labels = torch.from_numpy(train.slice_labels.astype(np.float32))
    sampler = ShardedBatchSampler(n=train.num_slices, batch_size=s1.batch_size, steps=s1.steps, generator=gen,
                                  rank=rank, world_size=world)  # fmt: skip
    best: dict[str, Any] = {"score": -math.inf, "step": 0, "auc": None, "state": None}
    curve, losses, window = [], [], []
    t_train = 0.0
    model.train()
    with progress(s1.steps, unit, enabled=cfg.progress and is_main) as advance:
        for step in range(1, s1.steps + 1):
            t0 = time.perf_counter()
            idx = sampler.batch_at(step - 1)
            x = train.stacks(idx).to(device)
            if aug is not None:  # the draws of the whole global batch; this rank's rows
                x = augment(x, generator=gen, config=aug, rows=sampler.draw_rows(step - 1),
                            total=len(sampler.global_batch(step - 1)))  # fmt: skip
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=s1.amp):
                logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels[idx].to(device))
            loss = loss * sampler.loss_scale(step - 1)  # 1.0 in one process; a rank's share of the global mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            t_train += time.perf_counter() - t0
            losses.append(float(distributed.all_reduce_mean(loss.detach()) if world > 1 else loss.detach()))
            window.append(losses[-1])
            if step % cfg.log_every == 0 or step == s1.steps:
                metrics.log({"unit": unit, "step": step, "loss": float(np.mean(window)), "lr": sched.get_last_lr()[0]})
                advance(len(window), loss=float(np.mean(window)))
                window = []
            if step % s1.eval_every == 0 or step == s1.steps:
                if world > 1:
                    distributed.sync_batchnorm_stats(model)
                val = data.val.get("selection", unit)
                probs, _ = score_slices(model, val, batch_size=s1.eval_batch_size, device=device, info=info)
                auc = auc_points(probs, val.slice_labels)
                curve.append({"step": step, "val_image_auc": auc})
                metrics.log({"unit": unit, "step": step, "split": "val", "val_image_auc": auc})
                if best["state"] is None or _score(auc) > best["score"]:
                    best = {"score": _score(auc), "step": step, "auc": auc,
                            "state": copy.deepcopy(model.state_dict())}  # fmt: skip
    model.load_state_dict(best["state"])
    k = max(1, min(10, len(losses) // 4))
    result: dict[str, Any] = {
        "arm": arm, "seed": seed, "backbone": backbone_spec(cfg, family)[0], "init": init, "steps": s1.steps,
        "curve": curve, "best_step": best["step"], "val_image_auc": best["auc"],
        "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
        "train_seconds": t_train, "train_slices_per_s": s1.steps * s1.batch_size / max(t_train, 1e-9),
        "params": count_parameters(model),
    }  # fmt: skip
    if cfg.final_test:  # the unit's only read of the test split
        test = data.test.get("final_test", unit)
        probs, _ = score_slices(model, test, batch_size=s1.eval_batch_size, device=device, info=info)
        result["test_image_auc"] = auc_points(probs, test.slice_labels)
    if world > 1:
        result["world_size"] = world
    if is_main:
        unit_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(unit_dir / "model.safetensors"))  # SyncBatchNorm keeps BatchNorm's keys
        name, kwargs = backbone_spec(cfg, family)
        write_json(unit_dir / "card.json", {
            "recipe": RECIPE, "paper": PAPER, "arm": arm, "seed": seed, "backbone": name, "backbone_kwargs": kwargs,
            "image_size": s1.image_size, "window": [cfg.data.window_level, cfg.data.window_width],
            "input": "slices i-1, i, i+1 windowed to [0, 1], cropped to the exam's lung box, resized (bilinear)",
            "output": "features(x): penultimate features; forward(x): the PE logit of the centre slice",
        })  # fmt: skip
        write_json(done, result)
    if world > 1:
        distributed.barrier()
    return result


def check_sync_bn(cfg: PECadConfig, info: DistInfo) -> None:
    """ConfigError when ``stage1.sync_bn`` asks for SyncBatchNorm on several ranks that are not on CUDA (torch's
    SyncBatchNorm raises on CPU tensors); checked before anything trains."""
    if cfg.stage1.sync_bn and info.world_size > 1 and info.device.type != "cuda":
        raise ConfigError(
            f"config key 'stage1.sync_bn' needs CUDA devices (torch's SyncBatchNorm does not run on "
            f"{info.device.type}); set stage1.sync_bn=false for {info.world_size} {info.device.type} ranks"
        )


def with_sync_bn(model: nn.Module, *, enabled: bool, world_size: int, device: torch.device) -> nn.Module:
    """``model`` with its BatchNorm layers converted to ``torch.nn.SyncBatchNorm`` when ``enabled`` and more than
    one rank trains (their parameters and buffers carried over, their state-dict keys unchanged); ``model`` itself
    otherwise. ConfigError for several non-CUDA ranks (:func:`check_sync_bn`)."""
    if not enabled or world_size == 1:
        return model
    if device.type != "cuda":
        raise ConfigError(f"config key 'stage1.sync_bn' needs CUDA devices, got {device.type} with {world_size} ranks")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def choose_features_arm(cfg: PECadConfig, stage1: dict[str, dict[int, dict]], seed: int) -> str:
    """The stage-1 arm whose features feed stage 2 for ``seed``: ``stage2.features``, or with ``best`` the arm
    with the highest validation image AUC for that seed (ties: the first in ``stage1.arms``). Validation only."""
    if cfg.stage2.features != "best":
        return cfg.stage2.features
    missing = [arm for arm in cfg.stage1.arms if seed not in stage1.get(arm, {})]
    if missing:
        raise ConfigError(
            f"choosing stage-2 features for seed {seed} needs every stage-1 arm of that seed; missing "
            f"{missing} (run the stage1 stage first)"
        )
    return max(cfg.stage1.arms, key=lambda arm: _score(stage1[arm][seed]["val_image_auc"]))


def feature_splits(cfg: PECadConfig) -> tuple[str, ...]:
    return ("train", "val", "test") if cfg.final_test else ("train", "val")


def features_dir(run_dir: Path, arm: str, seed: int) -> Path:
    """Where a stage-1 unit's per-exam features live: ``<unit>/features/<split>/<study>.safetensors``."""
    return stage1_dir(run_dir, arm, seed) / "features"


def features_unit(
    arm: str,
    seed: int,
    cfg: PECadConfig,
    data: PECadData,
    run_dir: Path,
    device: torch.device,
    *,
    info: DistInfo | None = None,
) -> dict[str, Features]:
    """The penultimate features and PE probabilities of every slice of every exam (train, val and, with
    ``final_test``, test) under the stage-1 unit's chosen weights (``save_features1.py``), one safetensors file per
    exam in ``features/<split>/`` of the unit directory, then read back per split: whole
    (:func:`~.data.load_feature_split`) with ``data.store: memory``, labels only with ``exams``
    (:func:`~.data.open_feature_split`: stage 2 reads each exam's features when a batch needs them).

    Caching: a split whose ``index.json`` records these settings (and whose exam files are all there) is read without
    touching the model or the held-out data; otherwise the missing exams are extracted — an exam file of these
    settings left by an interrupted run is kept — and the index is written last. DDP (``info``): the exams of a
    split are dealt round-robin to the ranks (rank r extracts exams r, r + W, ...), each rank writes its exams'
    files, rank 0 writes the index once every rank is done (:func:`~.exam_store.after_shards`), and every rank opens
    the split."""
    rank, world = _place(info)
    unit = f"features/{arm}/seed{seed}"
    unit_dir = stage1_dir(run_dir, arm, seed)
    if not (unit_dir / "model.safetensors").is_file():
        raise ConfigError(f"no stage-1 weights in {unit_dir} (run the stage1 stage first)")
    family, _ = parse_arm(arm)
    fdir = features_dir(run_dir, arm, seed)
    settings = {"arm": arm, "seed": seed, "data": data.digest, "format": FEATURE_FORMAT}
    digest = cache.settings_digest(settings)
    model: nn.Module | None = None
    extracted = 0
    t0 = time.perf_counter()
    for name in feature_splits(cfg):
        sdir = fdir / name
        index = feature_index(sdir)
        done = index is not None and index.get("settings") == settings
        if world > 1:  # every rank takes the same branch
            done = bool(distributed.all_reduce_min_int(int(done)))
        if done:
            continue
        es = data.train if name == "train" else (data.val if name == "val" else data.test).get("features", unit)
        mine = dealt(es.num_exams, rank=rank, world_size=world)
        remove_stale_temps(sdir, {exam_feature_name(es.study_ids[e]) for e in mine})  # left by killed writes
        for e in mine:
            path = sdir / exam_feature_name(es.study_ids[e])
            if exam_feature_digest(path) == digest:
                continue
            if model is None:
                model = build_stage1_model(cfg, family, seed)
                load_model(model, str(unit_dir / "model.safetensors"))
                model.to(device)
            feats, probs = exam_features(model, es, e, batch_size=cfg.stage1.eval_batch_size, device=device)
            a, b = int(es.offsets[e]), int(es.offsets[e + 1])
            save_exam_features(path, features=feats, probs=probs, slice_labels=es.slice_labels[a:b],
                               exam_labels=es.exam_labels[e], study_id=str(es.study_ids[e]), digest=digest)  # fmt: skip
            extracted += 1
        write_index = partial(write_feature_index, sdir, split=name, study_ids=es.study_ids.tolist(),
                              settings=settings)  # fmt: skip
        after_shards(write_index, rank=rank, world_size=world)
    seconds = time.perf_counter() - t0
    if world > 1:  # the most exams any rank extracted
        extracted = -distributed.all_reduce_min_int(-extracted)
    timing = fdir / "timing.json"
    if rank == 0 and (extracted or not timing.exists()):
        write_json(timing, {"seconds": seconds, "world_size": world})
    if world > 1:
        distributed.barrier()
    load = load_feature_split if cfg.data.store == "memory" else open_feature_split
    return {name: load(fdir / name) for name in feature_splits(cfg)}


# --- stage 2 ----------------------------------------------------------------------------------------------


class CollatedExams:
    """A split's stage-2 input collated once, in memory (``data.store: memory``); :meth:`take` selects exams."""

    def __init__(self, batch: Stage2Batch) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return int(self.batch.x.shape[0])

    @property
    def in_dim(self) -> int:
        """F = 3D: the features and their two differences (``stage2.prepare_exam``)."""
        return int(self.batch.x.shape[-1])

    def take(self, idx: torch.Tensor) -> Stage2Batch:
        return Stage2Batch(**{f.name: getattr(self.batch, f.name)[idx] for f in dataclasses.fields(self.batch)})


class ExamBatches:
    """A split's stage-2 input collated on demand (``data.store: exams``): :meth:`take` reads exams ``idx`` from
    their feature files and collates them, so a rank reads only its share of each batch and of each evaluation."""

    def __init__(self, files: FeatureFiles, cfg: PECadConfig) -> None:
        self.files, self.cfg = files, cfg

    def __len__(self) -> int:
        return len(self.files)

    @property
    def in_dim(self) -> int:
        """F = 3D: the features and their two differences (``stage2.prepare_exam``)."""
        return 3 * self.files.feature_dim

    def take(self, idx: torch.Tensor) -> Stage2Batch:
        s2 = self.cfg.stage2
        return collate_exams(self.files.exams(idx.tolist()), length=s2.seq_len, label_mode=s2.label_mode,
                             long_mode=s2.long_mode)  # fmt: skip


#: a split's stage-2 input: ``len`` exams, ``in_dim`` features per step, ``take(idx)`` a collated batch of them
Batches = CollatedExams | ExamBatches


def collate(fs: Features, cfg: PECadConfig) -> Batches:
    """A split's stage-2 input: every exam collated now (:class:`~.data.FeatureSet` -> :class:`CollatedExams`), or
    on demand per batch (:class:`~.data.FeatureFiles` -> :class:`ExamBatches`)."""
    if isinstance(fs, FeatureFiles):
        return ExamBatches(fs, cfg)
    s2 = cfg.stage2
    return CollatedExams(collate_exams(fs.exams(), length=s2.seq_len, label_mode=s2.label_mode,
                                       long_mode=s2.long_mode))  # fmt: skip


def take(batch: Batches, idx: torch.Tensor) -> Stage2Batch:
    """Exams ``idx`` of a split's stage-2 input as one collated batch."""
    return batch.take(idx)


@torch.no_grad()
def evaluate_stage2(
    model: nn.Module, fs: Features, batch: Batches, cfg: PECadConfig, *, slice_trained: bool,
    device: torch.device, info: DistInfo | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Exam AUC per label (points) and their mean over the labels both classes of which occur; with a trained
    slice head also the image AUC of its slice probabilities resized back to each exam's slices (as the release
    evaluates) and the RSNA weighted log loss. Under DDP (``info``) each rank runs its contiguous share of the exams
    and the logits are gathered, so every rank computes the same metrics."""
    rank, world = _place(info)
    mine = shard_rows(len(fs), rank=rank, world_size=world)
    was = model.training
    model.eval()
    exam_logits = [torch.zeros(0, fs.exam_labels.shape[1])]
    slice_logits = [torch.zeros(0, cfg.stage2.seq_len)]
    for i in range(mine.start, mine.stop, 256):
        b = take(batch, torch.arange(i, min(i + 256, mine.stop))).to(device)
        out = model(b.x, b.valid)
        exam_logits.append(out.exam_logits.float().cpu())
        slice_logits.append(out.slice_logits.float().cpu())
    model.train(was)
    exam_cat, slice_cat = torch.cat(exam_logits), torch.cat(slice_logits)
    if world > 1:
        exam_cat = gather_shards(exam_cat.to(device), len(fs), rank=rank, world_size=world).cpu()
        slice_cat = gather_shards(slice_cat.to(device), len(fs), rank=rank, world_size=world).cpu()
    slice_logits = [slice_cat]
    exam_p = torch.sigmoid(exam_cat).numpy()
    per_label = {name: auc_points(exam_p[:, k], fs.exam_labels[:, k]) for k, name in enumerate(EXAM_LABELS)}
    defined = _finite(list(per_label.values()))
    res: dict[str, Any] = {"exam_auc": per_label, "mean_exam_auc": float(np.mean(defined)) if defined else None,
                           "image_auc": None, "exam_probs": exam_p}  # fmt: skip
    if slice_trained:
        slice_p = torch.sigmoid(torch.cat(slice_logits))
        per_exam = [unfit_predictions(slice_p[e], int(s), long_mode=cfg.stage2.long_mode)
                    for e, s in enumerate(fs.slice_counts)]  # fmt: skip
        res["image_auc"] = auc_points(torch.cat(per_exam).numpy(), fs.slice_labels)
        labels = [torch.from_numpy(fs.slice_labels[fs.offsets[e] : fs.offsets[e + 1]].astype(np.float64))
                  for e in range(len(fs))]  # fmt: skip
        res["rsna_log_loss"] = rsna_weighted_log_loss(
            [p.clamp(1e-7, 1 - 1e-7) for p in per_exam], labels, torch.from_numpy(exam_p).clamp(1e-7, 1 - 1e-7),
            torch.from_numpy(fs.exam_labels.astype(np.float64)), image_weight=cfg.stage2.image_weight,
            exam_weights=cfg.stage2.exam_weights or None,
        )  # fmt: skip
    return res


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    """Evaluation metrics as JSON (the probabilities rounded)."""
    out = {k: v for k, v in metrics.items() if k != "exam_probs"}
    out["exam_probs"] = np.round(metrics["exam_probs"], 5).tolist()
    return out


def global_objective(
    parts: LossParts, batch: Stage2Batch, *, rows: int, normalisation: str, info: DistInfo | None
) -> torch.Tensor:
    """This rank's objective whose DDP average over W ranks is the RSNA loss of the whole global batch.

    The loss of a batch is a ratio, not a mean over exams: ``"metric"`` divides the weighted BCE sum by the batch's
    sum of weights, ``"release"`` the image sum by the batch's valid rows and the exam sum by its exams. So each
    rank's numerators are divided by the *global* denominators (one all-reduce of three numbers; they carry no
    gradient) and multiplied by W. ``rows``: this rank's real exams in ``batch`` (0 for an empty share, whose
    objective is then 0 with a gradient of zeros). One process: ``parts.total`` itself.
    """
    rank, world = _place(info)
    if world == 1:
        return parts.total
    n_valid = batch.valid[:rows].sum()
    den = parts.image_weight_sum + parts.exam_weight_sum if rows else parts.total.new_zeros(())
    local = torch.stack([den.detach().float(), n_valid.float(), torch.tensor(float(rows), device=den.device)])
    total = distributed.all_reduce_mean(local) * world
    if rows == 0:
        return parts.total * 0.0
    if normalisation == "metric":
        return parts.total * (den.detach() * world / total[0])
    return world * (parts.image * (n_valid / total[1]) + parts.exam * (rows / total[2]))


def _touch_outputs(out: Stage2Output) -> torch.Tensor:
    """A zero that depends on every output of ``out``: DDP expects a gradient for every parameter that reaches an
    output, and a kind's loss may not read them all (MIL at image weight 0 never reads the slice head)."""
    return sum(t[:0].sum() for f in dataclasses.fields(out) if isinstance(t := getattr(out, f.name), torch.Tensor))


def stage2_unit(
    kind: str,
    seed: int,
    features_arm: str,
    cfg: PECadConfig,
    feats: dict[str, Any],
    run_dir: Path,
    metrics: MetricsLog,
    device: torch.device,
    *,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """Train one stage-2 kind with one seed on ``features_arm``'s features; keep the epoch with the best validation
    mean exam AUC; test once. ``feats``: ``train`` (FeatureSet or FeatureFiles), ``val`` / ``test``
    (GuardedFeatures) and their stage-2 input ``batch/<split>`` (:func:`collate`: collated, or collated per batch
    from the feature files with ``data.store: exams``, each rank reading only its exams).

    DDP (``info`` with W > 1): ``DistributedDataParallel`` over exams. Every epoch's permutation of the training
    exams is the one one process draws; ``stage2.batch_size`` is the effective batch (per-rank batch x W) and each
    rank takes its contiguous share of every batch (:func:`~.stage1.shard_rows`) with its loss normalised by the
    global batch (:func:`global_objective`), so the averaged gradient is one process's and ``stage2.lr`` applies
    unchanged. Validation and test run sharded and gathered; rank 0 writes the unit's files."""
    rank, world = _place(info)
    unit = f"stage2/{kind}/seed{seed}"
    unit_dir = stage2_dir(run_dir, kind, seed)
    done = unit_dir / "result.json"
    if cfg.resume and done.exists():
        res = json.loads(done.read_text())
        if res.get("features_arm") == features_arm:
            log.info("%s: finished earlier, reusing %s", unit, done)
            return res
        log.info("%s: trained on %s features, now %s is chosen: training again", unit, res.get("features_arm"),
                 features_arm)  # fmt: skip
    metrics.truncate(unit, 0)
    s2 = cfg.stage2
    train_batch: Batches = feats["batch/train"]
    slice_trained = kind in SLICE_TRAINED
    image_weight = s2.image_weight if slice_trained else 0.0  # MIL: exam labels only
    seed_everything(seed)
    extra = {"attention": s2.attention} if kind == "cc" else {}
    model = build_stage2(kind, in_dim=train_batch.in_dim, hidden=s2.hidden, seq_len=s2.seq_len, **extra)
    model.to(device)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    opt, sched = build_stage2_optimizer(model, lr=s2.lr, step_size=s2.step_size, gamma=s2.gamma)
    gen = torch.Generator().manual_seed(seed * 7919 + 2)
    n = len(train_batch)
    best: dict[str, Any] = {"score": -math.inf, "epoch": 0, "val": None, "state": None}
    curve = []
    t_train = 0.0
    with progress(s2.epochs, unit, enabled=cfg.progress and rank == 0) as advance:
        for epoch in range(1, s2.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=gen)  # the same on every rank
            epoch_losses = []
            for i in range(0, n, s2.batch_size):
                chosen = perm[i : i + s2.batch_size]
                mine = shard_rows(len(chosen), rank=rank, world_size=world)
                rows = mine.stop - mine.start
                # an empty share (a short last batch of fewer exams than ranks) runs one exam at weight 0
                b = take(train_batch, chosen[mine] if rows else chosen[:1]).to(device)
                out = net(b.x, b.valid)
                parts = rsna_weighted_bce(out, b.slice_labels, b.exam_labels, b.valid, image_weight=image_weight,
                                          exam_weights=s2.exam_weights or None, num_slices=b.num_slices,
                                          positive_ratio=b.positive_ratio, normalisation=s2.normalisation)  # fmt: skip
                objective = global_objective(parts, b, rows=rows, normalisation=s2.normalisation, info=info)
                if world > 1:
                    objective = objective + _touch_outputs(out)
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
                loss = distributed.all_reduce_mean(objective.detach()) if world > 1 else objective.detach()
                epoch_losses.append(float(loss))
            sched.step()
            t_train += time.perf_counter() - t0
            val = feats["val"].get("selection", unit)
            m = evaluate_stage2(model, val, feats["batch/val"], cfg, slice_trained=slice_trained, device=device,
                                info=info)  # fmt: skip
            point = {"epoch": epoch, "loss": float(np.mean(epoch_losses)), "val_mean_exam_auc": m["mean_exam_auc"]}
            curve.append(point)
            metrics.log({"unit": unit, "step": epoch, **point})
            advance(1, loss=point["loss"])
            if best["state"] is None or _score(m["mean_exam_auc"]) > best["score"]:
                best = {"score": _score(m["mean_exam_auc"]), "epoch": epoch, "val": m,
                        "state": copy.deepcopy(model.state_dict())}  # fmt: skip
    model.load_state_dict(best["state"])
    result: dict[str, Any] = {
        "kind": kind, "seed": seed, "features_arm": features_arm, "epochs": s2.epochs, "image_weight": image_weight,
        "image_auc_applicable": slice_trained, "curve": curve, "best_epoch": best["epoch"],
        "val": {k: v for k, v in best["val"].items() if k != "exam_probs"},
        "train_seconds": t_train, "train_exams_per_s": s2.epochs * n / max(t_train, 1e-9),
        "params": count_parameters(model),
    }  # fmt: skip
    if cfg.final_test:  # the unit's only read of the test features
        test = feats["test"].get("final_test", unit)
        result["test"] = _public(evaluate_stage2(model, test, feats["batch/test"], cfg, slice_trained=slice_trained,
                                                 device=device, info=info))  # fmt: skip
    if world > 1:
        result["world_size"] = world
    if rank == 0:
        unit_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(unit_dir / "model.safetensors"))
        write_json(done, result)
    if world > 1:
        distributed.barrier()
    return result


# --- trivial baseline -------------------------------------------------------------------------------------


def trivial_scores(exams: Exams, column: int = 0) -> dict[str, Any]:
    """The training-free baseline under one defect-fraction setting (``column`` of ``exams.trivial``): the defect
    fraction as the slice score (image AUC) and its maximum over an exam's slices as the exam score (AUC of "any
    PE", and of ``negative_exam_for_pe`` with the score negated)."""
    per_slice = exams.trivial[:, column]
    exam_max = exams.exam_max(per_slice)
    return {
        "image_auc": auc_points(per_slice, exams.slice_labels),
        "exam_any_pe_auc": auc_points(exam_max, exams.exam_any_pe()),
        "exam_negative_auc": auc_points(-exam_max, exams.exam_labels[:, 0]),
        "exam_scores": np.round(exam_max, 6).tolist(),
    }


def choose_trivial_setting(val: Exams) -> int:
    """The defect-fraction setting (a column of ``val.trivial``) with the best validation image AUC; the first on
    ties, and the default setting (0) when validation has a single slice class."""
    aucs = [auc_points(val.trivial[:, g], val.slice_labels) for g in range(val.trivial.shape[1])]
    scored = [(a, -g) for g, a in enumerate(aucs) if a is not None]
    return -max(scored)[1] if scored else 0


def trivial_unit(cfg: PECadConfig, data: PECadData) -> dict[str, Any]:
    """The trivial baseline: its defect-HU range and contrast threshold chosen on validation, then applied to test."""
    val = data.val.get("calibration", "trivial")
    column = choose_trivial_setting(val)
    lo, hi, contrast = DEFECT_FRACTION_GRID[column]
    out: dict[str, Any] = {"name": TRIVIAL, "column": column,
                           "setting": {"defect_hu": [lo, hi], "contrast_hu": contrast},
                           "val": trivial_scores(val, column)}  # fmt: skip
    if cfg.final_test:
        out["test"] = trivial_scores(data.test.get("final_test", "trivial"), column)
    return out


# --- claims and tables ------------------------------------------------------------------------------------


def _per_seed(per: dict[int, dict], get) -> dict[int, float]:
    out = {}
    for seed, r in per.items():
        v = get(r)
        if v is not None and math.isfinite(v):
            out[seed] = float(v)
    return out


def _init_tag(init: str) -> str:
    return init.replace(":", "_")


PAPER_PRETRAINED = ("image AUC, random -> ImageNet init: ResNet50 0.9037 -> 0.9473, SeResNeXt50 0.8749 -> 0.9614, "
                    "SeXception 0.9498 -> 0.9634")  # fmt: skip
PAPER_SSL = ("image AUC, ResNet50: SSL (SeLa-v2 / DeepCluster-v2 0.9568, Barlow Twins 0.9566, SimCLR-v1 0.9545) vs "
             "supervised ImageNet 0.9473; PIRL 0.8917 and MoCo-v2 0.892 no better than scratch")  # fmt: skip
PAPER_VIT = "image AUC from random init: ViT-B/16 0.8385 vs ResNet50 0.9037 (CNNs up to 0.9634 pretrained)"
PAPER_CC = ("exam AUC, CC / MIL: SeResNeXt50 0.8807 / 0.883, Xception 0.8912 / 0.8859, SeXception 0.8852 / "
            "0.8773 (MIL ahead for one backbone)")  # fmt: skip


def make_claims(
    cfg: PECadConfig,
    stage1: dict[str, dict[int, dict]],
    stage2: dict[str, dict[int, dict]],
    trivial: dict[str, Any],
    selection: dict[int, str],
) -> list[Claim]:
    """The card's miniature claims and the two "works" claims, on the test split, paired over seeds."""
    claims: list[Claim] = []
    p, margin = cfg.preset, cfg.noninferiority_margin

    def image(arm: str) -> dict[int, float]:
        return _per_seed(stage1.get(arm, {}), lambda r: r.get("test_image_auc"))

    for family in BACKBONE_FAMILIES:
        scratch = image(f"{family}-random")
        for init in ("supervised", "ssl:simclr", "ssl:genesis"):
            a = image(f"{family}-{init}")
            if set(a) & set(scratch):
                claims.append(paired_claim(
                    id=f"pretrained_beats_scratch_{family}_{_init_tag(init)}", a=a, b=scratch, direction="greater",
                    statement=f"{init} pretraining raises the {family.upper()}'s test image AUC over random "
                    f"initialisation (same fine-tuning budget)", paper_value=PAPER_PRETRAINED, preset=p,
                    baseline=f"{family}-random", unit="AUC points",
                ))  # fmt: skip
        sup = image(f"{family}-supervised")
        for ssl in ("ssl:simclr", "ssl:genesis"):
            a = image(f"{family}-{ssl}")
            seeds = sorted(set(a) & set(sup))
            if seeds:
                claims.append(value_claim(
                    id=f"ssl_not_worse_than_supervised_{family}_{_init_tag(ssl)}",
                    values=[a[s] - sup[s] for s in seeds], seeds=seeds, direction="greater", threshold=-margin,
                    statement=f"{ssl} pretraining is not worse than supervised pretraining for the "
                    f"{family.upper()}: test image AUC of {ssl} minus supervised above -{margin:g} points "
                    "(non-inferiority)", paper_value=PAPER_SSL, preset=p,
                    baseline=f"{family}-supervised - {margin:g}", unit="AUC points",
                ))  # fmt: skip
    cnn, vit = image("cnn-random"), image("vit-random")
    if set(cnn) & set(vit):
        claims.append(paired_claim(
            id="cnn_beats_vit_random_init", a=cnn, b=vit, direction="greater", preset=p, baseline="vit-random",
            statement="the small CNN's test image AUC beats the small ViT's, both randomly initialised, at the same "
            "number of steps", paper_value=PAPER_VIT, unit="AUC points",
        ))  # fmt: skip
    cc = _per_seed(stage2.get("cc", {}), lambda r: r.get("test", {}).get("mean_exam_auc"))
    for kind in ("mil_attention", "mil_max"):
        mil = _per_seed(stage2.get(kind, {}), lambda r: r.get("test", {}).get("mean_exam_auc"))
        seeds = sorted(set(cc) & set(mil))
        if seeds:
            claims.append(value_claim(
                id=f"cc_not_worse_than_{kind}", values=[cc[s] - mil[s] for s in seeds], seeds=seeds,
                direction="greater", threshold=-margin, preset=p, baseline=f"{kind} - {margin:g}", unit="AUC points",
                statement=f"conventional classification (BiGRU, slice + exam labels) is not worse than {kind} (exam "
                f"labels only) on the mean test exam AUC over the nine labels: CC minus MIL above -{margin:g} points",
                paper_value=PAPER_CC,
            ))  # fmt: skip
    test = trivial.get("test", {})
    chosen = {s: stage1[arm][s].get("test_image_auc") for s, arm in selection.items() if s in stage1.get(arm, {})}
    chosen = {s: v for s, v in chosen.items() if v is not None}
    if chosen and test.get("image_auc") is not None:
        base = test["image_auc"]
        claims.append(works_claim(
            id="image_detection_works", method=chosen, baseline_value=base, margin=cfg.works_margin,
            direction="greater", preset=p, baseline=f"defect fraction ({base:.1f})", unit="AUC points",
            statement=f"the stage-1 arm chosen on validation beats the training-free defect-fraction score's test "
            f"image AUC by more than {cfg.works_margin:g} points",
        ))  # fmt: skip
    negative = _per_seed(stage2.get("cc", {}), lambda r: r.get("test", {}).get("exam_auc", {}).get(EXAM_LABELS[0]))
    if negative and test.get("exam_negative_auc") is not None:
        base = test["exam_negative_auc"]
        claims.append(works_claim(
            id="exam_detection_works", method=negative, baseline_value=base, margin=cfg.works_margin,
            direction="greater", preset=p, baseline=f"max defect fraction per exam ({base:.1f})", unit="AUC points",
            statement=f"the CC model's test AUC of negative_exam_for_pe beats the exam's maximum defect fraction "
            f"(negated) by more than {cfg.works_margin:g} points",
        ))  # fmt: skip
    return claims


def stage1_table(cfg: PECadConfig, stage1: dict[str, dict[int, dict]], trivial: dict[str, Any],
                 selection: dict[int, str]) -> dict[str, Any]:  # fmt: skip
    rows = []
    for arm, per in stage1.items():
        rs = list(per.values())
        chosen = sum(1 for s, a in selection.items() if a == arm)
        rows.append([arm, len(rs), format_mean_ci(_finite([r["val_image_auc"] for r in rs])),
                     format_mean_ci(_finite([r.get("test_image_auc") for r in rs])), f"{chosen}/{len(selection)}",
                     rs[0]["params"]])  # fmt: skip
    tv, tt = trivial["val"]["image_auc"], trivial.get("test", {}).get("image_auc")
    rows.append([TRIVIAL.split(" (")[0], "-", "" if tv is None else f"{tv:.1f}", "" if tt is None else f"{tt:.1f}",
                 "", ""])  # fmt: skip
    return {"title": "Stage 1: image AUC (%) per arm, mean [95% t-interval] over seeds; 'chosen' counts the seeds "
            "whose stage-2 features came from the arm (best validation image AUC)",
            "columns": ["arm", "seeds", "val image AUC", "test image AUC", "chosen", "params"],
            "rows": rows}  # fmt: skip


def stage2_table(stage2: dict[str, dict[int, dict]], trivial: dict[str, Any], split: str) -> dict[str, Any]:
    rows = []
    for kind, per in stage2.items():
        rs = [r[split] for r in per.values() if split in r]
        if not rs:
            continue
        cells = [format_mean_ci(_finite([r["exam_auc"][n] for r in rs])) for n in EXAM_LABELS]
        image = format_mean_ci(_finite([r["image_auc"] for r in rs])) if rs[0]["image_auc"] is not None else "n/a"
        rows.append([kind, len(rs), *cells, format_mean_ci(_finite([r["mean_exam_auc"] for r in rs])), image])
    t = trivial.get(split, {})
    if t:
        neg, img = t.get("exam_negative_auc"), t.get("image_auc")
        rows.append([TRIVIAL.split(" (")[0], "-", "" if neg is None else f"{neg:.1f}", *[""] * 8, "",
                     "" if img is None else f"{img:.1f}"])  # fmt: skip
    where = "Test" if split == "test" else "Validation"
    return {"title": f"Stage 2: {where.lower()} exam AUC (%) per label and their mean, and the image AUC of the "
            "slice head (n/a: MIL trains on exam labels only), mean [95% t-interval] over seeds",
            "columns": ["kind", "seeds", *SHORT_LABELS, "mean exam AUC", "image AUC"], "rows": rows}  # fmt: skip


def cost_table(
    stage1: dict[str, dict[int, dict]],
    stage2: dict[str, dict[int, dict]],
    pretraining: dict[str, dict[str, Any]],
    feature_seconds: dict[str, float],
) -> dict[str, Any]:
    rows = []
    for arm, per in stage1.items():
        rs = list(per.values())
        rows.append([f"stage 1 {arm}", round(float(np.mean([r["train_seconds"] for r in rs])), 1),
                     round(float(np.mean([r["train_slices_per_s"] for r in rs])), 1), "slices/s", rs[0]["params"],
                     f"{rs[0]['steps']} steps"])  # fmt: skip
    for arm, rec in pretraining.items():
        rows.append([f"pretraining {arm}" + (" (cached)" if rec.get("cached") else ""), round(rec["seconds"], 1), "",
                     "", "", f"{rec['steps']} steps"])  # fmt: skip
    for key, seconds in feature_seconds.items():
        rows.append([f"features {key}", round(seconds, 1), "", "", "", ""])
    for kind, per in stage2.items():
        rs = list(per.values())
        rows.append([f"stage 2 {kind}", round(float(np.mean([r["train_seconds"] for r in rs])), 1),
                     round(float(np.mean([r["train_exams_per_s"] for r in rs])), 1), "exams/s", rs[0]["params"],
                     f"{rs[0]['epochs']} epochs"])  # fmt: skip
    return {"title": "Cost: training seconds per unit (mean over seeds), throughput, parameters, budget",
            "columns": ["unit", "seconds", "throughput", "of", "params", "budget"], "rows": rows}  # fmt: skip


# --- the recipe -------------------------------------------------------------------------------------------


def _load_stage(run_dir: Path, unit_dir, names: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in seeds:
            path = unit_dir(run_dir, name, seed) / "result.json"
            if path.exists():
                out.setdefault(name, {})[seed] = json.loads(path.read_text())
    return out


def train(cfg: PECadConfig) -> dict[str, Any]:
    """Run the recipe; returns the ``results.json`` content (on every rank under ``torchrun``; rank 0 writes it, and
    only rank 0's holds the eval stage's claims, tables and figures)."""
    t_start = time.perf_counter()
    info, run_dir, metrics = open_run(RECIPE, cfg)
    device = info.device
    access = AccessLog(run_dir / "access_log.jsonl" if info.is_main else None)
    root = data_root(cfg)
    check_sync_bn(cfg, info)
    data = prepare_data(cfg, root, run_dir, access, info=info)
    summary = new_summary(RECIPE, PAPER, cfg, run_dir, data=data.info)
    seeds, arms, kinds = cfg.seeds, cfg.stage1.arms, cfg.stage2.kinds

    pretraining: dict[str, dict[str, Any]] = {}
    stage1: dict[str, dict[int, dict]] = {}
    if "stage1" in cfg.stages:
        pretrained = {}
        for arm in arms:
            family, init = parse_arm(arm)
            if init != "random" and any(not (stage1_dir(run_dir, arm, s) / "result.json").exists() for s in seeds):
                pretrained[arm], pretraining[arm] = pretrained_backbone(cfg, family, init, data, root, device,
                                                                        info=info)  # fmt: skip
        for arm in arms:
            for seed in seeds:
                stage1.setdefault(arm, {})[seed] = stage1_unit(arm, seed, cfg, data, run_dir, metrics, device,
                                                               pretrained, info=info)  # fmt: skip
    if not stage1:
        stage1 = _load_stage(run_dir, stage1_dir, arms, seeds)

    selection: dict[int, str] = {}
    features: dict[int, dict[str, Features]] = {}
    feature_seconds: dict[str, float] = {}
    if "features" in cfg.stages or "stage2" in cfg.stages:
        for seed in seeds:
            selection[seed] = choose_features_arm(cfg, stage1, seed)
            fdir = features_dir(run_dir, selection[seed], seed)
            if "features" not in cfg.stages and feature_index(fdir / "train") is None:
                raise ConfigError(f"no stage-1 features in {fdir} (run the features stage first)")
            features[seed] = features_unit(selection[seed], seed, cfg, data, run_dir, device, info=info)
            timing = fdir / "timing.json"
            if timing.exists():
                feature_seconds[f"{selection[seed]}/seed{seed}"] = json.loads(timing.read_text())["seconds"]

    stage2: dict[str, dict[int, dict]] = {}
    if "stage2" in cfg.stages:
        for seed in seeds:
            fs = features[seed]
            feats: dict[str, Any] = {
                "train": fs["train"],
                "val": GuardedFeatures("val", fs["val"], access),
                "batch/train": collate(fs["train"], cfg),
                "batch/val": collate(fs["val"], cfg),
            }
            if cfg.final_test:
                feats |= {"test": GuardedFeatures("test", fs["test"], access), "batch/test": collate(fs["test"], cfg)}
            for kind in kinds:
                stage2.setdefault(kind, {})[seed] = stage2_unit(kind, seed, selection[seed], cfg, feats, run_dir,
                                                                metrics, device, info=info)  # fmt: skip

    if "eval" in cfg.stages and info.is_main:
        if not stage1:
            raise ConfigError(f"stages=[eval] found no finished stage-1 units under {run_dir}/units; run stage1 first")
        if not stage2:
            stage2 = _load_stage(run_dir, stage2_dir, kinds, seeds)
        if not selection:  # the choice recorded by the stage-2 units, else made now (validation only)
            selection = {s: r["features_arm"] for per in stage2.values() for s, r in per.items()}
            if not selection and all(s in stage1.get(a, {}) for a in arms for s in seeds):
                selection = {s: choose_features_arm(cfg, stage1, s) for s in seeds}
        trivial = trivial_unit(cfg, data)
        claims = make_claims(cfg, stage1, stage2, trivial, selection) if cfg.final_test else []
        split = "test" if cfg.final_test else "val"
        tables = [stage1_table(cfg, stage1, trivial, selection)]
        if stage2:
            tables.append(stage2_table(stage2, trivial, split))
        tables.append(cost_table(stage1, stage2, pretraining, feature_seconds))
        example = None
        if selection:
            seed = min(selection)
            val_dir = features_dir(run_dir, selection[seed], seed) / "val"
            if feature_index(val_dir) is not None:
                example = (f"{selection[seed]} seed {seed}", open_feature_split(val_dir).probs)
        figs = figures.make_all(run_dir, stage1, stage2, trivial, data, cfg, example_probs=example)
        summary.update(
            trivial=trivial,
            selection={str(s): a for s, a in selection.items()},
            pretraining={a: {k: v for k, v in r.items() if k != "losses"} for a, r in pretraining.items()},
            claims=[c.to_dict() for c in claims],
            tables=tables,
            figures=[str(p.relative_to(run_dir)) for p in figs if p is not None],
        )
    return finish_run(summary, run_dir, cfg, t_start=t_start, info=info)
