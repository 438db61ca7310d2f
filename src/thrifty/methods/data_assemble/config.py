"""Configuration of the "Data, assemble" recipe (defaults = the ``quick`` miniature of the method card).

Label-Assemble (Kang, Lu, Yuille, Zhou; arXiv 2109.12265): a target source labels only the class of interest,
assembled sources label other classes, an unlabelled source labels nothing; missing labels are masked out of
the BCE and learnt from sharpened weak-view predictions (pseudo-label term) and weak/strong consistency.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from thrifty.core.config import UnitsConfig, check_choices
from thrifty.data.chest_synth import CONSOLIDATION_STYLES, DOMAINS, FINDINGS, TARGET

#: the card's arms: 1 target-only, 2 naive assemble (masked BCE), 3 the paper's method (+ pseudo-labels +
#: consistency), 4 arm 3 with the adapter head, 5 oracle (every label of A and B given), 6 the release's loss
ARMS = ("target_only", "naive", "assemble", "assemble_adapter", "oracle", "release_compat")
HEADS = ("multihead", "adapter")
BACKBONES = ("densenet_mini", "densenet121")
STAGES = ("data", "train", "eval")
SOURCES = ("synthetic", "real")
ROLES = ("target", "assembled", "unlabelled")


@dataclasses.dataclass
class SyntheticConfig:
    """The procedural chest-radiograph-like sources (:mod:`thrifty.data.chest_synth`).

    Attributes:
        target_images / target_positives: source A (domain A): images that carry only the target label, and
            how many of them are positive (exact; the card: 60 with 15 positive).
        assembled_images: source B (domain B: other gamma, contrast, brightness and blur), labelled for the
            six other findings, the target missing (the oracle arm sees it).
        assembled_target_prevalence: how often B's images hold the target. 0 (default) mirrors the paper's
            setting: the assembled NIH ChestX-ray14 predates COVID-19, so its images are the "negative examples"
            of the class of interest, unlabelled as such; the generator's prevalence gives a B that contains
            unlabelled positives too.
        assembled_domain: the acquisition domain B is rendered in (a key of ``chest_synth.DOMAINS``; ``A``
            removes the scanner shift, a diagnostic).
        consolidation: how the generator draws consolidation (``chest_synth.CONSOLIDATION_STYLES``):
            ``peripheral`` (default: the target's own peripheral patchy haze in one lung, a unilateral
            look-alike, as the *Pneumonia* images the release assembles from ChestX-ray14 are to COVID-19),
            ``lobar`` (larger, faint to dense, the haze's texture) or ``dense`` (a focal dense blob; the first
            five registrations, at the generator's 10%).
        unlabelled_images: source C (domain A), no labels.
        val_images / test_images: domain A, every label given. The test split is read once, at the end.
        prevalence / strength: overrides of the generator's per-finding prevalence and visibility (the
            difficulty knobs calibrated on validation; see the recipe README).
        seed: the data seed; every split is generated from its own seed derived from it, so no image (patient)
            appears in two splits.
    """

    target_images: int = 60
    target_positives: int = 15
    assembled_images: int = 2000
    assembled_target_prevalence: float = 0.0
    assembled_domain: str = "B"
    # calibrated on validation (recipe README, steps 24-27): a unilateral look-alike of the target at COVIDx's
    # share of pneumonia among the negatives; the generator's own default is a dense blob at 10%
    consolidation: str = "peripheral"
    unlabelled_images: int = 1000
    val_images: int = 200
    test_images: int = 1000
    prevalence: dict[str, float] = dataclasses.field(default_factory=lambda: {"consolidation": 0.3})
    # calibrated on validation with target-only (recipe README, step 11): with the intensity window the
    # generator's full-strength haze put target-only at 94.7 validation AUC, near the ceiling; half of it, 72.9
    strength: dict[str, float] = dataclasses.field(default_factory=lambda: {"ground_glass": 0.5})
    seed: int = 2109

    @property
    def positive_fraction(self) -> float:
        """The share of source A's images that are positive (kept by the label-count sweep)."""
        return self.target_positives / self.target_images


@dataclasses.dataclass
class RealSource:
    """One real dataset of an assembled run (``data.source=real``).

    Attributes:
        name: a short name (also the source name in the label table).
        kind: ``chestxray14`` (NIH ``Data_Entry_2017.csv``), ``chexpert`` (``train.csv``-style) or ``covidx``
            (split text file).
        path: the dataset root (chestxray14), the CSV (chexpert) or the split file (covidx).
        image_root: where image paths are resolved (chexpert/covidx; empty = next to the CSV).
        role: ``target`` (its patients are split into train / validation / test), ``assembled`` (training
            only) or ``unlabelled`` (training only, every label treated as missing).
        provides: the labels this source gives (empty = every label its loader reads); the others are missing.
        implies_negative: labels this source does not annotate but guarantees absent (e.g. ``COVID-19`` for
            NIH ChestX-ray14, collected before 2020): given, and 0, for every image.
        aliases: the source's label name -> the shared label name.
    """

    name: str = ""
    kind: str = "chestxray14"
    path: str = ""
    image_root: str = ""
    role: str = "target"
    provides: list[str] = dataclasses.field(default_factory=list)
    implies_negative: list[str] = dataclasses.field(default_factory=list)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataConfig:
    """Where images come from and how a batch is composed.

    Attributes:
        source: ``synthetic`` (ships offline; :class:`SyntheticConfig`) or ``real`` (``real_sources``).
        image_size: side of the (square) network input; real images are resized and centre-cropped to it.
        labels: the label set (output order); empty = the generator's findings (synthetic) or the union of
            the real sources' labels.
        target: the class of interest.
        ratios: the fixed share of each source role in every batch of ``batch_size`` (on every DDP rank); roles
            an arm does not use are dropped and the rest renormalised.
        role_images: images of each source role per batch (all DDP ranks together); when set it replaces
            ``batch_size`` x ``ratios``, and the roles an arm does not use are dropped *without* renormalising,
            so every arm sees as many target-source images per step as target-only does and the multi-source arms
            add the other sources' images on top (batch sizes then differ between arms).
        intensity_window: per-image percentiles (low, high) mapped to 0 and 1 before augmentation, for every
            source, split and scored image (``window_intensity``); empty = images as loaded. Sources from
            different scanners differ in contrast and brightness; calibrated on validation (recipe README).
        val_fraction / test_fraction: shares of the target source's patients held out (real data only).
    """

    source: str = "synthetic"
    image_size: int = 64
    labels: list[str] = dataclasses.field(default_factory=list)
    target: str = TARGET
    ratios: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"target": 0.25, "assembled": 0.5, "unlabelled": 0.25}
    )
    role_images: dict[str, int] = dataclasses.field(default_factory=dict)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    real_sources: list[RealSource] = dataclasses.field(default_factory=list)
    intensity_window: list[float] = dataclasses.field(default_factory=lambda: [1.0, 99.0])
    val_fraction: float = 0.1
    test_fraction: float = 0.2


@dataclasses.dataclass
class ModelConfig:
    """The backbone (MONAI ``DenseNet``) and the output layer.

    Attributes:
        backbone: ``densenet_mini`` (``init_features``/``growth_rate``/``block_config``) or ``densenet121``.
        weights: optional local ``.safetensors`` for the backbone (never downloaded).
        adapter_dim: width of the adapter's keys, values and queries (arm ``assemble_adapter``).
        channels_last: keep the network's weights in ``channels_last`` memory format: the same maths summed in
            another order, and on this 2-core CPU the paper's two-view step of the miniature 1.46× faster with 1
            thread (90.8 → 62.3 ms at 40 images) and 1.35× with 2 (``benchmarks/data_assemble_speed.py``). The
            first six claim-preset registrations ran in the contiguous format, the seventh in this one.
        sync_bn: under DDP on CUDA, convert every BatchNorm to ``SyncBatchNorm`` so each view is normalised with
            the global batch's statistics (the card: optional). Off by default; on CPU ranks (gloo) it is ignored,
            since torch's SyncBatchNorm does not run there (running statistics are still averaged over ranks
            before every evaluation).
    """

    backbone: str = "densenet_mini"
    init_features: int = 16
    growth_rate: int = 8
    block_config: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 2, 2])
    weights: str = ""
    adapter_dim: int = 32
    channels_last: bool = True
    sync_bn: bool = False


@dataclasses.dataclass
class LossConfig:
    """The paper's loss: masked BCE + pseudo-label term + consistency term (each averaged over its entries).

    Attributes:
        tau / t: sharpening threshold and factor (a > tau: a + (1-a)/t; else a - a/t).
        pseudo_weight / consistency_weight: the terms' weights (the paper: 1 and 1).
        ema_decay: 0 (default, the paper) sharpens the network's own weak-view predictions; a decay in (0, 1)
            sharpens those of a mean teacher instead, an exponential moving average of the network's weights
            (buffers copied) run in eval mode on the weak view, as USB offers (the card: optional, off by
            default). Selection and export use the network itself, not the teacher.
    """

    tau: float = 0.5
    t: float = 4.0
    pseudo_weight: float = 1.0
    consistency_weight: float = 1.0
    ema_decay: float = 0.0


@dataclasses.dataclass
class OptimConfig:
    """Adam with the release's step decay (halved every ``halve_every`` steps; the release: every 3 epochs).
    The miniature's lr (3e-3, the release 2e-4 at batch 16 from ImageNet weights) was calibrated on validation:
    at 1e-3 the from-scratch network had not learnt the assembled findings within the budget."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    halve_every: int = 100


@dataclasses.dataclass
class SweepConfig:
    """The label-count sweep: ``arms`` trained with source A cut to each count in ``target_images`` (a quarter
    positive), same seeds. Empty ``target_images`` = no sweep."""

    target_images: list[int] = dataclasses.field(default_factory=list)
    arms: list[str] = dataclasses.field(default_factory=lambda: ["target_only", "assemble", "oracle"])


@dataclasses.dataclass
class DataAssembleConfig(UnitsConfig):
    """The whole recipe.

    Attributes:
        stages: ``data`` (build/reuse the cached sources), ``train`` (every arm x seed), ``eval`` (claims,
            tables, figures).
        arms: which of :data:`ARMS` to train.
        batch_size / max_steps: images per step (split over DDP ranks; the paper's method runs each twice, weak
            and strong view; unused when ``data.role_images`` fixes the images per source) and steps per unit.
        eval_every: validation AUC of the target every this many steps; the best step's weights are kept
            (selection on validation only).
        final_test: False skips the test split (calibration runs).
        on_par_margin: the "on par with the oracle" claim holds when the whole interval of (method − oracle)
            target AUC lies above −on_par_margin.
        works_margin: the "works" claim's margin over the training-free baseline (target AUC).
        figure_images: examples in the findings figure.
        trivial_k: neighbours of the training-free pixel k-NN baseline.
    """

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    arms: list[str] = dataclasses.field(default_factory=lambda: ["target_only", "naive", "assemble", "oracle"])
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    batch_size: int = 32
    max_steps: int = 300
    eval_every: int = 50
    eval_batch_size: int = 200
    log_every: int = 10
    final_test: bool = True
    on_par_margin: float = 0.02
    works_margin: float = 0.05
    figure_images: int = 8
    trivial_k: int = 5

    #: keys that only choose which units run (a resumed run may change them)
    SELECTORS: ClassVar[tuple[str, ...]] = ("arms", "sweep")

    def validate(self) -> None:
        super().validate()
        check_choices(
            ("stages", STAGES, self.stages),
            ("arms", ARMS, self.arms),
            ("sweep.arms", ARMS, self.sweep.arms),
        )
        if self.data.source not in SOURCES:
            raise ValueError(f"config key 'data.source' must be one of {list(SOURCES)}, got {self.data.source!r}")
        if self.model.backbone not in BACKBONES:
            raise ValueError(f"config key 'model.backbone' must be one of {list(BACKBONES)}")
        if self.data.source == "synthetic":
            labels = self.data.labels or list(FINDINGS)
            bad = [name for name in labels if name not in FINDINGS]
            if bad:
                raise ValueError(f"config key 'data.labels': unknown finding(s) {bad}; choose from {list(FINDINGS)}")
            if self.data.target not in labels:
                raise ValueError(f"config key 'data.target' ({self.data.target!r}) must be one of {labels}")
            syn = self.data.synthetic
            if not 0 < syn.target_positives < syn.target_images:
                raise ValueError("config key 'data.synthetic.target_positives' must be in (0, target_images)")
            if not 0.0 <= syn.assembled_target_prevalence <= 1.0:
                raise ValueError("config key 'data.synthetic.assembled_target_prevalence' must be in [0, 1]")
            check_choices(
                ("data.synthetic.assembled_domain", list(DOMAINS), [syn.assembled_domain]),
                ("data.synthetic.consolidation", CONSOLIDATION_STYLES, [syn.consolidation]),
            )
            for key in ("assembled_images", "unlabelled_images", "val_images", "test_images"):
                if getattr(syn, key) < 1:
                    raise ValueError(f"config key 'data.synthetic.{key}' must be >= 1")
            for n in self.sweep.target_images:
                if n < 4:
                    raise ValueError("config key 'sweep.target_images': every count must be >= 4")
        else:
            if not self.data.real_sources:
                raise ValueError("data.source=real needs config key 'data.real_sources' (a list of datasets)")
            roles = [s.role for s in self.data.real_sources]
            bad = [r for r in roles if r not in ROLES]
            if bad:
                raise ValueError(f"config key 'data.real_sources[].role': unknown {bad}; choose from {list(ROLES)}")
            if roles.count("target") != 1:
                raise ValueError("data.real_sources must name exactly one source with role 'target'")
            if self.sweep.target_images:
                raise ValueError("config key 'sweep.target_images' applies to data.source=synthetic only")
        window = self.data.intensity_window
        if window and not (len(window) == 2 and 0.0 <= window[0] < window[1] <= 100.0):
            raise ValueError(
                f"config key 'data.intensity_window' must be [] or two percentiles 0 <= low < high <= 100, got {window}"
            )
        ratios = self.data.ratios
        if set(ratios) - set(ROLES) or any(v <= 0 for v in ratios.values()) or "target" not in ratios:
            raise ValueError(f"config key 'data.ratios' maps roles {list(ROLES)} (target required) to shares > 0")
        counts = self.data.role_images
        if counts and (set(counts) - set(ROLES) or "target" not in counts or any(v < 1 for v in counts.values())):
            raise ValueError(
                f"config key 'data.role_images' maps roles {list(ROLES)} (target required) to image counts >= 1, "
                f"got {counts}"
            )
        if not counts and self.batch_size < len(self.data.ratios):
            raise ValueError(
                f"config key 'batch_size' ({self.batch_size}) must hold one image of each of the "
                f"{len(self.data.ratios)} source roles in 'data.ratios'"
            )
        for key in ("max_steps", "batch_size", "eval_every", "log_every", "eval_batch_size", "data.image_size"):
            obj, name = (self.data, key[5:]) if key.startswith("data.") else (self, key)
            if getattr(obj, name) < 1:
                raise ValueError(f"config key {key!r} must be >= 1")
        if self.optim.halve_every < 1:
            raise ValueError("config key 'optim.halve_every' must be >= 1")
        if not 0.0 < self.loss.tau < 1.0 or self.loss.t <= 1.0:
            raise ValueError("config keys 'loss.tau' in (0, 1) and 'loss.t' > 1 (the sharpening rule)")
        if not 0.0 <= self.loss.ema_decay < 1.0:
            decay = self.loss.ema_decay
            raise ValueError(f"config key 'loss.ema_decay' must be in [0, 1) (0: no teacher), got {decay}")
        if self.trivial_k < 1:
            raise ValueError("config key 'trivial_k' must be >= 1")
        if self.on_par_margin < 0 or self.works_margin < 0:
            raise ValueError("config keys 'on_par_margin' and 'works_margin' must be >= 0")

    @property
    def label_names(self) -> list[str]:
        """The output order (synthetic: the generator's findings unless ``data.labels`` narrows them)."""
        if self.data.labels:
            return list(self.data.labels)
        return list(FINDINGS) if self.data.source == "synthetic" else []
