"""Student architectures: the MobileBERT search space, the hand-designed baselines and how students are built.

AutoDistill (arXiv 2201.08539) searches MobileBERT's knobs. Searched: ``num_hidden_layers``, ``hidden_size``,
``intra_bottleneck_size``, ``num_attention_heads``, ``intermediate_size``, ``num_feedforward_networks``; every
other ``MobileBertConfig`` field keeps its default (``embedding_size=128`` with trigram input,
``normalization_type="no_norm"``, ReLU, ...). Heads must divide the bottleneck width, which is the attention
width (``true_hidden_size``).

Plain BERT students (``kind="bert"``: the DistilBERT-like baseline) are ``BertConfig`` models. Every student
shares the teacher's vocabulary, position and type tables so soft labels line up token by token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import nn

KNOBS = ("num_layers", "hidden_size", "intra_bottleneck_size", "num_heads", "intermediate_size", "num_ffn")


@dataclasses.dataclass(frozen=True)
class Arch:
    """One student architecture.

    ``kind`` is ``mobilebert`` (bottlenecked MobileBERT blocks with ``num_ffn`` stacked FFNs) or ``bert``
    (``intra_bottleneck_size`` and ``num_ffn`` are then unused and must be 0 and 1). ``norm`` and ``act`` are
    MobileBERT's ``normalization_type`` and ``hidden_act``: the searched students keep MobileBERT's defaults
    (``no_norm``, ReLU); the DistilBERT-like student of an IB-BERT teacher takes the teacher's (LayerNorm, GELU)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    intra_bottleneck_size: int = 0
    num_ffn: int = 1
    embedding_size: int = 128
    kind: str = "mobilebert"
    norm: str = "no_norm"
    act: str = "relu"

    def validate(self) -> None:
        if self.kind not in ("mobilebert", "bert"):
            raise ValueError(f"unknown student kind {self.kind!r} (mobilebert or bert)")
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "num_ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 in {self}")
        width = self.intra_bottleneck_size if self.kind == "mobilebert" else self.hidden_size
        if self.kind == "mobilebert" and self.intra_bottleneck_size < 1:
            raise ValueError(f"a MobileBERT student needs intra_bottleneck_size >= 1: {self}")
        if width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide the attention width {width} "
                f"({'intra_bottleneck_size' if self.kind == 'mobilebert' else 'hidden_size'}) in {self}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        """A short stable id (cache key, file names)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        if self.kind == "bert":
            return f"BERT L{self.num_layers} d{self.hidden_size} h{self.num_heads} ffn{self.intermediate_size}"
        extra = "" if (self.norm, self.act) == ("no_norm", "relu") else f" {self.norm} {self.act}"
        return (
            f"L{self.num_layers} d{self.hidden_size} b{self.intra_bottleneck_size} h{self.num_heads} "
            f"i{self.intermediate_size} f{self.num_ffn}{extra}"
        )


def mobilebert_like(hidden_size: int = 384, embedding_size: int = 128) -> Arch:
    """The card's hand-designed MobileBERT-like student (6 layers, bottleneck 96, 4 heads, FFN 384 ×4)."""
    return Arch(
        num_layers=6, hidden_size=hidden_size, intra_bottleneck_size=96, num_heads=4, intermediate_size=384, num_ffn=4,
        embedding_size=embedding_size,
    )  # fmt: skip


def distilbert_like(teacher_config: Any) -> Arch:
    """DistilBERT's recipe for this teacher: half its depth, its block unchanged, initialised from teacher layers
    0, 2, 4, ... (:func:`build_encoder`). A BERT teacher gives a ``BertConfig`` student (the card's baseline); an
    IB-BERT (MobileBERT-type) teacher gives a MobileBERT student with the teacher's block, norm and activation."""
    if teacher_config.model_type == "mobilebert":
        return Arch(
            num_layers=max(1, teacher_config.num_hidden_layers // 2),
            hidden_size=teacher_config.hidden_size,
            intra_bottleneck_size=teacher_config.intra_bottleneck_size,
            num_heads=teacher_config.num_attention_heads,
            intermediate_size=teacher_config.intermediate_size,
            num_ffn=teacher_config.num_feedforward_networks,
            embedding_size=teacher_config.embedding_size,
            norm=teacher_config.normalization_type,
            act=teacher_config.hidden_act,
        )
    return Arch(
        num_layers=max(1, teacher_config.num_hidden_layers // 2),
        hidden_size=teacher_config.hidden_size,
        num_heads=teacher_config.num_attention_heads,
        intermediate_size=teacher_config.intermediate_size,
        kind="bert",
        embedding_size=teacher_config.hidden_size,
    )


def hf_config(arch: Arch, teacher_config: Any) -> Any:
    """The transformers config of ``arch``, sharing the teacher's vocabulary and tables, eager attention."""
    from transformers import BertConfig, MobileBertConfig

    arch.validate()
    shared = dict(
        vocab_size=teacher_config.vocab_size,
        max_position_embeddings=teacher_config.max_position_embeddings,
        type_vocab_size=teacher_config.type_vocab_size,
        pad_token_id=teacher_config.pad_token_id,
    )
    if arch.kind == "bert":
        cfg = BertConfig(
            num_hidden_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            num_attention_heads=arch.num_heads,
            intermediate_size=arch.intermediate_size,
            **shared,
        )
    else:
        cfg = MobileBertConfig(
            num_hidden_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            intra_bottleneck_size=arch.intra_bottleneck_size,
            true_hidden_size=arch.intra_bottleneck_size,
            num_attention_heads=arch.num_heads,
            intermediate_size=arch.intermediate_size,
            num_feedforward_networks=arch.num_ffn,
            embedding_size=arch.embedding_size,
            normalization_type=arch.norm,
            hidden_act=arch.act,
            **shared,
        )
    cfg._attn_implementation = "eager"  # sdpa returns no attention maps, which layer-wise transfer needs
    return cfg


def pca_embeddings(encoder: nn.Module, teacher_embeddings: torch.Tensor) -> None:
    """Initialise a MobileBERT student's narrow trigram embeddings from the teacher's wider ones.

    The word table (V, e) becomes the teacher's table projected on its top-``e`` principal directions P (d, e),
    and ``embedding_transformation`` (3e → d) maps the centre token's slot back with Pᵀ (neighbour slots start at
    zero), so the student's first hidden states start as the best rank-e approximation of the teacher's
    embeddings. A flagged deviation: MobileBERT copies a same-shape embedding from its IB-BERT teacher."""
    emb = encoder.embeddings
    e = emb.word_embeddings.weight.shape[1]
    _, _, vh = torch.linalg.svd(teacher_embeddings.float(), full_matrices=False)
    p = torch.zeros(teacher_embeddings.shape[1], e)  # (d, e); columns past the teacher's rank stay zero
    k = min(e, vh.shape[0])
    p[:, :k] = vh[:k].T
    transform = emb.embedding_transformation.weight  # (d, 3e) when trigram input is on
    with torch.no_grad():
        emb.word_embeddings.weight.copy_(teacher_embeddings.float() @ p)
        w = torch.zeros_like(transform)
        w[:, e : 2 * e] = p if transform.shape[1] == 3 * e else 0.0
        if transform.shape[1] == e:
            w.copy_(p)
        transform.copy_(w)
        emb.embedding_transformation.bias.zero_()


def _same_block(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether a student layer has exactly the teacher's block (names, shapes, norm and activation)."""
    if student.config.model_type != teacher.config.model_type:
        return False
    keys = ("hidden_act", "normalization_type", "num_attention_heads", "key_query_shared_bottleneck")
    if any(getattr(student.config, k, None) != getattr(teacher.config, k, None) for k in keys):
        return False
    s0 = {k: v.shape for k, v in student.encoder.layer[0].state_dict().items()}
    t0 = {k: v.shape for k, v in teacher.encoder.layer[0].state_dict().items()}
    return s0 == t0


@torch.no_grad()
def fold_layer_norm(teacher: nn.Module, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NoNorm parameters (w, b), each (d,), that stand in for the teacher's embedding LayerNorm
    γ·(x − μ)/σ + β with the per-token mean μ and standard deviation σ of its pre-norm embedding x replaced by
    their averages over the tokens of ``sample_ids`` (B, T): w = γ·E[1/σ], b = β − γ·E[μ/σ]."""
    norm = teacher.embeddings.LayerNorm
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        teacher.embeddings(input_ids=sample_ids.to(norm.weight.device))
    finally:
        handle.remove()
    x = seen[0].float().flatten(0, -2)  # (tokens, d)
    inv_sigma = torch.rsqrt(x.var(-1, unbiased=False) + norm.eps)
    mu = x.mean(-1)
    weight = norm.weight.float() * inv_sigma.mean()
    bias = norm.bias.float() - norm.weight.float() * (mu * inv_sigma).mean()
    return weight, bias


def build_encoder(
    arch: Arch,
    teacher: nn.Module,
    *,
    seed: int,
    embedding_init: str = "pca",
    sample_ids: torch.Tensor | None = None,
) -> tuple[nn.Module, list[str]]:
    """A freshly initialised student encoder (no pooler) and the list of teacher tensors copied into it.

    Teacher tables are copied where names, shapes and meaning agree: the word, position and token-type tables
    and the embedding transformation. From an IB-BERT teacher (MobileBERT-type, 128-wide trigram embeddings)
    a student of the teacher's width copies the whole embedding, as MobileBERT does; its embedding norm is
    copied when both use the same ``normalization_type``. A NoNorm student (x·w + b) of a LayerNorm teacher
    cannot copy the norm's meaning by copying its tensors: given ``sample_ids`` (B, T) it takes the teacher's
    LayerNorm with the mean token statistics of the teacher's pre-norm embedding folded in
    (:func:`fold_layer_norm`), so its embedding output starts at the teacher's scale instead of the raw
    embedding's (about 8x smaller for the miniature's IB-BERT); without ``sample_ids`` it stays x·1 + 0. A
    MobileBERT student of a BERT teacher (e.g. all-MiniLM) cannot take the teacher's wider word table:
    ``embedding_init="pca"`` starts it from the teacher's principal directions (:func:`pca_embeddings`, a flagged
    deviation), ``"random"`` leaves it random.
    A student whose block equals the teacher's (the DistilBERT-like baseline) is initialised from teacher
    layers 0, 2, 4, ... (DistilBERT's recipe)."""
    from transformers import BertModel, MobileBertModel

    if embedding_init not in ("pca", "random"):
        raise ValueError(f"embedding_init must be 'pca' or 'random', not {embedding_init!r}")
    torch.manual_seed(seed)
    cfg = hf_config(arch, teacher.config)
    model = (BertModel if arch.kind == "bert" else MobileBertModel)(cfg, add_pooling_layer=False)
    copied: list[str] = []
    t_state = teacher.state_dict()
    s_state = model.state_dict()
    # MobileBERT's embedding "LayerNorm" may be NoNorm (x·w + b, no normalisation): same shape, other meaning.
    same_norm = getattr(cfg, "normalization_type", "layer_norm") == getattr(
        teacher.config, "normalization_type", "layer_norm"
    )
    with torch.no_grad():
        for name, value in s_state.items():
            same = name in t_state and t_state[name].shape == value.shape
            if name.startswith("embeddings.LayerNorm.") and not same_norm:
                continue
            if name == "embeddings.word_embeddings.weight" and cfg.model_type != teacher.config.model_type:
                continue  # a trigram MobileBERT table feeds its own transformation: not a BERT table's meaning
            if name.startswith("embeddings.") and same:
                value.copy_(t_state[name])
                copied.append(name)
        pre_norm_copied = all(
            name in copied for name in s_state if name.startswith("embeddings.") and ".LayerNorm." not in name
        )
        if not same_norm and sample_ids is not None and pre_norm_copied and cfg.model_type == "mobilebert":
            weight, bias = fold_layer_norm(teacher, sample_ids)
            s_state["embeddings.LayerNorm.weight"].copy_(weight)
            s_state["embeddings.LayerNorm.bias"].copy_(bias)
            copied.append("embeddings.LayerNorm (teacher LayerNorm folded into NoNorm)")
        table = teacher.get_input_embeddings().weight
        pca = embedding_init == "pca" and table.shape[1] == arch.hidden_size  # a BERT teacher's table at our width
        if arch.kind == "mobilebert" and "embeddings.word_embeddings.weight" not in copied and pca:
            pca_embeddings(model, teacher.get_input_embeddings().weight.detach())
            copied.append("embeddings.word_embeddings (PCA)")
        if _same_block(model, teacher):
            stride = max(1, teacher.config.num_hidden_layers // arch.num_layers)
            for i in range(arch.num_layers):
                src = f"encoder.layer.{i * stride}."
                for name, value in s_state.items():
                    if name.startswith(f"encoder.layer.{i}."):
                        value.copy_(t_state[src + name[len(f"encoder.layer.{i}.") :]])
                        copied.append(name)
    model.config._attn_implementation = "eager"
    return model, copied


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, seq_len: int) -> int:
    """Forward FLOPs of one sequence of ``seq_len`` tokens, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.ones(1, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    model.train(was_training)
    return int(counter.get_total_flops())


def space_choices(space: Any, teacher_dim: int) -> dict[str, list[int]]:
    """Knob → sorted choices, from a :class:`~thrifty.methods.autodistill.config.SpaceConfig`; an empty
    ``hidden_size`` list means the teacher's width ``teacher_dim``."""
    out = {k: sorted(set(getattr(space, k))) for k in KNOBS}
    out["hidden_size"] = out["hidden_size"] or [teacher_dim]
    return out


def arch_from_params(params: dict[str, int], embedding_size: int) -> Arch:
    return Arch(**{k: int(params[k]) for k in KNOBS}, embedding_size=embedding_size)


def enumerate_space(space: Any, teacher_dim: int) -> list[Arch]:
    """Every valid architecture of the space (its size, and whether a config leaves any valid choice)."""
    import itertools

    choices = space_choices(space, teacher_dim)
    out = []
    for values in itertools.product(*(choices[k] for k in KNOBS)):
        arch = arch_from_params(dict(zip(KNOBS, values)), space.embedding_size)
        try:
            arch.validate()
        except ValueError:
            continue
        out.append(arch)
    return out
