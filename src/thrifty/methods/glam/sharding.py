"""Building GLaM already sharded: meta-device construction, FSDP for the dense parts, expert
parallelism for the experts, and an initialisation that does not depend on how the model is split.

Paper: *GLaM: Efficient Scaling of Language Models with Mixture-of-Experts* (arXiv 2112.06905). At
paper scale no rank can hold the whole model, so no rank may ever build it: the model is constructed on
the ``meta`` device (shapes only), the experts are cut to this rank's ``E / world`` slice
(:mod:`~thrifty.methods.glam.expert_parallel`), every transformer block and the root (embedding, final
norm) are wrapped with FSDP2 ``fully_shard`` (parameters sharded along dim 0, all-gathered per block
in forward and backward, gradients reduce-scattered), and only then is storage allocated
(``to_empty``) and filled by :func:`init_weights`.

:func:`init_weights` draws every tensor from its own generator, keyed by ``(seed, parameter name)`` and,
for experts, by the *global* expert index. A parameter's value is therefore the same whether the model
is whole, FSDP-sharded, expert-sharded or both, and the same for any world size: the single-process
run, DDP, FSDP and FSDP + expert parallelism start from identical weights (tested). A FSDP shard is
cut from the full tensor of *one* parameter (transient memory of one tensor, never the model); an
expert shard draws only its own experts.

Gradient bookkeeping (:func:`clip_grad_norm_`): FSDP gradients are shards whose squares are summed over
ranks; expert gradients are per-rank experts, also summed; replicated (DDP) gradients count once.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from thrifty.methods.glam import expert_parallel
from thrifty.methods.glam.baselines import ArmSpec, build_model
from thrifty.methods.glam.model import GlamLM
from thrifty.methods.glam.moe import Experts

OUT_PROJECTIONS = ("attn.out.weight", "ffn.wo.weight", "experts.wo")


def canonical_name(name: str) -> str:
    """Parameter name in the unsharded model (expert shards live under ``experts.local``)."""
    return name.replace("experts.local.", "experts.")


def init_rule(name: str, model: GlamLM) -> tuple[str, float]:
    """``("normal", std)``, ``("zeros", 0)`` or ``("ones", 0)`` for a parameter of :class:`GlamLM`.

    The same scales as the constructors: ``init_std`` everywhere, ``init_std/sqrt(2L)`` on the output
    projections of attention and FFNs, zeros for the relative position bias, ones for RMSNorm scales.
    """
    name = canonical_name(name)
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if "rel_bias" in name:
        return "zeros", 0.0
    if name.endswith(OUT_PROJECTIONS):
        return "normal", model.out_std
    return "normal", model.init_std


def _generator(seed: int, *key: object) -> torch.Generator:
    text = ":".join(str(k) for k in (seed, *key))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()) + (seed << 32))


def _draw(shape: torch.Size | tuple[int, ...], rule: tuple[str, float], gen: torch.Generator) -> torch.Tensor:
    kind, std = rule
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * std


def _expert_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, range]]:
    """Expert weights with the global indices of the experts they hold."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, expert_parallel.ShardedExperts):
            e_loc = mod.local.num_experts
            idx = range(mod.rank * e_loc, (mod.rank + 1) * e_loc)
            for pname, p in mod.local.named_parameters():
                yield f"{mod_name}.local.{pname}", p, idx
        elif isinstance(mod, Experts) and not mod_name.endswith(".local"):
            for pname, p in mod.named_parameters():
                yield f"{mod_name}.{pname}", p, range(mod.num_experts)


def _shard_rows(p: torch.Tensor) -> range:
    """Rows (dim 0) of a parameter this rank holds: all of them, or its FSDP chunk of a ``DTensor``."""
    if not isinstance(p, DTensor):
        return range(p.shape[0])
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunks = torch.arange(p.shape[0]).chunk(world)
    rows = chunks[rank] if rank < len(chunks) else torch.arange(0)
    return range(int(rows[0]), int(rows[-1]) + 1) if len(rows) else range(0)


@torch.no_grad()
def init_weights(model: GlamLM, *, seed: int) -> None:
    """Fill every parameter deterministically, independent of sharding and world size (see module doc)."""
    experts = {name: idx for name, _, idx in _expert_params(model)}
    for name, p in model.named_parameters():
        rule = init_rule(name, model)
        cname = canonical_name(name)
        local = p.to_local() if isinstance(p, DTensor) else p
        rows = _shard_rows(p)
        if name in experts:  # one generator per global expert: draw only the experts held here
            idx = experts[name]
            value = torch.stack([_draw(p.shape[1:], rule, _generator(seed, cname, idx[r])) for r in rows])
        else:  # one generator per tensor: a FSDP shard is cut from the full tensor
            value = _draw(p.shape, rule, _generator(seed, cname))[rows.start : rows.stop]
        if value.shape != local.shape:
            raise RuntimeError(f"{name}: this rank holds {tuple(local.shape)}, initialised {tuple(value.shape)}")
        local.copy_(value)


def apply_fsdp(model: GlamLM, *, ignored: set[nn.Parameter]) -> GlamLM:
    """FSDP2 over every block, then the root (embedding, final norm); ``ignored`` (the expert shards)
    stay ordinary per-rank parameters."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def build_sharded(
    spec: ArmSpec,
    *,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    shard_experts: bool = False,
    fsdp: bool = False,
) -> GlamLM:
    """Build one arm without ever materialising more than this rank's share, then initialise it.

    Args:
        spec: the arm (its ``GlamLM`` keyword arguments).
        seed: initialisation seed (:func:`init_weights`).
        device: where this rank's parameters live.
        rank, world_size: this process's place in the (single) data/expert-parallel group.
        shard_experts: keep only this rank's experts (MoE arms; ``E`` divisible by ``world_size``).
        fsdp: shard the non-expert parameters with FSDP2 (needs an initialised process group).
    """
    with torch.device("meta"):
        model = build_model(spec)
        if shard_experts:
            expert_parallel.shard_model(model, rank=rank, world_size=world_size)
    if fsdp:
        ignored = {p for _, p, _ in _expert_params(model)} if shard_experts else set()
        apply_fsdp(model, ignored=ignored)
    model.to_empty(device=device)
    init_weights(model, seed=seed)
    return model


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping for any mix of replicated, FSDP-sharded and expert-sharded
    gradients: every rank computes the same norm and applies the same factor."""
    experts = set(expert_parallel.expert_param_names(model))
    once, summed = [], []
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            summed.append(p.grad.to_local())
        elif n in experts:
            summed.append(p.grad)
        else:
            once.append(p.grad)
    sq_once = sum((g.float().square().sum() for g in once), torch.zeros(()))
    sq_sum = sum((g.float().square().sum() for g in summed), torch.zeros(()))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq_sum)
    total = (sq_once + sq_sum).sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in once + summed:
        g.mul_(factor.to(g.dtype))
    return total


@torch.no_grad()
def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective: every rank must call it): FSDP shards are all-gathered,
    expert shards are gathered back to ``[E, ...]``."""
    state = {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if ".experts.local." in f".{name}" and world > 1:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            t = torch.cat(parts)
        state[canonical_name(name)] = t
    return state
