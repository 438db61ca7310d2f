"""Configuration of the Genesis recipe (Models Genesis / Semantic Genesis / TransVW); defaults = the ``quick``
miniature of the method card.

An *arm* is ``scratch`` or ``<pretext>/<off|on>``: the pretext task (``genesis``, ``inpaint``, ``shuffle``,
``rotation``) and the visual-words switch. ``genesis/off`` is Models Genesis, ``genesis/on`` is Semantic Genesis
(``transvw`` is accepted as an alias of ``genesis/on``), the other pretexts with ``on`` are the add-on grid.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from thrifty.core.config import BaseConfig, check_choices

PRETEXTS = ("genesis", "inpaint", "shuffle", "rotation")
STAGES = ("data", "discover", "pretrain", "finetune", "evaluate")
TASKS = ("ncc", "ncs")
SOURCES = ("phantom", "luna16")
SEG_LOSSES = ("bce_dice", "dice")  # NCS losses: ours (BCE + per-cube soft Dice), the Models Genesis release's
ALIASES = {"transvw": "genesis/on", "semantic_genesis": "genesis/on", "models_genesis": "genesis/off"}


def parse_arm(arm: str) -> tuple[str, bool] | None:
    """``"scratch"`` → None; ``"<pretext>/<off|on>"`` (or an alias) → (pretext, visual_words)."""
    arm = ALIASES.get(arm, arm)
    if arm == "scratch":
        return None
    pretext, _, switch = arm.partition("/")
    if pretext not in PRETEXTS or switch not in ("off", "on"):
        raise ValueError(
            f"unknown arm {arm!r}: use 'scratch' or '<pretext>/<off|on>' with pretext in {list(PRETEXTS)} "
            f"(aliases: {', '.join(ALIASES)})"
        )
    return pretext, switch == "on"


def arm_name(pretext: str, visual_words: bool) -> str:
    return f"{pretext}/{'on' if visual_words else 'off'}"


@dataclasses.dataclass
class DataConfig:
    """Where the CT comes from and how it is cut.

    Attributes:
        source: ``phantom`` (the procedural CT of :mod:`thrifty.data.ct_phantom`, generated and cached) or
            ``luna16`` (the challenge's download under ``root``, see :mod:`thrifty.data.luna16`).
        root: the LUNA16 folder (``subset0`` … ``subset9``, ``annotations.csv``, ``candidates[_V2].csv``).
        pretrain_subsets: LUNA16 subsets of the unlabelled pre-training pool (split by ``pretrain_val_fraction``).
        target_subsets: LUNA16 subsets of the target-task [train, validation, test] patients; validation and test
            must not be pre-trained on.
        max_scans: read at most this many scans per pool (0: all), for trying the pipeline on a few scans.
        shape: phantom volume (D, H, W).
        unlabelled_patients: pre-training pool (phantom cohort ``seed``), no labels used.
        pretrain_val_fraction: share of the unlabelled pool held out for the pretext validation loss (early
            stopping) and the validation members of the visual words.
        target_patients: (train, val, test) patient counts of the target-task cohort (phantom cohort ``seed + 1``,
            disjoint from the pre-training cohort).
        cube: pre-training and target-task cube (d, h, w); the papers use 64×64×32 = (32, 64, 64).
        cubes_per_patient: random pre-training cubes per unlabelled patient (the release: 32).
        margin: (z, y, x) voxels between a pre-training cube and the volume's border (the release: 30, 100, 100 on
            512² CT).
        max_dense_fraction: the release's lung filter: a pre-training cube is kept when its dense-voxel score
            (≥ -150 HU, see :func:`~thrifty.methods.genesis.data.dense_score`) is at most this (the release: 0.15).
        ncc_negatives_per_positive: false-positive candidates kept per true nodule in training (balanced like the
            card's 32 + 32), and ``ncc_eval_negatives_per_positive`` in validation/test.
        ncs_jitter: nodule centre offset (voxels, per axis) in segmentation cubes, so nodules are not always centred.
        seed: phantom cohort seed (pre-training cohort ``seed``, target cohort ``seed + 1``).
    """

    source: str = "phantom"
    root: str = ""
    pretrain_subsets: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4])
    target_subsets: list[list[int]] = dataclasses.field(default_factory=lambda: [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    max_scans: int = 0
    shape: list[int] = dataclasses.field(default_factory=lambda: [48, 64, 64])
    unlabelled_patients: int = 60
    pretrain_val_fraction: float = 0.2
    target_patients: list[int] = dataclasses.field(default_factory=lambda: [40, 20, 40])
    cube: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 32])
    cubes_per_patient: int = 32
    margin: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 4])
    max_dense_fraction: float = 0.5
    ncc_negatives_per_positive: int = 1
    ncc_eval_negatives_per_positive: int = 3
    ncs_jitter: int = 3
    seed: int = 0


@dataclasses.dataclass
class DiscoveryConfig:
    """Self-discovery of visual words (an auto-encoder on whole volumes, nearest patients, same-coordinate crops).

    Attributes:
        ae_size: auto-encoder input (d, h, w); the papers resize to 128×128×64.
        ae_steps, ae_batch_size, ae_lr: auto-encoder training (Adam, MSE).
        num_classes: visual words C (the release trains on 44 of 200 discovered).
        top_k_train: instances per word from the nearest training patients (the release: 200).
        top_k_val: instances per word from the nearest held-out patients (the release: 30).
        min_distance: voxels between word coordinates (the release: 5).
        multi_resolution: each training instance also gets two rescaled crops (the release's ``--multi_res``):
            in-plane side uniform in {round(50/64·s) … round(80/64·s) − 1} (the release's 50–79 for s = 64; 25–39
            for 32), corner shifted in-plane, depth exact, resized to the cube. Validation instances are exact crops
            only, as in the release.
        jitter: the rescaled crops' in-plane corner offset, U{−jitter … jitter − 1} per axis (the release: 10 for
            64-voxel cubes; the miniature: 5 for 32). Exact crops are never jittered.

    A word's coordinate is placed with the release's lung filter and border, which its pattern generator shares
    with its cube generator (``lung_max = 0.15``, ``len_border = 100``, ``len_border_z = 30`` in both): discovery
    reads ``data.max_dense_fraction`` and ``data.margin``.
    """

    ae_size: list[int] = dataclasses.field(default_factory=lambda: [24, 32, 32])
    ae_steps: int = 100
    ae_batch_size: int = 8
    ae_lr: float = 1e-3
    num_classes: int = 10
    top_k_train: int = 20
    top_k_val: int = 5
    min_distance: float = 5.0
    multi_resolution: bool = True
    jitter: int = 5


@dataclasses.dataclass
class PretrainConfig:
    """Pre-training of every arm.

    Attributes:
        width: U-Net width multiplier (1.0 = 64/128/256/512; the miniature: 0.125 = 8/16/32/64).
        max_steps, batch_size: optimiser steps and cubes per step.
        optimizer: ``auto`` follows the releases (Models Genesis-style arms, visual words off: SGD lr 1, momentum
            0.9; visual words on: Adam 1e-3), or ``sgd`` / ``adam`` for every arm.
        sgd_lr, adam_lr: the two learning rates; ``step_size``, ``gamma``: StepLR (the release: 40 epochs, 0.5),
            counted in validation rounds here.
        lambda_rec, lambda_cls: weights of the restoration (or rotation) loss and the visual-word CE
            (the release: 1 and 0.01; a float, unlike the release's ``int`` flag).
        eval_every: pretext validation loss every this many steps; the best weights are kept.
        val_cubes: held-out cubes (or visual-word instances) the validation loss is computed on.
        patience: stop after this many validations without improvement (the release: 50 epochs).
        per_seed: pre-train each arm once per seed (seed ``s`` fine-tunes the model pre-trained with ``s``);
            otherwise once with ``seed`` and every fine-tuning seed starts from it (the papers' protocol).
        seed: the pre-training seed when ``per_seed`` is false.
        pretext: when set, run only the arm ``<pretext>/<visual_words>`` instead of ``arms`` (with scratch when
            fine-tuning); a selector, so it may change when a run resumes.
        visual_words: the switch that goes with ``pretext``.
        sync_bn: under DDP on CUDA, synchronise BatchNorm statistics across ranks (SyncBatchNorm); without it each
            rank normalises with its own share of the batch and running statistics are averaged before validation.
        elastic_alpha, elastic_sigma: Semantic Genesis's in-plane elastic deformation (rows and columns, never
            depth), α and σ in voxels. The release's (991, 8) (the ``full`` preset) are for 64×64×32 cubes of ~1 mm
            CT: 4.6 voxels RMS in-plane displacement. The miniature's 32×32×16 phantom cubes have vessel radii
            under 2 voxels: σ is scaled with the cube (4) and α chosen for a displacement well below a vessel
            radius, (40, 4): 0.53 voxels RMS in-plane (0.37 per axis) on a 32×32×16 cube.
        rotation_weight: weight of the rotation CE for the ``rotation`` pretext (unverified in the paper: 1).
    """

    width: float = 0.125
    max_steps: int = 60
    batch_size: int = 8
    optimizer: str = "auto"
    sgd_lr: float = 1.0
    adam_lr: float = 1e-3
    step_size: int = 40
    gamma: float = 0.5
    lambda_rec: float = 1.0
    lambda_cls: float = 0.01
    rotation_weight: float = 1.0
    elastic_alpha: float = 40.0
    elastic_sigma: float = 4.0
    eval_every: int = 20
    val_cubes: int = 64
    patience: int = 50
    per_seed: bool = False
    sync_bn: bool = False
    seed: int = 0
    pretext: str = ""
    visual_words: bool = False


@dataclasses.dataclass
class FinetuneConfig:
    """Target tasks: NCC (nodule false-positive reduction, AUC) and NCS (nodule segmentation, IoU and Dice).

    Attributes:
        tasks: which target tasks to run.
        task: when set, run only this task (a selector, like ``pretrain.pretext``).
        label_fractions: shares of the training *patients* whose labels are used (the same patients for every arm
            and seed at one fraction); the first is the "low" fraction of the claims.
        max_steps, batch_size, lr: Adam fine-tuning; ``eval_every`` steps between validation scores (the best
            validation step is kept; test is scored once, with that model).
        patience: validations without improvement before stopping.
        test: score the test split after training. ``false`` for calibration pilots (run the ``data`` and
            ``finetune`` stages only): validation scores alone, and the access log shows no test read.
        augment: random flips of training cubes (and their masks).
        threshold: NCS mask threshold on the sigmoid.
        select_threshold: choose the NCS mask threshold on validation (0.05 … 0.95, with the step), instead of the
            fixed ``threshold``. Short fine-tuning ranks voxels before it calibrates them: after 40 steps many
            models put no voxel above 0.5.
        ncs_init: what NCS takes from a restoration arm: ``unet`` (encoder and decoder, as the papers) or
            ``encoder`` (a fresh decoder).
        new_head: NCS starts from the pre-trained encoder and decoder but a freshly initialised 1×1×1 output conv
            (the restoration head maps features to intensities, not mask logits); false loads it too, as the
            releases do.
        seg_loss: NCS training loss: ``bce_dice`` (BCE + per-cube soft Dice) or ``dice``, the Models Genesis
            release's Dice-only loss (1 − soft Dice pooled over the batch, ``dice_coef_loss``).
    """

    tasks: list[str] = dataclasses.field(default_factory=lambda: list(TASKS))
    task: str = ""
    label_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.2])
    test: bool = True
    max_steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    eval_every: int = 10
    patience: int = 10
    augment: bool = True
    threshold: float = 0.5
    select_threshold: bool = True
    ncs_init: str = "unet"
    new_head: bool = False
    seg_loss: str = "bce_dice"


@dataclasses.dataclass
class GenesisConfig(BaseConfig):
    """Everything ``thrifty run genesis`` reads.

    Attributes:
        stages: ``data`` (phantoms, cubes, manifest), ``discover`` (visual words), ``pretrain``, ``finetune``,
            ``evaluate`` (claims, tables, figures).
        arms: ``scratch`` and ``<pretext>/<off|on>`` (pretext in genesis, inpaint, shuffle, rotation).
        figure_examples: cubes in the restoration figure.
        channels_last: keep 5-D tensors and conv weights in ``channels_last_3d`` (about 1.5× faster 3-D
            convolutions on CPU; numerically the same computation up to summation order).
    """

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    arms: list[str] = dataclasses.field(
        default_factory=lambda: ["scratch", "genesis/off", "genesis/on", "inpaint/off", "inpaint/on"]
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    discovery: DiscoveryConfig = dataclasses.field(default_factory=DiscoveryConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    figure_examples: int = 4
    log_every: int = 10
    channels_last: bool = True

    SELECTORS: ClassVar[tuple[str, ...]] = ("pretrain.pretext", "pretrain.visual_words", "finetune.task")

    def validate(self) -> None:
        super().validate()
        if not self.finetune.test and "evaluate" in self.stages:
            raise ValueError(
                "finetune.test=false is for calibration pilots, which must not score the test split: run "
                "stages=[data,discover,pretrain,finetune] (no evaluate)"
            )
        check_choices(
            ("stages", STAGES, self.stages),
            ("finetune.tasks", TASKS, self.finetune.tasks),
        )
        if not self.arms:
            raise ValueError("config key 'arms' must list at least one arm")
        if self.pretrain.pretext and self.pretrain.pretext not in PRETEXTS:
            raise ValueError(f"config key 'pretrain.pretext' must be one of {list(PRETEXTS)} (or empty)")
        if self.finetune.task and self.finetune.task not in TASKS:
            raise ValueError(f"config key 'finetune.task' must be one of {list(TASKS)} (or empty)")
        for arm in self.arms:
            try:
                parse_arm(arm)
            except ValueError as err:
                raise ValueError(f"config key 'arms': {err}") from None
        canonical = [ALIASES.get(a, a) for a in self.arms]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"config key 'arms' lists an arm twice (aliases included): {self.arms}")
        d = self.data
        if d.source not in SOURCES:
            raise ValueError(f"config key 'data.source' must be one of {list(SOURCES)}")
        for key, v in (("data.shape", d.shape), ("data.cube", d.cube), ("discovery.ae_size", self.discovery.ae_size)):
            if len(v) != 3 or any(s < 1 for s in v):
                raise ValueError(f"config key {key!r} must be three positive ints (d, h, w), got {v}")
        if any(s % 8 for s in d.cube):
            raise ValueError(f"config key 'data.cube' must be divisible by 8 on every axis (3 poolings), got {d.cube}")
        if any(s % 8 for s in self.discovery.ae_size):
            raise ValueError(
                f"config key 'discovery.ae_size' must be divisible by 8 on every axis, got {self.discovery.ae_size}"
            )
        if d.cube[1] != d.cube[2]:
            raise ValueError("config key 'data.cube': h and w must be equal (the rotation pretext rotates in-plane)")
        if len(d.target_patients) != 3 or min(d.target_patients) < 1:
            raise ValueError("config key 'data.target_patients' is [train, val, test] patient counts, each >= 1")
        if not 0.0 < d.pretrain_val_fraction < 1.0:
            raise ValueError("config key 'data.pretrain_val_fraction' must be in (0, 1)")
        if d.source == "luna16":
            self._validate_luna16()
        n_val = round(d.unlabelled_patients * d.pretrain_val_fraction)
        n_train = d.unlabelled_patients - n_val
        if d.source == "phantom" and (n_val < 1 or n_train < 2):
            raise ValueError(
                "config key 'data.unlabelled_patients' is too small for data.pretrain_val_fraction "
                f"({n_train} training / {n_val} validation patients)"
            )
        v = self.discovery
        words = any(parse_arm(a) and parse_arm(a)[1] for a in self.canonical_arms)  # type: ignore[index]
        if words and d.source == "phantom":  # LUNA16 pool sizes are known once read; discovery checks them then
            if v.num_classes < 2:
                raise ValueError("config key 'discovery.num_classes' must be >= 2 when an arm uses visual words")
            if v.num_classes > n_train:
                raise ValueError(
                    f"config key 'discovery.num_classes' ({v.num_classes}) exceeds the {n_train} unlabelled training "
                    "patients (each word needs its own reference patient)"
                )
            if not 1 <= v.top_k_train <= n_train or not 1 <= v.top_k_val <= n_val:
                raise ValueError(
                    f"config keys 'discovery.top_k_train'/'top_k_val' must be in [1, {n_train}] / [1, {n_val}]"
                )
        p, f = self.pretrain, self.finetune
        if p.optimizer not in ("auto", "sgd", "adam"):
            raise ValueError("config key 'pretrain.optimizer' must be auto, sgd or adam")
        if p.width <= 0:
            raise ValueError("config key 'pretrain.width' must be > 0")
        for key, value in (
            ("pretrain.max_steps", p.max_steps),
            ("pretrain.batch_size", p.batch_size),
            ("pretrain.eval_every", p.eval_every),
            ("pretrain.patience", p.patience),
            ("pretrain.step_size", p.step_size),
            ("finetune.max_steps", f.max_steps),
            ("finetune.batch_size", f.batch_size),
            ("finetune.eval_every", f.eval_every),
            ("finetune.patience", f.patience),
            ("discovery.ae_steps", v.ae_steps),
            ("data.cubes_per_patient", d.cubes_per_patient),
            ("log_every", self.log_every),
        ):
            if value < 1:
                raise ValueError(f"config key {key!r} must be >= 1")
        if f.ncs_init not in ("unet", "encoder"):
            raise ValueError("config key 'finetune.ncs_init' must be unet or encoder")
        if f.seg_loss not in SEG_LOSSES:
            raise ValueError(f"config key 'finetune.seg_loss' must be one of {list(SEG_LOSSES)}, got {f.seg_loss!r}")
        if not f.label_fractions or any(not 0.0 < x <= 1.0 for x in f.label_fractions):
            raise ValueError("config key 'finetune.label_fractions' must list fractions in (0, 1]")
        if p.lambda_rec < 0 or p.lambda_cls < 0 or p.rotation_weight <= 0:
            raise ValueError("config keys 'pretrain.lambda_rec'/'lambda_cls' must be >= 0, 'rotation_weight' > 0")
        if not 0.0 <= d.max_dense_fraction <= 1.0:
            raise ValueError("config key 'data.max_dense_fraction' must be in [0, 1]")
        if len(d.margin) != 3 or min(d.margin) < 0:
            raise ValueError("config key 'data.margin' must be three non-negative ints (z, y, x)")

    def _validate_luna16(self) -> None:
        d = self.data
        if not d.root:
            raise ValueError("config key 'data.root' is required for data.source=luna16 (the LUNA16 folder)")
        if len(d.target_subsets) != 3 or not all(d.target_subsets):
            raise ValueError("config key 'data.target_subsets' is [train, val, test] lists of LUNA16 subsets")
        allowed = set(range(10))
        if not set(d.pretrain_subsets) <= allowed or not all(set(s) <= allowed for s in d.target_subsets):
            raise ValueError("LUNA16 subsets are 0 … 9 (config keys 'data.pretrain_subsets'/'data.target_subsets')")
        tr, va, te = (set(s) for s in d.target_subsets)
        if tr & va or tr & te or va & te:
            raise ValueError(f"config key 'data.target_subsets': train/val/test share subsets {d.target_subsets}")
        if set(d.pretrain_subsets) & (va | te):
            raise ValueError(
                "config key 'data.pretrain_subsets' includes target validation/test subsets "
                f"{sorted(set(d.pretrain_subsets) & (va | te))}: those patients may not be pre-trained on"
            )

    @property
    def canonical_arms(self) -> list[str]:
        """Arms with aliases resolved, in config order; with ``pretrain.pretext`` set, scratch (when listed) and
        that one arm."""
        arms = [ALIASES.get(a, a) for a in self.arms]
        if self.pretrain.pretext:
            chosen = arm_name(self.pretrain.pretext, self.pretrain.visual_words)
            return [a for a in arms if a == "scratch"] + [chosen]
        return arms

    @property
    def tasks(self) -> list[str]:
        """Target tasks to run (``finetune.task`` narrows ``finetune.tasks``)."""
        return [self.finetune.task] if self.finetune.task else list(self.finetune.tasks)

    @property
    def unlabelled_split(self) -> tuple[int, int]:
        """(training, validation) patient counts of the unlabelled pool."""
        n_val = round(self.data.unlabelled_patients * self.data.pretrain_val_fraction)
        return self.data.unlabelled_patients - n_val, n_val
