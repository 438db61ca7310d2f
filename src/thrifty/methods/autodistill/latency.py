"""Measured latency on the target hardware (AutoDistill's second objective; arXiv 2201.08539 times on TPUv4i).

Protocol: the encoder in ``eval()`` under ``inference_mode`` (or an ONNX Runtime session), a fixed number of
intra-op threads set before and restored after, ``warmup`` untimed runs, then ``repeats`` timed runs of one
fixed random input of shape (batch, seq_len); median, p90, mean and the coefficient of variation are kept
with the batch, sequence length, threads and backend. Measurements are cached per architecture, backend,
shape, threads, CPU and torch version.

When several search workers share a machine, :func:`machine_lock` lets latency be timed only while no worker
trains: training holds the lock shared, timing holds it exclusively.

Interleaved, reference-relative protocol (:func:`interleaved_latency`, :func:`time_in_fresh_process`). Timed
alone, one architecture's milliseconds move by tens of percent with machine load, and the Pareto front moves
with them. Instead, every candidate and one fixed *reference* encoder are timed in the same session: after
``warmup`` untimed calls of each, ``rounds`` rounds visit every model once, in an order reshuffled each round
(seeded), timing ``runs_per_round`` consecutive calls and keeping that block's median. A candidate's per-round
ratio block_median(candidate) / block_median(reference) compares two measurements taken seconds apart, so slow
drifts of load cancel; the median ratio (with a 95% Student-t interval over rounds) is the comparable number,
and ``ms_at_reference`` = median ratio × the reference's median restates it in milliseconds. Reshuffling keeps
any position-in-round effect (caches, frequency scaling) from favouring one model. :func:`time_in_fresh_process`
runs the protocol in a freshly spawned interpreter, optionally pinned to given cores, with a fixed intra-op
thread count and models rebuilt from their configurations (latency depends on the architecture, not on weight
values), so nothing left by training (allocator state, thread pools, autograd caches) skews the timings.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.core.claims import mean_ci95
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

    def get_or_measure(
        self, key: str, measure_fn: Callable[[], dict[str, Any]], *, min_runs: int, use_cache: bool = True
    ) -> dict[str, Any]:
        """The stored measurement under ``key`` when it has at least ``min_runs`` timed runs, else
        ``measure_fn()`` stored with this CPU's name; ``cached`` says which."""
        hit = self.get(key) if use_cache else None
        if hit is not None and hit.get("runs", 0) >= min_runs:
            return {**hit, "cached": True}
        result = {**measure_fn(), "hardware": self.hardware}
        self.put(key, result)
        return {**result, "cached": False}


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
    return cache.get_or_measure(
        cache.key(arch_key, backend, batch, seq_len, threads),
        lambda: measure(encoder, backend=backend, batch=batch, seq_len=seq_len, threads=threads, warmup=warmup,
                        repeats=repeats),
        min_runs=repeats,
        use_cache=use_cache,
    )  # fmt: skip


def repeatability(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """Spread of repeated medians of one configuration: relative range and CV."""
    med = [m["median_ms"] for m in measurements]
    mean = statistics.fmean(med)
    return {
        "medians_ms": med,
        "relative_range": (max(med) - min(med)) / mean if mean else 0.0,
        "cv_of_medians": statistics.stdev(med) / mean if len(med) > 1 and mean else 0.0,
    }


def cpu_affinity() -> list[int] | None:
    """The cores this process may run on, or None where the platform cannot tell."""
    getaff = getattr(os, "sched_getaffinity", None)
    return sorted(getaff(0)) if getaff is not None else None


def interleaved_latency(
    models: dict[str, nn.Module],
    *,
    reference: str,
    batch: int,
    seq_len: int,
    threads: int,
    warmup: int,
    rounds: int,
    runs_per_round: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Time several encoders in one session, interleaved, relative to the ``reference`` among them.

    Each model (an HF encoder with ``.config.vocab_size``) is called through :class:`EncoderOnly` in ``eval()``
    under ``inference_mode`` with ``threads`` intra-op threads, on one fixed input ``input_ids`` of shape
    (batch, seq_len) (:func:`example_input`). Every model gets ``warmup`` untimed calls; then each of ``rounds``
    rounds visits every model once, in an order shuffled per round by ``random.Random(seed)``, timing
    ``runs_per_round`` consecutive calls and keeping their median (the round's block median, ms).

    Returns the settings (``reference``, ``batch``, ``seq_len``, ``threads``, ``rounds``, ``runs_per_round``,
    ``warmup``, ``seed``, ``order``: the per-round visiting orders, ``cores``: this process's CPU affinity or
    None) and ``models[name]`` with ``block_medians_ms`` (one per round), ``median_ms``/``p90_ms``/``mean_ms``/
    ``cv``/``runs`` over all timed calls, ``ratios`` (per round, block median over the reference's in the same
    round), ``ratio_median``, ``ratio_mean``, ``ratio_ci95`` ([lo, hi], Student-t over rounds) and
    ``ms_at_reference`` (= ratio_median × the reference's median_ms).
    """
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the timed models {sorted(models)}")
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (a per-round ratio interval needs two rounds), got {rounds}")
    if runs_per_round < 1:
        raise ValueError(f"runs_per_round must be >= 1, got {runs_per_round}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    names = list(models)
    wrapped = {n: EncoderOnly(m).eval() for n, m in models.items()}
    inputs = {n: example_input(batch, seq_len, m.config.vocab_size) for n, m in models.items()}
    rng = random.Random(seed)
    orders: list[list[str]] = []
    times: dict[str, list[float]] = {n: [] for n in names}
    blocks: dict[str, list[float]] = {n: [] for n in names}
    with num_threads(threads), torch.inference_mode():
        for n in names:
            timed_runs(lambda n=n: wrapped[n](inputs[n]), warmup=warmup, repeats=0)
        for _ in range(rounds):
            order = names.copy()
            rng.shuffle(order)
            orders.append(order)
            for n in order:
                block = timed_runs(lambda n=n: wrapped[n](inputs[n]), warmup=0, repeats=runs_per_round)
                times[n].extend(block)
                blocks[n].append(float(np.median(block)))
    ref_median = float(np.median(times[reference]))
    per_model: dict[str, dict[str, Any]] = {}
    for n in names:
        ratios = [b / r for b, r in zip(blocks[n], blocks[reference])]
        mean, (lo, hi) = mean_ci95(ratios)
        ratio_median = float(np.median(ratios))
        per_model[n] = {
            "block_medians_ms": blocks[n],
            **summarize(times[n]),
            "ratios": ratios,
            "ratio_median": ratio_median,
            "ratio_mean": mean,
            "ratio_ci95": [lo, hi],
            "ms_at_reference": ratio_median * ref_median,
        }
    return {
        "protocol": "interleaved",
        "reference": reference,
        "batch": batch,
        "seq_len": seq_len,
        "threads": threads,
        "rounds": rounds,
        "runs_per_round": runs_per_round,
        "warmup": warmup,
        "seed": seed,
        "order": orders,
        "cores": cpu_affinity(),
        "models": per_model,
    }


ENCODER_KINDS = ("bert", "mobilebert")


def encoder_spec(encoder: nn.Module) -> dict[str, Any]:
    """A picklable ``{"kind", "config"}`` description of a built HF BERT or MobileBERT encoder (or its
    :class:`EncoderOnly` wrapper), enough to rebuild the architecture in another process."""
    if isinstance(encoder, EncoderOnly):
        encoder = encoder.encoder
    kind = getattr(encoder.config, "model_type", None)
    if kind not in ENCODER_KINDS:
        raise ValueError(f"encoder_spec supports model_type in {ENCODER_KINDS}, not {kind!r}")
    return {"kind": kind, "config": encoder.config.to_dict()}


def encoder_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild (with ``torch.manual_seed(0)``, eager attention, no pooler) the encoder a spec describes; weight
    values are arbitrary, the architecture is the spec's."""
    from transformers import BertConfig, BertModel, MobileBertConfig, MobileBertModel

    kind = spec.get("kind")
    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown encoder kind {kind!r} (expected one of {ENCODER_KINDS})")
    config_cls, model_cls = (BertConfig, BertModel) if kind == "bert" else (MobileBertConfig, MobileBertModel)
    config = config_cls(**spec["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_cls(config, add_pooling_layer=False)


def _fresh_process_child(
    conn: Any, specs: dict[str, dict[str, Any]], reference: str, cores: list[int] | None, kw: dict[str, Any]
) -> None:
    """Spawned entry point of :func:`time_in_fresh_process`: pin, build, time, send ``("ok", result)`` or
    ``("error", traceback text)`` through ``conn``."""
    try:
        pinned = False
        if cores is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(cores))
            pinned = True
        torch.set_num_threads(int(kw["threads"]))
        models = {name: encoder_from_spec(spec) for name, spec in specs.items()}
        result = interleaved_latency(models, reference=reference, **kw)
        result.update(fresh_process=True, pinned=pinned, requested_cores=cores)
        conn.send(("ok", result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def time_in_fresh_process(
    specs: dict[str, dict[str, Any]],
    *,
    reference: str,
    cores: list[int] | None = None,
    timeout_s: float = 1800,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`interleaved_latency` of the encoders ``specs`` describes (see :func:`encoder_spec`), run in a
    freshly spawned interpreter pinned to ``cores`` (when given and the platform supports it).

    ``kw`` are :func:`interleaved_latency`'s other arguments (``batch``, ``seq_len``, ``threads``, ``warmup``,
    ``rounds``, ``runs_per_round``, ``seed``). Returns its result plus ``fresh_process``, ``pinned`` and
    ``requested_cores`` (``cores`` is the affinity the child actually had). Raises RuntimeError with the
    child's traceback if it fails, or after killing it if it runs past ``timeout_s``.
    """
    if reference not in specs:
        raise ValueError(f"reference {reference!r} is not one of the specs {sorted(specs)}")
    if "threads" not in kw:
        raise ValueError("time_in_fresh_process needs threads=")
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    cores = None if cores is None else [int(c) for c in cores]
    proc = ctx.Process(
        target=_fresh_process_child, args=(child_conn, specs, reference, cores, kw), name="thrifty-latency"
    )
    proc.start()
    child_conn.close()  # the child holds the only write end now: its exit shows up as EOF
    try:
        if not parent_conn.poll(timeout_s):
            proc.kill()
            raise RuntimeError(f"latency timing process exceeded timeout_s={timeout_s} and was killed")
        try:
            status, payload = parent_conn.recv()
        except EOFError:
            proc.join(timeout=10)
            raise RuntimeError(f"latency timing process died without a result (exit code {proc.exitcode})") from None
    finally:
        parent_conn.close()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"latency timing process failed:\n{payload}")
    return payload
