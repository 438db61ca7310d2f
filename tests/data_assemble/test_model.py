"""Model tests: shapes, gradients on every parameter, the adapter's label permutation, local weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from thrifty.methods.data_assemble.config import ModelConfig
from thrifty.methods.data_assemble.model import Adapter, MultiHead, build_model


@pytest.mark.parametrize("head", ["multihead", "adapter"])
def test_one_output_per_label_and_every_parameter_gets_a_gradient(head):
    torch.manual_seed(0)
    model = build_model(ModelConfig(), num_labels=7, head=head)
    x = torch.rand(4, 1, 64, 64)
    out = model(x)
    assert out.shape == (4, 7)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("head", ["multihead", "adapter"])
def test_channels_last_is_a_memory_layout_only(head, tmp_path):
    torch.manual_seed(0)
    dense = build_model(ModelConfig(channels_last=False), num_labels=7, head=head)
    fast = build_model(ModelConfig(channels_last=True), num_labels=7, head=head)
    fast.load_state_dict(dense.state_dict())
    convs = [
        m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 < m.kernel_size[0]
    ]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    x = torch.rand(6, 1, 64, 64)
    out_dense, out_fast = dense(x), fast(x)
    assert torch.allclose(out_dense, out_fast, atol=1e-5)
    out_dense.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, a), b in zip(dense.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), name
    # its weights load into a contiguous network (a card written before the option existed) unchanged
    save_file({k: v.contiguous() for k, v in fast.state_dict().items()}, str(tmp_path / "w.safetensors"))
    again = build_model(ModelConfig(channels_last=False), num_labels=7, head=head)
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert torch.allclose(again.eval()(x), fast.eval()(x), atol=1e-5)


def test_adapter_permuting_labels_permutes_outputs():
    torch.manual_seed(0)
    adapter = Adapter(in_channels=16, num_labels=5, dim=8)
    feats = torch.randn(3, 16, 4, 4)
    out = adapter(feats)
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = Adapter(in_channels=16, num_labels=5, dim=8)
    permuted.load_state_dict(adapter.state_dict())
    with torch.no_grad():
        permuted.queries.copy_(adapter.queries[perm])
        permuted.answer_weight.copy_(adapter.answer_weight[perm])
        permuted.answer_bias.copy_(adapter.answer_bias[perm])
    assert torch.allclose(permuted(feats), out[:, perm], atol=1e-6)


def test_adapter_attention_is_a_distribution_over_positions():
    adapter = Adapter(in_channels=8, num_labels=3, dim=4)
    adapter(torch.randn(2, 8, 3, 5))
    attn = adapter.last_attention
    assert attn.shape == (2, 3, 15)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3))


def test_multihead_is_one_linear_output_per_label_on_pooled_features():
    head = MultiHead(in_channels=6, num_labels=2)
    feats = torch.randn(2, 6, 3, 3)
    expected = head.out(torch.relu(feats).mean((2, 3)))
    assert torch.allclose(head(feats), expected)


def test_local_backbone_weights_are_loaded(tmp_path):
    torch.manual_seed(0)
    a = build_model(ModelConfig(), num_labels=3)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in a.backbone.state_dict().items()}, str(path))
    torch.manual_seed(1)
    b = build_model(ModelConfig(weights=str(path)), num_labels=3)
    for (k, va), vb in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values()):
        assert torch.equal(va, vb), k


def test_foreign_weights_are_refused_by_name(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"other\.safetensors"):
        build_model(ModelConfig(weights=str(path)), num_labels=3)
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.safetensors")), num_labels=3)


def test_unknown_head_or_backbone_raises():
    with pytest.raises(ValueError, match="head"):
        build_model(ModelConfig(), num_labels=2, head="mlp")
    with pytest.raises(ValueError, match="backbone"):
        build_model(ModelConfig(backbone="resnet"), num_labels=2)
