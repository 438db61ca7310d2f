"""Checkpoints: exact round trips (weights, tied weights, AdamW, RNG), pruning, atomicity, no pickle."""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import thrifty.core.checkpoint as ckpt_mod
from thrifty.core.checkpoint import (
    LATEST,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

VOCAB, DIM = 11, 6


class TiedLM(nn.Module):
    """Embedding -> hidden -> output projection sharing the embedding matrix."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.mid = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, VOCAB, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("counter", torch.zeros(3, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.tanh(self.mid(self.emb(x)))))


TOKENS = torch.arange(20).remainder(VOCAB).reshape(4, 5)


def _train_step(model: TiedLM, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    logits = model(TOKENS)
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), TOKENS.roll(1, dims=1).reshape(-1))
    loss.backward()
    opt.step()


def _fresh(seed: int) -> tuple[TiedLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
    return model, opt


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _steps(ckpt_dir) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step-"))


# --------------------------------------------------------------------------- round trips


def test_round_trip_restores_weights_buffers_and_keeps_tie(tmp_path):
    model, opt = _fresh(0)
    _train_step(model, opt)
    model.counter += torch.tensor([1, 2, 3])
    saved = _state(model)
    path = save_checkpoint(tmp_path / "ck", step=1, model=model, optimizer=opt, extra={"cursor": 17, "best": 0.5})
    assert path == tmp_path / "ck" / "step-00000001"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optim.safetensors", "state.json"]

    other, other_opt = _fresh(123)
    assert not torch.equal(other.emb.weight, model.emb.weight)
    info = load_checkpoint(path, model=other, optimizer=other_opt)
    assert info == {"step": 1, "extra": {"cursor": 17, "best": 0.5}}
    _assert_same(saved, _state(other))
    # the tie survives loading: one Parameter, and updating it updates both uses
    assert other.out.weight is other.emb.weight
    with torch.no_grad():
        other.emb.weight[0, 0] = 42.0
    assert other.out.weight[0, 0].item() == 42.0


def test_adamw_resume_is_bitwise_identical_to_uninterrupted(tmp_path):
    model, opt = _fresh(0)
    for _ in range(3):
        _train_step(model, opt)
    path = save_checkpoint(tmp_path, step=3, model=model, optimizer=opt)
    for _ in range(3):
        _train_step(model, opt)
    reference = _state(model)
    ref_opt = opt.state_dict()

    resumed, resumed_opt = _fresh(7)
    assert load_checkpoint(path, model=resumed, optimizer=resumed_opt)["step"] == 3
    for _ in range(3):
        _train_step(resumed, resumed_opt)
    _assert_same(reference, _state(resumed))
    got_opt = resumed_opt.state_dict()
    assert got_opt["state"].keys() == ref_opt["state"].keys()
    for pid, st in ref_opt["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got_opt["state"][pid][name])), (
                pid,
                name,
            )
    for g_ref, g_got in zip(ref_opt["param_groups"], got_opt["param_groups"], strict=True):
        assert g_got["lr"] == g_ref["lr"]
        assert tuple(g_got["betas"]) == (0.8, 0.99)
        assert g_got["weight_decay"] == 0.05


def test_optimizer_state_restored_before_further_steps(tmp_path):
    model, opt = _fresh(0)
    for _ in range(2):
        _train_step(model, opt)
    path = save_checkpoint(tmp_path, step=2, model=model, optimizer=opt)
    resumed, resumed_opt = _fresh(0)
    load_checkpoint(path, model=resumed, optimizer=resumed_opt)
    for pid, st in opt.state_dict()["state"].items():
        got = resumed_opt.state_dict()["state"][pid]
        assert torch.equal(got["exp_avg"], st["exp_avg"])
        assert torch.equal(got["exp_avg_sq"], st["exp_avg_sq"])
        assert float(got["step"]) == 2.0


def test_rng_states_restored(tmp_path):
    model, _ = _fresh(0)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    # leave cached Gaussians behind so the full state (not just the counter) must round-trip
    random.gauss(0, 1)
    np.random.standard_normal()
    path = save_checkpoint(tmp_path, step=5, model=model)

    def draw():
        return (
            [random.random() for _ in range(3)] + [random.gauss(0, 1)],
            np.random.standard_normal(4).tolist() + np.random.randint(0, 1000, 3).tolist(),
            torch.rand(4).tolist() + torch.randint(0, 1000, (3,)).tolist(),
        )

    expected = draw()
    # scramble everything, then restore
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    load_checkpoint(path, model=TiedLM())
    assert draw() == expected


def test_restore_rng_false_leaves_rng_alone(tmp_path):
    model, _ = _fresh(0)
    torch.manual_seed(1)
    path = save_checkpoint(tmp_path, step=1, model=model)
    target = TiedLM()  # built before seeding: construction draws random numbers
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(2)
    load_checkpoint(path, model=target, restore_rng=False)
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_without_optimizer_cannot_restore_one(tmp_path):
    model, _ = _fresh(0)
    path = save_checkpoint(tmp_path, step=1, model=model)
    m2, opt2 = _fresh(1)
    with pytest.raises(CheckpointError, match="no optimiser state"):
        load_checkpoint(path, model=m2, optimizer=opt2)
    # the model alone loads fine
    load_checkpoint(path, model=m2)
    _assert_same(_state(model), _state(m2))


# --------------------------------------------------------------------------- latest and pruning


def test_keep_prunes_old_and_latest_points_at_newest(tmp_path):
    model, opt = _fresh(0)
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, keep=2)
    assert _steps(tmp_path) == ["step-00000040", "step-00000050"]
    assert (tmp_path / LATEST).read_text().strip() == "step-00000050"
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000050"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_keep_one_and_keep_zero_leave_exactly_the_newest(tmp_path):
    model, _ = _fresh(0)
    for keep, root in ((1, tmp_path / "k1"), (0, tmp_path / "k0")):
        for step in (1, 2, 3):
            save_checkpoint(root, step=step, model=model, keep=keep)
        assert _steps(root) == ["step-00000003"]


def test_keep_three_with_large_steps_orders_numerically(tmp_path):
    model, _ = _fresh(0)
    for step in (9, 99, 999, 1000, 10000):
        save_checkpoint(tmp_path, step=step, model=model, keep=3)
    assert _steps(tmp_path) == ["step-00000999", "step-00001000", "step-00010000"]
    assert load_checkpoint(latest_checkpoint(tmp_path), model=TiedLM())["step"] == 10000


def test_resaving_same_step_replaces_it(tmp_path):
    model, opt = _fresh(0)
    save_checkpoint(tmp_path, step=4, model=model, optimizer=opt, extra={"v": 1})
    save_checkpoint(tmp_path, step=4, model=model, optimizer=opt, extra={"v": 2})
    assert _steps(tmp_path) == ["step-00000004"]
    assert load_checkpoint(latest_checkpoint(tmp_path), model=TiedLM())["extra"] == {"v": 2}


def test_latest_checkpoint_none_when_empty_and_error_when_dangling(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "does-not-exist") is None
    (tmp_path / LATEST).write_text("step-00000099\n")
    with pytest.raises(CheckpointError, match="step-00000099"):
        latest_checkpoint(tmp_path)


# --------------------------------------------------------------------------- atomicity


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _fresh(0)
    _train_step(model, opt)
    good = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, extra={"tag": "good"})
    good_weights = _state(model)
    _train_step(model, opt)

    calls = []

    def exploding_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        # by now the model file of the new checkpoint has been written next to this one
        assert (Path(filename).parent / "model.safetensors").is_file()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "save_file", exploding_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, extra={"tag": "bad"})
    monkeypatch.undo()
    assert calls, "the simulated failure was not reached"

    assert (tmp_path / LATEST).read_text().strip() == "step-00000001"
    assert latest_checkpoint(tmp_path) == good
    assert _steps(tmp_path) == ["step-00000001"]  # no half-written step-00000002
    for p in tmp_path.glob("step-*"):
        assert (p / "state.json").is_file()

    restored, restored_opt = _fresh(5)
    info = load_checkpoint(latest_checkpoint(tmp_path), model=restored, optimizer=restored_opt)
    assert info == {"step": 1, "extra": {"tag": "good"}}
    _assert_same(good_weights, _state(restored))

    # a later save still works and prunes as usual
    save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, keep=1)
    assert _steps(tmp_path) == ["step-00000003"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"


def test_interrupted_resave_of_latest_step_leaves_it_intact(tmp_path, monkeypatch):
    model, opt = _fresh(0)
    good = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    load_checkpoint(latest_checkpoint(tmp_path), model=TiedLM())


# --------------------------------------------------------------------------- damaged checkpoints


def test_truncated_model_file_is_checkpoint_error_naming_file(tmp_path):
    model, opt = _fresh(0)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path, model=TiedLM())
    assert "model.safetensors" in str(ei.value)


def test_truncated_optim_file_is_checkpoint_error(tmp_path):
    model, opt = _fresh(0)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    f = path / "optim.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=re.escape("optim.safetensors")):
        load_checkpoint(path, model=TiedLM())


@pytest.mark.parametrize("fname", ["model.safetensors", "optim.safetensors"])
def test_corrupt_header_same_size_is_checkpoint_error(tmp_path, fname):
    # a damaged (not shortened) tensor file passes the size check; it must still be a CheckpointError
    model, opt = _fresh(0)
    _train_step(model, opt)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    f = path / fname
    data = bytearray(f.read_bytes())
    data[:8] = b"\xff" * 8  # absurd header length
    f.write_bytes(bytes(data))
    restored, restored_opt = _fresh(1)
    with pytest.raises(CheckpointError, match=re.escape(fname)):
        load_checkpoint(path, model=restored, optimizer=restored_opt)


def test_missing_or_corrupt_state_json_is_checkpoint_error(tmp_path):
    model, _ = _fresh(0)
    path = save_checkpoint(tmp_path, step=1, model=model)
    (path / "state.json").write_text('{"step": 1, "opt')
    with pytest.raises(CheckpointError, match=re.escape("state.json")):
        load_checkpoint(path, model=TiedLM())
    with pytest.raises(CheckpointError, match=re.escape("state.json")):
        load_checkpoint(tmp_path / "nowhere", model=TiedLM())


def test_missing_model_file_is_checkpoint_error(tmp_path):
    model, _ = _fresh(0)
    path = save_checkpoint(tmp_path, step=1, model=model)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors")):
        load_checkpoint(path, model=TiedLM())


def test_wrong_shape_model_is_checkpoint_error(tmp_path):
    model, _ = _fresh(0)
    path = save_checkpoint(tmp_path, step=1, model=model)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model=TiedLM(dim=DIM + 2))


def test_model_with_extra_or_missing_parameters_is_checkpoint_error(tmp_path):
    model, _ = _fresh(0)
    path = save_checkpoint(tmp_path, step=1, model=model)

    class Bigger(TiedLM):
        def __init__(self) -> None:
            super().__init__()
            self.extra_head = nn.Linear(DIM, 2)

    with pytest.raises(CheckpointError, match="extra_head"):
        load_checkpoint(path, model=Bigger())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model=nn.Linear(DIM, DIM))


def test_state_json_is_plain_json_with_file_sizes(tmp_path):
    model, opt = _fresh(0)
    _train_step(model, opt)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, extra={"k": [1, 2]})
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 1
    assert state["extra"] == {"k": [1, 2]}
    assert state["files"] == {
        "model.safetensors": (path / "model.safetensors").stat().st_size,
        "optim.safetensors": (path / "optim.safetensors").stat().st_size,
    }


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = _fresh(0)
    _train_step(model, opt)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    restored, restored_opt = _fresh(3)
    assert latest_checkpoint(tmp_path) == path
    info = load_checkpoint(path, model=restored, optimizer=restored_opt)
    assert info["step"] == 1
    _assert_same(_state(model), _state(restored))
