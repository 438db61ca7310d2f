"""The temporal-gradient recipe: semi-supervised action recognition that learns from the temporal gradient.

Xiao, Lee, Fan, Zhou, Ramanan, Jaiswal, Kalyanaraman, *Learning from Temporal Gradient for Semi-supervised
Action Recognition* (CVPR 2022, arXiv 2111.13241); release ``lambert-x/video-semisup``. Every step draws
``labelled_per_step`` clips from the labelled subset and as many from the whole training split (separate samplers),
and trains one of the card's arms:

1. ``supervised``: the RGB network on the labelled clips (cross-entropy);
2. ``fixmatch_095`` / 3. ``fixmatch_03``: RGB FixMatch: pseudo-labels from the weak view kept at confidence >= tau
   (0.95, the release's hidden default; 0.3, its configs), cross-entropy on the strong view;
4. ``tg_full``: two separate R3D-18s (RGB and TG): 0.5 CE each on labelled clips; pseudo-labels from the averaged
   weak logits (>= 0.3) applied to both strong views; alignment of RGB to a stopped-gradient TG at four stages;
   cross-modal NT-Xent (the release's weights: 1, 1, 1, 1);
5.-7. ``tg_no_align``, ``tg_no_contrast``, ``tg_rgb_pseudo``: ablations of arm 4.

Pseudo-labels start after ``loss.warmup_fraction`` of the steps; SGD with linear warm-up and cosine decay,
gradient clipping; precise BN before each evaluation. Each unit keeps the step with the best validation top-1
(the release evaluates on its test list; we never do) and reads the test split once. Only the RGB network is
used at test time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed, parallel
from thrifty.core.claims import Claim, format_mean_ci, paired_claim, value_claim, works_claim
from thrifty.core.config import ConfigError, to_dict
from thrifty.core.parallel import UnitJob
from thrifty.core.run import (
    MetricsLog,
    data_root,
    finish_run,
    load_unit_results,
    main_first,
    new_summary,
    open_run,
    progress,
    seed_everything,
    write_json,
)
from thrifty.core.splits import AccessLog
from thrifty.core.tables import first_of, mean_of, per_arm_table
from thrifty.methods.temporal_gradient import figures, losses
from thrifty.methods.temporal_gradient.config import TemporalGradientConfig
from thrifty.methods.temporal_gradient.data import (
    StepClips,
    TGData,
    VideoSet,
    draw_step,
    eval_views,
    prepare_data,
)
from thrifty.methods.temporal_gradient.model import TwoStreamNet, recompute_bn_stats
from thrifty.methods.temporal_gradient.real import VideoFiles
from thrifty.methods.temporal_gradient.trivial import train_frame_classifier, worst_frame_accuracy

log = logging.getLogger(__name__)

RECIPE = "temporal_gradient"
Config = TemporalGradientConfig
TRIVIAL_NAME = "single-frame classifier (all training labels; its best frame position)"
PAPER = {
    "title": "Learning from Temporal Gradient for Semi-supervised Action Recognition",
    "arxiv": "2111.13241",
}


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """What distinguishes the arms."""

    two_stream: bool
    unlabelled: bool
    threshold: float | None = None  # None: the config's loss.threshold
    pseudo_from: str = "avg"  # "avg" of both streams or "rgb"
    align: bool = True
    contrast: bool = True


ARM_SPECS: dict[str, ArmSpec] = {
    "supervised": ArmSpec(two_stream=False, unlabelled=False),
    "fixmatch_095": ArmSpec(two_stream=False, unlabelled=True, threshold=0.95, pseudo_from="rgb"),
    "fixmatch_03": ArmSpec(two_stream=False, unlabelled=True, threshold=0.3, pseudo_from="rgb"),
    "tg_full": ArmSpec(two_stream=True, unlabelled=True),
    "tg_no_align": ArmSpec(two_stream=True, unlabelled=True, align=False),
    "tg_no_contrast": ArmSpec(two_stream=True, unlabelled=True, contrast=False),
    "tg_rgb_pseudo": ArmSpec(two_stream=True, unlabelled=True, pseudo_from="rgb"),
}


def warmup_steps(fraction: float, cfg: TemporalGradientConfig) -> int:
    """``fraction`` of ``max_steps``, rounded (the release's 30 of 180 epochs -> 1/6 of the steps)."""
    return round(fraction * cfg.max_steps)


def lr_at(step: int, cfg: TemporalGradientConfig) -> float:
    """Linear warm-up from ``warmup_ratio`` over ``warmup_fraction`` of the steps, then cosine decay to 0
    (``step`` is 0-based). With ``scale_lr`` the peak is the release's 0.2 per 40 clips, scaled linearly."""
    o = cfg.optim
    peak = o.lr
    if o.scale_lr:
        peak = 0.2 * (cfg.data.labelled_per_step + cfg.data.unlabelled_per_step) / 40.0
    warm = warmup_steps(o.warmup_fraction, cfg)
    if step < warm:
        return peak * (o.warmup_ratio + (1.0 - o.warmup_ratio) * step / warm)
    rest = max(cfg.max_steps - warm, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step - warm, rest) / rest))


def unit_dir_for(run_dir: Path, arm: str, seed: int, fraction: float | None = None) -> Path:
    base = run_dir / "units" if fraction is None else run_dir / "units" / "sweep" / f"p{fraction:g}"
    return base / arm / f"seed{seed}"


def build_model(cfg: TemporalGradientConfig, spec: ArmSpec, num_classes: int) -> TwoStreamNet:
    m = cfg.model
    model = TwoStreamNet(
        num_classes=num_classes,
        widths=tuple(m.widths),
        blocks=tuple(m.blocks),
        proj_dim=m.proj_dim,
        dropout=m.dropout,
        bn_eps=m.bn_eps,
    )
    if not spec.two_stream:
        return model.drop_training_branches()
    if not spec.contrast:  # the ablation trains no contrast heads (all parameters then get a gradient, as DDP wants)
        model.rgb_proj = model.tg_proj = None
    return model


# --- evaluation ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def predict(
    model: TwoStreamNet, videos: VideoSet | VideoFiles, cfg: TemporalGradientConfig, device: torch.device
) -> np.ndarray:
    """Class probabilities (N, K) from the RGB network alone, averaged over the test views (a real split is
    decoded batch by batch)."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(videos), cfg.eval_batch_size):
        rows = np.arange(i, min(i + cfg.eval_batch_size, len(videos)))
        views = eval_views(videos, rows, cfg)  # (n, V, 3, T, S, S)
        probs = torch.softmax(model(views.flatten(0, 1).to(device)), dim=1).cpu()
        out.append(probs.unflatten(0, views.shape[:2]).mean(1))
    model.train(was)
    return torch.cat(out).numpy()


def accuracy_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Top-1 and mean class accuracy (%)."""
    pred = probs.argmax(1)
    per_class = [float(np.mean(pred[labels == c] == c)) for c in range(num_classes) if np.any(labels == c)]
    return {"top1": 100.0 * float(np.mean(pred == labels)), "mean_class": 100.0 * float(np.mean(per_class))}


# --- one unit -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepLoss:
    total: torch.Tensor
    parts: dict[str, float]
    pseudo: tuple[torch.Tensor, torch.Tensor] | None = None  # (labels, mask) of the unlabelled clips


def compute_loss(
    spec: ArmSpec, net: torch.nn.Module, clips: StepClips, cfg: TemporalGradientConfig, step: int
) -> StepLoss:
    """The arm's loss on one step (labelled, weak and strong clips in one forward per stream, as released)."""
    w = cfg.loss
    n_l, n_u = len(clips.y_l), len(clips.y_u)
    pseudo_on = losses.pseudo_label_weight(step, warmup_steps=warmup_steps(cfg.loss.warmup_fraction, cfg))
    threshold = w.threshold if spec.threshold is None else spec.threshold
    parts: dict[str, float] = {}
    if not spec.two_stream:
        x = torch.cat([clips.rgb_l, clips.rgb_uw, clips.rgb_us]) if spec.unlabelled else clips.rgb_l
        logits = net(x)
        sup = losses.supervised_loss(logits[:n_l], None, clips.y_l)
        total, parts["supervised"] = sup, sup.item()
        pseudo = None
        if spec.unlabelled:
            z_w, z_s = logits[n_l : n_l + n_u], logits[n_l + n_u :]
            yhat, mask, _ = losses.pseudo_labels(z_w, None, threshold=threshold, modalities="rgb")
            pl = losses.pseudo_label_loss(z_s, None, yhat, mask)
            total = total + w.pseudo_weight * pseudo_on * pl
            parts["pseudo"], pseudo = pl.item(), (yhat, mask)
        parts["total"] = total.item()
        return StepLoss(total, parts, pseudo)
    out = net(  # through the DDP wrapper's forward, so the gradients are averaged over ranks
        torch.cat([clips.rgb_l, clips.rgb_uw, clips.rgb_us]), torch.cat([clips.tg_l, clips.tg_uw, clips.tg_us])
    )
    lw = n_l + n_u  # labelled + weak unlabelled rows: the alignment and contrast terms (the release's choice)
    sup = losses.supervised_loss(out.logits_rgb[:n_l], out.logits_tg[:n_l], clips.y_l)
    yhat, mask, _ = losses.pseudo_labels(
        out.logits_rgb[n_l:lw],
        out.logits_tg[n_l:lw] if spec.pseudo_from == "avg" else None,
        threshold=threshold,
        modalities=spec.pseudo_from,
    )
    pl = losses.pseudo_label_loss(out.logits_rgb[lw:], out.logits_tg[lw:], yhat, mask)
    total = sup + w.pseudo_weight * pseudo_on * pl
    parts.update(supervised=sup.item(), pseudo=pl.item())
    if spec.align:
        al = losses.alignment_loss([f[:lw] for f in out.feats_rgb], [f[:lw] for f in out.feats_tg])
        total = total + w.align_weight * al
        parts["align"] = al.item()
    if spec.contrast:
        emb_rgb, emb_tg = out.emb_rgb[:lw], out.emb_tg[:lw]
        if w.gather_negatives:  # the global batch's views as negatives (identity in one process)
            emb_rgb, emb_tg = distributed.all_gather_with_grad(emb_rgb), distributed.all_gather_with_grad(emb_tg)
        ct = losses.nt_xent(emb_rgb, emb_tg, temperature=w.temperature)
        total = total + w.contrast_weight * ct
        parts["contrast"] = ct.item()
    parts["total"] = total.item()
    return StepLoss(total, parts, (yhat, mask))


def precise_bn_clips(
    data: TGData,
    labelled: np.ndarray,
    cfg: TemporalGradientConfig,
    seed: int,
    info: distributed.DistInfo,
    *,
    unlabelled: bool,
) -> list[torch.Tensor]:
    """The ``precise_bn_batches`` weak RGB batches precise BN runs over (the same at every evaluation of a unit, so
    drawn once); the unlabelled stream only for arms that use it (the supervised arm never sees an unlabelled
    video)."""
    gen = torch.Generator().manual_seed(seed * 104729 + 1)
    batches = []
    for k in range(cfg.precise_bn_batches):
        c = draw_step(
            data,
            labelled,
            cfg,
            seed=seed + 7,
            step=k + 1,
            rank=info.rank,
            world=info.world_size,
            gen=gen,
            unlabelled=unlabelled,
            motion=False,
        )
        batches.append(torch.cat([c.rgb_l, c.rgb_uw]).to(info.device))
    return batches


def precise_bn(model: TwoStreamNet, batches: list[torch.Tensor]) -> None:
    """Recompute the RGB network's BatchNorm statistics over ``batches`` (the release's
    ``bn_range=['backbone', 'cls_head']``), averaged over DDP ranks."""
    if not batches:
        return
    rgb = torch.nn.ModuleDict({"backbone": model.rgb_backbone, "head": model.rgb_head})
    recompute_bn_stats(rgb, batches, forward=lambda x: model(x))
    distributed.sync_batchnorm_stats(rgb)


def train_unit(
    arm: str,
    seed: int,
    cfg: TemporalGradientConfig,
    data: TGData,
    run_dir: Path,
    metrics: MetricsLog,
    info: distributed.DistInfo,
    *,
    fraction: float | None = None,
    write_result: bool = True,
) -> dict[str, Any]:
    """Train one arm with one seed at ``fraction`` labels (default ``data.labelled_fraction``); select the step on
    validation; test once. Returns the unit's result record (also written to ``result.json`` unless
    ``write_result`` is False)."""
    frac = cfg.data.labelled_fraction if fraction is None else fraction
    unit = f"{arm}/seed{seed}" if fraction is None else f"sweep/p{fraction:g}/{arm}/seed{seed}"
    unit_dir = unit_dir_for(run_dir, arm, seed, fraction)
    done_file = unit_dir / "result.json"
    if cfg.resume and done_file.exists():
        log.info("%s: finished earlier, reusing %s", unit, done_file)
        return json.loads(done_file.read_text())
    metrics.truncate(unit, 0)
    spec = ARM_SPECS[arm]
    for key in ("labelled_per_step", "unlabelled_per_step"):
        if getattr(cfg.data, key) % info.world_size:
            raise ConfigError(f"config key 'data.{key}' must be divisible by the world size ({info.world_size})")
    labelled = data.labelled_indices(frac)
    k = len(data.class_names)

    seed_everything(seed)
    model = distributed.with_sync_bn(
        build_model(cfg, spec, k), enabled=info.enabled and cfg.model.sync_bn, device=info.device
    )
    model = model.to(info.device)
    net = DDP(model) if info.enabled else model
    o = cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    gen = torch.Generator().manual_seed(seed * 7919 + info.rank)
    best: dict[str, Any] = {"top1": -math.inf, "step": 0, "state": None, "val": None}
    curve: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    n_logged, t_train = 0, 0.0
    pl_counts = np.zeros((k, k), dtype=np.int64)  # (true, pseudo) of kept pseudo-labels after warm-up
    pl_seen, pl_kept = 0, 0
    bn_clips = precise_bn_clips(data, labelled, cfg, seed, info, unlabelled=spec.unlabelled)
    with progress(cfg.max_steps, unit, enabled=cfg.progress and info.is_main) as advance:
        for step in range(1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            model.train()
            clips = draw_step(
                data,
                labelled,
                cfg,
                seed=seed,
                step=step,
                rank=info.rank,
                world=info.world_size,
                gen=gen,
                unlabelled=spec.unlabelled,
                motion=spec.two_stream,
            ).to(info.device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step - 1, cfg)
            res = compute_loss(spec, net, clips, cfg, step - 1)
            opt.zero_grad(set_to_none=True)
            res.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            opt.step()
            t_train += time.perf_counter() - t0
            if res.pseudo is not None and step - 1 >= warmup_steps(cfg.loss.warmup_fraction, cfg):
                yhat, mask = (t.cpu().numpy() for t in res.pseudo)
                truth = clips.y_u.cpu().numpy()
                np.add.at(pl_counts, (truth[mask], yhat[mask]), 1)
                pl_seen, pl_kept = pl_seen + len(mask), pl_kept + int(mask.sum())
            for key, v in res.parts.items():
                sums[key] = sums.get(key, 0.0) + v
            n_logged += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                avg = {key: v / n_logged for key, v in sums.items()}
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "step": step, "lr": lr_at(step - 1, cfg), **avg})
                advance(n_logged, loss=avg["total"])
                sums, n_logged = {}, 0
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                precise_bn(model, bn_clips)
                val = data.val.get("selection", unit)
                acc = accuracy_metrics(predict(model, val, cfg, info.device), val.labels, k)
                point = {"step": step, "val_top1": acc["top1"], "val_mean_class": acc["mean_class"]}
                curve.append(point)
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "split": "val", **point})
                if acc["top1"] > best["top1"]:
                    best = {"top1": acc["top1"], "step": step, "state": copy.deepcopy(model.state_dict()), "val": acc}
    model.load_state_dict(best["state"])
    kept = np.trace(pl_counts)
    result: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "labelled_fraction": frac,
        "labelled_videos": len(labelled),
        "steps": cfg.max_steps,
        "best_step": best["step"],
        "curve": curve,
        "val": best["val"],
        "pseudo": {
            "mask_rate": pl_kept / pl_seen if pl_seen else float("nan"),
            "accuracy": 100.0 * kept / pl_kept if pl_kept else float("nan"),
            "confusion": pl_counts.tolist(),
        },
        "train_seconds": t_train,
        "train_clips_per_s": cfg.max_steps
        * (cfg.data.labelled_per_step + (cfg.data.unlabelled_per_step * 2 if spec.unlabelled else 0))
        / max(t_train, 1e-9),
        "params": sum(p.numel() for p in model.parameters()),
        "inference_params": sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(("rgb_backbone.", "rgb_head."))
        ),
    }
    if cfg.final_test:
        test = data.test.get("final_test", unit)  # the only read of the test split
        t0 = time.perf_counter()
        probs = predict(model, test, cfg, info.device)
        result["infer_clips_per_s"] = len(test) / max(time.perf_counter() - t0, 1e-9)
        result["test"] = accuracy_metrics(probs, test.labels, k)
    if info.is_main:
        unit_dir.mkdir(parents=True, exist_ok=True)
        save_file(model.rgb_only_state_dict(), str(unit_dir / "model.safetensors"))
        write_json(unit_dir / "card.json", model_card(cfg, arm, seed, data.class_names))
        if write_result:  # a parallel worker leaves it to the parent, which writes it after the unit's logs
            write_json(done_file, result)
    distributed.barrier()
    return result


def model_card(cfg: TemporalGradientConfig, arm: str, seed: int, classes: list[str]) -> dict[str, Any]:
    """The JSON that travels with ``model.safetensors`` (the RGB network only: what inference needs)."""
    return {
        "recipe": RECIPE,
        "paper": PAPER,
        "arm": arm,
        "seed": seed,
        "classes": classes,
        "model": to_dict(cfg.model),
        "clip_len": cfg.data.clip_len,
        "frame_interval": cfg.data.frame_interval,
        "crop_size": cfg.data.crop_size,
        "rgb_norm": cfg.data.rgb_norm,
        "input": "RGB clip (N, 3, clip_len, crop_size, crop_size) in [0, 1], then normalised as 'rgb_norm' says: "
        + (
            "each clip's channels minus their mean over (T, H, W), divided by their std"
            if cfg.data.rgb_norm == "clip"
            else "the ImageNet mean/std"
        ),
        "output": "one logit per class, in the order of 'classes'",
    }


# --- the trivial baseline -------------------------------------------------------------------------------------


def trivial_unit(cfg: TemporalGradientConfig, data: TGData) -> dict[str, Any]:
    """The single-frame classifier, one per seed, trained on every training label (the sanity control)."""
    k = len(data.class_names)
    out: dict[str, Any] = {"arm": TRIVIAL_NAME, "val": {}, "test": {}}
    if not isinstance(data.train, VideoSet):
        log.info("no single-frame control on a real dataset (a frame of a real video shows its scene)")
        out["note"] = "not run: the single-frame control is the synthetic miniature's sanity check"
        return out
    val = data.val.get("calibration", "trivial")
    test = data.test.get("final_test", "trivial") if cfg.final_test else None
    for seed in cfg.seeds:
        model = train_frame_classifier(
            data.train.videos, data.train.labels, num_classes=k, steps=cfg.trivial_steps, seed=seed
        )
        out["val"][seed] = worst_frame_accuracy(model, val.videos, val.labels)
        if test is not None:
            out["test"][seed] = worst_frame_accuracy(model, test.videos, test.labels)
    return out


# --- claims and tables --------------------------------------------------------------------------------------


def _metric(results: dict[str, dict[int, dict]], arm: str, key: str = "top1") -> dict[int, float]:
    return {s: r["test"][key] for s, r in results.get(arm, {}).items() if "test" in r}


def make_claims(
    cfg: TemporalGradientConfig,
    results: dict[str, dict[int, dict]],
    trivial: dict[str, Any],
    sweep: dict[float, dict[str, dict[int, dict]]],
    num_classes: int,
) -> list[Claim]:
    """The card's ordering, the ablations, the shrinking gap, the sanity control and the "works" claim; every
    comparison paired over seeds on the test split (RGB-only top-1)."""
    claims: list[Claim] = []
    p = cfg.preset
    pct = f"{100 * cfg.data.labelled_fraction:g}%"

    def paired(cid: str, a: str, b: str, statement: str, paper: Any) -> None:
        if a in results and b in results:
            claims.append(
                paired_claim(
                    id=cid,
                    statement=statement,
                    a=_metric(results, a),
                    b=_metric(results, b),
                    direction="greater",
                    paper_value=paper,
                    preset=p,
                    baseline=b,
                    unit="top-1 points",
                )
            )

    paired(
        "tg_beats_fixmatch_03",
        "tg_full",
        "fixmatch_03",
        f"TG-full beats FixMatch (tau 0.3) in RGB-only test top-1 at {pct} labels",
        "TG > FixMatch (state of the art on UCF-101, HMDB-51, Kinetics-400)",
    )
    paired(
        "fixmatch_095_beats_supervised",
        "fixmatch_095",
        "supervised",
        f"FixMatch (tau 0.95) beats supervised-only training in test top-1 at {pct} labels",
        "FixMatch > supervised (the card's ordering)",
    )
    if "fixmatch_03" in results and "fixmatch_095" in results:
        a, b = _metric(results, "fixmatch_03"), _metric(results, "fixmatch_095")
        seeds = sorted(set(a) & set(b))
        claims.append(
            value_claim(
                id="fixmatch_03_not_below_095",
                values=[a[s] - b[s] for s in seeds],
                seeds=seeds,
                direction="greater",
                threshold=-1.0,
                preset=p,
                baseline="FixMatch tau 0.95 - 1 point",
                unit="top-1 points",
                statement="FixMatch with tau 0.3 is not worse than with tau 0.95 by more than 1 point of test top-1 "
                "(non-inferiority)",
                paper_value="FixMatch(0.3) >= FixMatch(0.95) (the card's ordering)",
            )
        )
    for ablation, term in (
        ("tg_no_align", "the alignment"),
        ("tg_no_contrast", "the contrastive term"),
        ("tg_rgb_pseudo", "pseudo-labels from both streams"),
    ):
        paired(
            f"tg_full_beats_{ablation}",
            "tg_full",
            ablation,
            f"removing {term} lowers TG's test top-1",
            "every TG term helps (the paper's ablations)",
        )
    if sweep:
        fr = sorted(sweep)
        lo, hi = fr[0], fr[-1]

        def gap(f: float) -> dict[int, float]:
            a, b = _metric(sweep[f], "tg_full"), _metric(sweep[f], "supervised")
            return {s: a[s] - b[s] for s in set(a) & set(b)}

        if lo != hi and gap(lo) and gap(hi):
            claims.append(
                paired_claim(
                    id="gap_shrinks_with_labels",
                    a=gap(lo),
                    b=gap(hi),
                    direction="greater",
                    preset=p,
                    baseline=f"the gap at {100 * hi:g}% labels",
                    unit="top-1 points",
                    statement=f"TG's gain over supervised-only is larger at {100 * lo:g}% labels than at {100 * hi:g}%",
                    paper_value="the gap shrinks as the labelled fraction grows",
                )
            )
    frame = trivial.get("test", {})
    if frame:
        seeds = sorted(frame)
        claims.append(
            value_claim(
                id="single_frame_near_chance",
                values=[frame[s] for s in seeds],
                seeds=seeds,
                direction="less",
                threshold=100.0 / num_classes + 5.0,
                preset=p,
                baseline="chance + 5 points",
                unit="top-1 %",
                statement="a single-frame classifier trained on every training label stays within 5 points of chance "
                "at its best frame position (the class lives in the motion)",
                paper_value="the card's sanity control (~10%)",
            )
        )
    method = _metric(results, "tg_full")
    if method and frame:
        claims.append(
            works_claim(
                id="tg_works",
                method=method,
                baseline_value={s: frame[s] for s in frame},
                margin=cfg.works_margin,
                direction="greater",
                preset=p,
                baseline="single-frame classifier",
                unit="top-1 points",
                statement=f"TG-full beats the single-frame classifier by more than {cfg.works_margin:g} top-1 points",
            )
        )
    return claims


def accuracy_table(results: dict[str, dict[int, dict]], trivial: dict[str, Any], split: str) -> dict[str, Any]:
    rows = []
    for arm, per in results.items():
        rs = [r[split] for r in per.values() if r.get(split)]
        pl = [r["pseudo"] for r in per.values()]
        rows.append(
            [
                arm,
                len(rs),
                format_mean_ci([r["top1"] for r in rs]),
                format_mean_ci([r["mean_class"] for r in rs]),
                format_mean_ci([x["mask_rate"] * 100 for x in pl if not math.isnan(x["mask_rate"])]),
                format_mean_ci([x["accuracy"] for x in pl if not math.isnan(x["accuracy"])]),
            ]
        )
    if trivial.get(split):
        rows.append([TRIVIAL_NAME, len(trivial[split]), format_mean_ci(list(trivial[split].values())), "", "", ""])
    return {
        "title": f"{'Test' if split == 'test' else 'Validation'} accuracy (%) of the RGB network, mean [95% "
        "t-interval] over seeds; pseudo-labels kept (%) and their accuracy (%) after warm-up",
        "columns": ["arm", "seeds", "top-1", "mean class", "pseudo-labels kept", "pseudo-label accuracy"],
        "rows": rows,
    }


def sweep_table(sweep: dict[float, dict[str, dict[int, dict]]]) -> dict[str, Any]:
    arms = sorted({a for per in sweep.values() for a in per})
    rows = [
        [f"{100 * f:g}%", *[format_mean_ci(list(_metric(sweep[f], a).values())) for a in arms]] for f in sorted(sweep)
    ]
    return {"title": "Label-fraction sweep: test top-1 (%)", "columns": ["labelled", *arms], "rows": rows}


def cost_table(results: dict[str, dict[int, dict]]) -> dict[str, Any]:
    return per_arm_table(
        results,
        title="Cost per unit (mean over seeds): training seconds, training clips/s (strong views counted), "
        "inference videos/s, parameters trained and used at inference",
        columns=[("train s", mean_of("train_seconds")), ("train clips/s", mean_of("train_clips_per_s")),
                 ("infer videos/s", mean_of("infer_clips_per_s")), ("params", first_of("params")),
                 ("inference params", first_of("inference_params"))],
    )  # fmt: skip


# --- the recipe -----------------------------------------------------------------------------------------


def unit_cost(job: UnitJob) -> float:
    """Relative cost of a unit (two networks > the unlabelled stream > labelled clips only), for the start order
    of parallel workers."""
    spec = ARM_SPECS[job[0]]
    return 4.0 if spec.two_stream else 2.0 if spec.unlabelled else 1.0


def train(cfg: TemporalGradientConfig) -> dict[str, Any]:
    """Run the recipe; returns the ``results.json`` content."""
    t_start = time.perf_counter()
    info, run_dir, metrics = open_run(RECIPE, cfg)
    access = AccessLog(run_dir / "access_log.jsonl" if info.is_main else None)
    data = main_first(lambda: prepare_data(cfg, data_root(cfg), access), info)
    summary = new_summary(RECIPE, PAPER, cfg, run_dir, data=data.info)
    results: dict[str, dict[int, dict]] = {}
    sweep: dict[float, dict[str, dict[int, dict]]] = {}
    if "train" in cfg.stages:
        results, sweep = parallel.train_arms_and_sweep(
            __name__, cfg=cfg, data=data, run_dir=run_dir, metrics=metrics, access=access, info=info,
            point_key="fraction", points=cfg.sweep.labelled_fractions, main_point=cfg.data.labelled_fraction,
            cost=unit_cost,
        )  # fmt: skip
    if "eval" in cfg.stages and info.is_main:
        if not results:
            results, sweep = load_results(run_dir, cfg)
        trivial = trivial_unit(cfg, data)
        split = "test" if cfg.final_test else "val"
        tables = [accuracy_table(results, trivial, split)]
        claims: list[Claim] = []
        if cfg.final_test:
            claims = make_claims(cfg, results, trivial, sweep, len(data.class_names))
            if sweep:
                tables.append(sweep_table(sweep))
        figs = figures.make_all(run_dir, results, sweep, trivial, data, cfg)
        summary.update(
            trivial=trivial,
            claims=[c.to_dict() for c in claims],
            tables=[*tables, cost_table(results)],
            figures=[str(p.relative_to(run_dir)) for p in figs if p is not None],
        )
    return finish_run(summary, run_dir, cfg, t_start=t_start, info=info)


def load_results(run_dir: Path, cfg: TemporalGradientConfig) -> tuple[dict, dict]:
    """Finished units of an earlier ``train`` stage (for ``stages=[eval]``)."""
    return load_unit_results(
        run_dir,
        unit_dir_for,
        arms=cfg.arms,
        seeds=cfg.seeds,
        sweep_points=cfg.sweep.labelled_fractions,
        sweep_arms=cfg.sweep.arms,
        point_of=lambda r: r["labelled_fraction"],
    )
