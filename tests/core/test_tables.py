"""Per-arm tables: one row per arm, cells computed over the arm's per-seed unit results."""

from __future__ import annotations

from thrifty.core.tables import IMAGE_COST_COLUMNS, first_of, mean_of, per_arm_table


def test_per_arm_table_means_and_first_values():
    results = {
        "a": {
            0: {"train_seconds": 10.0, "params": 5, "infer_images_per_s": 3.0},
            1: {"train_seconds": 20.04, "params": 5},
        },
        "b": {0: {"train_seconds": 1.0, "bank_size": 7}},
    }
    table = per_arm_table(results, title="t", columns=[("s", mean_of("train_seconds")), ("inf", mean_of(
        "infer_images_per_s")), ("p", first_of("params", "bank_size"))])  # fmt: skip
    assert table["title"] == "t" and table["columns"] == ["arm", "s", "inf", "p"]
    assert table["rows"] == [["a", 15.0, 3.0, 5], ["b", 1.0, "", 7]]  # the mean over units that have the key


def test_image_cost_columns_name_the_usual_statistics():
    assert [h for h, _ in IMAGE_COST_COLUMNS] == ["train s", "train img/s", "infer img/s"]
    assert mean_of("x", digits=2)([{"x": 1.234}, {"x": 2.0}]) == 1.62
    assert first_of("missing")([{"x": 1}]) == "" and first_of("x")([]) == ""
