"""Measured latency on the target hardware (AutoDistill's second objective; arXiv 2201.08539 times on TPUv4i).

Protocol: the encoder in ``eval()`` under ``inference_mode`` (or an ONNX Runtime session), a fixed number of
intra-op threads set before and restored after, ``warmup`` untimed runs, then ``repeats`` timed runs of one
fixed random input of shape (batch, seq_len); median, p90, mean and the coefficient of variation are kept
with the batch, sequence length, threads and backend. Measurements are cached per architecture, backend,
shape, threads, CPU and torch version.

When several search workers share a machine, :func:`machine_lock` lets latency be timed only while no worker
trains: training holds the lock shared, timing holds it exclusively.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.core.run import write_json


class EncoderOnly(nn.Module):
    """``forward(input_ids (B, T), attention_mask (B, T) | None) -> last_hidden_state (B, T, d)``: what a served
    encoder computes (the timed module, and the exported ONNX graph)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        masks = {} if attention_mask is None else {"attention_mask": attention_mask}  # timed calls pass ids only
        return self.encoder(input_ids=input_ids, **masks).last_hidden_state


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def machine_lock(path: Path | None, *, exclusive: bool) -> Iterator[None]:
    """An ``flock`` on ``path`` (shared for training, exclusive for timing); no-op when ``path`` is None."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def timed_runs(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; returns milliseconds per call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summarize(times_ms: list[float]) -> dict[str, float]:
    x = np.asarray(times_ms, dtype=np.float64)
    mean = float(x.mean())
    return {
        "median_ms": float(np.median(x)),
        "p90_ms": float(np.percentile(x, 90)),
        "mean_ms": mean,
        "cv": float(x.std(ddof=1) / mean) if x.size > 1 and mean > 0 else 0.0,
        "runs": int(x.size),
    }


def example_input(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = 1000 if vocab_size > 2000 else 0  # WordPiece vocabularies keep special and unused ids below 1000
    return torch.randint(low, vocab_size, (batch, seq_len), generator=g)


def measure_torch(
    encoder: nn.Module, *, batch: int, seq_len: int, threads: int, warmup: int, repeats: int
) -> dict[str, Any]:
    model = EncoderOnly(encoder).eval()
    ids = example_input(batch, seq_len, encoder.config.vocab_size)
    with num_threads(threads), torch.inference_mode():
        times = timed_runs(lambda: model(ids), warmup=warmup, repeats=repeats)
    return {"backend": "torch", "batch": batch, "seq_len": seq_len, "threads": threads, **summarize(times)}


def export_onnx(
    module: nn.Module,
    path: Path,
    *,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    output_name: str,
    input_names: list[str] | None = None,
) -> Path:
    """Export ``module(*inputs) -> output`` to ONNX (TorchScript exporter) with dynamic batch and sequence
    axes on every input and the output."""
    import warnings

    example = example if isinstance(example, tuple) else (example,)
    input_names = input_names or ["input_ids"]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in [*input_names, output_name]}
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=input_names,
            output_names=[output_name],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    return path


def onnx_session(path: Path, threads: int) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError(
            "latency.backend=onnxruntime needs the `onnxruntime` package (the `serve` extra installs it)"
        ) from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure_onnx(
    encoder: nn.Module, *, batch: int, seq_len: int, threads: int, warmup: int, repeats: int
) -> dict[str, Any]:
    ids = example_input(batch, seq_len, encoder.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(EncoderOnly(encoder), Path(tmp) / "encoder.onnx", example=ids, output_name="hidden")
        sess = onnx_session(path, threads)
        feed = {"input_ids": ids.numpy()}
        times = timed_runs(lambda: sess.run(None, feed), warmup=warmup, repeats=repeats)
    return {"backend": "onnxruntime", "batch": batch, "seq_len": seq_len, "threads": threads, **summarize(times)}


def measure(encoder: nn.Module, *, backend: str, **kw: Any) -> dict[str, Any]:
    """Latency of ``encoder`` with ``backend`` (``torch`` or ``onnxruntime``); see :func:`measure_torch`."""
    if backend == "torch":
        return measure_torch(encoder, **kw)
    if backend == "onnxruntime":
        return measure_onnx(encoder, **kw)
    raise ValueError(f"unknown latency backend {backend!r}")


class LatencyCache:
    """Measurements in a JSON file, keyed by architecture, backend, shape, threads, CPU and torch version."""

    def __init__(self, path: Path | None, hardware: str) -> None:
        self.path = path
        self.hardware = hardware

    def key(self, arch_key: str, backend: str, batch: int, seq_len: int, threads: int) -> str:
        return f"{arch_key}|{backend}|b{batch}|t{seq_len}|th{threads}|{self.hardware}|torch{torch.__version__}"

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._read().get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.path is None:
            return
        with machine_lock(self.path.with_suffix(".lock"), exclusive=True):
            data = self._read()
            data[key] = value
            write_json(self.path, data)


def measure_cached(
    encoder: nn.Module,
    arch_key: str,
    cache: LatencyCache,
    *,
    backend: str,
    batch: int,
    seq_len: int,
    threads: int,
    warmup: int,
    repeats: int,
    use_cache: bool = True,
) -> dict[str, Any]:
    key = cache.key(arch_key, backend, batch, seq_len, threads)
    hit = cache.get(key) if use_cache else None
    if hit is not None and hit.get("runs", 0) >= repeats:
        return {**hit, "cached": True}
    result = measure(encoder, backend=backend, batch=batch, seq_len=seq_len, threads=threads, warmup=warmup,
                     repeats=repeats)  # fmt: skip
    result["hardware"] = cache.hardware
    cache.put(key, result)
    return {**result, "cached": False}


def repeatability(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """Spread of repeated medians of one configuration: relative range and CV."""
    med = [m["median_ms"] for m in measurements]
    mean = statistics.fmean(med)
    return {
        "medians_ms": med,
        "relative_range": (max(med) - min(med)) / mean if mean else 0.0,
        "cv_of_medians": statistics.stdev(med) / mean if len(med) > 1 and mean else 0.0,
    }
