"""Temporal-gradient two-stream R3D-18: shapes, release layout, parameter counts, init, gradients under the
full loss, RGB-only inference, determinism and precise BN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from thrifty.methods.temporal_gradient.losses import (
    LOSS_WEIGHTS,
    alignment_loss,
    nt_xent,
    pseudo_label_loss,
    pseudo_labels,
    supervised_loss,
)
from thrifty.methods.temporal_gradient.model import (
    R3D18,
    BasicBlock3d,
    ContrastHead,
    I3DHead,
    TwoStreamNet,
    count_parameters,
    recompute_bn_stats,
)

MINI = dict(widths=(8, 16, 32, 64), blocks=(2, 2, 2, 2))
K = 10


def mini_net(seed: int = 0, **kw) -> TwoStreamNet:
    torch.manual_seed(seed)
    return TwoStreamNet(num_classes=K, proj_dim=16, dropout=0.5, bn_eps=1e-3, **MINI, **kw)


def clips(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 32, 32, generator=g)


def r3d18_param_formula(widths: tuple[int, ...], blocks: tuple[int, ...], in_ch: int = 3) -> int:
    """Independent count: 3x7x7 stem, 3x3x3 basic blocks, 1x1x1 projections, 2 params per BN channel."""
    total = in_ch * widths[0] * 3 * 7 * 7 + 2 * widths[0]
    prev = widths[0]
    for i, (w, b) in enumerate(zip(widths, blocks)):
        for j in range(b):
            c_in = prev if j == 0 else w
            total += c_in * w * 27 + 2 * w + w * w * 27 + 2 * w
            if j == 0 and (i > 0 or c_in != w):
                total += c_in * w + 2 * w
        prev = w
    return total


def test_backbone_stage_shapes_and_layout() -> None:
    net = R3D18(**MINI)
    feats = net.forward_features(clips(2))
    # T: 8 -> pool2 4 -> 2 -> 1 -> 1 (stride 2 on length 1 with pad 1 gives 1); H: 32 -> 16 -> 8 -> 8, 4, 2, 1
    assert [tuple(f.shape) for f in feats] == [(2, 8, 4, 8, 8), (2, 16, 2, 4, 4), (2, 32, 1, 2, 2), (2, 64, 1, 1, 1)]
    assert torch.equal(net(clips(2)), feats[-1])
    # release layout: conv1 (3,7,7) stride (1,2,2); pool1 1x3x3 stride (1,2,2) pad (0,1,1); pool2 2x1x1
    assert net.conv1.kernel_size == (3, 7, 7) and net.conv1.stride == (1, 2, 2) and net.conv1.padding == (1, 3, 3)
    assert net.maxpool.kernel_size == (1, 3, 3) and net.maxpool.stride == (1, 2, 2)
    assert net.maxpool.padding == (0, 1, 1)
    assert net.pool2 is not None and net.pool2.kernel_size == (2, 1, 1)
    assert [layer[0].conv1.stride for layer in (net.layer1, net.layer2, net.layer3, net.layer4)] == [
        (1, 1, 1),
        (2, 2, 2),
        (2, 2, 2),
        (2, 2, 2),
    ]
    assert net.layer1[0].downsample is None and all(
        layer[0].downsample is not None for layer in (net.layer2, net.layer3, net.layer4)
    )
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock3d)]
    assert len(blocks) == 8 and all(b.conv1.kernel_size == b.conv2.kernel_size == (3, 3, 3) for b in blocks)
    with pytest.raises(ValueError, match="N, C, T, H, W"):
        net(torch.zeros(2, 3, 32, 32))


def test_parameter_counts() -> None:
    mini = R3D18(**MINI)
    assert count_parameters(mini) == r3d18_param_formula((8, 16, 32, 64), (2, 2, 2, 2)) == 522_360
    full = R3D18()
    assert count_parameters(full) == r3d18_param_formula((64, 128, 256, 512), (2, 2, 2, 2)) == 33_166_272


def test_init_matches_mmaction() -> None:
    torch.manual_seed(0)
    net = R3D18(**MINI)
    w = net.layer4[1].conv2.weight  # (64, 64, 3, 3, 3): kaiming normal, fan_out = 64·27
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 27)), rel=0.05)
    assert all(
        torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in net.modules() if isinstance(m, nn.BatchNorm3d)
    )
    head = I3DHead(in_dim=512, num_classes=101)
    assert head.fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and torch.all(head.fc.bias == 0)


def test_heads_shapes_and_contrast_head_layout() -> None:
    x = torch.randn(4, 64, 1, 2, 2)
    assert I3DHead(in_dim=64, num_classes=K)(x).shape == (4, K)
    proj = ContrastHead(in_dim=64, dim=32)
    emb = proj(x)
    assert emb.shape == (4, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    linears = [m for m in proj.mlp if isinstance(m, nn.Linear)]
    bns = [m for m in proj.mlp if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert [m.affine for m in bns] == [True, True, False]
    assert torch.allclose(proj(x.mean(dim=(2, 3, 4))), emb, atol=1e-6)  # pooled input accepted too


def test_two_stream_shapes_and_separate_backbones() -> None:
    net = mini_net()
    out = net.forward_streams(clips(4, 1), clips(4, 2))
    assert out.logits_rgb.shape == out.logits_tg.shape == (4, K)
    assert out.emb_rgb.shape == out.emb_tg.shape == (4, 16)
    assert torch.allclose(out.emb_rgb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert len(out.feats_rgb) == len(out.feats_tg) == 4
    assert [f.shape for f in out.feats_rgb] == [f.shape for f in out.feats_tg]
    # same config, separate parameters with different initial values
    assert net.rgb_backbone is not None and net.tg_backbone is not None
    assert net.rgb_backbone.conv1.weight is not net.tg_backbone.conv1.weight
    assert not torch.equal(net.rgb_backbone.conv1.weight, net.tg_backbone.conv1.weight)
    assert count_parameters(net.rgb_backbone) == count_parameters(net.tg_backbone)


def test_every_parameter_gets_a_gradient_under_the_full_loss() -> None:
    net = mini_net()
    n_l, n_u = 4, 4
    x_l, x_w, x_s = clips(n_l, 1), clips(n_u, 2), clips(n_u, 3)
    tg_l, tg_w, tg_s = clips(n_l, 4), clips(n_u, 5), clips(n_u, 6)
    y = torch.tensor([0, 1, 2, 3])
    # one forward over labelled + weak + strong clips, as the release concatenates them
    out = net.forward_streams(torch.cat([x_l, x_w, x_s]), torch.cat([tg_l, tg_w, tg_s]))
    lab, weak, strong = slice(0, n_l), slice(n_l, n_l + n_u), slice(n_l + n_u, n_l + 2 * n_u)
    sup = supervised_loss(out.logits_rgb[lab], out.logits_tg[lab], y)
    ps_y, mask, _ = pseudo_labels(out.logits_rgb[weak], out.logits_tg[weak], threshold=0.0)
    assert mask.all()
    pseudo = pseudo_label_loss(out.logits_rgb[strong], out.logits_tg[strong], ps_y, mask)
    first = slice(0, n_l + n_u)  # the release aligns and contrasts labelled + weak clips
    align = alignment_loss([f[first] for f in out.feats_rgb], [f[first] for f in out.feats_tg])
    contrast = nt_xent(out.emb_rgb[first], out.emb_tg[first], temperature=0.5)
    w = LOSS_WEIGHTS
    loss = w["supervised"] * sup + w["pseudo"] * pseudo + w["align"] * align + w["contrast"] * contrast
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"rgb_backbone", "tg_backbone", "rgb_head", "tg_head", "rgb_proj", "tg_proj"}


def test_alignment_sends_no_gradient_into_the_tg_branch() -> None:
    net = mini_net()
    out = net.forward_streams(clips(3, 1), clips(3, 2))
    alignment_loss(out.feats_rgb, out.feats_tg).backward()
    assert net.tg_backbone is not None and net.rgb_backbone is not None
    assert all(p.grad is None for p in net.tg_backbone.parameters())
    assert all(p.grad is not None for p in net.rgb_backbone.parameters())


def test_inference_touches_only_rgb_modules() -> None:
    net = mini_net().eval()
    x = clips(3)
    ref = net(x)
    # NaN in every TG / contrast weight and buffer: RGB inference is unchanged (and finite)
    poisoned = copy.deepcopy(net)
    with torch.no_grad():
        for name in ("tg_backbone", "tg_head", "rgb_proj", "tg_proj"):
            for t in [*getattr(poisoned, name).parameters(), *getattr(poisoned, name).buffers()]:
                if t.is_floating_point():
                    t.fill_(float("nan"))
    assert torch.equal(poisoned(x), ref)
    # deleting the branches, or setting the TG backbone to None, changes nothing
    dropped = copy.deepcopy(net)
    dropped.tg_backbone = None
    assert torch.equal(dropped(x), ref)
    assert torch.equal(copy.deepcopy(net).drop_training_branches()(x), ref)
    with pytest.raises(RuntimeError, match="TG branch"):
        dropped.forward_streams(x, x)
    # the exported RGB-only weights suffice
    state = net.rgb_only_state_dict()
    assert state and all(k.startswith(("rgb_backbone.", "rgb_head.")) for k in state)
    fresh = mini_net(seed=123).drop_training_branches().eval()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(x), ref)


def test_determinism_given_a_seed_and_in_eval_mode() -> None:
    a, b = mini_net(seed=7), mini_net(seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], mini_net(seed=8).state_dict()[k]) for k in sa)
    x, t = clips(4, 1), clips(4, 2)
    torch.manual_seed(3)
    out_a = a.forward_streams(x, t)
    torch.manual_seed(3)
    out_b = b.forward_streams(x, t)
    assert torch.equal(out_a.logits_rgb, out_b.logits_rgb) and torch.equal(out_a.emb_tg, out_b.emb_tg)
    a.eval()
    assert torch.equal(a(x), a(x))
    assert torch.allclose(a(x[:2]), a(x)[:2], atol=1e-6)  # eval mode: no batch dependence


def _bn_inputs(module: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every BN's input over all batches, captured by a test-side hook in an independent train-mode pass."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: seen.setdefault(n, []).append(inp[0])))
    module.train()
    with torch.no_grad():
        for xb in batches:
            module(xb)
    for h in hooks:
        h.remove()
    return {n: torch.cat([v.transpose(0, 1).reshape(v.shape[1], -1) for v in vs], dim=1) for n, vs in seen.items()}


def test_precise_bn_sets_exact_population_statistics() -> None:
    torch.manual_seed(0)
    net = R3D18(**MINI)
    batches = [clips(3, s) + 0.5 * s for s in range(3)]  # shifted batches: pooled != averaged variance
    n = recompute_bn_stats(net, batches, forward=net)
    assert n == 3 and net.training  # training flag restored
    # first BN by hand: its input is conv1(x), independent of any BN
    with torch.no_grad():
        stem = torch.cat([net.conv1(b) for b in batches])  # (9, 8, 8, 16, 16)
    flat = stem.transpose(0, 1).reshape(8, -1).double()
    assert torch.allclose(net.bn1.running_mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(net.bn1.running_var.double(), flat.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    # every BN, against an independent capture of its inputs (weights are fixed, train-mode BN uses batch stats;
    # the capture pass itself moves the running stats, so keep the recomputed ones first)
    stats = {
        n: (m.running_mean.clone(), m.running_var.clone())
        for n, m in net.named_modules()
        if isinstance(m, nn.BatchNorm3d)
    }
    inputs = _bn_inputs(net, batches)
    assert len(inputs) == len(stats) == sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    for name, x in inputs.items():
        x = x.double()
        mean, var = stats[name]
        assert torch.allclose(mean.double(), x.mean(1), rtol=1e-4, atol=1e-5), name
        assert torch.allclose(var.double(), x.var(1, unbiased=True), rtol=1e-4, atol=1e-5), name
    # the release's per-batch average differs on shifted batches, and matches its own definition
    recompute_bn_stats(net, batches, forward=net, mode="batch_average")
    per_batch = [conv.transpose(0, 1).reshape(8, -1).double() for conv in (net.conv1(b).detach() for b in batches)]
    assert torch.allclose(
        net.bn1.running_mean.double(), torch.stack([p.mean(1) for p in per_batch]).mean(0), rtol=1e-5, atol=1e-6
    )
    avg_var = torch.stack([p.var(1, unbiased=True) for p in per_batch]).mean(0)
    assert torch.allclose(net.bn1.running_var.double(), avg_var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(avg_var, flat.var(1, unbiased=True), rtol=1e-3)


def test_precise_bn_restores_eval_mode_and_only_touches_the_given_module() -> None:
    net = mini_net().eval()
    assert net.tg_backbone is not None and net.rgb_backbone is not None
    tg_before = {k: v.clone() for k, v in net.tg_backbone.state_dict().items()}
    rgb_mean_before = net.rgb_backbone.bn1.running_mean.clone()
    recompute_bn_stats(net.rgb_backbone, [clips(2, 1), clips(2, 2)], forward=net.rgb_backbone)
    assert not any(m.training for m in net.modules())
    assert all(torch.equal(v, net.tg_backbone.state_dict()[k]) for k, v in tg_before.items())
    assert not torch.equal(net.rgb_backbone.bn1.running_mean, rgb_mean_before)
    with pytest.raises(ValueError, match="no batches"):
        recompute_bn_stats(net.rgb_backbone, [], forward=net.rgb_backbone)
