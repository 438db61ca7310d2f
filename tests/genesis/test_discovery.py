"""Semantic Genesis / TransVW self-discovery of visual words on the CT phantom: auto-encoder training and embeddings,
the discovery constraints (distinct references, members ranked by embedding distance, spaced coordinates, the
release's dense-score filter on the reference's cube, validation members from the validation set, clear errors),
the instance crops (count C × K, or 3 · C × K with the release's multi-resolution crops, labels, ranges, seeding)
and visual-word purity."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from thrifty.data.ct_phantom import LABELS, LUNG, generate_cohort
from thrifty.data.volumes import clip_and_normalize
from thrifty.methods.genesis.data import dense_score
from thrifty.methods.genesis.discovery import (
    VisualWord,
    VolumeAutoencoder,
    crop_instances,
    discover_visual_words,
    patient_embeddings,
    placement_corners,
    prepare_volumes,
    train_autoencoder,
    word_purity,
)

AE_SIZE = (24, 32, 32)
CUBE = (8, 16, 16)
MAX_DENSE = 0.5  # the miniature's data.max_dense_fraction: no phantom cube is as lung-rich as the release's 0.15
N_TRAIN, N_VAL = 12, 4
STEPS = 20


@pytest.fixture(scope="module")
def cohort() -> dict:
    patients = generate_cohort(N_TRAIN + N_VAL, seed=3, with_nodules=False)
    train, val = patients[:N_TRAIN], patients[N_TRAIN:]
    hu = lambda ps: np.stack([p.volume for p in ps])
    return {
        "hu_train": hu(train),
        "norm_train": clip_and_normalize(hu(train)),
        "norm_val": clip_and_normalize(hu(val)),
        "ae_train": prepare_volumes(hu(train), size=AE_SIZE),
        "ae_val": prepare_volumes(hu(val), size=AE_SIZE),
        "lung_train": np.stack([p.lung_mask for p in train]),
        "labels_train": np.stack([p.labels for p in train]),
        "labels_val": np.stack([p.labels for p in val]),
    }


@pytest.fixture(scope="module")
def trained(cohort: dict) -> dict:
    logged: list[tuple[int, float]] = []
    model, losses = train_autoencoder(
        cohort["ae_train"], steps=STEPS, batch_size=4, lr=3e-3, seed=0, log=lambda s, v: logged.append((s, v))
    )
    return {
        "model": model,
        "losses": losses,
        "logged": logged,
        "emb_train": patient_embeddings(model, cohort["ae_train"]),
        "emb_val": patient_embeddings(model, cohort["ae_val"]),
    }


@pytest.fixture(scope="module")
def words(cohort: dict, trained: dict) -> list[VisualWord]:
    return discover_visual_words(
        embeddings_train=trained["emb_train"],
        volumes_train=cohort["norm_train"],
        num_classes=6,
        top_k_train=5,
        cube_size=CUBE,
        coordinate_min_distance=5,
        max_dense_fraction=MAX_DENSE,
        margin=(2, 4, 4),
        embeddings_val=trained["emb_val"],
        top_k_val=3,
        seed=1,
    )


# ------------------------------------------------------------------------------------------------- auto-encoder


def test_prepare_volumes_range_and_shape(cohort: dict):
    x = cohort["ae_train"]
    assert x.shape == (N_TRAIN, 1, *AE_SIZE) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_autoencoder_shapes_and_size_check():
    ae = VolumeAutoencoder(widths=(4, 8, 16))
    x = torch.rand(2, 1, *AE_SIZE)
    with torch.no_grad():
        y = ae(x)
    assert y.shape == x.shape and float(y.min()) > 0 and float(y.max()) < 1
    assert ae.encode(x).shape == (2, 16, 3, 4, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        ae(torch.rand(1, 1, 20, 32, 32))


def test_autoencoder_loss_decreases_and_is_logged(trained: dict):
    losses = trained["losses"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert [s for s, _ in trained["logged"]] == list(range(STEPS))
    assert [v for _, v in trained["logged"]] == losses
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert losses[-1] < losses[0]


def test_embeddings_shape_and_determinism(cohort: dict, trained: dict):
    emb = trained["emb_train"]
    assert emb.shape == (N_TRAIN, trained["model"].embedding_dim)
    assert torch.isfinite(emb).all()
    assert emb.std(dim=0).sum() > 0  # patients differ
    torch.testing.assert_close(patient_embeddings(trained["model"], cohort["ae_train"]), emb, rtol=0, atol=0)
    # a fixed seed gives the same training run
    x = cohort["ae_train"][:4]
    runs = [train_autoencoder(x, steps=4, batch_size=2, seed=11) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    torch.testing.assert_close(patient_embeddings(runs[0][0], x), patient_embeddings(runs[1][0], x), rtol=0, atol=0)
    other = train_autoencoder(x, steps=4, batch_size=2, seed=12)
    assert other[1] != runs[0][1]
    # the global RNG is not consumed by training
    state = torch.get_rng_state()
    train_autoencoder(cohort["ae_train"][:2], steps=1, batch_size=2, seed=5)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------------------------ discovery


def test_one_spaced_coordinate_per_class_with_distinct_references(words: list[VisualWord]):
    assert [w.class_id for w in words] == list(range(6))
    coords = [w.coordinate for w in words]
    for a, b in itertools.combinations(coords, 2):
        assert math.dist(a, b) >= 5
    refs = [w.reference for w in words]
    assert len(set(refs)) == len(refs) and all(0 <= r < N_TRAIN for r in refs)


def test_members_start_with_reference_and_are_sorted(words: list[VisualWord], trained: dict):
    emb = trained["emb_train"]
    for w in words:
        assert len(w.members) == 5 and len(set(w.members)) == 5
        assert w.members[0] == w.reference and w.distances[0] == 0.0
        d = torch.linalg.vector_norm(emb - emb[w.reference], dim=1)
        assert list(w.distances) == sorted(w.distances)
        np.testing.assert_allclose(w.distances, d[list(w.members)].numpy(), rtol=1e-6)
        # nobody outside the top-K is closer than the K-th member
        outside = [i for i in range(N_TRAIN) if i not in w.members]
        assert float(d[outside].min()) >= w.distances[-1]


def test_dense_score_condition_holds_in_reference(words: list[VisualWord], cohort: dict):
    lo, hi = placement_corners(cohort["norm_train"].shape[1:], CUBE, margin=(2, 4, 4))
    for w in words:
        z, y, x = (c - s // 2 for c, s in zip(w.coordinate, CUBE))
        # the corner lies in the release's range: margin, lookahead slices and its extra voxel inside the volume
        assert all(a <= c <= b for a, c, b in zip(lo, (z, y, x), hi))
        window = cohort["norm_train"][w.reference, z : z + CUBE[0] + 2, y : y + CUBE[1], x : x + CUBE[2]]
        assert dense_score(window) <= MAX_DENSE


def test_validation_members_come_from_validation_set(words: list[VisualWord], trained: dict):
    emb, emb_val = trained["emb_train"], trained["emb_val"]
    for w in words:
        assert len(w.members_val) == 3 and all(0 <= i < N_VAL for i in w.members_val)
        d = torch.linalg.vector_norm(emb_val - emb[w.reference], dim=1)
        assert list(w.members_val) == torch.sort(d, stable=True).indices[:3].tolist()
        assert w.indices("val") == w.members_val and w.indices("train") == w.members


def test_discovery_is_seeded(words: list[VisualWord], cohort: dict, trained: dict):
    kw = dict(
        embeddings_train=trained["emb_train"],
        volumes_train=cohort["norm_train"],
        num_classes=6,
        top_k_train=5,
        cube_size=CUBE,
        max_dense_fraction=MAX_DENSE,
        margin=(2, 4, 4),
        embeddings_val=trained["emb_val"],
        top_k_val=3,
    )
    assert discover_visual_words(**kw, seed=1) == words
    assert discover_visual_words(**kw, generator=torch.Generator().manual_seed(1)) == words
    assert discover_visual_words(**kw, seed=2) != words


def test_reference_first_even_with_duplicate_embeddings():
    emb = torch.zeros(4, 3)  # every patient equally close
    air = np.zeros((4, 8, 8, 8), dtype=np.float32)
    for w in discover_visual_words(
        embeddings_train=emb,
        volumes_train=air,
        num_classes=4,
        top_k_train=4,
        cube_size=4,
        coordinate_min_distance=1,
        seed=0,
    ):
        assert w.members[0] == w.reference and sorted(w.members) == [0, 1, 2, 3]


def test_impossible_requests_raise(cohort: dict, trained: dict):
    kw = dict(
        embeddings_train=trained["emb_train"],
        volumes_train=cohort["norm_train"],
        cube_size=CUBE,
        max_dense_fraction=MAX_DENSE,
    )
    with pytest.raises(ValueError, match="num_classes"):
        discover_visual_words(**kw, num_classes=N_TRAIN + 1, top_k_train=3)
    with pytest.raises(ValueError, match="top_k_train"):
        discover_visual_words(**kw, num_classes=2, top_k_train=N_TRAIN + 1)
    with pytest.raises(ValueError, match="coordinate_min_distance"):
        discover_visual_words(**kw, num_classes=3, top_k_train=3, coordinate_min_distance=200, max_tries=200)
    with pytest.raises(ValueError, match="max_dense_fraction"):  # solid tissue everywhere: no cube passes
        discover_visual_words(
            **{**kw, "volumes_train": np.ones_like(cohort["norm_train"])}, num_classes=1, top_k_train=3
        )
    with pytest.raises(ValueError, match="top_k_val"):
        discover_visual_words(
            **kw, num_classes=2, top_k_train=3, embeddings_val=trained["emb_val"], top_k_val=N_VAL + 1
        )
    with pytest.raises(ValueError, match="does not fit"):
        discover_visual_words(**{**kw, "cube_size": (64, 16, 16)}, num_classes=2, top_k_train=3)


# ------------------------------------------------------------------------------------------------------ instances


def test_crop_count_labels_shapes_and_range(words: list[VisualWord], cohort: dict):
    cubes, labels = crop_instances(cohort["norm_train"], words, cube_size=CUBE, fill=0.0, jitter=2, seed=0)
    assert cubes.shape == (6 * 5, 1, *CUBE) and cubes.dtype == torch.float32
    assert labels.tolist() == [c for c in range(6) for _ in range(5)]
    assert float(cubes.min()) >= 0.0 and float(cubes.max()) <= 1.0
    multi, mlabels = crop_instances(
        cohort["norm_train"], words, cube_size=CUBE, fill=0.0, multi_resolution=True, jitter=2, seed=0
    )
    # the release's three crops per instance: exact crops first (never jittered), then two rescaled blocks
    assert multi.shape == (3 * 6 * 5, 1, *CUBE) and mlabels.tolist() == labels.tolist() * 3
    assert torch.equal(multi[: 6 * 5], cubes)
    assert float(multi.min()) >= 0.0 and float(multi.max()) <= 1.0
    assert not torch.allclose(multi[6 * 5 :], cubes.repeat(2, 1, 1, 1, 1))


def test_crop_without_jitter_matches_direct_slice(words: list[VisualWord], cohort: dict):
    cubes, _ = crop_instances(cohort["hu_train"], words, cube_size=CUBE, fill=-1000.0)
    w = words[0]
    z, y, x = (c - s // 2 for c, s in zip(w.coordinate, CUBE))
    for k, m in enumerate(w.members):
        expected = cohort["hu_train"][m, z : z + CUBE[0], y : y + CUBE[1], x : x + CUBE[2]]
        np.testing.assert_array_equal(cubes[k, 0].numpy(), expected)


def test_crop_is_seeded(words: list[VisualWord], cohort: dict):
    kw = dict(cube_size=CUBE, fill=0.0, multi_resolution=True, jitter=3)
    a = crop_instances(cohort["norm_train"], words, **kw, generator=torch.Generator().manual_seed(7))
    b = crop_instances(cohort["norm_train"], words, **kw, generator=torch.Generator().manual_seed(7))
    c = crop_instances(cohort["norm_train"], words, **kw, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_crop_pads_with_fill_out_of_bounds():
    vol = np.full((1, 8, 8, 8), 0.5, dtype=np.float32)
    word = VisualWord(class_id=3, coordinate=(0, 0, 0), reference=0, members=(0,), distances=(0.0,))
    cubes, labels = crop_instances(vol, [word], cube_size=4, fill=-1000.0)
    assert labels.tolist() == [3]
    assert float(cubes[0, 0, :2].max()) == -1000.0 and float(cubes[0, 0, 2:, 2:, 2:].min()) == 0.5


def test_validation_crops_use_validation_volumes(words: list[VisualWord], cohort: dict):
    cubes, labels = crop_instances(cohort["norm_val"], words, cube_size=CUBE, fill=0.0, split="val")
    assert cubes.shape == (6 * 3, 1, *CUBE)
    assert labels.tolist() == [c for c in range(6) for _ in range(3)]
    # validation member indices do not fit a smaller train set by mistake
    big = VisualWord(class_id=0, coordinate=(8, 8, 8), reference=0, members=(0,), distances=(0.0,), members_val=(9,))
    with pytest.raises(ValueError, match="validation"):
        crop_instances(cohort["norm_val"], [big], cube_size=CUBE, fill=0.0, split="val")


# --------------------------------------------------------------------------------------------------------- purity


def test_purity_on_phantom(words: list[VisualWord], cohort: dict):
    p = word_purity(words, cohort["labels_train"])
    assert 0.0 <= p <= 1.0
    assert p > 1.0 / len(LABELS)
    pv = word_purity(words, cohort["labels_val"], split="val")
    assert 0.0 <= pv <= 1.0


def test_purity_hand_built():
    maps = np.zeros((4, 8, 8, 8), dtype=np.uint8)
    maps[:, 2, 3, 4] = LUNG
    word = VisualWord(class_id=0, coordinate=(2, 3, 4), reference=0, members=(0, 1, 2, 3), distances=(0.0,) * 4)
    assert word_purity([word], maps) == 1.0
    maps[1, 2, 3, 4] = 0
    other = VisualWord(class_id=1, coordinate=(1, 1, 1), reference=1, members=(1, 2), distances=(0.0, 1.0))
    assert word_purity([word, other], maps) == pytest.approx((0.75 + 1.0) / 2)
