"""Configuration of the SQUID recipe (defaults = the ``quick`` miniature of the method card)."""

from __future__ import annotations

import dataclasses
from typing import Any

from thrifty.core.config import BaseConfig, check_choices
from thrifty.data.digit_anatomy import ANOMALY_TYPES

BASELINES = ("ae", "memae", "knn")
#: training-free baselines, computed in every run (not trained, nothing to select)
TRIVIAL = ("mean_image", "cell_nn")
ARMS = ("squid", *BASELINES, "ae_skip")
ABLATIONS = ("no_queue", "no_transformer", "no_shortcut")
#: image scores of a generator: the paper's discriminator score (SQUID only), the reconstruction MSE, and the
#: largest per-cell reconstruction-error z-score (μ/σ per cell position from validation normals)
SCORES = ("discriminator", "recon", "cell_zmax")
STAGES = ("data", "train", "eval")
SOURCES = ("digit_anatomy", "folder", "zhanglab", "chexpert")


def check_backbone(net: Any, image_size: int) -> None:
    """Raise ValueError when the patch U-Net cannot be built for ``image_size`` with ``net``'s ``num_patches``,
    ``level``, ``ops``, ``initial_combine`` and ``decoder_memory`` (a :class:`NetConfig` or a
    :class:`~thrifty.methods.squid.model.NetSettings`), so a bad combination fails before any data is loaded."""
    num_patches, level, ops = net.num_patches, net.level, list(net.ops)
    initial_combine, decoder_memory = net.initial_combine, list(net.decoder_memory)
    if image_size % num_patches:
        raise ValueError(f"image size {image_size} is not divisible by net.num_patches={num_patches}")
    cell = image_size // num_patches
    if cell % 2**level:
        raise ValueError(
            f"patch side {cell} (image {image_size} / {num_patches}) is not divisible by 2**level={2**level}"
        )
    if len(ops) != level or any(op not in ("concat", "none") for op in ops):
        raise ValueError(f"net.ops must list 'concat'/'none' for each of the {level} levels, got {ops}")
    if not 0 <= initial_combine <= level:
        raise ValueError(f"net.initial_combine must be in [0, level={level}], got {initial_combine}")
    for j in decoder_memory:
        if not initial_combine <= j < level:
            raise ValueError(
                f"net.decoder_memory level {j} must be a patch-wise level in [initial_combine={initial_combine}, "
                f"level={level})"
            )


@dataclasses.dataclass
class NetConfig:
    """The generator backbone shared by SQUID, the AE and MemAE (see :class:`~thrifty.methods.squid.model.NetSettings`).

    ``image_size`` = num_patches × cell; digit setting of the paper: 96², r = 32, D = 1024, S = 200.
    """

    base_filters: int = 8
    level: int = 3
    num_patches: int = 3
    initial_combine: int = 1
    ops: list[str] = dataclasses.field(default_factory=lambda: ["concat", "concat", "none"])
    num_slots: int = 100
    shrink_topk: int = 5
    decoder_memory: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    decoder_slots: int = 100
    shortcut_ratio: float = 0.95
    num_heads: int = 8
    dropout: float = 0.0
    memae_slots: int = 100
    memae_shrink: float = 0.0
    memae_scope: str = "image"


@dataclasses.dataclass
class DataConfig:
    """Where images come from.

    Attributes:
        source: ``digit_anatomy`` (built from real MNIST, ships offline), ``folder`` (root/normal, root/abnormal
            for test and root_train/normal for training), ``zhanglab`` (pediatric pneumonia layout) or
            ``chexpert`` (CSV + images).
        root: dataset root for the real sources; ``train_root``: training folder for ``folder``;
            ``val_root``: a folder (normal/, abnormal/) used as the validation set instead of a holdout.
        csv_train, csv_test: CheXpert CSVs (``train.csv``/``valid.csv`` style).
        cell: DigitAnatomy cell side (image = 3·cell).
        image_size: side the real sources are resized to.
        per_class: DigitAnatomy train/val/test digits per class (disjoint pools).
        val_sizes / test_sizes: (normal, abnormal) counts of the fixed DigitAnatomy sets.
        anomaly_types: DigitAnatomy anomaly types, balanced in val and test.
        holdout: real sources: normals and abnormals per label carved from training for validation.
        data_seed: seed of the fixed sets (independent of the training seeds).
        skip_bad: real sources: skip unreadable images (counted in results) instead of failing.
        contamination: DigitAnatomy: fraction of training images replaced by anomalies (robustness study).
    """

    source: str = "digit_anatomy"
    root: str = ""
    train_root: str = ""
    val_root: str = ""
    csv_train: str = ""
    csv_test: str = ""
    cell: int = 16
    image_size: int = 128
    per_class: list[int] = dataclasses.field(default_factory=lambda: [300, 100, 100])
    val_sizes: list[int] = dataclasses.field(default_factory=lambda: [200, 200])
    test_sizes: list[int] = dataclasses.field(default_factory=lambda: [500, 500])
    anomaly_types: list[str] = dataclasses.field(default_factory=lambda: ["missing", "swap", "flip", "zero"])
    scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.6, 1.3])
    holdout: int = 200
    data_seed: int = 0
    skip_bad: bool = False
    contamination: float = 0.0


@dataclasses.dataclass
class LossConfig:
    """Loss weights of the digit configuration (ZhangLab/CheXpert use recon_w = 10)."""

    recon_w: float = 1.0
    t_w: float = 0.01
    dist_w: float = 0.001
    g_w: float = 0.005
    d_w: float = 0.005
    memae_entropy_w: float = 0.0


@dataclasses.dataclass
class OptimConfig:
    """Adam(β 0.5, 0.999, wd 1e-5) with cosine decay for the generator; MultiStepLR for the discriminator.

    Epoch-based schedules of the release are converted with ``steps_per_epoch`` (1,600 images / batch 16 = 100).
    """

    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    eps: float = 1e-7
    weight_decay: float = 1e-5
    t_max_epochs: float = 300.0
    eta_min: float = 1e-6
    d_lr: float = 1e-4
    d_milestones_epochs: list[float] = dataclasses.field(default_factory=lambda: [150.0, 250.0])
    d_gamma: float = 0.2
    steps_per_epoch: float = 100.0


@dataclasses.dataclass
class KnnConfig:
    """Feature kNN on the AE encoder's mid-level features.

    Attributes:
        bank_images: training normals whose features form the bank.
        position_aware: compare each location only with the bank's features at the same location (a layout
            anomaly such as a swap is invisible to a position-agnostic bank); False gives PatchCore's pooled
            bank reduced by a greedy k-center coreset.
        coreset_fraction: PatchCore's coreset fraction (pooled bank only).
        levels: encoder levels whose maps are concatenated (0 = input conv).
    """

    bank_images: int = 256
    position_aware: bool = True
    coreset_fraction: float = 0.1
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])


@dataclasses.dataclass
class TrivialConfig:
    """Training-free baselines shown in every table: ``mean_image`` (MSE to the mean of ``bank_images``
    training normals) and ``cell_nn`` (per cell position, the distance to the nearest of ``bank_images``
    training cells at that position, z-scored per position with the validation normals, as SQUID's
    ``cell_zmax`` score is; the image score is the largest z). Each seed draws its own bank."""

    arms: list[str] = dataclasses.field(default_factory=lambda: list(TRIVIAL))
    bank_images: int = 1000


@dataclasses.dataclass
class SquidConfig(BaseConfig):
    """Everything ``thrifty run squid`` reads.

    Attributes:
        stages: ``data`` (build/reuse the dataset, write PNGs + CSV), ``train``, ``eval`` (claims, tables, figures).
        arms: ``squid`` and baselines ``ae``, ``memae``, ``knn`` (kNN uses the same seed's AE encoder); also
            ``ae_skip``, the SQUID backbone without memories (patch-wise, concatenated skips), an ablation of the
            skip-free AE.
        ablations: SQUID variants: ``no_queue``, ``no_transformer``, ``no_shortcut``.
        score: the score SQUID is selected and judged by: ``discriminator`` (the paper's), ``recon`` or
            ``cell_zmax`` (deviations, labelled as such in every claim). Every score is reported for every
            generator arm; baselines are always judged by their own reconstruction error.
        arm_steps: per-arm ``max_steps`` overrides, e.g. ``{ae: 3000}`` (arms train to their own convergence).
        final_test: False skips the test set entirely (validation-only runs such as ``long``).
        batch_size: images per step (split over DDP ranks).
        max_steps: generator steps per unit.
        eval_every: validation AUROC every this many steps; the best validation step is kept (selection on
            validation only).
        eval_batch_size: images per scoring forward.
        figure_images: test images per class in the reconstruction figure.
    """

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    arms: list[str] = dataclasses.field(default_factory=lambda: ["squid", *BASELINES])
    ablations: list[str] = dataclasses.field(default_factory=list)
    net: NetConfig = dataclasses.field(default_factory=NetConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    knn: KnnConfig = dataclasses.field(default_factory=KnnConfig)
    trivial: TrivialConfig = dataclasses.field(default_factory=TrivialConfig)
    score: str = "discriminator"
    arm_steps: dict[str, int] = dataclasses.field(default_factory=dict)
    final_test: bool = True
    batch_size: int = 16
    max_steps: int = 300
    eval_every: int = 50
    log_every: int = 10
    eval_batch_size: int = 100
    figure_images: int = 4

    def validate(self) -> None:
        super().validate()
        check_choices(
            ("stages", STAGES, self.stages),
            ("arms", ARMS, self.arms),
            ("ablations", ABLATIONS, self.ablations),
            ("trivial.arms", TRIVIAL, self.trivial.arms),
            ("data.anomaly_types", ANOMALY_TYPES, self.data.anomaly_types),
        )
        if "knn" in self.arms and "ae" not in self.arms:
            raise ValueError("config key 'arms': knn scores the AE encoder's features, so it needs 'ae' too")
        if self.score not in SCORES:
            raise ValueError(f"config key 'score' must be one of {list(SCORES)}, got {self.score!r}")
        if self.net.memae_scope not in ("image", "location"):
            raise ValueError("config key 'net.memae_scope' must be 'image' (the authors' CAE) or 'location'")
        known = {*ARMS, *(f"squid-{a}" for a in ABLATIONS)}
        for arm, steps in self.arm_steps.items():
            if arm not in known or arm == "knn":
                raise ValueError(f"config key 'arm_steps': unknown trained arm {arm!r}; choose from {sorted(known)}")
            if int(steps) < 1:
                raise ValueError(f"config key 'arm_steps.{arm}' must be >= 1")
        if self.data.source not in SOURCES:
            raise ValueError(f"config key 'data.source' must be one of {list(SOURCES)}")
        if self.data.source != "digit_anatomy" and not self.data.root:
            raise ValueError(f"config key 'data.root' is required for data.source={self.data.source}")
        for key in ("max_steps", "batch_size", "eval_every", "log_every", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1")
        if not 0.0 < self.net.shortcut_ratio <= 1.0:
            raise ValueError("config key 'net.shortcut_ratio' must be in (0, 1]")
        if self.net.shrink_topk < 2:
            raise ValueError("config key 'net.shrink_topk' must be >= 2 (k-1 weights survive the shrinkage)")
        if not 0.0 <= self.data.contamination < 1.0:
            raise ValueError("config key 'data.contamination' must be in [0, 1)")
        if self.data.contamination and self.data.source != "digit_anatomy":
            raise ValueError("config key 'data.contamination' applies to data.source=digit_anatomy only")
        check_backbone(self.net, self.image_size)
        if len(self.data.val_sizes) != 2 or len(self.data.test_sizes) != 2:
            raise ValueError("config keys 'data.val_sizes'/'data.test_sizes' are [normal, abnormal] counts")

    @property
    def image_size(self) -> int:
        return 3 * self.data.cell if self.data.source == "digit_anatomy" else self.data.image_size
