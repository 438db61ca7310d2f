"""GLaM LM training step: achieved FLOP/s as a fraction of this CPU's measured fp32 matmul peak, and the
effect of glibc allocator tuning on the quick-preset model.

Target (issue #2): >= 40% of peak at d >= 512. FLOPs are the analytic *executed* FLOPs (the work the
hardware does, capacity slots included), cross-checked against torch's FLOP counter in the tests.
Run: ``python benchmarks/lm_step.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_gflops, peak_rss_mb, table, timeit
from thrifty.core.run import tune_allocator
from thrifty.methods.glam.baselines import ArmSpec, build_model, flops_per_token
from thrifty.methods.glam.model import MoESettings

SHAPES = {
    # name: (dim, layers, heads, ffn, experts, vocab, seq, batch)
    "quick preset (d128)": (128, 4, 4, 512, 8, 4096, 128, 16),
    "d512": (512, 4, 8, 2048, 8, 4096, 256, 8),
    "d768": (768, 4, 12, 3072, 8, 4096, 256, 8),
}


def spec_for(shape: tuple, moe: bool) -> ArmSpec:
    d, L, H, f, E, V, _, _ = shape
    kw = dict(vocab_size=V, dim=d, num_layers=L, num_heads=H, ffn_dim=f)
    if moe:
        kw["moe"] = MoESettings(num_experts=E, group_size=1024)
    else:
        kw["ffn_dim"] = round(1.5 * f)
    return ArmSpec("moe" if moe else "dense-active", kw)


def measure(name: str, moe: bool) -> dict:
    shape = SHAPES[name]
    seq, batch = shape[6], shape[7]
    spec = spec_for(shape, moe)
    torch.manual_seed(0)
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, shape[5], (batch, seq + 1))

    def step() -> None:
        out = model(x[:, :-1], labels=x[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    t = timeit(step, warmup=2, repeats=5)
    tokens = batch * seq
    flops = flops_per_token(spec, seq, batch_tokens=tokens)["train_executed"] * tokens
    return {"tokens_per_s": tokens / t, "gflops": flops / t / 1e9, "peak_rss_mb": peak_rss_mb()}


def child(args: list[str]) -> None:
    tuned, name, moe = args[0] == "tuned", " ".join(args[1:-1]), args[-1] == "moe"
    if tuned:
        tune_allocator()
    print(json.dumps(measure(name, moe)))


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    tune_allocator()
    peak = matmul_peak_gflops()
    print(
        f"fp32 matmul peak on this CPU ({torch.get_num_threads()} threads): {peak['peak']:.1f} GFLOP/s "
        f"(by size: {', '.join(f'{k}: {v:.0f}' for k, v in peak.items() if k != 'peak')})"
    )
    rows = []
    for name in SHAPES:
        for arm in ("moe", "dense-active"):
            r = run_child("tuned", *name.split(), arm)
            rows.append([name, arm, r["tokens_per_s"], r["gflops"], 100 * r["gflops"] / peak["peak"], r["peak_rss_mb"]])
    print(table(rows, ["model", "arm", "tokens/s", "GFLOP/s", "% of matmul peak", "peak RSS MiB"]))
    plain = run_child("plain", *["quick", "preset", "(d128)"], "moe")
    tuned = run_child("tuned", *["quick", "preset", "(d128)"], "moe")
    print(
        f"\nallocator tuning (quick-preset moe step): {tuned['tokens_per_s'] / plain['tokens_per_s']:.2f}x tokens/s "
        f"({plain['tokens_per_s']:.0f} -> {tuned['tokens_per_s']:.0f})"
    )


if __name__ == "__main__":
    main()
