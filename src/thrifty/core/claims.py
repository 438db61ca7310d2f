"""Claims: the paper's statement, our measurement over seeds, a 95% interval and a computed verdict.

A claim compares a measured quantity with a threshold in a stated direction. For a comparison
("A beats B") the measured quantity is the mean *paired* difference A−B over seeds (same seed, same
data for both arms) and the interval is Student's t over those differences. ``holds`` is computed:
the whole interval must lie on the claimed side of the threshold. With few seeds that is strict on
purpose; add seeds rather than loosen it. Nothing here lets a caller set ``holds`` by hand.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats

Direction = Literal["less", "greater"]
Kind = Literal["value", "paired", "works", "statistic"]


def mean_ci95(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """Mean and two-sided 95% Student-t interval; a single value gives an infinite interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return mean, (-math.inf, math.inf)
    half = float(stats.t.ppf(0.975, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, (mean - half, mean + half)


def format_mean_ci(values: Sequence[float], *, digits: int = 1) -> str:
    """``"mean [lo, hi]"`` with the 95% t-interval (only the mean for one value; empty for none), for tables."""
    if len(values) == 0:
        return ""
    m, (lo, hi) = mean_ci95(values)
    if not math.isfinite(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of ``results.json``'s claims table.

    Attributes:
        id: short stable identifier (``moe_beats_dense_active``).
        statement: the claim in words, including the metric and split.
        paper_value: what the paper reports (number or words), shown beside ours.
        measured: mean over seeds (of the paired difference for comparisons).
        ci95: Student-t 95% interval of ``measured``.
        direction: ``less`` or ``greater``: the side of ``threshold`` the claim asserts.
        threshold: the value the interval is compared with (0 for paired differences).
        baseline: what was compared against (arm name or value), for the report.
        values: per-seed values (differences for comparisons).
        seeds: the seeds, aligned with ``values``.
        preset: the budget it was measured at.
        unit: unit of ``measured`` (``nats``, ``AUROC points`` ...).
        kind: ``value`` (one quantity against a threshold), ``paired`` (arm A − arm B, paired by seed),
            ``works`` (the method against a trivial baseline on the same test data, by a margin) or ``statistic``
            (one statistic over units that are not seeds, e.g. Kendall τ over architectures, with a bootstrap
            interval: ``values`` are the units' inputs, and only the verdict can be recomputed from the interval).
        holds: computed, never given.
    """

    id: str
    statement: str
    paper_value: Any
    measured: float
    ci95: tuple[float, float]
    direction: Direction
    threshold: float
    baseline: str
    values: tuple[float, ...]
    seeds: tuple[int, ...]
    preset: str
    unit: str = ""
    note: str = ""
    kind: Kind = "value"

    @property
    def holds(self) -> bool:
        return interval_holds(self.ci95, self.direction, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ci95"] = [_finite(v) for v in self.ci95]
        d["values"] = list(self.values)
        d["seeds"] = list(self.seeds)
        d["n_seeds"] = len(self.seeds)
        d["holds"] = self.holds
        return d


def interval_holds(ci95: Sequence[float | None], direction: str, threshold: float) -> bool:
    """The verdict rule: the whole interval lies strictly on the claimed side of ``threshold``.

    An undefined deciding bound (``None``/infinite, one seed) never holds."""
    lo, hi = (math.nan if v is None else float(v) for v in ci95)
    if direction == "less":
        return bool(math.isfinite(hi) and hi < threshold)
    return bool(math.isfinite(lo) and lo > threshold)


def recompute(record: dict[str, Any]) -> dict[str, Any]:
    """Recompute ``measured``, ``ci95`` and ``holds`` of a stored claim from its per-seed ``values``.

    Used to check a committed reference: a stored verdict must follow from the stored numbers.

    Raises:
        ValueError: the record lacks a field a verdict needs, or its values and seeds do not align.
    """
    missing = [k for k in ("id", "values", "seeds", "direction", "threshold") if k not in record]
    if missing:
        raise ValueError(f"claim {record.get('id', '?')!r} lacks {', '.join(missing)}")
    _check_direction(record["direction"])
    if len(record["values"]) != len(record["seeds"]):
        raise ValueError(f"claim {record['id']!r}: values and seeds do not align")
    if record.get("kind") == "statistic":  # a bootstrap interval: the verdict must follow from it
        ci = tuple(math.nan if v is None else float(v) for v in record["ci95"])
        measured = math.nan if record.get("measured") is None else float(record["measured"])
    elif not record["values"]:  # nothing was measured (e.g. no candidate qualified): never holds
        measured, ci = math.nan, (math.nan, math.nan)
    else:
        measured, ci = mean_ci95(record["values"])
    return {"measured": measured, "ci95": ci, "holds": interval_holds(ci, record["direction"], record["threshold"])}


def _finite(v: float) -> float | None:
    return None if not math.isfinite(v) else v


def _check_direction(direction: str) -> None:
    if direction not in ("less", "greater"):
        raise ValueError(f"direction must be 'less' or 'greater', not {direction!r}")


def value_claim(
    *,
    id: str,
    statement: str,
    values: Sequence[float],
    seeds: Sequence[int],
    direction: Direction,
    threshold: float,
    paper_value: Any,
    preset: str,
    baseline: str = "",
    unit: str = "",
    note: str = "",
) -> Claim:
    """A claim about one quantity (e.g. "drop rate below 1%") over seeds."""
    _check_direction(direction)
    if len(values) != len(seeds):
        raise ValueError("values and seeds must align")
    mean, ci = mean_ci95(values)
    return Claim(
        id=id,
        statement=statement,
        paper_value=paper_value,
        measured=mean,
        ci95=ci,
        direction=direction,
        threshold=threshold,
        baseline=baseline or f"{threshold:g}",
        values=tuple(float(v) for v in values),
        seeds=tuple(int(s) for s in seeds),
        preset=preset,
        unit=unit,
        note=note,
        kind="value",
    )


TRIVIAL_PAPER_VALUE = "not reported (the claim protocol's trivial baseline)"


def works_claim(
    *,
    id: str,
    statement: str,
    method: dict[int, float],
    baseline_value: float | dict[int, float],
    margin: float,
    direction: Direction,
    preset: str,
    paper_value: Any = TRIVIAL_PAPER_VALUE,
    baseline: str,
    unit: str = "",
    note: str = "",
) -> Claim:
    """ "The method works": it beats a trivial baseline measured on the same test data by at least ``margin``.

    ``measured`` is the mean over seeds of ``method − baseline`` (the baseline may be one training-free
    number or a per-seed value); ``direction="less"`` claims the method is lower by more than
    ``margin`` (threshold ``−margin``), ``greater`` that it is higher by more than ``margin``.

    Args:
        method: the method's per-seed metric, keyed by seed.
        baseline_value: the trivial baseline's metric on the same data (a number, or per seed).
        margin: the stated margin, >= 0, in the metric's unit.
        paper_value: papers rarely report a trivial baseline; the default says so.
    """
    _check_direction(direction)
    if not margin >= 0:
        raise ValueError(f"claim {id!r}: margin must be >= 0, not {margin}")
    seeds = sorted(method)
    if not seeds:
        raise ValueError(f"claim {id!r}: no seed has both a method and a baseline value")
    if isinstance(baseline_value, dict):
        missing = [s for s in seeds if s not in baseline_value]
        if missing:
            raise ValueError(f"claim {id!r}: no baseline value for seed(s) {missing}")
        base = {s: float(baseline_value[s]) for s in seeds}
    else:
        base = dict.fromkeys(seeds, float(baseline_value))
    return _difference_claim(
        seeds,
        [method[s] - base[s] for s in seeds],
        kind="works",
        threshold=-margin if direction == "less" else margin,
        id=id,
        statement=statement,
        direction=direction,
        paper_value=paper_value,
        preset=preset,
        baseline=baseline,
        unit=unit,
        note=note,
    )


def _difference_claim(seeds: list[int], diffs: list[float], *, kind: Kind, threshold: float, **fields: Any) -> Claim:
    """A claim on per-seed differences (``paired`` or ``works``): their mean and Student-t interval."""
    mean, ci = mean_ci95(diffs)
    return Claim(
        measured=mean, ci95=ci, threshold=threshold, values=tuple(diffs), seeds=tuple(seeds), kind=kind, **fields
    )


def paired_claim(
    *,
    id: str,
    statement: str,
    a: dict[int, float],
    b: dict[int, float],
    direction: Direction,
    paper_value: Any,
    preset: str,
    baseline: str,
    unit: str = "",
    note: str = "",
) -> Claim:
    """A comparison over seeds: ``measured`` is mean(A−B) over seeds present in both ``a`` and ``b``.

    Args:
        a, b: per-seed metric of the two arms, keyed by seed.
        direction: ``less`` claims A < B (the difference is negative), ``greater`` claims A > B.
    """
    _check_direction(direction)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"claim {id!r}: the two arms share no seed")
    return _difference_claim(
        seeds,
        [a[s] - b[s] for s in seeds],
        kind="paired",
        threshold=0.0,
        id=id,
        statement=statement,
        direction=direction,
        paper_value=paper_value,
        preset=preset,
        baseline=baseline,
        unit=unit,
        note=note,
    )
