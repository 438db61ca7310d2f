"""BigSSL Conformer + CTC: subsampling lengths, relative-position attention, the macaron block, padding invariance
(eval and train mode, masked batch norm), gradients, CTC, a tiny overfit, determinism and the SIZES table.

References are independent: explicit loops for ``rel_shift`` and relative attention, a hand-written block forward,
brute-force CTC over every path, and a parameter-count formula derived from the architecture.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.bigssl.model import (
    SIZES,
    Conformer,
    ConformerBlock,
    ConvModule,
    ConvSubsampling,
    CTCModel,
    MaskedBatchNorm1d,
    MultiHeadSelfAttention,
    ctc_loss,
    rel_shift,
    relative_encodings,
    subsampled_lengths,
    valid_mask,
)
from thrifty.methods.bigssl.tokens import VOCAB_SIZE

N_MELS = 20  # small feature dimension keeps the tests fast; the subsampling works for any n_mels ≥ 7


def sub_len(t: int) -> int:
    """⌊(⌊(T−3)/2⌋+1−3)/2⌋+1 with Python's floor division, clamped at 0."""
    return max(0, ((t - 3) // 2 + 1 - 3) // 2 + 1)


def small_conformer(positions: str, *, dropout: float = 0.0, seed: int = 0, **kw) -> Conformer:
    torch.manual_seed(seed)
    args = dict(n_mels=N_MELS, dim=16, num_layers=2, num_heads=2, kernel_size=7, dropout=dropout, positions=positions)
    args.update(kw)
    model = Conformer(**args)
    randomise_norms(model)
    return model


def randomise_norms(model: nn.Module) -> None:
    """Non-trivial affine / running statistics / position biases so that they matter in the tests."""
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, MultiHeadSelfAttention) and m.positions == "relative":
                m.bias_u.copy_(0.5 * torch.randn(m.bias_u.shape, generator=g))
                m.bias_v.copy_(0.5 * torch.randn(m.bias_v.shape, generator=g))


# ------------------------------------------------------------------------------------------------ subsampling
def test_subsampled_lengths_match_conv_output_and_formula():
    torch.manual_seed(0)
    sub = ConvSubsampling(n_mels=N_MELS, dim=8, channels=4)
    for t in range(7, 201):
        out, lens = sub(torch.randn(1, t, N_MELS), torch.tensor([t]))
        assert out.shape == (1, sub_len(t), 8), t
        assert int(lens[0]) == out.shape[1] == sub_len(t), t
    all_t = torch.arange(0, 201)
    assert subsampled_lengths(all_t).tolist() == [sub_len(t) for t in range(201)]
    assert subsampled_lengths(torch.tensor([7, 10, 11, 100])).tolist() == [1, 1, 2, 24]


def test_subsampling_rejects_fewer_than_seven_frames():
    sub = ConvSubsampling(n_mels=N_MELS, dim=8, channels=4)
    for t in (1, 3, 6):
        with pytest.raises(ValueError):
            sub(torch.randn(2, t, N_MELS), torch.tensor([t, t]))


def test_subsampling_valid_frames_ignore_padding():
    torch.manual_seed(0)
    sub = ConvSubsampling(n_mels=N_MELS, dim=8, channels=4)
    x = torch.randn(1, 33, N_MELS)
    alone, lens = sub(x, torch.tensor([33]))
    padded = torch.cat([x, 1e3 * torch.randn(1, 15, N_MELS)], dim=1)
    out, _ = sub(padded, torch.tensor([33]))
    torch.testing.assert_close(out[:, : int(lens[0])], alone, atol=1e-5, rtol=1e-5)


def test_valid_mask():
    m = valid_mask(torch.tensor([3, 0, 5]), 5)
    assert m.dtype == torch.bool
    assert m.tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] * 5]


# ------------------------------------------------------------------------------------------------ rel_shift
def loop_rel_shift(x: torch.Tensor) -> torch.Tensor:
    t = x.shape[-2]
    out = torch.empty(*x.shape[:-1], t, dtype=x.dtype)
    for i in range(t):
        for j in range(t):
            out[..., i, j] = x[..., i, t - 1 - i + j]
    return out


@pytest.mark.parametrize("t", [1, 2, 5, 9])
def test_rel_shift_matches_loop(t):
    x = torch.randn(2, 3, t, 2 * t - 1)
    assert torch.equal(rel_shift(x), loop_rel_shift(x))
    sliced = torch.randn(2, 3, t, 2 * t + 4)[..., 2 : 2 * t + 1]  # an offset view with unit last stride
    assert torch.equal(rel_shift(sliced), loop_rel_shift(sliced))


def test_rel_shift_non_contiguous_input():
    t = 4
    x = torch.randn(2, 3, 2 * t - 1, t).transpose(-1, -2)  # (2, 3, T, 2T-1) with stride(3) != 1
    assert torch.equal(rel_shift(x), loop_rel_shift(x))


def test_rel_shift_gradient():
    t = 5
    x = torch.randn(1, 2, t, 2 * t - 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, t, t, dtype=torch.float64)
    (rel_shift(x) * w).sum().backward()
    expected = torch.zeros_like(x)
    for i in range(t):
        for j in range(t):
            expected[..., i, t - 1 - i + j] += w[..., i, j]
    assert torch.equal(x.grad, expected)
    assert torch.autograd.gradcheck(rel_shift, (x.detach().clone().requires_grad_(),))


def test_relative_encodings_are_sinusoids_of_the_distance():
    length, dim = 6, 8
    enc = relative_encodings(length, dim, device=torch.device("cpu"), dtype=torch.float32)
    assert enc.shape == (2 * length - 1, dim)
    for row in range(2 * length - 1):
        r = length - 1 - row  # distances L−1 … −(L−1)
        for i in range(dim // 2):
            freq = 10000.0 ** (-2 * i / dim)
            assert float(enc[row, 2 * i]) == pytest.approx(math.sin(r * freq), abs=1e-5)
            assert float(enc[row, 2 * i + 1]) == pytest.approx(math.cos(r * freq), abs=1e-5)
    longer = relative_encodings(9, dim, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(longer[9 - length : 9 + length - 1], enc)  # a distance's code is length-free


# ------------------------------------------------------------------------------------------------ attention
def naive_attention(att: MultiHeadSelfAttention, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Loops over heads, queries and keys: (q_i+u)·k_j + (q_i+v)·W_p·enc(i−j), scaled, softmax over valid keys."""
    b, t, d = x.shape
    h, hd = att.num_heads, att.head_dim
    qkv = x @ att.qkv.weight.T + att.qkv.bias
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    out = torch.zeros(b, t, d, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * hd, (hi + 1) * hd)
            for i in range(t):
                scores = torch.full((t,), float("-inf"), dtype=x.dtype)
                for j in range(t):
                    if not valid[bi, j]:
                        continue
                    s = q[bi, i, sl] @ k[bi, j, sl]
                    if att.positions == "relative":
                        r = i - j
                        enc = torch.zeros(d, dtype=x.dtype)
                        for m in range(d // 2):
                            freq = 10000.0 ** (-2 * m / d)
                            enc[2 * m], enc[2 * m + 1] = math.sin(r * freq), math.cos(r * freq)
                        p = (att.pos.weight @ enc)[sl]
                        s = s + att.bias_u[hi] @ k[bi, j, sl] + (q[bi, i, sl] + att.bias_v[hi]) @ p
                    scores[j] = s / math.sqrt(hd)
                out[bi, i, sl] = torch.softmax(scores, 0) @ v[bi, :, sl]
    return out @ att.proj.weight.T + att.proj.bias


@pytest.mark.parametrize("positions", ["relative", "none"])
def test_attention_matches_naive_loops(positions):
    torch.manual_seed(0)
    att = MultiHeadSelfAttention(dim=8, num_heads=2, dropout=0.0, positions=positions).eval()
    if positions == "relative":
        with torch.no_grad():
            att.bias_u.normal_()
            att.bias_v.normal_()
    x = torch.randn(2, 6, 8)
    valid = valid_mask(torch.tensor([6, 4]), 6)
    with torch.no_grad():
        got = att(x, valid)
        ref = naive_attention(att, x, valid)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_attention_permutation_equivariance_only_without_positions():
    torch.manual_seed(0)
    x = torch.randn(1, 9, 16)
    valid = torch.ones(1, 9, dtype=torch.bool)
    perm = torch.tensor([3, 0, 7, 1, 8, 2, 6, 4, 5])
    none = MultiHeadSelfAttention(dim=16, num_heads=2, dropout=0.0, positions="none").eval()
    rel = MultiHeadSelfAttention(dim=16, num_heads=2, dropout=0.0, positions="relative").eval()
    with torch.no_grad():
        torch.testing.assert_close(none(x[:, perm], valid), none(x, valid)[:, perm], atol=1e-5, rtol=1e-5)
        diff = (rel(x[:, perm], valid) - rel(x, valid)[:, perm]).abs().max()
    assert diff > 1e-2  # positions matter


# ------------------------------------------------------------------------------------------------ the block
def test_block_with_silent_residual_branches_is_layer_norm():
    torch.manual_seed(0)
    block = ConformerBlock(dim=16, num_heads=2, ffn_dim=32, kernel_size=5, dropout=0.0, positions="relative")
    randomise_norms(block)
    with torch.no_grad():
        for lin in (block.ffn1.down, block.ffn2.down, block.attn.proj, block.conv.pointwise_out):
            lin.weight.zero_()
            lin.bias.zero_()
    x = 3.0 * torch.randn(2, 11, 16) + 1.0
    valid = valid_mask(torch.tensor([11, 7]), 11)
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-5) * block.norm.weight + block.norm.bias
    for mode in (True, False):
        block.train(mode)
        torch.testing.assert_close(block(x, valid), ref, atol=1e-5, rtol=1e-5)


def hand_block(block: ConformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The macaron block written out with functional ops (eval mode, no padding, positions none)."""

    def ln(mod: nn.LayerNorm, y: torch.Tensor) -> torch.Tensor:
        mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        return (y - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias

    def ffn(mod, y):
        hdn = ln(mod.norm, y) @ mod.up.weight.T + mod.up.bias
        hdn = hdn * torch.sigmoid(hdn)
        return hdn @ mod.down.weight.T + mod.down.bias

    def conv(mod: ConvModule, y):
        z = ln(mod.norm, y) @ mod.pointwise_in.weight[:, :, 0].T + mod.pointwise_in.bias  # (B, T, 2d)
        d = y.shape[-1]
        z = z[..., :d] * torch.sigmoid(z[..., d:])
        k = mod.depthwise.kernel_size[0]
        zp = F.pad(z.transpose(1, 2), (k // 2, k // 2))
        dw = torch.zeros_like(z)
        for t in range(y.shape[1]):
            dw[:, t] = (zp[:, :, t : t + k] * mod.depthwise.weight[:, 0, :]).sum(-1) + mod.depthwise.bias
        bn = mod.batch_norm
        dw = (dw - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        dw = dw * torch.sigmoid(dw)
        return dw @ mod.pointwise_out.weight[:, :, 0].T + mod.pointwise_out.bias

    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    x = x + 0.5 * ffn(block.ffn1, x)
    x = x + naive_attention(block.attn, ln(block.attn_norm, x), valid)
    x = x + conv(block.conv, x)
    x = x + 0.5 * ffn(block.ffn2, x)
    return ln(block.norm, x)


def test_block_matches_hand_written_macaron():
    torch.manual_seed(0)
    block = ConformerBlock(dim=8, num_heads=2, ffn_dim=16, kernel_size=3, dropout=0.0, positions="none")
    randomise_norms(block)
    block.eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        got = block(x, torch.ones(2, 6, dtype=torch.bool))
        ref = hand_block(block, x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("positions", ["relative", "none"])
def test_padding_invariance_eval(positions):
    model = small_conformer(positions, dropout=0.1).eval()  # dropout is off in eval
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 41, N_MELS, generator=g)
    b = torch.randn(1, 77, N_MELS, generator=g)
    batch = torch.cat([torch.cat([a, 50 * torch.randn(1, 36, N_MELS, generator=g)], 1), b])
    with torch.no_grad():
        alone = model(a, torch.tensor([41]))
        both = model(batch, torch.tensor([41, 77]))
        b_alone = model(b, torch.tensor([77]))
    n = sub_len(41)
    assert alone.hidden.shape[1] == n and both.lengths.tolist() == [n, sub_len(77)]
    assert both.valid[0].tolist() == [True] * n + [False] * (sub_len(77) - n)
    torch.testing.assert_close(both.hidden[0, :n], alone.hidden[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.hidden[1], b_alone.hidden[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["relative", "none"])
def test_padding_invariance_train_mode_masked_batch_norm(positions):
    """Train mode (batch statistics, dropout 0): the same batch padded by different amounts with garbage."""
    model1 = small_conformer(positions, dropout=0.0).train()
    model2 = copy.deepcopy(model1)
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([50, 33, 64])
    short = torch.randn(3, 64, N_MELS, generator=g)
    for i, n in enumerate(lengths.tolist()):
        short[i, n:] = 30.0 * torch.randn(64 - n, N_MELS, generator=g)
    long = torch.cat([short, -40.0 + 9.0 * torch.randn(3, 29, N_MELS, generator=g)], dim=1)
    out1 = model1(short, lengths)
    out2 = model2(long, lengths)
    for i, n in enumerate(out1.lengths.tolist()):
        torch.testing.assert_close(out2.hidden[i, :n], out1.hidden[i, :n], atol=1e-5, rtol=1e-4)
    bn1 = [m for m in model1.modules() if isinstance(m, MaskedBatchNorm1d)]
    bn2 = [m for m in model2.modules() if isinstance(m, MaskedBatchNorm1d)]
    assert len(bn1) == 2
    for m1, m2 in zip(bn1, bn2, strict=True):
        torch.testing.assert_close(m1.running_mean, m2.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m1.running_var, m2.running_var, atol=1e-6, rtol=1e-5)
        assert int(m1.num_batches_tracked) == 1


@pytest.mark.parametrize("positions", ["relative", "none"])
def test_ctc_log_probs_padding_invariant(positions):
    model = CTCModel(encoder=small_conformer(positions)).eval()
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 30, N_MELS, generator=g)
    batch = torch.cat([torch.cat([a, 9 * torch.randn(1, 25, N_MELS, generator=g)], 1), torch.randn(1, 55, N_MELS)])
    with torch.no_grad():
        lp_a, len_a = model(a, torch.tensor([30]))
        lp, lens = model(batch, torch.tensor([30, 55]))
    assert lp.shape == (2, sub_len(55), VOCAB_SIZE)
    assert int(len_a[0]) == int(lens[0]) == sub_len(30)
    torch.testing.assert_close(lp[0, : sub_len(30)], lp_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, sub_len(55)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ batch norm
def test_masked_batch_norm_equals_batch_norm_on_valid_frames():
    torch.manual_seed(0)
    c = 4
    mbn, ref = MaskedBatchNorm1d(c), nn.BatchNorm1d(c)
    with torch.no_grad():
        for m in (mbn, ref):
            m.weight.copy_(torch.tensor([1.5, 0.5, -1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    lengths = torch.tensor([10, 6, 3])
    valid = valid_mask(lengths, 10)
    x = torch.randn(3, c, 10) * 2.0 + 1.0
    x = x.masked_fill(~valid[:, None, :], 1e3).requires_grad_()  # garbage padding
    frames = torch.cat([x[i, :, :n] for i, n in enumerate(lengths.tolist())], dim=1)[None]  # (1, C, N)
    frames_ref = frames.detach().clone().requires_grad_()
    y = mbn(x, valid)
    y_ref = ref(frames_ref)
    got = torch.cat([y[i, :, :n] for i, n in enumerate(lengths.tolist())], dim=1)[None]
    torch.testing.assert_close(got, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mbn.running_mean, ref.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mbn.running_var, ref.running_var, atol=1e-6, rtol=1e-5)
    assert int(mbn.num_batches_tracked) == 1
    assert not torch.allclose(mbn.running_mean, torch.zeros(c))
    # gradients: the same on valid frames, none to padding
    w = torch.randn_like(y_ref)
    (got * w).sum().backward()
    (y_ref * w).sum().backward()
    g_valid = torch.cat([x.grad[i, :, :n] for i, n in enumerate(lengths.tolist())], dim=1)[None]
    torch.testing.assert_close(g_valid, frames_ref.grad, atol=1e-5, rtol=1e-4)
    assert torch.all(x.grad.masked_select(~valid[:, None, :].expand_as(x)) == 0)
    torch.testing.assert_close(mbn.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-4)
    # eval mode uses the running statistics like nn.BatchNorm1d
    mbn.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(mbn(x, valid), ref(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ gradients & CTC
@pytest.mark.parametrize("positions", ["relative", "none"])
def test_every_parameter_gets_a_finite_nonzero_gradient(positions):
    model = CTCModel(encoder=small_conformer(positions, num_layers=2, dim=16)).train()
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 45, N_MELS, generator=g)
    lengths = torch.tensor([45, 37])
    lp, out_len = model(feats, lengths)
    loss = ctc_loss(lp, out_len, [torch.tensor([3, 5, 5]), torch.tensor([9, 2])])
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def brute_force_ctc(log_probs: torch.Tensor, target: list[int], blank: int = 0) -> float:
    """−log Σ over every frame path that collapses (merge repeats, drop blanks) to ``target``."""
    t, v = log_probs.shape
    total = 0.0
    for path in itertools.product(range(v), repeat=t):
        collapsed = [c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1])]
        if collapsed == target:
            total += math.exp(sum(float(log_probs[i, c]) for i, c in enumerate(path)))
    return -math.log(total)


def test_ctc_loss_matches_brute_force():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(2, 5, 4, dtype=torch.float64), dim=-1)
    lengths = torch.tensor([5, 4])
    targets = [torch.tensor([1, 1]), torch.tensor([2, 3, 1])]
    expected = (brute_force_ctc(lp[0], [1, 1]) / 2 + brute_force_ctc(lp[1, :4], [2, 3, 1]) / 3) / 2
    assert float(ctc_loss(lp, lengths, targets)) == pytest.approx(expected, rel=1e-9)


def test_ctc_loss_impossible_target_is_finite():
    lp = torch.log_softmax(torch.randn(2, 4, VOCAB_SIZE), dim=-1).requires_grad_()
    targets = [torch.arange(1, 11), torch.tensor([4, 5])]  # 10 labels in 4 frames cannot fit
    loss = ctc_loss(lp, torch.tensor([4, 4]), targets)
    assert torch.isfinite(loss)
    possible = ctc_loss(lp[1:], torch.tensor([4]), targets[1:])
    torch.testing.assert_close(loss, possible / 2)  # the impossible utterance contributes 0
    loss.backward()
    assert torch.isfinite(lp.grad).all() and torch.all(lp.grad[0] == 0)


def greedy(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    out = []
    for b, n in enumerate(lengths.tolist()):
        best = log_probs[b, :n].argmax(-1).tolist()
        out.append([c for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1])])
    return out


def test_ctc_overfits_five_utterances():
    torch.manual_seed(0)
    model = CTCModel(encoder=Conformer(n_mels=80, dim=32, num_layers=2, num_heads=4, kernel_size=7, dropout=0.0))
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([60, 56, 60, 52, 58])
    feats = torch.randn(5, 60, 80, generator=g)
    targets = [torch.tensor(t) for t in ([3, 7, 9], [12, 4], [5, 5, 20], [8, 1, 15], [26, 11])]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(150):
        lp, out_len = model(feats, lengths)
        loss = ctc_loss(lp, out_len, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    model.eval()
    with torch.no_grad():
        lp, out_len = model(feats, lengths)
        final = float(ctc_loss(lp, out_len, targets))
    assert final < 0.2 * first
    assert greedy(lp, out_len) == [t.tolist() for t in targets]


# ------------------------------------------------------------------------------------------------ determinism
def run_once(positions: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = CTCModel(encoder=small_conformer(positions, dropout=0.1, seed=7)).train()
    torch.manual_seed(8)  # dropout draws
    feats = torch.randn(2, 40, N_MELS)
    lp, lens = model(feats, torch.tensor([40, 29]))
    ctc_loss(lp, lens, [torch.tensor([1, 2]), torch.tensor([3])]).backward()
    return lp.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("positions", ["relative", "none"])
def test_same_seed_same_outputs_and_gradients(positions):
    lp1, g1 = run_once(positions)
    lp2, g2 = run_once(positions)
    assert torch.equal(lp1, lp2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


# ------------------------------------------------------------------------------------------------ settings
def test_bad_settings_raise():
    with pytest.raises(ValueError):
        Conformer(n_mels=N_MELS, dim=16, num_heads=2, kernel_size=4)
    with pytest.raises(ValueError):
        Conformer(n_mels=N_MELS, dim=30, num_heads=4)
    with pytest.raises(ValueError):
        Conformer(n_mels=N_MELS, dim=16, num_heads=2, positions="absolute")
    with pytest.raises(ValueError):
        MultiHeadSelfAttention(dim=10, num_heads=3, dropout=0.0, positions="none")
    with pytest.raises(ValueError):
        ConvModule(dim=8, kernel_size=2, dropout=0.0)


# ------------------------------------------------------------------------------------------------ sizes
def param_count(*, dim: int, layers: int, ffn: int, kernel: int, positions: str, n_mels: int = 80, ch=None) -> int:
    """Parameters derived by hand from the architecture (BatchNorm running statistics are buffers)."""
    d, f, c = dim, ffn, ch or dim
    freq = ((n_mels - 3) // 2 + 1 - 3) // 2 + 1
    subsample = (9 * c + c) + (9 * c * c + c) + (c * freq * d + d)
    feed_forward = 2 * d + (d * f + f) + (f * d + d)  # LN, up, down
    attention = 2 * d + (3 * d * d + 3 * d) + (d * d + d)  # LN, qkv, proj
    if positions == "relative":
        attention += d * d + 2 * d  # W_pos (no bias), u, v
    conv = 2 * d + (2 * d * d + 2 * d) + (d * kernel + d) + 2 * d + (d * d + d)  # LN, pw in, depthwise, BN, pw out
    block = 2 * feed_forward + attention + conv + 2 * d  # two FFNs, …, final LN
    return subsample + layers * block


@pytest.mark.parametrize(
    "kw",
    [
        dict(dim=16, num_layers=1, num_heads=2, ffn_dim=48, kernel_size=3, positions="none"),
        dict(dim=16, num_layers=1, num_heads=4, ffn_dim=64, kernel_size=7, positions="relative"),
        dict(dim=24, num_layers=2, num_heads=3, ffn_dim=40, kernel_size=5, positions="relative", subsample_channels=8),
    ],
)
def test_parameter_formula_matches_instantiated_conformer(kw):
    model = Conformer(n_mels=80, dropout=0.0, **kw)
    expected = param_count(
        dim=kw["dim"],
        layers=kw["num_layers"],
        ffn=kw["ffn_dim"],
        kernel=kw["kernel_size"],
        positions=kw["positions"],
        ch=kw.get("subsample_channels"),
    )
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", ["smoke", "quick"])
def test_small_sizes_instantiate_with_formula_count(name):
    s = SIZES[name]
    model = Conformer(
        n_mels=80,
        dim=s.dim,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        ffn_dim=s.ffn_dim,
        kernel_size=s.kernel_size,
        positions=s.positions,
    )
    assert sum(p.numel() for p in model.parameters()) == param_count(
        dim=s.dim, layers=s.num_layers, ffn=s.ffn_dim, kernel=s.kernel_size, positions=s.positions
    )


def test_large_sizes_match_published_parameter_counts():
    """Pushing the Limits (arXiv 2010.10504) Table 1: XL 24 layers, d 1024, 8 heads, kernel 5 → 0.6B; XXL 42 layers
    → 1.0B; both without relative positions. BigSSL's Conformer G: ~8B. Counted with the formula, not allocated."""
    for name, layers, target in (("xl", 24, 0.6e9), ("xxl", 42, 1.0e9)):
        s = SIZES[name]
        assert (s.dim, s.num_layers, s.num_heads, s.ffn_dim, s.kernel_size, s.positions) == (
            1024,
            layers,
            8,
            4096,
            5,
            "none",
        )
        n = param_count(dim=s.dim, layers=s.num_layers, ffn=s.ffn_dim, kernel=s.kernel_size, positions=s.positions)
        assert abs(n - target) < 0.1 * target, (name, n)
    g = SIZES["g"]
    assert g.dim % g.num_heads == 0 and g.kernel_size % 2 == 1 and g.positions == "none"
    n = param_count(dim=g.dim, layers=g.num_layers, ffn=g.ffn_dim, kernel=g.kernel_size, positions=g.positions)
    assert abs(n - 8e9) < 0.1 * 8e9, n
    for s in SIZES.values():
        assert s.dim % s.num_heads == 0 and s.kernel_size % 2 == 1 and s.positions in ("relative", "none")


def test_masked_batch_norm_momentum_none_is_a_cumulative_average_like_batch_norm():
    g = torch.Generator().manual_seed(3)
    ours, ref = MaskedBatchNorm1d(4, momentum=None), torch.nn.BatchNorm1d(4, momentum=None)
    for _ in range(3):
        x = torch.randn(2, 4, 9, generator=g) * 3 + 1
        ours(x, torch.ones(2, 9, dtype=torch.bool))
        ref(x)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
