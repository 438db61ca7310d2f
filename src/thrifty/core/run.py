"""Run directories, seeding, determinism, JSONL metrics, progress bars and resource accounting.

A run lives in ``<out_dir>/<recipe>/<run_name>/`` and holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON record per line), ``checkpoints/``, ``results.json`` and ``figures/``.
Resuming into an existing directory requires the same config (apart from keys that cannot change
results, such as ``progress``); otherwise a :class:`~thrifty.core.config.ConfigError` says which keys
differ.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml

from thrifty.core import distributed
from thrifty.core.config import BaseConfig, ConfigError, diff, to_dict, to_yaml

log = logging.getLogger(__name__)
T = TypeVar("T")

# Keys that may change between a run and its resumption without changing any result.
# ``stages`` only chooses which parts of a recipe run now (e.g. ``stages=[eval]`` after training).
RESUMABLE_KEYS = {"resume", "progress", "num_threads", "workers", "preset", "run_name", "out_dir", "data_dir", "stages"}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"config key 'device': {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' asks for CUDA but torch sees no CUDA device; use device=cpu")
    return device


def autocast(device_type: str, precision: str) -> torch.autocast:
    """bf16 autocast for ``precision="bf16"`` on ``device_type`` (``"cpu"``, ``"cuda"``); a no-op context for fp32.
    Weights and optimizer state stay fp32; callers compute losses from ``.float()`` outputs."""
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_torch(cfg: BaseConfig) -> None:
    """Apply thread count and determinism settings from the shared config keys."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def data_dir_path(cfg: BaseConfig) -> Path:
    """Where generated data and tokenizers are cached (``data_dir``, ``$THRIFTY_DATA`` or ~/.cache/thrifty)."""
    root = cfg.data_dir or os.environ.get("THRIFTY_DATA") or str(Path.home() / ".cache" / "thrifty")
    return Path(root).expanduser()


def data_root(cfg: BaseConfig) -> Path:
    """:func:`data_dir_path`, created if missing."""
    path = data_dir_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir_for(recipe: str, cfg: BaseConfig) -> Path:
    """``<out_dir>/<recipe>/<run_name or preset>``."""
    return Path(cfg.out_dir) / recipe / (cfg.run_name or cfg.preset)


def prepare_run_dir(recipe: str, cfg: BaseConfig, *, write: bool = True) -> Path:
    """Create (or reopen for resumption) the run directory and write ``config.yaml``.

    With ``resume=True`` an existing directory must have been created with the same config (keys in
    :data:`RESUMABLE_KEYS` and the config class's ``SELECTORS``, keys that only choose which units run,
    excepted). With ``resume=False`` earlier artefacts are removed first.
    ``write=False`` (non-zero DDP ranks) only computes the path.
    """
    path = run_dir_for(recipe, cfg)
    git_commit()  # pin the source commit at the start of the run
    if not write:
        return path
    saved = path / "config.yaml"
    if saved.exists():
        if cfg.resume:
            old = yaml.safe_load(saved.read_text()) or {}
            free = RESUMABLE_KEYS | set(getattr(cfg, "SELECTORS", ()))
            changed = [k for k in diff(old, to_dict(cfg)) if k not in free and k.split(".")[0] not in free]
            if changed:
                raise ConfigError(
                    f"run directory {path} was made with a different config (changed: {', '.join(changed)}); "
                    "pass run_name=<new name> for a new run, or resume=false to start this one over"
                )
        else:
            names = ("checkpoints", "units", "export", "figures", "metrics*.jsonl", "access_log*.jsonl", "results.json")
            for target in (t for name in names for t in path.glob(name)):
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / "figures").mkdir(exist_ok=True)
    atomic_write_text(saved, to_yaml(cfg))
    return path


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; best effort, skipped where a directory cannot be
    opened or synced (Windows, some network file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, temp: Path | None = None, sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory (``temp``; default
    ``.<name>.tmp-<pid>``), flushed and fsynced, then ``os.replace``: never half-written, the temporary file removed
    whatever happens. ``sync_dir`` also fsyncs the directory (:func:`fsync_directory`), so the rename itself
    survives a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Atomic, pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class MetricsLog:
    """Append-only JSON-lines metrics file, one record per line, flushed on every write.

    Records carry a ``unit`` (e.g. ``moe/seed0``) and a ``step``. When a unit resumes from step ``k``,
    :meth:`truncate` drops that unit's records after ``k`` so the file shows one continuous curve.
    """

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")

    def read(self, unit: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if unit is None or rec.get("unit") == unit:
                out.append(rec)
        return out

    def truncate(self, unit: str, after_step: int) -> None:
        """Drop records of ``unit`` whose step is greater than ``after_step`` (and any torn line)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.read() if not (r.get("unit") == unit and r.get("step", -1) > after_step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (empty when unknown); latency caches are keyed by it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def git_commit() -> dict[str, Any]:
    """The source commit a result was produced with: ``{"commit": sha or "unknown", "dirty": bool | None}``.

    Read from the git checkout that holds this package (an installed wheel has none: ``unknown``), once
    per process: :func:`prepare_run_dir` reads it when a run starts, so later commits to the checkout
    while a long run trains do not relabel it."""
    import subprocess

    repo = Path(__file__).resolve().parents[3]  # src/thrifty/core/run.py -> the checkout holding src/

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    sha = git("rev-parse", "HEAD")
    # an installed copy inside some other checkout (a venv in a repository) is not that checkout's code
    if not sha or not top or Path(top).resolve() != repo:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": bool(status) if status is not None else None}


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, hardware and source commit a result was measured with (``results.json``'s ``environment``)."""
    import platform

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_name() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # ATen picks its vectorised kernels by this at run time; CPU results are bitwise reproducible only
        # on the same capability (ATEN_CPU_CAPABILITY=avx2 reproduces an AVX2 machine's numbers here)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        **git_commit(),
    }


def is_inside(base: Path, rel: str) -> bool:
    """``rel`` is a relative path that stays inside ``base`` (no absolute path, no ``..`` escape)."""
    if Path(rel).is_absolute():
        return False
    return (Path(base) / rel).resolve().is_relative_to(Path(base).resolve())


def portable(obj: Any, roots: dict[str, str | Path]) -> Any:
    """``obj`` with every machine-specific directory in its strings replaced by a placeholder.

    ``roots`` maps placeholders to directories, e.g. ``{"<data_dir>": "/home/u/.cache/thrifty"}``; a root is
    replaced wherever it starts a path, also inside a longer string, and the longest root goes first, so a
    data directory inside the home directory becomes ``<data_dir>``.
    Used so that a committed ``results.json`` names no path of the machine it was produced on.
    """
    pairs = sorted(
        ((str(Path(r).expanduser()), name) for name, r in roots.items() if r and str(r) not in ("/", ".")),
        key=lambda p: -len(p[0]),
    )

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            for root, name in pairs:  # longest first, so a data dir inside home becomes <data_dir>
                v = name if v == root else v.replace(root + os.sep, name + os.sep)
            return v
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    return fix(obj)


def machine_roots(cfg: BaseConfig) -> dict[str, str]:
    """The directories :func:`portable` hides: the data cache, an absolute ``out_dir``, site-packages, the
    working directory and home."""
    import sysconfig

    return {
        "<data_dir>": str(data_dir_path(cfg)),
        "<out_dir>": cfg.out_dir if Path(cfg.out_dir).expanduser().is_absolute() else "",
        "<site-packages>": sysconfig.get_paths()["purelib"],
        "<platlib>": sysconfig.get_paths()["platlib"],
        ".": os.getcwd(),
        "<home>": str(Path.home()),
    }


def open_run(
    recipe: str, cfg: BaseConfig, *, batch_size: int | None = None
) -> tuple[distributed.DistInfo, Path, MetricsLog]:
    """The opening of a recipe's ``train``: torch settings, the (possibly DDP) process group, the run directory
    (written by the main rank, waited for by the others) and the metrics log. ``batch_size``, when given, must
    divide by the world size (each rank takes its share of every batch)."""
    configure_torch(cfg)
    info = distributed.init(resolve_device(cfg.device))
    if batch_size is not None and batch_size % info.world_size:
        raise ConfigError(f"config key 'batch_size' ({batch_size}) must be divisible by the world size")
    run_dir = prepare_run_dir(recipe, cfg, write=info.is_main)
    distributed.barrier()
    return info, run_dir, MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)


def main_first(build: Callable[[], T], info: distributed.DistInfo) -> T:
    """``build()`` on the main rank first (it writes a cache), then on the other ranks (they read it)."""
    out = build() if info.is_main else None
    distributed.barrier()
    return out if out is not None else build()


def new_summary(recipe: str, paper: dict[str, Any], cfg: BaseConfig, run_dir: Path, **extra: Any) -> dict[str, Any]:
    """The head of a recipe's ``results.json``: recipe, paper, preset, run directory, creation time, ``extra``
    entries, and the empty claims / tables / figures lists the evaluation fills."""
    return {
        "recipe": recipe,
        "paper": paper,
        "preset": cfg.preset,
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
        "claims": [],
        "tables": [],
        "figures": [],
    }


def finish_run(
    summary: dict[str, Any],
    run_dir: Path,
    cfg: BaseConfig,
    *,
    t_start: float,
    info: distributed.DistInfo | None = None,
    **cost: Any,
) -> dict[str, Any]:
    """Complete a recipe's ``results.json``: cost (wall time since ``t_start``, peak RSS, world size and any extra
    ``cost`` entries), environment and resolved config; the main rank writes it, every rank waits for that, and a
    DDP process group is shut down. Returns ``summary``."""
    info = info or distributed.DistInfo()
    summary["cost"] = {
        "wall_time_s": time.perf_counter() - t_start,
        **cost,
        "peak_rss_mb": peak_rss_mb(),
        "world_size": info.world_size,
    }
    summary.setdefault("created", time.strftime("%Y-%m-%d %H:%M:%S"))
    summary["environment"] = environment(info.device)
    summary["config"] = to_dict(cfg)
    if info.is_main:  # the file names no path of this machine; the returned dict keeps them usable here
        write_json(run_dir / "results.json", portable(summary, machine_roots(cfg)))
    distributed.barrier()
    if info.enabled:
        distributed.shutdown()
    return summary


def peak_rss_mb() -> float:
    """Peak resident set size (MiB) of the largest of this process and its finished children (the worker
    processes of parallel units); concurrent workers together hold up to ``workers`` times as much."""
    kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


@contextlib.contextmanager
def progress(total: int, description: str, *, enabled: bool = True, start: int = 0) -> Iterator[Callable[..., None]]:
    """Progress bar with ETA; yields ``advance(n=1, **fields)``.

    On a terminal it is a rich bar; otherwise (CI logs, pipes) it logs a line at every 10% so long
    work still shows where it is. ``enabled=False`` makes it silent.
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        with bar:
            task = bar.add_task(description, total=total, completed=start, info="")

            def advance(n: int = 1, **fields: Any) -> None:
                info = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
                bar.update(task, advance=n, info=info)

            yield advance
        return

    state = {"done": start, "next": 0.1, "t0": time.perf_counter()}

    def advance_log(n: int = 1, **fields: Any) -> None:
        state["done"] += n
        frac = state["done"] / max(total, 1)
        if frac + 1e-9 >= state["next"] or state["done"] >= total:
            elapsed = time.perf_counter() - state["t0"]
            rate = (state["done"] - start) / max(elapsed, 1e-9)
            eta = (total - state["done"]) / rate if rate > 0 else float("nan")
            info = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            log.info(
                "%s %d/%d (%.0f%%) elapsed %.0fs eta %.0fs %s",
                description,
                state["done"],
                total,
                100 * frac,
                elapsed,
                eta,
                info,
            )
            while state["next"] <= frac + 1e-9:
                state["next"] += 0.1

    yield advance_log


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tune_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS at once.

    PyTorch on CPU allocates and frees many multi-MB activations per step; with glibc's defaults each
    of them is an ``mmap``/``munmap`` pair whose pages are faulted in and zeroed again. Raising the mmap
    and trim thresholds makes the allocator reuse those blocks: 1.17x tokens/s on the quick GLaM step
    (``benchmarks/lm_step.py``). Returns False where glibc is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        return False
    return bool(ok)


def load_unit_results(
    run_dir: Path,
    unit_dir: Callable[..., Path],
    *,
    arms: list[str],
    seeds: list[int],
    sweep_points: list[Any] | None = None,
    sweep_arms: list[str] | None = None,
    point_of: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[dict[str, dict[int, dict]], dict[Any, dict[str, dict[int, dict]]]]:
    """The ``result.json`` of every finished unit of an earlier ``train`` stage (for ``stages=[eval]``).

    ``unit_dir(run_dir, arm, seed)`` is a main unit's directory and ``unit_dir(run_dir, arm, seed, point)`` a sweep
    unit's; a sweep point the main run already covers is read from the main unit when ``point_of(result)`` equals
    it. Returns ``(results[arm][seed], sweep[point][arm][seed])``; :class:`ConfigError` when nothing finished."""
    results: dict[str, dict[int, dict]] = {}
    sweep: dict[Any, dict[str, dict[int, dict]]] = {}
    for arm in arms:
        for seed in seeds:
            path = unit_dir(run_dir, arm, seed) / "result.json"
            if path.exists():
                results.setdefault(arm, {})[seed] = json.loads(path.read_text())
    for point in sweep_points or []:
        for arm in sweep_arms or []:
            for seed in seeds:
                path = unit_dir(run_dir, arm, seed, point) / "result.json"
                if not path.exists():
                    path = unit_dir(run_dir, arm, seed) / "result.json"
                res = json.loads(path.read_text()) if path.exists() else None
                if res is not None and (point_of is None or point_of(res) == point):
                    sweep.setdefault(point, {}).setdefault(arm, {})[seed] = res
    if not results:
        raise ConfigError(f"stages=[eval] found no finished units under {run_dir}/units; run the train stage first")
    return results, sweep
