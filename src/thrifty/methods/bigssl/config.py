"""Configuration of the BigSSL recipe; defaults = the ``quick`` miniature of the method card.

Arms: ``scratch`` (CTC or RNN-T from random weights), ``pretrained`` (wav2vec 2.0 or w2v-BERT on the unlabelled
audio, then CTC or RNN-T) and ``pretrained+nst`` (noisy-student generations on top of ``pretrained``), each at every
label fraction and seed. ``stages``, ``pretrain.objective``, ``finetune.init(s)``, ``finetune.fractions``,
``nst.fractions`` and ``nst.generations`` are selectors: they choose which units run, so they may change when a run
resumes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from thrifty.core.config import BaseConfig
from thrifty.data.speech import TASKS
from thrifty.methods.bigssl.features import SpecAugmentConfig
from thrifty.methods.bigssl.model import SIZES, ConformerSize

STAGES = ("data", "pretrain", "finetune", "nst", "evaluate")
INITS = ("scratch", "pretrained")
OBJECTIVES = ("wav2vec2", "w2v_bert")
SOURCES = ("synthetic", "librispeech", "manifest")
DECODERS = ("ctc", "rnnt")


@dataclasses.dataclass
class DataConfig:
    """Where the speech comes from.

    ``synthetic`` (default) speaks ``task`` texts with espeak-ng (and flite for the out-of-domain test set), see
    :mod:`thrifty.data.speech`; the counts below are its split sizes. ``task=digits`` (the calibrated miniature:
    connected digit strings and command phrases, a 23-word vocabulary) or ``task=sentences`` (read sentences of
    the shipped texts, an open vocabulary: too hard for the CPU budgets, see the README). ``librispeech`` reads the
    LibriSpeech layout under ``root`` (``labelled_splits``, ``dev_split``, ``test_splits``) and unlabelled audio
    from ``unlabelled_dir`` (Libri-Light style folders) or ``unlabelled_splits`` of LibriSpeech with their
    transcripts hidden. ``manifest`` reads JSONL/CSV/TSV manifests (``labelled_manifest`` …).

    Attributes:
        task: ``digits`` or ``sentences`` (synthetic source only).
        unlabelled, labelled, dev, test_in, test_ood: synthetic split sizes (utterances).
        min_words, max_words: utterance length range in words; speed (wpm) and pitch ranges of the espeak voices.
        noise_prob, snr_db, reverb_prob: optional corruptions of the synthetic audio.
        held_out_accent: the espeak accent only the out-of-domain test set speaks.
        use_flite: add flite voices to the out-of-domain test set when flite is installed.
        workers: synthesis threads.
        max_seconds: drop longer utterances (memory; LibriSpeech has 35 s ones).
        skip_bad: skip corrupt or empty audio files instead of stopping (the count is reported).
        seed: corpus seed (sentences, voices, splits).
    """

    source: str = "synthetic"
    task: str = "digits"
    unlabelled: int = 1200
    labelled: int = 300
    dev: int = 60
    test_in: int = 100
    test_ood: int = 60
    min_words: int = 2
    max_words: int = 6
    speed: list[int] = dataclasses.field(default_factory=lambda: [130, 200])
    pitch: list[int] = dataclasses.field(default_factory=lambda: [30, 70])
    noise_prob: float = 0.0
    snr_db: list[float] = dataclasses.field(default_factory=lambda: [10.0, 30.0])
    reverb_prob: float = 0.0
    held_out_accent: str = "en-gb-scotland"
    use_flite: bool = True
    workers: int = 2
    root: str = ""
    labelled_splits: list[str] = dataclasses.field(default_factory=lambda: ["train-clean-100"])
    unlabelled_splits: list[str] = dataclasses.field(default_factory=lambda: ["train-clean-360", "train-other-500"])
    unlabelled_dir: str = ""
    dev_split: str = "dev-clean"
    test_splits: list[str] = dataclasses.field(default_factory=lambda: ["test-clean", "test-other"])
    labelled_manifest: str = ""
    unlabelled_manifest: str = ""
    dev_manifest: str = ""
    test_manifests: list[str] = dataclasses.field(default_factory=list)
    max_seconds: float = 20.0
    skip_bad: bool = False
    seed: int = 0


@dataclasses.dataclass
class ModelConfig:
    """The Conformer (see :data:`thrifty.methods.bigssl.model.SIZES` for the paper's sizes).

    Attributes:
        size: a named size (``smoke``, ``quick``, ``xl``, ``xxl``, ``g``) or ``custom`` to use the fields below.
        subsample_channels: channels of the two subsampling convolutions (0: ``dim``, the usual choice; the
            miniatures use fewer, as the 3×3 convolution over 80 mel bins otherwise costs as much as the blocks).
    """

    size: str = "custom"
    dim: int = 96
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 384
    kernel_size: int = 15
    positions: str = "relative"
    dropout: float = 0.1
    subsample_channels: int = 32

    def shape(self) -> ConformerSize:
        """The named size's shape, or the fields above for ``custom``."""
        if self.size == "custom":
            return ConformerSize(
                dim=self.dim,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                ffn_dim=self.ffn_dim,
                kernel_size=self.kernel_size,
                positions=self.positions,
            )
        if self.size not in SIZES:
            raise ValueError(f"model.size must be 'custom' or one of {list(SIZES)}, got {self.size!r}")
        return SIZES[self.size]


@dataclasses.dataclass
class PretrainConfig:
    """Self-supervised pre-training on the unlabelled audio (one run, shared by every fraction and seed).

    Attributes:
        objective: ``wav2vec2`` (contrastive + diversity) or ``w2v_bert`` (contrastive module of
            ``contrastive_layers`` blocks, then masked prediction of the quantizer ids by the remaining blocks).
        mask_prob, mask_span: span masking of the subsampled frames (the start probability; wav2vec 2.0: 0.065, 10).
        num_negatives: distractors per masked frame, from other masked frames of the same utterance (paper: 100).
        kappa: temperature of the cosine similarities (0.1).
        diversity_weight: weight of the codebook diversity loss (the paper: 0.1; the miniatures use 1.0 — with 0.1 the
            codebook collapsed within 10 steps, perplexity 2.4 of 160).
        groups, codes, code_dim: the Gumbel product quantizer (G=2, V=320, 256 in the paper).
        temperature: Gumbel temperature from ``[start, end]``, decayed geometrically over ``max_steps``.
        mlm_weight: weight of the w2v-BERT masked-prediction loss (1, unverified).
        max_frames: batch budget in feature frames (padded length × utterances), length-bucketed.
        max_steps, lr, warmup, weight_decay: AdamW with linear warm-up then cosine decay.
        eval_every: steps between held-out pre-training losses (dev audio, labels unused).
        seed: the pre-training seed (one pre-training serves every fine-tuning seed, as the paper's protocol).
    """

    objective: str = "wav2vec2"
    mask_prob: float = 0.065
    mask_span: int = 5
    num_negatives: int = 50
    kappa: float = 0.1
    diversity_weight: float = 1.0
    groups: int = 2
    codes: int = 80
    code_dim: int = 128
    temperature: list[float] = dataclasses.field(default_factory=lambda: [2.0, 0.5])
    contrastive_layers: int = 2
    mlm_weight: float = 1.0
    max_frames: int = 4000
    max_steps: int = 200
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.01
    eval_every: int = 100
    seed: int = 0


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning (CTC, or RNN-T with ``decoder=rnnt``) on a fraction of the labelled pool.

    Attributes:
        inits: which starting points to fine-tune (``scratch``, ``pretrained``).
        init: when set, only this one (a selector).
        fractions: nested shares of the labelled pool (the same utterances for every arm and seed); the first is
            the "low" fraction of the claims.
        max_steps: optimiser steps per unit (the same for every fraction: a small fraction is seen for more epochs).
        max_frames, lr, weight_decay: as in pre-training; the new head (CTC, or prediction network + joint) gets
            ``lr``, the encoder ``lr`` (from scratch) or ``lr × encoder_lr_scale`` (pre-trained).
        warmup, hold: wav2vec 2.0's tri-stage schedule as shares of ``max_steps``: linear warm-up, the peak held,
            then exponential decay to 5% of the peak (the release: 0.1, 0.4). A schedule that decays over the whole
            of a short run left CTC in its blank-only phase after 150 steps; holding the peak lets it out.
        eval_every: greedy dev WER every this many steps; the best step is kept (dev chooses, test is read once).
        specaugment: SpecAugment on the training features.
        select_metric: the dev metric that chooses the kept step, ``wer`` (the papers) or ``cer``. The miniatures
            use ``cer``: on the open-vocabulary corpus dev WER sat near 100% for most of training, so WER picked
            arbitrary (often blank-only) early steps — the kept models' test CER ranged 62–114% at one setting.
        freeze_steps: a pre-trained encoder stays frozen for this many steps while the new CTC head learns
            (wav2vec 2.0's fine-tuning freezes the encoder for its first updates), then everything trains.
        encoder_lr_scale: a pre-trained encoder's learning rate is ``lr`` times this (the new head keeps ``lr``).
        decoder: ``ctc`` (a linear head, the CPU default) or ``rnnt`` (LSTM prediction network + joint, the paper's
            Conformers; see :class:`RNNTConfig`). RNN-T decodes greedily; LM fusion applies to CTC only.
        test: score the test sets after training. ``false`` for calibration pilots: dev only, and the access log
            shows that no test utterance was read.
    """

    inits: list[str] = dataclasses.field(default_factory=lambda: list(INITS))
    init: str = ""
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.1, 1.0])
    max_steps: int = 100
    max_frames: int = 3000
    lr: float = 2e-3
    warmup: float = 0.1
    hold: float = 0.4
    weight_decay: float = 0.01
    eval_every: int = 25
    specaugment: bool = True
    select_metric: str = "cer"
    freeze_steps: int = 0
    encoder_lr_scale: float = 1.0
    test: bool = True
    decoder: str = "ctc"


@dataclasses.dataclass
class RNNTConfig:
    """The transducer of ``finetune.decoder=rnnt`` (*Pushing the Limits*: a 2-layer LSTM of 640 and a 640 joint).

    Attributes:
        pred_dim: label embedding size; pred_hidden, pred_layers: the LSTM prediction network.
        joint_dim: the joint's hidden size (``Linear(tanh(W_e enc + W_p pred))``).
        chunk_size: utterances per chunk of the joint in the loss (the B×T×(U+1)×V tensor of one chunk at a time).
    """

    pred_dim: int = 64
    pred_hidden: int = 256
    pred_layers: int = 1
    joint_dim: int = 256
    chunk_size: int = 8


@dataclasses.dataclass
class DecodeConfig:
    """Decoding: greedy CTC, and CTC prefix beam search with shallow fusion of a character n-gram LM.

    Attributes:
        beam: prefix beam width.
        lm_order: the character n-gram's order (Witten-Bell); trained on sentences of the shipped texts that are
            disjoint from every audio split's transcripts (and, for real data, on the labelled transcripts).
        lm_sentences: sentences the LM is trained on.
        lm_weights, length_bonuses: the (λ, β) grid tuned on dev for each model; ``score = log p_CTC + λ log p_LM
            + β |y|``.
        use_lm: decode the test sets with the fused beam search too (greedy is always reported); off at ``quick``,
            where the Python beam search would cost a fifth of the budget.
    """

    beam: int = 8
    lm_order: int = 5
    lm_sentences: int = 20000
    lm_weights: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.3, 0.6])
    length_bonuses: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0, 2.0])
    use_lm: bool = False


@dataclasses.dataclass
class NSTConfig:
    """Noisy-student training (Park et al., *Improved Noisy Student Training*, arXiv 2005.09629).

    Attributes:
        generations: teacher → student rounds (the student of one generation teaches the next).
        fractions: label fractions that get NST (empty: all of ``finetune.fractions``).
        fusion: the teacher decodes the clean unlabelled audio with LM fusion (else greedy).
        tau: keep a pseudo-label when its length-normalised score ``(s − aℓ − b)/(σ√ℓ)`` exceeds tau; a, b, σ are
            fitted on the teacher's dev scores (ℓ = characters).
        balance: draw the kept pseudo-labels so their length histogram matches the labelled subset's.
        max_pseudo: at most this many pseudo-labelled utterances per generation (0: all kept).
        max_unlabelled: the teacher decodes at most this many unlabelled utterances (the first of a fixed order;
            0: all) — fused beam search in Python costs ~30 ms per utterance on one core.
        max_steps: student steps per generation; the student starts from the pre-trained checkpoint.
    """

    generations: int = 1
    fractions: list[float] = dataclasses.field(default_factory=list)
    fusion: bool = False
    tau: float = -1.0
    balance: bool = False
    max_pseudo: int = 0
    max_unlabelled: int = 0
    max_steps: int = 100


@dataclasses.dataclass
class BigSSLConfig(BaseConfig):
    """The whole recipe. ``seeds`` are the fine-tuning seeds; ``stages`` select what runs."""

    SELECTORS: ClassVar[tuple[str, ...]] = (
        "stages",
        "pretrain.objective",
        "finetune.init",
        "finetune.inits",
        "finetune.fractions",
        "nst.fractions",
        "nst.generations",
    )

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    specaugment: SpecAugmentConfig = dataclasses.field(default_factory=SpecAugmentConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    rnnt: RNNTConfig = dataclasses.field(default_factory=RNNTConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    nst: NSTConfig = dataclasses.field(default_factory=NSTConfig)

    def validate(self) -> None:
        super().validate()
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stages {bad}: choose from {list(STAGES)}")
        if self.pretrain.objective not in OBJECTIVES:
            raise ValueError(f"pretrain.objective must be one of {list(OBJECTIVES)}, got {self.pretrain.objective!r}")
        for init in [*self.finetune.inits, *([self.finetune.init] if self.finetune.init else [])]:
            if init not in INITS:
                raise ValueError(f"finetune.init(s) must be in {list(INITS)}, got {init!r}")
        if self.finetune.decoder not in DECODERS:
            raise ValueError(f"finetune.decoder must be one of {list(DECODERS)}, got {self.finetune.decoder!r}")
        if not self.finetune.encoder_lr_scale > 0:
            raise ValueError(f"finetune.encoder_lr_scale must be > 0, got {self.finetune.encoder_lr_scale}")
        small = [k for k, v in dataclasses.asdict(self.rnnt).items() if v < 1]
        if small:
            raise ValueError(f"rnnt.{small[0]} must be >= 1, got {getattr(self.rnnt, small[0])}")
        if (
            self.data.source == "synthetic"
            and self.data.task == "digits"
            and not 2 <= self.data.min_words <= self.data.max_words
        ):
            raise ValueError(
                f"data.task=digits needs 2 <= data.min_words <= data.max_words (a command is a verb and a direction), "
                f"got {self.data.min_words}..{self.data.max_words}"
            )
        if self.finetune.select_metric not in ("wer", "cer"):
            raise ValueError(f"finetune.select_metric must be 'wer' or 'cer', got {self.finetune.select_metric!r}")
        if self.data.task not in TASKS:
            raise ValueError(f"data.task must be one of {list(TASKS)}, got {self.data.task!r}")
        if self.data.source not in SOURCES:
            raise ValueError(f"data.source must be one of {list(SOURCES)}, got {self.data.source!r}")
        if not self.finetune.fractions or any(not 0 < f <= 1 for f in self.finetune.fractions):
            raise ValueError(f"finetune.fractions must be in (0, 1], got {self.finetune.fractions}")
        if any(f not in self.finetune.fractions for f in self.nst.fractions):
            raise ValueError(f"nst.fractions {self.nst.fractions} must be among finetune.fractions")
        if self.pretrain.objective == "w2v_bert" and not 0 < self.pretrain.contrastive_layers < self.num_layers:
            raise ValueError(
                f"pretrain.contrastive_layers ({self.pretrain.contrastive_layers}) must leave w2v-BERT at least one "
                f"MLM block of the {self.num_layers}"
            )

    @property
    def num_layers(self) -> int:
        return self.model.shape().num_layers

    @property
    def active_inits(self) -> list[str]:
        return [self.finetune.init] if self.finetune.init else list(self.finetune.inits)

    @property
    def nst_fractions(self) -> list[float]:
        return list(self.nst.fractions) or list(self.finetune.fractions)
