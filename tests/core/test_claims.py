"""Claims: Student-t intervals, paired differences over shared seeds and a computed, strict verdict."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
from scipy import stats

from thrifty.core.claims import Claim, interval_holds, mean_ci95, paired_claim, recompute, value_claim

# Student t 0.975 quantile with 2 degrees of freedom in closed form: for df=2 the CDF is
# 1/2 + t / (2 sqrt(2 + t^2)), so t / sqrt(2 + t^2) = 0.95 and t^2 = 2 * 0.95^2 / (1 - 0.95^2).
T975_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # 4.30265272974946...


def _claim(**kw) -> Claim:
    base = dict(
        id="c",
        statement="s",
        paper_value=1.0,
        measured=0.0,
        ci95=(-1.0, 1.0),
        direction="less",
        threshold=0.0,
        baseline="b",
        values=(0.0,),
        seeds=(0,),
        preset="smoke",
    )
    base.update(kw)
    return Claim(**base)


def _paired(a, b, direction="less"):
    return paired_claim(
        id="p",
        statement="A beats B",
        a=a,
        b=b,
        direction=direction,
        paper_value="yes",
        preset="smoke",
        baseline="B",
        unit="nats",
    )


# --------------------------------------------------------------------------- mean_ci95


def test_t_quantile_constant_matches_scipy():
    assert stats.t.ppf(0.975, df=2) == pytest.approx(T975_DF2, rel=1e-12)
    assert pytest.approx(4.3026527299, rel=1e-10) == T975_DF2  # the printed table value


def test_mean_ci95_three_values_by_hand():
    # mean 2, sample sd 1, half width = t(0.975, 2) * 1 / sqrt(3)
    mean, (lo, hi) = mean_ci95([1.0, 2.0, 3.0])
    half = T975_DF2 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert lo == pytest.approx(2.0 - half, rel=1e-12)
    assert hi == pytest.approx(2.0 + half, rel=1e-12)


def test_mean_ci95_four_values_against_formula():
    xs = [0.5, 1.5, 2.0, 4.0]
    m = statistics.fmean(xs)
    s = statistics.stdev(xs)  # n-1 denominator
    half = stats.t.ppf(0.975, df=3) * s / math.sqrt(4)
    mean, (lo, hi) = mean_ci95(xs)
    assert mean == pytest.approx(2.0)
    assert m == pytest.approx(2.0)
    assert lo == pytest.approx(m - half, rel=1e-12)
    assert hi == pytest.approx(m + half, rel=1e-12)


def test_mean_ci95_symmetric_and_zero_width_for_constant_values():
    mean, (lo, hi) = mean_ci95([0.7, 0.7, 0.7])
    assert mean == pytest.approx(0.7)
    assert lo == pytest.approx(0.7)
    assert hi == pytest.approx(0.7)


def test_mean_ci95_single_value_is_infinite():
    mean, (lo, hi) = mean_ci95([3.5])
    assert mean == 3.5
    assert lo == -math.inf
    assert hi == math.inf


def test_mean_ci95_empty_raises():
    with pytest.raises(ValueError):
        mean_ci95([])


# --------------------------------------------------------------------------- value_claim


def test_single_value_claim_never_holds_either_direction():
    for direction, value in (("less", -100.0), ("greater", 100.0)):
        c = value_claim(
            id="v",
            statement="s",
            values=[value],
            seeds=[0],
            direction=direction,
            threshold=0.0,
            paper_value=0.0,
            preset="smoke",
        )
        assert c.ci95 == (-math.inf, math.inf)
        assert c.holds is False


def test_value_claim_fields_and_verdict():
    # values 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half = 4.3027 * 0.1 / sqrt(3) = 0.2484 -> [-0.048, 0.448]
    c = value_claim(
        id="drop",
        statement="drop rate below 1",
        values=[0.1, 0.2, 0.3],
        seeds=[5, 6, 7],
        direction="less",
        threshold=1.0,
        paper_value="<1%",
        preset="quick",
        unit="%",
    )
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert c.measured == pytest.approx(0.2)
    assert c.ci95[0] == pytest.approx(0.2 - half)
    assert c.ci95[1] == pytest.approx(0.2 + half)
    assert c.holds is True  # 0.448 < 1
    assert c.seeds == (5, 6, 7)
    assert c.values == (0.1, 0.2, 0.3)
    assert c.baseline == "1"  # default baseline is the threshold
    # the interval reaches below zero, so "greater than 0" does not hold
    g = dataclasses.replace(c, direction="greater", threshold=0.0)
    assert g.holds is False


def test_value_claim_misaligned_seeds_raise():
    with pytest.raises(ValueError):
        value_claim(
            id="v",
            statement="s",
            values=[1.0, 2.0],
            seeds=[0],
            direction="less",
            threshold=0.0,
            paper_value=0,
            preset="smoke",
        )


@pytest.mark.parametrize("direction", ["lower", "LESS", "", "<"])
def test_bad_direction_raises(direction):
    with pytest.raises(ValueError, match="direction"):
        value_claim(
            id="v",
            statement="s",
            values=[1.0, 2.0],
            seeds=[0, 1],
            direction=direction,
            threshold=0.0,
            paper_value=0,
            preset="smoke",
        )
    with pytest.raises(ValueError, match="direction"):
        _paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0}, direction=direction)


# --------------------------------------------------------------------------- paired_claim


def test_paired_claim_uses_only_shared_seeds():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 100.0}
    b = {0: 1.5, 1: 2.0, 2: 4.0, 9: -50.0}
    c = _paired(a, b)
    # shared seeds 0, 1, 2; differences -0.5, 0.0, -1.0; mean -0.5; sd 0.5
    assert c.seeds == (0, 1, 2)
    assert c.values == pytest.approx((-0.5, 0.0, -1.0))
    assert c.measured == pytest.approx(-0.5)
    half = T975_DF2 * 0.5 / math.sqrt(3)
    assert c.ci95[0] == pytest.approx(-0.5 - half)
    assert c.ci95[1] == pytest.approx(-0.5 + half)
    assert c.threshold == 0.0
    assert c.holds is False  # interval [-1.74, 0.74] straddles 0


def test_paired_claim_measured_is_mean_of_differences():
    a = {1: 10.0, 2: 11.0, 3: 13.0}
    b = {3: 12.9, 2: 12.0, 1: 10.0}
    c = _paired(a, b)
    assert c.seeds == (1, 2, 3)
    assert c.measured == pytest.approx(statistics.fmean([0.0, -1.0, 0.1]))


def test_paired_less_holds_when_whole_interval_below_zero():
    # diffs -1.0, -1.1, -0.9: mean -1, sd 0.1, half 0.248 -> [-1.248, -0.752]
    a = {0: 1.0, 1: 0.9, 2: 1.1}
    b = {0: 2.0, 1: 2.0, 2: 2.0}
    less = _paired(a, b, "less")
    greater = _paired(a, b, "greater")
    assert less.measured == pytest.approx(-1.0)
    assert less.ci95[1] == pytest.approx(-1.0 + T975_DF2 * 0.1 / math.sqrt(3))
    assert less.holds is True
    assert greater.holds is False


def test_paired_greater_holds_when_whole_interval_above_zero():
    a = {0: 2.0, 1: 2.0, 2: 2.0}
    b = {0: 1.0, 1: 0.9, 2: 1.1}
    assert _paired(a, b, "greater").holds is True
    assert _paired(a, b, "less").holds is False


def test_paired_claim_with_one_shared_seed_never_holds():
    c = _paired({0: 0.0, 1: -5.0}, {1: 5.0, 2: 0.0}, "less")
    assert c.seeds == (1,)
    assert c.measured == -10.0
    assert c.holds is False


def test_paired_claim_without_shared_seed_raises():
    with pytest.raises(ValueError, match="share no seed"):
        _paired({0: 1.0}, {1: 1.0})


# --------------------------------------------------------------------------- verdict boundary


def test_interval_touching_threshold_does_not_hold():
    assert _claim(ci95=(-1.0, 0.0), direction="less", threshold=0.0).holds is False
    assert _claim(ci95=(0.0, 1.0), direction="greater", threshold=0.0).holds is False
    assert _claim(ci95=(-1.0, -1e-12), direction="less", threshold=0.0).holds is True
    assert _claim(ci95=(1e-12, 1.0), direction="greater", threshold=0.0).holds is True
    assert _claim(ci95=(2.0, 3.0), direction="less", threshold=3.0).holds is False
    assert _claim(ci95=(2.0, 3.0), direction="greater", threshold=2.0).holds is False


def test_value_claim_with_threshold_at_interval_edge_does_not_hold():
    values = [0.1, 0.2, 0.4]
    _, (lo, hi) = mean_ci95(values)
    common = dict(id="v", statement="s", values=values, seeds=[0, 1, 2], paper_value=0, preset="smoke")
    assert value_claim(direction="less", threshold=hi, **common).holds is False
    assert value_claim(direction="greater", threshold=lo, **common).holds is False
    assert value_claim(direction="less", threshold=hi + 1e-9, **common).holds is True
    assert value_claim(direction="greater", threshold=lo - 1e-9, **common).holds is True


def test_nan_measurement_never_holds():
    for direction in ("less", "greater"):
        c = value_claim(
            id="v",
            statement="s",
            values=[float("nan"), 1.0, 2.0],
            seeds=[0, 1, 2],
            direction=direction,
            threshold=0.0,
            paper_value=0,
            preset="smoke",
        )
        assert c.holds is False


# --------------------------------------------------------------------------- serialisation and immutability


def test_to_dict_has_holds_and_json_safe_ci():
    c = _paired({0: 1.0, 1: 0.9, 2: 1.1}, {0: 2.0, 1: 2.0, 2: 2.0})
    d = c.to_dict()
    assert d["holds"] is True
    assert isinstance(d["ci95"], list)
    assert d["ci95"] == pytest.approx(list(c.ci95))
    assert d["values"] == pytest.approx([-1.0, -1.1, -0.9])
    assert d["seeds"] == [0, 1, 2]
    assert d["direction"] == "less"
    assert d["unit"] == "nats"
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["holds"] is True


def test_to_dict_infinite_ci_becomes_none():
    c = value_claim(
        id="v",
        statement="s",
        values=[1.0],
        seeds=[0],
        direction="greater",
        threshold=0.0,
        paper_value=0,
        preset="smoke",
    )
    d = c.to_dict()
    assert d["ci95"] == [None, None]
    assert d["holds"] is False
    text = json.dumps(d, allow_nan=False)  # no Infinity tokens
    assert "Infinity" not in text


def test_holds_cannot_be_passed_or_set():
    with pytest.raises(TypeError):
        _claim(holds=True)
    with pytest.raises(TypeError):
        value_claim(
            id="v",
            statement="s",
            values=[1.0, 2.0],
            seeds=[0, 1],
            direction="less",
            threshold=0.0,
            paper_value=0,
            preset="smoke",
            holds=True,
        )
    with pytest.raises(TypeError):
        paired_claim(
            id="p",
            statement="s",
            a={0: 1.0},
            b={0: 2.0},
            direction="less",
            paper_value=0,
            preset="smoke",
            baseline="b",
            holds=True,
        )
    c = _claim()
    with pytest.raises(AttributeError):
        c.holds = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        dataclasses.replace(c, holds=True)
    assert "holds" not in {f.name for f in dataclasses.fields(Claim)}


def test_round_trip_through_to_dict_cannot_smuggle_holds():
    d = _claim(ci95=(-1.0, 1.0)).to_dict()
    assert d["holds"] is False
    d["holds"] = True
    with pytest.raises(TypeError):
        Claim(**d)


def test_claim_is_frozen():
    c = _claim()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ci95 = (-2.0, -1.0)  # type: ignore[misc]


def test_format_mean_ci_known_values():
    from thrifty.core.claims import format_mean_ci

    assert format_mean_ci([]) == ""
    assert format_mean_ci([2.0]) == "2.0"
    # mean 2, s.d. 1, n = 3: half-width t(0.975, 2) · 1 / √3 = 4.303 / 1.732 = 2.484
    assert format_mean_ci([1.0, 2.0, 3.0]) == "2.0 [-0.5, 4.5]"
    assert format_mean_ci([1.0, 2.0, 3.0], digits=2) == "2.00 [-0.48, 4.48]"


# --------------------------------------------------------------------------- works_claim


def _works(method, baseline_value, *, margin, direction="less"):
    from thrifty.core.claims import works_claim

    return works_claim(
        id="w",
        statement="the method beats the trivial baseline by the margin",
        method=method,
        baseline_value=baseline_value,
        margin=margin,
        direction=direction,
        paper_value="works",
        preset="cpu",
        baseline="bigram",
        unit="nats",
    )


# method - baseline: -0.3, -0.35, -0.25 (mean -0.3, sample sd 0.05);
# half width t(0.975, 2) * 0.05 / sqrt(3) = 4.3027 * 0.05 / 1.7321 = 0.12421 -> [-0.42421, -0.17579]
_LOSS = {0: 2.7, 1: 2.65, 2: 2.75}
_HALF = T975_DF2 * 0.05 / math.sqrt(3)


def test_works_claim_measured_is_mean_difference_and_threshold_is_minus_margin():
    c = _works(_LOSS, 3.0, margin=0.1)
    assert c.kind == "works"
    assert c.seeds == (0, 1, 2)
    assert c.values == pytest.approx((-0.3, -0.35, -0.25))
    assert c.measured == pytest.approx(-0.3)
    assert c.ci95[0] == pytest.approx(-0.3 - _HALF)
    assert c.ci95[1] == pytest.approx(-0.3 + _HALF)
    assert c.threshold == pytest.approx(-0.1)
    assert c.direction == "less"
    assert c.baseline == "bigram"


def test_works_claim_holds_against_small_margin_but_not_large():
    # upper bound -0.1758: below -0.1, not below -0.2 or -0.5
    assert _works(_LOSS, 3.0, margin=0.1).holds is True
    assert _works(_LOSS, 3.0, margin=0.2).holds is False
    assert _works(_LOSS, 3.0, margin=0.5).holds is False
    assert _works(_LOSS, 3.0, margin=0.0).holds is True
    # the same numbers do not show the method higher than the baseline
    assert _works(_LOSS, 3.0, margin=0.0, direction="greater").holds is False


def test_works_claim_greater_threshold_is_plus_margin():
    # AUROC 0.9, 0.85, 0.95 against 0.5: diffs 0.4, 0.35, 0.45 -> [0.27579, 0.52421]
    auroc = {3: 0.9, 4: 0.85, 5: 0.95}
    c = _works(auroc, 0.5, margin=0.25, direction="greater")
    assert c.threshold == pytest.approx(0.25)
    assert c.measured == pytest.approx(0.4)
    assert c.ci95[0] == pytest.approx(0.4 - _HALF)
    assert c.holds is True  # 0.2758 > 0.25
    assert _works(auroc, 0.5, margin=0.3, direction="greater").holds is False  # 0.2758 < 0.3


def test_works_claim_per_seed_baseline_pairs_by_seed():
    method = {2: 3.0, 0: 1.0, 1: 2.0}
    base = {0: 1.5, 1: 2.25, 2: 3.5, 7: 0.0}  # a baseline seed the method lacks is ignored
    c = _works(method, base, margin=0.1)
    assert c.seeds == (0, 1, 2)
    assert c.values == pytest.approx((-0.5, -0.25, -0.5))
    assert c.measured == pytest.approx(-1.25 / 3)
    # sd of (-0.5, -0.25, -0.5): deviations -1/12, 1/6, -1/12 -> var (1/144 + 4/144 + 1/144) / 2 = 1/48
    half = T975_DF2 * math.sqrt(1 / 48) / math.sqrt(3)
    assert c.ci95[1] == pytest.approx(-1.25 / 3 + half)


def test_works_claim_per_seed_baseline_missing_a_method_seed_raises():
    """A method seed without a baseline value is an error, never silently dropped from the interval."""
    with pytest.raises(ValueError, match=r"no baseline value for seed\(s\) \[5\]"):
        _works({0: 1.0, 5: 2.0}, {0: 1.0, 1: 1.0}, margin=0.1)
    with pytest.raises(ValueError, match="no baseline value"):
        _works({0: 1.0}, {1: 1.0}, margin=0.1)


@pytest.mark.parametrize("margin", [-0.1, -1e-9, float("nan")])
def test_works_claim_negative_or_nan_margin_raises(margin):
    with pytest.raises(ValueError, match="margin"):
        _works(_LOSS, 3.0, margin=margin)


def test_works_claim_bad_direction_raises():
    with pytest.raises(ValueError, match="direction"):
        _works(_LOSS, 3.0, margin=0.1, direction="lower")


def test_works_claim_to_dict_has_kind_and_n_seeds():
    d = _works(_LOSS, 3.0, margin=0.1).to_dict()
    assert d["kind"] == "works"
    assert d["n_seeds"] == 3
    assert d["holds"] is True
    assert d["threshold"] == pytest.approx(-0.1)
    json.dumps(d, allow_nan=False)


def test_n_seeds_and_kind_of_other_claims():
    p = _paired({0: 1.0, 1: 0.9, 2: 1.1, 3: 1.0}, {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0}).to_dict()
    assert p["kind"] == "paired"
    assert p["n_seeds"] == 4
    v = value_claim(
        id="v", statement="s", values=[1.0], seeds=[9], direction="less", threshold=0.0, paper_value=0, preset="smoke"
    ).to_dict()
    assert v["kind"] == "value"
    assert v["n_seeds"] == 1


# --------------------------------------------------------------------------- recompute and interval_holds


@pytest.mark.parametrize(
    "claim",
    [
        _works(_LOSS, 3.0, margin=0.1),
        _works(_LOSS, 3.0, margin=0.5),
        _paired({0: 1.0, 1: 0.9, 2: 1.1}, {0: 2.0, 1: 2.0, 2: 2.0}),
        value_claim(
            id="one", statement="s", values=[0.5], seeds=[0], direction="less", threshold=1.0, paper_value=0, preset="q"
        ),
    ],
    ids=["works-holds", "works-fails", "paired", "one-seed"],
)
def test_recompute_reproduces_stored_numbers(claim):
    d = json.loads(json.dumps(claim.to_dict()))  # as stored in results.json
    again = recompute(d)
    assert again["measured"] == pytest.approx(d["measured"])
    assert again["holds"] == d["holds"]
    for stored, computed in zip(d["ci95"], again["ci95"]):
        if stored is None:
            assert not math.isfinite(computed)
        else:
            assert computed == pytest.approx(stored)


def test_recompute_uses_stored_values_not_stored_verdict():
    d = _works(_LOSS, 3.0, margin=0.1).to_dict()
    d["holds"] = False
    d["measured"] = 99.0
    again = recompute(d)
    assert again["holds"] is True
    assert again["measured"] == pytest.approx(-0.3)
    # a stricter stored threshold changes the recomputed verdict
    d["threshold"] = -0.5
    assert recompute(d)["holds"] is False


def test_recompute_misaligned_values_and_seeds_raise():
    d = _works(_LOSS, 3.0, margin=0.1).to_dict()
    d["seeds"] = d["seeds"][:2]
    with pytest.raises(ValueError, match="align"):
        recompute(d)


@pytest.mark.parametrize("field", ["values", "seeds", "direction", "threshold"])
def test_recompute_missing_field_raises_naming_it(field):
    d = _works(_LOSS, 3.0, margin=0.1).to_dict()
    del d[field]
    with pytest.raises(ValueError, match=field):
        recompute(d)


def test_recompute_bad_direction_raises():
    d = _works(_LOSS, 3.0, margin=0.1).to_dict()
    d["direction"] = "below"
    with pytest.raises(ValueError, match="direction"):
        recompute(d)


@pytest.mark.parametrize("direction", ["less", "greater"])
def test_interval_holds_with_undefined_bounds_never_holds(direction):
    for threshold in (-1e9, 0.0, 1e9):
        assert interval_holds([None, None], direction, threshold) is False
        assert interval_holds((-math.inf, math.inf), direction, threshold) is False
        assert interval_holds((math.nan, math.nan), direction, threshold) is False
    # the bound that decides the verdict is undefined
    assert interval_holds([-5.0, None], "less", 1e9) is False
    assert interval_holds([None, 5.0], "greater", -1e9) is False


def test_interval_holds_strict_rule():
    assert interval_holds([-2.0, -1.0], "less", -0.5) is True
    assert interval_holds([-2.0, -1.0], "less", -1.0) is False
    assert interval_holds([1.0, 2.0], "greater", 0.5) is True
    assert interval_holds([1.0, 2.0], "greater", 1.0) is False


def test_a_bootstrap_statistic_has_its_verdict_recomputed_from_its_interval():
    """A ``statistic`` claim (Kendall τ over architectures, bootstrap interval) is not a mean over seeds: its
    measured value and interval stand as stored, and the verdict must follow from the interval."""
    rec = Claim(id="tau", statement="", paper_value="", measured=0.59, ci95=(0.15, 0.88), direction="greater",
                threshold=0.0, baseline="τ = 0", values=(0.13, 0.14, 0.12), seeds=(0, 1, 2), preset="cpu",
                kind="statistic").to_dict()  # fmt: skip
    again = recompute(rec)
    assert again["measured"] == 0.59 and again["ci95"] == (0.15, 0.88) and again["holds"] is True
    rec["ci95"] = [-0.1, 0.88]
    assert recompute(rec)["holds"] is False  # a stored holds=True would now be flagged by the reference check
