"""The on-disk cache of generated data: settings digests, build-once-then-load, atomic writes, rebuilds when a
split is missing, and a clear error when a builder forgets a split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from thrifty.core.cache import cache_dir, cached_splits, settings_digest

NAMES = ("train", "val", "test")
SETTINGS = {"size": 16, "frames": 8, "spec": {"speed": [0.5, 1.0], "wrap": True}, "version": 1}


def make_arrays(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        n: {
            "videos": rng.integers(0, 256, size=(3 + i, 2, 4, 4, 3), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=3 + i).astype(np.int64),
        }
        for i, n in enumerate(NAMES)
    }


class CountingBuilder:
    """A builder that returns fixed arrays and counts its calls."""

    def __init__(self, arrays: dict[str, dict[str, np.ndarray]]) -> None:
        self.arrays, self.calls = arrays, 0

    def __call__(self) -> dict[str, dict[str, np.ndarray]]:
        self.calls += 1
        return self.arrays


def assert_same(got: dict[str, dict[str, np.ndarray]], want: dict[str, dict[str, np.ndarray]]) -> None:
    assert set(got) == set(want)
    for n in want:
        assert set(got[n]) == set(want[n]), n
        for k in want[n]:
            assert got[n][k].dtype == want[n][k].dtype, (n, k)
            np.testing.assert_array_equal(got[n][k], want[n][k])


# ------------------------------------------------------------------------------------------------- digests


def test_settings_digest_ignores_key_order_at_every_level():
    shuffled = {"version": 1, "spec": {"wrap": True, "speed": [0.5, 1.0]}, "frames": 8, "size": 16}
    assert settings_digest(shuffled) == settings_digest(SETTINGS)
    assert cache_dir("/r", "tg", shuffled) == cache_dir("/r", "tg", SETTINGS)


@pytest.mark.parametrize(
    "changed",
    [
        {**SETTINGS, "size": 32},
        {**SETTINGS, "version": 2},
        {**SETTINGS, "spec": {"speed": [0.5, 1.5], "wrap": True}},
        {**SETTINGS, "spec": {"speed": [0.5, 1.0], "wrap": False}},
        {**SETTINGS, "extra": 0},
    ],
)
def test_settings_digest_changes_with_any_value(changed):
    assert settings_digest(changed) != settings_digest(SETTINGS)
    assert cache_dir("/r", "tg", changed) != cache_dir("/r", "tg", SETTINGS)


def test_digest_is_hex_of_the_requested_length_and_names_the_folder(tmp_path):
    d = settings_digest(SETTINGS)
    assert len(d) == 16 and int(d, 16) >= 0
    assert len(settings_digest(SETTINGS, length=8)) == 8 and d.startswith(settings_digest(SETTINGS, length=8))
    assert cache_dir(tmp_path, "motion", SETTINGS) == tmp_path / f"motion-{d}"


# -------------------------------------------------------------------------------------------- cached_splits


def test_builds_once_then_loads_equal_arrays(tmp_path):
    arrays = make_arrays()
    build = CountingBuilder(arrays)
    d = tmp_path / "cache"
    first = cached_splits(d, NAMES, build, settings=SETTINGS)
    assert build.calls == 1
    assert_same(first, arrays)
    assert sorted(p.name for p in d.iterdir()) == ["settings.json", "test.npz", "train.npz", "val.npz"]

    second = cached_splits(d, NAMES, build, settings=SETTINGS)
    assert build.calls == 1, "the cached splits were built again"
    assert_same(second, arrays)
    # loaded arrays are real arrays, not views into a closed file
    assert all(isinstance(v, np.ndarray) for split in second.values() for v in split.values())


def test_settings_json_is_written_beside_the_splits(tmp_path):
    cached_splits(tmp_path, NAMES, CountingBuilder(make_arrays()), settings=SETTINGS)
    assert json.loads((tmp_path / "settings.json").read_text()) == SETTINGS


def test_no_temporary_file_is_left_behind(tmp_path):
    cached_splits(tmp_path, NAMES, CountingBuilder(make_arrays()), settings=SETTINGS)
    leftovers = [p.name for p in tmp_path.rglob("*") if "tmp" in p.name or p.name.startswith(".")]
    assert leftovers == []


def test_a_missing_split_rebuilds_every_split(tmp_path):
    build = CountingBuilder(make_arrays(0))
    cached_splits(tmp_path, NAMES, build, settings=SETTINGS)
    (tmp_path / "val.npz").unlink()
    build.arrays = make_arrays(1)  # what a rebuild produces now
    got = cached_splits(tmp_path, NAMES, build, settings=SETTINGS)
    assert build.calls == 2
    assert_same(got, make_arrays(1))
    # and the rebuilt files are what the next call loads
    assert_same(cached_splits(tmp_path, NAMES, build, settings=SETTINGS), make_arrays(1))
    assert build.calls == 2


def test_only_the_requested_names_are_returned_and_written(tmp_path):
    got = cached_splits(tmp_path, ("train", "test"), CountingBuilder(make_arrays()), settings=SETTINGS)
    assert set(got) == {"train", "test"}
    assert not (tmp_path / "val.npz").exists()


def test_a_builder_that_omits_a_split_is_a_value_error(tmp_path):
    partial = {k: v for k, v in make_arrays().items() if k != "test"}
    with pytest.raises(ValueError, match="test"):
        cached_splits(tmp_path / "c", NAMES, lambda: partial, settings=SETTINGS, what="motion videos")
    assert not any((tmp_path / "c" / f"{n}.npz").exists() for n in NAMES)


def test_concurrent_builders_of_the_same_data_do_not_collide(tmp_path: Path) -> None:
    # two processes (here threads) that miss the cache at once both build and write; neither may fail
    import threading

    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def build() -> dict[str, dict[str, np.ndarray]]:
        barrier.wait(timeout=10)  # both have missed the cache before either writes
        return {"train": {"x": np.arange(1000)}, "val": {"x": np.arange(5)}}

    def worker() -> None:
        try:
            out = cached_splits(tmp_path / "c", ["train", "val"], build, settings={"a": 1})
            assert np.array_equal(out["train"]["x"], np.arange(1000))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["settings.json", "train.npz", "val.npz"]
