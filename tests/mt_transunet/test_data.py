"""Data of the MT-TransUNet recipe: every split from its own seed (no image in two splits), the on-disk cache,
``normalise``, the masked-fraction cut of the two training streams (moved images lose their masks; the mask-free
stream never shows one) and the guard on the held-out splits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from thrifty.core.splits import AccessLog
from thrifty.methods.mt_transunet import data as mtd
from thrifty.methods.mt_transunet.config import MTTransUNetConfig
from thrifty.methods.mt_transunet.data import SPLITS, MTData, normalise, prepare_data, split_seeds

SIZES = {"masked": 10, "unmasked": 6, "val": 6, "test": 6, "shifted_test": 4}


def small_config(**spec) -> MTTransUNetConfig:
    cfg = MTTransUNetConfig()
    cfg.data.image_size = 16
    syn = cfg.data.synthetic
    syn.masked_images, syn.unmasked_images = SIZES["masked"], SIZES["unmasked"]
    syn.val_images, syn.test_images, syn.shifted_test_images = SIZES["val"], SIZES["test"], SIZES["shifted_test"]
    syn.spec = dict(spec)
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("mt-data")


@pytest.fixture(scope="module")
def prepared(root) -> tuple[MTData, AccessLog]:
    access = AccessLog()
    return prepare_data(small_config(), root, access), access


def raw_of(d: MTData) -> dict[str, np.ndarray]:
    """The raw uint8 images of every split (held-out ones read through the guard, for a test)."""
    return {
        "masked": d.masked.raw,
        "unmasked": d.unmasked.raw,
        "val": d.val.get("selection", "test").raw,
        "test": d.test.get("final_test", "test").raw,
        "shifted_test": d.shifted_test.get("final_test", "test").raw,
    }


# ---------------------------------------------------------------------------------------------- the splits


def test_every_split_has_its_own_seed():
    for seed in (0, 1, 2112):
        seeds = split_seeds(seed)
        assert list(seeds) == list(SPLITS) and len(set(seeds.values())) == len(SPLITS)
    # and no two data seeds share a split seed
    pooled = [s for seed in range(50) for s in split_seeds(seed).values()]
    assert len(set(pooled)) == len(pooled)


def test_no_image_is_in_two_splits(prepared):
    d, _ = prepared
    raw = raw_of(d)
    assert {k: len(v) for k, v in raw.items()} == SIZES
    images = {k: {img.tobytes() for img in v} for k, v in raw.items()}
    for k, v in raw.items():
        assert v.dtype == np.uint8 and v.shape[1:] == (16, 16, 3)
        assert len(images[k]) == len(v), f"{k} repeats an image"
    for a, b in itertools.combinations(SPLITS, 2):
        assert not images[a] & images[b], f"{a} and {b} share an image"


def test_split_contents_and_info(prepared):
    d, _ = prepared
    assert bool(d.masked.has_mask.all()) and d.masked.masks.sum() > 0
    assert set(torch.unique(d.masked.masks).tolist()) == {0, 1}
    # the generator draws masks for the unmasked split too; the recipe hides them
    assert not bool(d.unmasked.has_mask.any()) and int(d.unmasked.masks.abs().sum()) == 0
    for part in (d.masked, d.unmasked):
        assert part.images.shape == (len(part), 3, 16, 16) and part.images.dtype == torch.float32
        torch.testing.assert_close(part.images, normalise(part.raw))
        assert part.labels.dtype == torch.int64 and set(part.labels.tolist()) <= {0, 1, 2}
    info = d.info
    assert info["source"] == "synthetic" and info["classes"] == ["melanoma", "seborrheic_keratosis", "nevus"]
    for name, n in SIZES.items():
        assert info[name]["images"] == n and sum(info[name]["class_counts"]) == n
    assert info["masked"]["with_mask"] == SIZES["masked"] and info["unmasked"]["with_mask"] == 0


# ----------------------------------------------------------------------------------------------- the cache


def test_second_prepare_reads_the_cache(prepared, root, monkeypatch):
    d, _ = prepared
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(folders) == 1 and folders[0].name.startswith("mt_transunet-")
    assert {p.name for p in folders[0].glob("*.npz")} == {f"{s}.npz" for s in SPLITS}
    assert (folders[0] / "settings.json").is_file()

    def refuse(cfg):
        raise AssertionError("the cached images were generated again")

    monkeypatch.setattr(mtd, "_generate", refuse)
    again = prepare_data(small_config(), root, AccessLog())
    for a, b in zip(raw_of(d).values(), raw_of(again).values()):
        np.testing.assert_array_equal(a, b)
    torch.testing.assert_close(again.masked.masks, d.masked.masks)
    assert sorted(p for p in root.iterdir() if p.is_dir()) == folders


def test_a_changed_spec_gets_its_own_folder(prepared, root):
    d, _ = prepared
    before = {p.name for p in root.iterdir() if p.is_dir()}
    other = prepare_data(small_config(contrast=0.5), root, AccessLog())
    after = {p.name for p in root.iterdir() if p.is_dir()}
    assert len(after - before) == 1 and before <= after
    assert not np.array_equal(other.masked.raw, d.masked.raw)
    # the same masks (the spec changes how lesions look, not where they are: same seed, same outline)
    assert (other.masked.labels == d.masked.labels).all()


# --------------------------------------------------------------------------------------------- normalise


def test_normalise_range_shape_and_channel_order():
    img = np.zeros((2, 5, 7, 3), dtype=np.uint8)
    img[0, ..., 0] = 255
    img[1, ..., 2] = 51
    x = normalise(img)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.all(x[0, 0] == 1.0) and torch.all(x[0, 1:] == 0.0)
    assert torch.allclose(x[1, 2], torch.full((5, 7), 0.2)) and torch.all(x[1, :2] == 0.0)
    torch.testing.assert_close(normalise(torch.from_numpy(img)), x)
    full = normalise(np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0


@pytest.mark.parametrize("shape", [(5, 7, 3), (2, 5, 7), (2, 5, 7, 4), (2, 3, 5, 7)])
def test_normalise_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        normalise(np.zeros(shape, dtype=np.uint8))


# ------------------------------------------------------------------------------------- the two streams


@pytest.mark.parametrize("fraction", [1.0, 0.75, 0.5, 0.25, 0.1, 0.01])
def test_streams_keep_round_f_n_masks_and_move_the_rest(prepared, fraction):
    d, _ = prepared
    n, masked_pixels = len(d.masked), int(d.masked.masks.sum())
    keep = max(1, round(fraction * n))
    primary, secondary = d.streams(fraction)
    assert len(primary) == keep and len(secondary) == n - keep + len(d.unmasked)
    assert bool(primary.has_mask.all())
    np.testing.assert_array_equal(primary.raw, d.masked.raw[:keep])
    torch.testing.assert_close(primary.masks, d.masked.masks[:keep])
    # the mask-free stream: the moved masked images first, then the unmasked split; never a mask
    np.testing.assert_array_equal(secondary.raw, np.concatenate([d.masked.raw[keep:], d.unmasked.raw]))
    torch.testing.assert_close(secondary.labels, torch.cat([d.masked.labels[keep:], d.unmasked.labels]))
    assert not bool(secondary.has_mask.any())
    assert int(secondary.masks.abs().sum()) == 0 and secondary.masks.shape == (len(secondary), 16, 16)
    torch.testing.assert_close(secondary.images, normalise(secondary.raw))
    # the cut copies: the source keeps its masks
    assert bool(d.masked.has_mask.all()) and int(d.masked.masks.sum()) == masked_pixels


def test_streams_sizes_follow_the_rounding_rule(prepared):
    d, _ = prepared
    assert [len(d.streams(f)[0]) for f in (0.01, 0.1, 0.15, 0.26, 0.5, 0.94, 1.0)] == [1, 1, 2, 3, 5, 9, 10]


# ---------------------------------------------------------------------------------------- the guard


def test_held_out_splits_refuse_a_disallowed_purpose_and_log_the_allowed_ones(prepared):
    d, access = prepared
    start = len(access.entries)
    for purpose in ("final_test", "training", "test"):
        with pytest.raises(PermissionError, match="val"):
            d.val.get(purpose, "u")
    for guarded in (d.test, d.shifted_test):
        for purpose in ("selection", "calibration", "training"):
            with pytest.raises(PermissionError, match=purpose):
                guarded.get(purpose, "u")
    assert len(access.entries) == start  # a refused read is not logged
    assert len(d.test) == SIZES["test"] and len(access.entries) == start  # the length needs no read
    assert len(d.val.get("selection", "arm/seed0")) == SIZES["val"]
    d.val.get("calibration", "trivial")
    d.test.get("final_test", "arm/seed0")
    d.shifted_test.get("figure", "figures")
    assert [(e["split"], e["purpose"], e["unit"]) for e in access.entries[start:]] == [
        ("val", "selection", "arm/seed0"),
        ("val", "calibration", "trivial"),
        ("test", "final_test", "arm/seed0"),
        ("shifted_test", "figure", "figures"),
    ]
