"""Export a distilled student: Hugging Face format, ONNX and a model card (AutoDistill, arXiv 2201.08539).

``<dir>/`` holds ``config.json`` + ``model.safetensors`` (``AutoModel.from_pretrained(dir)`` loads the encoder),
the teacher's tokenizer files (``AutoTokenizer.from_pretrained(dir)``), ``model.onnx`` (input ``input_ids``
and ``attention_mask``, output ``last_hidden_state``), ``mlm_head.safetensors`` (dense, LayerNorm and bias of
the MLM head; its decoder is tied to the teacher's word embeddings, named in ``mlm_head.json``) and
``README.md``, the model card with the architecture, size, measured latency and the hardware it was
measured on, and accuracies.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from thrifty.methods.autodistill.distill import Student
from thrifty.methods.autodistill.latency import EncoderOnly, export_onnx


def export_served_onnx(encoder: nn.Module, path: Path) -> Path:
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    return export_onnx(
        EncoderOnly(encoder), path, example=(ids, mask), input_names=["input_ids", "attention_mask"],
        output_name="last_hidden_state",
    )  # fmt: skip


def _card(name: str, record: dict[str, Any]) -> str:
    arch = record["arch"]
    lines = [
        f"# {name}",
        "",
        "A student distilled by thrifty's AutoDistill recipe (arXiv 2201.08539): MobileBERT progressive knowledge",
        f"transfer and MLM distillation from `{record.get('teacher', 'the teacher')}`.",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "model = AutoModel.from_pretrained(path)      # the encoder",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "`model.onnx` serves the same encoder with ONNX Runtime (inputs `input_ids`, `attention_mask`).",
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
    lines.append(f"| measured on | {record.get('hardware', '?')} |")
    for key in ("flash_val_acc", "val_acc", "test_acc"):
        if key in record:
            lines.append(f"| masked-token accuracy ({key.replace('_acc', '').replace('_', ' ')}) | {record[key]:.4f} |")
    for task, res in record.get("downstream", {}).items():
        lines.append(f"| {task} test accuracy (pooled linear head) | {res['mean']:.4f} |")
    return "\n".join(lines) + "\n"


def export_student(student: Student, tokenizer: Any, out_dir: Path, *, name: str, record: dict[str, Any]) -> Path:
    """Write the student to ``out_dir`` (see the module docstring); ``record`` feeds the model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    student.encoder.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    head = student.head
    save_file(
        {
            "dense.weight": head.dense.weight.detach().cpu().contiguous(),
            "dense.bias": head.dense.bias.detach().cpu().contiguous(),
            "norm.weight": head.norm.weight.detach().cpu().contiguous(),
            "norm.bias": head.norm.bias.detach().cpu().contiguous(),
            "bias": head.bias.detach().cpu().contiguous(),
        },
        str(out_dir / "mlm_head.safetensors"),
    )
    (out_dir / "mlm_head.json").write_text(
        json.dumps({"decoder": "tied to the teacher's word embeddings", "teacher": record.get("teacher", "")}, indent=1)
    )
    export_served_onnx(copy.deepcopy(student.encoder).cpu(), out_dir / "model.onnx")
    (out_dir / "README.md").write_text(_card(name, record))
    return out_dir
