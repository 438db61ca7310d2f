"""The "Data, assemble" recipe: learning the class of interest from several datasets with partial labels.

Label-Assemble (Kang, Lu, Yuille, Zhou; arXiv 2109.12265). A target source labels only the class of interest,
an assembled source labels other findings, an unlabelled source labels nothing. Every arm trains the same
DenseNet with one sigmoid output per label on a fixed mix of sources per batch:

1. ``target_only``: source A alone, BCE on the target;
2. ``naive``: A + B, BCE over the given labels only (missing labels masked out);
3. ``assemble`` (the paper): A + B + C, masked BCE on the weak view + pseudo-label term ‖a_w − sharpen(a_w)‖²
   + consistency term ‖a_s − sharpen(a_w)‖² on every missing label;
4. ``assemble_adapter``: arm 3 with the question-and-answer adapter head (our hypothesis of the paper's);
5. ``oracle``: arm 3 with every label of A and B given (fully curated labels);
6. ``release_compat``: the release's loss (only source A's samples and the target class contribute).

Each unit keeps the step with the best validation AUC of the target (the release selects on the test split;
we never do) and reads the test split once, at the end. Claims compare arms paired over seeds.
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
from scipy import stats
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed, parallel
from thrifty.core.claims import Claim, format_mean_ci, paired_claim, value_claim, works_claim
from thrifty.core.config import ConfigError, to_dict
from thrifty.core.metrics import roc_auc
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
from thrifty.methods.data_assemble import figures
from thrifty.methods.data_assemble.augment import STRONG, WEAK, augment
from thrifty.methods.data_assemble.config import ROLES, DataAssembleConfig
from thrifty.methods.data_assemble.data import (
    AssembleData,
    LabelledImages,
    draw_batch,
    fixed_role_counts,
    prepare_data,
    role_counts,
)
from thrifty.methods.data_assemble.losses import LossParts, assemble_loss, release_compat_loss
from thrifty.methods.data_assemble.model import build_model
from thrifty.methods.data_assemble.trivial import pixel_knn_scores

log = logging.getLogger(__name__)

RECIPE = "data_assemble"
Config = DataAssembleConfig
TRIVIAL_NAME = "pixel k-NN over source A (training-free)"
PAPER = {
    "title": "Label-Assemble: Leveraging Multiple Datasets with Partial Labels (first titled 'Data, Assemble')",
    "arxiv": "2109.12265",
}


# --- arms -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """What distinguishes the arms: the source roles in a batch, the head, the loss, and whether every label of
    the labelled sources is revealed (oracle)."""

    roles: tuple[str, ...]
    head: str
    loss: str  # "bce" | "assemble" | "release"
    oracle: bool = False

    @property
    def strong_view(self) -> bool:
        return self.loss != "bce"


ARM_SPECS: dict[str, ArmSpec] = {
    "target_only": ArmSpec(("target",), "multihead", "bce"),
    "naive": ArmSpec(("target", "assembled"), "multihead", "bce"),
    "assemble": ArmSpec(ROLES, "multihead", "assemble"),
    "assemble_adapter": ArmSpec(ROLES, "adapter", "assemble"),
    "oracle": ArmSpec(ROLES, "multihead", "assemble", oracle=True),
    "release_compat": ArmSpec(ROLES, "multihead", "release"),
}


def unit_cost(job: parallel.UnitJob) -> float:
    """Relative cost of a unit (a second, strong view doubles the forward passes), for the start order of
    parallel workers."""
    return 2.0 if ARM_SPECS[job[0]].strong_view else 1.0


def lr_at(step: int, cfg: DataAssembleConfig) -> float:
    """The release's step decay: ``optim.lr`` halved every ``optim.halve_every`` steps (0-based ``step``)."""
    return cfg.optim.lr * 0.5 ** (step // cfg.optim.halve_every)


def unit_dir_for(run_dir: Path, arm: str, seed: int, count: int | None = None) -> Path:
    base = run_dir / "units" if count is None else run_dir / "units" / "sweep" / f"n{count}"
    return base / arm / f"seed{seed}"


# --- evaluation ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Sigmoid probabilities (N, L) of ``model`` (eval mode) on ``images`` (N, 1, S, S)."""
    was = model.training
    model.eval()
    out = [torch.sigmoid(model(images[i : i + batch_size].to(device))).cpu() for i in range(0, len(images), batch_size)]
    model.train(was)
    return torch.cat(out).numpy()


def label_metrics(probs: np.ndarray, data: LabelledImages, names: list[str], target: int, minority: list[str]) -> dict:
    """AUC (%) per label (given and with both classes present), of the target, mean over the minority labels and
    over all labels (macro)."""
    per: dict[str, float] = {}
    for j, name in enumerate(names):
        keep = data.given[:, j].numpy()
        y = data.labels[keep, j].numpy().astype(int)
        if 0 < y.sum() < len(y):
            per[name] = 100 * roc_auc(probs[keep, j], y)
    minority_aucs = [per[n] for n in minority if n in per]
    return {
        "per_label_auc": per,
        "target_auc": per.get(names[target], float("nan")),
        "minority_auc": float(np.mean(minority_aucs)) if minority_aucs else float("nan"),
        "macro_auc": float(np.mean(list(per.values()))) if per else float("nan"),
    }


# --- one unit -----------------------------------------------------------------------------------------------


def compute_loss(spec: ArmSpec, model: torch.nn.Module, batch: Any, cfg: DataAssembleConfig, gen: torch.Generator,
                 target_index: int, teacher: torch.nn.Module | None = None) -> LossParts:  # fmt: skip
    """The arm's loss on one batch: the weak view (and the strong view) through ``model``; with a mean
    ``teacher`` (``loss.ema_decay`` > 0) the paper's loss sharpens the teacher's weak-view predictions.

    The two views go through two forward passes, weak first, as in the release's ``train.py``: in training mode
    BatchNorm then normalises each view with its own batch statistics. (One forward over both views, which this
    recipe used up to its fourth registration, normalised the weak view with statistics pooled over strongly
    jittered and erased copies.)"""
    weak = augment(batch.images, WEAK, generator=gen)
    strong = augment(batch.images, STRONG, generator=gen) if spec.strong_view else None
    logits_weak = model(weak)
    logits_strong = model(strong) if strong is not None else None
    w = cfg.loss
    if spec.loss == "bce":  # the masked BCE alone
        return assemble_loss(logits_weak, None, batch.labels, batch.given, pseudo_weight=0.0, consistency_weight=0.0)
    if spec.loss == "release":
        return release_compat_loss(
            logits_weak, logits_strong, batch.labels, batch.given, tau=w.tau, t=w.t, class_index=target_index,
            from_target_source=batch.roles == ROLES.index("target"),
        )  # fmt: skip
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(weak)
    return assemble_loss(
        logits_weak, logits_strong, batch.labels, batch.given, tau=w.tau, t=w.t, pseudo_weight=w.pseudo_weight,
        consistency_weight=w.consistency_weight, teacher_logits=teacher_logits,
    )  # fmt: skip


def mean_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` in eval mode, to be moved by :func:`ema_update`."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``teacher ← decay · teacher + (1 − decay) · model`` for every parameter; buffers (BatchNorm's running
    statistics) are copied from ``model``."""
    for t_param, param in zip(teacher.parameters(), model.parameters(), strict=True):
        t_param.lerp_(param.detach(), 1.0 - decay)
    for t_buf, buf in zip(teacher.buffers(), model.buffers(), strict=True):
        t_buf.copy_(buf)


def train_unit(
    arm: str,
    seed: int,
    cfg: DataAssembleConfig,
    data: AssembleData,
    run_dir: Path,
    metrics: MetricsLog,
    info: distributed.DistInfo,
    *,
    count: int | None = None,
    write_result: bool = True,
) -> dict[str, Any]:
    """Train one arm with one seed (source A cut to ``count`` images for the label-count sweep); select the step
    on validation; test once. Returns the unit's result record (also written to ``result.json`` unless
    ``write_result`` is False)."""
    unit = f"{arm}/seed{seed}" if count is None else f"sweep/n{count}/{arm}/seed{seed}"
    unit_dir = unit_dir_for(run_dir, arm, seed, count)
    done_file = unit_dir / "result.json"
    if cfg.resume and done_file.exists():
        log.info("%s: finished earlier, reusing %s", unit, done_file)
        return json.loads(done_file.read_text())
    metrics.truncate(unit, 0)
    spec = ARM_SPECS[arm]
    if spec.oracle and not data.oracle_available:
        raise ConfigError("the oracle arm needs every training label (synthetic data); drop it from 'arms'")
    train_sets = dict(data.train)
    if count is not None:
        train_sets["target"] = data.target_subset(count, cfg.data.synthetic.positive_fraction)
    # the target source is always needed and the assembled one by every arm that assembles; an unlabelled source is
    # used when there is one (real data often has none: the missing labels of A and B then carry the extra terms)
    missing = [r for r in spec.roles if r not in train_sets and r != "unlabelled"]
    if missing:
        raise ConfigError(f"arm {arm!r} needs source role(s) {missing}, which the data does not have")
    roles = [r for r in spec.roles if r in train_sets]
    override = None
    if spec.oracle:
        override = {r: torch.ones_like(train_sets[r].given) for r in ("target", "assembled")}
    try:
        if cfg.data.role_images:
            counts = fixed_role_counts(cfg.data.role_images, roles, info.world_size)
        else:
            counts = role_counts(cfg.batch_size // info.world_size, cfg.data.ratios, roles)
    except ValueError as err:
        key = "data.role_images" if cfg.data.role_images else "batch_size"
        raise ConfigError(f"config key {key!r}: {err}") from None
    images_per_step = sum(counts.values()) * info.world_size
    names, t = data.label_names, data.target_index

    seed_everything(seed)
    model = build_model(cfg.model, num_labels=len(names), head=spec.head).to(info.device)
    model = distributed.with_sync_bn(model, enabled=info.enabled and cfg.model.sync_bn, device=info.device)
    net = DDP(model) if info.enabled else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(seed * 7919 + info.rank)
    teacher = mean_teacher(model) if cfg.loss.ema_decay > 0 and spec.loss == "assemble" else None
    best: dict[str, Any] = {"auc": -math.inf, "step": 0, "state": None}
    curve: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    n_logged, t_train = 0, 0.0
    with progress(cfg.max_steps, unit, enabled=cfg.progress and info.is_main) as advance:
        for step in range(1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            model.train()
            batch = draw_batch(train_sets, counts, seed=seed, step=step, rank=info.rank, given_override=override).to(
                info.device
            )
            for g in opt.param_groups:
                g["lr"] = lr_at(step - 1, cfg)
            parts = compute_loss(spec, net, batch, cfg, gen, t, teacher)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            if teacher is not None:
                ema_update(teacher, model, cfg.loss.ema_decay)
            t_train += time.perf_counter() - t0
            for k, v in parts.floats().items():
                sums[k] = sums.get(k, 0.0) + v
            n_logged += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                avg = {k: v / n_logged for k, v in sums.items()}
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "step": step, **avg})
                advance(n_logged, loss=avg["total"])
                sums, n_logged = {}, 0
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                distributed.sync_batchnorm_stats(model)
                val = data.val.get("selection", unit)
                probs = predict(model, val.images, cfg.eval_batch_size, info.device)
                auc = label_metrics(probs, val, names, t, data.minority)
                point = {"step": step, "val_target_auc": auc["target_auc"], "val_macro_auc": auc["macro_auc"]}
                curve.append(point)
                metrics.log({"unit": unit, "arm": arm, "seed": seed, "split": "val", **point})
                if auc["target_auc"] > best["auc"]:
                    state = copy.deepcopy(model.state_dict())
                    best = {"auc": auc["target_auc"], "step": step, "state": state, "val": auc}
    model.load_state_dict(best["state"])
    result: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "count": count if count is not None else len(train_sets["target"]),
        "steps": cfg.max_steps,
        "best_step": best["step"],
        "curve": curve,
        "val": best["val"],
        "train_seconds": t_train,
        "train_images_per_s": cfg.max_steps * images_per_step * (2 if spec.strong_view else 1) / max(t_train, 1e-9),
        "params": sum(p.numel() for p in model.parameters()),
        "batch_roles": counts,
    }
    if cfg.final_test:
        test = data.test.get("final_test", unit)  # the only read of the test split
        t0 = time.perf_counter()
        probs = predict(model, test.images, cfg.eval_batch_size, info.device)
        result["infer_images_per_s"] = len(test) / max(time.perf_counter() - t0, 1e-9)
        result["test"] = label_metrics(probs, test, names, t, data.minority)
        result["test_target_probs"] = probs[:, t].round(5).tolist()
    if info.is_main:
        unit_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(unit_dir / "model.safetensors"))
        write_json(unit_dir / "card.json", model_card(cfg, arm, seed, names, spec.head))
        if write_result:  # a parallel worker leaves it to the parent, which writes it after the unit's logs
            write_json(done_file, result)
    distributed.barrier()
    return result


def model_card(cfg: DataAssembleConfig, arm: str, seed: int, names: list[str], head: str) -> dict[str, Any]:
    """The JSON that travels with ``model.safetensors``: what a user needs to rebuild and apply the model."""
    return {
        "recipe": RECIPE,
        "paper": PAPER,
        "arm": arm,
        "seed": seed,
        "labels": names,
        "target": cfg.data.target,
        "head": head,
        "model": to_dict(cfg.model) | {"weights": ""},
        "image_size": cfg.data.image_size,
        "in_channels": 1,
        "intensity_window": list(cfg.data.intensity_window),
        "input": "grayscale, resized and centre-cropped to image_size, scaled to [0, 1], then each image's "
        "intensity_window percentiles mapped to 0 and 1 (clipped)",
        "output": "one sigmoid probability per label, in the order of 'labels'",
    }


def trivial_unit(cfg: DataAssembleConfig, data: AssembleData) -> dict[str, Any]:
    """The training-free baseline: target AUC of the pixel-space k-NN vote over source A, on validation and
    test."""
    t = data.target_index
    bank = data.train["target"]

    def auc(part: LabelledImages) -> float:
        scores = pixel_knn_scores(bank.images, bank.labels[:, t], part.images, k=cfg.trivial_k)
        return 100 * roc_auc(scores.numpy(), part.labels[:, t].numpy().astype(int))

    out: dict[str, Any] = {"arm": TRIVIAL_NAME, "val": {"target_auc": auc(data.val.get("calibration", "trivial"))}}
    if cfg.final_test:
        out["test"] = {"target_auc": auc(data.test.get("final_test", "trivial"))}
    return out


# --- claims and tables --------------------------------------------------------------------------------------


def _metric(results: dict[str, dict[int, dict]], arm: str, key: str) -> dict[int, float]:
    return {s: r["test"][key] for s, r in results.get(arm, {}).items() if "test" in r}


def make_claims(cfg: DataAssembleConfig, results: dict[str, dict[int, dict]], trivial: dict[str, Any],
                sweep: dict[int, dict[str, dict[int, dict]]]) -> list[Claim]:  # fmt: skip
    """The card's ordering claims, "on par with the oracle", the adapter and release comparisons, the label-count
    gap and the "works" claim; every comparison paired over seeds on the test split."""
    claims: list[Claim] = []
    p = cfg.preset
    target = cfg.data.target

    def paired(cid: str, a: str, b: str, key: str, statement: str, paper: Any) -> None:
        if a in results and b in results:
            claims.append(paired_claim(
                id=cid, statement=statement, a=_metric(results, a, key), b=_metric(results, b, key),
                direction="greater", paper_value=paper, preset=p, baseline=b, unit="AUC points",
            ))  # fmt: skip

    paired("assemble_beats_naive_target_auc", "assemble", "naive", "target_auc",
           f"assemble + pseudo-labels + consistency has a higher test AUC for {target} than naive assembling "
           "(masked BCE only)", "the paper's ordering (method > naive assemble)")  # fmt: skip
    paired("naive_beats_target_only_target_auc", "naive", "target_only", "target_auc",
           f"naive assembling of the other sources' labels raises the test AUC for {target} over training on the "
           "target source alone", "learning from 'negative examples' helps the class of interest")  # fmt: skip
    paired("assemble_beats_naive_minority_auc", "assemble", "naive", "minority_auc",
           "assemble + pseudo-labels + consistency raises the mean test AUC of the minority classes (prevalence "
           "< 5%) over naive assembling", "> 3 points average gain on minority classes (NIH ChestX-ray14)")  # fmt: skip
    paired("adapter_beats_multihead_target_auc", "assemble_adapter", "assemble", "target_auc",
           f"the adapter head (our hypothesis of the paper's) beats the release's multi-head output on {target}",
           "the paper proposes the adapter; no ablation reported")  # fmt: skip
    paired("paper_loss_beats_release_loss_target_auc", "assemble", "release_compat", "target_auc",
           "the paper's loss (every source contributes) beats the release's (assembled samples add no loss)",
           "not reported (the release contradicts the paper)")  # fmt: skip
    if "assemble" in results and "oracle" in results:
        a, o = _metric(results, "assemble", "target_auc"), _metric(results, "oracle", "target_auc")
        seeds = sorted(set(a) & set(o))
        diffs = [a[s] - o[s] for s in seeds]
        pval = float(stats.ttest_rel([a[s] for s in seeds], [o[s] for s in seeds]).pvalue) if len(seeds) > 1 else 1.0
        claims.append(value_claim(
            id="assemble_on_par_with_oracle", values=diffs, seeds=seeds, direction="greater",
            threshold=-cfg.on_par_margin * 100, preset=p, baseline=f"oracle - {cfg.on_par_margin * 100:g}",
            statement=f"partial labels are on par with full labels: test AUC for {target} of the method minus the "
            f"oracle (B's target labels revealed) stays above -{cfg.on_par_margin * 100:g} points (non-inferiority)",
            paper_value="on par (p > 0.05) with fully curated labels, saving 40% of annotation", unit="AUC points",
            note=f"paired t-test of method vs oracle: p = {pval:.3g}",
        ))  # fmt: skip
    if sweep:
        counts = sorted(sweep)
        lo, hi = counts[0], counts[-1]

        def gap(n: int) -> dict[int, float]:
            a = _metric(sweep[n], "assemble", "target_auc")
            b = _metric(sweep[n], "target_only", "target_auc")
            return {s: a[s] - b[s] for s in set(a) & set(b)}

        if lo != hi and gap(lo) and gap(hi):
            claims.append(paired_claim(
                id="gap_largest_with_few_labels", a=gap(lo), b=gap(hi), direction="greater", preset=p,
                baseline=f"the gap with {hi} target images",
                statement=f"the method's gain over target-only ({target} test AUC) is larger with {lo} target images "
                f"than with {hi}", paper_value="the gap is largest with few target labels", unit="AUC points",
            ))  # fmt: skip
    method = _metric(results, "assemble", "target_auc")
    if method and "test" in trivial:
        claims.append(works_claim(
            id="assemble_works", method=method, baseline_value=trivial["test"]["target_auc"],
            margin=cfg.works_margin * 100, direction="greater", preset=p,
            baseline=f"pixel k-NN ({trivial['test']['target_auc']:.1f})", unit="AUC points",
            statement=f"the method's test AUC for {target} beats the training-free pixel-space k-NN vote over the "
            f"target source by more than {cfg.works_margin * 100:g} points",
        ))  # fmt: skip
    return claims


def auc_table(results: dict[str, dict[int, dict]], trivial: dict[str, Any], split: str) -> dict[str, Any]:
    rows = []
    for arm, per in results.items():
        rs = [r[split] for r in per.values() if split in r]
        rows.append([arm, len(rs), *[format_mean_ci([r[k] for r in rs]) for k in ("target_auc", "minority_auc",
                                                                                   "macro_auc")]])  # fmt: skip
    if split in trivial:
        rows.append([TRIVIAL_NAME, "-", f"{trivial[split]['target_auc']:.1f}", "", ""])
    return {
        "title": f"{'Test' if split == 'test' else 'Validation'} AUC (%), mean [95% t-interval] over seeds: the "
        "target, the mean over minority classes (prevalence < 5%) and macro over all labels",
        "columns": ["arm", "seeds", "target AUC", "minority AUC", "macro AUC"],
        "rows": rows,
    }


def per_label_table(results: dict[str, dict[int, dict]], names: list[str]) -> dict[str, Any]:
    rows = []
    for arm, per in results.items():
        rs = [r["test"]["per_label_auc"] for r in per.values() if "test" in r]
        rows.append([arm, *[format_mean_ci([r[n] for r in rs if n in r]) for n in names]])
    return {
        "title": "Test AUC (%) per label, mean [95% t-interval] over seeds",
        "columns": ["arm", *names],
        "rows": rows,
    }


def sweep_table(sweep: dict[int, dict[str, dict[int, dict]]]) -> dict[str, Any]:
    arms = sorted({a for per in sweep.values() for a in per})
    rows = []
    for n in sorted(sweep):
        rows.append([n, *[format_mean_ci(list(_metric(sweep[n], a, "target_auc").values())) for a in arms]])
    return {"title": "Label-count sweep: test AUC (%) of the target against the number of target-source images "
            "(a quarter positive)", "columns": ["target images", *arms], "rows": rows}  # fmt: skip


def cost_table(results: dict[str, dict[int, dict]]) -> dict[str, Any]:
    return per_arm_table(
        results,
        title="Cost per unit (mean over seeds): training seconds, training images/s (both views counted), "
        "inference images/s",
        columns=[*IMAGE_COST_COLUMNS, ("params", first_of("params")), ("steps", first_of("steps"))],
    )


# --- the recipe -----------------------------------------------------------------------------------------


def train(cfg: DataAssembleConfig) -> dict[str, Any]:
    """Run the recipe; returns the ``results.json`` content."""
    t_start = time.perf_counter()
    info, run_dir, metrics = open_run(RECIPE, cfg, batch_size=cfg.batch_size)
    access = AccessLog(run_dir / "access_log.jsonl" if info.is_main else None)
    root = data_root(cfg)
    data = main_first(lambda: prepare_data(cfg, root, access), info)
    summary = new_summary(RECIPE, PAPER, cfg, run_dir, data=data.info)
    results: dict[str, dict[int, dict]] = {}
    sweep: dict[int, dict[str, dict[int, dict]]] = {}
    if "train" in cfg.stages:
        results, sweep = parallel.train_arms_and_sweep(
            __name__, cfg=cfg, data=data, run_dir=run_dir, metrics=metrics, access=access, info=info,
            point_key="count", points=cfg.sweep.target_images, main_point=len(data.train["target"]), cost=unit_cost,
        )  # fmt: skip
    if "eval" in cfg.stages and info.is_main:
        if not results:
            results, sweep = load_results(run_dir, cfg)
        trivial = trivial_unit(cfg, data)
        split = "test" if cfg.final_test else "val"
        tables = [auc_table(results, trivial, split)]
        claims: list[Claim] = []
        if cfg.final_test:
            claims = make_claims(cfg, results, trivial, sweep)
            tables.append(per_label_table(results, data.label_names))
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


def load_results(run_dir: Path, cfg: DataAssembleConfig) -> tuple[dict, dict]:
    """Finished units of an earlier ``train`` stage (for ``stages=[eval]``)."""
    return load_unit_results(
        run_dir,
        unit_dir_for,
        arms=cfg.arms,
        seeds=cfg.seeds,
        sweep_points=cfg.sweep.target_images,
        sweep_arms=cfg.sweep.arms,
        point_of=lambda r: r["count"],
    )
