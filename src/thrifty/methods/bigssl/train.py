"""BigSSL recipe: Conformer ASR pre-trained with wav2vec 2.0 or w2v-BERT on unlabelled audio, fine-tuned with CTC on
a fraction of the labels, then improved by noisy-student training.

Paper: Zhang et al., *BigSSL: Exploring the Frontier of Large-Scale Semi-Supervised Learning for Automatic Speech
Recognition*, arXiv 2109.13226; with *Pushing the Limits of Semi-Supervised Learning for ASR* (arXiv 2010.10504),
*Improved Noisy Student Training* (arXiv 2005.09629), wav2vec 2.0 (2006.11477) and w2v-BERT (2108.06209).

Reads top to bottom: data (corpus, log-mel cache, ``manifest.json``) → character LM → pretrain (one run, shared by
every fraction and seed; DDP under ``torchrun``) → finetune (init × fraction × seed units, shared out over ranks) →
nst (generations per fraction × seed chain) → evaluate (claims, tables, figures, ``results.json``). Dev chooses
every step and every decoding weight; each test set is read once per trained model (``access_log.jsonl``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from thrifty.core import distributed
from thrifty.core.claims import Claim, format_mean_ci, paired_claim, works_claim
from thrifty.core.run import (
    MetricsLog,
    configure_torch,
    data_root,
    finish_run,
    machine_roots,
    new_summary,
    portable,
    prepare_run_dir,
    progress,
    resolve_device,
    write_json,
)
from thrifty.core.splits import AccessLog
from thrifty.methods.bigssl import figures
from thrifty.methods.bigssl.config import BigSSLConfig
from thrifty.methods.bigssl.data import SpeechData, fraction_size, prepare_data
from thrifty.methods.bigssl.decode import word_error_rate
from thrifty.methods.bigssl.finetune import finetune
from thrifty.methods.bigssl.lm import CharNGramLM
from thrifty.methods.bigssl.loop import finetune_dir, nst_dir, pretrain_dir
from thrifty.methods.bigssl.nst import generation
from thrifty.methods.bigssl.pretrain import pretrain

log = logging.getLogger(__name__)
RECIPE = "bigssl"
Config = BigSSLConfig
PAPER = {
    "title": "BigSSL: Exploring the Frontier of Large-Scale Semi-Supervised Learning for Automatic Speech Recognition",
    "arxiv": "2109.13226",
}
PAPER_VALUES = {
    "pretrain": "8B pre-trained Conformer matches SoTA with 3% of the 34k-hour task's labels and beats it with 100%",
    "nst": "Improved NST (2005.09629): LibriSpeech 100h + 860h unlabelled → 4.2 / 8.6 WER; XXL-P + NST 7.8 WER on "
    "AMI IHM, XXL-PS 5.0 on TED-LIUM (BigSSL)",
    "low": "the pre-training gain is largest at few labels (BigSSL's data-efficiency study; numbers not verified)",
    "matches": "with 3% of the labels the pre-trained 8B model matches the SoTA trained on all labels",
}
ARMS = ("scratch", "pretrained", "pretrained+nst")
PRIMARY = "greedy_wer"
WORKS_MARGIN = 50.0  # WER points below the better trivial baseline (fixed before the claim preset ran)


# --------------------------------------------------------------------------------------------------- results


def collect(cfg: BigSSLConfig, run_dir: Path) -> dict[str, dict[float, dict[int, dict]]]:
    """``results[arm][fraction][seed]`` from finished units; ``pretrained+nst`` is the last finished generation."""
    out: dict[str, dict[float, dict[int, dict]]] = {}
    for init in cfg.active_inits:
        for fraction in cfg.finetune.fractions:
            for seed in cfg.seeds:
                path = finetune_dir(run_dir, init, fraction, seed) / "result.json"
                if path.exists():
                    out.setdefault(init, {}).setdefault(fraction, {})[seed] = json.loads(path.read_text())
    for fraction in cfg.nst_fractions:
        for seed in cfg.seeds:
            last = None
            for gen in range(1, cfg.nst.generations + 1):
                path = nst_dir(run_dir, fraction, seed, gen) / "result.json"
                if path.exists():
                    last = json.loads(path.read_text())
            if last is not None:
                out.setdefault("pretrained+nst", {}).setdefault(fraction, {})[seed] = last
    return out


def collect_nst(cfg: BigSSLConfig, run_dir: Path) -> dict[float, dict[int, list[dict]]]:
    """Every generation per (fraction, seed), with the teacher as generation 0."""
    out: dict[float, dict[int, list[dict]]] = {}
    for fraction in cfg.nst_fractions:
        for seed in cfg.seeds:
            runs = []
            teacher = finetune_dir(run_dir, "pretrained", fraction, seed) / "result.json"
            if teacher.exists():
                runs.append({"generation": 0, **json.loads(teacher.read_text())})
            for gen in range(1, cfg.nst.generations + 1):
                path = nst_dir(run_dir, fraction, seed, gen) / "result.json"
                if path.exists():
                    runs.append(json.loads(path.read_text()))
            if len(runs) > 1:
                out.setdefault(fraction, {})[seed] = runs
    return out


def _rate(results: dict, arm: str, fraction: float, test: str, metric: str = PRIMARY) -> dict[int, float]:
    return {s: 100 * r["test"][test][metric] for s, r in results.get(arm, {}).get(fraction, {}).items()}


def trivial_baselines(labelled_texts: list[str], tests: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Training-free outputs scored like a model, per test set: ``blank`` (the empty transcript, what a CTC model
    emits before it learns anything: 100% WER) and ``most_frequent_word`` (the labelled pool's most frequent word
    as the whole transcript). ``{baseline: {test: WER}}`` as fractions."""
    counts = Counter(w for t in labelled_texts for w in t.split())
    word = counts.most_common(1)[0][0] if counts else ""
    out: dict[str, dict[str, float]] = {"blank": {}, "most_frequent_word": {}}
    for name, refs in tests.items():
        out["blank"][name] = word_error_rate(refs, [""] * len(refs))
        out["most_frequent_word"][name] = word_error_rate(refs, [word] * len(refs))
    return out


def best_cell(results: dict) -> tuple[str, float] | None:
    """The (arm, fraction) with the lowest mean dev WER of its kept steps (validation chooses the "best model")."""
    cells = [
        (arm, f, float(np.mean([r["dev_wer"] for r in per.values()])))
        for arm, fr in results.items()
        for f, per in fr.items()
        if per
    ]
    if not cells:
        return None
    arm, fraction, _ = min(cells, key=lambda c: c[2])
    return arm, fraction


def make_claims(cfg: BigSSLConfig, results: dict, tests: list[str], trivial: dict | None = None) -> list[Claim]:
    """The claims on WER (the paper's metric) on every test set, on CER (which still separates models whose WER is
    near 100%) on the first (in-domain) one, and the works claim: the dev-chosen best model beats the better
    trivial baseline by more than :data:`WORKS_MARGIN` WER points on the in-domain test set."""
    claims = []
    for k, test in enumerate(tests):
        for metric in ("wer", "cer") if k == 0 else ("wer",):
            claims += _claims(cfg, results, test, metric, suffix="" if k == 0 else f"_{test}")
    best = best_cell(results)
    if trivial and best and tests:
        arm, fraction = best
        floor = min(100 * trivial[b][tests[0]] for b in trivial)
        wer = _rate(results, arm, fraction, tests[0])
        if len(wer) >= 2:
            claims.append(
                works_claim(
                    id="best_model_works",
                    statement=f"the best model on dev ({arm} at {fraction:.0%} of the labels) beats the better "
                    f"trivial baseline (blank or most-frequent-word output, {floor:.1f}% WER) by more than "
                    f"{WORKS_MARGIN:g} WER points on {tests[0]}, greedy decoding",
                    method=wer,
                    baseline_value=floor,
                    margin=WORKS_MARGIN,
                    direction="less",
                    preset=cfg.preset,
                    baseline="trivial output",
                    unit="WER points",
                )
            )
    return claims


def _claims(cfg: BigSSLConfig, results: dict, test: str, metric: str, *, suffix: str = "") -> list[Claim]:
    """Per fraction: pre-training lowers the error rate; NST lowers it further. Across fractions: the relative
    pre-training gain is larger at the lowest fraction than at the highest; pre-trained at the lowest fraction
    reaches scratch at 100%. Paired over fine-tuning seeds, on the in-domain test set, greedy decoding."""
    claims: list[Claim] = []
    name = metric.upper()
    unit = f"{name} points"
    key = f"greedy_{metric}"
    sfx = ("" if metric == "wer" else "_cer") + suffix
    fractions = sorted(cfg.finetune.fractions)

    def rate(arm: str, f: float) -> dict[int, float]:
        return _rate(results, arm, f, test, key)

    for f in fractions:
        scratch, pre, nst = (rate(a, f) for a in ARMS)
        at = f"{test} {name}, {f:.0%} of the labelled pool, greedy decoding"
        if scratch and pre:
            claims.append(
                paired_claim(
                    id=f"pretraining_lowers_{metric}_{f:g}{suffix}",
                    statement=f"pre-training ({cfg.pretrain.objective}) lowers {name} against scratch ({at}); "
                    "measured = scratch − pre-trained",
                    a=scratch,
                    b=pre,
                    direction="greater",
                    paper_value=PAPER_VALUES["pretrain"],
                    preset=cfg.preset,
                    baseline="scratch",
                    unit=unit,
                )
            )
        if pre and nst:
            claims.append(
                paired_claim(
                    id=f"nst_lowers_{metric}_{f:g}{suffix}",
                    statement=f"noisy-student training ({cfg.nst.generations} generation(s)) lowers {name} further "
                    f"({at}); measured = pre-trained − pre-trained+NST",
                    a=pre,
                    b=nst,
                    direction="greater",
                    paper_value=PAPER_VALUES["nst"],
                    preset=cfg.preset,
                    baseline="pretrained",
                    unit=unit,
                )
            )
    low, high = fractions[0], fractions[-1]
    if low != high:

        def rel_gain(f: float) -> dict[int, float]:
            s, p = rate("scratch", f), rate("pretrained", f)
            return {k: 100 * (s[k] - p[k]) / max(s[k], 1e-9) for k in set(s) & set(p)}

        lo, hi = rel_gain(low), rel_gain(high)
        if set(lo) & set(hi):
            claims.append(
                paired_claim(
                    id=f"gain_largest_at_low_fraction{sfx}",
                    statement=f"the relative {name} reduction from pre-training is larger at {low:.0%} than at "
                    f"{high:.0%} of the labels ({test}); measured = difference of relative reductions",
                    a=lo,
                    b=hi,
                    direction="greater",
                    paper_value=PAPER_VALUES["low"],
                    preset=cfg.preset,
                    baseline=f"relative gain at {high:.0%}",
                    unit=f"% points of relative {name} reduction",
                )
            )
        pre_low, scratch_full = rate("pretrained", low), rate("scratch", high)
        if set(pre_low) & set(scratch_full):
            claims.append(
                paired_claim(
                    id=f"pretrained_low_reaches_scratch_full{sfx}",
                    statement=f"pre-trained with {low:.0%} of the labels reaches scratch with {high:.0%} ({test}); "
                    "measured = pre-trained@low − scratch@high, the interval must lie below 0",
                    a=pre_low,
                    b=scratch_full,
                    direction="less",
                    paper_value=PAPER_VALUES["matches"],
                    preset=cfg.preset,
                    baseline=f"scratch at {high:.0%}",
                    unit=unit,
                )
            )
    return [c for c in claims if len(c.seeds) >= 2]


def wer_table(
    cfg: BigSSLConfig, results: dict, tests: list[str], hours: dict[float, float], trivial: dict | None = None
) -> dict[str, Any]:
    rows = []
    for name, per_test in (trivial or {}).items():
        row: list[Any] = ["none", f"trivial: {name}", "-"]
        for test in tests:
            row += [f"{100 * per_test[test]:.1f}", "", ""]
        rows.append([*row, ""])
    for fraction in sorted(cfg.finetune.fractions):
        for arm in ARMS:
            per = results.get(arm, {}).get(fraction, {})
            if not per:
                continue
            row: list[Any] = [f"{fraction:.0%} ({hours[fraction]:.2f} h)", arm, len(per)]
            for test in tests:
                for metric in ("greedy_wer", "lm_wer", "greedy_cer"):
                    vals = [100 * r["test"][test][metric] for r in per.values() if metric in r["test"][test]]
                    row.append(format_mean_ci(vals) if vals else "")
            row.append(format_mean_ci([100 * r["dev_wer"] for r in per.values()]))
            rows.append(row)
    cols = [f"{t} {m}" for t in tests for m in ("WER", "WER+LM", "CER")]
    return {
        "title": f"Test WER / CER % per label fraction and arm: mean [95% t-interval] over seeds; greedy "
        f"{cfg.finetune.decoder.upper()} decoding"
        + (
            " and CTC prefix beam search fused with the character 5-gram (λ, β tuned on dev)"
            if cfg.finetune.decoder == "ctc" and cfg.decode.use_lm
            else ""
        )
        + "; dev WER of the kept step; trivial rows: training-free outputs",
        "columns": ["labels", "arm", "seeds", *cols, "dev WER (selected)"],
        "rows": rows,
    }


def nst_table(nst: dict[float, dict[int, list[dict]]], test: str) -> dict[str, Any]:
    rows = []
    for fraction, per_seed in sorted(nst.items()):
        gens = sorted({r["generation"] for runs in per_seed.values() for r in runs})
        for g in gens:
            rs = [r for runs in per_seed.values() for r in runs if r["generation"] == g]

            def fmt(key: str, rs: list[dict] = rs) -> str:
                vals = [100 * r[key] for r in rs if r.get(key) is not None]
                return format_mean_ci(vals) if vals else ""

            rows.append(
                [
                    f"{fraction:.0%}",
                    g,
                    len(rs),
                    fmt("kept_fraction"),
                    fmt("pseudo_wer_all"),
                    fmt("pseudo_wer_kept"),
                    format_mean_ci([100 * r["test"][test]["greedy_wer"] for r in rs]),
                ]
            )
    return {
        "title": "Noisy-student generations (0 = the teacher, pre-trained + fine-tuned): share of pseudo-labels kept "
        "by the normalised filter, their WER against the hidden transcripts (measured, never used), and the model's "
        f"test WER ({test}, greedy); mean [95% t-interval] over seeds",
        "columns": [
            "labels",
            "generation",
            "seeds",
            "kept %",
            "pseudo WER % (all)",
            "pseudo WER % (kept)",
            "test WER %",
        ],
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------- the recipe


def language_model(cfg: BigSSLConfig, data: SpeechData, run_dir: Path) -> CharNGramLM | None:
    """The character n-gram for fusion (cached in the run directory); None when no stage fuses."""
    if not (cfg.decode.use_lm or cfg.nst.fusion):
        return None
    path = run_dir / "units" / "lm.json"
    if path.exists():
        return CharNGramLM.from_json(path)
    lm = CharNGramLM(order=cfg.decode.lm_order).fit(data.lm_texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    lm.to_json(path)
    return lm


def train(cfg: BigSSLConfig) -> dict[str, Any]:
    """Run the BigSSL recipe; returns the ``results.json`` content."""
    t_start = time.perf_counter()
    configure_torch(cfg)
    info = distributed.init(resolve_device(cfg.device))
    run_dir = prepare_run_dir(RECIPE, cfg, write=info.is_main)
    distributed.barrier()
    rank = "" if info.is_main else f".rank{info.rank}"
    metrics = MetricsLog(run_dir / f"metrics{rank}.jsonl")
    access = AccessLog(run_dir / f"access_log{rank}.jsonl")
    cache = data_root(cfg)
    data = prepare_data(cfg, cache, access) if info.is_main else None  # rank 0 synthesises and caches first
    distributed.barrier()
    data = data or prepare_data(cfg, cache, access)
    if info.is_main:
        write_json(run_dir / "manifest.json", portable(data.manifest, machine_roots(cfg)))  # no machine path
    lm = language_model(cfg, data, run_dir) if info.is_main else None
    distributed.barrier()
    lm = lm or language_model(cfg, data, run_dir)

    pretrained = None
    if "pretrain" in cfg.stages and ("pretrained" in cfg.active_inits or "nst" in cfg.stages):
        pretrained = pretrain(cfg, data, run_dir, metrics, info)

    if "finetune" in cfg.stages:
        units = [(i, f, s) for i in cfg.active_inits for f in cfg.finetune.fractions for s in cfg.seeds]
        if "pretrained" in cfg.active_inits:
            encoder = pretrain_dir(run_dir, cfg.pretrain.objective, cfg.pretrain.seed) / "encoder.safetensors"
            if not encoder.exists():
                raise FileNotFoundError(
                    f"fine-tuning from the pre-trained encoder needs {encoder}; add the pretrain stage"
                )
        mine = units[info.rank :: info.world_size]
        with progress(len(mine), "fine-tuning", enabled=cfg.progress) as advance:
            for init, fraction, seed in mine:
                res = finetune(init, fraction, seed, cfg, data, run_dir, metrics, lm, info.device)
                first = next(iter(res["test"].values()), {PRIMARY: res["dev_wer"]})  # dev when tests are off
                advance(1, unit=f"{init}/{fraction:g}/s{seed}", wer=first[PRIMARY])
        distributed.barrier()

    if "nst" in cfg.stages and cfg.nst.generations > 0:
        chains = [(f, s) for f in cfg.nst_fractions for s in cfg.seeds]
        mine = chains[info.rank :: info.world_size]
        with progress(len(mine) * cfg.nst.generations, "noisy student", enabled=cfg.progress) as advance:
            for fraction, seed in mine:
                teacher = finetune_dir(run_dir, "pretrained", fraction, seed) / "result.json"
                if not teacher.exists():
                    raise FileNotFoundError(f"noisy-student training needs the teacher {teacher}; run stage finetune")
                for gen in range(1, cfg.nst.generations + 1):
                    res = generation(fraction, seed, gen, cfg, data, run_dir, metrics, lm, info.device)
                    advance(1, unit=f"{fraction:g}/s{seed}/gen{gen}", kept=res["kept"])
        distributed.barrier()

    labelled = len(data.labelled)
    hours = {
        f: data.labelled_fraction(f).hours for f in cfg.finetune.fractions
    }  # nested prefixes of the fixed pool order
    tests = list(data.tests) if cfg.finetune.test else []  # a calibration pilot reads and reports dev only
    fractions = {str(f): {"utterances": fraction_size(f, labelled), "hours": round(h, 4)} for f, h in hours.items()}
    summary = new_summary(RECIPE, PAPER, cfg, run_dir, data=data.manifest["sizes"], fractions=fractions)
    if "evaluate" in cfg.stages and info.is_main:
        results = collect(cfg, run_dir)
        nst = collect_nst(cfg, run_dir)
        pre_dir = pretrain_dir(run_dir, cfg.pretrain.objective, cfg.pretrain.seed)
        if pretrained is None and (pre_dir / "result.json").exists():
            pretrained = json.loads((pre_dir / "result.json").read_text())
        trivial = None
        if cfg.finetune.test:  # a calibration pilot (finetune.test=false) reads no test transcript
            refs = {name: [t or "" for t in data.tests[name].get("test", "baseline/trivial").texts] for name in tests}
            trivial = trivial_baselines([t for t in data.labelled.texts if t], refs)
        claims = make_claims(cfg, results, tests, trivial)
        tables = [wer_table(cfg, results, tests, hours, trivial)] if results else []
        if nst and tests:
            tables.append(nst_table(nst, tests[0]))
        if pretrained:
            summary["pretrain"] = {k: v for k, v in pretrained.items() if k != "curve"}
        figs = figures.make_all(
            run_dir,
            metrics,
            {
                "finetune": results,
                "tests": tests,
                "hours": hours,
                "nst": nst,
                "pretrain_unit": f"pretrain/{cfg.pretrain.objective}/s{cfg.pretrain.seed}" if pretrained else None,
                "max_perplexity": cfg.pretrain.groups * cfg.pretrain.codes,
            },
        )
        summary.update(
            claims=[c.to_dict() for c in claims],
            tables=tables,
            figures=[str(p.relative_to(run_dir)) for p in figs],
            wer=_summary_wer(results, tests),
            trivial_baselines=trivial,
            best_on_dev=best_cell(results),
        )
    return finish_run(summary, run_dir, cfg, t_start=t_start, info=info)


def _summary_wer(results: dict, tests: list[str]) -> dict[str, Any]:
    """``{arm: {fraction: {test: mean greedy WER}}}`` for quick reading of ``results.json``."""
    return {
        arm: {
            str(f): {t: float(np.mean([r["test"][t][PRIMARY] for r in per.values()])) for t in tests}
            for f, per in per_fraction.items()
        }
        for arm, per_fraction in results.items()
    }
