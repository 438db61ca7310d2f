"""Genesis recipe: Models Genesis, Semantic Genesis / TransVW and the visual-word add-on, pre-trained on unlabelled
CT and fine-tuned on nodule false-positive reduction (NCC) and nodule segmentation (NCS).

Papers: *Models Genesis* (Zhou et al., MedIA 2021, arXiv 2004.07882), *Learning Semantics-enriched Representation
via Self-discovery, Self-classification, and Self-restoration* (Haghighi et al., MICCAI 2020, arXiv 2007.06959) and
*Transferable Visual Words* (Haghighi et al., IEEE TMI 2021, arXiv 2102.10680).

Reads top to bottom: data (both phantom cohorts, pre-training cubes, target-task cubes, ``manifest.json``) →
discover (auto-encoder, visual words) → pretrain (every arm; DDP under ``torchrun``) → finetune (every task ×
label fraction × arm × seed; under ``torchrun`` the units are shared out over the ranks) → evaluate (claims,
tables, figures, ``results.json``). Validation patients choose every model; the test patients are scored once per
fine-tuned model, and ``access_log.jsonl`` records every read.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from thrifty.core import distributed
from thrifty.core.claims import Claim, format_mean_ci, paired_claim, works_claim
from thrifty.core.config import ConfigError
from thrifty.core.run import (
    MetricsLog,
    configure_torch,
    data_root,
    finish_run,
    new_summary,
    prepare_run_dir,
    progress,
    resolve_device,
    write_json,
)
from thrifty.core.splits import AccessLog
from thrifty.methods.genesis import figures
from thrifty.methods.genesis.config import GenesisConfig, parse_arm
from thrifty.methods.genesis.data import prepare_data
from thrifty.methods.genesis.finetune import PRIMARY, finetune
from thrifty.methods.genesis.finetune import unit_dir as finetune_dir
from thrifty.methods.genesis.pretrain import discover, pretrain_arm
from thrifty.methods.genesis.pretrain import unit_dir as pretrain_dir
from thrifty.methods.genesis.trivial import centre_intensity_auc

log = logging.getLogger(__name__)
RECIPE = "genesis"
Config = GenesisConfig
PAPER = {
    "title": "Models Genesis / Semantic Genesis / TransVW: self-supervised 3D pre-training for CT",
    "arxiv": "2004.07882, 2007.06959, 2102.10680",
}
# Semantic Genesis (MICCAI 2020) Table 1, mean ± s.d. over runs: NCC AUC %, NCS IoU %.
PAPER_TABLE = {
    "scratch": {"ncc": "94.25 ± 5.07", "ncs": "74.05 ± 1.97"},
    "genesis/off": {"ncc": "98.07 ± 0.59", "ncs": "77.41 ± 0.40"},
    "genesis/on": {"ncc": "98.46 ± 0.30", "ncs": "77.33 ± 0.52"},
}
ADDON_PAPER = (
    "TransVW (TMI 2021): visual words improved rotation, shuffling, in-painting and Models Genesis on every task"
)
TASK_NAMES = {"ncc": "nodule false-positive reduction (NCC)", "ncs": "nodule segmentation (NCS)"}
METRIC_NAMES = {"auc": "AUC", "iou": "IoU", "dice": "Dice", "release_miou": "2-class mIoU@0.5:0.95 (release)"}


def pretrain_seeds(cfg: GenesisConfig) -> list[int]:
    return list(cfg.seeds) if cfg.pretrain.per_seed else [cfg.pretrain.seed]


def init_dir(cfg: GenesisConfig, run_dir: Path, arm: str, seed: int) -> Path | None:
    """The pre-training unit a fine-tuning seed starts from (None for scratch)."""
    if parse_arm(arm) is None:
        return None
    return pretrain_dir(run_dir, arm, seed if cfg.pretrain.per_seed else cfg.pretrain.seed)


# --------------------------------------------------------------------------------------------------- claims


def _metric(results: dict, task: str, fraction: float, arm: str, metric: str) -> dict[int, float]:
    return {s: r["test"][metric] for s, r in results.get(task, {}).get(fraction, {}).get(arm, {}).items()}


WORKS_MARGIN = 5.0  # NCC AUC points above the centre-intensity baseline (fixed before any claim preset ran)


def trivial_baseline(data: Any) -> dict[str, float]:
    """The NCC task's training-free baseline (:mod:`~thrifty.methods.genesis.trivial`): AUC % of the central
    3×3×3 mean intensity on the validation and the test candidates (each split read once, as its own unit)."""
    unit = "baseline/centre_intensity"
    val = data.target_val.get("selection", unit)
    test = data.target_test.get("final_test", unit)
    return {
        "val": centre_intensity_auc(val.ncc_cubes, val.ncc_labels),
        "test": centre_intensity_auc(test.ncc_cubes, test.ncc_labels),
    }


def best_arm(results: dict, task: str, fraction: float) -> str | None:
    """The arm with the highest mean validation score at ``fraction`` (validation chooses the "best model")."""
    per_arm = results.get(task, {}).get(fraction, {})
    means = {arm: float(np.mean([r["val"] for r in per.values()])) for arm, per in per_arm.items() if per}
    return max(means, key=means.__getitem__) if means else None


def make_claims(cfg: GenesisConfig, results: dict, trivial: dict[str, float] | None = None) -> list[Claim]:
    """At the lowest label fraction, per task: every pre-training beats scratch; Semantic Genesis ≥ Models Genesis;
    each add-on (``on``) improves its base (``off``). Paired over fine-tuning seeds. With ``trivial`` (the
    centre-intensity baseline), the works claim: the validation-chosen best NCC model beats it by more than
    :data:`WORKS_MARGIN` test AUC points."""
    claims: list[Claim] = []
    low = min(cfg.finetune.label_fractions)
    best = best_arm(results, "ncc", low) if trivial is not None and "ncc" in cfg.tasks else None
    if best is not None and trivial is not None:
        claims.append(
            works_claim(
                id="best_model_works_ncc",
                statement=f"the best NCC model on validation ({best}, {low:.0%} of the labels) beats the "
                f"training-free centre-intensity baseline ({trivial['test']:.1f} test AUC) by more than "
                f"{WORKS_MARGIN:g} AUC points",
                method=_metric(results, "ncc", low, best, "auc"),
                baseline_value=trivial["test"],
                margin=WORKS_MARGIN,
                direction="greater",
                preset=cfg.preset,
                baseline="centre intensity",
                unit="AUC points",
            )
        )
    for task in cfg.tasks:
        arms = [a for a in cfg.canonical_arms if results.get(task, {}).get(low, {}).get(a)]  # finished units only
        metric = PRIMARY[task]
        unit = f"{METRIC_NAMES[metric]} points"
        at = f"test {METRIC_NAMES[metric]}, {task.upper()}, {low:.0%} of the training patients' labels"

        def get(arm: str) -> dict[int, float]:
            return _metric(results, task, low, arm, metric)  # noqa: B023

        if "scratch" in arms:
            for arm in arms:
                if arm == "scratch":
                    continue
                paper = PAPER_TABLE.get(arm, {}).get(task)
                claims.append(
                    paired_claim(
                        id=f"{arm.replace('/', '_')}_beats_scratch_{task}",
                        statement=f"pre-training with {arm} beats training from scratch ({at})",
                        a=get(arm),
                        b=get("scratch"),
                        direction="greater",
                        paper_value=(
                            f"{paper} vs scratch {PAPER_TABLE['scratch'][task]} (full labels)"
                            if paper
                            else "above scratch (TMI 2021 add-on study; numbers not retrieved)"
                        ),
                        preset=cfg.preset,
                        baseline="scratch",
                        unit=unit,
                    )
                )
        if "genesis/on" in arms and "genesis/off" in arms:
            claims.append(
                paired_claim(
                    id=f"semantic_genesis_vs_models_genesis_{task}",
                    statement=f"Semantic Genesis (genesis/on) scores at least Models Genesis (genesis/off) ({at}); "
                    "the interval must lie above 0",
                    a=get("genesis/on"),
                    b=get("genesis/off"),
                    direction="greater",
                    paper_value=f"{PAPER_TABLE['genesis/on'][task]} vs {PAPER_TABLE['genesis/off'][task]}",
                    preset=cfg.preset,
                    baseline="genesis/off",
                    unit=unit,
                )
            )
        for pretext in ("inpaint", "shuffle", "rotation"):
            on, off = f"{pretext}/on", f"{pretext}/off"
            if on in arms and off in arms:
                claims.append(
                    paired_claim(
                        id=f"addon_{pretext}_{task}",
                        statement=f"adding visual words improves {pretext} pre-training ({at})",
                        a=get(on),
                        b=get(off),
                        direction="greater",
                        paper_value=ADDON_PAPER,
                        preset=cfg.preset,
                        baseline=off,
                        unit=unit,
                    )
                )
    return [c for c in claims if len(c.seeds) >= 2]


# --------------------------------------------------------------------------------------------------- tables


def _paired(a: dict[int, float], b: dict[int, float]) -> str:
    """Mean [95% t-interval] of the per-seed differences a − b, and the paired t-test's two-sided p-value."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return ""
    diffs = [a[s] - b[s] for s in seeds]
    if len(seeds) < 2 or np.std(diffs) == 0:
        return format_mean_ci(diffs)
    p = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue
    return f"{format_mean_ci(diffs)} p={p:.2g}"


def task_table(
    cfg: GenesisConfig, results: dict, task: str, fraction: float, trivial: dict[str, float] | None = None
) -> dict[str, Any]:
    metrics = ["auc"] if task == "ncc" else ["iou", "dice", "release_miou"]
    primary = PRIMARY[task]
    rows = []
    if task == "ncc" and trivial is not None:  # training-free: the same at every fraction
        rows.append(["trivial: centre 3×3×3 intensity", "-", f"{trivial['test']:.1f}", f"{trivial['val']:.1f}"])
        rows[-1] += [""] * 3
    for arm in cfg.canonical_arms:
        per = results.get(task, {}).get(fraction, {}).get(arm, {})
        if not per:
            continue
        row: list[Any] = [arm, len(per)]
        # results written before a metric existed (resumed units) lack it: that cell stays empty
        vals = {m: [r["test"][m] for r in per.values() if m in r["test"]] for m in metrics}
        row += [format_mean_ci(vals[m]) if vals[m] else "" for m in metrics]
        row.append(format_mean_ci([r["val"] for r in per.values()]))
        a = _metric(results, task, fraction, arm, primary)
        row.append(_paired(a, _metric(results, task, fraction, "scratch", primary)) if arm != "scratch" else "")
        parsed = parse_arm(arm)
        off = f"{parsed[0]}/off" if parsed and parsed[1] else None
        row.append(_paired(a, _metric(results, task, fraction, off, primary)) if off else "")
        row.append(PAPER_TABLE.get(arm, {}).get(task, ""))
        rows.append(row)
    names = [f"test {METRIC_NAMES[m]} %" for m in metrics]
    return {
        "title": f"{TASK_NAMES[task]} at {fraction:.0%} of the training patients' labels: test scores, mean "
        f"[95% t-interval] over seeds; validation {METRIC_NAMES[primary]} of the kept model; paired differences of "
        f"the test {METRIC_NAMES[primary]} against scratch and against the same pretext without visual words, with "
        "paired t-test p-values; the "
        "paper's numbers (Semantic Genesis Table 1, full labels, real CT)"
        + (
            "; the release column is the Models Genesis release's NCS score (two-class mean IoU over thresholds "
            "0.5–0.95, background included), the scale of the paper's NCS column; IoU and Dice are foreground"
            if task == "ncs"
            else ""
        ),
        "columns": ["arm", "seeds", *names, "val (selected)", "− scratch", "− off", "paper"],
        "rows": rows,
    }


def pretrain_table(pretrained: dict[str, dict[int, dict]]) -> dict[str, Any]:
    rows = []
    for arm, per in pretrained.items():
        rs = list(per.values())
        rows.append(
            [
                arm,
                len(rs),
                round(float(np.mean([r["best_step"] for r in rs])), 1),
                f"{np.mean([r['val_loss'] for r in rs]):.4g}",
                f"{np.mean([r['constant_loss'] for r in rs]):.4g}" if all("constant_loss" in r for r in rs) else "",
                round(float(np.mean([r["cubes_per_s"] for r in rs])), 1),
                round(float(np.mean([r["train_seconds"] for r in rs])), 1),
                rs[0]["train_cubes"],
            ]
        )
    return {
        "title": "Pre-training: step kept by the held-out pretext loss, that loss and the best constant predictor's "
        "on the same perturbed cubes (the pretext trained when it is clearly below), throughput and time (mean over "
        "pre-training seeds)",
        "columns": [
            "arm",
            "runs",
            "kept step",
            "held-out loss",
            "constant predictor",
            "cubes/s",
            "train s",
            "training cubes/instances",
        ],
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------- the recipe


def train(cfg: GenesisConfig) -> dict[str, Any]:
    """Run the Genesis recipe; returns the ``results.json`` content."""
    t_start = time.perf_counter()
    configure_torch(cfg)
    info = distributed.init(resolve_device(cfg.device))
    if cfg.pretrain.batch_size % info.world_size:
        raise ConfigError(
            f"config key 'pretrain.batch_size' ({cfg.pretrain.batch_size}) must be divisible by the world size"
        )
    run_dir = prepare_run_dir(RECIPE, cfg, write=info.is_main)
    distributed.barrier()
    rank = "" if info.is_main else f".rank{info.rank}"  # ranks > 0 log their own fine-tuning units beside rank 0
    metrics = MetricsLog(run_dir / f"metrics{rank}.jsonl")
    access = AccessLog(run_dir / f"access_log{rank}.jsonl")
    cache = data_root(cfg)
    data = prepare_data(cfg, cache, access) if info.is_main else None  # rank 0 generates the phantom cache first
    distributed.barrier()
    data = data or prepare_data(cfg, cache, access)
    if info.is_main:
        write_json(run_dir / "manifest.json", data.manifest)
    arms = cfg.canonical_arms
    parsed = {arm: parse_arm(arm) for arm in arms}
    needs_words = any(p is not None and p[1] for p in parsed.values())

    words = None
    words_dir = run_dir / "units" / "discovery"
    if "discover" in cfg.stages or (needs_words and "pretrain" in cfg.stages):  # cached in the run directory
        if info.is_main:
            words = discover(cfg, data, words_dir, metrics)
        distributed.barrier()
        if words is None:
            words = discover(cfg, data, words_dir, metrics)  # the cache rank 0 just wrote

    pretrained: dict[str, dict[int, dict]] = {}
    if "pretrain" in cfg.stages:
        for arm in arms:
            if parsed[arm] is None:
                continue
            pretext, on = parsed[arm]
            for seed in pretrain_seeds(cfg):
                res = pretrain_arm(pretext, on, seed, cfg, data, words, run_dir, metrics, info)
                pretrained.setdefault(arm, {})[seed] = res

    skipped: list[str] = []
    if "finetune" in cfg.stages:
        ready = []
        for arm in arms:
            missing = [
                s
                for s in cfg.seeds
                if (d := init_dir(cfg, run_dir, arm, s)) and not (d / "encoder.safetensors").exists()
            ]
            if not missing:
                ready.append(arm)
            elif "pretrain" in cfg.stages:
                raise ConfigError(f"fine-tuning {arm} needs weights that pre-training did not write: {missing}")
            else:
                skipped.append(arm)
        if skipped:
            log.warning("not pre-trained in %s yet, so not fine-tuned: %s (add stage pretrain)", run_dir, skipped)
        units = [
            (task, fraction, arm, seed)
            for task in cfg.tasks
            for fraction in cfg.finetune.label_fractions
            for arm in ready
            for seed in cfg.seeds
        ]
        mine = units[info.rank :: info.world_size]  # fine-tuning units are independent: share them out
        with progress(len(mine), "fine-tuning", enabled=cfg.progress) as advance:
            for task, fraction, arm, seed in mine:
                res = finetune(
                    task,
                    arm,
                    fraction,
                    seed,
                    cfg,
                    data,
                    init_dir(cfg, run_dir, arm, seed),
                    run_dir,
                    metrics,
                    info.device,
                )
                advance(1, unit=f"{task}/{arm}/s{seed}", score=res["test"].get(PRIMARY[task], res["val"]))
        distributed.barrier()

    summary = new_summary(RECIPE, PAPER, cfg, run_dir, data=data.manifest["sizes"], skipped_arms=skipped)
    if "evaluate" in cfg.stages and info.is_main:
        results = load_finetune_results(run_dir, cfg)
        pretrained = pretrained or load_pretrain_results(run_dir, cfg)
        trivial = trivial_baseline(data) if "ncc" in cfg.tasks else None
        claims = make_claims(cfg, results, trivial)
        tables = [
            task_table(cfg, results, task, fraction, trivial)
            for task in cfg.tasks
            for fraction in sorted(cfg.finetune.label_fractions)
            if results.get(task, {}).get(fraction)
        ]
        if pretrained:
            tables.append(pretrain_table(pretrained))
        if words is None and (words_dir / "words.json").exists():
            words = json.loads((words_dir / "words.json").read_text())
        if words is not None:
            summary["visual_words"] = {
                k: words[k] for k in ("num_classes", "instances", "purity", "purity_random_members", "seconds")
            }
            summary["visual_words"]["ae_loss_first_last"] = [words["ae_loss"][0], words["ae_loss"][-1]]
        figs = figures.make_all(run_dir, cfg, data, results, pretrained, words)
        summary.update(
            claims=[c.to_dict() for c in claims],
            tables=tables,
            trivial_baseline={"ncc_centre_intensity_auc": trivial} if trivial else None,
            figures=[str(p.relative_to(run_dir)) for p in figs],
        )
    return finish_run(summary, run_dir, cfg, t_start=t_start, info=info)


def load_finetune_results(run_dir: Path, cfg: GenesisConfig) -> dict:
    """``results[task][fraction][arm][seed]`` from the finished fine-tuning units."""
    results: dict = {}
    for task in cfg.tasks:
        for fraction in cfg.finetune.label_fractions:
            for arm in cfg.canonical_arms:
                for seed in cfg.seeds:
                    path = finetune_dir(run_dir, task, arm, fraction, seed) / "result.json"
                    if path.exists():
                        res = json.loads(path.read_text())
                        results.setdefault(task, {}).setdefault(fraction, {}).setdefault(arm, {})[seed] = res
    return results


def load_pretrain_results(run_dir: Path, cfg: GenesisConfig) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for arm in cfg.canonical_arms:
        if parse_arm(arm) is None:
            continue
        for seed in pretrain_seeds(cfg):
            path = pretrain_dir(run_dir, arm, seed) / "result.json"
            if path.exists():
                out.setdefault(arm, {})[seed] = json.loads(path.read_text())
    return out
