"""Data of the "Data, assemble" recipe (Label-Assemble, arXiv 2109.12265): sources with partial labels.

Synthetic (the card's miniature, :mod:`thrifty.data.chest_synth`), every split from its own seed so no image
("patient") appears in two splits:

=================  =======  ======  ==============================================================
role               source   domain  labels given
=================  =======  ======  ==============================================================
``target``         A        A       the target only (``target_positives`` of ``target_images``)
``assembled``      B        B       the six other findings; the target missing (the oracle sees it); by
                                    default B holds no target (the paper's NIH predates COVID-19)
``unlabelled``     C        A       none
validation / test           A       all
=================  =======  ======  ==============================================================

Real data (``data.source=real``) reads each configured dataset with :mod:`thrifty.data.partial_labels`,
assembles them into one partial-label table over the shared label set, and splits the target source's
*patients* into train / validation / test.

Validation and test are wrapped in :class:`Guarded`: each read names its purpose and is written to
``access_log.jsonl``, so a test proves that the test split never reached model selection.

Batches (:func:`draw_batch`) keep a fixed share of each source role (``data.ratios``, or fixed counts
``data.role_images``) on every DDP rank,
drawn from a generator seeded by (seed, step, rank); the labels' masks travel with the batch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thrifty.core import cache
from thrifty.core.splits import AccessLog, Guarded
from thrifty.data import chest_synth
from thrifty.methods.data_assemble.config import ROLES, DataAssembleConfig

log = logging.getLogger(__name__)

VAL_PURPOSES = ("selection", "calibration", "figure")
TEST_PURPOSES = ("final_test", "figure")
GENERATOR_VERSION = 4  # 4: domain B with A's noise (the consolidation style is a setting)
#: the cached synthetic splits; source A is generated as separate positive and negative pools
SPLITS = ("target_pos", "target_neg", "assembled", "unlabelled", "val", "test")


_QUANTILE_MAX_ELEMENTS = 2**24


def window_intensity(images: torch.Tensor, percentiles: list[float] | tuple[float, ...]) -> torch.Tensor:
    """Per-image intensity window: map each image's ``percentiles = (low, high)`` (in %) to 0 and 1, clipped.

    ``images`` (N, C, H, W) float -> same shape in [0, 1]; the percentiles are taken over each image's pixels
    (all channels), with linear interpolation as ``numpy.percentile`` and MONAI's
    ``ScaleIntensityRangePercentiles(lower, upper, b_min=0, b_max=1, clip=True)`` do. It removes a scanner's
    linear contrast and brightness, which a from-scratch network otherwise learns as a cue (recipe README,
    calibration step 9). An empty ``percentiles`` returns ``images`` unchanged; a flat image maps to 0.
    """
    if not percentiles:
        return images
    if len(percentiles) != 2 or not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        raise ValueError(f"intensity window: expected two percentiles 0 <= low < high <= 100, got {percentiles}")
    if images.ndim != 4:
        raise ValueError(f"intensity window: expected images (N, C, H, W), got {tuple(images.shape)}")
    if images.numel() == 0:
        return images
    flat = images.reshape(len(images), -1).float()
    q = torch.tensor([percentiles[0] / 100.0, percentiles[1] / 100.0], dtype=flat.dtype)
    chunk = max(1, _QUANTILE_MAX_ELEMENTS // flat.shape[1])  # torch.quantile refuses larger inputs
    bounds = [torch.quantile(part, q, dim=1, keepdim=True) for part in flat.split(chunk)]
    lo, hi = torch.cat([b[0] for b in bounds]), torch.cat([b[1] for b in bounds])
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.clamp(0.0, 1.0).reshape(images.shape).to(images.dtype)


@dataclasses.dataclass
class LabelledImages:
    """Images with their complete ground truth and the mask of labels the source gives.

    ``images`` (N, 1, S, S) float32 in [0, 1]; ``labels`` (N, L) float32 (all of them for synthetic data; 0
    where unknown for real data); ``given`` (N, L) bool; ``ids`` (N,) patient ids; ``masks`` (N, L, S, S) bool
    finding regions (synthetic validation only, for figures) or None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    given: torch.Tensor
    ids: np.ndarray
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray | list[int]) -> LabelledImages:
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.from_numpy(idx)
        return LabelledImages(
            self.images[t], self.labels[t], self.given[t], self.ids[idx],
            None if self.masks is None else self.masks[idx],
        )  # fmt: skip


class GuardedSet(Guarded[LabelledImages]):
    """Validation or test images that can only be read by naming an allowed purpose."""

    def __init__(self, split: str, data: LabelledImages, access: AccessLog) -> None:
        super().__init__(split, data, access, allowed=VAL_PURPOSES if split == "val" else TEST_PURPOSES)


@dataclasses.dataclass
class AssembleData:
    """Everything a unit trains and is judged on.

    Attributes:
        label_names: output order; ``target_index`` the class of interest's column.
        train: role → :class:`LabelledImages` (``target``, ``assembled``, ``unlabelled``).
        target_pool: synthetic only: (positives, negatives) of source A at the largest count any run asks for
            (the label-count sweep cuts prefixes of both).
        minority: label names whose prevalence is below 5% (the card's minority classes).
        oracle_available: whether every training label is known (synthetic), so the oracle arm can run.
    """

    label_names: list[str]
    target_index: int
    train: dict[str, LabelledImages]
    val: GuardedSet
    test: GuardedSet
    minority: list[str]
    oracle_available: bool
    info: dict[str, Any]
    target_pool: tuple[LabelledImages, LabelledImages] | None = None

    def target_subset(self, count: int, positive_fraction: float) -> LabelledImages:
        """Source A cut to ``count`` images, ``round(count * positive_fraction)`` of them positive (synthetic)."""
        if self.target_pool is None:
            raise ValueError("a label-count sweep needs the synthetic sources (data.source=synthetic)")
        pos, neg = self.target_pool
        n_pos = max(1, round(count * positive_fraction))
        n_neg = count - n_pos
        if n_pos > len(pos) or n_neg > len(neg):
            raise ValueError(f"source A holds {len(pos)} positives and {len(neg)} negatives; {count} asked")
        return _concat([pos.subset(range(n_pos)), neg.subset(range(n_neg))])


def _concat(parts: list[LabelledImages]) -> LabelledImages:
    masks = None if any(p.masks is None for p in parts) else np.concatenate([p.masks for p in parts])
    return LabelledImages(
        torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
        torch.cat([p.given for p in parts]), np.concatenate([p.ids for p in parts]), masks,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- synthetic


def synthetic_settings(cfg: DataAssembleConfig) -> dict[str, Any]:
    """What the cached synthetic sources depend on (their cache key)."""
    syn = cfg.data.synthetic
    return {
        "synthetic": dataclasses.asdict(syn),
        "image_size": cfg.data.image_size,
        "pool": target_pool_size(cfg),
        "version": GENERATOR_VERSION,
    }


def target_pool_size(cfg: DataAssembleConfig) -> int:
    """Images of source A to generate: the main count or the largest count of the label-count sweep."""
    return max([cfg.data.synthetic.target_images, *cfg.sweep.target_images])


def _split_seeds(seed: int) -> dict[str, int]:
    return {name: seed * 100 + k for k, name in enumerate(SPLITS, start=1)}


def _generate_splits(cfg: DataAssembleConfig) -> dict[str, chest_synth.ChestBatch]:
    syn, size = cfg.data.synthetic, cfg.data.image_size
    seeds = _split_seeds(syn.seed)
    pool = target_pool_size(cfg)
    n_pos = max(1, round(pool * syn.positive_fraction))
    target = cfg.data.target
    common = {"size": size, "strength": syn.strength, "consolidation": syn.consolidation}

    def gen(n: int, key: str, domain: str, extra: dict[str, float] | None = None) -> chest_synth.ChestBatch:
        prevalence = {**syn.prevalence, **(extra or {})}
        return chest_synth.generate(n, seed=seeds[key], domain=domain, prevalence=prevalence, **common)

    return {
        "target_pos": gen(n_pos, "target_pos", "A", {target: 1.0}),
        "target_neg": gen(pool - n_pos, "target_neg", "A", {target: 0.0}),
        "assembled": gen(
            syn.assembled_images, "assembled", syn.assembled_domain, {target: syn.assembled_target_prevalence}
        ),
        "unlabelled": gen(syn.unlabelled_images, "unlabelled", "A"),
        "val": gen(syn.val_images, "val", "A"),
        "test": gen(syn.test_images, "test", "A"),
    }


def _cache_dir(cfg: DataAssembleConfig, root: Path) -> Path:
    """The cache directory of the synthetic splits: named by the digest of :func:`synthetic_settings`."""
    return cache.cache_dir(root, "data_assemble", synthetic_settings(cfg))


def load_synthetic(cfg: DataAssembleConfig, root: Path) -> dict[str, chest_synth.ChestBatch]:
    """The synthetic splits, generated once and cached as ``.npz`` under ``root`` (masks kept for validation
    only). The cache directory's name is the digest of :func:`synthetic_settings`."""

    def build() -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for n, batch in _generate_splits(cfg).items():
            out[n] = {"images": batch.images, "labels": batch.labels, "ids": batch.ids}
            if n == "val":
                out[n]["masks"] = batch.masks
        return out

    arrays = cache.cached_splits(
        _cache_dir(cfg, root), SPLITS, build, settings=synthetic_settings(cfg), what="synthetic chest sources"
    )
    none = {n: np.zeros((len(a["ids"]), 0, 1, 1), dtype=bool) for n, a in arrays.items()}  # no regions kept
    return {
        n: chest_synth.ChestBatch(images=a["images"], labels=a["labels"], ids=a["ids"], masks=a.get("masks", none[n]))
        for n, a in arrays.items()
    }


def _labelled(
    batch: chest_synth.ChestBatch, columns: list[int], given: list[int], *, masks: bool, window: list[float]
) -> LabelledImages:
    labels = torch.from_numpy(np.asarray(batch.labels)[:, columns].astype(np.float32))
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, given] = True
    kept = None
    if masks and batch.masks.shape[1] == len(chest_synth.FINDINGS):
        kept = np.asarray(batch.masks)[:, columns]
    images = window_intensity(torch.from_numpy(np.asarray(batch.images, dtype=np.float32)), window)
    return LabelledImages(images, labels, mask, batch.ids, kept)


def prevalence_of(cfg: DataAssembleConfig) -> dict[str, float]:
    """The generator's prevalence of each label (defaults with the config's overrides)."""
    return {**chest_synth.DEFAULT_PREVALENCE, **cfg.data.synthetic.prevalence}


def synthetic_data(cfg: DataAssembleConfig, root: Path, access: AccessLog) -> AssembleData:
    names = cfg.label_names
    cols = [chest_synth.FINDINGS.index(n) for n in names]
    t = names.index(cfg.data.target)
    others = [j for j in range(len(names)) if j != t]
    every = list(range(len(names)))
    splits = load_synthetic(cfg, root)
    w = cfg.data.intensity_window
    pos = _labelled(splits["target_pos"], cols, [t], masks=False, window=w)
    neg = _labelled(splits["target_neg"], cols, [t], masks=False, window=w)
    prevalence = prevalence_of(cfg)
    data = AssembleData(
        label_names=names,
        target_index=t,
        train={
            "assembled": _labelled(splits["assembled"], cols, others, masks=False, window=w),
            "unlabelled": _labelled(splits["unlabelled"], cols, [], masks=False, window=w),
        },
        val=GuardedSet("val", _labelled(splits["val"], cols, every, masks=True, window=w), access),
        test=GuardedSet("test", _labelled(splits["test"], cols, every, masks=False, window=w), access),
        minority=[n for n in names if prevalence[n] < 0.05],
        oracle_available=True,
        info={},
        target_pool=(pos, neg),
    )
    syn = cfg.data.synthetic
    data.train["target"] = data.target_subset(syn.target_images, syn.positive_fraction)
    data.info = describe(data, source="synthetic")
    return data


# -------------------------------------------------------------------------------------------------- real


def real_data(cfg: DataAssembleConfig, access: AccessLog) -> AssembleData:
    """Assemble the configured real datasets (see :class:`~thrifty.methods.data_assemble.config.RealSource`)."""
    from thrifty.data import partial_labels as pl

    tables, protocols, roles = [], [], {}
    for spec in cfg.data.real_sources:
        name = spec.name or spec.kind
        if spec.kind == "chestxray14":
            table = pl.scan_chestxray14(spec.path, name=name)
        elif spec.kind == "chexpert":
            table = pl.scan_chexpert_partial(spec.path, image_root=spec.image_root or None, name=name)
        elif spec.kind == "covidx":
            table = pl.scan_covidx(spec.path, image_root=spec.image_root, name=name)
        else:
            raise ValueError(f"config key 'data.real_sources[].kind': unknown {spec.kind!r}")
        provides = tuple(spec.provides) if spec.role != "unlabelled" else ()
        if spec.role != "unlabelled" and not provides:
            provides = tuple(spec.aliases.get(n, n) for n in table.label_names)
        tables.append(table)
        implied = tuple(spec.implies_negative) if spec.role != "unlabelled" else ()
        protocols.append(
            pl.SourceProtocol(name=name, provides=provides, implies_negative=implied, aliases=dict(spec.aliases))
        )
        roles[name] = spec.role
    conflicts = pl.check_protocols(protocols)
    if conflicts:
        raise ValueError("the sources' label protocols conflict: " + "; ".join(conflicts))
    table = pl.assemble(tables, protocols=protocols, label_names=cfg.data.labels or None)
    names = list(table.label_names)
    if cfg.data.target not in names:
        raise ValueError(f"config key 'data.target' ({cfg.data.target!r}) is not among the assembled labels {names}")
    images = torch.from_numpy(pl.load_table_images(table, size=cfg.data.image_size))
    images = window_intensity(images, cfg.data.intensity_window)
    labels = torch.from_numpy(table.labels.astype(np.float32))
    given = torch.from_numpy(table.mask)
    ids = np.asarray(table.patient_ids)
    role_of = np.asarray([roles[s] for s in table.sources])
    target_rows = np.flatnonzero(role_of == "target")
    split = pl.split_by_patient(
        table.subset(target_rows),
        fractions={"train": 1 - cfg.data.val_fraction - cfg.data.test_fraction, "val": cfg.data.val_fraction,
                   "test": cfg.data.test_fraction},
        seed=cfg.data.synthetic.seed,
    )  # fmt: skip

    def rows(idx: np.ndarray) -> LabelledImages:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return LabelledImages(images[t], labels[t], given[t], ids[idx])

    train = {"target": rows(target_rows[split["train"]])}
    for role in ("assembled", "unlabelled"):
        idx = np.flatnonzero(role_of == role)
        if len(idx):
            train[role] = rows(idx)
    if "unlabelled" in train:
        train["unlabelled"].given[:] = False
    freq = (labels * given).sum(0) / given.sum(0).clamp(min=1)
    data = AssembleData(
        label_names=names,
        target_index=names.index(cfg.data.target),
        train=train,
        val=GuardedSet("val", rows(target_rows[split["val"]]), access),
        test=GuardedSet("test", rows(target_rows[split["test"]]), access),
        minority=[n for n, f in zip(names, freq.tolist()) if f < 0.05],
        oracle_available=False,
        info={},
    )
    data.info = describe(data, source="real")
    return data


def describe(data: AssembleData, *, source: str) -> dict[str, Any]:
    """Sizes, given-label counts and target positives per role, for ``results.json``."""
    t = data.target_index
    roles = {
        role: {
            "images": len(part),
            "labels_given": [n for j, n in enumerate(data.label_names) if bool(part.given[:, j].any())],
            "target_positives_given": int((part.labels[:, t] * part.given[:, t]).sum()),
        }
        for role, part in data.train.items()
    }
    return {
        "source": source,
        "labels": data.label_names,
        "target": data.label_names[t],
        "minority": data.minority,
        "roles": roles,
        "val_images": len(data.val),
        "test_images": len(data.test),
    }


def prepare_data(cfg: DataAssembleConfig, root: Path, access: AccessLog) -> AssembleData:
    """The recipe's data: synthetic (cached under ``root``) or the configured real sources."""
    if cfg.data.source == "synthetic":
        return synthetic_data(cfg, root, access)
    return real_data(cfg, access)


# --------------------------------------------------------------------------------------------- batching


def role_counts(batch_size: int, ratios: dict[str, float], roles: list[str]) -> dict[str, int]:
    """Images per role in a batch of ``batch_size``: ``ratios`` restricted to ``roles`` and renormalised,
    rounded by largest remainder so the counts sum to ``batch_size``; every role gets at least one."""
    use = [r for r in ROLES if r in roles and r in ratios]
    if not use:
        raise ValueError(f"no batch share for roles {roles} in data.ratios {ratios}")
    if batch_size < len(use):
        raise ValueError(f"a batch of {batch_size} cannot hold one image of each of {use}")
    total = sum(ratios[r] for r in use)
    exact = {r: batch_size * ratios[r] / total for r in use}
    counts = {r: max(1, int(exact[r])) for r in use}
    by_remainder = sorted(use, key=lambda r: exact[r] - int(exact[r]), reverse=True)
    i = 0
    while sum(counts.values()) < batch_size:
        counts[by_remainder[i % len(use)]] += 1
        i += 1
    while sum(counts.values()) > batch_size:
        largest = max(use, key=lambda r: counts[r])
        counts[largest] -= 1
    return counts


def fixed_role_counts(role_images: dict[str, int], roles: list[str], world_size: int = 1) -> dict[str, int]:
    """Images per role in one rank's batch when every role has a fixed count (``data.role_images``, all ranks
    together): the roles an arm uses, *not* renormalised, each count split evenly over ``world_size`` ranks."""
    use = [r for r in ROLES if r in roles and r in role_images]
    if "target" not in use:
        raise ValueError(f"data.role_images {role_images} gives no count for the target role")
    uneven = [r for r in use if role_images[r] % world_size]
    if uneven:
        raise ValueError(f"data.role_images counts of {uneven} do not split evenly over {world_size} ranks")
    return {r: role_images[r] // world_size for r in use}


@dataclasses.dataclass
class Batch:
    """One training batch: ``images`` (B, 1, S, S), ``labels`` (B, L), ``given`` (B, L) bool, ``roles`` (B,)
    index into :data:`~thrifty.methods.data_assemble.config.ROLES`."""

    images: torch.Tensor
    labels: torch.Tensor
    given: torch.Tensor
    roles: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.images, self.labels, self.given, self.roles)))


def draw_batch(
    train: dict[str, LabelledImages], counts: dict[str, int], *, seed: int, step: int, rank: int = 0,
    given_override: dict[str, torch.Tensor] | None = None,
) -> Batch:  # fmt: skip
    """A batch with ``counts[role]`` images of each role, sampled with replacement from a generator seeded by
    (seed, step, rank) — the same on a rerun, different on every DDP rank. ``given_override[role]`` replaces that
    role's label mask (the oracle arm)."""
    rng = np.random.default_rng([seed, step, rank])
    images, labels, given, roles = [], [], [], []
    for role in ROLES:
        if not counts.get(role):
            continue
        part = train[role]
        idx = torch.from_numpy(rng.integers(len(part), size=counts[role]))
        images.append(part.images[idx])
        labels.append(part.labels[idx])
        mask = given_override[role] if given_override and role in given_override else part.given
        given.append(mask[idx])
        roles.append(torch.full((len(idx),), ROLES.index(role), dtype=torch.long))
    return Batch(torch.cat(images), torch.cat(labels), torch.cat(given), torch.cat(roles))
