"""Shared benchmark helpers: median timing, this CPU's fp32 matmul peak, isolated peak-memory runs.

Benchmarks print ratios measured side by side in one process; they are never asserted in tests.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def timeit(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7, min_time: float = 0.0) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, rounds: int = 7) -> dict[str, float]:
    """Median seconds per candidate, timing the candidates in alternation (in a shuffled order each round)
    so machine drifts and the allocator state left by the previous candidate hit all of them equally."""
    import random

    rng = random.Random(0)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        order = list(fns.items())
        rng.shuffle(order)
        for k, fn in order:
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def flops_of(fn: Callable[[], object]) -> float:
    """FLOPs torch counts for one call of ``fn`` (``FlopCounterMode``: matmuls and convolutions, fwd and bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak_gflops(sizes: tuple[int, ...] = (512, 1024, 2048), seconds: float = 1.0) -> dict[str, float]:
    """Measured fp32 GEMM throughput of this CPU at the current thread count (best over sizes)."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = timeit(lambda a=a, b=b: a @ b, warmup=2, repeats=5, min_time=seconds / len(sizes))
        out[str(n)] = 2 * n**3 / t / 1e9
    out["peak"] = max(out.values())
    return out


def peak_rss_mb() -> float:
    """Peak RSS (MiB) since start, or since the last :func:`reset_peak_rss` on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) so a phase can be measured alone."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def step_memory(step: Callable[[], object], *, steps: int = 2) -> dict[str, float]:
    """Peak RSS (MiB) of ``steps`` calls of ``step`` in this process, the kernel's peak mark reset first
    (:func:`reset_peak_rss`): ``peak_mb`` and ``delta_mb``, its rise over the resting RSS. Warm ``step`` up before
    calling this to leave one-off allocations out."""
    reset_peak_rss()
    before = current_rss_mb()
    for _ in range(steps):
        step()
    peak = peak_rss_mb()
    return {"peak_mb": peak, "delta_mb": peak - before}


def fmt_rate(value: float) -> str:
    """A throughput with about three significant figures, no exponent."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fmt_or_dash(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or an en dash for a value that was not measured."""
    return "–" if value is None else format(value, spec)


def isolated(module: str, *args: str) -> dict:
    """Run ``python -m benchmarks.<module> --child ARGS`` and parse the JSON line it prints last."""
    cmd = [sys.executable, str(ROOT / f"{module}.py"), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[list[object]], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
