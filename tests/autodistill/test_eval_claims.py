"""The evaluation stage's choices and claims on synthetic records: which searched student is compared with a
baseline, the dominance claims (accuracy paired over seeds, latency per interleaved round) and "it works"."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest

from thrifty.methods.autodistill.config import AutodistillConfig
from thrifty.methods.autodistill.train import dominance_claims, pick_faster, works

BASELINE = "mobilebert_like"


def _cfg(**eval_kw) -> AutodistillConfig:
    cfg = AutodistillConfig(preset="unit")
    cfg.eval = dataclasses.replace(cfg.eval, **eval_kw)
    return cfg


def _session(ratios: dict[str, float], blocks: dict[str, list[float]] | None = None) -> dict:
    blocks = blocks or {}
    return {
        "models": {n: {"ratio_median": r, "block_medians_ms": blocks.get(n, [1.0])} for n, r in ratios.items()},
        "batch": 1,
        "seq_len": 32,
        "threads": 1,
        "cores": [0],
    }


def _student(val_acc: float, tests: dict[int, float] | None = None, label: str = "L2") -> dict:
    return {"val_acc": val_acc, "label": label, "per_seed": {s: {"test_acc": a} for s, a in (tests or {}).items()}}


# --- pick_faster -------------------------------------------------------------------------------------------------


def test_pick_faster_takes_the_most_accurate_front_student_faster_than_the_baseline() -> None:
    students = {
        "front-1": _student(0.30),  # faster, less accurate
        "front-2": _student(0.35),  # faster, most accurate front student faster than the baseline
        "front-3": _student(0.50),  # most accurate, but slower than the baseline
        BASELINE: _student(0.40),
        "distilbert_like": _student(0.60),  # faster and most accurate, but not a searched student
    }
    session = _session({"front-1": 0.6, "front-2": 0.9, "front-3": 1.2, BASELINE: 1.0, "distilbert_like": 0.5})
    assert pick_faster(students, session, BASELINE) == "front-2"
    # against the slower DistilBERT-like baseline only front-1 is faster still
    session_d = _session({"front-1": 0.6, "front-2": 0.9, "front-3": 1.2, BASELINE: 1.0, "distilbert_like": 0.8})
    assert pick_faster(students, session_d, "distilbert_like") == "front-1"


def test_pick_faster_is_none_when_no_front_student_is_faster() -> None:
    students = {"front-1": _student(0.5), "front-2": _student(0.6), BASELINE: _student(0.3),
                "distilbert_like": _student(0.2)}  # fmt: skip
    session = _session({"front-1": 1.1, "front-2": 1.0, BASELINE: 1.0, "distilbert_like": 0.4})
    assert pick_faster(students, session, BASELINE) is None  # equal ratio is not faster


# --- dominance claims --------------------------------------------------------------------------------------------


def _dominance_inputs():
    base_acc = {0: 0.300, 1: 0.320, 2: 0.310}
    diffs = {0: 0.019, 1: 0.021, 2: 0.020}
    students = {
        "front-1": _student(0.4, {s: base_acc[s] + diffs[s] for s in base_acc}, label="L2 d32"),
        BASELINE: _student(0.3, base_acc, label="MobileBERT-like"),
    }
    base_blocks = [10.0, 12.0, 11.0, 10.5]
    pick_blocks = [8.0, 9.0, 10.0, 7.0]
    session = _session({"front-1": 0.8, BASELINE: 1.0}, {"front-1": pick_blocks, BASELINE: base_blocks})
    return students, session, base_blocks, pick_blocks


def test_dominance_claims_when_the_student_beats_the_baseline() -> None:
    students, session, base_blocks, pick_blocks = _dominance_inputs()
    acc, lat = dominance_claims(_cfg(), BASELINE, "front-1", students, session)
    assert BASELINE in acc.id and BASELINE in lat.id
    # accuracy in points, paired over seeds: +1.9, +2.1, +2.0
    assert acc.measured == pytest.approx(2.0, abs=1e-9)
    assert sorted(acc.values) == pytest.approx([1.9, 2.0, 2.1])
    assert acc.ci95[0] > 0 and acc.holds
    # latency: per-round ratio of block medians, baseline over student
    assert lat.values[0] == pytest.approx(10.0 / 8.0)
    assert lat.values[3] == pytest.approx(10.5 / 7.0)
    assert len(lat.values) == 4
    assert lat.measured == pytest.approx(statistics.mean(b / p for b, p in zip(base_blocks, pick_blocks)))
    assert lat.threshold == 1.0 and lat.holds
    assert acc.preset == lat.preset == "unit"


def test_dominance_claims_do_not_hold_for_a_worse_slower_student() -> None:
    students, session, base_blocks, _ = _dominance_inputs()
    students["front-1"], students[BASELINE] = students[BASELINE], students["front-1"]  # swap accuracies
    session["models"]["front-1"]["block_medians_ms"] = [b * 1.2 for b in base_blocks]  # slower every round
    acc, lat = dominance_claims(_cfg(), BASELINE, "front-1", students, session)
    assert acc.measured == pytest.approx(-2.0, abs=1e-9)
    assert not acc.holds
    assert lat.measured == pytest.approx(1 / 1.2)
    assert not lat.holds


def test_dominance_claims_without_a_faster_student_are_nan_and_do_not_hold() -> None:
    students, session, _, _ = _dominance_inputs()
    claims = dominance_claims(_cfg(), BASELINE, None, students, session)
    assert len(claims) == 2
    for claim in claims:
        assert math.isnan(claim.measured)
        assert not claim.holds
        assert claim.to_dict()["holds"] is False


# --- works -------------------------------------------------------------------------------------------------------


def _works_students() -> dict:
    return {
        # best validation accuracy: chosen, although another student has the better test accuracy
        "front-1": _student(0.50, {0: 0.40, 1: 0.42, 2: 0.41}),
        "front-2": _student(0.45, {0: 0.60, 1: 0.61, 2: 0.62}),
        BASELINE: _student(0.30, {0: 0.30, 1: 0.31, 2: 0.32}),
    }


INFO = {"unigram_test_acc": 0.25, "unigram_token": "the", "teacher_test_acc": 0.7}


def test_works_chooses_on_validation_and_measures_against_the_unigram_guess() -> None:
    claim = works(_cfg(works_margin=5.0), _works_students(), INFO)
    expected = statistics.mean([40.0, 42.0, 41.0]) - 25.0  # front-1's test points minus the unigram guess
    assert claim.measured == pytest.approx(expected)
    assert sorted(claim.values) == pytest.approx([15.0, 16.0, 17.0])
    assert claim.threshold == pytest.approx(5.0)
    assert claim.holds  # 16 ± a tight interval is well above the 5-point margin
    assert "front-1" in claim.note


def test_works_does_not_hold_with_a_margin_above_the_gap() -> None:
    claim = works(_cfg(works_margin=20.0), _works_students(), INFO)
    assert claim.measured == pytest.approx(16.0)
    assert not claim.holds
