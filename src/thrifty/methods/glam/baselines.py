"""Matched baselines and the parameter/FLOP accounting behind them (GLaM, arXiv 2112.06905).

GLaM's central comparison is against dense models of equal *activated* compute per token. This
module builds every arm from one :class:`~thrifty.methods.glam.config.GlamConfig`:

* ``moe`` — MoE FFN (E experts of width ``f``, top-2) in the first layer of each pair, dense FFN of
  width ``f`` in the second.
* ``dense-active`` — every layer's FFN has width ``1.5·f``: a pair of MoE+dense layers spends
  ``2f + f = 3f`` FFN width per token, a dense pair ``2 · 1.5f``.
* ``dense-params`` — every layer's FFN width ``h`` is chosen so the total parameter count equals
  ``moe``'s (nearest integer).

FLOPs are analytic (multiply-adds × 2, training = 3 × forward) and counted as *activated* (top-k
slots per token) and *executed* (capacity slots ``E·C`` per group, which the hardware computes
whether filled or not). A test cross-checks the analytic count against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from thrifty.methods.glam.config import GlamConfig
from thrifty.methods.glam.model import GlamLM, MoESettings
from thrifty.methods.glam.moe import experts_per_token, slots_per_token


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """One trainable variant: a name and the keyword arguments of :class:`GlamLM`."""

    name: str
    kwargs: dict[str, Any]

    @property
    def is_moe(self) -> bool:
        return self.kwargs.get("moe") is not None


def _common(cfg: GlamConfig) -> dict[str, Any]:
    m = cfg.model
    return dict(
        vocab_size=m.vocab_size,
        dim=m.dim,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_buckets=m.num_buckets,
        max_distance=m.max_distance,
        init_std=m.init_std,
        activation_checkpointing=m.activation_checkpointing,
        aux_weight=cfg.loss.aux_weight,
        z_weight=cfg.loss.z_weight,
        router_z_weight=cfg.loss.router_z_weight,
    )


def ffn_params(dim: int, width: int) -> int:
    """Gated-GELU FFN without biases: ``W_0, W_1: d×w`` and ``W_o: w×d``."""
    return 3 * dim * width


def moe_total_ffn_params(cfg: GlamConfig, moe: MoESettings) -> int:
    d, f, L = cfg.model.dim, cfg.model.ffn_dim, cfg.model.num_layers
    return (L // 2) * (moe.num_experts * ffn_params(d, f) + d * moe.num_experts) + (L // 2) * ffn_params(d, f)


def params_matched_width(cfg: GlamConfig, moe: MoESettings | None = None) -> int:
    """Dense FFN width whose total parameters equal the MoE model's (nearest integer)."""
    moe = moe or cfg.moe
    return round(moe_total_ffn_params(cfg, moe) / (cfg.model.num_layers * 3 * cfg.model.dim))


def active_matched_width(cfg: GlamConfig, top_k: int = 2) -> int:
    """Dense FFN width with the MoE pair's activated FFN width: ``(k·f + f) / 2`` (1.5·f for top-2)."""
    return round((top_k + 1) * cfg.model.ffn_dim / 2)


def build_arms(cfg: GlamConfig) -> list[ArmSpec]:
    """The configured arms followed by the configured ablations, in a fixed order."""
    common = _common(cfg)
    f = cfg.model.ffn_dim
    specs: dict[str, ArmSpec] = {
        "moe": ArmSpec("moe", {**common, "ffn_dim": f, "moe": cfg.moe}),
        "dense-active": ArmSpec("dense-active", {**common, "ffn_dim": active_matched_width(cfg)}),
        "dense-params": ArmSpec("dense-params", {**common, "ffn_dim": params_matched_width(cfg)}),
    }
    out = [specs[a] for a in cfg.arms]
    for ab in cfg.ablations:
        moe = cfg.moe
        kw = {**common, "ffn_dim": f}
        if ab == "aux0":
            kw["aux_weight"] = 0.0
        elif ab == "cf1":
            moe = dataclasses.replace(moe, capacity_factor=1.0)
        elif ab == "experts4":
            moe = dataclasses.replace(moe, num_experts=4)
        elif ab == "experts16":
            moe = dataclasses.replace(moe, num_experts=16)
        elif ab == "dropless":
            moe = dataclasses.replace(moe, mode="dropless")
        elif ab == "top1":
            moe = dataclasses.replace(moe, mode="top1")
        elif ab == "expert_choice":
            moe = dataclasses.replace(moe, mode="expert_choice")
        out.append(ArmSpec(f"ablation-{ab}", {**kw, "moe": moe}))
    return out


def build_model(spec: ArmSpec) -> GlamLM:
    return GlamLM(**spec.kwargs)


def param_counts(spec: ArmSpec) -> dict[str, int]:
    """Analytic parameter counts of an arm without building it (total, activated per token, experts).

    Per layer: attention ``4d²``, relative bias ``buckets·heads``, two RMSNorm scales ``2d``; dense FFN
    ``3·d·f``; an MoE FFN ``E·3·d·f`` plus the router ``d·E`` (top-k of the experts are active).
    Plus the tied embedding ``V·d`` and the final norm ``d``. Tested equal to counting the module.
    """
    kw = spec.kwargs
    d, L, V, f = kw["dim"], kw["num_layers"], kw["vocab_size"], kw["ffn_dim"]
    shared = V * d + d + L * (4 * d * d + kw.get("num_buckets", 32) * kw["num_heads"] + 2 * d)
    moe: MoESettings | None = kw.get("moe")
    if moe is None:
        total = shared + L * ffn_params(d, f)
        return {"total": total, "active": total, "expert": 0}
    k = _experts_per_token(moe)
    expert = (L // 2) * moe.num_experts * ffn_params(d, f)
    rest = shared + (L // 2) * ffn_params(d, f) + (L // 2) * d * moe.num_experts
    return {"total": rest + expert, "active": rest + round(expert * k / moe.num_experts), "expert": expert}


def _experts_per_token(moe: MoESettings) -> float:
    return experts_per_token(
        moe.mode, num_experts=moe.num_experts, capacity_factor=moe.capacity_factor, group_size=moe.group_size
    )


def count_params(model: GlamLM) -> dict[str, int]:
    """Total parameters and parameters *activated* per token (top-k of E experts), counted on a module."""
    total = sum(p.numel() for p in model.parameters())
    expert = 0
    active_expert = 0
    for layer in model.moe_layers():
        n = sum(p.numel() for p in layer.experts.parameters())
        expert += n
        active_expert += round(n * layer.top_k / layer.num_experts)
    return {"total": total, "active": total - expert + active_expert, "expert": expert}


def flops_per_token(spec: ArmSpec, seq_len: int, *, batch_tokens: int | None = None) -> dict[str, float]:
    """Analytic forward FLOPs per token (``activated`` and ``executed``) and training FLOPs (3×).

    Attention scores are counted over the full ``T×T`` matrix, as the kernel computes it.
    ``batch_tokens`` sets the group size used for the executed capacity (defaults to a full group).
    """
    kw = spec.kwargs
    d, L, V, T = kw["dim"], kw["num_layers"], kw["vocab_size"], seq_len
    attn = L * (2 * 4 * d * d + 2 * 2 * T * d)
    logits = 2 * d * V
    moe: MoESettings | None = kw.get("moe")
    f = kw["ffn_dim"]
    if moe is None:
        ffn_act = ffn_exec = L * 2 * ffn_params(d, f)
    else:
        k = _experts_per_token(moe)
        dense_layers, moe_layers = L // 2, L // 2
        router = 2 * d * moe.num_experts
        ffn_act = dense_layers * 2 * ffn_params(d, f) + moe_layers * (k * 2 * ffn_params(d, f) + router)
        if moe.mode == "dropless":
            slots = k
        else:
            S = min(moe.group_size, batch_tokens or moe.group_size)
            slots = slots_per_token(
                moe.mode, num_experts=moe.num_experts, capacity_factor=moe.capacity_factor, group_size=S
            )
        ffn_exec = dense_layers * 2 * ffn_params(d, f) + moe_layers * (slots * 2 * ffn_params(d, f) + router)
    act = attn + logits + ffn_act
    exe = attn + logits + ffn_exec
    return {
        "forward_activated": act,
        "forward_executed": exe,
        "train_activated": 3 * act,
        "train_executed": 3 * exe,
    }


def accounting_table(cfg: GlamConfig, specs: list[ArmSpec]) -> dict[str, Any]:
    """Rows: arm, FFN width, total params, activated params, activated / executed FLOPs per token."""
    rows = []
    ref = None
    batch_tokens = cfg.batch_size * cfg.model.seq_len
    for spec in specs:
        p = param_counts(spec)
        fl = flops_per_token(spec, cfg.model.seq_len, batch_tokens=batch_tokens)
        if spec.name == "moe":
            ref = fl["forward_activated"]
        rows.append(
            [
                spec.name,
                spec.kwargs["ffn_dim"],
                p["total"],
                p["active"],
                fl["forward_activated"],
                fl["forward_executed"],
            ]
        )
    if ref is not None:
        for r in rows:
            r.append(round(r[4] / ref, 4))
    cols = [
        "arm",
        "ffn width",
        "params (total)",
        "params (active)",
        "fwd FLOPs/token (activated)",
        "fwd FLOPs/token (executed)",
    ] + (["activated FLOPs vs moe"] if ref is not None else [])
    return {"title": "Parameter and FLOP accounting", "columns": cols, "rows": rows}
