"""Atomic, unpickle-free checkpoints: model + optimiser + RNG + step.

Layout of a checkpoint directory::

    checkpoints/
      latest                      # text: name of the newest complete checkpoint
      step-00000100/
        model.safetensors         # model tensors (tied weights handled by safetensors.save_model)
        optim.safetensors         # optimiser tensors, flattened as "state.<param>.<name>"
        state.json                # step, optimiser scalars/param groups, RNG states, user extras, file sizes

Sharded models (FSDP2 parameters are ``DTensor`` shards) are saved as each rank's *local* shards, in
a per-rank directory chosen by the caller; loading copies them back into the shards, so resuming needs
the same world size. Nothing here communicates between ranks.

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place, and only then
is ``latest`` switched (itself written through a temporary file and ``os.replace``). A process killed
at any moment therefore leaves ``latest`` naming the previous complete checkpoint. Loading never
unpickles: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from thrifty.core.run import atomic_write_text

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor``; any other tensor unchanged."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def _save_model_state(model: torch.nn.Module, path: Path) -> None:
    if _is_sharded(model):
        save_file({k: _local(v).detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        save_model(model, str(path))


def _load_sharded_model_state(model: torch.nn.Module, path: Path) -> None:
    """Copy this rank's saved shards into the model's ``DTensor`` shards (and plain tensors)."""
    loaded = load_file(str(path))
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(loaded)), sorted(set(loaded) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in state.items():
            dst = _local(target)
            if dst.shape != loaded[name].shape:
                raise CheckpointError(
                    f"{path} does not fit the model: {name} is {tuple(loaded[name].shape)} in the file, "
                    f"{tuple(dst.shape)} on this rank (resume with the same world size)"
                )
            dst.copy_(loaded[name])


def _reshard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """Wrap saved local shards of optimiser state back into ``DTensor`` like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, pstate in sd["state"].items():
        p = params[pid]
        if not _is_dtensor(p):
            continue
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor) and value.shape == p.to_local().shape and value.dim() > 0:
                pstate[name] = DTensor.from_local(
                    value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
    return sd


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = _local(value).detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Current RNG states: torch (as tensors) and Python/NumPy (as JSON-able values)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, st, gauss = meta["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    ckpt_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and point ``latest`` at it; keep the newest ``keep``.

    Args:
        ckpt_dir: directory holding the checkpoints of one training unit.
        step: optimiser steps taken so far (the resumed run starts at this step).
        model: the unwrapped module (not the DDP wrapper).
        optimizer: optional optimiser whose state is saved.
        extra: JSON-serialisable extra state (data cursor, best metric, elapsed time ...).
        keep: number of complete checkpoints to keep (>= 1).

    Returns:
        Path of the new checkpoint directory.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = ckpt_dir / name
    for stale in [*ckpt_dir.glob(".tmp-*"), *ckpt_dir.glob(".old-*")]:  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()

    _save_model_state(model, tmp / "model.safetensors")
    rng_tensors, rng_meta = rng_state()
    optim_meta: dict[str, Any] | None = None
    opt_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        opt_tensors, optim_meta = _flatten_optimizer(optimizer)
    save_file({**opt_tensors, **rng_tensors}, str(tmp / "optim.safetensors"))
    files = {f: (tmp / f).stat().st_size for f in ("model.safetensors", "optim.safetensors")}
    state = {"step": step, "optimizer": optim_meta, "rng": rng_meta, "extra": extra or {}, "files": files}
    with open(tmp / "state.json", "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    for f in files:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)

    if final.exists():  # re-saving the same step: swap it out without a window with no checkpoint
        trash = ckpt_dir / f".old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    atomic_write_text(ckpt_dir / LATEST, name + "\n")

    complete = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in complete[: max(0, len(complete) - max(keep, 1))]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_at(ckpt_dir: Path, step: int) -> Path:
    """The complete checkpoint of ``step``; :class:`CheckpointError` when it is not there."""
    path = Path(ckpt_dir) / f"step-{step:08d}"
    if not (path / "state.json").exists():
        raise CheckpointError(f"no complete checkpoint for step {step} in {ckpt_dir}")
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or ``None`` when there is none yet."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint directory into ``model`` (and ``optimizer``); returns ``{"step", "extra"}``.

    Raises:
        CheckpointError: missing or truncated files, or tensors that do not match the model.
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path / 'state.json'}: {err}") from None
    for fname, size in state.get("files", {}).items():
        fpath = path / fname
        if not fpath.exists() or fpath.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {fpath} is missing or truncated (expected {size} bytes)")
    try:
        if _is_sharded(model):
            _load_sharded_model_state(model, path / "model.safetensors")
            missing, unexpected = [], []
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises several types for shape mismatches
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the model: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path / 'model.safetensors'} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    try:
        other = load_file(str(path / "optim.safetensors"))
    except Exception as err:  # SafetensorError and OSError
        raise CheckpointError(f"cannot read {path / 'optim.safetensors'}: {err}") from None
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimiser state")
        opt_tensors = {k: v for k, v in other.items() if k.startswith("state.")}
        saved = _unflatten_optimizer(opt_tensors, state["optimizer"])
        optimizer.load_state_dict(_reshard_optimizer_state(optimizer, saved))
    if restore_rng:
        set_rng_state({k: v for k, v in other.items() if k.startswith("rng.")}, state["rng"])
    return {"step": int(state["step"]), "extra": state.get("extra", {})}


def load_unit_model(
    unit_dir: str | Path,
    build: Callable[[dict[str, Any]], torch.nn.Module],
    *,
    recipe: str,
    error: type[Exception] = ValueError,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained unit's exported model: ``card.json`` read, ``build(card)`` constructs the network, and
    ``model.safetensors`` fills it (every weight must match; nothing is unpickled). Returns ``(model, card)``.

    ``error`` (a recipe's scoring error) is raised, naming the file, for a missing file, a card that is not this
    ``recipe``'s (JSON, missing keys, values ``build`` refuses) or weights that do not fit the card."""
    unit_dir = Path(unit_dir)
    card_path, weights = unit_dir / "card.json", unit_dir / "model.safetensors"
    for path in (card_path, weights):
        if not path.is_file():
            raise error(f"{path} does not exist: pass a trained unit directory (<run>/units/<arm>/seed<k>)")
    try:
        card = json.loads(card_path.read_text())
        model = build(card)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise error(f"{card_path} is not a {recipe} model card ({err})") from None
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as err:  # same keys, other shapes
        raise error(f"{weights} does not match {card_path} ({err})") from None
    if missing or unexpected:
        raise error(
            f"{weights} does not match {card_path} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model, card
