"""Configuration of the GLaM recipe (defaults = the ``quick`` miniature; presets override them)."""

from __future__ import annotations

import dataclasses

from thrifty.core.config import PRECISIONS, BaseConfig
from thrifty.methods.glam.model import MoESettings
from thrifty.methods.glam.moe import MODES

ARMS = ("moe", "dense-active", "dense-params")
# Ablations of the moe arm (card: aux 0 vs 0.01; cf 1 vs 2; E in {4, 8, 16} at fixed activated FLOPs;
# dropless), plus top-1 and expert-choice routing.
ABLATIONS = ("aux0", "cf1", "experts4", "experts16", "dropless", "top1", "expert_choice")


@dataclasses.dataclass
class ModelConfig:
    """Transformer shape shared by all arms; ``ffn_dim`` is the width of each expert.

    The ``moe`` arm uses ``ffn_dim`` in its dense layers too; the dense arms get their FFN width from
    :mod:`thrifty.methods.glam.baselines` (matched activated FLOPs or matched total parameters).
    """

    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 512
    vocab_size: int = 4096
    seq_len: int = 128
    num_buckets: int = 32
    max_distance: int = 128
    init_std: float = 0.02
    activation_checkpointing: bool = False


@dataclasses.dataclass
class LossConfig:
    """Loss weights: load balancing 0.01, output z-loss 1e-4, router z-loss off (GLaM/Praxis)."""

    aux_weight: float = 0.01
    z_weight: float = 1e-4
    router_z_weight: float = 0.0


@dataclasses.dataclass
class DataConfig:
    """Corpus mixture.

    Attributes:
        sources: shipped corpora (``shakespeare``, ``kjv``, ``fortunes``).
        weights: sampling weight of each source.
        mixture_file: YAML mixture of real corpora (``.txt``/``.jsonl[.gz]``); replaces ``sources``.
        holdout: fraction of whole documents held out for validation, and again for test.
        eval_windows: windows per source in each validation evaluation (during training).
        test_windows: windows per source in the single test evaluation (0 = every window).
    """

    sources: list[str] = dataclasses.field(default_factory=lambda: ["shakespeare", "kjv", "fortunes"])
    weights: list[float] = dataclasses.field(default_factory=lambda: [0.4, 0.4, 0.2])
    mixture_file: str = ""
    holdout: float = 0.1
    eval_windows: int = 32
    test_windows: int = 96


@dataclasses.dataclass
class OptimConfig:
    """Optimiser and schedule. ``adafactor`` with ``rsqrt`` decay is the paper's; AdamW+cosine is the
    CPU default because it is more forgiving at a few hundred steps."""

    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclasses.dataclass
class GlamConfig(BaseConfig):
    """Everything ``thrifty run glam`` reads.

    Attributes:
        arms: which of ``moe``, ``dense-active``, ``dense-params`` to train (all seeds each).
        ablations: moe variants to train on the first ``ablation_seeds`` seeds.
        ablation_seeds: how many seeds the ablations use (claims need >= 2).
        batch_size: global sequences per step (split over DDP ranks).
        max_steps: optimiser steps per unit.
        eval_every / log_every / checkpoint_every: in steps; checkpoints fall on log steps.
        eval_batch_size: sequences per evaluation forward.
        expert_parallel: shard experts over the ranks with all-to-all dispatch.
        fsdp: shard every other parameter with FSDP2 instead of replicating it with DDP (with
            ``expert_parallel`` the experts stay per-rank); checkpoints are then per rank.
        precision: ``fp32`` or ``bf16`` (autocast; router, softmax and losses stay fp32).
    """

    arms: list[str] = dataclasses.field(default_factory=lambda: list(ARMS))
    ablations: list[str] = dataclasses.field(default_factory=list)
    ablation_seeds: int = 1
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    moe: MoESettings = dataclasses.field(default_factory=MoESettings)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch_size: int = 16
    max_steps: int = 60
    eval_every: int = 20
    log_every: int = 5
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    eval_batch_size: int = 32
    expert_parallel: bool = False
    fsdp: bool = False
    precision: str = "fp32"

    def validate(self) -> None:
        super().validate()
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"config key 'arms': unknown {bad}; choose from {list(ARMS)}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"config key 'ablations': unknown {bad}; choose from {list(ABLATIONS)}")
        if not 1 <= self.ablation_seeds <= len(self.seeds):
            raise ValueError("config key 'ablation_seeds' must be between 1 and len(seeds)")
        if self.model.num_layers % 2:
            raise ValueError("config key 'model.num_layers' must be even (an MoE in every pair of layers)")
        if self.model.dim % self.model.num_heads:
            raise ValueError("config key 'model.dim' must be divisible by 'model.num_heads'")
        for key in ("max_steps", "batch_size", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1")
        if self.checkpoint_every % self.log_every:
            raise ValueError("config key 'checkpoint_every' must be a multiple of 'log_every'")
        if self.moe.mode not in MODES:
            raise ValueError(f"config key 'moe.mode' must be one of {'|'.join(MODES)}")
        if self.moe.dispatch not in ("index", "einsum"):
            raise ValueError("config key 'moe.dispatch' must be index|einsum")
        if self.moe.second_policy not in ("all", "sampling", "random"):
            raise ValueError("config key 'moe.second_policy' must be all|sampling|random")
        if self.moe.aux_norm not in ("nonpad", "legacy"):
            raise ValueError("config key 'moe.aux_norm' must be nonpad|legacy")
        if self.precision not in PRECISIONS:
            raise ValueError("config key 'precision' must be fp32|bf16")
        if self.optim.name not in ("adamw", "adafactor"):
            raise ValueError("config key 'optim.name' must be adamw|adafactor")
        if self.optim.schedule not in ("cosine", "rsqrt", "constant"):
            raise ValueError("config key 'optim.schedule' must be cosine|rsqrt|constant")
        if len(self.data.sources) != len(self.data.weights) and not self.data.mixture_file:
            raise ValueError("config keys 'data.sources' and 'data.weights' must have the same length")
