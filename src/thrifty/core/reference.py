"""Reference results: a recipe's claim-preset run, committed beside the code, and its claims log.

The claim protocol (``design.md``) judges each recipe's headline claims once, at its *claim preset*
(5 seeds, at most 45 minutes on 2 cores). That run's ``results.json`` and figures are committed under
``docs/<recipe>/reference/`` with where and how they were produced (commit, date, CPU, threads, wall
time, peak RSS), so ``thrifty report`` and ``thrifty reproduce`` can show them beside a fresh run.
Every claim-preset run — holding or not — also gets one line in ``docs/<recipe>/claims_log.md``;
lines are appended, never rewritten.

A reference must be self-consistent: every claim carries ``measured``, ``ci95``, ``n_seeds`` and a
``holds`` that follows from its stored per-seed values (:func:`check_reference`), and no string in it
names a path of the machine it was produced on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from thrifty.core.claims import recompute
from thrifty.core.report import claim_cell
from thrifty.core.run import atomic_write_text, is_inside, write_json

RESULTS = "results.json"
LOG_NAME = "claims_log.md"
LOG_HEADER = (
    "# Claims log\n\n"
    "One line per run of this recipe's claim preset, holding or not, in the order they were run. "
    "Lines are appended (`thrifty reference RUN_DIR`), never edited or removed; a rerun after a bug fix "
    "gets its own line.\n\n"
    "| date | commit | preset | seeds | wall time | claims (measured [95% CI], verdict) |\n"
    "|---|---|---|---|---|---|\n"
)
# A string that names a path of the machine that wrote it: an absolute POSIX path of two or more parts
# (also after ``file:``), the home directory, a Windows drive; Python installations are checked by name.
_MACHINE_PATH = re.compile(r"(^|[\s'\"(=:,\[])(/[^/\s'\"]+/|~/|[A-Za-z]:\\)")
_PLACEHOLDERS = ("<site-packages>", "<platlib>")
# what every stored claim carries so that its verdict can be recomputed
_CLAIM_KEYS = ("measured", "ci95", "n_seeds", "holds", "values", "seeds", "direction", "threshold")


class ReferenceError(RuntimeError):
    """A reference is missing, malformed or inconsistent; the message names the file and the problem."""


def docs_dirs() -> list[Path]:
    """Directories searched for ``<recipe>/reference/results.json``, most specific first.

    ``$THRIFTY_DOCS_DIR``, when set, is the only one; otherwise the repository's ``docs/`` (editable
    installs), then the copy a non-editable install places under ``<prefix>/share/thrifty/docs``.
    """
    if env := os.environ.get("THRIFTY_DOCS_DIR"):
        return [Path(env)]
    dirs = [_repo_docs()]
    dirs.append(Path(sys.prefix) / "share" / "thrifty" / "docs")
    return dirs


def reference_dir(recipe: str) -> Path | None:
    """The directory holding ``recipe``'s committed reference, or ``None`` when it has none yet."""
    for d in docs_dirs():
        if (d / recipe / "reference" / RESULTS).is_file():
            return d / recipe / "reference"
    return None


def load_reference(recipe: str) -> dict[str, Any] | None:
    """``recipe``'s committed reference results (``_run_dir`` set to its directory), or ``None``."""
    where = reference_dir(recipe)
    if where is None:
        return None
    path = where / RESULTS
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReferenceError(f"{path} is not readable JSON: {err}") from None
    data["_run_dir"] = str(where)
    return data


def machine_paths(obj: Any, where: str = "") -> list[str]:
    """Every string in ``obj`` that names a path of a particular machine, as ``key.path: value``."""
    found: list[str] = []
    if isinstance(obj, str):
        bare = obj  # the placeholders run.portable writes in place of real directories are fine
        for placeholder in _PLACEHOLDERS:
            bare = bare.replace(placeholder, "<dir>")
        if _MACHINE_PATH.search(bare) or "site-packages" in bare or "dist-packages" in bare:
            found.append(f"{where or '<root>'}: {obj!r}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found += machine_paths(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found += machine_paths(v, f"{where}[{i}]")
    return found


def check_reference(data: dict[str, Any], *, source: str = "reference") -> list[str]:
    """Problems of a reference ``results.json`` (empty when well-formed and consistent).

    Checks: the provenance block exists; every claim has ``measured``, ``ci95``, ``n_seeds`` and ``holds``;
    ``n_seeds`` matches its seeds; recomputing the mean, interval and verdict from the stored per-seed
    values gives the stored ones; no string names a machine path.
    """
    problems = []
    prov = data.get("reference")
    if not isinstance(prov, dict):
        problems.append(f"{source}: no 'reference' block (commit, date, machine, threads, wall time, peak RSS)")
    else:
        for key in ("commit", "date", "processor", "threads", "wall_time_s", "peak_rss_mb", "preset", "seeds"):
            if key not in prov:
                problems.append(f"{source}: reference block lacks {key!r}")
    claims = data.get("claims")
    if not isinstance(claims, list) or not claims:
        problems.append(f"{source}: no claims")
        claims = []
    for c in claims:
        cid = c.get("id", "?")
        missing = [k for k in _CLAIM_KEYS if k not in c]
        problems += [f"{source}: claim {cid!r} lacks {key!r}" for key in missing]
        if missing:
            continue
        if c["n_seeds"] != len(c["seeds"]):
            problems.append(f"{source}: claim {cid!r} has n_seeds {c.get('n_seeds')} but {len(c['seeds'])} seeds")
        try:
            again = recompute(c)
        except ValueError as err:
            problems.append(f"{source}: {err}")
            continue
        if bool(c["holds"]) != again["holds"]:
            problems.append(f"{source}: claim {cid!r} stores holds={c['holds']} but its values give {again['holds']}")
        if not _close(c["measured"], again["measured"]):
            problems.append(
                f"{source}: claim {cid!r} stores measured={c['measured']} but its values give {again['measured']}"
            )
        for stored, computed in zip(c["ci95"], again["ci95"]):
            if not _close(stored, computed):
                problems.append(
                    f"{source}: claim {cid!r} stores ci95={c['ci95']} but its values give {list(again['ci95'])}"
                )
                break
    # ``_run_dir`` is where load_reference found the file on this machine; it is not part of the file
    stored = {k: v for k, v in data.items() if k != "_run_dir"}
    problems += [f"{source}: machine path at {p}" for p in machine_paths(stored)]
    return problems


def _close(stored: Any, computed: float) -> bool:
    if stored is None:
        return not math.isfinite(computed)
    return math.isclose(float(stored), computed, rel_tol=1e-9, abs_tol=1e-12)


def provenance(results: dict[str, Any]) -> dict[str, Any]:
    """Where and how a run was produced, from its ``results.json``: the reference block."""
    env, cost = results.get("environment", {}), results.get("cost", {})
    seeds = results.get("config", {}).get("seeds", [])
    return {
        "preset": results.get("preset"),
        "seeds": seeds,
        "commit": env.get("commit", "unknown"),
        "dirty": env.get("dirty"),
        "date": results.get("created", ""),
        "processor": env.get("processor", ""),
        "machine": env.get("machine", ""),
        "cpu_count": env.get("cpu_count"),
        "threads": env.get("threads"),
        "cpu_capability": env.get("cpu_capability"),
        "torch": env.get("torch", ""),
        "wall_time_s": cost.get("wall_time_s"),
        "peak_rss_mb": cost.get("peak_rss_mb"),
    }


def _repo_docs() -> Path:
    """``docs/`` of the checkout this package was imported from (editable installs)."""
    return Path(__file__).resolve().parents[3] / "docs"


def default_docs_dir() -> Path:
    """Where :func:`publish` writes: ``$THRIFTY_DOCS_DIR`` or the repository's ``docs/``.

    Raises:
        ReferenceError: neither exists (an installed copy has no repository to write into).
    """
    if env := os.environ.get("THRIFTY_DOCS_DIR"):
        return Path(env)
    docs = _repo_docs()
    if not (docs.is_dir() and (docs.parent / "pyproject.toml").is_file()):
        raise ReferenceError("this thrifty is not a repository checkout: pass --docs-dir (or set THRIFTY_DOCS_DIR)")
    return docs


def config_changes(results: dict[str, Any], preset: str) -> list[str]:
    """Config keys whose value in ``results`` differs from the committed ``preset`` of its recipe.

    Keys that only say where things go or how fast they run (``out_dir``, ``data_dir``, ``num_threads``, ``workers``,
    ``progress``, ``resume``, ``run_name``, ``preset``, ``stages``) may differ.
    """
    from thrifty.core.config import diff, to_dict
    from thrifty.core.registry import load_config
    from thrifty.core.run import RESUMABLE_KEYS

    _, cfg = load_config(results["recipe"], preset)
    return [k for k in diff(to_dict(cfg), results.get("config", {})) if k.split(".")[0] not in RESUMABLE_KEYS]


def publish(run_dir: Path, *, docs_dir: Path | None = None, log: bool = True) -> Path:
    """Copy a finished claim-preset run into ``docs_dir/<recipe>/reference/`` and append its log line.

    Refuses a run of another preset than the recipe's claim preset or with settings the committed preset
    does not have (command-line overrides), a run from uncommitted changes or an unknown commit, and one
    whose claims are not self-consistent. Returns the reference directory.
    """
    from thrifty.core.registry import get

    src = Path(run_dir) / RESULTS
    if not src.is_file():
        raise ReferenceError(f"{run_dir} has no {RESULTS} (is it a finished run directory?)")
    try:
        results = json.loads(src.read_text())
    except json.JSONDecodeError as err:
        raise ReferenceError(f"{src} is not valid JSON: {err}") from None
    recipe = results.get("recipe")
    if not recipe:
        raise ReferenceError(f"{src} names no recipe")
    claim_preset = get(recipe).claim_preset
    if claim_preset is None:
        raise ReferenceError(f"{recipe} has no pre-registered claim preset yet; commit one before publishing")
    if results.get("preset") != claim_preset:
        raise ReferenceError(
            f"{src} was run at preset {results.get('preset')!r}; {recipe}'s reference is its claim preset "
            f"{claim_preset!r}"
        )
    changed = config_changes(results, claim_preset)
    if changed:
        raise ReferenceError(
            f"{src} differs from the committed preset {claim_preset!r} in {', '.join(changed)}: a reference is "
            "the pre-registered preset run as committed, without overrides"
        )
    prov = provenance(results)
    if prov["dirty"]:
        raise ReferenceError(f"{src} was produced from uncommitted changes (commit {prov['commit']} + edits)")
    if prov["dirty"] is None or prov["commit"] == "unknown":
        raise ReferenceError(f"{src} was produced from an unknown commit (not a git checkout of thrifty)")
    docs_dir = Path(docs_dir) if docs_dir is not None else default_docs_dir()
    reference = {**results, "reference": prov}
    problems = check_reference(reference, source=str(src))
    if problems:
        raise ReferenceError("; ".join(problems))
    out = Path(docs_dir) / recipe / "reference"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    for rel in results.get("figures", []):
        if not is_inside(Path(run_dir), rel):
            raise ReferenceError(f"{src} lists a figure outside its run directory: {rel!r}")
        if (Path(run_dir) / rel).is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(run_dir) / rel, tmp / rel)
    write_json(tmp / RESULTS, reference)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if log:
        append_log(Path(docs_dir) / recipe / LOG_NAME, reference)
    return out


def log_line(reference: dict[str, Any]) -> str:
    """One Markdown table row of the claims log for a claim-preset run."""
    prov = reference.get("reference") or provenance(reference)
    wall = prov.get("wall_time_s")
    wall_s = f"{wall / 60:.1f} min" if isinstance(wall, int | float) else "—"
    claims = "<br>".join(claim_cell(c, sep=", ") for c in reference.get("claims", []))
    seeds = ", ".join(str(s) for s in prov.get("seeds", []))
    commit = str(prov.get("commit", ""))[:10]
    return f"| {prov.get('date', '')} | {commit} | {prov.get('preset')} | {seeds} | {wall_s} | {claims} |"


def append_log(path: Path, reference: dict[str, Any]) -> None:
    """Append ``reference``'s line to the claims log at ``path`` (created with its header if missing)."""
    text = path.read_text() if path.is_file() else LOG_HEADER
    if not text.endswith("\n"):
        text += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + log_line(reference) + "\n")
