"""Self-discovery of visual words and pre-training of one arm (Models Genesis, Semantic Genesis / TransVW and the
add-on grid; papers: arXiv 2004.07882, 2007.06959, 2102.10680).

:func:`discover` trains the volume auto-encoder on the unlabelled training patients, embeds every unlabelled
patient, discovers ``num_classes`` visual words (members from the nearest training patients, validation members
from the nearest held-out patients) and crops their instances; the result is cached in the run directory.

:func:`pretrain_arm` trains a :class:`~thrifty.methods.genesis.pretext.PretextNet` on one pretext: batches are
drawn and perturbed from ``(seed, step)`` only, so a run is reproducible and, under ``torchrun``, every rank
draws the same global batch and trains on its rows of it (DDP averages the gradients). Every ``eval_every`` steps
the pretext loss on held-out patients (fixed perturbations) decides the weights kept (early stopping with
``patience``). Optimisers follow the releases: SGD (lr 1, momentum 0.9) for the Models Genesis-style arms, Adam
1e-3 for visual-word arms, both with StepLR(step_size, 0.5) counted in validation rounds.

Exports per arm (``units/pretrain/<arm>/seed<s>/``): ``encoder.safetensors`` (loads into any of the recipe's 3D
networks and, by key renaming, into MONAI, see the README), ``unet.safetensors`` for restoration pretexts (the
whole U-Net, what the papers fine-tune for segmentation), each with a JSON card.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed
from thrifty.core.run import MetricsLog, progress, write_json
from thrifty.methods.genesis import discovery
from thrifty.methods.genesis.config import GenesisConfig, arm_name
from thrifty.methods.genesis.data import GenesisData
from thrifty.methods.genesis.model import UNet3D, encoder_state_dict, place, save_weights, to_device
from thrifty.methods.genesis.pretext import NUM_ROTATIONS, PretextNet, make_batch, pretext_loss, restores

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ self-discovery


def discover(cfg: GenesisConfig, data: GenesisData, out_dir: Path, metrics: MetricsLog) -> dict[str, Any]:
    """Visual words: cached in ``out_dir`` (``words.json``, ``instances.safetensors``); returns the summary with
    ``train``/``val`` (cubes, labels) tensors."""
    words_file, inst_file = out_dir / "words.json", out_dir / "instances.safetensors"
    if cfg.resume and words_file.exists() and inst_file.exists():
        summary = json.loads(words_file.read_text())
        t = load_file(str(inst_file))
        return {**summary, "train": (t["train_cubes"], t["train_labels"]), "val": (t["val_cubes"], t["val_labels"])}
    v = cfg.discovery
    t0 = time.perf_counter()
    size = v.ae_size
    pool_tr = torch.nn.functional.interpolate(data.pool_train, size=size, mode="trilinear", align_corners=False)
    pool_va = torch.nn.functional.interpolate(data.pool_val, size=size, mode="trilinear", align_corners=False)
    with progress(v.ae_steps, "self-discovery auto-encoder", enabled=cfg.progress) as advance:

        def on_step(step: int, loss: float) -> None:
            advance(1, loss=loss)
            if (step + 1) % cfg.log_every == 0 or step + 1 == v.ae_steps:
                metrics.log({"unit": "discovery/ae", "step": step + 1, "loss": loss})

        ae, losses = discovery.train_autoencoder(
            pool_tr, steps=v.ae_steps, batch_size=v.ae_batch_size, lr=v.ae_lr, seed=cfg.pretrain.seed, log=on_step
        )
    emb_tr = discovery.patient_embeddings(ae, pool_tr)
    emb_va = discovery.patient_embeddings(ae, pool_va)
    words = discovery.discover_visual_words(
        embeddings_train=emb_tr,
        volumes_train=data.pool_train[:, 0],
        num_classes=v.num_classes,
        top_k_train=v.top_k_train,
        cube_size=cfg.data.cube,
        coordinate_min_distance=v.min_distance,
        max_dense_fraction=cfg.data.max_dense_fraction,  # the release's lung_max, shared with its cube generator
        margin=cfg.data.margin,
        embeddings_val=emb_va,
        top_k_val=v.top_k_val,
        seed=cfg.pretrain.seed,
    )
    crops = {}
    for split, vols in (("train", data.pool_train), ("val", data.pool_val)):
        crops[split] = discovery.crop_instances(
            vols[:, 0].numpy(),
            words,
            cube_size=cfg.data.cube,
            fill=0.0,
            split=split,
            multi_resolution=v.multi_resolution and split == "train",  # the release: training instances only
            jitter=v.jitter,
            seed=cfg.pretrain.seed + (0 if split == "train" else 1),
        )
    purity = discovery.word_purity(words, data.labels_train)
    rng = np.random.default_rng(cfg.pretrain.seed)
    n_train = len(data.pool_train)
    shuffled = [
        discovery.VisualWord(
            class_id=w.class_id,
            coordinate=w.coordinate,
            reference=w.reference,
            members=tuple(int(i) for i in rng.choice(n_train, size=len(w.members), replace=False)),
            distances=w.distances,
        )
        for w in words
    ]
    summary = {
        "num_classes": len(words),
        "instances": {"train": len(crops["train"][1]), "val": len(crops["val"][1])},
        "ae_loss": losses,
        "purity": purity,
        "purity_random_members": discovery.word_purity(shuffled, data.labels_train),
        "words": [
            {
                "class_id": w.class_id,
                "coordinate": list(w.coordinate),
                "reference": w.reference,
                "members": list(w.members),
                "members_val": list(w.members_val),
            }
            for w in words
        ],
        "seconds": time.perf_counter() - t0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "train_cubes": crops["train"][0].contiguous(),
            "train_labels": crops["train"][1],
            "val_cubes": crops["val"][0].contiguous(),
            "val_labels": crops["val"][1],
        },
        str(inst_file),
    )
    write_json(words_file, summary)
    log.info(
        "visual words: %d classes, %d instances, purity %.2f (random members %.2f)",
        len(words),
        summary["instances"]["train"],
        purity,
        summary["purity_random_members"],
    )
    return {**summary, "train": crops["train"], "val": crops["val"]}


# --------------------------------------------------------------------------------------------------- pre-training


def unit_dir(run_dir: Path, arm: str, seed: int) -> Path:
    return run_dir / "units" / "pretrain" / arm.replace("/", "-") / f"seed{seed}"


def git_commit() -> str:
    """The source commit (empty outside a git checkout); recorded in weight cards."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def make_optimizer(cfg: GenesisConfig, params: Any, *, visual_words: bool) -> torch.optim.Optimizer:
    """SGD(lr 1, momentum 0.9) for Models Genesis-style arms, Adam(1e-3) for visual-word arms (``auto``)."""
    p = cfg.pretrain
    kind = p.optimizer if p.optimizer != "auto" else ("adam" if visual_words else "sgd")
    if kind == "sgd":
        return torch.optim.SGD(params, lr=p.sgd_lr, momentum=0.9)
    return torch.optim.Adam(params, lr=p.adam_lr)


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def pretext_val_loss(
    model: PretextNet,
    pretext: str,
    cubes: torch.Tensor,
    words: torch.Tensor | None,
    cfg: GenesisConfig,
    *,
    visual_words: bool,
    device: torch.device,
) -> float:
    """Mean pretext loss on held-out cubes with fixed perturbations (the early-stopping criterion)."""
    model.eval()
    gen = _generator(cfg.pretrain.seed, 999_983)
    total, n = 0.0, 0
    for i in range(0, len(cubes), 32):
        x = to_device(cubes[i : i + 32], device, channels_last=cfg.channels_last)
        batch = make_batch(
            pretext,
            x,
            visual_words=visual_words,
            generator=gen,
            elastic=(cfg.pretrain.elastic_alpha, cfg.pretrain.elastic_sigma),
        )
        y = words[i : i + 32].to(device) if words is not None else None
        terms = pretext_loss(
            model(batch["input"]),
            batch,
            words=y,
            lambda_rec=cfg.pretrain.lambda_rec,
            lambda_cls=cfg.pretrain.lambda_cls,
            rotation_weight=cfg.pretrain.rotation_weight,
        )
        total += float(terms["loss"]) * len(x)
        n += len(x)
    model.train()
    return total / max(n, 1)


@torch.no_grad()
def pretext_constant_loss(
    pretext: str,
    cubes: torch.Tensor,
    words: torch.Tensor | None,
    cfg: GenesisConfig,
    *,
    visual_words: bool,
    num_words: int = 0,
) -> float:
    """The pretext loss of the best constant predictor on the held-out cubes, with the same fixed perturbations as
    :func:`pretext_val_loss`: the mean target intensity for restoration (the MSE minimiser), and the class
    frequencies' logarithms as logits for rotation and visual words (the cross-entropy minimiser). A pretext has
    trained only when its validation loss is clearly below this (issue 17: after 60 steps Models Genesis was at
    0.050 against 0.060)."""
    gen = _generator(cfg.pretrain.seed, 999_983)
    batches = [
        make_batch(
            pretext,
            cubes[i : i + 32],
            visual_words=visual_words,
            generator=gen,
            elastic=(cfg.pretrain.elastic_alpha, cfg.pretrain.elastic_sigma),
        )
        for i in range(0, len(cubes), 32)
    ]
    outputs: list[dict[str, torch.Tensor]] = []
    if restores(pretext):
        mean = torch.cat([b["target"].flatten() for b in batches]).mean()
        outputs = [{"restoration": torch.full_like(b["target"], float(mean))} for b in batches]
    else:
        freq = torch.bincount(torch.cat([b["rotation"] for b in batches]), minlength=NUM_ROTATIONS).double()
        logits = torch.log(freq.clamp_min(1e-12) / freq.sum()).float()
        outputs = [{"rotation": logits.expand(len(b["rotation"]), -1)} for b in batches]
    if visual_words and words is not None:
        wfreq = torch.bincount(words, minlength=max(num_words, int(words.max()) + 1)).double()
        wlogits = torch.log(wfreq.clamp_min(1e-12) / wfreq.sum()).float()
        for o, b in zip(outputs, batches):
            o["words"] = wlogits.expand(len(b["input"]), -1)
    total, n = 0.0, 0
    for k, (o, b) in enumerate(zip(outputs, batches)):
        y = words[32 * k : 32 * k + 32] if visual_words and words is not None else None
        terms = pretext_loss(
            o,
            b,
            words=y,
            lambda_rec=cfg.pretrain.lambda_rec,
            lambda_cls=cfg.pretrain.lambda_cls,
            rotation_weight=cfg.pretrain.rotation_weight,
        )
        total += float(terms["loss"]) * len(b["input"])
        n += len(b["input"])
    return total / max(n, 1)


def pretrain_arm(
    pretext: str,
    visual_words: bool,
    seed: int,
    cfg: GenesisConfig,
    data: GenesisData,
    words: dict[str, Any] | None,
    run_dir: Path,
    metrics: MetricsLog,
    info: distributed.DistInfo,
) -> dict[str, Any]:
    """Pre-train one arm; writes its weights and ``result.json`` (reused when ``resume`` finds them)."""
    arm = arm_name(pretext, visual_words)
    unit = f"pretrain/{arm}/seed{seed}"
    out = unit_dir(run_dir, arm, seed)
    done = out / "result.json"
    if cfg.resume and done.exists():
        return json.loads(done.read_text())
    metrics.truncate(unit, 0)
    p = cfg.pretrain
    if visual_words:
        if words is None:
            raise ValueError(f"arm {arm} needs visual words: run the discover stage")
        train_x, train_y = words["train"]
        val_x, val_y = words["val"]
        num_words = int(words["num_classes"])
    else:
        train_x, train_y, val_x, val_y, num_words = data.cubes_train, None, data.cubes_val, None, 0
    # a fixed random subset of the held-out cubes (the cubes are stored patient by patient, word by word)
    keep = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(seed))[: p.val_cubes]
    val_x, val_y = val_x[keep], (val_y[keep] if val_y is not None else None)
    constant = pretext_constant_loss(pretext, val_x, val_y, cfg, visual_words=visual_words, num_words=num_words)
    metrics.log({"unit": unit, "arm": arm, "seed": seed, "step": 0, "split": "val", "constant_loss": constant})

    torch.manual_seed(seed)
    model = place(
        PretextNet(pretext=pretext, num_words=num_words, width=p.width), info.device, channels_last=cfg.channels_last
    )
    if info.enabled and p.sync_bn:
        if info.device.type == "cpu":
            raise ValueError("pretrain.sync_bn needs CUDA: torch's SyncBatchNorm does not run on CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = DDP(model) if info.enabled else model
    opt = make_optimizer(cfg, model.parameters(), visual_words=visual_words)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=p.step_size, gamma=p.gamma)
    rows = distributed.shard_rows(p.batch_size, info)
    best = {"loss": float("inf"), "step": 0, "state": copy.deepcopy(model.state_dict())}
    curve: list[list[float]] = []
    stale, sums, n_sum, t_train = 0, {}, 0, 0.0
    with progress(p.max_steps, unit, enabled=cfg.progress and info.is_main) as advance:
        for step in range(1, p.max_steps + 1):
            t0 = time.perf_counter()
            gen = _generator(seed, step)
            idx = torch.randint(0, len(train_x), (p.batch_size,), generator=gen)
            batch = make_batch(
                pretext,
                train_x[idx],
                visual_words=visual_words,
                generator=gen,
                elastic=(cfg.pretrain.elastic_alpha, cfg.pretrain.elastic_sigma),
            )
            batch = {k: to_device(v[rows], info.device, channels_last=cfg.channels_last) for k, v in batch.items()}
            y = train_y[idx][rows].to(info.device) if train_y is not None else None
            terms = pretext_loss(
                net(batch["input"]),
                batch,
                words=y,
                lambda_rec=p.lambda_rec,
                lambda_cls=p.lambda_cls,
                rotation_weight=p.rotation_weight,
            )
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            t_train += time.perf_counter() - t0
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_sum += 1
            if step % cfg.log_every == 0 or step == p.max_steps:
                avg = {k: distributed.all_reduce_mean(torch.tensor(v / n_sum)).item() for k, v in sums.items()}
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "step": step, **avg})
                advance(n_sum, loss=avg["loss"])
                sums, n_sum = {}, 0
            if step % p.eval_every == 0 or step == p.max_steps:
                distributed.sync_batchnorm_stats(model)
                val = pretext_val_loss(model, pretext, val_x, val_y, cfg, visual_words=visual_words, device=info.device)
                curve.append([step, val])
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "step": step, "split": "val", "loss": val})
                sched.step()
                if val < best["loss"]:
                    best, stale = {"loss": val, "step": step, "state": copy.deepcopy(model.state_dict())}, 0
                else:
                    stale += 1
                    if stale >= p.patience:
                        log.info("%s: no improvement in %d validations, stopping at step %d", unit, stale, step)
                        break
    model.load_state_dict(best["state"])
    result = {
        "arm": arm,
        "pretext": pretext,
        "visual_words": visual_words,
        "seed": seed,
        "best_step": best["step"],
        "val_loss": best["loss"],
        "constant_loss": constant,
        "val_loss_over_constant": best["loss"] / constant if constant > 0 else None,
        "curve": curve,
        "steps_run": step,
        "train_seconds": t_train,
        "cubes_per_s": step * p.batch_size / max(t_train, 1e-9),
        "num_words": num_words,
        "train_cubes": len(train_x),
    }
    if info.is_main:
        card = {
            "recipe": "thrifty genesis",
            "arm": arm,
            "pretext": pretext,
            "visual_words": visual_words,
            "cube_dhw": list(cfg.data.cube),
            "hu_window": [-1000, 1000],
            "intensity": "clip HU to [-1000, 1000], then (HU + 1000) / 2000",
            "pretraining_data": cfg.data.source,
            "pretraining_patients": data.manifest["pretrain_train"],
            "phantom_seed": cfg.data.seed,
            "seed": seed,
            "steps": best["step"],
            "commit": git_commit(),
        }
        out.mkdir(parents=True, exist_ok=True)
        save_weights(encoder_state_dict(model.net), out / "encoder.safetensors", {**card, "part": "encoder"})
        if restores(pretext):
            unet = UNet3D(widths=model.net.widths)
            unet.load_state_dict({k: v for k, v in model.net.state_dict().items() if not k.startswith("word_head")})
            save_weights(unet, out / "unet.safetensors", {**card, "part": "unet"})
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors")
        )
        write_json(done, result)
    distributed.barrier()
    return result
