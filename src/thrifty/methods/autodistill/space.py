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
    (``intra_bottleneck_size`` and ``num_ffn`` are then unused and must be 0 and 1)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    intra_bottleneck_size: int = 0
    num_ffn: int = 1
    embedding_size: int = 128
    kind: str = "mobilebert"

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
        return (
            f"L{self.num_layers} b{self.intra_bottleneck_size} h{self.num_heads} "
            f"i{self.intermediate_size} f{self.num_ffn}" + (f" d{self.hidden_size}" if self.hidden_size != 384 else "")
        )


def mobilebert_like(hidden_size: int = 384) -> Arch:
    """The card's hand-designed MobileBERT-like student (6 layers, bottleneck 96, 4 heads, FFN 384 ×4)."""
    return Arch(
        num_layers=6, hidden_size=hidden_size, intra_bottleneck_size=96, num_heads=4, intermediate_size=384, num_ffn=4
    )


def distilbert_like(teacher_config: Any) -> Arch:
    """Half the teacher's depth, same width/heads/FFN, initialised from teacher layers 0, 2, 4, ... ."""
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
    p = vh[:e].T  # (d, e)
    transform = emb.embedding_transformation.weight  # (d, 3e) when trigram input is on
    with torch.no_grad():
        emb.word_embeddings.weight.copy_(teacher_embeddings.float() @ p)
        w = torch.zeros_like(transform)
        w[:, e : 2 * e] = p if transform.shape[1] == 3 * e else 0.0
        if transform.shape[1] == e:
            w.copy_(p)
        transform.copy_(w)
        emb.embedding_transformation.bias.zero_()


def build_encoder(
    arch: Arch, teacher: nn.Module, *, seed: int, embedding_init: str = "pca"
) -> tuple[nn.Module, list[str]]:
    """A freshly initialised student encoder (no pooler) and the list of teacher tensors copied into it.

    Teacher tables are copied where shapes and meaning agree: position and token-type embeddings always (the
    student has the teacher's width); the word table of a BERT student of the teacher's width. A MobileBERT
    student's 128-wide trigram word table cannot take the teacher's; ``embedding_init="pca"`` starts it from
    the teacher's principal directions (:func:`pca_embeddings`), ``"random"`` leaves it random. A BERT student
    with half the teacher's depth is initialised from teacher layers 0, 2, 4, ... (DistilBERT's recipe)."""
    from transformers import BertModel, MobileBertModel

    if embedding_init not in ("pca", "random"):
        raise ValueError(f"embedding_init must be 'pca' or 'random', not {embedding_init!r}")
    torch.manual_seed(seed)
    cfg = hf_config(arch, teacher.config)
    model = (BertModel if arch.kind == "bert" else MobileBertModel)(cfg, add_pooling_layer=False)
    copied: list[str] = []
    t_state = teacher.state_dict()
    s_state = model.state_dict()
    # MobileBERT's embedding "LayerNorm" is NoNorm (x·w + b, no normalisation): same shape, other meaning.
    skip = ("embeddings.LayerNorm.",) if arch.kind == "mobilebert" else ()
    with torch.no_grad():
        for name, value in s_state.items():
            same = name in t_state and t_state[name].shape == value.shape
            if name.startswith("embeddings.") and not name.startswith(skip) and same:
                value.copy_(t_state[name])
                copied.append(name)
        if arch.kind == "mobilebert" and embedding_init == "pca":
            pca_embeddings(model, teacher.get_input_embeddings().weight.detach())
            copied.append("embeddings.word_embeddings (PCA)")
        if arch.kind == "bert" and arch.hidden_size == teacher.config.hidden_size:
            stride = max(1, teacher.config.num_hidden_layers // arch.num_layers)
            for i in range(arch.num_layers):
                src = f"encoder.layer.{i * stride}."
                for name, value in s_state.items():
                    if name.startswith(f"encoder.layer.{i}."):
                        t_name = src + name[len(f"encoder.layer.{i}.") :]
                        if t_name in t_state and t_state[t_name].shape == value.shape:
                            value.copy_(t_state[t_name])
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


def space_choices(space: Any) -> dict[str, list[int]]:
    """Knob → sorted choices, from a :class:`~thrifty.methods.autodistill.config.SpaceConfig`."""
    return {k: sorted(set(getattr(space, k))) for k in KNOBS}


def arch_from_params(params: dict[str, int], embedding_size: int) -> Arch:
    return Arch(**{k: int(params[k]) for k in KNOBS}, embedding_size=embedding_size)


def enumerate_space(space: Any) -> list[Arch]:
    """Every valid architecture of the space (its size, and whether a config leaves any valid choice)."""
    import itertools

    choices = space_choices(space)
    out = []
    for values in itertools.product(*(choices[k] for k in KNOBS)):
        arch = arch_from_params(dict(zip(KNOBS, values)), space.embedding_size)
        try:
            arch.validate()
        except ValueError:
            continue
        out.append(arch)
    return out
