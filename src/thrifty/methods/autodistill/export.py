"""Export a distilled student: Hugging Face format, ONNX and a model card (AutoDistill, arXiv 2201.08539).

``<dir>/`` holds ``config.json`` + ``model.safetensors`` (``AutoModel.from_pretrained(dir)`` loads the encoder),
the teacher's tokenizer files (``AutoTokenizer.from_pretrained(dir)``), ``model.onnx`` (input ``input_ids``
and ``attention_mask``, output ``last_hidden_state``), ``mlm_head.safetensors`` (dense, LayerNorm and bias of
the MLM head and ``decoder.weight`` (V, d), the teacher's frozen decoder matrix it was trained with, so the head
needs nothing else; ``mlm_head.json`` describes it) and
``README.md``, the model card (a model-hub YAML metadata block, then the architecture, size, measured latency
and the hardware it was measured on, and accuracies).

What a plain client gets is what was trained, whichever client it is:

- The student was trained with token type 0 only, so every token-type row is written as row 0: a sentence
  pair tokenised by ``AutoTokenizer`` (second segment type 1) gives the same outputs in transformers as in the
  ONNX graph, which has no ``token_type_ids`` input.
- No weight is random on load: MobileBERT students are written with ``classifier_activation = false`` (the
  pooler returns the first token's hidden state and has no weights); BERT students get a pooler with identity
  weight and zero bias (``pooler_output = tanh(h_CLS)``). The pooler was never trained either way.
- The teacher is named by package and model id or by its directory name, never by a path of this machine.
- Every file is written with the same permissions.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from thrifty.methods.autodistill.distill import Student
from thrifty.methods.autodistill.latency import EncoderOnly, export_onnx
from thrifty.methods.autodistill.teacher import DEFAULT_TEACHER


def export_served_onnx(encoder: nn.Module, path: Path) -> Path:
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    return export_onnx(
        EncoderOnly(encoder), path, example=(ids, mask), input_names=["input_ids", "attention_mask"],
        output_name="last_hidden_state",
    )  # fmt: skip


def teacher_name(value: str) -> str:
    """How exported files name the teacher: the model id and package of all-MiniLM (shipped by a PyPI package),
    a directory's own name for a path, else ``value`` itself (a name); never a path of this machine."""
    if not value:
        return "the teacher"
    p = Path(value)
    parts = [x.replace("-", "_").lower() for x in p.parts]
    if DEFAULT_TEACHER[0].replace("-", "_") in parts or DEFAULT_TEACHER[0] in value:
        return f"{DEFAULT_TEACHER[1]} (PyPI package {DEFAULT_TEACHER[0]})"
    return (p.name or "the teacher") if p.is_absolute() or p.exists() else value


def _front_matter(record: dict[str, Any]) -> list[str]:
    """The YAML metadata block a model hub reads (library, task, tags, base model)."""
    kind = "mobilebert" if record["arch"].get("kind", "mobilebert") != "bert" else "bert"
    lines = ["---", "library_name: transformers", "pipeline_tag: feature-extraction", "tags:"]
    lines += [f"- {t}" for t in ("thrifty", "autodistill", "knowledge-distillation", kind)]
    name = teacher_name(record.get("teacher", ""))
    if name.startswith(DEFAULT_TEACHER[1]):
        lines.append(f"base_model: {DEFAULT_TEACHER[1]}")
    return [*lines, "---", ""]


def _card(name: str, record: dict[str, Any]) -> str:
    arch = record["arch"]
    lines = [
        *_front_matter(record),
        f"# {name}",
        "",
        "A student distilled by thrifty's AutoDistill recipe (arXiv 2201.08539): MobileBERT progressive knowledge",
        f"transfer and MLM distillation from `{teacher_name(record.get('teacher', ''))}`.",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "model = AutoModel.from_pretrained(path)      # the encoder",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "`model.onnx` serves the same encoder with ONNX Runtime (inputs `input_ids`, `attention_mask`).",
        "Both give the same outputs for single sentences and sentence pairs (the student was trained with token",
        "type 0; every token-type row is that row). The pooler was not trained (`pooler_output` is the first",
        "token's hidden state, or tanh of it for BERT students).",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in arch.items()],
        f"| parameters (encoder) | {record['params']:,} |",
        f"| forward FLOPs per sequence of {record.get('flops_seq_len', '?')} tokens | {record['flops']:,} |",
    ]
    for b, lat in record["latency"].items():
        lines.append(
            f"| latency, batch {b} × {lat['seq_len']} tokens, {lat['backend']}, {lat['threads']} threads | "
            f"median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms (CV {lat['cv']:.3f}, {lat['runs']} runs) |"
        )
    if "session" in record:
        timed = record["session"]
        lines.append(
            f"| latency relative to the MobileBERT-like reference (interleaved session) | "
            f"{timed['ratio_median']:.3f} [{timed['ratio_ci95'][0]:.3f}, {timed['ratio_ci95'][1]:.3f}] |"
        )
    lines.append(f"| measured on | {record.get('hardware', '?')} |")
    for key in ("flash_val_acc", "val_acc", "test_acc"):
        if key in record:
            lines.append(f"| masked-token accuracy ({key.replace('_acc', '').replace('_', ' ')}) | {record[key]:.4f} |")
    for task, res in record.get("downstream", {}).items():
        lines.append(f"| {task} test accuracy (pooled linear head) | {res['mean']:.4f} |")
    return "\n".join(lines) + "\n"


def servable_encoder(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` that plain transformers reloads with no random weight and that gives ONNX's outputs
    for sentence pairs (see the module docstring)."""
    cfg = copy.deepcopy(encoder.config)
    if cfg.model_type == "mobilebert":
        cfg.classifier_activation = False
    full = type(encoder)(cfg)  # with its pooler, as AutoModel builds it
    missing, unexpected = full.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"encoder weights do not fit {type(full).__name__}: {missing=} {unexpected=}")
    with torch.no_grad():
        tt = full.embeddings.token_type_embeddings.weight
        tt[1:] = tt[0]
        dense = getattr(full.pooler, "dense", None) if getattr(full, "pooler", None) is not None else None
        if dense is not None:
            dense.weight.copy_(torch.eye(dense.weight.shape[0]))
            dense.bias.zero_()
    return full.eval()


def export_student(student: Student, tokenizer: Any, out_dir: Path, *, name: str, record: dict[str, Any]) -> Path:
    """Write the student to ``out_dir`` (see the module docstring); ``record`` feeds the model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    served = servable_encoder(student.encoder)  # a new CPU model; the student is left as it is
    served.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    head = student.head
    save_file(
        {
            "dense.weight": head.dense.weight.detach().cpu().contiguous(),
            "dense.bias": head.dense.bias.detach().cpu().contiguous(),
            "norm.weight": head.norm.weight.detach().cpu().contiguous(),
            "norm.bias": head.norm.bias.detach().cpu().contiguous(),
            "bias": head.bias.detach().cpu().contiguous(),
            "decoder.weight": head.embedding.detach().cpu().contiguous(),
        },
        str(out_dir / "mlm_head.safetensors"),
    )
    teacher = teacher_name(record.get("teacher", ""))
    (out_dir / "mlm_head.json").write_text(
        json.dumps(
            {
                "layout": "logits = LayerNorm(GELU(dense(h))) @ decoder.weight.T + bias",
                "decoder": "decoder.weight (V, d): the teacher's frozen MLM decoder (its tied word embeddings, "
                "or MobileBERT's [word embeddings | extra columns]), never trained by the student",
                "teacher": teacher,
            },
            indent=1,
        )
    )
    export_served_onnx(served, out_dir / "model.onnx")
    (out_dir / "README.md").write_text(_card(name, record))
    # one permission for every file (safetensors writes its files 0600, plain writes follow the umask)
    mode = (out_dir / "README.md").stat().st_mode & 0o777
    for f in out_dir.rglob("*"):
        if f.is_file():
            os.chmod(f, mode)
    return out_dir
