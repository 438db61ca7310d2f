"""GLaM's sparsely activated feed-forward layer: GShard top-2 gating with expert capacity.

Paper: *GLaM: Efficient Scaling of Language Models with Mixture-of-Experts* (arXiv 2112.06905), whose
MoE layer is GShard's (arXiv 2006.16668, Algorithm 2). Reference behaviour: google/praxis
``gshard_utils.top2_gating_on_logits`` with ``legacy_mtf_behavior=True``.

Routing, per group of ``S`` tokens (tokens are flattened and split into ``G`` groups that are
dispatched independently):

1. Router logits ``x·W_r`` in fp32 (no bias), optionally soft-capped ``c·tanh(z/c)``; softmax gives
   the raw gates.
2. ``i1 = argmax``; ``i2 = argmax`` after removing ``i1`` (policy ``all``), or sampled from the
   remaining softmax with Gumbel noise (``sampling``), or kept only with probability
   ``g2 / threshold`` (``random``). Padding is never assigned.
3. ``g1, g2`` are renormalised to sum to 1 (before any drop).
4. Capacity ``C = int(S·cf/E)`` rounded up to a multiple of 4. Top-1 slots are placed first (position
   = exclusive cumsum over the group); top-2 positions start after the *kept* top-1 tokens of that
   expert. Slots at position ``>= C`` are dropped: their gate becomes 0, with no renormalisation.
   A token dropped twice has a zero MoE output, so only the residual stream carries it.

Modes: ``capacity`` (above, top-2), ``top1`` (Switch-style, gate = raw probability, same capacity rule),
``dropless`` (top-2, every assigned slot is computed) and the card's optional ``expert_choice``
(Zhou et al., *Mixture-of-Experts with Expert Choice Routing*, arXiv 2202.09368): each expert takes
the ``C`` real tokens of the group with the highest router probability for it, so every expert is
exactly full and a token is served by 0..E experts (``cf`` on average), combined with those
probabilities unrenormalised. It needs no load-balancing loss (its aux loss is 0) and, more than the
capacity modes, decides a token's experts from the whole group, later tokens included.

Dispatch implementations: ``einsum`` is the paper's one-hot ``[G,S,E,C]`` formulation, kept as the
reference; ``index`` computes exactly the same function with gathers (no ``S×E×C`` tensor), and is the
default because it is faster and lighter.

Deliberate deviations (documented in the recipe README):
* ``C`` is at least 4 (Praxis keeps ``C=1`` when ``S·cf/E < 2``), so ``C`` is always a multiple of 4.
* Stochastic second-expert policies act only in training; evaluation uses ``all``.
* The ``all``/``random`` runner-up is the argmax of the logits with the top choice masked (Praxis takes the
  probabilities, which underflow to 0 together once the top logit is ~104 above the rest, so the lowest other
  index would win), and a second choice whose gate is exactly 0 takes no capacity slot. Identical whenever no
  probability underflows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.glam.losses import load_balancing_loss, z_loss

Mode = Literal["capacity", "top1", "dropless", "expert_choice"]
MODES = ("capacity", "top1", "dropless", "expert_choice")
Dispatch = Literal["index", "einsum"]
SecondPolicy = Literal["all", "sampling", "random"]


def expert_capacity(group_size: int, num_experts: int, capacity_factor: float) -> int:
    """``int(S·cf/E)`` rounded up to a multiple of 4, at least 4."""
    c = max(int(group_size * capacity_factor / num_experts), 1)
    return int(math.ceil(c / 4) * 4)


def slots_per_token(mode: str, *, num_experts: int, capacity_factor: float, group_size: int) -> float:
    """Expert-buffer rows computed per token in a capacity-limited mode: ``E·C/S`` (expert choice
    cannot take more than the group's ``S`` tokens per expert, so its ``C`` is at most ``S``)."""
    C = expert_capacity(group_size, num_experts, capacity_factor)
    if mode == "expert_choice":
        C = min(C, group_size)
    return num_experts * C / group_size


def experts_per_token(mode: str, *, num_experts: int, capacity_factor: float, group_size: int) -> float:
    """Experts that process a token on average: ``k`` of top-k routing; ``E·C/S`` for expert choice."""
    if mode == "top1":
        return 1.0
    if mode == "expert_choice":
        return slots_per_token(mode, num_experts=num_experts, capacity_factor=capacity_factor, group_size=group_size)
    return 2.0


@dataclasses.dataclass
class Routing:
    """Result of gating one batch of groups. ``K`` is 2 (top-2), 1 (top-1) or ``E`` (expert choice:
    slot ``k`` of a token is expert ``k``).

    Attributes:
        expert: ``[G, S, K]`` long, chosen expert per slot.
        position: ``[G, S, K]`` long, position of the slot in its expert's buffer (valid where kept).
        gate: ``[G, S, K]`` fp32 combine weight; exactly 0 where the slot is not kept.
        kept: ``[G, S, K]`` bool, slot is dispatched.
        assigned: ``[G, S, K]`` bool, slot was assigned before the capacity cut.
        raw_gates: ``[G, S, E]`` fp32 router softmax.
        capacity: ``C`` (``None`` in dropless mode).
        aux_loss: scalar load-balancing loss (GShard form).
        over_capacity: per rank ``k`` the fraction of assigned slots at position ``>= C``.
    """

    expert: torch.Tensor
    position: torch.Tensor
    gate: torch.Tensor
    kept: torch.Tensor
    assigned: torch.Tensor
    raw_gates: torch.Tensor
    capacity: int | None
    aux_loss: torch.Tensor
    over_capacity: tuple[torch.Tensor, ...]


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cumsum(x, dim=dim) - x


def gate_tokens(
    logits: torch.Tensor,
    nonpad: torch.Tensor,
    *,
    mode: Mode = "capacity",
    capacity: int | None = None,
    second_policy: SecondPolicy = "all",
    second_threshold: float = 0.0,
    aux_norm: Literal["nonpad", "legacy"] = "nonpad",
    generator: torch.Generator | None = None,
) -> Routing:
    """GShard gating on router logits.

    Args:
        logits: ``[G, S, E]`` router logits (cast to fp32 here).
        nonpad: ``[G, S]`` bool, True for real tokens.
        mode: ``capacity`` (top-2), ``top1``, ``dropless`` (top-2, no capacity) or ``expert_choice``.
        capacity: ``C`` for the capacity modes.
        second_policy: ``all`` | ``sampling`` | ``random`` (see module docstring).
        second_threshold: threshold of the ``random`` policy.
        aux_norm: padding normalisation of the load-balancing loss.
        generator: RNG for the stochastic policies.
    """
    logits = logits.float()
    G, S, E = logits.shape
    raw = torch.softmax(logits, dim=-1)
    if mode == "expert_choice":
        if capacity is None:
            raise ValueError("expert_choice mode needs a capacity")
        return _expert_choice(raw, nonpad, capacity)
    np_f = nonpad.to(raw.dtype)  # [G, S]

    i1 = raw.argmax(dim=-1)  # [G, S]
    m1 = F.one_hot(i1, E).to(raw.dtype) * np_f.unsqueeze(-1)  # [G, S, E]
    aux = load_balancing_loss(raw, m1, nonpad, norm=aux_norm)
    g1 = (raw * m1).sum(-1)

    if mode == "top1":
        if capacity is None:
            raise ValueError("top1 mode needs a capacity")
        pos1_full = _exclusive_cumsum(m1, dim=1)
        over1 = (m1 * (pos1_full >= capacity)).sum() / m1.sum().clamp_min(1.0)
        m1 = m1 * (pos1_full < capacity)
        kept1 = m1.sum(-1) > 0
        pos1 = (pos1_full * m1).sum(-1).long()
        return Routing(
            expert=i1.unsqueeze(-1),
            position=pos1.unsqueeze(-1),
            gate=(g1 * kept1).unsqueeze(-1),
            kept=kept1.unsqueeze(-1),
            assigned=nonpad.unsqueeze(-1),
            raw_gates=raw,
            capacity=capacity,
            aux_loss=aux,
            over_capacity=(over1,),
        )

    top1_hot = F.one_hot(i1, E).bool()
    if second_policy == "sampling":
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        i2 = (logits.masked_fill(top1_hot, float("-inf")) + gumbel).argmax(dim=-1)
    elif second_policy in ("all", "random"):
        # the runner-up from the logits, not the probabilities: when every other probability underflows
        # to 0 in fp32 (top logit >~104 above the rest), an argmax over probabilities picks the lowest index
        i2 = logits.masked_fill(top1_hot, float("-inf")).argmax(dim=-1)
    else:
        raise ValueError(f"second_policy must be all|sampling|random, not {second_policy!r}")
    m2 = F.one_hot(i2, E).to(raw.dtype) * np_f.unsqueeze(-1)
    g2 = (raw * m2).sum(-1)
    # a second choice whose gate underflowed to exactly 0 adds nothing to the output: it takes no slot
    m2 = m2 * (g2 > 0).unsqueeze(-1).to(raw.dtype)

    denom = g1 + g2 + 1e-9  # legacy Mesh-TF behaviour: renormalise before any drop
    g1, g2 = g1 / denom, g2 / denom

    if second_policy == "random":
        u = torch.rand(g2.shape, generator=generator, dtype=g2.dtype, device=g2.device)
        sampled = (u < g2 / max(second_threshold, 1e-9)).to(raw.dtype)
        g2 = g2 * sampled
        m2 = m2 * sampled.unsqueeze(-1)

    assigned = torch.stack([m1.sum(-1) > 0, m2.sum(-1) > 0], dim=-1)
    expert = torch.stack([i1, i2], dim=-1)
    if mode == "dropless":
        gate = torch.stack([g1, g2], dim=-1) * assigned
        zero = torch.zeros((), device=raw.device)
        return Routing(
            expert=expert,
            position=torch.zeros_like(expert),
            gate=gate,
            kept=assigned,
            assigned=assigned,
            raw_gates=raw,
            capacity=None,
            aux_loss=aux,
            over_capacity=(zero, zero),
        )
    if mode != "capacity":
        raise ValueError(f"mode must be one of {'|'.join(MODES)}, not {mode!r}")
    if capacity is None:
        raise ValueError("capacity mode needs a capacity")

    pos1_full = _exclusive_cumsum(m1, dim=1)  # [G, S, E]
    over1 = (m1 * (pos1_full >= capacity)).sum() / m1.sum().clamp_min(1.0)
    m1 = m1 * (pos1_full < capacity)
    count1 = m1.sum(dim=1, keepdim=True)  # [G, 1, E] kept top-1 tokens per expert
    pos2_full = _exclusive_cumsum(m2, dim=1) + count1
    over2 = (m2 * (pos2_full >= capacity)).sum() / m2.sum().clamp_min(1.0)
    m2 = m2 * (pos2_full < capacity)

    kept = torch.stack([m1.sum(-1) > 0, m2.sum(-1) > 0], dim=-1)
    position = torch.stack([(pos1_full * m1).sum(-1), (pos2_full * m2).sum(-1)], dim=-1).long()
    gate = torch.stack([g1, g2], dim=-1) * kept
    return Routing(
        expert=expert,
        position=position,
        gate=gate,
        kept=kept,
        assigned=assigned,
        raw_gates=raw,
        capacity=capacity,
        aux_loss=aux,
        over_capacity=(over1, over2),
    )


def _expert_choice(raw: torch.Tensor, nonpad: torch.Tensor, capacity: int) -> Routing:
    """Each expert picks its ``C`` highest-probability real tokens of the group (``raw``: ``[G, S, E]``)."""
    G, S, E = raw.shape
    C = min(capacity, S)
    score = raw.masked_fill(~nonpad.unsqueeze(-1), -1.0)  # padding ranks below every real token
    top_val, top_tok = score.topk(C, dim=1)  # [G, C, E]: the tokens each expert takes, best first
    chosen = top_val >= 0
    kept = torch.zeros(G, S, E, dtype=torch.bool, device=raw.device)
    kept.scatter_(1, top_tok, chosen)
    rank = torch.arange(C, device=raw.device).view(1, C, 1).expand(G, C, E)
    position = torch.zeros(G, S, E, dtype=torch.long, device=raw.device).scatter_(1, top_tok, rank)
    zero = torch.zeros((), device=raw.device)
    return Routing(
        expert=torch.arange(E, device=raw.device).expand(G, S, E),
        position=position * kept,
        gate=raw * kept,
        kept=kept,
        assigned=kept,
        raw_gates=raw,
        capacity=C,
        aux_loss=zero,
        over_capacity=(zero, zero),
    )


class Experts(nn.Module):
    """``E`` gated-GELU feed-forward experts without biases: ``W_o·(GELU(x·W_0) ⊙ x·W_1)``.

    Weights are stored stacked (``[E, d, f]``) so all experts run as one batched matmul.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        init_std: float = 0.02,
        out_std: float | None = None,
    ) -> None:
        super().__init__()
        self.wi_0 = nn.Parameter(torch.randn(num_experts, dim, ffn_dim) * init_std)
        self.wi_1 = nn.Parameter(torch.randn(num_experts, dim, ffn_dim) * init_std)
        self.wo = nn.Parameter(torch.randn(num_experts, ffn_dim, dim) * (out_std or init_std))

    @property
    def num_experts(self) -> int:
        return self.wi_0.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[E, n, d] -> [E, n, d]``: expert ``e`` processes row block ``e``."""
        h = F.gelu(torch.bmm(x, self.wi_0)) * torch.bmm(x, self.wi_1)
        return torch.bmm(h, self.wo)

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``[n, d] -> [n, d]`` through expert ``e`` only (dropless dispatch)."""
        h = F.gelu(x @ self.wi_0[e]) * (x @ self.wi_1[e])
        return h @ self.wo[e]


@dataclasses.dataclass
class MoEOutput:
    """Output of :class:`MoELayer`.

    Attributes:
        hidden: ``[..., d]`` layer output (zero for tokens whose slots were all dropped).
        aux_loss: scalar load-balancing loss, always computed.
        router_z_loss: scalar ``mean(logsumexp(router logits)²)`` over real tokens.
        stats: detached diagnostics (see :func:`routing_stats`).
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor
    router_z_loss: torch.Tensor
    stats: dict[str, torch.Tensor]


@torch.no_grad()
def routing_stats(r: Routing, nonpad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagnostics of one routing (all detached, fp32).

    * ``over_capacity_1`` / ``over_capacity_2``: assigned slots at position >= C / assigned slots.
    * ``both_dropped``: real tokens with no kept slot / real tokens.
    * ``drop_rate``: assigned slots not kept / assigned slots.
    * ``load``: ``[E]`` kept slots per expert; ``top1_load``: ``[E]`` real tokens whose highest router
      probability is each expert.
    * ``router_entropy``: mean per-token router entropy / log E.
    * ``load_entropy``: entropy of the kept-slot distribution over experts / log E (1 = uniform).
    * ``aux_loss``.
    """
    E = r.raw_gates.shape[-1]
    real = nonpad.float().sum().clamp_min(1.0)
    kept_any = r.kept.any(dim=-1) & nonpad
    load = torch.zeros(E, device=r.expert.device).index_add_(
        0, r.expert[r.kept], torch.ones_like(r.expert[r.kept], dtype=torch.float32)
    )
    top1 = r.raw_gates.argmax(-1)[nonpad]  # every real token's first choice (== slot 0 of top-k routing)
    top1_load = torch.zeros(E, device=r.expert.device).index_add_(0, top1, torch.ones_like(top1, dtype=torch.float32))
    p = r.raw_gates.clamp_min(1e-20)
    tok_ent = -(p * p.log()).sum(-1)
    dist = load / load.sum().clamp_min(1.0)
    load_ent = -(dist * dist.clamp_min(1e-20).log()).sum()
    logE = math.log(E) if E > 1 else 1.0
    stats = {
        "over_capacity_1": r.over_capacity[0].float(),
        "over_capacity_2": (r.over_capacity[1] if len(r.over_capacity) > 1 else torch.zeros(())).float(),
        "both_dropped": (nonpad & ~kept_any).float().sum() / real,
        "drop_rate": 1.0 - r.kept.float().sum() / r.assigned.float().sum().clamp_min(1.0),
        "load": load,
        "top1_load": top1_load,
        "router_entropy": (tok_ent * nonpad).sum() / real / logE,
        "load_entropy": load_ent / logE,
        "aux_loss": r.aux_loss.detach().float(),
    }
    return stats


class MoELayer(nn.Module):
    """Router + experts with GShard dispatch; a drop-in replacement for a gated-GELU FFN.

    Args:
        dim: model width ``d``.
        ffn_dim: hidden width ``f`` of each expert.
        num_experts: ``E``.
        mode: ``capacity`` (GShard top-2), ``top1`` or ``dropless``.
        capacity_factor: ``cf`` in ``C = int(S·cf/E)``.
        group_size: tokens per dispatch group ``S`` (fewer tokens make one group).
        second_policy, second_threshold: second-expert policy (see module docstring).
        logit_cap: soft cap of the router logits; 0 disables.
        aux_norm: ``nonpad`` or ``legacy`` padding normalisation of the aux loss.
        dispatch: ``index`` (gathers) or ``einsum`` (one-hot ``[G,S,E,C]``, the paper's form).
        init_std, out_std: weight initialisation scales.
    """

    def __init__(
        self,
        *,
        dim: int,
        ffn_dim: int,
        num_experts: int,
        mode: Mode = "capacity",
        capacity_factor: float = 2.0,
        group_size: int = 1024,
        second_policy: SecondPolicy = "all",
        second_threshold: float = 0.0,
        logit_cap: float = 0.0,
        aux_norm: Literal["nonpad", "legacy"] = "nonpad",
        dispatch: Dispatch = "index",
        init_std: float = 0.02,
        out_std: float | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {'|'.join(MODES)}, not {mode!r}")
        if dispatch not in ("index", "einsum"):
            raise ValueError(f"dispatch must be index|einsum, not {dispatch!r}")
        if mode != "top1" and num_experts < 2:
            raise ValueError("top-2 routing needs at least 2 experts")
        if group_size < 1 or capacity_factor <= 0:
            raise ValueError("group_size must be >= 1 and capacity_factor > 0")
        if second_policy not in ("all", "sampling", "random"):
            raise ValueError(f"second_policy must be all|sampling|random, not {second_policy!r}")
        if aux_norm not in ("nonpad", "legacy"):
            raise ValueError(f"aux_norm must be nonpad|legacy, not {aux_norm!r}")
        self.dim, self.ffn_dim, self.num_experts = dim, ffn_dim, num_experts
        self.mode, self.capacity_factor, self.group_size = mode, capacity_factor, group_size
        self.second_policy, self.second_threshold = second_policy, second_threshold
        self.logit_cap, self.aux_norm, self.dispatch = logit_cap, aux_norm, dispatch
        self.router = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=init_std)
        self.experts = Experts(num_experts=num_experts, dim=dim, ffn_dim=ffn_dim, init_std=init_std, out_std=out_std)

    @property
    def top_k(self) -> float:
        """Experts per token on average (a full group: ``E·C/S`` for expert choice)."""
        return experts_per_token(
            self.mode, num_experts=self.num_experts, capacity_factor=self.capacity_factor, group_size=self.group_size
        )

    def group(self, x: torch.Tensor, nonpad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Flatten ``[..., d]`` into ``[G, S, d]`` groups, padding the tail group with padding tokens."""
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        np_flat = torch.ones(n, dtype=torch.bool, device=x.device) if nonpad is None else nonpad.reshape(-1).bool()
        if np_flat.shape[0] != n:
            raise ValueError(f"padding mask has {np_flat.shape[0]} entries for {n} tokens")
        # padding content must never matter, not even NaN/inf: zero it before it reaches any sum
        flat = torch.where(np_flat.unsqueeze(-1), flat, flat.new_zeros(()))
        S = min(self.group_size, n)
        G = -(-n // S)
        extra = G * S - n
        if extra:
            flat = torch.cat([flat, flat.new_zeros(extra, flat.shape[-1])])
            np_flat = torch.cat([np_flat, np_flat.new_zeros(extra)])
        return flat.view(G, S, -1), np_flat.view(G, S), n

    def route(self, xg: torch.Tensor, nonpad: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """Gate grouped tokens ``[G, S, d]``; returns the routing and the fp32 router logits."""
        with torch.autocast(device_type=xg.device.type, enabled=False):  # the router stays fp32 under bf16
            logits = F.linear(xg.float(), self.router.weight.float())
        if self.logit_cap > 0:
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        S = xg.shape[1]
        cap = None if self.mode == "dropless" else expert_capacity(S, self.num_experts, self.capacity_factor)
        policy = self.second_policy if self.training else "all"
        r = gate_tokens(
            logits,
            nonpad,
            mode=self.mode,
            capacity=cap,
            second_policy=policy,
            second_threshold=self.second_threshold,
            aux_norm=self.aux_norm,
        )
        return r, logits

    def forward(self, x: torch.Tensor, nonpad: torch.Tensor | None = None) -> MoEOutput:
        """``x``: ``[..., d]``; ``nonpad``: ``[...]`` bool (None = all real). Returns :class:`MoEOutput`."""
        xg, npg, n = self.group(x, nonpad)
        r, logits = self.route(xg, npg)
        if self.mode == "dropless":
            yg = self._dispatch_dropless(xg, r)
        elif self.dispatch == "einsum":
            yg = self._dispatch_einsum(xg, r)
        else:
            yg = self._dispatch_index(xg, r)
        y = yg.reshape(-1, x.shape[-1])[:n].view_as(x)
        rz = z_loss(logits, npg)
        return MoEOutput(hidden=y, aux_loss=r.aux_loss, router_z_loss=rz, stats=routing_stats(r, npg))

    # --- dispatch implementations (identical functions, different costs) -------------------------

    def _dispatch_einsum(self, xg: torch.Tensor, r: Routing) -> torch.Tensor:
        """The paper's form: one-hot ``[G,S,E,C]`` dispatch and combine tensors."""
        G, S, d = xg.shape
        E, C = self.num_experts, r.capacity
        assert C is not None
        e_hot = F.one_hot(r.expert, E).to(xg.dtype)  # [G,S,K,E]
        c_hot = F.one_hot(r.position.clamp_max(C - 1), C).to(xg.dtype)  # [G,S,K,C]
        kept = r.kept.to(xg.dtype)
        dispatch = torch.einsum("gske,gskc,gsk->gsec", e_hot, c_hot, kept)
        combine = torch.einsum("gske,gskc,gsk->gsec", e_hot, c_hot, r.gate.to(xg.dtype))
        expert_in = torch.einsum("gsec,gsd->egcd", dispatch, xg).reshape(E, G * C, d)
        expert_out = self.experts(expert_in).view(E, G, C, d)
        return torch.einsum("gsec,egcd->gsd", combine, expert_out)

    def _dispatch_index(self, xg: torch.Tensor, r: Routing) -> torch.Tensor:
        """Gather tokens into ``[E, G·C, d]`` buffers by slot index; combine with a weighted gather."""
        G, S, d = xg.shape
        E, C = self.num_experts, r.capacity
        assert C is not None
        K = r.expert.shape[-1]
        n_tok = G * S
        x_flat = torch.cat([xg.reshape(n_tok, d), xg.new_zeros(1, d)])  # row n_tok is a zero row
        g_idx = torch.arange(G, device=xg.device).view(G, 1, 1)
        slot = r.expert * (G * C) + g_idx * C + r.position  # [G,S,K] row in the [E*G*C] buffer
        tok = torch.arange(n_tok, device=xg.device).view(G, S, 1).expand(G, S, K)
        src = torch.full((E * G * C,), n_tok, dtype=torch.long, device=xg.device)
        src[slot[r.kept]] = tok[r.kept]
        expert_in = x_flat.index_select(0, src).view(E, G * C, d)
        expert_out = self.experts(expert_in).reshape(E * G * C, d)
        y_flat = torch.cat([expert_out, expert_out.new_zeros(1, d)])
        back = torch.where(r.kept, slot, torch.full_like(slot, E * G * C))  # dropped -> zero row
        picked = y_flat.index_select(0, back.reshape(-1)).view(G, S, K, d)
        return (picked * r.gate.to(xg.dtype).unsqueeze(-1)).sum(dim=2)

    def _dispatch_dropless(self, xg: torch.Tensor, r: Routing) -> torch.Tensor:
        """Every assigned slot is computed: sort slots by expert, run each expert on its rows."""
        G, S, d = xg.shape
        K = r.expert.shape[-1]
        x_flat = xg.reshape(G * S, d)
        experts = r.expert.reshape(-1)
        kept = r.kept.reshape(-1)
        slots = torch.nonzero(kept).squeeze(-1)  # slot ids (token*K + k) that are computed
        order = slots[torch.argsort(experts[slots], stable=True)]
        counts = torch.bincount(experts[order], minlength=self.num_experts).tolist()
        rows = x_flat.index_select(0, order // K)
        outs = [self.experts.forward_one(e, chunk) for e, chunk in enumerate(rows.split(counts))]
        y_slots = xg.new_zeros(G * S * K, d).index_copy(0, order, torch.cat(outs))
        y_slots = y_slots.view(G, S, K, d)
        return (y_slots * r.gate.to(xg.dtype).unsqueeze(-1)).sum(dim=2)
