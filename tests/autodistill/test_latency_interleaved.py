"""The interleaved, reference-relative latency protocol: ratios, counts, orders, threads and the fresh process."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, BertModel, MobileBertConfig, MobileBertModel

from thrifty.methods.autodistill.latency import (
    encoder_from_spec,
    encoder_spec,
    interleaved_latency,
    time_in_fresh_process,
)


def _bert(layers: int = 1, hidden: int = 32, intermediate: int = 64) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=intermediate, vocab_size=100)  # fmt: skip
    cfg._attn_implementation = "eager"
    return BertModel(cfg, add_pooling_layer=False)


class _Counter(torch.nn.Module):
    """A stand-in encoder that records the thread count, grad mode, training flag and input shape of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"vocab_size": 50})()
        self.lin = torch.nn.Linear(4, 4)
        self.seen: list[tuple[int, bool, bool, tuple[int, ...]]] = []

    def forward(self, input_ids: torch.Tensor):
        self.seen.append((torch.get_num_threads(), torch.is_grad_enabled(), self.training, tuple(input_ids.shape)))
        return type("O", (), {"last_hidden_state": self.lin(torch.zeros(*input_ids.shape, 4))})()


KW = dict(batch=1, seq_len=8, threads=1, warmup=2)


def test_reference_ratio_is_one_and_a_bigger_model_is_slower() -> None:
    # the big one's intermediate width keeps it clearly slower even on a tiny input
    models = {"ref": _bert(1), "same": _bert(1), "big": _bert(4, hidden=64, intermediate=256)}
    rounds, runs = 8, 5
    res = interleaved_latency(models, reference="ref", rounds=rounds, runs_per_round=runs, seed=3, **KW)
    assert (res["reference"], res["rounds"], res["runs_per_round"], res["threads"]) == ("ref", rounds, runs, 1)
    ref = res["models"]["ref"]
    assert ref["ratios"] == [1.0] * rounds
    assert ref["ratio_median"] == 1.0 and ref["ratio_ci95"] == [1.0, 1.0]
    assert ref["ms_at_reference"] == pytest.approx(ref["median_ms"])
    big = res["models"]["big"]
    assert big["ratio_median"] > 1.0 and big["ms_at_reference"] > ref["median_ms"]
    lo, hi = big["ratio_ci95"]
    assert lo <= big["ratio_mean"] <= hi
    for m in res["models"].values():
        assert len(m["block_medians_ms"]) == rounds and len(m["ratios"]) == rounds
        assert m["runs"] == rounds * runs and m["median_ms"] > 0 and m["p90_ms"] >= m["median_ms"]
    assert len(res["order"]) == rounds
    assert all(sorted(order) == sorted(models) for order in res["order"])  # each model once per round
    assert len({tuple(order) for order in res["order"]}) > 1  # the visiting order changes
    again = interleaved_latency(models, reference="ref", rounds=rounds, runs_per_round=1, seed=3, **KW)
    assert again["order"] == res["order"]  # seeded
    if hasattr(os, "sched_getaffinity"):
        assert res["cores"] == sorted(os.sched_getaffinity(0))


def test_counts_threads_and_grad_mode_per_model() -> None:
    a, b = _Counter().train(), _Counter().train()
    res = interleaved_latency({"a": a, "b": b}, reference="b", batch=2, seq_len=3, threads=1, warmup=3, rounds=4,
                              runs_per_round=5)  # fmt: skip
    for enc in (a, b):
        assert len(enc.seen) == 3 + 4 * 5
        assert all(s == (1, False, False, (2, 3)) for s in enc.seen)
    assert res["models"]["a"]["runs"] == 20 and res["warmup"] == 3
    assert res["models"]["b"]["ratios"] == [1.0] * 4


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        (dict(reference="nope"), "reference"),
        (dict(rounds=1), "rounds"),
        (dict(runs_per_round=0), "runs_per_round"),
    ],
)
def test_bad_arguments_raise(kw: dict, word: str) -> None:
    args = dict(reference="a", batch=1, seq_len=4, threads=1, warmup=0, rounds=2, runs_per_round=1) | kw
    with pytest.raises(ValueError, match=word):
        interleaved_latency({"a": _Counter()}, **args)


def test_fresh_process_times_specs_pinned_to_a_core() -> None:
    specs = {"ref": encoder_spec(_bert(1)), "big": encoder_spec(_bert(2, hidden=64, intermediate=256))}
    assert specs["ref"]["kind"] == "bert" and specs["ref"]["config"]["num_hidden_layers"] == 1
    pin = [0] if hasattr(os, "sched_setaffinity") else None
    res = time_in_fresh_process(specs, reference="ref", cores=pin, timeout_s=900, rounds=3, runs_per_round=2, **KW)
    assert res["fresh_process"] and res["models"]["ref"]["ratios"] == [1.0] * 3
    assert res["models"]["big"]["runs"] == 6 and res["models"]["big"]["ratio_median"] > 0
    assert "cores" in res
    if pin is not None:
        assert res["cores"] == [0] and res["pinned"]


def test_fresh_process_reports_the_childs_error() -> None:
    specs = {"ref": encoder_spec(_bert(1)), "odd": {"kind": "gpt2", "config": {}}}
    with pytest.raises(RuntimeError, match="gpt2"):
        time_in_fresh_process(specs, reference="ref", timeout_s=900, rounds=2, runs_per_round=1, **KW)


def test_encoder_spec_rejects_other_model_types() -> None:
    other = _Counter()
    other.config.model_type = "roberta"
    with pytest.raises(ValueError, match="roberta"):
        encoder_spec(other)


def test_unknown_reference_in_fresh_process_is_rejected_before_spawning() -> None:
    with pytest.raises(ValueError, match="reference"):
        time_in_fresh_process({"a": encoder_spec(_bert(1))}, reference="b", rounds=2, runs_per_round=1, **KW)


def test_fresh_process_past_its_timeout_is_killed() -> None:
    specs = {"ref": encoder_spec(_bert(1))}
    with pytest.raises(RuntimeError, match="timeout"):
        time_in_fresh_process(specs, reference="ref", timeout_s=0.05, rounds=2, runs_per_round=1, **KW)


def test_spec_rebuilds_the_same_mobilebert_architecture() -> None:
    sizes = dict(hidden_size=32, intermediate_size=64, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16)
    cfg = MobileBertConfig(num_hidden_layers=1, num_attention_heads=2, vocab_size=100, **sizes)
    enc = MobileBertModel(cfg, add_pooling_layer=False)
    spec = encoder_spec(enc)
    rebuilt = encoder_from_spec(spec)
    assert spec["kind"] == "mobilebert" and isinstance(rebuilt, MobileBertModel)
    shapes = {k: v.shape for k, v in enc.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert rebuilt.config._attn_implementation == "eager"
