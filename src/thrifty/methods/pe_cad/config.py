"""Configuration of the PE CAD recipe (defaults = the ``quick`` miniature of the method card).

Islam et al., *Seeking an Optimal Approach for Computer-Aided Pulmonary Embolism Detection* (arXiv 2109.07029;
MLMI 2021, extended in MedIA 2023). Two stages: a 2-D slice classifier (stage 1, CNN or ViT, randomly initialised
or pretrained) on windowed, lung-cropped 3-slice stacks, then a sequence model over each exam's stage-1 features
(stage 2: conventional classification with a BiGRU, or multiple-instance learning) predicting the per-slice PE
label and the nine RSNA-STR exam labels.

Arms. Stage 1: ``<backbone>-<init>`` with backbone ``cnn`` or ``vit`` and init ``random``, ``supervised``,
``ssl:simclr`` or ``ssl:genesis`` (the pretraining is in-project: there is no ImageNet here). Stage 2: ``cc``,
``mil_attention``, ``mil_max`` (and the optional ``evit``) on the features of one stage-1 arm — by default the arm
with the best validation image AUC, chosen per seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from thrifty.core.config import BaseConfig, check_choices

STAGES = ("stage1", "features", "stage2", "eval")
SOURCES = ("synthetic", "rsna")
STORES = ("memory", "exams")
BACKBONE_FAMILIES = ("cnn", "vit")
INITS = ("random", "supervised", "ssl:simclr", "ssl:genesis")
STAGE2_KINDS = ("cc", "mil_attention", "mil_max", "evit")
ATTENTIONS = ("release", "additive")
NORMALISATIONS = ("metric", "release")
LABEL_MODES = ("linear", "nearest", "threshold")
LONG_MODES = ("resize", "tail")
#: the backbone names each family may use (``thrifty.methods.pe_cad.stage1.build_backbone``)
CNN_BACKBONES = (
    "small_cnn",
    "resnet18",
    "resnet50",
    "resnet101",
    "densenet121",
    "seresnext50",
    "senet154",
    "xception",
    "sexception",
    "vgg16",
    "drn_a_50",
    "drn_d_54",
)
VIT_BACKBONES = ("small_vit", "vit_b16", "vit_b32")


def parse_arm(arm: str) -> tuple[str, str]:
    """``"cnn-ssl:simclr"`` -> ``("cnn", "ssl:simclr")``; ValueError for anything else."""
    family, sep, init = arm.partition("-")
    if not sep or family not in BACKBONE_FAMILIES or init not in INITS:
        raise ValueError(
            f"stage-1 arm {arm!r} must be '<backbone>-<init>' with backbone in {list(BACKBONE_FAMILIES)} and init "
            f"in {list(INITS)} (e.g. cnn-ssl:simclr)"
        )
    return family, init


@dataclasses.dataclass
class SyntheticConfig:
    """Synthetic CTPA exams (:mod:`thrifty.data.ctpa_synth`), each split drawn from its own seed (split by study).

    Attributes:
        train_exams / val_exams / test_exams: exams per split (the card: 120 / 40 / 80).
        spec: overrides of the generator's difficulty knobs (:class:`thrifty.data.ctpa_synth.CTPASpec`; ``size``
            is the generated slice side, cropped and resized to ``stage1.image_size`` afterwards).
        seed: the data seed; split ``k`` is drawn from ``seed * 100 + k``.
    """

    train_exams: int = 120
    val_exams: int = 40
    test_exams: int = 80
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 2109


@dataclasses.dataclass
class RealConfig:
    """The RSNA-STR PE data (:mod:`thrifty.data.rsna_pe`); the layout and column names are unverified, hence
    configurable.

    Attributes:
        root: the DICOM root (``train/`` of the Kaggle release).
        labels_csv: ``train.csv`` (absolute, or relative to ``root``).
        columns: role -> column name overrides (``thrifty.data.rsna_pe.RSNA_COLUMNS``).
        layout: slice file path under ``root`` with ``{study}``, ``{series}``, ``{sop}``.
        manifest: a split manifest (``.json`` or ``.csv``, study -> train/val/test); empty: the studies are split
            by ``split_fractions`` and ``split_seed`` and the manifest is written into the run directory.
        max_exams: at most this many exams per split (0 = all), for trial runs.
    """

    root: str = ""
    labels_csv: str = "train.csv"
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    layout: str = "{study}/{series}/{sop}.dcm"
    manifest: str = ""
    split_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = 0
    max_exams: int = 0


@dataclasses.dataclass
class DataConfig:
    """Where exams come from and how slices become stage-1 input (window, lung crop; the side is
    ``stage1.image_size``).

    Attributes:
        source: ``synthetic`` (ships offline) or ``rsna`` (the real RSNA-STR DICOMs, ``real``).
        store: how the preprocessed exams are held. ``memory`` (the miniature presets): every split's slices in
            memory, cached as one ``.npz`` per split. ``exams`` (``full``): each exam preprocessed once into its own
            safetensors file under the data cache (``<cache>/exams/<split>/<study>.safetensors`` + ``index.json``;
            resumable, sharded over the ranks under ``torchrun``) and read lazily, a batch's slices at a time;
            stage 2 then reads each exam's features from its file when a batch needs it, so no rank holds a whole
            split. Both give the same stacks, labels and results.
        open_exams: with ``store: exams``, how many exam files a split keeps open (memory-mapped) at once, least
            recently used closed first.
        window_level / window_width: the card's window, level 100 / width 700 ([-250, 450] HU -> [0, 1]).
        lung_crop: crop each exam to its lung bounding box before resizing (the release); False resizes the
            whole slice.
    """

    source: str = "synthetic"
    store: str = "memory"
    open_exams: int = 16
    window_level: float = 100.0
    window_width: float = 700.0
    lung_crop: bool = True
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    real: RealConfig = dataclasses.field(default_factory=RealConfig)


@dataclasses.dataclass
class AugmentConfig:
    """The release's stage-1 augmentation (``train1.py`` ``train_transform``): contrast, shift-scale-rotate,
    cutout; ``enabled: false`` trains on the plain stacks."""

    enabled: bool = True
    contrast: float = 0.2
    shift: float = 0.2
    scale: float = 0.2
    rotate: float = 20.0
    cutout_holes: int = 2
    cutout_frac: float = 0.4


@dataclasses.dataclass
class SmallCNNConfig:
    """:class:`thrifty.methods.pe_cad.stage1.SmallCNN`: stage widths ``(w, 2w, 3w, 4w)``, feature size D."""

    width: int = 24
    feature_dim: int = 128


@dataclasses.dataclass
class SmallViTConfig:
    """:class:`thrifty.methods.pe_cad.stage1.SmallViT` (MONAI ``ViT`` in 2D)."""

    patch_size: int = 8
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 384


@dataclasses.dataclass
class StageOneConfig:
    """The slice classifier.

    Attributes:
        arms: the stage-1 arms, ``<backbone>-<init>`` (see the module docstring).
        cnn / vit: the backbone each family builds (``small_cnn`` / ``small_vit`` in the miniature; MONAI's
            ``seresnext50`` or the in-project ``sexception`` / ``xception`` / ``vgg16`` / ``drn_a_50`` /
            ``drn_d_54``, and ``vit_b16``, at full scale).
        small_cnn / small_vit: the miniature backbones' sizes.
        steps / batch_size / lr / warmup_steps: Adam with a linear warm-up (release: 0) and linear decay to 0.
        image_size: the side of the cropped, resized stacks.
        eval_every: validation image AUC every this many steps (and at the last); the best step is kept.
        eval_batch_size: slices per forward pass when scoring.
        amp: bfloat16 autocast.
        sync_bn: under ``torchrun`` with more than one rank, convert BatchNorm to ``torch.nn.SyncBatchNorm`` so the
            batch statistics are the global batch's (as one process computes them) rather than each rank's share's.
            CUDA only (torch's SyncBatchNorm does not run on CPU): true with several CPU ranks is an error; in one
            process it changes nothing.
    """

    arms: list[str] = dataclasses.field(
        default_factory=lambda: ["cnn-random", "cnn-supervised", "cnn-ssl:simclr", "vit-random"]
    )
    cnn: str = "small_cnn"
    vit: str = "small_vit"
    small_cnn: SmallCNNConfig = dataclasses.field(default_factory=SmallCNNConfig)
    small_vit: SmallViTConfig = dataclasses.field(default_factory=SmallViTConfig)
    steps: int = 200
    batch_size: int = 32
    lr: float = 4e-4
    warmup_steps: int = 0
    image_size: int = 64
    eval_every: int = 100
    eval_batch_size: int = 256
    amp: bool = False
    sync_bn: bool = False
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class PretrainMethodConfig:
    """One pretraining method's budget (Adam)."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3


@dataclasses.dataclass
class PretrainConfig:
    """In-project pretraining on the training slices (labels unused, except the source task of ``supervised``).
    One pretrained backbone per (family, method), shared by every seed's fine-tuning (as one ImageNet checkpoint
    is), cached under the data directory by the digest of its settings.

    Attributes:
        seed: the pretraining seed.
        augment: the augmentation of the supervised source task and of SimCLR's two views (the release's stage-1
            augmentation by default, kept on when ``stage1.augment`` is off: SimCLR without it would compare a
            slice with itself).
        supervised: cross-entropy on the slice's cranio-caudal level (``supervised_bins`` classes), not PE.
        simclr: SimCLR with NT-Xent at ``temperature`` and a ``proj_dim`` projection.
        genesis: Models-Genesis-style restoration.
    """

    seed: int = 0
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    supervised: PretrainMethodConfig = dataclasses.field(default_factory=PretrainMethodConfig)
    supervised_bins: int = 4
    simclr: PretrainMethodConfig = dataclasses.field(default_factory=PretrainMethodConfig)
    temperature: float = 0.5
    proj_dim: int = 64
    genesis: PretrainMethodConfig = dataclasses.field(default_factory=PretrainMethodConfig)


@dataclasses.dataclass
class StageTwoConfig:
    """The exam-level sequence models.

    Attributes:
        kinds: which of ``cc``, ``mil_attention``, ``mil_max``, ``evit`` to train.
        features: ``best`` (the stage-1 arm with the best validation image AUC, per seed) or one stage-1 arm.
        seq_len: L, the fitted exam length (the release: 192).
        hidden: the BiGRU width (the release: 512); the MIL models are matched in parameters.
        epochs / batch_size / lr / step_size / gamma: Adam with StepLR stepped per epoch (the release: 25, 64,
            5e-4, 1, 0.8); validation mean exam AUC after every epoch selects the epoch.
        attention: the CC model's attention pool, ``release`` (``tanh(wᵀh + b_t)``) or ``additive`` (the card's
            ``uᵀ tanh(W h)``).
        image_weight: the RSNA image weight of the CC model's slice term (0.0736); MIL trains on exam labels only
            (0, fixed).
        exam_weights: nine exam-label weights (empty = uniform 1/9; the RSNA metric's values for real data).
        normalisation: ``metric`` (weighted sum / sum of weights) or ``release`` (the release's training sum).
        label_mode / long_mode: how a long exam's slice labels and rows are fitted to L.
    """

    kinds: list[str] = dataclasses.field(default_factory=lambda: ["cc", "mil_attention", "mil_max"])
    features: str = "best"
    seq_len: int = 64
    hidden: int = 64
    epochs: int = 25
    batch_size: int = 64
    lr: float = 5e-4
    step_size: int = 1
    gamma: float = 0.8
    attention: str = "release"
    image_weight: float = 0.0736
    exam_weights: list[float] = dataclasses.field(default_factory=list)
    normalisation: str = "metric"
    label_mode: str = "linear"
    long_mode: str = "resize"


@dataclasses.dataclass
class PECadConfig(BaseConfig):
    """The whole recipe.

    Attributes:
        stages: ``stage1`` (pretraining and every stage-1 arm × seed), ``features`` (the chosen arm's slice
            features of every exam), ``stage2`` (every kind × seed), ``eval`` (claims, tables, figures).
        final_test: False skips the test split (calibration runs).
        works_margin: the "works" claims' margin over the trivial baseline (AUC points).
        noninferiority_margin: "A ≥ B" claims hold when the interval of A − B lies above minus this (AUC points).
        log_every: stage-1 loss records every this many steps.
        figure_slices: validation slices in the example figure.
    """

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stage1: StageOneConfig = dataclasses.field(default_factory=StageOneConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    stage2: StageTwoConfig = dataclasses.field(default_factory=StageTwoConfig)
    final_test: bool = True
    works_margin: float = 2.0
    noninferiority_margin: float = 1.0
    log_every: int = 20
    figure_slices: int = 8

    #: keys that only choose which units run (a resumed run may change them)
    SELECTORS: ClassVar[tuple[str, ...]] = ("stage1.arms", "stage2.kinds")

    def validate(self) -> None:
        super().validate()
        check_choices(("stages", STAGES, self.stages), ("stage2.kinds", STAGE2_KINDS, self.stage2.kinds))
        if not self.stage1.arms:
            raise ValueError("config key 'stage1.arms' must list at least one arm (e.g. [cnn-random])")
        for arm in self.stage1.arms:
            try:
                parse_arm(arm)
            except ValueError as err:
                raise ValueError(f"config key 'stage1.arms': {err}") from None
        if len(set(self.stage1.arms)) != len(self.stage1.arms):
            raise ValueError(f"config key 'stage1.arms' has duplicates: {self.stage1.arms}")
        if len(set(self.stage2.kinds)) != len(self.stage2.kinds):
            raise ValueError(f"config key 'stage2.kinds' has duplicates: {self.stage2.kinds}")
        if self.stage2.features != "best" and self.stage2.features not in self.stage1.arms:
            raise ValueError(
                f"config key 'stage2.features' must be 'best' or one of stage1.arms {self.stage1.arms}, "
                f"got {self.stage2.features!r}"
            )
        for key, choices, value in (
            ("data.source", SOURCES, self.data.source),
            ("data.store", STORES, self.data.store),
            ("stage1.cnn", CNN_BACKBONES, self.stage1.cnn),
            ("stage1.vit", VIT_BACKBONES, self.stage1.vit),
            ("stage2.attention", ATTENTIONS, self.stage2.attention),
            ("stage2.normalisation", NORMALISATIONS, self.stage2.normalisation),
            ("stage2.label_mode", LABEL_MODES, self.stage2.label_mode),
            ("stage2.long_mode", LONG_MODES, self.stage2.long_mode),
        ):
            if value not in choices:
                raise ValueError(f"config key {key!r} must be one of {list(choices)}, got {value!r}")
        self._validate_data()
        s1, s2, pre = self.stage1, self.stage2, self.pretrain
        positive = {
            "stage1.steps": s1.steps, "stage1.batch_size": s1.batch_size, "stage1.eval_every": s1.eval_every,
            "stage1.eval_batch_size": s1.eval_batch_size, "stage1.small_cnn.width": s1.small_cnn.width,
            "stage1.small_cnn.feature_dim": s1.small_cnn.feature_dim, "stage2.seq_len": s2.seq_len,
            "stage2.hidden": s2.hidden, "stage2.epochs": s2.epochs, "stage2.batch_size": s2.batch_size,
            "stage2.step_size": s2.step_size, "pretrain.supervised_bins": pre.supervised_bins,
            "pretrain.proj_dim": pre.proj_dim, "log_every": self.log_every,
        }  # fmt: skip
        for method in ("supervised", "simclr", "genesis"):
            m = getattr(pre, method)
            positive |= {f"pretrain.{method}.steps": m.steps, f"pretrain.{method}.batch_size": m.batch_size}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {value}")
        if pre.simclr.batch_size < 2:
            raise ValueError("config key 'pretrain.simclr.batch_size' must be >= 2 (SimCLR contrasts a batch)")
        for key, value in (("stage1.lr", s1.lr), ("stage2.lr", s2.lr), ("pretrain.supervised.lr", pre.supervised.lr),
                           ("pretrain.simclr.lr", pre.simclr.lr), ("pretrain.genesis.lr", pre.genesis.lr),
                           ("pretrain.temperature", pre.temperature)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"config key {key!r} must be > 0, got {value}")
        if not 0 < s2.gamma <= 1:
            raise ValueError(f"config key 'stage2.gamma' must be in (0, 1], got {s2.gamma}")
        if s1.warmup_steps < 0 or s1.warmup_steps > s1.steps:
            raise ValueError(f"config key 'stage1.warmup_steps' must be in [0, stage1.steps], got {s1.warmup_steps}")
        if s1.image_size < 16 or s1.image_size % 16:
            raise ValueError(
                f"config key 'stage1.image_size' must be a multiple of 16 (the CNN's stride), got {s1.image_size}"
            )
        vit = s1.small_vit
        if s1.vit == "small_vit" and (s1.image_size % vit.patch_size or vit.hidden_size % vit.num_heads):
            raise ValueError("config keys 'stage1.image_size' must be a multiple of 'stage1.small_vit.patch_size' and "
                             "'stage1.small_vit.hidden_size' divisible by 'stage1.small_vit.num_heads'")  # fmt: skip
        if s2.image_weight < 0:
            raise ValueError(f"config key 'stage2.image_weight' must be >= 0, got {s2.image_weight}")
        if s2.exam_weights and (len(s2.exam_weights) != 9 or any(w < 0 for w in s2.exam_weights)):
            raise ValueError("config key 'stage2.exam_weights' must be empty (uniform) or nine weights >= 0")
        aug = s1.augment
        if not (0 <= aug.contrast < 1 and 0 <= aug.shift <= 1 and 0 <= aug.scale < 1 and 0 <= aug.cutout_frac <= 1
                and aug.cutout_holes >= 0):  # fmt: skip
            raise ValueError("config keys 'stage1.augment.*': contrast and scale in [0, 1), shift and cutout_frac in "
                             "[0, 1], cutout_holes >= 0")  # fmt: skip
        if self.works_margin < 0 or self.noninferiority_margin < 0:
            raise ValueError("config keys 'works_margin' and 'noninferiority_margin' must be >= 0")
        if self.figure_slices < 0:
            raise ValueError("config key 'figure_slices' must be >= 0")

    def _validate_data(self) -> None:
        d = self.data
        if not d.window_width > 0:
            raise ValueError(f"config key 'data.window_width' must be > 0, got {d.window_width}")
        if d.open_exams < 1:
            raise ValueError(f"config key 'data.open_exams' must be >= 1 (exam files open at once), got {d.open_exams}")
        if d.source == "synthetic":
            syn = d.synthetic
            for key in ("train_exams", "val_exams", "test_exams"):
                if getattr(syn, key) < 1:
                    raise ValueError(f"config key 'data.synthetic.{key}' must be >= 1, got {getattr(syn, key)}")
            from thrifty.data.ctpa_synth import CTPASpec

            try:
                CTPASpec.from_overrides(syn.spec)
            except (TypeError, ValueError) as err:
                raise ValueError(f"config key 'data.synthetic.spec': {err}") from None
        else:
            real = d.real
            if not real.root:
                raise ValueError("data.source=rsna needs config key 'data.real.root' (the RSNA-STR DICOM root)")
            if not real.labels_csv:
                raise ValueError("data.source=rsna needs config key 'data.real.labels_csv' (train.csv)")
            if real.max_exams < 0:
                raise ValueError("config key 'data.real.max_exams' must be >= 0 (0 = all)")
            f = real.split_fractions
            if not real.manifest and (len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1) > 1e-6):
                raise ValueError(
                    f"config key 'data.real.split_fractions' must be three fractions (train, val, test) summing to 1, "
                    f"got {f}"
                )
