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


def _export(teacher, tmp_path: Path, arch: Arch, teacher_path: str) -> tuple[Student, Path]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir())
    enc, _ = build_encoder(arch, teacher, seed=0)
    with torch.no_grad():  # a trained-looking student: token-type row 1 differs from row 0, as after init
        enc.embeddings.token_type_embeddings.weight[1].normal_()
    student = Student(encoder=enc, head=MLMHead(embedding=teacher.get_input_embeddings().weight), teacher_dim=32)
    latency = {"seq_len": 16, "backend": "torch", "threads": 1, "median_ms": 1.0, "p90_ms": 1.2, "cv": 0.1, "runs": 5}
    record = {"arch": arch.to_dict(), "params": 1, "flops": 1, "latency": {"1": latency}, "hardware": "cpu",
              "teacher": teacher_path}  # fmt: skip
    return student.eval(), export_student(student, tokenizer, tmp_path / arch.kind, name="tiny", record=record)


@pytest.mark.parametrize("kind", ["mobilebert", "bert"])
def test_a_plain_client_gets_what_was_trained(teacher, tmp_path: Path, kind: str) -> None:
    """Sentence pairs give the same outputs in transformers and ONNX Runtime (and the trained student with
    token type 0); no weight is random on load; no exported file holds a path of this machine; one file mode;
    the model card opens with a YAML metadata block."""
    ort = pytest.importorskip("onnxruntime")
    import yaml
    from transformers import AutoModel

    arch = Arch(kind=kind, num_layers=2, hidden_size=32, intra_bottleneck_size=16, num_heads=2, intermediate_size=24,
                num_ffn=2 if kind == "mobilebert" else 1, embedding_size=8 if kind == "mobilebert" else 32)  # fmt: skip
    shipped = str(teacher_dir())  # an absolute path into site-packages
    student, out = _export(teacher, tmp_path, arch, shipped)
    # a sentence pair as BERT tokenizers encode it: [CLS] a [SEP] b [SEP], the second segment of token type 1
    ids = torch.tensor([[1, 5, 9, 2, 17, 21, 2, 0], [1, 44, 2, 30, 2, 0, 0, 0]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": types}
    model = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        hf = model(**batch)
        ref = student.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(hf.last_hidden_state, ref, atol=1e-5)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    assert np.allclose(sess.run(None, feeds)[0], hf.last_hidden_state.numpy(), atol=1e-4)
    # loading twice gives the same pooler output: nothing is initialised at random
    again = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).pooler_output, hf.pooler_output)
    expected = hf.last_hidden_state[:, 0]
    assert torch.allclose(hf.pooler_output, expected if kind == "mobilebert" else torch.tanh(expected), atol=1e-6)
    # no machine path; the shipped teacher is named by model id and package
    for f in out.rglob("*"):
        if f.suffix in (".json", ".md", ".txt"):
            text = f.read_text()
            assert shipped not in text and "site-packages" not in text and str(tmp_path) not in text, f.name
    assert "sentence-transformers/all-MiniLM-L6-v2" in json.loads((out / "mlm_head.json").read_text())["teacher"]
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()}
    assert len(set(modes.values())) == 1, modes
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and "autodistill" in meta["tags"] and kind in meta["tags"]
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_the_exported_mlm_head_needs_nothing_but_its_file(teacher, tmp_path: Path) -> None:
    """``mlm_head.safetensors`` carries the frozen decoder matrix, so a client rebuilds the head's logits from it
    alone; the teacher is named as given (an in-domain teacher's name), never by a path."""
    from transformers import AutoTokenizer

    arch = Arch(num_layers=1, hidden_size=32, intra_bottleneck_size=16, num_heads=2, intermediate_size=24,
                embedding_size=8)  # fmt: skip
    enc, _ = build_encoder(arch, teacher, seed=0)
    head = MLMHead(embedding=torch.randn(teacher.config.vocab_size, 32))
    with torch.no_grad():
        head.bias.normal_()
        head.dense.weight.normal_(std=0.2)
    student = Student(encoder=enc, head=head, teacher_dim=32).eval()
    latency = {"seq_len": 16, "backend": "torch", "threads": 1, "median_ms": 1.0, "p90_ms": 1.2, "cv": 0.1, "runs": 5}
    name = "thrifty IB-BERT teacher 0123abcd (pre-trained in-domain with MLM)"
    record = {"arch": arch.to_dict(), "params": 1, "flops": 1, "latency": {"1": latency}, "teacher": name}
    out = export_student(student, AutoTokenizer.from_pretrained(teacher_dir()), tmp_path / "h", name="t", record=record)
    w = load_file(str(out / "mlm_head.safetensors"))
    h = torch.randn(5, 32)
    manual = torch.nn.functional.layer_norm(
        torch.nn.functional.gelu(h @ w["dense.weight"].T + w["dense.bias"]), (32,), w["norm.weight"], w["norm.bias"],
        eps=1e-12,
    ) @ w["decoder.weight"].T + w["bias"]  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(manual, student.head(h), atol=1e-5)
    meta = json.loads((out / "mlm_head.json").read_text())
    assert meta["teacher"] == name and "decoder.weight" in meta["decoder"]
    assert "base_model" not in (out / "README.md").read_text().split("---\n")[1]
