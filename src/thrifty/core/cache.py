"""Generated data cached on disk: one folder per settings digest, one ``.npz`` per split, written atomically.

A recipe that generates its data (a procedural generator, a decoded dataset) describes what the data depends on
as a JSON-able ``settings`` dict; :func:`cache_dir` names the folder by its digest, so a changed setting gets its
own folder and an unchanged one is reused. :func:`cached_splits` loads every split when all are present and
otherwise builds them once, writing each through a temporary file so a killed run never leaves a half-written
split behind (a missing split makes the whole set regenerate).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def settings_digest(settings: Mapping[str, Any], length: int = 16) -> str:
    """Hex digest of ``settings`` (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def cache_dir(root: str | Path, prefix: str, settings: Mapping[str, Any]) -> Path:
    """``root / f"{prefix}-{digest}"``: where data generated with ``settings`` lives."""
    return Path(root) / f"{prefix}-{settings_digest(settings)}"


def cached_splits(
    directory: str | Path,
    names: Sequence[str],
    build: Callable[[], Mapping[str, Arrays]],
    *,
    settings: Mapping[str, Any],
    what: str = "data",
) -> dict[str, Arrays]:
    """Every split of ``names`` as a dict of arrays: read from ``directory/<name>.npz`` when all exist, else built
    with ``build()`` (which must return each name), written (compressed, atomically) and returned.
    ``settings`` is written beside them as ``settings.json`` for people who look."""
    d = Path(directory)
    if all((d / f"{n}.npz").is_file() for n in names):
        out = {}
        for n in names:
            with np.load(d / f"{n}.npz", allow_pickle=False) as z:
                out[n] = {k: z[k] for k in z.files}
        return out
    log.info("generating the %s once (cached in %s)", what, d)
    splits = build()
    missing = [n for n in names if n not in splits]
    if missing:
        raise ValueError(f"the {what} builder returned no split(s) {missing}")
    d.mkdir(parents=True, exist_ok=True)
    for n in names:  # a private temporary name: processes building the same data at once do not collide
        with tempfile.NamedTemporaryFile(dir=d, prefix=f".{n}.", suffix=".tmp.npz", delete=False) as f:
            np.savez_compressed(f, **splits[n])
        Path(f.name).replace(d / f"{n}.npz")
    (d / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
    return {n: dict(splits[n]) for n in names}
