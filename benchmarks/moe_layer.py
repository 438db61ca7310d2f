"""MoE layer forward+backward throughput and memory: thrifty's GShard layer vs transformers' Mixtral
sparse-MoE block at identical sizes (E=8, top-2, d=256, ffn=1024, 8k tokens), and vs a dense gated FFN
of equal activated FLOPs (hidden 2·ffn).

Targets (issue #2): >= 1.5x Mixtral's tokens/s; <= 1.4x the time of the FLOP-matched dense FFN.
Each candidate is timed in its own fresh process, in alternation over ``--rounds``; the
matmul-bound ceiling (every expert FLOP at this CPU's measured fp32 matmul peak) is printed beside
the ratios, because at these sizes both layers are dominated by matmuls.
Run: ``python benchmarks/moe_layer.py`` (``--tokens``, ``--threads``, ``--rounds`` to vary).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import current_rss_mb, isolated, matmul_peak_gflops, peak_rss_mb, reset_peak_rss, table, timeit
from thrifty.core.run import tune_allocator
from thrifty.methods.glam.model import GatedGeluFFN
from thrifty.methods.glam.moe import MoELayer

E, K, D, FFN = 8, 2, 256, 1024


def mixtral(impl: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=D,
        intermediate_size=FFN,
        num_local_experts=E,
        num_experts_per_tok=K,
        hidden_act="gelu",
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block


def candidates() -> dict[str, Callable[[], nn.Module]]:
    return {
        "thrifty capacity (index)": lambda: MoELayer(dim=D, ffn_dim=FFN, num_experts=E, group_size=1024),
        "thrifty capacity (einsum)": lambda: MoELayer(
            dim=D, ffn_dim=FFN, num_experts=E, group_size=1024, dispatch="einsum"
        ),
        "thrifty dropless": lambda: MoELayer(dim=D, ffn_dim=FFN, num_experts=E, mode="dropless"),
        "mixtral eager": lambda: mixtral("eager"),
        "mixtral batched_mm": lambda: mixtral("batched_mm"),
        "mixtral grouped_mm": lambda: mixtral("grouped_mm"),
        "dense FFN (2*ffn, equal active FLOPs)": lambda: GatedGeluFFN(
            dim=D, ffn_dim=K * FFN, init_std=0.02, out_std=0.02
        ),
    }


def step_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        out = module(xi)
        y = out.hidden if hasattr(out, "hidden") else out
        loss = y.square().mean()
        if hasattr(out, "aux_loss"):
            loss = loss + 0.01 * out.aux_loss
        loss.backward()

    return run


def child(name: str, tokens: int, what: str, threads: int) -> None:
    """One candidate in a fresh process: ``mem`` = peak memory of fwd+bwd above its resting RSS
    (untuned allocator); ``time`` = median seconds per fwd+bwd (tuned allocator, as the CLI runs)."""
    if threads:
        torch.set_num_threads(threads)
    if what == "time":
        tune_allocator()
    torch.manual_seed(0)
    m = candidates()[name]()
    x = torch.randn(tokens // 1024, 1024, D)
    run = step_fn(m, x)
    if what == "time":
        print(json.dumps({"seconds": timeit(run, warmup=2, repeats=5)}))
        return
    reset_peak_rss()
    before = current_rss_mb()
    for _ in range(2):
        run()
    print(json.dumps({"peak_delta_mb": peak_rss_mb() - before}))


def in_child(name: str, tokens: int, what: str, threads: int) -> dict:
    return isolated("moe_layer", name, str(tokens), what, str(threads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per candidate, in alternation")
    ap.add_argument("--child", nargs=4, metavar=("NAME", "TOKENS", "WHAT", "THREADS"))
    args = ap.parse_args()
    if args.child is not None:
        name, tokens, what, threads = args.child
        child(name, int(tokens), what, int(threads))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    # Every candidate is timed in its own fresh process (the allocator state one candidate leaves must
    # not slow the next), in a shuffled order each round so machine drift hits all of them alike.
    rng = random.Random(0)
    names, skipped = list(candidates()), {}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        rng.shuffle(names)
        for name in list(names):
            try:
                samples[name].append(in_child(name, args.tokens, "time", threads)["seconds"])
            except subprocess.CalledProcessError as err:  # an implementation that does not run here
                last = (err.stderr or "").strip().splitlines()[-1:] or ["?"]
                skipped[name] = last[0][:100]
                names.remove(name)
                samples.pop(name)
    times = {n: statistics.median(v) for n, v in samples.items()}
    mem = {}
    for name in times:
        try:
            mem[name] = in_child(name, args.tokens, "mem", threads)["peak_delta_mb"]
        except subprocess.CalledProcessError:
            mem[name] = float("nan")
    peak = max(matmul_peak_gflops().values())
    # fwd+bwd of the activated expert FFNs: 3 matmuls of 2·d·ffn FLOPs per routed token, x3 for backward
    flops = 3 * 2 * D * FFN * 3 * K * args.tokens
    mix_eager = times.get("mixtral eager", float("nan"))
    ref_mix = min((t for n, t in times.items() if n.startswith("mixtral")), default=float("nan"))
    dense = times["dense FFN (2*ffn, equal active FLOPs)"]
    order = sorted(times, key=lambda n: times[n])
    rows = [
        [n, args.tokens / times[n], flops / times[n] / 1e9, mix_eager / times[n], times[n] / dense, mem[n]]
        for n in order
    ]
    print(f"MoE layer fwd+bwd, E={E} top-{K} d={D} ffn={FFN}, {args.tokens} tokens, {threads} threads")
    print(f"each candidate: median of {args.rounds} fresh processes x median of 5 steps")
    headers = ["implementation", "tokens/s", "GFLOP/s", "x mixtral eager", "time / dense", "peak mem MiB"]
    print(table(rows, headers))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    ours = times["thrifty capacity (index)"]
    ceiling = flops / (peak * 1e9)  # every FLOP at the measured matmul peak, nothing else costs time
    print(f"\nfp32 matmul peak of this CPU at {threads} threads: {peak:.1f} GFLOP/s")
    print(
        f"matmul-bound ceiling (all expert FLOPs at that peak, routing free): {args.tokens / ceiling:.3g} tokens/s"
        f" = {mix_eager / ceiling:.2f}x mixtral eager"
    )
    print(f"thrifty capacity (index) vs mixtral eager: {mix_eager / ours:.2f}x tokens/s (target >= 1.5x)")
    print(f"thrifty capacity (index) vs best mixtral:  {ref_mix / ours:.2f}x tokens/s")
    print(f"thrifty capacity (index) time / dense FFN of equal active FLOPs: {ours / dense:.2f} (target <= 1.4)")


if __name__ == "__main__":
    main()
