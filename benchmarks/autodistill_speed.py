"""AutoDistill speed: flash-distillation student steps/s with the teacher cache against recomputing the teacher
every step (how ITREX's and most distillation scripts run), achieved FLOP/s against this CPU's fp32 matmul
peak, latency-measurement repeatability (torch eager and ONNX Runtime milliseconds, against the interleaved
ratio to the reference architecture that the search and the claims use), and the cost of one exploration trial.

    python benchmarks/autodistill_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import interleaved, matmul_peak_gflops, table
from thrifty.methods.autodistill.config import AutodistillConfig
from thrifty.methods.autodistill.distill import first_layers, set_stage_trainable
from thrifty.methods.autodistill.latency import interleaved_latency, measure, repeatability
from thrifty.methods.autodistill.losses import layer_transfer_loss, mixed_mlm_loss
from thrifty.methods.autodistill.space import Arch
from thrifty.methods.autodistill.trial import build_student, evaluate_arch, prepare_context


def mid_arch(width: int) -> Arch:
    """A mid-sized student of the quick space at the teacher's width."""
    return Arch(
        num_layers=4, hidden_size=width, intra_bottleneck_size=128, num_heads=4, intermediate_size=512, num_ffn=2
    )


def step_fns(ctx, arch: Arch, *, stage: int | None):
    """(cached-teacher step, recomputed-teacher step, FLOPs of one cached step) for one stage of ``arch``."""
    student, _ = build_student(ctx, arch, seed=0)
    c = ctx.cache
    params = set_stage_trainable(student, stage, freeze_lower=True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    counter = {"b": 0}

    def teacher_outputs(b: int, recompute: bool):
        if not recompute:
            return c.hidden[b], c.attentions[b], c.batch_logits(b)
        with torch.inference_mode():
            out = ctx.teacher(input_ids=c.ids[b], output_hidden_states=True, output_attentions=True)
            keep = c.labels[b] != -100
            logits = ctx.head(out.last_hidden_state[keep])
        return torch.stack(out.hidden_states), torch.stack(out.attentions), logits

    def step(recompute: bool) -> None:
        b = counter["b"] = (counter["b"] + 1) % len(c)
        hidden, attn, logits = teacher_outputs(b, recompute)
        if stage is None:
            keep = c.labels[b] != -100
            loss = mixed_mlm_loss(student.head(student.encode(c.ids[b])[keep]), c.labels[b][keep], logits, 0.5)
        else:
            with first_layers(student, stage + 1):
                out = student.encoder(input_ids=c.ids[b], output_hidden_states=True, output_attentions=True)
            loss, _ = layer_transfer_loss(
                out.hidden_states[stage + 1], hidden[stage + 1], out.attentions[stage], attn[stage], stage=stage
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step(False)
    return (lambda: step(False)), (lambda: step(True)), fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default="", help="thrifty data cache (teacher head and cache are reused)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AutodistillConfig(progress=False, data_dir=args.data_dir)
    ctx = prepare_context(cfg)
    mid, ref = mid_arch(ctx.teacher_dim), ctx.reference_arch
    peak = max(matmul_peak_gflops().values())
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({args.threads} threads); batch {cfg.data.batch_size} × "
          f"{cfg.data.seq_len} tokens; student {mid.label}")  # fmt: skip

    rows = []
    for name, stage in (("layer-wise stage 2", 2), ("MLM stage", None)):
        cached, recompute, flops = step_fns(ctx, mid, stage=stage)
        t = interleaved({"cached": cached, "recompute": recompute}, warmup=2, rounds=12)
        rows.append([name, 1 / t["cached"], 1 / t["recompute"], t["recompute"] / t["cached"],
                     flops / t["cached"] / 1e9, flops / t["cached"] / 1e9 / peak])  # fmt: skip
    print("\nFlash-distillation student steps/s")
    print(table(rows, ["stage", "cached steps/s", "recompute steps/s", "cache speed-up ×", "GFLOP/s", "of peak"]))

    rows = []
    for arch in (mid, ref):
        student, _ = build_student(ctx, arch, seed=0)
        for backend in ("torch", "onnxruntime"):
            runs = [
                measure(student.encoder, backend=backend, batch=1, seq_len=128, threads=args.threads, warmup=10,
                        repeats=50)
                for _ in range(5)
            ]  # fmt: skip
            rep = repeatability(runs)
            rows.append([arch.label, backend, statistics.fmean(rep["medians_ms"]), rep["cv_of_medians"],
                         rep["relative_range"], statistics.fmean(r["cv"] for r in runs)])  # fmt: skip
    print("\nLatency repeatability (batch 1 × 128 tokens; 5 repeated measurements of 50 runs after 10 warm-ups)")
    print(table(rows, ["student", "backend", "median ms", "CV of medians", "range/mean", "mean within-run CV"]))
    for i in range(0, len(rows), 2):
        print(f"  {rows[i][0]}: ONNX Runtime {rows[i][2] / rows[i + 1][2]:.2f}× faster than torch eager")

    # the protocol the search and the claims use: the candidate timed in alternation with the fixed reference
    encoders = {
        "reference": build_student(ctx, ref, seed=0)[0].encoder,
        "candidate": build_student(ctx, mid, seed=0)[0].encoder,
    }
    sessions = [
        interleaved_latency(encoders, reference="reference", batch=1, seq_len=128, threads=args.threads, warmup=10,
                            rounds=10, runs_per_round=5, seed=i)["models"]
        for i in range(5)
    ]  # fmt: skip
    ms = repeatability([{"median_ms": s["candidate"]["median_ms"]} for s in sessions])
    ratio = repeatability([{"median_ms": s["candidate"]["ratio_median"]} for s in sessions])
    print(f"\nInterleaved protocol ({mid.label} against the reference {ref.label}; 5 sessions of 10 rounds × 5 runs)")
    print(table([["candidate median ms", statistics.fmean(ms["medians_ms"]), ms["cv_of_medians"], ms["relative_range"]],
                 ["ratio to the reference", statistics.fmean(ratio["medians_ms"]), ratio["cv_of_medians"],
                  ratio["relative_range"]]], ["quantity", "mean", "CV across sessions", "range/mean"]))  # fmt: skip

    rows = []
    for arch in (Arch(num_layers=2, hidden_size=ctx.teacher_dim, intra_bottleneck_size=64, num_heads=1,
                      intermediate_size=128, num_ffn=1), mid, ref):  # fmt: skip
        ctx.latency_cache.path = None  # time the measurement too
        t0 = time.perf_counter()
        rec, _ = evaluate_arch(ctx, arch)
        total = time.perf_counter() - t0
        rows.append([arch.label, total, rec["distill"]["seconds"], total - rec["distill"]["seconds"], rec["val_acc"]])
    print(f"\nOne exploration trial at the quick budget ({cfg.distill.steps_per_stage} steps per layer stage + "
          f"{cfg.distill.final_steps} MLM steps, accuracy on {len(ctx.val)} batches, latency at "
          f"{cfg.latency.repeats} runs)")  # fmt: skip
    print(table(rows, ["student", "trial s", "distillation s", "scoring + latency s", "val acc"]))


if __name__ == "__main__":
    main()
