"""Per-arm tables for ``results.json`` (rendered by :mod:`thrifty.core.report`): one row per arm, one column per
statistic over the arm's per-seed unit results.

A column is ``(header, cell)`` where ``cell(units) -> value`` reads the arm's list of unit result dicts;
:func:`mean_of` and :func:`first_of` build the common cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Cell = Callable[[list[dict[str, Any]]], Any]


def mean_of(key: str, digits: int = 1) -> Cell:
    """The mean of ``unit[key]`` over the units that have it, rounded; ``""`` when none has it."""

    def cell(units: list[dict[str, Any]]) -> Any:
        values = [u[key] for u in units if key in u]
        return round(float(np.mean(values)), digits) if values else ""

    return cell


def first_of(*keys: str) -> Cell:
    """The first unit's value of the first of ``keys`` it has (e.g. a parameter count, the same for every seed)."""

    def cell(units: list[dict[str, Any]]) -> Any:
        return next((units[0][k] for k in keys if units and k in units[0]), "")

    return cell


def per_arm_table(
    results: dict[str, dict[int, dict[str, Any]]], *, title: str, columns: Sequence[tuple[str, Cell]]
) -> dict[str, Any]:
    """``{"title", "columns", "rows"}`` with one row per arm of ``results[arm][seed]`` (the arm name first)."""
    rows = [[arm, *[cell(list(per.values())) for _, cell in columns]] for arm, per in results.items()]
    return {"title": title, "columns": ["arm", *[h for h, _ in columns]], "rows": rows}


#: the usual cost columns of an image recipe's units
IMAGE_COST_COLUMNS: tuple[tuple[str, Cell], ...] = (
    ("train s", mean_of("train_seconds")),
    ("train img/s", mean_of("train_images_per_s")),
    ("infer img/s", mean_of("infer_images_per_s")),
)
