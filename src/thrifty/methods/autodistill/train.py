"""AutoDistill recipe: explore (multi-objective BO over a MobileBERT space), flash-distil, evaluate.

Paper: *AutoDistill: an End-to-End Framework to Explore and Distill Hardware-Efficient Language Models*
(Zhang et al., arXiv 2201.08539).

Reads top to bottom:

1. ``teacher`` — pre-train (once, cached by digest) an in-domain IB-BERT-style teacher with MLM and a corpus
   tokenizer, or load all-MiniLM / a local BERT; fit an MLM head when it has none; cache its outputs on the
   distillation batches; measure the unigram floor.
2. ``search`` — an Optuna study over the space maximising flash-validation masked-token accuracy and
   minimising latency measured on this machine as a ratio to the MobileBERT-like reference timed in
   alternation with each candidate; the hand-designed baselines get the same flash distillation.
3. ``rank_fidelity`` — ``eval.rank_archs`` architectures spread over the flash ranking (the evaluation students
   and both baselines included) get ``distill.long_factor`` × longer distillation; Kendall τ between the two
   rankings on validation accuracy.
4. ``evaluate`` — the Pareto students (chosen on validation) and both baselines, each distilled longer once per
   seed of ``seeds``: test masked-token accuracy (read once per student and seed), one interleaved latency
   session in a fresh pinned process, the GLUE analogue, export (HF, ONNX, model card); samplers compared on
   the tabular benchmark; claims paired over distillation seeds, tables, figures and ``results.json``.

Deviations (also in the recipe README): the IB-BERT teacher is 4 layers at widths 256/512 (not 24 at 512/1024)
with a 4,096-entry corpus tokenizer; latency is measured on this CPU rather than a TPUv4i; AdamW instead of LAMB;
no NSP; downstream tasks use a frozen encoder with a pooled linear head instead of full fine-tuning.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file
from scipy import stats

from thrifty.core.claims import Claim, mean_ci95, paired_claim, value_claim, works_claim
from thrifty.core.config import ConfigError
from thrifty.core.run import (
    MetricsLog,
    configure_torch,
    finish_run,
    new_summary,
    prepare_run_dir,
    progress,
    write_json,
)
from thrifty.data.glue import GLUE_TASKS, glue_metric
from thrifty.methods.autodistill import figures
from thrifty.methods.autodistill.config import AutodistillConfig
from thrifty.methods.autodistill.data import build_task, glue_task_data
from thrifty.methods.autodistill.downstream import task_features, train_probe
from thrifty.methods.autodistill.export import export_student
from thrifty.methods.autodistill.latency import cpu_affinity, encoder_spec, machine_lock, time_in_fresh_process
from thrifty.methods.autodistill.search import (
    completed,
    fail_stale_trials,
    hypervolume,
    hypervolume_curve,
    make_sampler,
    make_storage,
    open_study,
    optimise,
    pareto_mask,
    reference_point,
    suggest_arch,
    tabular_run,
)
from thrifty.methods.autodistill.space import Arch, distilbert_like, space_choices
from thrifty.methods.autodistill.teacher import mlm_accuracy
from thrifty.methods.autodistill.trial import Context, build_student, evaluate_arch, prepare_context

log = logging.getLogger(__name__)
RECIPE = "autodistill"
Config = AutodistillConfig
PAPER = {
    "title": "AutoDistill: an End-to-End Framework to Explore and Distill Hardware-Efficient Language Models",
    "arxiv": "2201.08539",
}


def _read_json(path: Path, resume: bool) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if resume and path.is_file() else None


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    """A trial record without the per-batch lists (kept small in the study storage)."""
    return {k: v for k, v in result.items() if k != "val_acc_per_batch"}


# --- search -----------------------------------------------------------------------------------------------


def study_name(cfg: AutodistillConfig) -> str:
    return f"autodistill-{cfg.search.sampler}-seed{cfg.seed}"


def make_objective(ctx: Context, study: Any) -> Any:
    """The study objective: suggest → (reuse or) flash-distil → (val accuracy, latency ms)."""
    import optuna

    cfg = ctx.cfg
    choices = space_choices(cfg.space, ctx.teacher_dim)

    def objective(trial: Any) -> tuple[float, float]:
        arch = suggest_arch(trial, choices, cfg.space.embedding_size)
        try:
            arch.validate()
        except ValueError as err:
            trial.set_user_attr("invalid", str(err))
            raise optuna.TrialPruned(str(err)) from None
        prior = [t for t in completed(study) if t.user_attrs.get("result", {}).get("key") == arch.key]
        if prior:  # the same architecture is evaluated deterministically: reuse instead of re-training
            result = {**prior[0].user_attrs["result"], "reused_from": prior[0].number}
        else:
            result = _slim(evaluate_arch(ctx, arch, desc=f"trial {trial.number} {arch.label}")[0])
        trial.set_user_attr("result", result)
        return result["val_acc"], result["latency_ratio"]

    return objective


def _search_worker(cfg: AutodistillConfig, run_dir: str, lock: str, index: int) -> None:
    """Worker ``index`` of a parallel search (spawned; rebuilds its context from the data directory). Each
    worker's sampler has its own seed so two workers do not propose the same start-up trials."""
    configure_torch(cfg)
    ctx = prepare_context(cfg, lock=Path(lock))
    storage = make_storage(cfg.search.storage, Path(run_dir))
    sampler = make_sampler(
        cfg.search.sampler, seed=cfg.seed + 1000 * (index + 1), startup_trials=cfg.search.startup_trials
    )
    study = open_study(name=study_name(cfg), storage=storage, sampler=sampler)
    optimise(study, make_objective(ctx, study), cfg.search.num_trials)


def run_search(cfg: AutodistillConfig, ctx: Context, run_dir: Path) -> list[dict[str, Any]]:
    """Run (or resume) the study to ``search.num_trials`` completed trials; returns their records."""
    storage = make_storage(cfg.search.storage, run_dir)
    sampler = make_sampler(cfg.search.sampler, seed=cfg.seed, startup_trials=cfg.search.startup_trials)
    study = open_study(name=study_name(cfg), storage=storage, sampler=sampler)
    stale = fail_stale_trials(study)
    if stale:
        log.info("marked %d trial(s) left running by an interrupted search as failed", stale)
    if cfg.search.workers == 1:
        optimise(study, make_objective(ctx, study), cfg.search.num_trials)
    else:
        spawn = mp.get_context("spawn")
        lock = str(run_dir / "units" / "machine.lock")
        procs = [
            spawn.Process(target=_search_worker, args=(cfg, str(run_dir), lock, i)) for i in range(cfg.search.workers)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise RuntimeError(f"search workers exited with codes {bad}")
    return trial_records(study)


def trial_records(study: Any) -> list[dict[str, Any]]:
    return [{**t.user_attrs["result"], "number": t.number} for t in completed(study)]


def load_trials(cfg: AutodistillConfig, run_dir: Path) -> list[dict[str, Any]]:
    study = open_study(name=study_name(cfg), storage=make_storage(cfg.search.storage, run_dir), sampler=None)
    records = trial_records(study)
    if not records:
        raise ConfigError(f"no completed search trials in {run_dir}; run the search stage first")
    return records


def unique_archs(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for t in trials:
        seen.setdefault(t["key"], t)
    return list(seen.values())


def front_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not records:
        return []
    mask = pareto_mask([(r["val_acc"], r["latency_ratio"]) for r in records])
    return sorted((r for r, m in zip(records, mask) if m), key=lambda r: r["latency_ratio"])


def pick_spread(items: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """``k`` items evenly spaced along the list (first and last included)."""
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    return [items[i] for i in idx]


# --- units kept in the run directory -------------------------------------------------------------------------


def flash_baselines(ctx: Context, run_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name, arch in baseline_archs(ctx).items():
        path = run_dir / "units" / "baselines" / f"{name}.json"
        rec = _read_json(path, ctx.cfg.resume)
        if rec is None:
            rec = evaluate_arch(ctx, arch, desc=f"baseline {name}")[0]
            write_json(path, rec)
        out[name] = rec
    return out


def baseline_archs(ctx: Context) -> dict[str, Arch]:
    return {"mobilebert_like": ctx.reference_arch, "distilbert_like": distilbert_like(ctx.teacher.config)}


def long_distill(
    ctx: Context, run_dir: Path, arch: Arch, flash: dict[str, Any], *, seed: int, keep: bool
) -> dict[str, Any]:
    """``long_factor`` × longer distillation of ``arch`` with distillation seed ``seed`` (record cached; weights
    kept when ``keep``)."""
    stem = f"{arch.key}-s{seed}"
    path = run_dir / "units" / "long" / f"{stem}.json"
    weights = run_dir / "units" / "students" / f"{stem}.safetensors"
    rec = _read_json(path, ctx.cfg.resume)
    if rec is not None and (not keep or weights.is_file()):
        return rec
    rec, student = evaluate_arch(
        ctx, arch, scale=ctx.cfg.distill.long_factor, seed=seed, desc=f"longer distillation {arch.label} seed {seed}"
    )
    rec["flash_val_acc"] = flash["val_acc"]
    rec["flash_latency_ratio"] = flash["latency_ratio"]
    if keep:
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(weights))
    write_json(path, rec)
    return rec


def load_student(ctx: Context, run_dir: Path, arch: Arch, seed: int) -> Any:
    student, _ = build_student(ctx, arch, seed=seed)
    path = run_dir / "units" / "students" / f"{arch.key}-s{seed}.safetensors"
    student.load_state_dict(load_file(str(path), device=str(next(student.parameters()).device)), strict=False)
    return student.eval()


def student_test_accuracy(ctx: Context, run_dir: Path, arch: Arch, seed: int) -> dict[str, Any]:
    """Test masked-token accuracy of the kept student (``arch``, ``seed``): read once, then cached."""
    path = run_dir / "units" / "test" / f"{arch.key}-s{seed}.json"
    rec = _read_json(path, ctx.cfg.resume)
    if rec is None:
        student = load_student(ctx, run_dir, arch, seed)
        acc, per_batch = mlm_accuracy(student.encode, student.head, ctx.test)
        rec = {"test_acc": acc, "test_acc_per_batch": per_batch}
        write_json(path, rec)
    return rec


def evaluation_set(trials: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], k: int) -> dict[str, dict]:
    """Up to ``k`` Pareto students (spread along latency) and both baselines, by name → flash record."""
    front = pick_spread(front_of(unique_archs(trials)), k)
    return {**{f"front-{i + 1}": r for i, r in enumerate(front)}, **baselines}


def rank_set(trials: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The evaluation set plus architectures spread over the flash ranking, ``n`` in all (when available)."""
    keys = {r["key"] for r in chosen.values()}
    rest = sorted((t for t in unique_archs(trials) if t["key"] not in keys), key=lambda t: t["val_acc"])
    return list(chosen.values()) + pick_spread(rest, max(0, n - len(chosen)))


# --- evaluation -----------------------------------------------------------------------------------------


def encoder_fn(model: Any, *, teacher: bool) -> Any:
    """``(ids, mask) -> (B, T, d)`` on the CPU, whichever device the model is on."""
    dev = next(model.parameters()).device
    if teacher:
        return lambda ids, mask: model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.cpu()
    return lambda ids, mask: model.encode(ids.to(dev), mask.to(dev)).cpu()


def summarize_probes(task: Any, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95% interval of test accuracy over probe seeds, macro-F1, and a GLUE task's own metric."""
    mean, ci = mean_ci95([r["test_acc"] for r in runs.values()])
    out = {
        "per_seed": runs,
        "mean": mean,
        "ci95": list(ci),
        "macro_f1": float(np.mean([r["test_macro_f1"] for r in runs.values()])),
    }
    if task.name in GLUE_TASKS:  # MCC for CoLA, F1 and accuracy for MRPC ... beside accuracy
        per_seed = [glue_metric(task.name, r["test_pred"], task.labels["test"]) for r in runs.values()]
        out["glue_metric"] = {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]}
    return out


def downstream_scores(ctx: Context, models: dict[str, Any], run_dir: Path) -> dict[str, dict[str, Any]]:
    """name → task → {per_seed test accuracy/F1, mean, ci95}; features once per model and task."""
    cfg = ctx.cfg
    corpus_tasks = [
        build_task(t, ctx.corpus, per_class=cfg.eval.passages_per_class, seed=cfg.seed) for t in cfg.eval.tasks
    ]
    if cfg.eval.glue_dir:
        corpus_tasks += [glue_task_data(cfg.eval.glue_dir, t, seed=cfg.seed) for t in cfg.eval.glue_tasks]
    out: dict[str, dict[str, Any]] = {}
    with progress(len(models) * len(corpus_tasks), "downstream tasks", enabled=cfg.progress) as advance:
        for name, (model, is_teacher) in models.items():
            path = run_dir / "units" / "downstream" / f"{name}.json"
            rec = _read_json(path, cfg.resume)
            if rec is None:
                rec = {}
                for task in corpus_tasks:
                    feats = task_features(
                        encoder_fn(model, teacher=is_teacher), ctx.tokenizer, task, seq_len=cfg.data.seq_len
                    )
                    runs = {
                        s: train_probe(feats, task.labels, num_classes=len(task.classes), seed=s,
                                       epochs=cfg.eval.probe_epochs, lr=cfg.eval.probe_lr)
                        for s in cfg.seeds
                    }  # fmt: skip
                    rec[task.name] = summarize_probes(task, runs)
                    advance(model=name, task=task.name)
                write_json(path, rec)
            else:
                advance(len(corpus_tasks))
            out[name] = rec
    return out


def compare_samplers(cfg: AutodistillConfig, trials: list[dict[str, Any]], teacher_dim: int) -> dict[str, Any]:
    """Every ``search.compare_samplers`` × ``seeds`` on the tabular benchmark of the evaluated architectures."""
    table = [(Arch(**t["arch"]), t["val_acc"], t["latency_ratio"]) for t in unique_archs(trials)]
    ref = reference_point([lat for _, _, lat in table])
    n = min(cfg.search.compare_trials, len(table))
    runs = [
        tabular_run(table, space_choices(cfg.space, teacher_dim), sampler=s, seed=seed, num_trials=n,
                    startup_trials=min(cfg.search.compare_startup, max(1, n - 1)), ref=ref,
                    embedding_size=cfg.space.embedding_size)
        for s in cfg.search.compare_samplers
        for seed in cfg.seeds
    ]  # fmt: skip
    best = hypervolume([(a, lat) for _, a, lat in table], ref)
    return {"table_size": len(table), "trials": n, "ref": list(ref), "hv_all": best, "runs": runs}


def latency_session(ctx: Context, students: dict[str, Any], *, reference: str) -> dict[str, Any]:
    """Every evaluated student timed in alternation with the others in one fresh process pinned to
    ``latency.cores`` (:func:`~.latency.time_in_fresh_process`), at the first configured batch size; ratios to
    ``reference`` (the MobileBERT-like baseline, a fixed architecture)."""
    lc = ctx.cfg.latency
    cores = list(lc.cores) or (cpu_affinity() or [])[: lc.num_threads] or None
    specs = {name: encoder_spec(model.encoder) for name, model in students.items()}
    with machine_lock(ctx.lock, exclusive=True):
        return time_in_fresh_process(
            specs, reference=reference, cores=cores, batch=lc.batch_sizes[0], seq_len=lc.seq_len,
            threads=lc.num_threads, warmup=lc.warmup, rounds=lc.eval_rounds,
            runs_per_round=lc.runs_per_round, seed=ctx.cfg.seed,
        )  # fmt: skip


def pick_faster(students: dict[str, dict[str, Any]], session: dict[str, Any], baseline: str) -> str | None:
    """Among the Pareto students faster than ``baseline`` in the evaluation session (median per-round ratio),
    the one with the best mean validation accuracy over distillation seeds; None when none is faster."""
    ratio = {n: session["models"][n]["ratio_median"] for n in students}
    faster = [n for n in students if n.startswith("front-") and ratio[n] < ratio[baseline]]
    return max(faster, key=lambda n: students[n]["val_acc"]) if faster else None


PAPER_DOMINANCE = "7 searched models: up to +3.2% pre-train accuracy and up to 1.44× lower latency than MobileBERT"


def dominance_claims(
    cfg: AutodistillConfig, baseline: str, pick: str | None, students: dict[str, dict[str, Any]],
    session: dict[str, Any],
) -> list[Claim]:  # fmt: skip
    """Two claims per baseline: the chosen faster Pareto student has higher test masked-token accuracy (paired
    over distillation seeds) and lower latency (per-round ratio in the interleaved session). Together they
    are the paper's dominance claim."""
    acc_id, lat_id = f"searched_student_more_accurate_than_{baseline}", f"searched_student_faster_than_{baseline}"
    acc_statement = (
        f"the Pareto student chosen on validation among those faster than the {baseline} baseline has higher test "
        f"masked-token accuracy ({cfg.distill.long_factor}× longer distillation, paired over distillation seeds)"
    )
    lat_statement = f"that student is faster than the {baseline} baseline (interleaved timing in one fresh process)"
    if pick is None:
        nan = dict(measured=math.nan, ci95=(math.nan, math.nan), preset=cfg.preset, baseline=baseline, values=(),
                   seeds=(), note="no Pareto student is faster than this baseline",
                   paper_value=PAPER_DOMINANCE)  # fmt: skip
        return [
            Claim(id=acc_id, statement=acc_statement, direction="greater", threshold=0.0, unit="accuracy points",
                  **nan),
            Claim(id=lat_id, statement=lat_statement, direction="greater", threshold=1.0, unit="× (speed-up)", **nan),
        ]  # fmt: skip
    s, b = students[pick], students[baseline]
    acc = paired_claim(
        id=acc_id, statement=acc_statement, direction="greater", paper_value=PAPER_DOMINANCE, preset=cfg.preset,
        a={seed: 100 * r["test_acc"] for seed, r in s["per_seed"].items()},
        b={seed: 100 * r["test_acc"] for seed, r in b["per_seed"].items()},
        baseline=baseline, unit="accuracy points",
        note=f"{pick} ({s['label']}); chosen on mean validation accuracy over seeds among the Pareto students "
        "faster than the baseline",
    )  # fmt: skip
    mb, ms = session["models"][baseline]["block_medians_ms"], session["models"][pick]["block_medians_ms"]
    speedups = [x / y for x, y in zip(mb, ms)]
    lat = value_claim(
        id=lat_id, statement=lat_statement, values=speedups, seeds=list(range(len(speedups))), direction="greater",
        threshold=1.0, paper_value=PAPER_DOMINANCE, preset=cfg.preset, baseline=f"{baseline} latency",
        unit="× (speed-up)",
        note=f"{pick} ({s['label']}) vs {baseline}: per-round ratio of block medians over {len(speedups)} interleaved "
        f"rounds (batch {session['batch']} × {session['seq_len']} tokens, {session['threads']} threads, cores "
        f"{session['cores']}); the interval is over rounds of one session, not over machines",
    )  # fmt: skip
    return [acc, lat]


def works(cfg: AutodistillConfig, students: dict[str, dict[str, Any]], info: dict[str, Any]) -> Claim:
    """The best student (mean validation accuracy over seeds) beats the unigram guess on test by the margin."""
    best = max(students, key=lambda n: students[n]["val_acc"])
    rec = students[best]
    return works_claim(
        id="best_student_beats_unigram",
        statement="the best evaluated student (chosen on validation) beats the most-frequent-token guess on test "
        f"masked-token accuracy by more than {cfg.eval.works_margin:g} points",
        method={seed: 100 * r["test_acc"] for seed, r in rec["per_seed"].items()},
        baseline_value=100 * info["unigram_test_acc"],
        margin=cfg.eval.works_margin,
        direction="greater",
        preset=cfg.preset,
        baseline=f"unigram guess ({info['unigram_test_acc']:.2%}, always '{info['unigram_token']}')",
        unit="accuracy points",
        note=f"{best} ({rec['label']}); the teacher scores {info['teacher_test_acc']:.2%} on the same test batches",
    )


def tau_claim(cfg: AutodistillConfig, flash: list[float], long: list[float]) -> tuple[Claim, dict[str, float]]:
    tau, p = stats.kendalltau(flash, long)
    rng = np.random.default_rng(cfg.seed)
    boots = []
    for _ in range(2000):
        idx = rng.integers(0, len(flash), len(flash))
        if len(set(idx.tolist())) > 2:
            t = stats.kendalltau(np.asarray(flash)[idx], np.asarray(long)[idx])[0]
            if np.isfinite(t):
                boots.append(t)
    ci = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))) if boots else (-math.inf, math.inf)
    claim = Claim(
        id="flash_rank_fidelity",
        statement=f"flash-distillation ranking correlates with the {cfg.distill.long_factor}× longer distillation "
        "ranking (Kendall τ on validation accuracy)",
        paper_value="flash distillation used to rank candidates (no τ reported)",
        measured=float(tau),
        ci95=ci,
        direction="greater",
        threshold=0.0,
        baseline="τ = 0",
        values=tuple(float(x) for x in flash),
        seeds=tuple(range(len(flash))),
        preset=cfg.preset,
        unit="Kendall τ",
        note=f"{len(flash)} architectures; p = {p:.3g}; interval: bootstrap over architectures; values: their "
        "flash accuracies",
        kind="statistic",
    )
    return claim, {"tau": float(tau), "p_value": float(p), "n": len(flash)}


def hv_claim(cfg: AutodistillConfig, comparison: dict[str, Any]) -> Claim | None:
    bo = cfg.search.sampler if cfg.search.sampler in ("gp", "tpe") else "gp"
    by = {(r["sampler"], r["seed"]): r["hv"][-1] for r in comparison["runs"]}
    if not all((s, seed) in by for s in (bo, "random") for seed in cfg.seeds):
        return None
    return paired_claim(
        id="bo_hypervolume_vs_random",
        statement=f"{bo.upper()} reaches a larger hypervolume than random search at {comparison['trials']} trials "
        f"(tabular benchmark of {comparison['table_size']} evaluated architectures)",
        a={s: by[(bo, s)] for s in cfg.seeds},
        b={s: by[("random", s)] for s in cfg.seeds},
        direction="greater",
        paper_value="multi-objective BO explores the space (no random-search baseline reported)",
        preset=cfg.preset,
        baseline="random search",
        unit="acc × latency ratio",
    )


# --- the recipe -----------------------------------------------------------------------------------------------


def train(cfg: AutodistillConfig) -> dict[str, Any]:
    """Run the AutoDistill recipe; returns the ``results.json`` content."""
    t_start = time.perf_counter()
    configure_torch(cfg)
    run_dir = prepare_run_dir(RECIPE, cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    ctx = prepare_context(cfg)
    teacher = {k: v for k, v in ctx.info.items() if k != "corpus"}
    summary = new_summary(RECIPE, PAPER, cfg, run_dir, teacher=teacher)
    timings: dict[str, float] = {"teacher": time.perf_counter() - t_start}

    if cfg.stages == ["teacher"]:  # the teacher alone (e.g. to fill its cache): nothing searched yet
        summary["claims"], summary["figures"] = [], []
        return finish_run(summary, run_dir, cfg, t_start=t_start, stage_seconds=timings)
    t = time.perf_counter()
    if "search" in cfg.stages:
        trials = run_search(cfg, ctx, run_dir)
    else:
        trials = load_trials(cfg, run_dir)
    # hypervolume after every trial, tracked on the vector objective (accuracy, latency ratio to the reference)
    ref = reference_point([r["latency_ratio"] for r in trials])
    hv_curve = hypervolume_curve([(r["val_acc"], r["latency_ratio"]) for r in trials], ref)
    for rec, hv in zip(trials, hv_curve):
        keys = ("number", "label", "val_acc", "latency_ratio", "latency_ms", "latency_p90_ms", "params", "flops")
        metrics.log({"kind": "trial", **{k: rec[k] for k in keys}, "hypervolume": hv})
    baselines = flash_baselines(ctx, run_dir)
    timings["search"] = time.perf_counter() - t
    chosen = evaluation_set(trials, baselines, cfg.eval.max_students)
    summary["search"] = {
        "sampler": cfg.search.sampler,
        "trials": trials,
        "front": [r["key"] for r in front_of(unique_archs(trials))],
        "hypervolume": {"ref": list(ref), "per_trial": hv_curve},
        "baselines": baselines,
        "latency_reference": ctx.reference_arch.label,
    }

    claims: list[Claim] = []
    figs: list[Path] = []
    if "rank_fidelity" in cfg.stages:
        t = time.perf_counter()
        keep = {r["key"] for r in chosen.values()} if cfg.seed in cfg.seeds else set()
        long = {
            rec["key"]: long_distill(ctx, run_dir, Arch(**rec["arch"]), rec, seed=cfg.seed, keep=rec["key"] in keep)
            for rec in rank_set(trials, chosen, cfg.eval.rank_archs)
        }
        timings["rank_fidelity"] = time.perf_counter() - t
        if len(long) >= 3:
            recs = list(long.values())
            claim, tau = tau_claim(cfg, [r["flash_val_acc"] for r in recs], [r["val_acc"] for r in recs])
            claims.append(claim)
            summary["rank_fidelity"] = {
                **tau,
                "archs": [{k: r[k] for k in ("label", "flash_val_acc", "val_acc")} for r in recs],
            }
            flash, longer, labels = ([r[k] for r in recs] for k in ("flash_val_acc", "val_acc", "label"))
            figs.append(
                figures.rank_fidelity(flash, longer, labels, tau["tau"], run_dir / "figures" / "rank_fidelity.png")
            )

    if "evaluate" in cfg.stages:
        t = time.perf_counter()
        # every compared student (Pareto points chosen on validation, both baselines) distilled once per seed
        students = {name: distil_over_seeds(ctx, run_dir, flash) for name, flash in chosen.items()}
        models = {name: load_student(ctx, run_dir, Arch(**rec["arch"]), cfg.seeds[0]) for name, rec in students.items()}
        session = latency_session(ctx, models, reference="mobilebert_like")
        for name, rec in students.items():
            timed = session["models"][name]
            rec["latency_ratio"] = timed["ratio_median"]
            rec["session"] = {k: timed[k] for k in ("ratio_median", "ratio_ci95", "median_ms", "p90_ms", "cv", "runs")}
        scores = downstream_scores(ctx, {"teacher": (ctx.teacher, True), **{n: (m, False) for n, m in models.items()}},
                                   run_dir)  # fmt: skip
        task_names = list(scores["teacher"])
        for name, rec in students.items():
            rec["downstream"] = scores[name]
            rec["teacher"] = ctx.info["teacher_name"]
            rec["hardware"] = rec["latency"][str(cfg.latency.batch_sizes[0])].get("hardware", "")
            rec["flops_seq_len"] = cfg.latency.seq_len
            export_student(
                models[name], ctx.tokenizer, run_dir / "export" / name, name=f"thrifty autodistill {name}", record=rec
            )
        comparison = compare_samplers(cfg, trials, ctx.teacher_dim)
        timings["evaluate"] = time.perf_counter() - t

        for name in baselines:
            pick = pick_faster(students, session, name)
            claims += dominance_claims(cfg, name, pick, students, session)
        hv = hv_claim(cfg, comparison)
        if hv is not None:
            claims.append(hv)
        claims.append(works(cfg, students, ctx.info))
        summary["students"] = students
        summary["latency_session"] = {k: v for k, v in session.items() if k != "models"}
        summary["teacher_downstream"] = scores["teacher"]
        summary["sampler_comparison"] = comparison
        summary["tables"] = [
            teacher_table(students, ctx.info),
            trials_table(trials, baselines),
            students_table(students),
            downstream_table(scores, task_names),
            sampler_table(comparison, cfg),
        ]
        summary["correlations"] = correlations(students)
        fig_dir = run_dir / "figures"
        figs.append(figures.pareto(unique_archs(trials), baselines, students, fig_dir / "pareto.png"))
        figs.append(figures.hypervolume(comparison["runs"], fig_dir / "hypervolume.png"))
        if task_names:
            figs.append(figures.downstream(
                {task: {n: (s[task]["mean"], *s[task]["ci95"]) for n, s in scores.items()} for task in task_names},
                fig_dir / "downstream.png"))  # fmt: skip
    summary["claims"] = [c.to_dict() for c in claims]
    summary["figures"] = [str(p.relative_to(run_dir)) for p in figs]
    return finish_run(summary, run_dir, cfg, t_start=t_start, stage_seconds=timings)


def distil_over_seeds(ctx: Context, run_dir: Path, flash: dict[str, Any]) -> dict[str, Any]:
    """One compared student: ``long_factor`` × longer distillation once per seed of ``seeds`` (weights kept),
    validation and test masked-token accuracy per seed, and their means with 95% intervals."""
    arch = Arch(**flash["arch"])
    recs = {seed: long_distill(ctx, run_dir, arch, flash, seed=seed, keep=True) for seed in ctx.cfg.seeds}
    per_seed = {
        seed: {"val_acc": rec["val_acc"], **student_test_accuracy(ctx, run_dir, arch, seed)}
        for seed, rec in recs.items()
    }
    first = recs[ctx.cfg.seeds[0]]
    val_mean, val_ci = mean_ci95([r["val_acc"] for r in per_seed.values()])
    test_mean, test_ci = mean_ci95([r["test_acc"] for r in per_seed.values()])
    return {
        **{k: first[k] for k in ("arch", "key", "label", "params", "flops", "latency", "latency_ms", "latency_p90_ms")},
        "flash_val_acc": flash["val_acc"],
        "flash_latency_ratio": flash["latency_ratio"],
        "per_seed": per_seed,
        "val_acc": val_mean,
        "val_ci95": list(val_ci),
        "test_acc": test_mean,
        "test_ci95": list(test_ci),
    }


# --- tables -------------------------------------------------------------------------------------------------


def teacher_table(students: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Teacher, unigram floor and every evaluated student's masked-token accuracy in one table."""
    rows = [
        ["teacher", info["teacher_name"], f"{info['teacher_params'] / 1e6:.2f}M", f"{info['teacher_val_acc']:.2%}",
         f"{info['teacher_test_acc']:.2%}"],
        ["unigram guess", f"always '{info['unigram_token']}'", "0", f"{info['unigram_val_acc']:.2%}",
         f"{info['unigram_test_acc']:.2%}"],
    ] + [
        [n, r["label"], f"{r['params'] / 1e6:.2f}M", f"{r['val_acc']:.2%} (flash {r['flash_val_acc']:.2%})",
         f"{r['test_acc']:.2%} [{r['test_ci95'][0]:.2%}, {r['test_ci95'][1]:.2%}]"]
        for n, r in students.items()
    ]  # fmt: skip
    return {
        "title": "Masked-token accuracy: teacher, unigram floor and the evaluated students (mean over distillation "
        "seeds, 95% CI)",
        "columns": ["model", "architecture", "params", "validation", "test"],
        "rows": rows,
    }


def trials_table(trials: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    front = {r["key"] for r in front_of(unique_archs(trials))}

    def row(name: str, r: dict[str, Any], mark: str) -> list[str]:
        return [name, r["label"], f"{r['params'] / 1e6:.2f}M", f"{r['flops'] / 1e9:.3f}", f"{r['val_acc']:.4f}",
                f"{r['latency_ratio']:.3f}", f"{r['latency_ms']:.2f}", mark]  # fmt: skip

    rows = [row(f"#{t['number']}", t, "yes" if t["key"] in front else "") for t in trials]
    rows += [row(name, b, "baseline") for name, b in baselines.items()]
    return {
        "title": "Search trials (flash distillation; accuracy on flash-validation; latency as the median per-round "
        "ratio to the MobileBERT-like reference timed in alternation, and the candidate's own median ms)",
        "columns": ["trial", "architecture", "params", "GFLOPs/seq", "val acc", "latency ratio", "ms", "front"],
        "rows": rows,
    }


def _ratio_cell(timed: dict[str, Any]) -> str:
    lo, hi = timed["ratio_ci95"]
    return f"{timed['ratio_median']:.3f} [{lo:.3f}, {hi:.3f}]"


def students_table(students: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = [
        [n, r["label"], f"{r['params'] / 1e6:.2f}M", _ratio_cell(r["session"]), f"{r['session']['median_ms']:.2f}",
         f"{r['flash_val_acc']:.4f}", f"{r['val_acc']:.4f}",
         f"{r['test_acc']:.4f} [{r['test_ci95'][0]:.4f}, {r['test_ci95'][1]:.4f}]"]
        for n, r in students.items()
    ]  # fmt: skip
    return {
        "title": "Evaluated students: latency in one interleaved session (ratio to MobileBERT-like, 95% CI over "
        "rounds) and masked-token accuracy after longer distillation (mean over distillation seeds)",
        "columns": ["name", "architecture", "params", "latency ratio", "ms", "flash val", "long val", "test"],
        "rows": rows,
    }


def downstream_table(scores: dict[str, dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    rows = []
    for name, per in scores.items():
        cells = [f"{per[t]['mean']:.3f} [{per[t]['ci95'][0]:.3f}, {per[t]['ci95'][1]:.3f}]" for t in tasks]
        rows.append([name, *cells, f"{np.mean([per[t]['mean'] for t in tasks]):.3f}"])
    return {
        "title": "GLUE analogue: test accuracy, mean [95% CI] over probe seeds",
        "columns": ["model", *tasks, "average"],
        "rows": rows,
    }


def sampler_table(comparison: dict[str, Any], cfg: AutodistillConfig) -> dict[str, Any]:
    rows = []
    for s in cfg.search.compare_samplers:
        hv = [r["hv"][-1] for r in comparison["runs"] if r["sampler"] == s]
        mean, ci = mean_ci95(hv)
        rows.append([s, f"{mean:.3f}", f"{np.std(hv, ddof=1) if len(hv) > 1 else 0:.3f}", f"[{ci[0]:.3f}, {ci[1]:.3f}]",
                     f"{mean / comparison['hv_all']:.3f}" if comparison["hv_all"] else ""])  # fmt: skip
    return {
        "title": f"Hypervolume at {comparison['trials']} trials on the tabular benchmark ({comparison['table_size']} "
        f"architectures; reference acc 0, latency ratio {comparison['ref'][1]:.3f})",
        "columns": ["sampler", "HV mean", "std", "95% CI", "fraction of the table's HV"],
        "rows": rows,
    }


def correlations(students: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = list(students)
    if len(names) < 3 or not all(students[n]["downstream"] for n in names):
        return {}
    acc = [students[n]["test_acc"] for n in names]
    down = [float(np.mean([v["mean"] for v in students[n]["downstream"].values()])) for n in names]
    rho, p = stats.spearmanr(acc, down)
    return {"pretrain_vs_downstream_spearman": float(rho), "p_value": float(p), "n": len(names)}
