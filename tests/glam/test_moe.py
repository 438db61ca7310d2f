"""Behavioural tests of GLaM's GShard top-2 gating and MoE layer (``thrifty.methods.glam.moe``).

Expected values are derived by hand (closed forms written out in each test) or from the independent
NumPy re-implementation of Praxis' ``top2_gating_on_logits`` (``legacy_mtf_behavior=True``) below;
none are copied from running the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thrifty.methods.glam.losses import load_balancing_loss
from thrifty.methods.glam.moe import MoELayer, expert_capacity, gate_tokens, routing_stats


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threading only adds contention (large slowdowns on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def np_gshard(
    logits: np.ndarray, nonpad: np.ndarray, capacity: int, *, mode: str = "capacity", norm: str = "nonpad"
) -> dict[str, np.ndarray | float]:
    """Praxis' top-2 (or top-1) gating with legacy MTF renormalisation, in float64 NumPy.

    Returns the one-hot ``[G,S,E,C]`` combine tensor, the pre-cut masks, the over-capacity ratios
    and the aux loss.
    """
    G, S, E = logits.shape
    C = capacity
    raw = np_softmax(logits)
    w = nonpad.astype(np.float64)
    eye = np.eye(E)
    i1 = logits.argmax(-1)
    m1 = eye[i1] * w[..., None]
    if norm == "nonpad":
        denom = np.maximum(w.sum(1), 1.0)[:, None]
    else:
        denom = np.full((G, 1), float(S))
    density = m1.sum(1) / denom
    proxy = (raw * w[..., None]).sum(1) / denom
    aux = float((density * proxy).mean() * E * E)
    c_range = np.arange(C)

    if mode == "top1":
        g1 = (raw * m1).sum(-1)
        pos1 = np.cumsum(m1, axis=1) - m1
        over1 = float((m1 * (pos1 >= C)).sum() / max(m1.sum(), 1.0))
        pre1 = m1.copy()
        m1 = m1 * (pos1 < C)
        combine = g1[..., None, None] * m1[..., None] * (pos1[..., None] == c_range)
        return {
            "combine": combine,
            "assigned1": pre1.sum(-1) > 0,
            "kept1": m1.sum(-1) > 0,
            "i1": i1,
            "over": (over1,),
            "aux": aux,
        }

    masked = np.where(eye[i1] > 0, -np.inf, logits.astype(np.float64))
    i2 = masked.argmax(-1)
    m2 = eye[i2] * w[..., None]
    g1 = (raw * m1).sum(-1)
    g2 = (raw * m2).sum(-1)
    den = g1 + g2 + 1e-9
    g1, g2 = g1 / den, g2 / den
    pre1, pre2 = m1.copy(), m2.copy()

    pos1 = np.cumsum(m1, axis=1) - m1
    over1 = float((m1 * (pos1 >= C)).sum() / max(m1.sum(), 1.0))
    m1 = m1 * (pos1 < C)
    pos2 = np.cumsum(m2, axis=1) - m2 + m1.sum(axis=1, keepdims=True)
    over2 = float((m2 * (pos2 >= C)).sum() / max(m2.sum(), 1.0))
    m2 = m2 * (pos2 < C)

    combine = g1[..., None, None] * m1[..., None] * (pos1[..., None] == c_range) + g2[..., None, None] * m2[
        ..., None
    ] * (pos2[..., None] == c_range)
    return {
        "combine": combine,
        "assigned1": pre1.sum(-1) > 0,
        "assigned2": pre2.sum(-1) > 0,
        "kept1": m1.sum(-1) > 0,
        "kept2": m2.sum(-1) > 0,
        "i1": i1,
        "i2": i2,
        "g1": g1,
        "g2": g2,
        "over": (over1, over2),
        "aux": aux,
    }


def combine_from_routing(r, num_experts: int, capacity: int) -> np.ndarray:
    """Scatter a :class:`Routing` into the dense ``[G,S,E,C]`` combine tensor (test-side)."""
    G, S, K = r.expert.shape
    out = np.zeros((G, S, num_experts, capacity))
    expert, pos, gate, kept = (t.detach().cpu().numpy() for t in (r.expert, r.position, r.gate, r.kept))
    for g in range(G):
        for s in range(S):
            for k in range(K):
                if kept[g, s, k]:
                    assert 0 <= pos[g, s, k] < capacity
                    assert out[g, s, expert[g, s, k], pos[g, s, k]] == 0.0
                    out[g, s, expert[g, s, k], pos[g, s, k]] += gate[g, s, k]
                else:
                    assert gate[g, s, k] == 0.0
    return out


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ffn(layer: MoELayer, e: int, v: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return (gelu_erf(v @ ex.wi_0[e]) * (v @ ex.wi_1[e])) @ ex.wo[e]


def manual_moe(layer: MoELayer, xg: torch.Tensor, expert, gate, kept) -> torch.Tensor:
    """Token-by-token ``sum_k gate_k · FFN_{e_k}(x)`` over kept slots (no dispatch tensors)."""
    G, S, _ = xg.shape
    y = torch.zeros_like(xg)
    for g in range(G):
        for s in range(S):
            for k in range(expert.shape[-1]):
                if bool(kept[g, s, k]):
                    y[g, s] = y[g, s] + gate[g, s, k] * ffn(layer, int(expert[g, s, k]), xg[g, s])
    return y


def make_layer(seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    defaults = dict(dim=8, ffn_dim=16, num_experts=4, group_size=16, capacity_factor=1.0, init_std=0.5)
    defaults.update(kw)
    return MoELayer(**defaults)


def clone_layer(layer: MoELayer, **overrides) -> MoELayer:
    kw = dict(
        dim=layer.dim,
        ffn_dim=layer.ffn_dim,
        num_experts=layer.num_experts,
        mode=layer.mode,
        capacity_factor=layer.capacity_factor,
        group_size=layer.group_size,
        second_policy=layer.second_policy,
        second_threshold=layer.second_threshold,
        logit_cap=layer.logit_cap,
        aux_norm=layer.aux_norm,
        dispatch=layer.dispatch,
    )
    kw.update(overrides)
    other = MoELayer(**kw)
    other.load_state_dict(layer.state_dict())
    other.train(layer.training)
    return other


def grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in layer.named_parameters()}


# Hand-built overflow case (E=3, S=8, C=4). The third expert always has the lowest logit, so each
# token's (i1, i2) is read off directly:
#   t0..t2: i1=1, i2=0        t3..t7: i1=0, i2=1
HAND_LOGITS = torch.tensor(
    [
        [1.0, 2.0, -3.0],
        [0.5, 1.5, -2.0],
        [0.0, 3.0, -1.0],
        [2.0, 1.0, -1.0],
        [1.0, 0.2, -2.0],
        [3.0, 2.5, 0.0],
        [1.2, 1.1, -5.0],
        [2.0, 0.0, -0.5],
    ]
)
HAND_I1 = [1, 1, 1, 0, 0, 0, 0, 0]
HAND_I2 = [0, 0, 0, 1, 1, 1, 1, 1]
# Top-1 positions: expert 0 gets t3,t4,t5,t6 at 0..3 and t7 at 4 (>= C: dropped);
# expert 1 gets t0,t1,t2 at 0..2. Kept top-1 counts: [4, 3, 0].
# Top-2 positions: expert 0: t0,t1,t2 at 0,1,2 + 4 = 4,5,6 (all dropped);
# expert 1: t3..t7 at 0..4 + 3 = 3,4,5,6,7 (only t3 kept, at 3).
HAND_KEPT = [[1, 0], [1, 0], [1, 0], [1, 1], [1, 0], [1, 0], [1, 0], [0, 0]]
HAND_POS = [[0, None], [1, None], [2, None], [0, 3], [1, None], [2, None], [3, None], [None, None]]


def hand_gates() -> torch.Tensor:
    """Renormalised g1 = p1/(p1+p2) = sigmoid(l1 - l2), g2 = 1 - g1, zeroed where dropped."""
    out = torch.zeros(8, 2)
    for s in range(8):
        l1 = float(HAND_LOGITS[s, HAND_I1[s]])
        l2 = float(HAND_LOGITS[s, HAND_I2[s]])
        g1 = 1.0 / (1.0 + math.exp(l2 - l1))
        out[s, 0] = g1 * HAND_KEPT[s][0]
        out[s, 1] = (1.0 - g1) * HAND_KEPT[s][1]
    return out


# ------------------------------------------------------------------------------------------------
# 1. Aux loss values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("E", [2, 3, 8])
@pytest.mark.parametrize("norm", ["nonpad", "legacy"])
def test_aux_is_one_at_uniform_router(E, norm):
    G, S = 3, 12
    r = gate_tokens(torch.zeros(G, S, E), torch.ones(G, S, dtype=torch.bool), capacity=4, aux_norm=norm)
    # P_e = 1/E for all e, sum_e f_e = 1  =>  E² · mean_e(f_e / E) = 1 whatever f is.
    assert abs(float(r.aux_loss) - 1.0) < 1e-6


def test_aux_is_one_for_uniform_probs_but_arbitrary_f():
    # Uniform P with the top-1 all on expert 0 (ties) is still exactly 1; also for top1 mode.
    E = 4
    r = gate_tokens(torch.zeros(1, 7, E), torch.ones(1, 7, dtype=torch.bool), mode="top1", capacity=4)
    assert abs(float(r.aux_loss) - 1.0) < 1e-6
    # Direct call of the loss with an arbitrary (non-argmax) f and uniform P.
    raw = torch.full((2, 5, E), 1.0 / E)
    f_idx = torch.tensor([[0, 0, 1, 3, 3], [2, 2, 2, 2, 1]])
    mask = torch.nn.functional.one_hot(f_idx, E).float()
    aux = load_balancing_loss(raw, mask, torch.ones(2, 5, dtype=torch.bool))
    assert abs(float(aux) - 1.0) < 1e-6


@pytest.mark.parametrize("E", [2, 3, 8])
@pytest.mark.parametrize("hot", [0, 1])
def test_aux_is_E_at_collapse(E, hot):
    G, S = 2, 10
    logits = torch.zeros(G, S, E)
    logits[..., hot] = 50.0  # P_hot = 1 - (E-1)·e^-50 == 1 in fp32, f_hot = 1
    r = gate_tokens(logits, torch.ones(G, S, dtype=torch.bool), capacity=4)
    assert math.isclose(float(r.aux_loss), float(E), rel_tol=1e-6)


def test_aux_norm_nonpad_vs_legacy_with_padding_by_hand():
    # E=2, S=4, token 3 is padding (its logits would change everything if it were counted).
    log3 = math.log(3.0)
    logits = torch.tensor([[[log3, 0.0], [0.0, log3], [log3, 0.0], [0.0, 100.0]]])
    nonpad = torch.tensor([[True, True, True, False]])
    # real tokens' probs: [.75,.25], [.25,.75], [.75,.25]; top-1: e0, e1, e0
    # nonpad: f = [2/3, 1/3], P = [1.75/3, 1.25/3] -> 4 · (2/3·1.75/3 + 1/3·1.25/3)/2 = 9.5/9
    # legacy (divide by S=4): f = [2/4, 1/4], P = [1.75/4, 1.25/4] -> 2·(0.5·0.4375 + 0.25·0.3125)
    r_np = gate_tokens(logits, nonpad, capacity=4, aux_norm="nonpad")
    r_lg = gate_tokens(logits, nonpad, capacity=4, aux_norm="legacy")
    assert math.isclose(float(r_np.aux_loss), 9.5 / 9.0, rel_tol=1e-6)
    assert math.isclose(float(r_lg.aux_loss), 0.59375, rel_tol=1e-6)


def test_aux_mean_over_groups_by_hand():
    # Group 0: collapse on expert 1 (aux_g = E = 2); group 1: uniform (aux_g = 1); mean = 1.5.
    logits = torch.zeros(2, 4, 2)
    logits[0, :, 1] = 50.0
    r = gate_tokens(logits, torch.ones(2, 4, dtype=torch.bool), capacity=4)
    assert math.isclose(float(r.aux_loss), 1.5, rel_tol=1e-6)


def test_aux_gradient_wrt_logits_matches_closed_form():
    # d aux / d raw[g,s,e] = E²/(G·E) · f[g,e] · w[g,s] / n_g ; chain through the softmax by hand.
    torch.manual_seed(0)
    G, S, E = 2, 6, 3
    logits = torch.randn(G, S, E, requires_grad=True)
    nonpad = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    r = gate_tokens(logits, nonpad, capacity=4)
    r.aux_loss.backward()
    lg = logits.detach().numpy().astype(np.float64)
    raw = np_softmax(lg)
    w = nonpad.numpy().astype(np.float64)
    n = w.sum(1)
    f = (np.eye(E)[lg.argmax(-1)] * w[..., None]).sum(1) / n[:, None]  # [G, E]
    a = (E * E / (G * E)) * f[:, None, :] * (w / n[:, None])[..., None]  # dL/draw, [G,S,E]
    expected = raw * (a - (raw * a).sum(-1, keepdims=True))
    np.testing.assert_allclose(logits.grad.numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 2. Aux loss gradient reaches the router
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["capacity", "top1", "dropless"])
def test_aux_loss_alone_backprops_into_router(mode):
    layer = make_layer(mode=mode)
    torch.manual_seed(1)
    out = layer(torch.randn(2, 16, 8))
    out.aux_loss.backward()
    g = layer.router.weight.grad
    assert g is not None
    assert torch.isfinite(g).all()
    assert g.abs().sum() > 0
    # The aux loss depends on the router only.
    for p in layer.experts.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


# ------------------------------------------------------------------------------------------------
# 3. Padding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["capacity", "top1"])
@pytest.mark.parametrize("dispatch", ["index", "einsum"])
def test_padding_never_dispatched_and_content_irrelevant(mode, dispatch):
    layer = make_layer(mode=mode, dispatch=dispatch, group_size=16, capacity_factor=1.0)
    torch.manual_seed(3)
    x = torch.randn(2, 16, 8)
    nonpad = torch.rand(2, 16) > 0.3
    nonpad[0, 0] = True
    x_a = x.clone()
    x_b = x.clone()
    x_a[~nonpad] = 50.0 * torch.randn(int((~nonpad).sum()), 8)
    x_b[~nonpad] = -30.0 * torch.randn(int((~nonpad).sum()), 8)

    for xx in (x_a, x_b):
        xg, npg, _ = layer.group(xx, nonpad)
        r, _ = layer.route(xg, npg)
        assert not r.assigned[~npg].any()
        assert not r.kept[~npg].any()
        assert torch.equal(r.gate[~npg], torch.zeros_like(r.gate[~npg]))

    out_a = layer(x_a, nonpad)
    out_b = layer(x_b, nonpad)
    # capacity 4 with 16 tokens on 4 experts: overflow is present, so the test is not vacuous
    assert float(out_a.stats["drop_rate"]) > 0
    assert torch.equal(out_a.hidden[nonpad], out_b.hidden[nonpad])
    assert torch.equal(out_a.hidden[~nonpad], torch.zeros_like(out_a.hidden[~nonpad]))
    assert torch.equal(out_b.hidden[~nonpad], torch.zeros_like(out_b.hidden[~nonpad]))
    assert torch.equal(out_a.aux_loss, out_b.aux_loss)
    assert torch.equal(out_a.router_z_loss, out_b.router_z_loss)
    for key in out_a.stats:
        assert torch.equal(out_a.stats[key], out_b.stats[key]), key
    # top-1 assignments count real tokens only; kept slots never exceed assigned real slots
    n_real = int(nonpad.sum())
    assert float(out_a.stats["top1_load"].sum()) == n_real
    assert float(out_a.stats["load"].sum()) <= layer.top_k * n_real


def test_padding_does_not_take_capacity_by_hand():
    # E=2, S=8, C=4; t0 and t3 are padding; every real token has i1=0, i2=1.
    logits = torch.tensor([[[2.0, 0.0]] * 8])
    logits[0, 0] = torch.tensor([9.0, -9.0])
    logits[0, 3] = torch.tensor([9.0, -9.0])
    nonpad = torch.tensor([[False, True, True, False, True, True, True, True]])
    r = gate_tokens(logits, nonpad, capacity=4)
    # real tokens t1,t2,t4,t5,t6,t7 get top-1 positions 0,1,2,3,4,5 -> t6,t7 dropped;
    # top-2 on expert 1 (no kept top-1 there): same positions -> t6,t7 dropped.
    kept = torch.tensor([[0, 0], [1, 1], [1, 1], [0, 0], [1, 1], [1, 1], [0, 0], [0, 0]], dtype=torch.bool)
    assert torch.equal(r.kept[0], kept)
    assert torch.equal(r.assigned[0], nonpad[0].unsqueeze(-1).expand(8, 2))
    assert r.position[0, [1, 2, 4, 5], 0].tolist() == [0, 1, 2, 3]
    assert r.position[0, [1, 2, 4, 5], 1].tolist() == [0, 1, 2, 3]
    assert math.isclose(float(r.over_capacity[0]), 2 / 6, rel_tol=1e-6)
    assert math.isclose(float(r.over_capacity[1]), 2 / 6, rel_tol=1e-6)
    g1 = 1.0 / (1.0 + math.exp(-2.0))
    expected_gate = kept.float() * torch.tensor([g1, 1.0 - g1])
    torch.testing.assert_close(r.gate[0], expected_gate, atol=1e-6, rtol=0)
    stats = routing_stats(r, nonpad)
    assert math.isclose(float(stats["both_dropped"]), 2 / 6, rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["capacity", "top1", "dropless"])
@pytest.mark.parametrize("dispatch", ["index", "einsum"])
def test_all_padding_group(mode, dispatch):
    layer = make_layer(mode=mode, dispatch=dispatch, group_size=8)
    torch.manual_seed(4)
    x = torch.randn(16, 8, requires_grad=True)
    nonpad = torch.zeros(16, dtype=torch.bool)
    nonpad[:8] = True  # group 0 real, group 1 all padding
    out = layer(x, nonpad)
    assert torch.equal(out.hidden[8:], torch.zeros(8, 8))
    assert torch.isfinite(out.hidden).all()
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.router_z_loss)
    (out.hidden.sum() + out.aux_loss + out.router_z_loss).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[8:], torch.zeros(8, 8))
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()

    # Entirely padded input: zero output, aux 0 (every group contributes 0), no NaN anywhere.
    out0 = layer(x.detach(), torch.zeros(16, dtype=torch.bool))
    assert torch.equal(out0.hidden, torch.zeros(16, 8))
    assert float(out0.aux_loss.detach()) == 0.0
    assert float(out0.router_z_loss.detach()) == 0.0
    assert all(torch.isfinite(v).all() for v in out0.stats.values())


def test_all_padding_group_aux_uniform_by_hand():
    # Per the definition (mean over groups), an all-padding group contributes 0 to the mean.
    logits = torch.zeros(2, 4, 3)
    nonpad = torch.tensor([[True, True, False, True], [False] * 4])
    r = gate_tokens(logits, nonpad, capacity=4)
    assert math.isclose(float(r.aux_loss), 0.5, rel_tol=1e-6)
    assert not r.assigned[1].any() and not r.kept[1].any()


def test_tail_group_padding_and_default_mask():
    layer = make_layer(group_size=8)
    torch.manual_seed(5)
    x = torch.randn(3, 7, 8)  # 21 tokens -> 3 groups of 8, 3 padded tail slots
    out = layer(x)
    assert out.hidden.shape == x.shape
    assert torch.isfinite(out.hidden).all()
    assert float(out.stats["top1_load"].sum()) == 21
    out2 = layer(x, torch.ones(3, 7, dtype=torch.bool))
    assert torch.equal(out.hidden, out2.hidden)
    with pytest.raises(ValueError):
        layer(x, torch.ones(3, 6, dtype=torch.bool))


def test_fewer_tokens_than_group_size_make_one_group():
    # 16 tokens with group_size 64: S = 16, so C = int(16·1/4) = 4 (not int(64/4) = 16).
    layer = make_layer(group_size=64, capacity_factor=1.0, num_experts=4)
    torch.manual_seed(19)
    x = torch.randn(16, 8)
    xg, npg, n = layer.group(x, None)
    assert xg.shape == (1, 16, 8) and n == 16 and npg.all()
    r, _ = layer.route(xg, npg)
    assert r.capacity == 4
    out = layer(x)
    # 16 top-1 + 16 top-2 slots cannot fit in 4 experts × 4 slots
    assert float(out.stats["load"].sum()) <= 16
    assert float(out.stats["drop_rate"]) >= 0.5


# ------------------------------------------------------------------------------------------------
# 4. Hand-built overflow
# ------------------------------------------------------------------------------------------------


def test_hand_built_overflow_top2():
    r = gate_tokens(HAND_LOGITS.unsqueeze(0), torch.ones(1, 8, dtype=torch.bool), capacity=4)
    assert r.capacity == 4
    assert r.expert[0].tolist() == [[a, b] for a, b in zip(HAND_I1, HAND_I2)]
    assert r.assigned.all()
    assert r.kept[0].tolist() == [[bool(k) for k in row] for row in HAND_KEPT]
    for s in range(8):
        for k in range(2):
            if HAND_POS[s][k] is not None:
                assert int(r.position[0, s, k]) == HAND_POS[s][k], (s, k)
    assert math.isclose(float(r.over_capacity[0]), 1 / 8, rel_tol=1e-6)
    assert math.isclose(float(r.over_capacity[1]), 7 / 8, rel_tol=1e-6)
    torch.testing.assert_close(r.gate[0], hand_gates(), atol=1e-6, rtol=0)
    # No renormalisation after the drop: t0's top-1 gate stays p1/(p1+p2) < 1.
    assert float(r.gate[0, 0, 0]) < 0.99
    # Top-1 is served before top-2: t0's top-2 slot on expert 0 is dropped although t0 comes first,
    # while the later tokens t3..t6 keep their top-1 slots on expert 0.
    assert r.expert[0, 0, 1] == 0 and not r.kept[0, 0, 1]
    assert (r.expert[0, 3:7, 0] == 0).all() and r.kept[0, 3:7, 0].all()
    # t7: both slots dropped, gates exactly 0.
    assert not r.kept[0, 7].any() and torch.equal(r.gate[0, 7], torch.zeros(2))
    # raw gates are the softmax
    torch.testing.assert_close(r.raw_gates[0], torch.softmax(HAND_LOGITS, -1), atol=1e-7, rtol=0)


@pytest.mark.parametrize("policy", ["all", "random"])
def test_second_expert_is_true_runner_up_when_probabilities_underflow(policy):
    # Token 0's top logit is 200 above the rest: every other softmax probability underflows to 0 in fp32.
    # Its runner-up is expert 3 (logit 50), not the lowest index that is not the top choice (expert 0).
    logits = torch.zeros(1, 4, 4)
    logits[0, 0] = torch.tensor([0.0, 0.0, 200.0, 50.0])
    logits[0, 1:] = torch.tensor([1.0, 0.0, 0.0, 0.5])
    r = gate_tokens(logits, torch.ones(1, 4, dtype=torch.bool), capacity=4, second_policy=policy, second_threshold=0.2)
    probs = torch.softmax(logits[0, 0], -1)
    assert float(probs[3]) == 0.0 and float(probs[0]) == 0.0  # the premise: both underflow
    assert r.expert[0, 0].tolist() == [2, 3]
    assert float(r.gate[0, 0, 1]) == 0.0 and not r.kept[0, 0, 1] and not r.assigned[0, 0, 1]


def test_underflowed_second_choice_takes_no_capacity():
    # Capacity 4 on expert 3: tokens 1-3 take three top-1 slots. Token 0's second choice (expert 3, gate 0
    # after underflow) must not take the last slot, which token 4's real second choice needs.
    logits = torch.zeros(1, 5, 4)
    logits[0, 0] = torch.tensor([0.0, 0.0, 200.0, 50.0])
    logits[0, 1:4] = torch.tensor([0.0, 0.0, 0.0, 10.0])
    logits[0, 4] = torch.tensor([1.0, 0.0, 0.0, 0.9])
    r = gate_tokens(logits, torch.ones(1, 5, dtype=torch.bool), capacity=4)
    assert r.capacity == 4
    assert r.expert[0, 4].tolist() == [0, 3]
    assert r.kept[0, 4, 1] and int(r.position[0, 4, 1]) == 3
    assert float(r.gate[0, 4, 1]) > 0.4
    assert float(r.over_capacity[1]) == 0.0


def test_hand_built_overflow_two_groups_are_independent():
    # The same pattern in two groups: positions restart in every group.
    logits = torch.stack([HAND_LOGITS, HAND_LOGITS])
    r = gate_tokens(logits, torch.ones(2, 8, dtype=torch.bool), capacity=4)
    assert torch.equal(r.kept[0], r.kept[1])
    assert torch.equal(r.position[0], r.position[1])
    assert r.kept[1].tolist() == [[bool(k) for k in row] for row in HAND_KEPT]


def test_hand_built_top1_mode():
    r = gate_tokens(HAND_LOGITS.unsqueeze(0), torch.ones(1, 8, dtype=torch.bool), mode="top1", capacity=4)
    assert r.expert.shape == (1, 8, 1)
    assert r.expert[0, :, 0].tolist() == HAND_I1
    # expert 0: t3..t6 at 0..3, t7 at 4 dropped; expert 1: t0..t2 at 0..2
    assert r.kept[0, :, 0].tolist() == [True] * 7 + [False]
    assert r.position[0, :7, 0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert math.isclose(float(r.over_capacity[0]), 1 / 8, rel_tol=1e-6)
    p = torch.softmax(HAND_LOGITS.double(), -1)
    expected = torch.tensor([float(p[s, HAND_I1[s]]) for s in range(8)]).float()
    expected[7] = 0.0
    torch.testing.assert_close(r.gate[0, :, 0], expected, atol=1e-6, rtol=0)


def test_hand_built_dropless_keeps_everything():
    r = gate_tokens(HAND_LOGITS.unsqueeze(0), torch.ones(1, 8, dtype=torch.bool), mode="dropless")
    assert r.capacity is None
    assert r.kept.all() and r.assigned.all()
    g = torch.tensor(
        [[1.0 / (1.0 + math.exp(float(HAND_LOGITS[s, HAND_I2[s]] - HAND_LOGITS[s, HAND_I1[s]])))] for s in range(8)]
    )
    torch.testing.assert_close(r.gate[0], torch.cat([g, 1 - g], dim=1), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# 5. Capacity
# ------------------------------------------------------------------------------------------------


def test_expert_capacity_hand_values():
    assert expert_capacity(1024, 8, 2.0) == 256
    assert expert_capacity(10, 3, 1.0) == 4  # int(3.33)=3 -> 4
    assert expert_capacity(100, 8, 1.25) == 16  # int(15.625)=15 -> 16
    assert expert_capacity(17, 4, 2.0) == 8  # int(8.5)=8
    assert expert_capacity(3, 8, 2.0) == 4  # int(0.75)=0 -> at least 4
    assert expert_capacity(64, 4, 1.0) == 16
    assert expert_capacity(36, 2, 1.0) == 20  # 18 -> 20


def test_expert_capacity_multiple_of_four():
    for S in (1, 3, 5, 8, 13, 64, 100, 1000):
        for E in (2, 3, 8, 64):
            for cf in (0.5, 1.0, 1.25, 2.0, 4.0):
                c = expert_capacity(S, E, cf)
                assert c % 4 == 0 and c >= 4, (S, E, cf)
                base = max(int(S * cf / E), 1)
                assert base <= c < base + 4, (S, E, cf)


@pytest.mark.parametrize("mode", ["capacity", "top1", "dropless"])
@pytest.mark.parametrize("dispatch", ["index", "einsum"])
@pytest.mark.parametrize(("S", "E", "cf"), [(3, 8, 2.0), (8, 2, 4.0), (1, 4, 1.0)])
def test_small_groups_forward_backward(mode, dispatch, S, E, cf):
    layer = make_layer(mode=mode, dispatch=dispatch, num_experts=E, group_size=S, capacity_factor=cf)
    torch.manual_seed(6)
    x = torch.randn(2 * S, 8, requires_grad=True)
    out = layer(x)
    C = expert_capacity(S, E, cf)
    assert C >= S
    assert torch.isfinite(out.hidden).all() and torch.isfinite(out.aux_loss)
    assert float(out.stats["drop_rate"]) == 0.0  # C >= S: nothing can overflow
    assert float(out.stats["both_dropped"]) == 0.0
    (out.hidden.square().sum() + out.aux_loss).backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


# ------------------------------------------------------------------------------------------------
# 6. Both-dropped tokens give exactly 0; end-to-end layer against the hand routing
# ------------------------------------------------------------------------------------------------


def hand_routed_layer(dispatch: str) -> tuple[MoELayer, torch.Tensor]:
    """A layer whose router reproduces HAND_LOGITS: logits = x[:, :3]."""
    layer = make_layer(num_experts=3, dim=6, group_size=8, capacity_factor=1.5, dispatch=dispatch)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :3] = torch.eye(3)
    torch.manual_seed(7)
    x = torch.cat([HAND_LOGITS, torch.randn(8, 3)], dim=1)
    return layer, x


@pytest.mark.parametrize("dispatch", ["index", "einsum"])
def test_both_dropped_token_output_is_exactly_zero(dispatch):
    layer, x = hand_routed_layer(dispatch)
    assert expert_capacity(8, 3, 1.5) == 4
    out = layer(x)
    assert torch.equal(out.hidden[7], torch.zeros(6))
    assert (out.hidden[:7].abs().sum(-1) > 0).all()
    assert math.isclose(float(out.stats["both_dropped"]), 1 / 8, rel_tol=1e-6)
    # Whole output against the hand routing and a token-by-token FFN.
    expert = torch.tensor([[a, b] for a, b in zip(HAND_I1, HAND_I2)]).unsqueeze(0)
    kept = torch.tensor(HAND_KEPT, dtype=torch.bool).unsqueeze(0)
    with torch.no_grad():
        ref = manual_moe(layer, x.unsqueeze(0), expert, hand_gates().unsqueeze(0), kept)[0]
    torch.testing.assert_close(out.hidden, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 7. NumPy parity
# ------------------------------------------------------------------------------------------------

PARITY_CASES = [
    # (G, S, E, C, pad_prob)
    (1, 8, 2, 4, 0.0),
    (2, 16, 4, 4, 0.25),
    (3, 32, 4, 8, 0.2),
    (2, 24, 8, 4, 0.3),
    (2, 12, 3, 16, 0.1),
    (4, 20, 5, 4, 0.5),
]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("G", "S", "E", "C", "pad"), PARITY_CASES)
@pytest.mark.parametrize("norm", ["nonpad", "legacy"])
def test_numpy_parity_top2(seed, G, S, E, C, pad, norm):
    gen = torch.Generator().manual_seed(seed * 1000 + S)
    logits = 2.0 * torch.randn(G, S, E, generator=gen)
    nonpad = torch.rand(G, S, generator=gen) >= pad
    if G > 2:
        nonpad[-1] = False  # one all-padding group
    r = gate_tokens(logits, nonpad, capacity=C, aux_norm=norm)
    ref = np_gshard(logits.numpy(), nonpad.numpy(), C, norm=norm)

    assert torch.equal(r.assigned[..., 0], torch.from_numpy(ref["assigned1"]))
    assert torch.equal(r.assigned[..., 1], torch.from_numpy(ref["assigned2"]))
    assert torch.equal(r.kept[..., 0], torch.from_numpy(ref["kept1"]))
    assert torch.equal(r.kept[..., 1], torch.from_numpy(ref["kept2"]))
    real = nonpad.numpy()
    np.testing.assert_array_equal(r.expert[..., 0].numpy()[real], ref["i1"][real])
    np.testing.assert_array_equal(r.expert[..., 1].numpy()[real], ref["i2"][real])
    comb = combine_from_routing(r, E, C)
    # exact match of the dispatch mask (and hence of every slot position), allclose of gates
    np.testing.assert_array_equal(comb != 0, ref["combine"] != 0)
    np.testing.assert_allclose(comb, ref["combine"], atol=1e-6, rtol=0)
    assert math.isclose(float(r.over_capacity[0]), ref["over"][0], rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(float(r.over_capacity[1]), ref["over"][1], rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(float(r.aux_loss), ref["aux"], rel_tol=1e-5, abs_tol=1e-7)
    np.testing.assert_allclose(r.raw_gates.numpy(), np_softmax(logits.numpy()), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("G", "S", "E", "C", "pad"), PARITY_CASES)
def test_numpy_parity_top1(seed, G, S, E, C, pad):
    gen = torch.Generator().manual_seed(seed * 777 + S)
    logits = 2.0 * torch.randn(G, S, E, generator=gen)
    nonpad = torch.rand(G, S, generator=gen) >= pad
    r = gate_tokens(logits, nonpad, mode="top1", capacity=C)
    ref = np_gshard(logits.numpy(), nonpad.numpy(), C, mode="top1")
    assert torch.equal(r.kept[..., 0], torch.from_numpy(ref["kept1"]))
    comb = combine_from_routing(r, E, C)
    np.testing.assert_array_equal(comb != 0, ref["combine"] != 0)
    np.testing.assert_allclose(comb, ref["combine"], atol=1e-6, rtol=0)
    assert math.isclose(float(r.over_capacity[0]), ref["over"][0], rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(float(r.aux_loss), ref["aux"], rel_tol=1e-5, abs_tol=1e-7)


def test_numpy_parity_through_layer_route():
    layer = make_layer(num_experts=4, group_size=16, capacity_factor=1.0, logit_cap=3.0)
    torch.manual_seed(8)
    x = torch.randn(40, 8)
    nonpad = torch.rand(40) > 0.2
    xg, npg, _ = layer.group(x, nonpad)
    r, logits = layer.route(xg, npg)
    # the logits are the soft-capped router projection
    raw_logits = xg.double() @ layer.router.weight.detach().double().T
    np.testing.assert_allclose(logits.detach().numpy(), (3.0 * torch.tanh(raw_logits / 3.0)).numpy(), atol=1e-5)
    C = expert_capacity(16, 4, 1.0)
    ref = np_gshard(logits.detach().numpy(), npg.numpy(), C)
    comb = combine_from_routing(r, 4, C)
    np.testing.assert_array_equal(comb != 0, ref["combine"] != 0)
    np.testing.assert_allclose(comb, ref["combine"], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# 8. Dropless == capacity when C >= S
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["index", "einsum"])
def test_dropless_equals_capacity_when_capacity_covers_group(dispatch):
    E, S = 4, 12
    cap_layer = make_layer(mode="capacity", num_experts=E, group_size=S, capacity_factor=float(E), dispatch=dispatch)
    assert expert_capacity(S, E, float(E)) >= S
    dl_layer = clone_layer(cap_layer, mode="dropless")
    torch.manual_seed(9)
    x = torch.randn(3, S, 8)
    nonpad = torch.rand(3, S) > 0.2
    target = torch.randn(3, S, 8)
    outs = []
    for layer in (cap_layer, dl_layer):
        xx = x.clone().requires_grad_(True)
        out = layer(xx, nonpad)
        ((out.hidden * target).sum() + out.aux_loss).backward()
        outs.append((out, xx.grad, grads(layer)))
    (o1, gx1, g1), (o2, gx2, g2) = outs
    assert float(o1.stats["drop_rate"]) == 0.0
    torch.testing.assert_close(o1.hidden, o2.hidden, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(o1.aux_loss, o2.aux_loss, atol=0, rtol=0)
    torch.testing.assert_close(gx1, gx2, atol=1e-6, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5, msg=name)


def test_dropless_differs_from_capacity_under_overflow():
    cap_layer = make_layer(mode="capacity", capacity_factor=0.5, group_size=16)
    dl_layer = clone_layer(cap_layer, mode="dropless")
    torch.manual_seed(10)
    x = torch.randn(32, 8)
    o_cap, o_dl = cap_layer(x), dl_layer(x)
    assert float(o_cap.stats["drop_rate"]) > 0
    assert float(o_dl.stats["drop_rate"]) == 0.0
    assert float(o_dl.stats["load"].sum()) == 64  # every token's two slots computed
    # dropless output equals the token-by-token reference with the renormalised top-2 gates
    xg, npg, _ = dl_layer.group(x, None)
    r, _ = dl_layer.route(xg, npg)
    with torch.no_grad():
        ref = manual_moe(dl_layer, xg, r.expert, r.gate, r.kept).reshape(32, 8)
    torch.testing.assert_close(o_dl.hidden, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 9. index dispatch == einsum dispatch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["capacity", "top1", "expert_choice"])
@pytest.mark.parametrize("seed", [0, 1])
def test_index_equals_einsum_with_overflow(mode, seed):
    idx = make_layer(seed=seed, mode=mode, dispatch="index", group_size=16, capacity_factor=1.0)
    ein = clone_layer(idx, dispatch="einsum")
    torch.manual_seed(100 + seed)
    x = torch.randn(3, 17, 8)  # 51 tokens -> 4 groups of 16 with a padded tail
    nonpad = torch.rand(3, 17) > 0.15
    target = torch.randn(3, 17, 8)
    res = []
    for layer in (idx, ein):
        xx = x.clone().requires_grad_(True)
        out = layer(xx, nonpad)
        ((out.hidden * target).sum() + 0.1 * out.aux_loss + 0.01 * out.router_z_loss).backward()
        res.append((out, xx.grad, grads(layer)))
    (o1, gx1, g1), (o2, gx2, g2) = res
    # overflow present (expert choice: tokens that no expert took)
    assert float(o1.stats["both_dropped" if mode == "expert_choice" else "over_capacity_1"]) > 0
    for key in o1.stats:
        torch.testing.assert_close(o1.stats[key], o2.stats[key], atol=0, rtol=0, msg=key)
    torch.testing.assert_close(o1.hidden, o2.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-5)
    for name in g1:
        assert g1[name].abs().sum() > 0, name
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-5, msg=name)
    # both equal the token-by-token reference
    xg, npg, _ = idx.group(x, nonpad)
    r, _ = idx.route(xg, npg)
    with torch.no_grad():
        ref = manual_moe(idx, xg, r.expert, r.gate, r.kept).reshape(-1, 8)[:51].view(3, 17, 8)
    torch.testing.assert_close(o1.hidden, ref, atol=1e-5, rtol=1e-5)
    nobody = ~r.kept.any(-1).reshape(-1)[:51].view(3, 17)
    assert not o1.hidden[nobody].any()  # a token no expert serves has exactly zero MoE output
    if mode == "expert_choice":  # every expert is full, so every expert's weights learn
        for name in ("experts.wi_0", "experts.wi_1", "experts.wo"):
            assert (g1[name].flatten(1).abs().sum(1) > 0).all(), name


# ------------------------------------------------------------------------------------------------
# 10. Every parameter gets a gradient
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["capacity", "top1", "dropless"])
@pytest.mark.parametrize("dispatch", ["index", "einsum"])
def test_every_parameter_gets_a_finite_gradient(mode, dispatch):
    layer = make_layer(mode=mode, dispatch=dispatch, group_size=32, capacity_factor=2.0)
    torch.manual_seed(11)
    out = layer(torch.randn(4, 32, 8))
    assert (out.stats["load"] > 0).all()  # every expert receives tokens
    (out.hidden.square().mean() + 0.01 * out.aux_loss + 1e-3 * out.router_z_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert layer.router.weight.grad.abs().sum() > 0
    for p in layer.experts.parameters():
        for e in range(layer.num_experts):
            assert p.grad[e].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# 11. Stochastic second-expert policies
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["sampling", "random"])
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_stochastic_policies_only_in_training(policy, mode):
    ref = make_layer(mode=mode, second_policy="all", capacity_factor=2.0)
    sto = clone_layer(ref, second_policy=policy, second_threshold=0.5)
    torch.manual_seed(12)
    x = torch.randn(64, 8)
    ref.eval()
    sto.eval()
    torch.manual_seed(0)
    a = sto(x)
    b = ref(x)
    assert torch.equal(a.hidden, b.hidden)
    for key in a.stats:
        assert torch.equal(a.stats[key], b.stats[key]), key
    sto.train()
    torch.manual_seed(0)
    c = sto(x)
    assert not torch.equal(c.hidden, b.hidden)


def test_sampling_never_repeats_top1_and_never_assigns_padding():
    gen = torch.Generator().manual_seed(13)
    G, S, E = 4, 64, 6
    logits = 3.0 * torch.randn(G, S, E, generator=gen)
    logits[0, :, 2] += 40.0  # near-collapse: the second choice must still differ from the first
    nonpad = torch.rand(G, S, generator=gen) > 0.3
    for _ in range(5):
        r = gate_tokens(logits, nonpad, capacity=8, second_policy="sampling", generator=gen)
        assert (r.expert[..., 1] != r.expert[..., 0]).all()
        assert not r.assigned[~nonpad].any() and not r.kept[~nonpad].any()
        assert torch.equal(r.gate[~nonpad], torch.zeros_like(r.gate[~nonpad]))
        assert torch.equal(r.assigned[nonpad], torch.ones_like(r.assigned[nonpad]))
        # gates renormalised over the sampled pair
        g = r.raw_gates.gather(-1, r.expert)
        expected = g / (g.sum(-1, keepdim=True) + 1e-9) * r.kept
        torch.testing.assert_close(r.gate, expected, atol=1e-6, rtol=0)


def test_sampling_distribution_is_softmax_without_top1():
    gen = torch.Generator().manual_seed(14)
    logit_row = torch.tensor([2.0, 1.0, 0.5, 0.0])
    N = 20000
    logits = logit_row.expand(1, N, 4).clone()
    r = gate_tokens(
        logits, torch.ones(1, N, dtype=torch.bool), mode="dropless", second_policy="sampling", generator=gen
    )
    freq = torch.bincount(r.expert[0, :, 1], minlength=4).double() / N
    p = torch.exp(logit_row.double())
    p[0] = 0.0
    p = p / p.sum()  # [0, e^1, e^.5, 1] / sum
    assert freq[0] == 0.0
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)


def test_random_policy_thresholds():
    gen = torch.Generator().manual_seed(15)
    G, S, E, C = 3, 32, 4, 12
    logits = 2.0 * torch.randn(G, S, E, generator=gen)
    nonpad = torch.rand(G, S, generator=gen) > 0.25
    r_all = gate_tokens(logits, nonpad, capacity=C, second_policy="all")
    r_tiny = gate_tokens(logits, nonpad, capacity=C, second_policy="random", second_threshold=1e-9, generator=gen)
    for f in ("expert", "position", "gate", "kept", "assigned"):
        assert torch.equal(getattr(r_all, f), getattr(r_tiny, f)), f
    r_huge = gate_tokens(logits, nonpad, capacity=C, second_policy="random", second_threshold=1e9, generator=gen)
    assert float(r_huge.assigned[..., 1].float().mean()) < 0.01
    assert float(r_huge.kept[..., 1].float().mean()) < 0.01
    assert not r_huge.assigned[~nonpad].any()
    # second slots are removed, but the first gate keeps its pre-drop renormalisation (no renorm)
    torch.testing.assert_close(r_huge.gate[..., 0], r_all.gate[..., 0] * r_huge.kept[..., 0], atol=1e-7, rtol=0)
    assert torch.equal(r_huge.gate[..., 1][~r_huge.kept[..., 1]], torch.zeros(int((~r_huge.kept[..., 1]).sum())))


def test_random_policy_keep_probability():
    # threshold 1: keep the second expert with probability g2 (renormalised, as in Praxis).
    gen = torch.Generator().manual_seed(16)
    row = torch.tensor([1.0, 0.5, -1.0, -2.0])
    N = 20000
    logits = row.expand(1, N, 4).clone()
    r = gate_tokens(
        logits,
        torch.ones(1, N, dtype=torch.bool),
        mode="dropless",
        second_policy="random",
        second_threshold=1.0,
        generator=gen,
    )
    g2 = 1.0 / (1.0 + math.exp(1.0 - 0.5))
    assert abs(float(r.assigned[0, :, 1].float().mean()) - g2) < 0.015
    # threshold below g2: always kept
    r2 = gate_tokens(
        logits,
        torch.ones(1, N, dtype=torch.bool),
        mode="dropless",
        second_policy="random",
        second_threshold=0.3,
        generator=gen,
    )
    assert r2.assigned.all()


# ------------------------------------------------------------------------------------------------
# 12. routing_stats
# ------------------------------------------------------------------------------------------------


def test_routing_stats_hand_case():
    nonpad = torch.ones(1, 8, dtype=torch.bool)
    r = gate_tokens(HAND_LOGITS.unsqueeze(0), nonpad, capacity=4)
    st = routing_stats(r, nonpad)
    # kept slots: expert 0 -> t3..t6 (4); expert 1 -> t0..t2 top-1 + t3 top-2 (4); expert 2 -> 0
    assert st["load"].tolist() == [4.0, 4.0, 0.0]
    assert st["top1_load"].tolist() == [5.0, 3.0, 0.0]
    assert float(st["load"].sum()) == int(r.kept.sum()) == 8
    assert math.isclose(float(st["both_dropped"]), 1 / 8, rel_tol=1e-6)
    assert math.isclose(float(st["drop_rate"]), 0.5, rel_tol=1e-6)
    assert math.isclose(float(st["over_capacity_1"]), 1 / 8, rel_tol=1e-6)
    assert math.isclose(float(st["over_capacity_2"]), 7 / 8, rel_tol=1e-6)
    assert math.isclose(float(st["load_entropy"]), math.log(2) / math.log(3), rel_tol=1e-6)
    ent = 0.0
    for s in range(8):
        z = [math.exp(v) for v in HAND_LOGITS[s].tolist()]
        p = [v / sum(z) for v in z]
        ent += -sum(q * math.log(q) for q in p)
    assert math.isclose(float(st["router_entropy"]), ent / 8 / math.log(3), rel_tol=1e-5)
    assert math.isclose(float(st["aux_loss"]), float(r.aux_loss), rel_tol=0, abs_tol=0)


def test_routing_stats_extremes():
    # uniform router -> router entropy 1; collapse -> router entropy ~0, load entropy 0 for top1.
    r = gate_tokens(torch.zeros(1, 8, 4), torch.ones(1, 8, dtype=torch.bool), capacity=4)
    st = routing_stats(r, torch.ones(1, 8, dtype=torch.bool))
    assert math.isclose(float(st["router_entropy"]), 1.0, rel_tol=1e-6)
    logits = torch.zeros(1, 8, 4)
    logits[..., 3] = 50.0
    r = gate_tokens(logits, torch.ones(1, 8, dtype=torch.bool), mode="top1", capacity=8)
    st = routing_stats(r, torch.ones(1, 8, dtype=torch.bool))
    assert float(st["router_entropy"]) < 1e-6
    assert float(st["load_entropy"]) == 0.0
    assert st["load"].tolist() == [0.0, 0.0, 0.0, 8.0]
    assert float(st["over_capacity_2"]) == 0.0


@pytest.mark.parametrize("mode", ["capacity", "top1", "dropless"])
def test_routing_stats_invariants_random(mode):
    layer = make_layer(mode=mode, group_size=16, capacity_factor=0.75)
    torch.manual_seed(17)
    x = torch.randn(48, 8)
    nonpad = torch.rand(48) > 0.2
    out = layer(x, nonpad)
    st = out.stats
    xg, npg, _ = layer.group(x, nonpad)
    r, _ = layer.route(xg, npg)
    assert float(st["load"].sum()) == int(r.kept.sum())
    assert 0.0 <= float(st["router_entropy"]) <= 1.0 + 1e-6
    assert 0.0 <= float(st["load_entropy"]) <= 1.0 + 1e-6
    real = npg
    n_both = int((real & ~r.kept.any(-1)).sum())
    assert math.isclose(float(st["both_dropped"]), n_both / int(real.sum()), rel_tol=1e-6)
    for v in st.values():
        assert not v.requires_grad


# ------------------------------------------------------------------------------------------------
# Router z-loss
# ------------------------------------------------------------------------------------------------


def test_router_z_loss_over_real_tokens():
    layer = make_layer(group_size=8)
    torch.manual_seed(18)
    x = torch.randn(16, 8)
    nonpad = torch.rand(16) > 0.3
    out = layer(x, nonpad)
    logits = x.double() @ layer.router.weight.detach().double().T
    lse = torch.logsumexp(logits, -1)
    expected = float(lse[nonpad].square().mean())
    assert math.isclose(float(out.router_z_loss.detach()), expected, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------
# 13. Bad settings
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="top3"),
        dict(dispatch="scatter"),
        dict(num_experts=1),
        dict(num_experts=1, mode="dropless"),
        dict(num_experts=0, mode="top1"),
        dict(group_size=0),
        dict(capacity_factor=0.0),
    ],
)
def test_bad_layer_settings_raise(kw):
    base = dict(dim=4, ffn_dim=8, num_experts=4)
    base.update(kw)
    with pytest.raises(ValueError):
        MoELayer(**base)


def test_top1_with_one_expert_is_allowed():
    layer = MoELayer(dim=4, ffn_dim=8, num_experts=1, mode="top1", group_size=8, capacity_factor=1.0)
    out = layer(torch.randn(8, 4))
    assert torch.isfinite(out.hidden).all()


def test_bad_gate_settings_raise():
    logits = torch.randn(1, 8, 4)
    nonpad = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError):
        gate_tokens(logits, nonpad, mode="top3", capacity=4)
    with pytest.raises(ValueError):
        gate_tokens(logits, nonpad, mode="capacity", capacity=None)
    with pytest.raises(ValueError):
        gate_tokens(logits, nonpad, mode="top1", capacity=None)
    with pytest.raises(ValueError):
        gate_tokens(logits, nonpad, capacity=4, second_policy="greedy")
    with pytest.raises(ValueError):
        gate_tokens(logits, nonpad, capacity=4, aux_norm="mean")
    with pytest.raises(ValueError, match="aux_norm"):
        MoELayer(dim=4, ffn_dim=8, num_experts=4, aux_norm="mean")
    with pytest.raises(ValueError, match="second_policy"):
        MoELayer(dim=4, ffn_dim=8, num_experts=4, second_policy="greedy")


# ------------------------------------------------------------------------------------------------
# Expert choice (the card's optional mode): each expert takes its top-C real tokens of the group
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "G", "S", "E", "C"), [(0, 2, 16, 4, 4), (1, 3, 12, 8, 8), (2, 1, 6, 4, 8)])
def test_expert_choice_picks_each_experts_top_c_real_tokens(seed, G, S, E, C):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(G, S, E, generator=gen) * 2
    nonpad = torch.rand(G, S, generator=gen) > 0.25
    r = gate_tokens(logits, nonpad, mode="expert_choice", capacity=C)
    raw = np_softmax(logits.numpy())
    assert r.expert.shape == (G, S, E)
    for g in range(G):
        real = np.flatnonzero(nonpad[g].numpy())
        for e in range(E):
            ranked = real[np.argsort(-raw[g, real, e], kind="stable")][: min(C, S)]
            picked = np.flatnonzero(r.kept[g, :, e].numpy())
            assert set(picked) == set(ranked), (g, e)
            for pos, tok in enumerate(ranked):  # buffer positions follow the expert's ranking
                assert int(r.position[g, tok, e]) == pos
            np.testing.assert_allclose(r.gate[g, picked, e].numpy(), raw[g, picked, e], rtol=1e-6)
    assert not r.kept[~nonpad].any()  # padding is never taken
    assert not r.gate[~r.kept].any()
    assert float(r.aux_loss) == 0.0
    stats = routing_stats(r, nonpad)
    per_expert = sum(min(C, S, int(nonpad[g].sum())) for g in range(G))
    torch.testing.assert_close(stats["load"], torch.full((E,), float(per_expert)))  # every expert full
    assert float(stats["drop_rate"]) == 0.0
