"""GLaM recipe end to end at the smoke budget: results, claims, determinism, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.data import text
from thrifty.data.text import CorpusError
from thrifty.methods.glam.train import train


def smoke(tmp: Path, data_dir: Path, *overrides: str):
    return load_config("glam", "smoke", [f"out_dir={tmp}", f"data_dir={data_dir}", "progress=false", *overrides])[1]


def train_records(run_dir: Path, unit: str) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r["unit"] == unit]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    results = train(smoke(out, data_dir))
    return out / "glam" / "smoke", results


def test_smoke_run_writes_results_claims_and_figures(smoke_run):
    run_dir, results = smoke_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["claims"] == results["claims"]
    ids = {c["id"] for c in results["claims"]}
    assert {"moe_beats_dense_active", "dense_params_lower_loss", "drops_rare", "load_near_uniform"} <= ids
    for c in results["claims"]:
        lo, hi = c["ci95"]
        assert lo <= c["measured"] <= hi
        expected = hi < c["threshold"] if c["direction"] == "less" else lo > c["threshold"]
        assert c["holds"] == expected
        assert c["preset"] == "smoke" and len(c["seeds"]) == 2
    for fig in ("loss_vs_tokens.png", "loss_vs_flops.png", "expert_load.png"):
        assert (run_dir / "figures" / fig).stat().st_size > 1000
    assert (run_dir / "config.yaml").exists() and (run_dir / "splits.json").exists()
    assert results["cost"]["wall_time_s"] > 0 and results["cost"]["peak_rss_mb"] > 0
    # the test split is evaluated exactly once per unit: only "val" records in the metrics log
    splits = {json.loads(x).get("split") for x in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert "test" not in splits
    for arm in ("moe", "dense-active", "dense-params"):
        for seed in (0, 1):
            res = json.loads((run_dir / "units" / arm / f"seed{seed}" / "result.json").read_text())
            assert set(res["test"]) >= {"overall", "shakespeare", "kjv", "fortunes"}


def test_smoke_training_loss_decreases(smoke_run):
    run_dir, _ = smoke_run
    for unit in ("moe/seed0", "dense-active/seed0", "dense-params/seed1"):
        recs = [r for r in train_records(run_dir, unit) if "lm_loss" in r]
        assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 0.3
        vals = [r["overall"] for r in train_records(run_dir, unit) if r.get("split") == "val"]
        assert vals[-1] < vals[0]


def test_moe_diagnostics_are_logged(smoke_run):
    run_dir, _ = smoke_run
    rec = [r for r in train_records(run_dir, "moe/seed0") if "moe" in r][-1]
    layer = rec["moe"][0]
    for key in (
        "over_capacity_1",
        "over_capacity_2",
        "both_dropped",
        "load",
        "router_entropy",
        "load_entropy",
        "aux_loss",
    ):
        assert key in layer
    assert len(layer["load"]) == 4 and sum(layer["load"]) > 0
    assert 0.0 <= layer["load_entropy"] <= 1.0


def test_rerun_reuses_finished_units(smoke_run, data_dir, monkeypatch):
    run_dir, results = smoke_run
    cfg = smoke(run_dir.parent.parent, data_dir)

    def boom(*a, **k):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr("thrifty.methods.glam.train.build_model", boom)
    again = train(cfg)
    assert [c["measured"] for c in again["claims"]] == [c["measured"] for c in results["claims"]]


def test_same_seed_gives_identical_losses(tmp_path, data_dir):
    a = train(smoke(tmp_path / "a", data_dir, "arms=[moe]", "seeds=[3]", "max_steps=10"))
    b = train(smoke(tmp_path / "b", data_dir, "arms=[moe]", "seeds=[3]", "max_steps=10"))
    ra = train_records(tmp_path / "a" / "glam" / "smoke", "moe/seed3")
    rb = train_records(tmp_path / "b" / "glam" / "smoke", "moe/seed3")
    assert [r.get("loss") for r in ra] == [r.get("loss") for r in rb]
    assert a["claims"][0]["measured"] == b["claims"][0]["measured"] if a["claims"] else True


@pytest.mark.parametrize("cut_at", [3, 13])  # before the first checkpoint (step 5), and after two
def test_resume_after_interruption_equals_uninterrupted(tmp_path, data_dir, monkeypatch, cut_at):
    args = ("arms=[moe]", "seeds=[0]", "max_steps=20", "checkpoint_every=5", "log_every=1", "eval_every=2")
    train(smoke(tmp_path / "ref", data_dir, *args))
    ref = train_records(tmp_path / "ref" / "glam" / "smoke", "moe/seed0")

    original = text.MixtureSchedule.batch

    def interrupt(self, step):
        if step == cut_at:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(text.MixtureSchedule, "batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(smoke(tmp_path / "cut", data_dir, *args))
    monkeypatch.setattr(text.MixtureSchedule, "batch", original)
    train(smoke(tmp_path / "cut", data_dir, *args))
    got = train_records(tmp_path / "cut" / "glam" / "smoke", "moe/seed0")
    assert [(r["step"], r.get("split")) for r in got] == [(r["step"], r.get("split")) for r in ref]
    for r_got, r_ref in zip(got, ref):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "overall"):
            assert r_got.get(key) == r_ref.get(key), (r_got["step"], key)


def _cli(*args: str, out: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "thrifty",
        "-q",
        "run",
        "glam",
        "--preset",
        "smoke",
        *args,
        f"out_dir={out}",
        f"data_dir={data_dir}",
        "progress=false",
    ]


def test_sigkill_mid_run_then_resume_continues_the_same_curve(tmp_path, data_dir):
    args = (
        "arms=[moe]",
        "seeds=[0]",
        "max_steps=160",
        "checkpoint_every=10",
        "log_every=5",
        "eval_every=80",
        "num_threads=1",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _cli(*args, out=tmp_path / "ref", data_dir=data_dir),
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    ref = train_records(tmp_path / "ref" / "glam" / "smoke", "moe/seed0")

    proc = subprocess.Popen(
        _cli(*args, out=tmp_path / "cut", data_dir=data_dir),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = tmp_path / "cut" / "glam" / "smoke" / "units" / "moe" / "seed0" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().split("-")[1]) >= 30:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; raise max_steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (latest.parent.parent / "result.json").exists()

    subprocess.run(
        _cli(*args, out=tmp_path / "cut", data_dir=data_dir),
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    got = train_records(tmp_path / "cut" / "glam" / "smoke", "moe/seed0")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r.get("loss") for r in got] == [r.get("loss") for r in ref]
    assert [r.get("overall") for r in got] == [r.get("overall") for r in ref]


def test_changed_config_refuses_to_resume(tmp_path, data_dir):
    train(smoke(tmp_path, data_dir, "arms=[moe]", "seeds=[0]", "max_steps=5"))
    with pytest.raises(ConfigError, match="max_steps"):
        train(smoke(tmp_path, data_dir, "arms=[moe]", "seeds=[0]", "max_steps=6"))


def test_missing_or_bad_corpus_gives_clear_errors(tmp_path, data_dir):
    with pytest.raises(CorpusError, match=r"nope\.yaml"):
        train(smoke(tmp_path, data_dir, f"data.mixture_file={tmp_path / 'nope.yaml'}"))
    with pytest.raises(CorpusError, match="unknown corpus"):
        train(smoke(tmp_path, data_dir, "data.sources=[wiki]", "data.weights=[1.0]", "run_name=b"))
    with pytest.raises(CorpusError, match="fortunes corpus not found"):
        text.load_fortunes(tmp_path / "no-fortunes-here")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{name: web, weight: 1.0, paths: ['{bad}']}}\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        train(smoke(tmp_path, data_dir, f"data.mixture_file={mix}", "run_name=c"))


def test_real_format_mixture_trains(tmp_path, data_dir):
    docs = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(400)) for i in range(12)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for i, d in enumerate(docs[:6]):
        (tmp_path / f"b{i}.txt").write_text(d)
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        f"sources:\n  - {{name: web, weight: 0.7, paths: ['{tmp_path}/a.jsonl']}}\n"
        f"  - {{name: books, weight: 0.3, paths: ['{tmp_path}/b*.txt']}}\n"
    )
    args = (
        f"data.mixture_file={mix}",
        "arms=[moe]",
        "seeds=[0]",
        "max_steps=4",
        "model.vocab_size=300",
        "data.holdout=0.2",
    )
    res = train(smoke(tmp_path / "runs", tmp_path / "data", *args))
    assert res["data"]["sources"] == ["web", "books"]
    # the corpus changes under an existing run: resuming would mix tokenizers and splits, so it is refused
    (tmp_path / "b0.txt").write_text("an edited document " * 50)
    with pytest.raises(ConfigError, match=r"corpus .* changed"):
        train(smoke(tmp_path / "runs", tmp_path / "data", *args))


def test_bf16_and_activation_checkpointing_train(tmp_path, data_dir):
    res = train(
        smoke(
            tmp_path,
            data_dir,
            "arms=[moe]",
            "seeds=[0,1]",
            "max_steps=6",
            "precision=bf16",
            "model.activation_checkpointing=true",
        )
    )
    recs = [r for r in train_records(tmp_path / "glam" / "smoke", "moe/seed0") if "lm_loss" in r]
    assert all(math.isfinite(r["lm_loss"]) for r in recs)
    assert res["config"]["precision"] == "bf16"


def test_evaluation_mixes_sources_in_batches_and_credits_each_token_to_its_source(tmp_path, data_dir):
    """For a dense model (batch composition cannot matter) the mixed-batch evaluation equals a plain
    per-source mean computed window by window; for an MoE the batches really mix sources."""
    import torch
    import torch.nn.functional as F

    from thrifty.core.distributed import DistInfo
    from thrifty.methods.glam.baselines import build_arms
    from thrifty.methods.glam.sharding import build_sharded
    from thrifty.methods.glam.train import evaluate, prepare_data

    cfg = smoke(tmp_path, data_dir, "eval_batch_size=5")
    data = prepare_data(cfg)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dense = build_sharded(next(s for s in build_arms(cfg) if s.name == "dense-active"), seed=0, device=info.device)
    got = evaluate(dense, data.val, data.weights, cfg, info, max_windows=7)
    expect = {}
    with torch.no_grad():
        for source, stream in data.val.items():
            w = torch.from_numpy(text.eval_windows(stream, seq_len=cfg.model.seq_len, max_windows=7))
            logits = dense.eval()(w[:, :-1]).logits
            expect[source] = F.cross_entropy(logits.transpose(1, 2), w[:, 1:]).item()
    for source, value in expect.items():
        assert got[source] == pytest.approx(value, rel=1e-5), source
    weights = {s: data.weights[s] for s in expect}
    overall = sum(expect[s] * w for s, w in weights.items()) / sum(weights.values())
    assert got["overall"] == pytest.approx(overall, rel=1e-5)

    # an MoE's evaluation batches hold windows of several sources (capacity routing is per group)
    source_of = {}
    for source, stream in data.val.items():
        for w in text.eval_windows(stream, seq_len=cfg.model.seq_len, max_windows=7):
            source_of[w[:-1].tobytes()] = source
    moe = build_sharded(next(s for s in build_arms(cfg) if s.name == "moe"), seed=0, device=info.device)
    batches: list[set[str]] = []
    original = moe.forward

    def spy(tokens, **kw):
        batches.append({source_of[row.numpy().tobytes()] for row in tokens})
        return original(tokens, **kw)

    moe.forward = spy
    evaluate(moe, data.val, data.weights, cfg, info, max_windows=7)
    assert sum(len(b) for b in batches) >= len(data.val)
    assert max(len(b) for b in batches) > 1
