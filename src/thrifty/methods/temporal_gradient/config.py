"""Configuration of the temporal-gradient recipe (defaults = the ``quick`` miniature of the method card).

Xiao, Lee, Fan, Zhou, Ramanan, Jaiswal, Kalyanaraman, *Learning from Temporal Gradient for Semi-supervised
Action Recognition* (CVPR 2022, arXiv 2111.13241). An RGB network and a temporal-gradient (TG) network are
trained side by side on labelled and unlabelled clips: supervised cross-entropy on both, pseudo-labels from their
averaged weak-view predictions applied to strong views, feature alignment of RGB to a stopped-gradient TG at
four stages, and a cross-modal contrastive loss. Only the RGB network is used at test time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from thrifty.core.config import UnitsConfig, check_choices

#: the card's arms: (1) supervised (RGB only), (2) FixMatch tau 0.95, (3) FixMatch tau 0.3, (4) TG-full, and the
#: ablations of TG-full without alignment, without the contrastive term, and with RGB-only pseudo-labels
ARMS = (
    "supervised",
    "fixmatch_095",
    "fixmatch_03",
    "tg_full",
    "tg_no_align",
    "tg_no_contrast",
    "tg_rgb_pseudo",
)
STAGES = ("data", "train", "eval")
SOURCES = ("synthetic", "ucf101", "hmdb51", "kinetics")
RGB_NORMS = ("dataset", "clip")


#: The miniature's calibrated generator (README, calibration pilot, steps 12-19): at the generator's defaults the
#: supervised arm sits at chance even with 20% labels; a flat background without camera shake or pixel noise and
#: three times faster motion lift it to about 24% validation top-1 at 5% labels (chance 10%). The scene still
#: wraps around, so a single frame still carries no class.
CALIBRATED_SPEC: dict[str, Any] = {
    "background_contrast": 0.0,
    "camera_shake_std": 0.0,
    "noise_std": [0.0, 0.0],
    "translation_speed": [1.5, 2.5],
    "rotation_speed": [12.0, 20.0],
    "oscillation_amplitude": [4.0, 8.0],
}


@dataclasses.dataclass
class SyntheticConfig:
    """The ``MotionVideos`` generator (:mod:`thrifty.data.motion_videos`): the class lives only in the motion.

    Attributes:
        train_videos / val_videos / test_videos: split sizes (validation is held out of training; the release
            validates on its test list).
        num_frames / size: raw frames per video and their side.
        spec: overrides of :class:`~thrifty.data.motion_videos.MotionSpec` fields (the difficulty knobs); the
            default is :data:`CALIBRATED_SPEC`, the miniature's calibrated difficulty (``spec: {}`` gives the
            generator's own defaults).
        seed: the data seed; each split has its own derived seed and its own pool of MNIST digits.
    """

    train_videos: int = 2000
    val_videos: int = 300
    test_videos: int = 1000
    num_frames: int = 16
    size: int = 32
    spec: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(CALIBRATED_SPEC))
    seed: int = 2111


@dataclasses.dataclass
class RealConfig:
    """A real video dataset (``data.source`` = ucf101 | hmdb51 | kinetics; paths are the user's, never fetched).

    Attributes:
        video_root: folder of the videos (class sub-folders) or of raw-frame folders.
        split_dir: UCF-101 ``ucfTrainTestlist`` or the HMDB-51 split folder; for Kinetics the CSV listing.
        split: the official split number (UCF-101 and HMDB-51: 1-3).
        labelled_list: optional release-style labelled subset file ("frame_dir n_frames label"); empty = drawn
            stratified with ``data.labelled_fraction``.
        rawframes: read raw-frame folders (``frame_pattern``) instead of decoding videos.
        frame_pattern: file name of frame k inside a raw-frame folder (MMAction2's ``img_{:05d}.jpg``).
        short_side / aspect: decoded frames are centre-cropped to ``aspect`` (width / height) and resized to
            ``short_side`` x ``round(short_side * aspect)`` (the release: short side 256; UCF-101 and HMDB-51 are 4:3).
        kinetics_files: the training and validation CSVs inside ``split_dir`` (validation serves as test).
        seed: draws the validation videos held out of the official training list (``data.val_fraction``).
    """

    video_root: str = ""
    split_dir: str = ""
    split: int = 1
    labelled_list: str = ""
    rawframes: bool = False
    frame_pattern: str = "img_{:05d}.jpg"
    short_side: int = 256
    aspect: float = 4.0 / 3.0
    kinetics_files: list[str] = dataclasses.field(default_factory=lambda: ["train.csv", "validate.csv"])
    seed: int = 0


@dataclasses.dataclass
class DataConfig:
    """Clips, labelled subsets and batches.

    Attributes:
        source: ``synthetic`` (ships offline) or a real dataset (:class:`RealConfig`).
        labelled_fraction: share of the training split whose labels are used, stratified by class (the card's
            miniature: 5%); the unlabelled stream is the whole training split (the release's setting).
        val_fraction: share of a real training split held out for validation (stratified).
        clip_len / frame_interval: frames per clip and their spacing (the release: 8 x 8; the miniature's
            16-frame videos: 8 x 2 starting at raw frame 1, so every sampled frame has its predecessor for TG).
        crop_size: side of the network input; ``crop_area`` / ``crop_ratio`` the RandomResizedCrop ranges
            and ``flip_p`` the horizontal flip probability, shared by RGB and TG. The synthetic miniature does
            not flip: a mirror image turns "right" into "left" and "clockwise" into "counter-clockwise".
        modality: the motion modality of the second stream (``tg``, ``tg2`` or one registered by the user).
        rgb_norm: how the RGB stream is normalised: ``dataset`` (the release: ImageNet mean and std) or ``clip``
            (each clip's channels standardised over (T, H, W); the synthetic miniature's default, a documented
            deviation: its random per-video colours leave a fixed normalisation with offsets the tiny network does
            not learn past). The motion stream always uses the release's normalisation.
        labelled_per_step / unlabelled_per_step: clips per step of each stream (the card's miniature: 8 and 8,
            ratio 1:1), split over DDP ranks.
    """

    source: str = "synthetic"
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    real: RealConfig = dataclasses.field(default_factory=RealConfig)
    labelled_fraction: float = 0.05
    val_fraction: float = 0.1
    clip_len: int = 8
    frame_interval: int = 2
    crop_size: int = 32
    crop_area: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = dataclasses.field(default_factory=lambda: [0.75, 1.3333333])
    flip_p: float = 0.0
    modality: str = "tg"
    rgb_norm: str = "clip"
    labelled_per_step: int = 8
    unlabelled_per_step: int = 8


@dataclasses.dataclass
class ModelConfig:
    """Two separate R3D-18 networks (RGB and the motion modality), an I3D head and a contrast head each.

    Attributes:
        widths: channels of the four stages (the release: 64/128/256/512; the miniature 8/16/32/64).
        blocks: BasicBlocks per stage (R3D-18: 2/2/2/2).
        proj_dim: width of the contrast heads' 3-layer MLP (the release: 512).
        dropout: I3D head dropout (0.5).
        bn_eps: BatchNorm epsilon (the release: 1e-3).
        sync_bn: under DDP on CUDA, convert every BatchNorm to ``SyncBatchNorm`` (the release's setting). On CPU
            (gloo has no SyncBN) each rank normalises its own clips and precise BN's statistics are averaged.
    """

    widths: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 32, 64])
    blocks: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 2, 2])
    proj_dim: int = 64
    dropout: float = 0.5
    bn_eps: float = 1e-3
    sync_bn: bool = True


@dataclasses.dataclass
class LossConfig:
    """The card's loss weights and thresholds.

    Attributes:
        threshold: pseudo-label confidence threshold of the TG arms (the release's configs: 0.3; the code's
            hidden default 0.95 is the ``fixmatch_095`` arm's).
        warmup_fraction: share of the steps before pseudo-labels start (the release: epoch 30 of 180).
        pseudo_weight / align_weight / contrast_weight: term weights (the release: 1, 1, 1; the card's 0.5 is
            the release's ``SimCLRLoss_PTV_New.loss_weight``, which halves the *sum* of the two directions, and
            ``losses.nt_xent`` already returns their mean).
        temperature: NT-Xent temperature (0.5).
        gather_negatives: under DDP, gather both modalities' embeddings from every rank before the contrastive
            loss, so the negatives are the whole global batch (the release's ``differentiable_all_gather``); the
            gradient equals one process computing the loss on the global batch. No effect in one process.
    """

    threshold: float = 0.3
    warmup_fraction: float = 1.0 / 6.0
    pseudo_weight: float = 1.0
    align_weight: float = 1.0
    contrast_weight: float = 1.0
    temperature: float = 0.5
    gather_negatives: bool = True


@dataclasses.dataclass
class OptimConfig:
    """SGD with momentum, linear warm-up from ``warmup_ratio`` then cosine decay to 0, gradient clipping.

    The release: lr 0.2 for 8 GPUs x 5 videos (40 clips per step), momentum 0.9, weight decay 1e-4, clip 40,
    30 warm-up epochs of 180. ``lr`` here is for ``labelled_per_step + unlabelled_per_step`` clips per step (the
    global count, split over DDP ranks); ``scale_lr`` replaces it by 0.2 x (clips per step) / 40, the release's
    rate under the linear-scaling rule.

    Attributes:
        lr: peak learning rate (0.02: calibrated on the miniature's supervised arm, where 0.1 left the training
            loss at ln 10 and 0.05 barely below it).
        momentum / weight_decay / clip_norm: SGD settings and the gradient-norm clip.
        warmup_fraction / warmup_ratio: share of the steps of linear warm-up and the lr ratio it starts from.
        scale_lr: apply the linear-scaling rule from the release's 0.2 per 40 clips instead of ``lr``.
    """

    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_norm: float = 40.0
    warmup_fraction: float = 1.0 / 6.0
    warmup_ratio: float = 0.1
    scale_lr: bool = False


@dataclasses.dataclass
class SweepConfig:
    """The label-fraction sweep: ``arms`` trained at each fraction of ``labelled_fractions`` (same seeds)."""

    labelled_fractions: list[float] = dataclasses.field(default_factory=list)
    arms: list[str] = dataclasses.field(default_factory=lambda: ["supervised", "tg_full"])


@dataclasses.dataclass
class TemporalGradientConfig(UnitsConfig):
    """The whole recipe.

    Attributes:
        stages: ``data`` (build/reuse the cached videos), ``train`` (every arm x seed), ``eval`` (claims, tables,
            figures).
        arms: which of :data:`ARMS` to train.
        max_steps: optimisation steps per unit.
        eval_every: validation (RGB only) every this many steps; the best step's weights are kept.
        precise_bn_batches: batches of labelled + unlabelled weak clips over which BatchNorm statistics are
            recomputed before each evaluation (precise BN; 0 = off).
        eval_batch_size: clips per inference batch.
        test_clips / test_crops: views per test video, scores averaged (the release: 10 x 3; the miniature's
            16-frame videos hold one clip).
        final_test: False skips the test split (calibration runs).
        works_margin: the "works" claim's margin (accuracy points) over the single-frame baseline.
        trivial_steps: training steps of the single-frame classifier (the sanity control).
    """

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    arms: list[str] = dataclasses.field(
        default_factory=lambda: ["supervised", "fixmatch_095", "fixmatch_03", "tg_full"]
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    max_steps: int = 150
    eval_every: int = 25
    precise_bn_batches: int = 4
    eval_batch_size: int = 64
    log_every: int = 10
    test_clips: int = 1
    test_crops: int = 1
    final_test: bool = True
    works_margin: float = 10.0
    trivial_steps: int = 200

    #: keys that only choose which units run (a resumed run may change them)
    SELECTORS: ClassVar[tuple[str, ...]] = ("arms", "sweep")

    def validate(self) -> None:
        super().validate()
        check_choices(
            ("stages", STAGES, self.stages),
            ("arms", ARMS, self.arms),
            ("sweep.arms", ARMS, self.sweep.arms),
        )
        d = self.data
        if d.source not in SOURCES:
            raise ValueError(f"config key 'data.source' must be one of {list(SOURCES)}, got {d.source!r}")
        for key, value in (("data.labelled_fraction", d.labelled_fraction), *(
            ("sweep.labelled_fractions", f) for f in self.sweep.labelled_fractions
        )):  # fmt: skip
            if not 0.0 < value <= 1.0:
                raise ValueError(f"config key {key!r} must be in (0, 1], got {value}")
        if not 0.0 < d.val_fraction < 1.0:
            raise ValueError("config key 'data.val_fraction' must be in (0, 1)")
        if len(d.crop_area) != 2 or not 0.0 < d.crop_area[0] <= d.crop_area[1] <= 1.0:
            raise ValueError(
                f"config key 'data.crop_area' must be [low, high] with 0 < low <= high <= 1, got {d.crop_area}"
            )
        if len(d.crop_ratio) != 2 or not 0.0 < d.crop_ratio[0] <= d.crop_ratio[1]:
            raise ValueError(
                f"config key 'data.crop_ratio' must be [low, high] with 0 < low <= high, got {d.crop_ratio}"
            )
        if not 0.0 <= d.flip_p <= 1.0:
            raise ValueError("config key 'data.flip_p' must be in [0, 1]")
        check_choices(("data.rgb_norm", RGB_NORMS, [d.rgb_norm]))
        from thrifty.methods.temporal_gradient.tg import MODALITIES  # torch-level module, imported when validating

        if d.modality not in MODALITIES:
            raise ValueError(f"config key 'data.modality': unknown {d.modality!r}; choose from {sorted(MODALITIES)}")
        if d.source == "synthetic":
            syn = d.synthetic
            span = 1 + (d.clip_len - 1) * d.frame_interval
            usable = syn.num_frames - max(MODALITIES[d.modality].context, 1)
            if span > usable:
                raise ValueError(
                    f"config keys 'data.clip_len' x 'data.frame_interval' span {span} frames, more than the {usable} "
                    f"of data.synthetic.num_frames={syn.num_frames} that have the predecessor(s) "
                    f"data.modality={d.modality!r} reads"
                )
            for key in ("train_videos", "val_videos", "test_videos"):
                if getattr(syn, key) < 1:
                    raise ValueError(f"config key 'data.synthetic.{key}' must be >= 1")
        else:
            r = d.real
            missing = [k for k in ("video_root", "split_dir") if not getattr(r, k)]
            if missing:
                raise ValueError(
                    f"data.source={d.source} reads your copy of the dataset: set "
                    + ", ".join(f"'data.real.{k}'" for k in missing)
                    + " (nothing is downloaded)"
                )
            if r.short_side < d.crop_size or not 0.25 <= r.aspect <= 4.0:
                raise ValueError(
                    "config keys 'data.real.short_side' must be >= 'data.crop_size' and 'data.real.aspect' in "
                    f"[0.25, 4], got {r.short_side} and {r.aspect}"
                )
            if d.source == "kinetics" and len(r.kinetics_files) != 2:
                raise ValueError("config key 'data.real.kinetics_files' must name [training CSV, validation CSV]")
            if r.labelled_list and self.sweep.labelled_fractions:
                raise ValueError(
                    "config key 'data.real.labelled_list' fixes the labelled subset; the label-fraction sweep "
                    "needs stratified subsets (set sweep.labelled_fractions=[])"
                )
        for key in ("clip_len", "frame_interval", "crop_size", "labelled_per_step", "unlabelled_per_step"):
            if getattr(d, key) < 1:
                raise ValueError(f"config key 'data.{key}' must be >= 1")
        m = self.model
        if len(m.widths) != 4 or len(m.blocks) != 4 or min(m.widths) < 1 or min(m.blocks) < 1:
            raise ValueError("config keys 'model.widths' and 'model.blocks' list four positive values (R3D stages)")
        if not 0.0 <= m.dropout < 1.0 or m.bn_eps <= 0 or m.proj_dim < 1:
            raise ValueError("config keys 'model.dropout' in [0, 1), 'model.bn_eps' > 0, 'model.proj_dim' >= 1")
        if not 0.0 <= self.loss.threshold <= 1.0 or not 0.0 <= self.loss.warmup_fraction < 1.0:
            raise ValueError("config keys 'loss.threshold' in [0, 1] and 'loss.warmup_fraction' in [0, 1)")
        if self.loss.temperature <= 0:
            raise ValueError("config key 'loss.temperature' must be > 0")
        o = self.optim
        if o.lr <= 0 or o.clip_norm <= 0 or not 0.0 <= o.warmup_fraction < 1.0 or not 0.0 < o.warmup_ratio <= 1.0:
            raise ValueError(
                "config keys 'optim.lr' > 0, 'optim.clip_norm' > 0, 'optim.warmup_fraction' in [0, 1), "
                "'optim.warmup_ratio' in (0, 1]"
            )
        if self.test_crops not in (1, 3):
            raise ValueError("config key 'test_crops' must be 1 (centre) or 3 (three crops)")
        for key in ("max_steps", "eval_every", "eval_batch_size", "log_every", "test_clips"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1")
        if self.precise_bn_batches < 0 or self.trivial_steps < 1:
            raise ValueError("config keys 'precise_bn_batches' >= 0 and 'trivial_steps' >= 1")
