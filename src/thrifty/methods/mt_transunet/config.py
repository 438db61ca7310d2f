"""Configuration of the MT-TransUNet recipe (defaults = the ``quick`` miniature of the method card).

Chen, Chen, Zhou, Yuille, *MT-TransUNet: Mediating Multi-Task Tokens in Transformers for Skin Lesion
Segmentation and Classification* (arXiv 2112.01767). One Transformer over a CNN stem's tokens carries a CLS token
(classification) and the patch tokens (segmentation through TransUNet's cascaded upsampler); a parallel
signed-distance head and a dual-task consistency loss (after DTC, Luo et al. AAAI 2021) let images without a mask
train the segmentation branch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from thrifty.core.config import BaseConfig, check_choices

#: the card's arms: which task terms are on. ``seg+cls+dual+cs`` / ``+ac`` add the optional attention terms at
#: ``loss.optional_weight``.
ARMS = ("seg_only", "cls_only", "seg+cls", "seg+dual", "seg+cls+dual", "seg+cls+dual+cs", "seg+cls+dual+ac")
STAGES = ("data", "train", "eval")
SOURCES = ("synthetic", "isic2017")
BACKBONES = ("mini", "r50_vit_b16")
POS_EMBEDS = ("none", "learned")
CONS_ON = ("probs", "logits")
SEG_CE = ("channel", "release")
#: the classes, in the order of the classification head (ISIC-2017: melanoma, seborrheic keratosis, nevus)
CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")


#: The miniature's calibrated generator (recipe README, calibration pilot): at the generator's defaults the
#: segmentation-only arm reached 90.6 validation Jaccard at 500 steps (near what 64² outlines allow); a fainter
#: lesion, more hairs and more skin texture put it at 79.2 [76.1, 82.3], with classification-only at 77.5 mean AUC.
CALIBRATED_SPEC: dict[str, Any] = {"contrast": 0.45, "hair_prob": 0.5, "texture": 0.08}


@dataclasses.dataclass
class SyntheticConfig:
    """The procedural dermoscopy generator (:mod:`thrifty.data.dermoscopy`).

    Attributes:
        masked_images / unmasked_images: the two training halves (both carry class labels; only the first has
            masks; the release's 2,000 ISIC-2017 training images and 1,320 "Training_addition" images).
        val_images / test_images: validation (model selection) and the in-domain test split.
        shifted_test_images: the PH2-like test split (other skin tones and lighting); 0 = none.
        spec: overrides of the generator's difficulty knobs (:class:`thrifty.data.dermoscopy.LesionSpec`); the
            default is :data:`CALIBRATED_SPEC` (``spec: {}`` gives the generator's own defaults).
        seed: the data seed; each split is drawn from its own derived seed (split by image).
    """

    masked_images: int = 200
    unmasked_images: int = 200
    val_images: int = 100
    test_images: int = 200
    shifted_test_images: int = 200
    spec: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(CALIBRATED_SPEC))
    seed: int = 2112


@dataclasses.dataclass
class RealConfig:
    """ISIC-2017 (training, the unmasked "Training_addition" images, validation, test) and optionally PH2 as a
    shifted test set; every pattern and column is configurable (:mod:`thrifty.data.skin_lesions`)."""

    root: str = ""
    train_images: str = "ISIC-2017_Training_Data"
    train_masks: str = "ISIC-2017_Training_Part1_GroundTruth"
    train_labels: str = "ISIC-2017_Training_Part3_GroundTruth.csv"
    extra_images: str = ""
    extra_labels: str = ""
    val_images: str = "ISIC-2017_Validation_Data"
    val_masks: str = "ISIC-2017_Validation_Part1_GroundTruth"
    val_labels: str = "ISIC-2017_Validation_Part3_GroundTruth.csv"
    test_images: str = "ISIC-2017_Test_v2_Data"
    test_masks: str = "ISIC-2017_Test_v2_Part1_GroundTruth"
    test_labels: str = "ISIC-2017_Test_v2_Part3_GroundTruth.csv"
    image_pattern: str = "{id}.jpg"
    mask_pattern: str = "{id}_segmentation.png"
    ph2_root: str = ""


@dataclasses.dataclass
class AugmentConfig:
    """The release's training augmentation (:mod:`thrifty.methods.mt_transunet.augment`): a border crop with
    probability ``crop_prob`` removing a ``crop_fraction`` share of the side from every side, then vertical and
    horizontal flips (``flip``); optionally the release's per-batch random resize to one of ``random_sizes``
    (its ``--random_resize``: 192, 224, 256, 288, 320; empty = off — the release's own option fails at any side
    but 224, whose 14×14 token grid its loss hard-codes)."""

    crop_prob: float = 0.5
    crop_fraction: list[float] = dataclasses.field(default_factory=lambda: [0.03, 0.2])
    flip: bool = True
    random_sizes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DataConfig:
    """Where images come from.

    Attributes:
        source: ``synthetic`` (ships offline) or ``isic2017`` (``real``).
        image_size: network input side; synthetic images are drawn at it, real ones resized to it.
        masked_fraction: the share of the masked half whose masks are used (the masked-fraction sweep sets it;
            the rest of that half joins the mask-free stream).
    """

    source: str = "synthetic"
    image_size: int = 64
    masked_fraction: float = 1.0
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    real: RealConfig = dataclasses.field(default_factory=RealConfig)


@dataclasses.dataclass
class ModelConfig:
    """The network (:mod:`thrifty.methods.mt_transunet.model`).

    Attributes:
        backbone: ``mini`` (the card's conv stem + small ViT) or ``r50_vit_b16`` (TransUNet's R50-ViT-B/16).
        stem_channels: the mini stem's stage widths; each stage halves the resolution (64² -> 8×8 tokens).
        dim / num_layers / num_heads / mlp_dim: the Transformer.
        decoder_channels: the cascaded upsampler's block widths (one block per 2× upsampling).
        pos_embed: ``none`` (the release: the addition is commented out) or ``learned`` (an ablation).
        dropout: dropout in the Transformer (the release: 0.1 at ViT-B; 0 in the miniature).
        weights: optional local TransUNet/ViT ``.npz`` (R50-ViT-B/16) loaded into the ``full`` backbone; never
            downloaded.
        resnet_units: the R50 stem's blocks per stage (``r50_vit_b16`` only).
    """

    backbone: str = "mini"
    stem_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64])
    dim: int = 96
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 384
    # 32/16/8 rather than 64/32/16: the full-resolution blocks dominate a CPU step (about 160 -> 90 ms at batch 16)
    decoder_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 16, 8])
    pos_embed: str = "none"
    dropout: float = 0.0
    weights: str = ""
    resnet_units: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 9])


@dataclasses.dataclass
class LossConfig:
    """``L = CE_seg(masked) + w(e)·cons_weight·L_cons + sdf_weight·L_sdf + cls_weight·CE_cls(all)`` (+ optional terms).

    Attributes:
        sdf_weight / cls_weight / cons_weight: the release's 5, 0.25 and 1 (times the ramp).
        ramp_epochs: the consistency ramp's length ``w(e) = exp(-5 (1 - min(e, L)/L)²)`` (the release: 40 epochs).
        sdf_k: the steepness in ``σ(-k·SDF)`` (1500).
        cons_on: ``probs`` (our default: softmax probabilities against the soft mask) or ``logits`` (the release).
        seg_ce: ``channel`` (pixel cross-entropy over the two classes; default) or ``release`` (the release's
            ``MyLabelSmoothingLoss`` at its default ``dim=-1``, whose softmax runs over the image width — a defect
            kept only to reproduce it).
        label_smoothing: of CE_cls (the release: 0).
        optional_weight: the weight of ``cs``/``ac`` in the ``+cs``/``+ac`` arms (our choice: 0.1).
        att_weight / ds_weight: the release's optional attention-in-mask and deep-supervision terms (release: 0).
    """

    sdf_weight: float = 5.0
    cls_weight: float = 0.25
    cons_weight: float = 1.0
    ramp_epochs: float = 40.0
    sdf_k: float = 1500.0
    cons_on: str = "probs"
    seg_ce: str = "channel"
    label_smoothing: float = 0.0
    optional_weight: float = 0.1
    att_weight: float = 0.0
    ds_weight: float = 0.0


@dataclasses.dataclass
class OptimConfig:
    """Adam with the release's poly schedule ``lr·(1 - it/poly_steps)^power`` floored at ``min_lr``. The release's
    optimiser receives no weight decay (``utils/optimizer.py``; its ``--weight_decay 5e-4`` is never used).

    Attributes:
        poly_steps: the schedule's length (0 = ``max_steps``); the release decays over 40,000 iterations and then
            trains on at the floor to 500 epochs.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    power: float = 0.9
    min_lr: float = 5e-6
    poly_steps: int = 0


@dataclasses.dataclass
class TTAConfig:
    """Test-time augmentation (:func:`thrifty.methods.mt_transunet.inference.infer`), as the release's test: input
    ``sizes`` (bicubic; the release: 224, 256, 288; empty = the training size only) and the six rotated/flipped
    ``views``. Used for validation and test alike; the miniature uses none."""

    sizes: list[int] = dataclasses.field(default_factory=list)
    views: bool = False


@dataclasses.dataclass
class SweepConfig:
    """The masked-fraction sweep: ``arms`` trained with each fraction of the masked half's masks kept."""

    masked_fractions: list[float] = dataclasses.field(default_factory=list)
    arms: list[str] = dataclasses.field(default_factory=lambda: ["seg+cls", "seg+cls+dual"])


@dataclasses.dataclass
class MTTransUNetConfig(BaseConfig):
    """The whole recipe.

    Attributes:
        stages: ``data`` (build/reuse the cached images), ``train`` (every arm × seed), ``eval`` (claims, tables,
            figures).
        arms: which of :data:`ARMS` to train.
        batch_size: images per step; half masked, half mask-free (the two-stream sampler).
        max_steps / steps_per_epoch: the budget; an "epoch" (for the ramp) is ``steps_per_epoch`` steps
            (0 = the whole masked half's size / its share of a batch, whatever the masked fraction).
        eval_every: validation every this many steps; the steps with the best Jaccard (segmentation checkpoint)
            and the best mean melanoma/SK AUC (classification checkpoint) are kept.
        final_test: False skips the test splits (calibration runs).
        works_margin: the "works" claims' margin over the trivial baselines (Jaccard / AUC points).
        fixed_specificity: the operating point fixed on validation for the sensitivity diagnostic (the ISIC-2017
            challenge reports sensitivity at 82%, 89% and 95% specificity).
        noninferiority_margin: the optional terms "do not hurt" when the Jaccard interval of (with − without) lies
            above minus this many points.
        latency_reps / latency_reps_full: timed forward passes (batch 1) of the miniature and of the ``full``
            architecture for the parameters-and-latency table (0 skips the full one).
        figure_images: validation examples in the masks-over-images figure.
    """

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    arms: list[str] = dataclasses.field(default_factory=lambda: ["seg_only", "cls_only", "seg+cls", "seg+dual",
                                                                 "seg+cls+dual"])  # fmt: skip
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    tta: TTAConfig = dataclasses.field(default_factory=TTAConfig)
    batch_size: int = 16
    max_steps: int = 150
    steps_per_epoch: int = 0
    eval_every: int = 50
    eval_batch_size: int = 100
    log_every: int = 10
    final_test: bool = True
    works_margin: float = 5.0
    fixed_specificity: float = 0.89
    noninferiority_margin: float = 1.0
    latency_reps: int = 20
    latency_reps_full: int = 3
    figure_images: int = 8

    #: keys that only choose which units run (a resumed run may change them)
    SELECTORS: ClassVar[tuple[str, ...]] = ("arms", "sweep")

    def validate(self) -> None:
        super().validate()
        check_choices(("stages", STAGES, self.stages), ("arms", ARMS, self.arms), ("sweep.arms", ARMS, self.sweep.arms))
        for key, choices, value in (
            ("data.source", SOURCES, self.data.source),
            ("model.backbone", BACKBONES, self.model.backbone),
            ("model.pos_embed", POS_EMBEDS, self.model.pos_embed),
            ("loss.cons_on", CONS_ON, self.loss.cons_on),
            ("loss.seg_ce", SEG_CE, self.loss.seg_ce),
        ):
            if value not in choices:
                raise ValueError(f"config key {key!r} must be one of {list(choices)}, got {value!r}")
        if self.data.source == "isic2017" and not self.data.real.root:
            raise ValueError("data.source=isic2017 needs config key 'data.real.root' (the ISIC-2017 folder)")
        for key in ("max_steps", "batch_size", "eval_every", "log_every", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1")
        if self.batch_size % 2:
            raise ValueError(
                f"config key 'batch_size' must be even (half masked, half mask-free), got {self.batch_size}"
            )
        if self.data.image_size < 16:
            raise ValueError("config key 'data.image_size' must be >= 16")
        for f in [self.data.masked_fraction, *self.sweep.masked_fractions]:
            if not 0.0 < f <= 1.0:
                raise ValueError(
                    f"masked fractions (data.masked_fraction, sweep.masked_fractions) must be in (0, 1], got {f}"
                )
        if self.model.dim % self.model.num_heads:
            raise ValueError("config key 'model.dim' must be divisible by 'model.num_heads'")
        if self.optim.lr <= 0 or self.optim.min_lr < 0:
            raise ValueError("config keys 'optim.lr' > 0 and 'optim.min_lr' >= 0")
        if not 0.0 < self.fixed_specificity < 1.0:
            raise ValueError("config key 'fixed_specificity' must be in (0, 1)")
        if self.latency_reps < 1 or self.latency_reps_full < 0:
            raise ValueError("config keys 'latency_reps' >= 1 and 'latency_reps_full' >= 0")
        if self.works_margin < 0 or self.noninferiority_margin < 0:
            raise ValueError("config keys 'works_margin' and 'noninferiority_margin' must be >= 0")
        if any(s < 16 for s in self.tta.sizes) or any(s < 16 for s in self.data.augment.random_sizes):
            raise ValueError("config keys 'tta.sizes' and 'data.augment.random_sizes' list image sides >= 16")
        aug = self.data.augment
        if (
            not 0.0 <= aug.crop_prob <= 1.0
            or len(aug.crop_fraction) != 2
            or not 0 <= aug.crop_fraction[0] <= aug.crop_fraction[1] < 0.5
        ):
            raise ValueError("config keys 'data.augment.crop_prob' in [0, 1] and 'data.augment.crop_fraction' "
                             "[low, high] with 0 <= low <= high < 0.5")  # fmt: skip
        if self.optim.poly_steps < 0:
            raise ValueError("config key 'optim.poly_steps' must be >= 0 (0 = max_steps)")
        if self.steps_per_epoch < 0:
            raise ValueError("config key 'steps_per_epoch' must be >= 0")
