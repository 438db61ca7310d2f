"""The latency harness honours its thread and run counts, summarises correctly, caches, and locks."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest
import torch

from thrifty.methods.autodistill.latency import (
    LatencyCache,
    machine_lock,
    measure,
    measure_cached,
    num_threads,
    summarize,
    timed_runs,
)
from thrifty.methods.autodistill.space import Arch, build_encoder


def test_timed_runs_calls_warmup_plus_repeats() -> None:
    calls = []
    times = timed_runs(lambda: calls.append(1), warmup=3, repeats=7)
    assert len(calls) == 10 and len(times) == 7
    assert all(t >= 0 for t in times)


def test_summary_statistics() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median_ms"] == 3.0 and s["runs"] == 5
    assert s["p90_ms"] == pytest.approx(61.6)
    assert s["cv"] > 1.0


def test_threads_are_set_for_the_measurement_and_restored() -> None:
    before = torch.get_num_threads()
    seen = []
    with num_threads(1):
        seen.append(torch.get_num_threads())
    assert seen == [1] and torch.get_num_threads() == before


class _Recorder(torch.nn.Module):
    """A stand-in encoder that records the thread count and grad mode it runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"vocab_size": 2000})()
        self.lin = torch.nn.Linear(4, 4)
        self.seen: list[tuple[int, bool, bool, tuple[int, ...]]] = []

    def forward(self, input_ids: torch.Tensor):
        self.seen.append((torch.get_num_threads(), torch.is_grad_enabled(), self.training, tuple(input_ids.shape)))
        return type("O", (), {"last_hidden_state": self.lin(torch.zeros(*input_ids.shape, 4))})()


def test_torch_backend_runs_in_eval_inference_mode_with_fixed_threads() -> None:
    enc = _Recorder().train()
    res = measure(enc, backend="torch", batch=3, seq_len=5, threads=1, warmup=2, repeats=4)
    assert len(enc.seen) == 6
    assert all(s == (1, False, False, (3, 5)) for s in enc.seen)
    assert (res["threads"], res["batch"], res["seq_len"], res["runs"], res["backend"]) == (1, 3, 5, 4, "torch")


def test_cache_hits_only_the_same_configuration(tmp_path: Path) -> None:
    enc = _Recorder()
    cache = LatencyCache(tmp_path / "lat.json", "test-cpu")
    kw = dict(backend="torch", batch=1, seq_len=4, threads=1, warmup=0, repeats=3)
    first = measure_cached(enc, "abc", cache, **kw)
    again = measure_cached(enc, "abc", cache, **kw)
    assert not first["cached"] and again["cached"] and len(enc.seen) == 3
    measure_cached(enc, "abc", cache, **{**kw, "batch": 2})
    assert len(enc.seen) == 6  # another batch size is another measurement
    measure_cached(enc, "abc", cache, **{**kw, "repeats": 5})
    assert len(enc.seen) == 11  # a cached result with fewer runs does not satisfy more repeats
    measure_cached(enc, "abc", cache, use_cache=False, **kw)
    assert len(enc.seen) == 14


def test_exclusive_lock_excludes_shared_holders(tmp_path: Path) -> None:
    path = tmp_path / "machine.lock"
    with machine_lock(path, exclusive=False), path.open("a") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # timing must wait while someone trains
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another trainer may join
        fcntl.flock(other, fcntl.LOCK_UN)
    with machine_lock(path, exclusive=True), path.open("a") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)


def test_onnxruntime_backend_measures_an_exported_student(teacher) -> None:
    pytest.importorskip("onnxruntime")
    arch = Arch(num_layers=1, hidden_size=32, intra_bottleneck_size=16, num_heads=2, intermediate_size=16, num_ffn=1,
                embedding_size=8)  # fmt: skip
    enc, _ = build_encoder(arch, teacher, seed=0)
    res = measure(enc, backend="onnxruntime", batch=2, seq_len=8, threads=1, warmup=1, repeats=3)
    assert res["backend"] == "onnxruntime" and res["runs"] == 3 and res["median_ms"] > 0
