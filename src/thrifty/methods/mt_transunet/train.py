"""The MT-TransUNet recipe: joint skin-lesion segmentation and classification with multi-task tokens.

Chen, Chen, Zhou, Yuille, *MT-TransUNet* (arXiv 2112.01767). One network (a CNN stem, a Transformer whose CLS
token classifies and whose patch tokens segment through TransUNet's cascaded upsampler, a parallel SDF head)
trains on two streams per batch: images with masks and images with class labels only. The arms switch task terms
on and off:

=========================  ============================================================================
arm                        loss
=========================  ============================================================================
``seg_only``               CE_seg on the masked half
``cls_only``               CE_cls on every image (weight 1, as the release)
``seg+cls``                both
``seg+dual``               CE_seg + 5 · L_sdf (masked half) + w(e) · L_cons (whole batch)
``seg+cls+dual``           the paper's loss (all of the above)
``seg+cls+dual+cs/+ac``    + 0.1 × the CLS-attention / segmentation consistency term (release weight 0)
=========================  ============================================================================

Each unit keeps two checkpoints chosen on validation, as the release keeps two (it chooses on the test split; we
never do): the step with the best Jaccard for the segmentation metrics and the step with the best mean
melanoma/SK AUC for the classification metrics. The test splits (in-domain and PH2-like) are read once, at the
end of each unit. Claims compare arms paired over seeds.
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
from safetensors.torch import save_model
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed
from thrifty.core.claims import Claim, format_mean_ci, paired_claim, value_claim, works_claim
from thrifty.core.config import to_dict
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
from thrifty.core.tables import IMAGE_COST_COLUMNS, first_of, per_arm_table
from thrifty.data.dermoscopy import normalised_sdf
from thrifty.methods.mt_transunet import figures
from thrifty.methods.mt_transunet.augment import augment, random_resize
from thrifty.methods.mt_transunet.config import CLASSES, MTTransUNetConfig
from thrifty.methods.mt_transunet.data import LesionSet, MTData, concat, prepare_data
from thrifty.methods.mt_transunet.inference import infer
from thrifty.methods.mt_transunet.losses import LossParts, mt_loss, ramp_weight
from thrifty.methods.mt_transunet.metrics import (
    attention_in_lesion,
    classification_metrics,
    segmentation_metrics,
    sensitivity_specificity,
    threshold_at_specificity,
)
from thrifty.methods.mt_transunet.model import MTOutput, build_model, count_parameters
from thrifty.methods.mt_transunet.sampling import TwoStreamBatchSampler, poly_lr
from thrifty.methods.mt_transunet.trivial import HistogramClassifier, colour_threshold_masks

log = logging.getLogger(__name__)

RECIPE = "mt_transunet"
Config = MTTransUNetConfig
PAPER = {
    "title": "MT-TransUNet: Mediating Multi-Task Tokens in Transformers for Skin Lesion Segmentation and "
    "Classification",
    "arxiv": "2112.01767",
}
TRIVIAL_SEG = "colour distance to the skin + Otsu (training-free)"
TRIVIAL_CLS = "colour histogram + logistic regression"


# --- arms -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """Which task terms an arm trains with."""

    seg: bool
    cls: bool
    dual: bool
    cs: bool = False
    ac: bool = False


ARM_SPECS: dict[str, ArmSpec] = {
    "seg_only": ArmSpec(seg=True, cls=False, dual=False),
    "cls_only": ArmSpec(seg=False, cls=True, dual=False),
    "seg+cls": ArmSpec(seg=True, cls=True, dual=False),
    "seg+dual": ArmSpec(seg=True, cls=False, dual=True),
    "seg+cls+dual": ArmSpec(seg=True, cls=True, dual=True),
    "seg+cls+dual+cs": ArmSpec(seg=True, cls=True, dual=True, cs=True),
    "seg+cls+dual+ac": ArmSpec(seg=True, cls=True, dual=True, ac=True),
}


def sweep_fractions(cfg: MTTransUNetConfig) -> list[float]:
    """The masked fractions of the sweep, with the main run's (``data.masked_fraction``; its units are reused) added
    so the sweep's claim can compare the smallest fraction with it. Empty when no sweep is asked for."""
    if not cfg.sweep.masked_fractions:
        return []
    return sorted({*cfg.sweep.masked_fractions, cfg.data.masked_fraction})


def unit_dir_for(run_dir: Path, arm: str, seed: int, fraction: float | None = None) -> Path:
    base = run_dir / "units" if fraction is None else run_dir / "units" / "sweep" / f"f{fraction:g}"
    return base / arm / f"seed{seed}"


# --- batches and evaluation -------------------------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    """One training batch on the device: ``images`` (B, 3, S, S), ``masks`` (B, S, S) int64, ``sdf`` (B, 1, S, S)
    the normalised ground-truth SDF of the augmented masks (zeros where ``has_mask`` is False), ``has_mask`` (B,),
    ``labels`` (B,)."""

    images: torch.Tensor
    masks: torch.Tensor
    sdf: torch.Tensor
    has_mask: torch.Tensor
    labels: torch.Tensor


def make_batch(part: LesionSet, cfg: MTTransUNetConfig, gen: torch.Generator, device: torch.device) -> Batch:
    """Augment ``part`` (image and mask alike) and compute the ground-truth SDF of each augmented mask."""
    a = cfg.data.augment
    images, masks = augment(part.images, part.masks, generator=gen, crop_prob=a.crop_prob,
                            crop_fraction=tuple(a.crop_fraction), flip=a.flip)  # fmt: skip
    images, masks = random_resize(images, masks, sizes=a.random_sizes, generator=gen)
    sdf = np.zeros(masks.shape, dtype=np.float32)
    keep = part.has_mask.numpy()
    if keep.any():
        sdf[keep] = normalised_sdf(masks.numpy()[keep].astype(np.uint8))
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    return Batch(images, masks.to(device), torch.from_numpy(sdf).unsqueeze(1).to(device),
                 part.has_mask.to(device), part.labels.to(device))  # fmt: skip


def predict(
    model: torch.nn.Module, images: torch.Tensor, cfg: MTTransUNetConfig, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion probabilities (N, S, S) and class probabilities (N, 3) of ``model`` on ``images`` (N, 3, S, S), with
    the configured test-time augmentation (``tta``; the miniature uses none)."""
    return infer(model, images, batch_size=cfg.eval_batch_size, device=device, sizes=cfg.tta.sizes, views=cfg.tta.views)


def specificity_thresholds(cls_probs: np.ndarray, labels: np.ndarray, cfg: MTTransUNetConfig) -> dict[str, float]:
    """Melanoma and SK score thresholds reaching ``fixed_specificity`` on validation (NaN when a class is absent)."""
    out = {}
    for key, c in (("melanoma", 0), ("sk", 1)):
        pos = labels == c
        out[key] = threshold_at_specificity(cls_probs[:, c], pos, cfg.fixed_specificity) if (~pos).any() else math.nan
    return out


def at_fixed_specificity(cls_probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    """Test sensitivity and specificity (%) at the validation-fixed thresholds."""
    out = {}
    for key, c in (("melanoma", 0), ("sk", 1)):
        sens, spec = sensitivity_specificity(cls_probs[:, c], labels == c, thresholds[key])
        out[f"{key}_sens_at_fixed_spec"], out[f"{key}_spec_at_fixed_spec"] = sens, spec
    return out


@torch.inference_mode()
def last_attention(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """The last layer's attention maps (N, heads, 1+N_tok, 1+N_tok) of ``model`` on ``images`` (no test-time
    augmentation), for the attention-in-lesion diagnostic."""
    was = model.training
    model.eval()
    maps = [
        model(images[i : i + batch_size].to(device)).attentions[-1].float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    model.train(was)
    return torch.cat(maps).numpy()


def evaluate(seg_probs: np.ndarray, cls_probs: np.ndarray, data: LesionSet, spec: ArmSpec) -> dict[str, Any]:
    """The task metrics an arm trains for (segmentation with a mask head, classification with a class head)."""
    out: dict[str, Any] = {}
    if spec.seg:
        out["seg"] = segmentation_metrics(seg_probs > 0.5, data.masks.numpy())
    if spec.cls:
        out["cls"] = classification_metrics(cls_probs, data.labels.numpy())
    return out


# --- one unit ---------------------------------------------------------------------------------------------


def compute_loss(spec: ArmSpec, net: torch.nn.Module, batch: Batch, cfg: MTTransUNetConfig, ramp: float) -> LossParts:
    """The arm's loss on one batch. ``cls_only`` weighs CE_cls by 1, as the release does (``loss = cls_loss``)."""
    out: MTOutput = net(batch.images)
    w = cfg.loss
    cls_weight = 1.0 if spec.cls and not (spec.seg or spec.dual) else w.cls_weight
    parts = mt_loss(
        out, masks=batch.masks, sdf_gt=batch.sdf, has_mask=batch.has_mask, labels=batch.labels,
        use_seg=spec.seg, use_cls=spec.cls, use_dual=spec.dual, ramp=ramp, sdf_weight=w.sdf_weight,
        cls_weight=cls_weight, cons_weight=w.cons_weight, cons_on=w.cons_on, seg_ce_form=w.seg_ce, sdf_k=w.sdf_k,
        label_smoothing=w.label_smoothing, att_weight=w.att_weight, ds_weight=w.ds_weight,
        cs_weight=w.optional_weight if spec.cs else 0.0, ac_weight=w.optional_weight if spec.ac else 0.0,
    )  # fmt: skip
    if isinstance(net, DDP):
        # DDP waits for a gradient of every parameter that reaches a forward output: the outputs this arm's loss
        # does not read (the ds head at ds_weight 0, the decoder in cls_only ...) join it as exact zeros
        parts.total = parts.total + sum(t[:0].sum() for t in (out.cls_logits, out.seg_logits, out.sdf, out.ds_logits))
    return parts


def train_unit(
    arm: str,
    seed: int,
    cfg: MTTransUNetConfig,
    data: MTData,
    run_dir: Path,
    metrics: MetricsLog,
    info: distributed.DistInfo,
    access: AccessLog,
    *,
    fraction: float | None = None,
) -> dict[str, Any]:
    """Train one arm with one seed (``fraction``: the masked-fraction sweep); select on validation; test once."""
    unit = f"{arm}/seed{seed}" if fraction is None else f"sweep/f{fraction:g}/{arm}/seed{seed}"
    unit_dir = unit_dir_for(run_dir, arm, seed, fraction)
    done_file = unit_dir / "result.json"
    if cfg.resume and done_file.exists():
        log.info("%s: finished earlier, reusing %s", unit, done_file)
        return json.loads(done_file.read_text())
    metrics.truncate(unit, 0)
    spec = ARM_SPECS[arm]
    masked_fraction = cfg.data.masked_fraction if fraction is None else fraction
    primary, secondary = data.streams(masked_fraction)
    train_set = concat([primary, secondary])
    per_rank = cfg.batch_size // info.world_size
    sampler = TwoStreamBatchSampler(
        primary=range(len(primary)), secondary=range(len(primary), len(train_set)),
        primary_per_batch=per_rank // 2, secondary_per_batch=per_rank - per_rank // 2,
        seed=seed, rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    # an epoch = one pass over the whole masked half at its per-batch share, the same for every masked fraction, so
    # the consistency ramp keeps one schedule across the sweep
    masked_per_batch = per_rank // 2 if len(data.unmasked) or masked_fraction < 1 else per_rank
    steps_per_epoch = cfg.steps_per_epoch or max(1, len(data.masked) // (masked_per_batch * info.world_size))

    seed_everything(seed)
    model = build_model(cfg.model, num_classes=len(CLASSES), image_size=cfg.data.image_size).to(info.device)
    model = model.to(memory_format=torch.channels_last)  # about 20% faster convolutions on CPU
    net = DDP(model) if info.enabled else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(seed * 7919 + info.rank)
    best = {
        "seg": {"score": -math.inf, "step": 0, "state": None},
        "cls": {"score": -math.inf, "step": 0, "state": None},
    }
    curve: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    n_logged, t_train = 0, 0.0
    batches = sampler.steps(0)  # endless: each pass over the masked stream is an epoch
    with progress(cfg.max_steps, unit, enabled=cfg.progress and info.is_main) as advance:
        for step in range(1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            model.train()
            batch = make_batch(train_set.subset(next(batches)), cfg, gen, info.device)
            lr = poly_lr(step - 1, base_lr=cfg.optim.lr, max_steps=cfg.optim.poly_steps or cfg.max_steps,
                         power=cfg.optim.power, min_lr=cfg.optim.min_lr)  # fmt: skip
            for g in opt.param_groups:
                g["lr"] = lr
            ramp = ramp_weight((step - 1) / steps_per_epoch, length=cfg.loss.ramp_epochs)
            parts = compute_loss(spec, net, batch, cfg, ramp)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            t_train += time.perf_counter() - t0
            for k, v in parts.floats().items():
                sums[k] = sums.get(k, 0.0) + v
            n_logged += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                avg = {k: v / n_logged for k, v in sums.items()}
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "step": step, "lr": lr, "ramp": ramp, **avg})
                advance(n_logged, loss=avg["total"])
                sums, n_logged = {}, 0
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                distributed.sync_batchnorm_stats(model)
                val = data.val.get("selection", unit)
                seg_p, cls_p = predict(model, val.images, cfg, info.device)
                m = evaluate(seg_p, cls_p, val, spec)
                point: dict[str, float] = {"step": step}
                if "seg" in m:
                    point["val_jaccard"] = m["seg"]["jaccard"]
                if "cls" in m:
                    point["val_mean_auc"] = m["cls"]["mean_auc"]
                curve.append(point)
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "split": "val", **point})
                for task, key in (("seg", "val_jaccard"), ("cls", "val_mean_auc")):
                    if key in point and point[key] > best[task]["score"]:
                        best[task] = {"score": point[key], "step": step, "state": copy.deepcopy(model.state_dict()),
                                      "val": m[task]}  # fmt: skip
                        if task == "cls":  # operating points fixed on validation, applied to test
                            best[task]["thresholds"] = specificity_thresholds(cls_p, val.labels.numpy(), cfg)
    result: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "masked_fraction": masked_fraction,
        "steps": cfg.max_steps,
        "steps_per_epoch": steps_per_epoch,
        "curve": curve,
        "best_step": {t: b["step"] for t, b in best.items() if b["state"] is not None},
        "val": {t: b["val"] for t, b in best.items() if b["state"] is not None},
        "train_seconds": t_train,
        "train_images_per_s": cfg.max_steps * cfg.batch_size / max(t_train, 1e-9),
        "params": count_parameters(model),
    }
    if cfg.final_test:  # the only reads of the test splits
        splits = {"test": data.test}
        if data.shifted_test is not None:
            splits["shifted_test"] = data.shifted_test
        for name, guarded in splits.items():
            test = guarded.get("final_test", unit)
            result[name] = {}
            for task, b in best.items():
                if b["state"] is None:
                    continue
                model.load_state_dict(b["state"])
                t0 = time.perf_counter()
                seg_p, cls_p = predict(model, test.images, cfg, info.device)
                if name == "test" and task == "seg":
                    result["infer_images_per_s"] = len(test) / max(time.perf_counter() - t0, 1e-9)
                result[name].update(evaluate(seg_p, cls_p, test, dataclasses.replace(
                    spec, seg=task == "seg", cls=task == "cls")))  # fmt: skip
                if task == "cls":
                    result[name]["cls_probs"] = cls_p.round(5).tolist()
                    result[name]["cls"].update(at_fixed_specificity(cls_p, test.labels.numpy(), b["thresholds"]))
                    attn = last_attention(model, test.images, cfg.eval_batch_size, info.device)
                    result[name]["cls"]["attention_in_lesion"] = attention_in_lesion(attn, test.masks.numpy())
    # the exported weights: the segmentation checkpoint when the arm segments, else the classification one
    chosen = best["seg"] if best["seg"]["state"] is not None else best["cls"]
    model.load_state_dict(chosen["state"])
    if info.is_main:
        unit_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(unit_dir / "model.safetensors"))
        write_json(unit_dir / "card.json", model_card(cfg, arm, seed))
        write_json(done_file, result)
    distributed.barrier()
    return result


def model_card(cfg: MTTransUNetConfig, arm: str, seed: int) -> dict[str, Any]:
    """The JSON that travels with ``model.safetensors``: what a user needs to rebuild and apply the model."""
    return {
        "recipe": RECIPE,
        "paper": PAPER,
        "arm": arm,
        "seed": seed,
        "classes": list(CLASSES),
        "model": to_dict(cfg.model) | {"weights": ""},
        "image_size": cfg.data.image_size,
        "input": "RGB resized (bicubic, aspect ratio not kept) to image_size x image_size, divided by 255",
        "tta": to_dict(cfg.tta),
        "output": "segmentation: softmax over (background, lesion) per pixel; classification: softmax over 'classes'",
    }


# --- trivial baselines ------------------------------------------------------------------------------------


def trivial_unit(cfg: MTTransUNetConfig, data: MTData) -> dict[str, Any]:
    """The trivial baselines on validation (and the test splits when ``final_test``): the colour-threshold
    segmenter (training-free) and the colour-histogram classifier (fitted on every training label)."""
    train = concat([data.masked, data.unmasked])
    clf = HistogramClassifier(seed=0).fit(train.raw, train.labels.numpy())

    def score(part: LesionSet) -> dict[str, Any]:
        seg = segmentation_metrics(colour_threshold_masks(part.raw), part.masks.numpy())
        cls = classification_metrics(clf.predict_proba(part.raw), part.labels.numpy())
        return {"seg": seg, "cls": cls}

    out: dict[str, Any] = {"seg_name": TRIVIAL_SEG, "cls_name": TRIVIAL_CLS,
                           "val": score(data.val.get("calibration", "trivial"))}  # fmt: skip
    if cfg.final_test:
        out["test"] = score(data.test.get("final_test", "trivial"))
        if data.shifted_test is not None:
            out["shifted_test"] = score(data.shifted_test.get("final_test", "trivial"))
    return out


# --- claims and tables ------------------------------------------------------------------------------------


def _metric(
    results: dict[str, dict[int, dict]], arm: str, task: str, key: str, split: str = "test"
) -> dict[int, float]:
    return {s: r[split][task][key] for s, r in results.get(arm, {}).items() if task in r.get(split, {})}


def make_claims(cfg: MTTransUNetConfig, results: dict[str, dict[int, dict]], trivial: dict[str, Any],
                sweep: dict[float, dict[str, dict[int, dict]]]) -> list[Claim]:  # fmt: skip
    """The card's miniature claims, the optional-term non-inferiority, the masked-fraction gap and the "works"
    claims; comparisons paired over seeds on the in-domain test split."""
    claims: list[Claim] = []
    p = cfg.preset

    def paired(cid: str, a: str, b: str, task: str, key: str, statement: str, paper: Any, unit: str) -> None:
        if a in results and b in results:
            claims.append(paired_claim(
                id=cid, statement=statement, a=_metric(results, a, task, key), b=_metric(results, b, task, key),
                direction="greater", paper_value=paper, preset=p, baseline=b, unit=unit,
            ))  # fmt: skip

    paired("seg_cls_beats_seg_only_jaccard", "seg+cls", "seg_only", "seg", "jaccard",
           "adding the classification task (CLS token) raises the test Jaccard over segmentation alone",
           "multi-task tokens help segmentation (per-metric values unverified)", "Jaccard points")  # fmt: skip
    paired("seg_cls_beats_cls_only_auc", "seg+cls", "cls_only", "cls", "mean_auc",
           "adding the segmentation task raises the mean melanoma/SK test AUC over classification alone",
           "multi-task tokens help classification (per-metric values unverified)", "AUC points")  # fmt: skip
    paired("dual_raises_jaccard", "seg+cls+dual", "seg+cls", "seg", "jaccard",
           "dual-task consistency, which lets the mask-free images train the segmentation branch, raises the test "
           "Jaccard of seg+cls", "the dual-task consistency helps (the paper's ablation)",
           "Jaccard points")  # fmt: skip
    paired("dual_raises_jaccard_seg_only", "seg+dual", "seg_only", "seg", "jaccard",
           "dual-task consistency raises the test Jaccard of segmentation alone (DTC's semi-supervised gain)",
           "DTC: consistency with unlabelled images helps segmentation", "Jaccard points")  # fmt: skip
    for extra in ("cs", "ac"):
        arm = f"seg+cls+dual+{extra}"
        if arm in results and "seg+cls+dual" in results:
            a = _metric(results, arm, "seg", "jaccard")
            b = _metric(results, "seg+cls+dual", "seg", "jaccard")
            seeds = sorted(set(a) & set(b))
            claims.append(value_claim(
                id=f"{extra}_does_not_hurt_jaccard", values=[a[s] - b[s] for s in seeds], seeds=seeds,
                direction="greater", threshold=-cfg.noninferiority_margin, preset=p,
                baseline=f"seg+cls+dual - {cfg.noninferiority_margin:g}", unit="Jaccard points",
                statement=f"the attention consistency term '{extra}' (weight {cfg.loss.optional_weight:g}) does not "
                f"lower the test Jaccard by more than {cfg.noninferiority_margin:g} points (non-inferiority)",
                paper_value="attended-region consistency does not hurt (release weight 0)",
            ))  # fmt: skip
    if sweep:
        fracs = sorted(sweep)
        lo, hi = fracs[0], fracs[-1]

        def gap(f: float) -> dict[int, float]:
            a = _metric(sweep[f], "seg+cls+dual", "seg", "jaccard")
            b = _metric(sweep[f], "seg+cls", "seg", "jaccard")
            return {s: a[s] - b[s] for s in set(a) & set(b)}

        if lo != hi and gap(lo) and gap(hi):
            claims.append(paired_claim(
                id="dual_gain_largest_with_few_masks", a=gap(lo), b=gap(hi), direction="greater", preset=p,
                baseline=f"the gain with {hi:.0%} of the masks", unit="Jaccard points",
                statement=f"the dual-task consistency's Jaccard gain over seg+cls is larger with {lo:.0%} of the masks "
                f"than with {hi:.0%}", paper_value="not reported (beyond the anchors: the masked-fraction sweep)",
            ))  # fmt: skip
    method = "seg+cls+dual"
    jac = _metric(results, method, "seg", "jaccard")
    if jac and "test" in trivial:
        base = trivial["test"]["seg"]["jaccard"]
        claims.append(works_claim(
            id="segmentation_works", method=jac, baseline_value=base, margin=cfg.works_margin, direction="greater",
            preset=p, baseline=f"{TRIVIAL_SEG} ({base:.1f})", unit="Jaccard points",
            statement=f"the full method's test Jaccard beats the training-free colour-threshold segmenter by more "
            f"than {cfg.works_margin:g} points",
        ))  # fmt: skip
    auc = _metric(results, method, "cls", "mean_auc")
    if auc and "test" in trivial:
        base = trivial["test"]["cls"]["mean_auc"]
        claims.append(works_claim(
            id="classification_works", method=auc, baseline_value=base, margin=cfg.works_margin,
            direction="greater", preset=p, baseline=f"{TRIVIAL_CLS} ({base:.1f})", unit="AUC points",
            statement=f"the full method's mean melanoma/SK test AUC beats the colour-histogram classifier by more "
            f"than {cfg.works_margin:g} points",
        ))  # fmt: skip
    return claims


SEG_KEYS = ("jaccard", "dice", "accuracy", "sensitivity", "specificity")
CLS_KEYS = ("melanoma_auc", "sk_auc", "mean_auc", "accuracy", "balanced_accuracy")


def metric_table(
    results: dict[str, dict[int, dict]], trivial: dict[str, Any], split: str, task: str
) -> dict[str, Any] | None:
    keys = SEG_KEYS if task == "seg" else CLS_KEYS
    rows = []
    for arm, per in results.items():
        rs = [r[split][task] for r in per.values() if task in r.get(split, {})]
        if rs:
            rows.append([arm, len(rs), *[format_mean_ci([r[k] for r in rs if np.isfinite(r[k])]) for k in keys]])
    if split in trivial:
        name = trivial["seg_name" if task == "seg" else "cls_name"]
        rows.append([name, "-", *[f"{trivial[split][task][k]:.1f}" for k in keys]])
    if not rows:
        return None
    where = {"test": "Test", "shifted_test": "PH2-like shifted test", "val": "Validation"}[split]
    what = "segmentation (%)" if task == "seg" else "classification (%)"
    return {
        "title": f"{where} {what}, mean [95% t-interval] over seeds",
        "columns": ["arm", "seeds", *keys],
        "rows": rows,
    }


def diagnostic_table(results: dict[str, dict[int, dict]], cfg: MTTransUNetConfig) -> dict[str, Any] | None:
    """Beyond the anchors: sensitivity at the validation-fixed specificity, and the share of the CLS token's
    last-layer attention that falls on the lesion (test split, classification checkpoint)."""
    keys = ("melanoma_sens_at_fixed_spec", "melanoma_spec_at_fixed_spec", "sk_sens_at_fixed_spec",
            "sk_spec_at_fixed_spec", "attention_in_lesion")  # fmt: skip
    rows = []
    for arm, per in results.items():
        rs = [r["test"]["cls"] for r in per.values() if "cls" in r.get("test", {}) and keys[0] in r["test"]["cls"]]
        if rs:
            rows.append([arm, len(rs), *[format_mean_ci([r[k] for r in rs if np.isfinite(r[k])]) for k in keys]])
    if not rows:
        return None
    spec = f"{cfg.fixed_specificity:.0%}"
    return {"title": f"Test sensitivity (%) at the threshold giving {spec} specificity on validation (the specificity "
            "it reaches on test beside it), and the share (%) of the CLS token's last-layer attention on the lesion",
            "columns": ["arm", "seeds", "melanoma sens", "melanoma spec", "SK sens", "SK spec", "attention on lesion"],
            "rows": rows}  # fmt: skip


def sweep_table(sweep: dict[float, dict[str, dict[int, dict]]]) -> dict[str, Any]:
    arms = sorted({a for per in sweep.values() for a in per})
    rows = [[f"{f:.0%}", *[format_mean_ci(list(_metric(sweep[f], a, "seg", "jaccard").values())) for a in arms]]
            for f in sorted(sweep)]  # fmt: skip
    return {"title": "Masked-fraction sweep: test Jaccard (%) against the share of the masked half whose masks are "
            "used", "columns": ["masks used", *arms], "rows": rows}  # fmt: skip


def cost_table(results: dict[str, dict[int, dict]]) -> dict[str, Any]:
    return per_arm_table(
        results,
        title="Cost per unit (mean over seeds): training seconds, training and inference images/s",
        columns=[*IMAGE_COST_COLUMNS, ("params", first_of("params")), ("steps", first_of("steps"))],
    )


def architecture_cost(cfg: MTTransUNetConfig) -> dict[str, Any]:
    """Parameters and CPU latency per image (batch 1) of the miniature and of the ``full`` architecture
    (R50-ViT-B/16 at 224² with the release's 4 Transformer layers, randomly initialised: latency does not depend on
    the weights)."""
    out: dict[str, Any] = {}
    full_cfg = dataclasses.replace(cfg.model, backbone="r50_vit_b16", dim=768, num_layers=4, num_heads=12,
                                   mlp_dim=3072, decoder_channels=[256, 128, 64, 16], weights="")  # fmt: skip
    for name, mcfg, size in (("miniature", cfg.model, cfg.data.image_size), ("full (R50-ViT-B/16)", full_cfg, 224)):
        if name.startswith("full") and cfg.latency_reps_full < 1:
            continue
        torch.manual_seed(0)
        model = build_model(mcfg, num_classes=len(CLASSES), image_size=size).eval()
        x = torch.randn(1, 3, size, size)
        reps = cfg.latency_reps if name == "miniature" else cfg.latency_reps_full
        with torch.inference_mode():
            model(x)  # warm-up
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        out[name] = {"params": count_parameters(model), "image_size": size,
                     "latency_s": float(np.median(times)), "threads": torch.get_num_threads()}  # fmt: skip
    return out


def architecture_table(arch: dict[str, Any]) -> dict[str, Any]:
    rows = [
        [name, f"{a['params'] / 1e6:.2f} M", f"{a['image_size']}²", f"{a['latency_s']:.3f}"] for name, a in arch.items()
    ]
    rows.append(["paper: MT-TransUNet (GPU)", "48 M", "224²", "0.17"])
    rows.append(["paper: prior multi-task SOTA", "130 M", "224²", "2.02"])
    return {"title": "Parameters and latency per image (CPU, batch 1, median; the paper's numbers beside)",
            "columns": ["model", "parameters", "input", "seconds / image"], "rows": rows}  # fmt: skip


# --- the recipe -----------------------------------------------------------------------------------------


def train(cfg: MTTransUNetConfig) -> dict[str, Any]:
    """Run the recipe; returns the ``results.json`` content."""
    t_start = time.perf_counter()
    info, run_dir, metrics = open_run(RECIPE, cfg, batch_size=cfg.batch_size)
    access = AccessLog(run_dir / "access_log.jsonl" if info.is_main else None)
    root = data_root(cfg)
    data = main_first(lambda: prepare_data(cfg, root, access), info)
    summary = new_summary(RECIPE, PAPER, cfg, run_dir, data=data.info)
    results: dict[str, dict[int, dict]] = {}
    sweep: dict[float, dict[str, dict[int, dict]]] = {}
    if "train" in cfg.stages:
        for arm in cfg.arms:
            for seed in cfg.seeds:
                results.setdefault(arm, {})[seed] = train_unit(arm, seed, cfg, data, run_dir, metrics, info, access)
        for f in sweep_fractions(cfg):
            for arm in cfg.sweep.arms:
                for seed in cfg.seeds:
                    if f == cfg.data.masked_fraction and arm in results:
                        sweep.setdefault(f, {}).setdefault(arm, {})[seed] = results[arm][seed]
                        continue
                    res = train_unit(arm, seed, cfg, data, run_dir, metrics, info, access, fraction=f)
                    sweep.setdefault(f, {}).setdefault(arm, {})[seed] = res
    if "eval" in cfg.stages and info.is_main:
        if not results:
            results, sweep = load_results(run_dir, cfg)
        trivial = trivial_unit(cfg, data)
        split = "test" if cfg.final_test else "val"
        tables = [metric_table(results, trivial, split, task) for task in ("seg", "cls")]
        claims: list[Claim] = []
        if cfg.final_test:
            claims = make_claims(cfg, results, trivial, sweep)
            if data.shifted_test is not None:
                tables += [metric_table(results, trivial, "shifted_test", task) for task in ("seg", "cls")]
            tables.append(diagnostic_table(results, cfg))
            if sweep:
                tables.append(sweep_table(sweep))
        arch = architecture_cost(cfg)
        chosen = figures.overlay_arm(results)
        weights = unit_dir_for(run_dir, *chosen) / "model.safetensors" if chosen else None
        figs = figures.make_all(run_dir, results, sweep, trivial, data, cfg, overlay_weights=weights)
        summary.update(
            trivial=trivial,
            architecture=arch,
            claims=[c.to_dict() for c in claims],
            tables=[t for t in tables if t] + [cost_table(results), architecture_table(arch)],
            figures=[str(p.relative_to(run_dir)) for p in figs if p is not None],
        )
    return finish_run(summary, run_dir, cfg, t_start=t_start, info=info)


def load_results(run_dir: Path, cfg: MTTransUNetConfig) -> tuple[dict, dict]:
    """Finished units of an earlier ``train`` stage (for ``stages=[eval]``)."""
    return load_unit_results(
        run_dir,
        unit_dir_for,
        arms=cfg.arms,
        seeds=cfg.seeds,
        sweep_points=sweep_fractions(cfg),
        sweep_arms=cfg.sweep.arms,
        point_of=lambda r: r["masked_fraction"],
    )
