"""Exported students load with plain transformers and ONNX Runtime and give the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from thrifty.methods.autodistill.distill import Student
from thrifty.methods.autodistill.export import export_student
from thrifty.methods.autodistill.space import Arch, build_encoder
from thrifty.methods.autodistill.teacher import MLMHead, teacher_dir


def test_hf_and_onnx_exports_match_the_trained_student(teacher, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir())
    arch = Arch(num_layers=2, hidden_size=32, intra_bottleneck_size=16, num_heads=2, intermediate_size=24, num_ffn=2,
                embedding_size=8)  # fmt: skip
    enc, _ = build_encoder(arch, teacher, seed=0)
    head = MLMHead(embedding=teacher.get_input_embeddings().weight)
    with torch.no_grad():
        head.bias.normal_()
    student = Student(encoder=enc, head=head, teacher_dim=32).eval()
    latency = {"seq_len": 16, "backend": "torch", "threads": 1, "median_ms": 1.0, "p90_ms": 1.2, "cv": 0.1, "runs": 5}
    record = {"arch": arch.to_dict(), "params": 1234, "flops": 5678, "latency": {"1": latency}, "hardware": "test cpu",
              "val_acc": 0.25, "test_acc": 0.2}  # fmt: skip
    out = export_student(student, tokenizer, tmp_path / "s", name="tiny", record=record)

    model = AutoModel.from_pretrained(out).eval()
    assert type(model).__name__ == "MobileBertModel"
    assert AutoTokenizer.from_pretrained(out).vocab_size == tokenizer.vocab_size
    ids = torch.tensor([[1, 5, 9, 17, 2, 0], [1, 44, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = student.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        hf = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ref, hf, atol=1e-5)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_h = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.allclose(onnx_h, ref.numpy(), atol=1e-4)

    # the MLM head reloads from its file and gives the same logits on either export's hidden states
    reloaded = MLMHead(embedding=teacher.get_input_embeddings().weight)
    reloaded.load_state_dict(load_file(str(out / "mlm_head.safetensors")), strict=False)
    with torch.no_grad():
        assert torch.allclose(reloaded(hf), student.head(ref), atol=1e-4)
        assert torch.allclose(reloaded(torch.from_numpy(onnx_h)), student.head(ref), atol=1e-3)
    card = (out / "README.md").read_text()
    assert "test cpu" in card and "median 1.00 ms" in card and "1,234" in card
    assert "teacher" in json.loads((out / "mlm_head.json").read_text())
