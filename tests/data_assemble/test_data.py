"""Data of the Label-Assemble recipe: per-role batch shares, seeded batches per DDP rank, the synthetic sources'
label protocol (A: the target only, B: every label but the target, C: none, val/test: all), no patient in two
splits, prefix cuts of source A, the cache, and the guard on the test split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from thrifty.core.splits import AccessLog
from thrifty.data import chest_synth
from thrifty.methods.data_assemble import data as da
from thrifty.methods.data_assemble.config import ROLES, DataAssembleConfig
from thrifty.methods.data_assemble.data import (
    GuardedSet,
    LabelledImages,
    draw_batch,
    fixed_role_counts,
    load_synthetic,
    prepare_data,
    role_counts,
)

RATIOS = {"target": 0.25, "assembled": 0.5, "unlabelled": 0.25}


# --------------------------------------------------------------------------------------------- role_counts


@pytest.mark.parametrize("batch", [3, 4, 7, 8, 16, 31, 32, 100])
@pytest.mark.parametrize("roles", [["target"], ["target", "assembled"], list(ROLES)])
def test_role_counts_sum_to_the_batch_and_keep_the_arms_roles(batch, roles):
    counts = role_counts(batch, RATIOS, roles)
    assert sum(counts.values()) == batch
    assert set(counts) == set(roles)
    assert all(c >= 1 for c in counts.values())


def test_role_counts_renormalise_over_the_roles_an_arm_uses():
    # 0.25 : 0.5 over target + assembled is 1/3 : 2/3
    assert role_counts(12, RATIOS, ["target", "assembled"]) == {"target": 4, "assembled": 8}
    assert role_counts(12, RATIOS, ["assembled", "target"]) == {"target": 4, "assembled": 8}
    assert role_counts(12, RATIOS, ["target"]) == {"target": 12}
    assert role_counts(32, RATIOS, list(ROLES)) == {"target": 8, "assembled": 16, "unlabelled": 8}
    # shares need not sum to one
    assert role_counts(10, {"target": 3.0, "assembled": 2.0}, ["target", "assembled"]) == {
        "target": 6,
        "assembled": 4,
    }


def test_role_counts_stay_within_one_of_the_exact_share():
    rng = np.random.default_rng(0)
    for _ in range(200):
        shares = rng.uniform(0.05, 1.0, size=3)
        ratios = dict(zip(ROLES, shares.tolist()))
        batch = int(rng.integers(3, 64))
        counts = role_counts(batch, ratios, list(ROLES))
        exact = {r: batch * ratios[r] / shares.sum() for r in ROLES}
        assert sum(counts.values()) == batch
        for r in ROLES:
            assert counts[r] >= 1
            if exact[r] >= 1:
                assert abs(counts[r] - exact[r]) < 1, (batch, ratios, counts)


def test_every_role_gets_at_least_one_image_even_with_a_tiny_share():
    counts = role_counts(3, {"target": 0.001, "assembled": 1.0, "unlabelled": 1.0}, list(ROLES))
    assert counts == {"target": 1, "assembled": 1, "unlabelled": 1}
    counts = role_counts(10, {"target": 0.001, "assembled": 1.0, "unlabelled": 1.0}, list(ROLES))
    assert counts["target"] == 1 and sum(counts.values()) == 10


def test_role_counts_bad_inputs_raise():
    with pytest.raises(ValueError, match="no batch share"):
        role_counts(8, {"assembled": 1.0}, ["target"])
    with pytest.raises(ValueError, match="no batch share"):
        role_counts(8, RATIOS, [])
    with pytest.raises(ValueError, match="cannot hold one image"):
        role_counts(2, RATIOS, list(ROLES))


def test_fixed_role_counts_keep_the_target_count_of_every_arm_and_split_over_ranks():
    fixed = {"target": 16, "assembled": 16, "unlabelled": 8}
    # roles an arm does not use are dropped, the rest are not renormalised
    assert fixed_role_counts(fixed, ["target"]) == {"target": 16}
    assert fixed_role_counts(fixed, ["assembled", "target"]) == {"target": 16, "assembled": 16}
    assert fixed_role_counts(fixed, list(ROLES)) == fixed
    # all DDP ranks together hold the configured counts
    assert fixed_role_counts(fixed, list(ROLES), world_size=2) == {"target": 8, "assembled": 8, "unlabelled": 4}
    assert fixed_role_counts({"target": 4}, list(ROLES)) == {"target": 4}  # a role without a count is not drawn


def test_fixed_role_counts_bad_inputs_raise():
    with pytest.raises(ValueError, match="no count for the target"):
        fixed_role_counts({"assembled": 8}, list(ROLES))
    with pytest.raises(ValueError, match="split evenly"):
        fixed_role_counts({"target": 16, "assembled": 9}, list(ROLES), world_size=2)


# ---------------------------------------------------------------------------------------------- draw_batch


def _toy_train(n: int = 20, size: int = 8, labels: int = 4) -> dict[str, LabelledImages]:
    """Three sources whose images are constant and unique per row (value encodes role and row), with the
    recipe's label protocol: target gives column 3 only, assembled columns 0-2, unlabelled none."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for k, role in enumerate(ROLES):
        values = (k * n + torch.arange(n, dtype=torch.float32) + 1) / (len(ROLES) * n + 1)
        images = values.view(n, 1, 1, 1).expand(n, 1, size, size).clone()
        y = torch.randint(0, 2, (n, labels), generator=gen).float()
        given = torch.zeros(n, labels, dtype=torch.bool)
        if role == "target":
            given[:, 3] = True
        elif role == "assembled":
            given[:, :3] = True
        ids = np.arange(n) + 1000 * k
        out[role] = LabelledImages(images, y, given, ids)
    return out


def _row_source(train: dict[str, LabelledImages], image: torch.Tensor) -> tuple[str, int]:
    for role, part in train.items():
        hits = torch.nonzero(part.images[:, 0, 0, 0] == image[0, 0, 0]).flatten()
        if len(hits):
            return role, int(hits[0])
    raise AssertionError("a drawn image is in no source")


def _equal(a: da.Batch, b: da.Batch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("images", "labels", "given", "roles"))


def test_draw_batch_is_a_function_of_seed_step_and_rank():
    train = _toy_train()
    counts = {"target": 2, "assembled": 4, "unlabelled": 2}
    a = draw_batch(train, counts, seed=3, step=5, rank=1)
    b = draw_batch(train, counts, seed=3, step=5, rank=1)
    assert _equal(a, b)
    others = [
        draw_batch(train, counts, seed=3, step=5, rank=0),
        draw_batch(train, counts, seed=3, step=6, rank=1),
        draw_batch(train, counts, seed=4, step=5, rank=1),
    ]
    for other in others:
        assert not torch.equal(a.images, other.images)


def test_ranks_draw_different_batches_at_every_step():
    train = _toy_train()
    counts = {"target": 2, "assembled": 4, "unlabelled": 2}
    for step in range(1, 20):
        r0 = draw_batch(train, counts, seed=0, step=step, rank=0)
        r1 = draw_batch(train, counts, seed=0, step=step, rank=1)
        assert not torch.equal(r0.images, r1.images), step
        assert torch.equal(r0.roles, r1.roles)  # the same composition on every rank


def test_draw_batch_honours_the_counts_per_role_and_carries_each_sources_labels_and_masks():
    train = _toy_train()
    counts = {"target": 3, "assembled": 4, "unlabelled": 1}
    batch = draw_batch(train, counts, seed=1, step=2)
    assert batch.images.shape == (8, 1, 8, 8) and batch.labels.shape == (8, 4) and batch.given.shape == (8, 4)
    assert batch.given.dtype == torch.bool
    for role, n in counts.items():
        assert int((batch.roles == ROLES.index(role)).sum()) == n
    for i in range(len(batch.roles)):
        role, row = _row_source(train, batch.images[i])
        assert ROLES[int(batch.roles[i])] == role
        assert torch.equal(batch.labels[i], train[role].labels[row])
        assert torch.equal(batch.given[i], train[role].given[row])
    # the target rows give the target column only, the unlabelled rows nothing
    assert batch.given[batch.roles == ROLES.index("target")].sum(0).tolist() == [0, 0, 0, 3]
    assert not batch.given[batch.roles == ROLES.index("unlabelled")].any()


def test_roles_without_a_count_are_not_drawn():
    train = _toy_train()
    batch = draw_batch(train, {"target": 8}, seed=0, step=1)
    assert (batch.roles == ROLES.index("target")).all()
    batch = draw_batch(train, {"target": 2, "assembled": 6, "unlabelled": 0}, seed=0, step=1)
    assert set(batch.roles.tolist()) == {ROLES.index("target"), ROLES.index("assembled")}
    # a role the arm does not use may be absent from the training sources altogether
    only_a = {"target": train["target"]}
    assert len(draw_batch(only_a, {"target": 4}, seed=0, step=1).roles) == 4


def test_draw_batch_samples_over_the_whole_source():
    train = _toy_train(n=10)
    seen = set()
    for step in range(1, 40):
        batch = draw_batch(train, {"target": 4}, seed=0, step=step)
        seen |= {_row_source(train, img)[1] for img in batch.images}
    assert seen == set(range(10))


def test_given_override_reveals_every_label_of_the_overridden_roles_only():
    train = _toy_train()
    counts = {"target": 3, "assembled": 3, "unlabelled": 2}
    override = {r: torch.ones_like(train[r].given) for r in ("target", "assembled")}
    plain = draw_batch(train, counts, seed=2, step=7)
    oracle = draw_batch(train, counts, seed=2, step=7, given_override=override)
    # same images and labels; only the masks change
    assert torch.equal(plain.images, oracle.images) and torch.equal(plain.labels, oracle.labels)
    labelled = oracle.roles != ROLES.index("unlabelled")
    assert oracle.given[labelled].all()
    assert not oracle.given[~labelled].any()
    assert not plain.given[labelled].all()


# ------------------------------------------------------------------------------------------ synthetic data

SMALL = {
    "target_images": 16,
    "target_positives": 4,
    "assembled_images": 24,
    "unlabelled_images": 16,
    "val_images": 40,
    "test_images": 40,
}


def small_config(**synthetic) -> DataAssembleConfig:
    cfg = DataAssembleConfig()
    cfg.data.image_size = 32
    for key, value in {**SMALL, **synthetic}.items():
        setattr(cfg.data.synthetic, key, value)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def small_data(data_dir):
    access = AccessLog()
    return prepare_data(small_config(), data_dir, access), access


def _read(data: da.AssembleData) -> tuple[LabelledImages, LabelledImages]:
    return data.val.get("selection", "test-suite"), data.test.get("final_test", "test-suite")


def test_source_a_gives_only_the_target_with_the_exact_number_of_positives(small_data):
    data, _ = small_data
    t = data.target_index
    assert data.label_names == list(chest_synth.FINDINGS)
    assert data.label_names[t] == chest_synth.TARGET
    a = data.train["target"]
    assert len(a) == SMALL["target_images"]
    assert int(a.labels[:, t].sum()) == SMALL["target_positives"]
    assert a.given[:, t].all()
    assert not a.given[:, [j for j in range(len(data.label_names)) if j != t]].any()
    assert a.images.shape == (SMALL["target_images"], 1, 32, 32) and a.images.dtype == torch.float32
    assert float(a.images.min()) >= 0.0 and float(a.images.max()) <= 1.0


def test_source_b_gives_every_label_but_the_target_and_c_gives_none(small_data):
    data, _ = small_data
    t = data.target_index
    b, c = data.train["assembled"], data.train["unlabelled"]
    assert (len(b), len(c)) == (SMALL["assembled_images"], SMALL["unlabelled_images"])
    others = [j for j in range(len(data.label_names)) if j != t]
    assert b.given[:, others].all() and not b.given[:, t].any()
    assert not c.given.any()
    assert data.oracle_available


def test_source_b_comes_from_another_scanner(data_dir):
    """Domain B is brighter and flatter than domain A (its gamma < 1, contrast 0.85, brightness +0.05) as
    generated; the default per-image intensity window removes most of that linear shift."""

    def scanner_gap(window: list[float]) -> tuple[float, float]:
        cfg = small_config(assembled_images=64, unlabelled_images=64)
        cfg.data.intensity_window = window
        data = prepare_data(cfg, data_dir, AccessLog())
        a, b = data.train["unlabelled"].images.flatten(1), data.train["assembled"].images.flatten(1)  # C: A
        return float(b.mean() - a.mean()), float(b.std(1).mean() - a.std(1).mean())

    raw_mean, raw_std = scanner_gap([])
    assert raw_mean > 0.03 and raw_std < -0.01
    win_mean, win_std = scanner_gap([1.0, 99.0])
    assert abs(win_mean) < abs(raw_mean) / 2 and abs(win_std) < abs(raw_std) / 2


def test_window_intensity_splits_large_batches_without_changing_the_result(monkeypatch):
    x = torch.rand(7, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    whole = da.window_intensity(x, [1.0, 99.0])
    monkeypatch.setattr(da, "_QUANTILE_MAX_ELEMENTS", 300)  # two images per torch.quantile call
    torch.testing.assert_close(da.window_intensity(x, [1.0, 99.0]), whole, atol=0, rtol=0)


def test_window_intensity_matches_monai_and_maps_each_images_percentiles_to_0_and_1():
    from monai.transforms import ScaleIntensityRangePercentiles

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, generator=gen) ** 2 * torch.linspace(0.3, 1.0, 6).view(6, 1, 1, 1)
    out = da.window_intensity(x, [2.0, 97.0])
    ref = ScaleIntensityRangePercentiles(lower=2.0, upper=97.0, b_min=0.0, b_max=1.0, clip=True)
    expected = torch.stack([torch.as_tensor(ref(img)).as_subclass(torch.Tensor) for img in x])
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=0)
    # a linear change of contrast and brightness leaves the windowed image unchanged
    torch.testing.assert_close(da.window_intensity(0.6 * x + 0.2, [2.0, 97.0]), out, atol=1e-5, rtol=0)
    assert da.window_intensity(x, []) is x
    flat = da.window_intensity(torch.full((2, 1, 4, 4), 0.7), [1.0, 99.0])
    assert torch.equal(flat, torch.zeros_like(flat))
    assert da.window_intensity(torch.zeros(0, 1, 4, 4), [1.0, 99.0]).shape == (0, 1, 4, 4)
    for bad in ([99.0, 1.0], [1.0], [-1.0, 50.0], [1.0, 101.0]):
        with pytest.raises(ValueError, match="percentiles"):
            da.window_intensity(x, bad)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        da.window_intensity(x[0], [1.0, 99.0])


def test_validation_and_test_give_every_label(small_data):
    data, _ = small_data
    val, test = _read(data)
    assert (len(val), len(test)) == (SMALL["val_images"], SMALL["test_images"])
    assert val.given.all() and test.given.all()
    # validation keeps each finding's region (for figures); a region only where the finding is present
    assert val.masks is not None and val.masks.shape == (SMALL["val_images"], 7, 32, 32)
    present = val.masks.reshape(len(val), 7, -1).any(-1)
    assert not present[val.labels.numpy() == 0].any()


def test_no_patient_appears_in_two_splits_or_roles(small_data):
    data, _ = small_data
    val, test = _read(data)
    parts = {**data.train, "val": val, "test": test}
    pool_pos, pool_neg = data.target_pool
    parts["pool"] = LabelledImages(pool_pos.images, pool_pos.labels, pool_pos.given, np.concatenate([
        pool_pos.ids, pool_neg.ids]))  # fmt: skip
    for name, part in parts.items():
        assert len(set(part.ids.tolist())) == len(part.ids), f"{name} repeats a patient"
    for (n1, p1), (n2, p2) in itertools.combinations(parts.items(), 2):
        if {n1, n2} == {"target", "pool"}:
            continue  # source A is cut from the pool
        shared = set(p1.ids.tolist()) & set(p2.ids.tolist())
        assert not shared, f"{n1} and {n2} share patients {sorted(shared)[:5]}"
    assert set(data.train["target"].ids.tolist()) <= set(parts["pool"].ids.tolist())


def test_no_image_appears_in_two_splits(small_data):
    """Beyond the ids: no pixel-identical image is shared between training, validation and test."""
    data, _ = small_data
    val, test = _read(data)
    keys = {}
    for name, part in {**data.train, "val": val, "test": test}.items():
        keys[name] = {part.images[i].numpy().tobytes() for i in range(len(part))}
    for n1, n2 in itertools.combinations(keys, 2):
        assert not keys[n1] & keys[n2], (n1, n2)


def test_target_subset_returns_prefixes_with_the_asked_share_of_positives(small_data):
    data, _ = small_data
    t = data.target_index
    small, large = data.target_subset(8, 0.25), data.target_subset(16, 0.25)
    assert len(small) == 8 and len(large) == 16
    assert int(small.labels[:, t].sum()) == 2 and int(large.labels[:, t].sum()) == 4
    assert set(small.ids.tolist()) <= set(large.ids.tolist())
    for cut in (small, large):
        assert cut.given[:, t].all() and int(cut.given.sum()) == len(cut)
    # the main source A is the cut at the configured count and share
    assert data.train["target"].ids.tolist() == large.ids.tolist()
    with pytest.raises(ValueError, match="positives"):
        data.target_subset(17, 0.25)


def test_sweep_counts_grow_the_pool_and_keep_the_main_source(data_dir):
    cfg = small_config()
    cfg.sweep.target_images = [8, 24]
    data = prepare_data(cfg, data_dir, AccessLog())
    t = data.target_index
    assert len(data.train["target"]) == 16
    big = data.target_subset(24, 0.25)
    assert len(big) == 24 and int(big.labels[:, t].sum()) == 6
    assert set(data.target_subset(8, 0.25).ids.tolist()) <= set(data.train["target"].ids.tolist())
    assert set(data.train["target"].ids.tolist()) <= set(big.ids.tolist())


def test_real_data_has_no_target_pool():
    empty = LabelledImages(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool),
                           np.zeros(0, dtype=np.int64))  # fmt: skip
    data = da.AssembleData(["x"], 0, {"target": empty}, GuardedSet("val", empty, AccessLog()),
                           GuardedSet("test", empty, AccessLog()), [], False, {})  # fmt: skip
    with pytest.raises(ValueError, match="synthetic"):
        data.target_subset(4, 0.25)


def test_the_cache_is_reused_and_a_changed_setting_gets_its_own(tmp_path, monkeypatch):
    cfg = small_config()
    first = prepare_data(cfg, tmp_path, AccessLog())
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert len(dirs) == 1 and dirs[0].startswith("data_assemble-")
    assert (tmp_path / dirs[0] / "settings.json").is_file()

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached sources were generated again")

    monkeypatch.setattr(chest_synth, "generate", no_generation)
    again = prepare_data(small_config(), tmp_path, AccessLog())
    for role in ROLES:
        assert torch.equal(first.train[role].images, again.train[role].images)
        assert torch.equal(first.train[role].labels, again.train[role].labels)
        assert np.array_equal(first.train[role].ids, again.train[role].ids)
    v1, t1 = _read(first)
    v2, t2 = _read(again)
    assert torch.equal(v1.images, v2.images) and torch.equal(t1.images, t2.images)
    assert torch.equal(t1.labels, t2.labels) and np.array_equal(v1.masks, v2.masks)

    # settings that do not shape the data share the cache
    other = small_config()
    other.max_steps, other.arms = 7, ["naive"]
    prepare_data(other, tmp_path, AccessLog())
    assert len(list(tmp_path.iterdir())) == 1

    # a changed data setting is another cache directory (generated, so generation must work again)
    monkeypatch.undo()
    for changed in (small_config(test_images=41), small_config(seed=7)):
        assert da._cache_dir(changed, tmp_path) != da._cache_dir(cfg, tmp_path)
    resized = small_config()
    resized.data.image_size = 16
    assert da._cache_dir(resized, tmp_path) != da._cache_dir(cfg, tmp_path)
    prepare_data(small_config(test_images=41), tmp_path, AccessLog())
    assert len(list(tmp_path.iterdir())) == 2


def test_a_half_written_cache_is_regenerated(tmp_path):
    cfg = small_config()
    splits = load_synthetic(cfg, tmp_path)
    (da._cache_dir(cfg, tmp_path) / "test.npz").unlink()
    again = load_synthetic(cfg, tmp_path)
    assert np.array_equal(splits["test"].images, again["test"].images)
    assert (da._cache_dir(cfg, tmp_path) / "test.npz").is_file()


def test_a_different_data_seed_gives_other_patients(data_dir):
    a = prepare_data(small_config(), data_dir, AccessLog())
    b = prepare_data(small_config(seed=7), data_dir, AccessLog())
    assert not set(a.train["assembled"].ids.tolist()) & set(b.train["assembled"].ids.tolist())
    assert not torch.equal(a.train["assembled"].images, b.train["assembled"].images)


def test_narrowed_labels_keep_their_order_and_the_target(data_dir):
    cfg = small_config()
    cfg.data.labels = ["ground_glass", "nodule", "effusion"]
    cfg.validate()
    data = prepare_data(cfg, data_dir, AccessLog())
    assert data.label_names == ["ground_glass", "nodule", "effusion"] and data.target_index == 0
    full = prepare_data(small_config(), data_dir, AccessLog())
    cols = [chest_synth.FINDINGS.index(n) for n in cfg.data.labels]
    assert torch.equal(data.train["assembled"].labels, full.train["assembled"].labels[:, cols])
    assert data.train["assembled"].given[:, 1:].all() and not data.train["assembled"].given[:, 0].any()


def test_minority_classes_are_those_below_five_percent(small_data, data_dir):
    data, _ = small_data
    expected = [n for n, p in chest_synth.DEFAULT_PREVALENCE.items() if p < 0.05]
    assert expected and data.minority == expected
    cfg = small_config()
    cfg.data.synthetic.prevalence = {"nodule": 0.02}
    assert "nodule" in prepare_data(cfg, data_dir, AccessLog()).minority


# ----------------------------------------------------------------------------------------------- guarding


def test_guarded_test_split_refuses_selection_and_calibration(small_data):
    data, access = small_data
    before = list(access.entries)
    for purpose in ("selection", "calibration", "threshold"):
        with pytest.raises(PermissionError, match="test split may not be used"):
            data.test.get(purpose, "u")
    with pytest.raises(PermissionError, match="val split may not be used"):
        data.val.get("final_test", "u")
    assert access.entries == before  # refused reads are not logged as reads
    data.test.get("final_test", "u")
    assert access.entries[-1]["split"] == "test" and access.entries[-1]["purpose"] == "final_test"
    assert access.entries[-1]["unit"] == "u"


def test_guarded_set_logs_every_read_to_its_file(tmp_path):
    part = _toy_train()["target"]
    access = AccessLog(tmp_path / "access_log.jsonl")
    val, test = GuardedSet("val", part, access), GuardedSet("test", part, access)
    assert val.get("selection", "a/seed0") is part
    test.get("figure", "figures")
    lines = (tmp_path / "access_log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"test"' in lines[1] and '"figure"' in lines[1]
    assert len(val) == len(part)


def test_the_assembled_source_holds_no_target_by_default_and_its_prevalence_is_a_knob(data_dir):
    # the paper's setting: the assembled NIH ChestX-ray14 predates COVID-19, so it holds only negative examples
    data = prepare_data(small_config(assembled_images=200), data_dir, AccessLog())
    t = data.target_index
    b = data.train["assembled"]
    assert float(b.labels[:, t].sum()) == 0.0 and not b.given[:, t].any()
    data = prepare_data(small_config(assembled_images=200, assembled_target_prevalence=1.0), data_dir, AccessLog())
    assert float(data.train["assembled"].labels[:, t].sum()) == 200.0
    with pytest.raises(ValueError, match="assembled_target_prevalence"):
        small_config(assembled_target_prevalence=1.5)
