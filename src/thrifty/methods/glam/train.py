"""GLaM recipe: train the MoE LM and its matched dense baselines on the same tokens, then judge the claims.

Paper: *GLaM: Efficient Scaling of Language Models with Mixture-of-Experts* (arXiv 2112.06905).

Reads top to bottom: settings → data (held-out splits, BPE, token streams) → for every arm and seed a
training *unit* (model, optimiser, resume, loop with logging/eval/checkpoints, one test evaluation)
→ claims, tables, figures and ``results.json``. A unit that finished is reused on a rerun with the
same config; a unit that was killed resumes from its last checkpoint and continues the same curve.
Under ``torchrun`` every unit trains with DDP (rows of each global batch are split over ranks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.core import distributed
from thrifty.core.checkpoint import checkpoint_at, latest_checkpoint, load_checkpoint, save_checkpoint
from thrifty.core.claims import Claim, paired_claim, value_claim, works_claim
from thrifty.core.config import ConfigError
from thrifty.core.run import (
    MetricsLog,
    autocast,
    data_root,
    finish_run,
    main_first,
    open_run,
    progress,
    seed_everything,
    write_json,
)
from thrifty.data import text
from thrifty.methods.glam import bigram, expert_parallel, figures, sharding
from thrifty.methods.glam.baselines import (
    ArmSpec,
    accounting_table,
    build_arms,
    build_model,
    flops_per_token,
    param_counts,
)
from thrifty.methods.glam.config import GlamConfig
from thrifty.methods.glam.model import GlamLM

log = logging.getLogger(__name__)
RECIPE = "glam"
Config = GlamConfig  # the registry's contract: a recipe module exposes Config and train
PAPER = {"title": "GLaM: Efficient Scaling of Language Models with Mixture-of-Experts", "arxiv": "2112.06905"}


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for several consecutive steps."""


# --- data -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LMData:
    """Token streams per source and split, the mixture weights and the split manifest."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    weights: dict[str, float]
    manifest: dict[str, Any]
    digest: str
    vocab_size: int


def prepare_data(cfg: GlamConfig) -> LMData:
    """Load and split the corpus, train (or reuse) the BPE and tokenise every split once (cached)."""
    if cfg.data.mixture_file:
        sources = text.load_mixture_file(cfg.data.mixture_file)
    else:
        sources = text.shipped_sources(cfg.data.sources, cfg.data.weights)
    corpus = text.build_corpus(sources, holdout=cfg.data.holdout)
    cache = data_root(cfg) / "text"
    tok = text.train_tokenizer(corpus, vocab_size=cfg.model.vocab_size, cache_dir=cache)
    streams = {
        split: {
            s: text.tokenize_split(corpus, tok, source=s, split=split, cache_dir=cache, show_progress=cfg.progress)
            for s in corpus.sources
        }
        for split in text.SPLITS
    }
    return LMData(
        train=streams["train"],
        val=streams["val"],
        test=streams["test"],
        weights=corpus.weights,
        manifest=corpus.manifest,
        digest=corpus.digest,
        vocab_size=tok.get_vocab_size(),
    )


# --- optimisation ---------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, cfg: GlamConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adafactor":
        return torch.optim.Adafactor(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)


def lr_at(step: int, cfg: GlamConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then the chosen decay."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "rsqrt":
        return o.lr * math.sqrt(max(o.warmup_steps, 1) / (step + 1))
    progress_frac = (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress_frac, 1.0)))


# --- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    streams: dict[str, np.ndarray],
    weights: dict[str, float],
    cfg: GlamConfig,
    info: distributed.DistInfo,
    *,
    max_windows: int,
) -> dict[str, float]:
    """Mean next-token loss (nats) per source and mixture-weighted overall, on held-out windows.

    The windows of all sources are interleaved in one fixed shuffled order, so every evaluation batch
    mixes sources the way training batches do, and each token's loss is credited to its source.
    (Capacity routing is decided per group: batches of one source crowd the same experts, and at the
    ``quick`` size 6–10% of validation tokens then lose both experts, against 1–4% in mixed batches.)

    Under torchrun the windows are split over the ranks and the sums all-reduced. Every rank runs the
    same number of equally shaped forwards (FSDP all-gathers and expert all-to-alls need every rank in
    each one): a rank with fewer windows fills its last batch with padding rows, which the model never
    routes and whose loss is not counted.
    """
    was_training = model.training
    model.eval()
    sources = list(streams)
    per_source = list(eval_window_sets(streams, cfg, max_windows=max_windows).values())
    windows = np.concatenate(per_source) if per_source else np.zeros((0, cfg.model.seq_len + 1), np.int64)
    owner = np.concatenate([np.full(len(w), i) for i, w in enumerate(per_source)]) if per_source else np.zeros(0)
    order = np.random.default_rng(0).permutation(len(windows))
    if info.enabled:
        share = -(-len(order) // info.world_size)
        order = order[info.rank :: info.world_size]
        order = np.concatenate([order, np.full(share - len(order), -1)])  # -1 = padding row
    totals = torch.zeros(len(sources), 2, dtype=torch.float64)  # per source: loss sum, tokens
    for i in range(0, len(order), cfg.eval_batch_size):
        rows = order[i : i + cfg.eval_batch_size]
        real, rows = torch.from_numpy(rows >= 0), rows.clip(min=0)  # padding rows repeat window 0, uncounted
        batch = torch.from_numpy(windows[rows]).to(info.device)
        pad = None if bool(real.all()) else real.to(info.device).view(-1, 1).expand(-1, batch.shape[1] - 1)
        with autocast(info.device.type, cfg.precision):
            logits = model(batch[:, :-1], padding_mask=pad).logits
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none").sum(1).double().cpu()
        src = torch.from_numpy(owner[rows]).long()[real]
        totals[:, 0].index_add_(0, src, nll[real])
        totals[:, 1].index_add_(0, src, torch.full_like(nll[real], batch.shape[1] - 1))
    if info.enabled:
        torch.distributed.all_reduce(totals)
    out = {s: float(totals[i, 0] / totals[i, 1]) if totals[i, 1] > 0 else float("nan") for i, s in enumerate(sources)}
    out["overall"] = bigram.mixture_mean(out, weights)
    model.train(was_training)
    return out


def eval_window_sets(streams: dict[str, np.ndarray], cfg: GlamConfig, *, max_windows: int) -> dict[str, np.ndarray]:
    """Per source, the held-out windows ``[n, seq_len+1]`` every evaluation (LM and bigram) scores."""
    return {
        s: text.eval_windows(x, seq_len=cfg.model.seq_len, max_windows=max_windows or 1 << 62)
        for s, x in streams.items()
    }


def bigram_baseline(cfg: GlamConfig, data: LMData) -> dict[str, Any]:
    """The trivial baseline: a Kneser-Ney bigram fitted on the training tokens, its discount chosen on
    validation, scored on exactly the validation and test targets the LMs are scored on."""
    val = eval_window_sets(data.val, cfg, max_windows=cfg.data.eval_windows)
    test = eval_window_sets(data.test, cfg, max_windows=cfg.data.test_windows)
    model, tried = bigram.fit_on_validation(list(data.train.values()), val, data.weights, vocab_size=data.vocab_size)
    return {
        "discount": model.discount,
        "val_by_discount": {str(d): v for d, v in tried.items()},
        "val": bigram.mixture_loss(model, val, data.weights),
        "test": bigram.mixture_loss(model, test, data.weights),
    }


# --- one training unit (arm x seed) ---------------------------------------------------------------------


def _mean_stats(window: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, Any]]:
    """Average per-layer MoE diagnostics over the steps of a logging window (loads are summed)."""
    if not window or not window[0]:
        return []
    layers = []
    for li in range(len(window[0])):
        rec: dict[str, Any] = {}
        for key in window[0][li]:
            vals = torch.stack([step[li][key].float() for step in window])
            rec[key] = (vals.sum(0) if key.endswith("load") else vals.mean(0)).tolist()
        layers.append(rec)
    return layers


def train_unit(
    spec: ArmSpec,
    seed: int,
    cfg: GlamConfig,
    data: LMData,
    run_dir: Path,
    metrics: MetricsLog,
    info: distributed.DistInfo,
) -> dict[str, Any]:
    """Train one arm with one seed; returns its result record (also written to ``result.json``)."""
    unit = f"{spec.name}/seed{seed}"
    unit_dir = run_dir / "units" / spec.name / f"seed{seed}"
    done_file = unit_dir / "result.json"
    if cfg.resume and done_file.exists():
        log.info("%s: finished earlier, reusing %s", unit, done_file)
        return json.loads(done_file.read_text())

    seed_everything(seed)
    ep = cfg.expert_parallel and spec.is_moe and info.enabled
    fsdp = cfg.fsdp and info.enabled
    per_rank = ep or fsdp  # every rank holds different tensors: per-rank checkpoints and clipping
    model = sharding.build_sharded(
        spec,
        seed=seed,
        device=info.device,
        rank=info.rank,
        world_size=info.world_size,
        shard_experts=ep,
        fsdp=fsdp,
    )
    optimizer = make_optimizer(model, cfg)
    ckpt_dir = unit_dir / "checkpoints" / (f"rank{info.rank}" if per_rank else "")
    step, train_seconds = 0, 0.0
    ckpt = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if per_rank:  # every rank resumes from the newest step all ranks have saved (a kill can split them)
        agreed = distributed.all_reduce_min_int(int(ckpt.name.split("-")[1]) if ckpt else 0)
        ckpt = checkpoint_at(ckpt_dir, agreed) if agreed else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, train_seconds = state["step"], float(state["extra"].get("train_seconds", 0.0))
        log.info("%s: resuming from %s (step %d)", unit, ckpt, step)
    if cfg.resume:  # drop what a killed attempt logged after the point we continue from
        metrics.truncate(unit, step)
    if fsdp:  # FSDP2 reduce-scatters (averages) the sharded gradients; experts are rescaled to match
        ddp = expert_parallel.rescale_expert_gradients(model, world_size=info.world_size) if ep else model
    elif ep:
        ddp = expert_parallel.ddp_for_expert_parallel(model, world_size=info.world_size)
    else:
        ddp = DDP(model) if info.enabled else model
    schedule = text.MixtureSchedule(
        data.train,
        data.weights,
        seq_len=cfg.model.seq_len,
        batch_size=cfg.batch_size,
        seed=seed,
        max_steps=cfg.max_steps,
    )
    rows = distributed.shard_rows(cfg.batch_size, info)
    tokens_per_step = cfg.batch_size * cfg.model.seq_len
    flops = flops_per_token(spec, cfg.model.seq_len, batch_tokens=tokens_per_step)
    clip = sharding.clip_grad_norm_ if per_rank else torch.nn.utils.clip_grad_norm_

    window: list[list[dict[str, torch.Tensor]]] = []
    sums = torch.zeros(5, dtype=torch.float64)  # loss, lm, aux, z, grad_norm
    bad_steps = 0
    model.train()
    with progress(cfg.max_steps, unit, enabled=cfg.progress and info.is_main, start=step) as advance:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = torch.from_numpy(schedule.batch(step)[rows]).to(info.device)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(info.device.type, cfg.precision):
                out = ddp(batch[:, :-1], labels=batch[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = clip(model if per_rank else model.parameters(), cfg.optim.grad_clip)
            if not (torch.isfinite(out.loss) and torch.isfinite(grad_norm)):
                bad_steps += 1
                log.warning("%s: non-finite loss/gradient at step %d, skipping the update", unit, step)
                if bad_steps >= 3:
                    raise TrainingDiverged(f"{unit}: loss non-finite for 3 consecutive steps (step {step})")
            else:
                bad_steps = 0
                optimizer.step()
            step += 1
            train_seconds += time.perf_counter() - t0
            sums += torch.tensor(
                [
                    out.loss.item(),
                    out.lm_loss.item(),
                    out.aux_loss.item(),
                    out.z_loss.item(),
                    float(grad_norm),
                ],
                dtype=torch.float64,
            )
            window.append(out.moe_stats)
            log_now = step % cfg.log_every == 0 or step == cfg.max_steps
            eval_now = step % cfg.eval_every == 0 or step == cfg.max_steps
            if log_now or eval_now:
                where = {
                    "unit": unit,
                    "arm": spec.name,
                    "seed": seed,
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "train_flops": step * tokens_per_step * flops["train_activated"],
                }
            if log_now:
                avg = distributed.all_reduce_mean(sums / len(window))
                rec = {
                    **where,
                    "lr": lr,
                    "loss": avg[0].item(),
                    "lm_loss": avg[1].item(),
                    "aux_loss": avg[2].item(),
                    "z_loss": avg[3].item(),
                    "grad_norm": avg[4].item(),
                    "moe": _mean_stats(window),
                }
                metrics.log(rec)
                advance(len(window), loss=rec["lm_loss"])
                window, sums = [], torch.zeros(5, dtype=torch.float64)
            if eval_now:
                val = evaluate(model, data.val, data.weights, cfg, info, max_windows=cfg.data.eval_windows)
                metrics.log({**where, "split": "val", **val})
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps and (info.is_main or per_rank):
                save_checkpoint(
                    ckpt_dir,
                    step=step,
                    model=model,
                    optimizer=optimizer,
                    extra={"train_seconds": train_seconds},
                    keep=cfg.keep_checkpoints,
                )
            if step % cfg.checkpoint_every == 0 and info.enabled:
                distributed.barrier()

    # the only time the test split is touched
    test = evaluate(model, data.test, data.weights, cfg, info, max_windows=cfg.data.test_windows)
    final_state = sharding.gather_full_state(model) if per_rank else None
    logged = metrics.read(unit)
    curve = [r for r in logged if r.get("split") == "val"]
    train_recs = [r for r in logged if "moe" in r]
    tail = train_recs[-max(1, len(train_recs) // 4) :]
    result = {
        "arm": spec.name,
        "seed": seed,
        "steps": step,
        "tokens": step * tokens_per_step,
        "val": curve[-1] if curve else {},
        "test": test,
        "curve": [[r["step"], r["tokens"], r["train_flops"], r["overall"]] for r in curve],
        "train_seconds": train_seconds,
        "tokens_per_s": step * tokens_per_step / max(train_seconds, 1e-9),
        "params": param_counts(spec),
        "flops_per_token": flops,
        "moe_tail": _tail_moe(tail),
    }
    if info.is_main:
        unit_dir.mkdir(parents=True, exist_ok=True)
        if final_state is not None:
            save_file({k: v.contiguous() for k, v in final_state.items()}, str(unit_dir / "model.safetensors"))
        else:
            save_model(model, str(unit_dir / "model.safetensors"))
        write_json(done_file, result)
    return result


def _tail_moe(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per MoE layer: scalar diagnostics averaged over the last quarter of training."""
    if not records or not records[0].get("moe"):
        return []
    out = []
    for li in range(len(records[0]["moe"])):
        keys = [k for k, v in records[0]["moe"][li].items() if not isinstance(v, list)]
        out.append({k: float(np.mean([r["moe"][li][k] for r in records])) for k in keys})
    return out


# --- claims -------------------------------------------------------------------------------------------


WORKS_PPL_RATIO = 0.8  # the works claim: MoE test perplexity at least 20% below the bigram's


def make_claims(
    cfg: GlamConfig, results: dict[str, dict[int, dict[str, Any]]], *, bigram_test: float | None = None
) -> list[Claim]:
    """GLaM's direction, measured on the held-out *test* split over seeds (paired by seed).

    Args:
        bigram_test: the Kneser-Ney bigram's test loss on the same targets (the works claim's baseline).
    """
    claims: list[Claim] = []

    def test_loss(arm: str) -> dict[int, float]:
        return {s: r["test"]["overall"] for s, r in results.get(arm, {}).items()}

    if "moe" in results and bigram_test is not None:
        claims.append(
            works_claim(
                id="moe_beats_bigram",
                statement=f"The MoE LM works: its held-out test perplexity is at least "
                f"{100 * (1 - WORKS_PPL_RATIO):.0f}% below an interpolated Kneser-Ney bigram's on the same test "
                f"tokens (test loss lower by more than ln(1/{WORKS_PPL_RATIO:g}) nats)",
                method=test_loss("moe"),
                baseline_value=bigram_test,
                margin=-math.log(WORKS_PPL_RATIO),
                direction="less",
                paper_value="not in the paper: the trivial baseline every LM must clear",
                preset=cfg.preset,
                baseline=f"KN bigram ({bigram_test:.3f} nats)",
                unit="nats (moe − bigram)",
            )
        )

    if "moe" in results and "dense-active" in results:
        claims.append(
            paired_claim(
                id="moe_beats_dense_active",
                statement="MoE (top-2, E experts every other layer) reaches a lower held-out test loss than a dense "
                "model with the same activated FLOPs per token, trained on the same tokens",
                a=test_loss("moe"),
                b=test_loss("dense-active"),
                direction="less",
                paper_value="GLaM (64B/64E, 96.6B activated) beats dense GPT-3 (175B) on zero/one/few-shot averages "
                "with about half the inference FLOPs per token",
                preset=cfg.preset,
                baseline="dense-active",
                unit="nats (moe − dense)",
            )
        )
    if "moe" in results and "dense-params" in results:
        claims.append(
            paired_claim(
                id="dense_params_lower_loss",
                statement="A dense model with the same *total* parameters reaches a lower test loss than the MoE "
                "(it spends ~2-3x the FLOPs per token; MoE trades quality per parameter for compute)",
                a=test_loss("moe"),
                b=test_loss("dense-params"),
                direction="greater",
                paper_value="not reported as a headline; card expectation: the gap is small or reversed",
                preset=cfg.preset,
                baseline="dense-params",
                unit="nats (moe − dense)",
                note="reported whichever way it goes",
            )
        )
    if "moe" in results and cfg.loss.aux_weight > 0:
        seeds = sorted(results["moe"])
        both = [max(layer["both_dropped"] for layer in results["moe"][s]["moe_tail"]) for s in seeds]
        ent = [min(layer["load_entropy"] for layer in results["moe"][s]["moe_tail"]) for s in seeds]
        claims.append(
            value_claim(
                id="drops_rare",
                statement="With the aux loss on, tokens dropped by both experts stay rare (< 1% of tokens in every "
                "MoE layer, last quarter of training)",
                values=both,
                seeds=seeds,
                direction="less",
                threshold=0.01,
                paper_value="GShard/GLaM: capacity factor 2 with balanced routing keeps overflow low",
                preset=cfg.preset,
                unit="fraction of tokens",
            )
        )
        claims.append(
            value_claim(
                id="load_near_uniform",
                statement="With the aux loss on, expert load stays near uniform (normalised load entropy > 0.95 in "
                "every MoE layer, last quarter of training)",
                values=ent,
                seeds=seeds,
                direction="greater",
                threshold=0.95,
                paper_value="balanced expert load is the aux loss's purpose (weight 0.01)",
                preset=cfg.preset,
                unit="entropy / log E",
            )
        )
    if "ablation-aux0" in results and "moe" in results:
        shared = sorted(set(results["ablation-aux0"]) & set(results["moe"]))

        def tail_mean(arm: str, key: str) -> dict[int, float]:
            return {s: float(np.mean([la[key] for la in results[arm][s]["moe_tail"]])) for s in shared}

        aux_effects = [  # (id, diagnostic, direction, what it does, paper, unit)
            (
                "aux_raises_load_entropy",
                "load_entropy",
                "greater",
                "raises the normalised expert-load entropy",
                "GShard: without it routing collapses onto few experts",
                "entropy / log E",
            ),
            (
                "aux_lowers_top1_overflow",
                "over_capacity_1",
                "less",
                "lowers over_capacity_1, the share of top-1 assignments beyond expert capacity",
                "card: aux 0.01 gives lower over_capacity_1 than aux 0",
                "fraction of top-1 slots",
            ),
        ]
        for cid, key, direction, what, paper, unit in aux_effects:
            claims.append(
                paired_claim(
                    id=cid,
                    statement=f"The load-balancing loss (0.01 vs 0) {what} (mean over MoE layers, last quarter "
                    "of training)",
                    a=tail_mean("moe", key),
                    b=tail_mean("ablation-aux0", key),
                    direction=direction,  # type: ignore[arg-type]
                    paper_value=paper,
                    preset=cfg.preset,
                    baseline="aux weight 0",
                    unit=unit,
                )
            )
    # a claim needs an interval: with a single seed there is none, so the tables carry those runs
    return [c for c in claims if len(c.seeds) >= 2]


# --- the recipe -----------------------------------------------------------------------------------------


def train(cfg: GlamConfig) -> dict[str, Any]:
    """Run the whole GLaM recipe; returns the ``results.json`` content."""
    t_start = time.perf_counter()
    info, run_dir, metrics = open_run(RECIPE, cfg)

    check_world_size(cfg, info)
    data = main_first(lambda: prepare_data(cfg), info)  # other ranks read the caches rank 0 just wrote
    if info.is_main:
        check_same_corpus(run_dir, data)
    if data.vocab_size != cfg.model.vocab_size:
        log.warning(
            "tokenizer has %d tokens (asked %d); using %d",
            data.vocab_size,
            cfg.model.vocab_size,
            data.vocab_size,
        )
        cfg.model.vocab_size = data.vocab_size

    specs = build_arms(cfg)
    units = [
        (spec, seed)
        for spec in specs
        for seed in (cfg.seeds if not spec.name.startswith("ablation-") else cfg.seeds[: cfg.ablation_seeds])
    ]
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for spec, seed in units:
        res = train_unit(spec, seed, cfg, data, run_dir, metrics, info)
        results.setdefault(spec.name, {})[seed] = res

    summary: dict[str, Any] = {}
    if info.is_main:
        baseline = bigram_baseline(cfg, data)  # training-free; scored on the LMs' validation and test targets
        claims = make_claims(cfg, results, bigram_test=baseline["test"]["overall"])
        tables = [accounting_table(cfg, specs), results_table(results, data, baseline), diagnostics_table(results)]
        figs = figures.make_all(run_dir, results, metrics)
        summary = {
            "recipe": RECIPE,
            "paper": PAPER,
            "preset": cfg.preset,
            "run_dir": str(run_dir),
            "claims": [c.to_dict() for c in claims],
            "tables": tables,
            "figures": [str(p.relative_to(run_dir)) for p in figs],
            "baselines": {"kneser_ney_bigram": baseline},
            "data": {"manifest_sha256": data.digest, "sources": list(data.weights), "weights": data.weights},
        }
    tokens_per_s = {arm: float(np.mean([r["tokens_per_s"] for r in rs.values()])) for arm, rs in results.items()}
    return finish_run(summary, run_dir, cfg, t_start=t_start, info=info, tokens_per_s=tokens_per_s)


def check_world_size(cfg: GlamConfig, info: distributed.DistInfo) -> None:
    """Reject, before any training, settings that cannot be split over this many ranks."""
    if cfg.batch_size % info.world_size:
        raise ConfigError(
            f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the world size ({info.world_size})"
        )
    if cfg.expert_parallel and info.enabled:
        for spec in build_arms(cfg):
            moe = spec.kwargs.get("moe")
            if moe is not None and (moe.mode == "dropless" or moe.num_experts % info.world_size):
                raise ConfigError(
                    f"arm {spec.name!r}: expert_parallel needs capacity/top1 routing and a number "
                    f"of experts divisible by the world size ({info.world_size})"
                )


def check_same_corpus(run_dir: Path, data: LMData) -> None:
    """Refuse to resume a run whose corpus (hence tokenizer and splits) has changed since it started."""
    path = run_dir / "splits.json"
    if path.exists():
        old = json.loads(path.read_text()).get("digest")
        if old and old != data.digest:
            raise ConfigError(
                f"the corpus of {run_dir} changed since the run started (manifest {old} -> "
                f"{data.digest}); resuming would mix tokenizers and splits. Use a new run_name."
            )
    write_json(path, {"digest": data.digest, **data.manifest})


def results_table(
    results: dict[str, dict[int, dict[str, Any]]], data: LMData, baseline: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per arm: test loss and perplexity (mean ± std over seeds) overall and per source; tokens/s.
    The trivial baseline (training-free, one value) comes first when given."""
    sources = ["overall", *data.weights]
    rows = []
    if baseline is not None:
        rows.append(
            [
                f"KN bigram (D={baseline['discount']:g}, chosen on val)",
                "—",
                *[f"{baseline['test'][s]:.3f} (ppl {math.exp(baseline['test'][s]):.1f})" for s in sources],
                "—",
            ]
        )
    for arm, per_seed in results.items():
        row: list[Any] = [arm, len(per_seed)]
        for s in sources:
            vals = [r["test"][s] for r in per_seed.values()]
            m = float(np.mean(vals))
            sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
            row.append(f"{m:.3f} ± {sd:.3f} (ppl {math.exp(m):.1f})")
        row.append(round(float(np.mean([r["tokens_per_s"] for r in per_seed.values()]))))
        rows.append(row)
    return {
        "title": "Held-out test loss in nats, mean ± std over seeds (perplexity)",
        "columns": ["arm", "seeds", *sources, "train tokens/s"],
        "rows": rows,
    }


def diagnostics_table(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per MoE arm and layer: over-capacity, both-dropped, entropies and aux (last quarter, seed mean)."""
    keys = [
        "over_capacity_1",
        "over_capacity_2",
        "both_dropped",
        "drop_rate",
        "router_entropy",
        "load_entropy",
        "aux_loss",
    ]
    rows = []
    for arm, per_seed in results.items():
        tails = [r["moe_tail"] for r in per_seed.values() if r.get("moe_tail")]
        if not tails:
            continue
        for li in range(len(tails[0])):
            rows.append([arm, li, *[round(float(np.mean([t[li][k] for t in tails])), 4) for k in keys]])
    return {
        "title": "MoE diagnostics per layer (last quarter of training, mean over seeds)",
        "columns": ["arm", "moe layer", *keys],
        "rows": rows,
    }


def model_from_run(unit_dir: Path, spec: ArmSpec) -> GlamLM:
    """Load a trained unit's final weights (``units/<arm>/seed<k>/model.safetensors``)."""
    from safetensors.torch import load_model

    model = build_model(spec)
    load_model(model, str(Path(unit_dir) / "model.safetensors"))
    return model
