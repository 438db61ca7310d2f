"""Image scores: calibration on normal images only, the cell z-max's known values, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from thrifty.methods.squid.score import ScoringError, anomaly_score, available_scores, calibrate


def _raw(with_disc: bool) -> dict:
    cells = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.5], [9.0, 2.0]])  # 4 images x 2 cells
    raw = {"recon_error": cells.mean(1), "cell_error": cells}
    if with_disc:
        raw["d_logit"] = np.array([1.0, 3.0, 0.0, -5.0])
    return raw


def test_calibration_uses_normal_images_only_and_cell_zmax_known_values():
    raw, labels = _raw(True), np.array([0, 0, 1, 1])
    calib = calibrate(raw, labels)
    # normals are rows 0, 1: cell means (2, 2), sample std (sqrt 2, 0 -> floored at 1% of the mean), logit mean 2,
    # std sqrt 2
    np.testing.assert_allclose(calib["cell_mu"], [2.0, 2.0])
    assert calib["cell_sigma"][0] == pytest.approx(np.sqrt(2.0)) and calib["cell_sigma"][1] == pytest.approx(0.02)
    assert calib["mu"] == pytest.approx(2.0) and calib["sigma"] == pytest.approx(np.sqrt(2.0))
    z = anomaly_score(
        {**raw, "cell_error": raw["cell_error"][:, :1]},
        {**calib, "cell_mu": [2.0], "cell_sigma": [np.sqrt(2.0)]},
        "cell_zmax",
    )
    np.testing.assert_allclose(z, (np.array([1.0, 3.0, 2.0, 9.0]) - 2.0) / np.sqrt(2.0))
    # the anomalous rows never moved the statistics
    moved = {**raw, "cell_error": raw["cell_error"] * np.array([[1], [1], [100], [100]])}
    assert calibrate(moved, labels)["cell_mu"] == calib["cell_mu"]


def test_discriminator_score_orientation_and_available_scores():
    raw, labels = _raw(True), np.array([0, 0, 1, 1])
    calib = calibrate(raw, labels)
    s = anomaly_score(raw, calib, "discriminator")
    assert np.all((s > 0) & (s < 1)) and np.argmax(s) == 3  # the most fake-looking reconstruction
    np.testing.assert_array_equal(np.argsort(anomaly_score(raw, None, "discriminator")), np.argsort(s))
    assert available_scores(raw) == ["discriminator", "recon", "cell_zmax"]
    assert available_scores(_raw(False)) == ["recon", "cell_zmax"]
    np.testing.assert_array_equal(anomaly_score(raw, None, "recon"), raw["recon_error"])


@pytest.mark.parametrize(
    ("raw", "calib", "kind", "match"),
    [
        (_raw(False), None, "discriminator", "needs a discriminator"),
        (_raw(False), None, "cell_zmax", "calibration"),
        (_raw(False), None, "entropy", "unknown score"),
    ],
)
def test_bad_score_requests_are_clear_errors(raw, calib, kind, match):
    with pytest.raises(ScoringError, match=match):
        anomaly_score(raw, calib, kind)
    with pytest.raises(ScoringError, match="two normal"):
        calibrate(raw, np.array([0, 1, 1, 1]))
