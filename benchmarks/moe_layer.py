"""MoE layer forward+backward throughput and memory: thrifty's GShard layer vs transformers' Mixtral
sparse-MoE block at identical sizes (E=8, top-2, d=256, ffn=1024, 8k tokens), and vs a dense gated FFN
of equal activated FLOPs (hidden 2·ffn).

Targets (issue #2): >= 1.5x Mixtral's tokens/s; <= 1.4x the time of the FLOP-matched dense FFN.
Run: ``python benchmarks/moe_layer.py`` (``--tokens``, ``--threads`` to vary).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import current_rss_mb, interleaved, isolated, peak_rss_mb, reset_peak_rss, table
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


def child(name: str, tokens: int) -> None:
    """Peak memory of one candidate's fwd+bwd above its resting RSS (untuned allocator, fresh process)."""
    torch.manual_seed(0)
    m = candidates()[name]()
    x = torch.randn(tokens // 1024, 1024, D)
    run = step_fn(m, x)
    reset_peak_rss()
    before = current_rss_mb()
    for _ in range(2):
        run()
    print(json.dumps({"peak_delta_mb": peak_rss_mb() - before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child is not None:
        child(" ".join(args.child[:-1]), int(args.child[-1]))
        return
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens // 1024, 1024, D)
    fns, skipped = {}, {}
    for name, make in candidates().items():
        try:
            m = make()
            fn = step_fn(m, x)
            fn()
            fns[name] = fn
        except Exception as err:  # an implementation that does not run on this CPU build
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    # the one-hot einsum dispatch allocates S·E·C tensors; time it in its own group so its memory
    # traffic does not disturb the others' measurements
    heavy = {k: fns.pop(k) for k in list(fns) if "einsum" in k}
    times = interleaved(fns, rounds=args.rounds)
    if heavy:
        pair = interleaved({**heavy, "thrifty capacity (index)": fns["thrifty capacity (index)"]}, rounds=args.rounds)
        scale = times["thrifty capacity (index)"] / pair["thrifty capacity (index)"]
        times.update({k: pair[k] * scale for k in heavy})
        fns.update(heavy)
    mem = {}
    for name in fns:
        try:
            mem[name] = isolated("moe_layer", *name.split(), str(args.tokens))["peak_delta_mb"]
        except Exception:
            mem[name] = float("nan")
    ref_mix = min((t for n, t in times.items() if n.startswith("mixtral")), default=float("nan"))
    mix_eager = times.get("mixtral eager", float("nan"))
    dense = times["dense FFN (2*ffn, equal active FLOPs)"]
    rows = []
    for name, t in times.items():
        rows.append([name, args.tokens / t, mix_eager / t, ref_mix / t, t / dense, mem[name]])
    print(f"MoE layer fwd+bwd, E={E} top-{K} d={D} ffn={FFN}, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(
        table(rows, ["implementation", "tokens/s", "x mixtral eager", "x best mixtral", "time / dense", "peak mem MiB"])
    )
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    ours = times["thrifty capacity (index)"]
    print(f"\nthrifty capacity (index) vs mixtral eager: {mix_eager / ours:.2f}x tokens/s (target >= 1.5x)")
    print(f"thrifty capacity (index) vs best mixtral:  {ref_mix / ours:.2f}x tokens/s")
    print(f"thrifty capacity (index) time / dense FFN of equal active FLOPs: {ours / dense:.2f} (target <= 1.4)")


if __name__ == "__main__":
    main()
