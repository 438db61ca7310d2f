"""Memories of SQUID (Xiang et al., "SQUID: Deep Feature In-Painting for Unsupervised Anomaly Detection",
CVPR 2023, arXiv 2111.13495): the space-aware FIFO memory queue, the learned memory matrices, and the
shrinkage functions that sparsify memory reads.

All memories of one block are held in one tensor (P positions × S slots × D) and read with batched ``einsum``
instead of the official code's Python loop over positions.

Shrinkage (read weights ``w`` over S slots, one row per query):

- :func:`topk_shrink` ("Gumbel shrinking" in the paper; it samples no noise): ``w = softmax(a)``, threshold θ =
  the k-th largest weight, ``relu(w − θ)·w / (|w − θ| + ε)``, L1-renormalise. Entries equal to θ become 0, so
  k − 1 weights survive. Straight-through: the forward value is the shrunk weights, the gradient is softmax's.
- :func:`hard_shrink` with a float threshold λ: ``relu(a − λ)·a / (|a − λ| + ε)`` on the attention logits ``a``,
  then L1-normalise — the card's and the release's form (MemAE's paper applies it to softmax weights instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.core.distributed import all_gather_cat

EPS = 1e-12


def hard_shrink(weights: torch.Tensor, lambd: float | torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``relu(w − λ)·w / (|w − λ| + ε)``: keeps weights above λ (almost unchanged), zeroes the rest."""
    return F.relu(weights - lambd) * weights / ((weights - lambd).abs() + eps)


def topk_shrink(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Straight-through top-k shrinkage of ``softmax(logits)`` over the last dimension (shape preserved)."""
    soft = logits.softmax(dim=-1)
    theta = soft.detach().topk(k, dim=-1).values[..., -1:]
    hard = F.normalize(hard_shrink(soft.detach(), theta), p=1, dim=-1)
    return (hard - soft).detach() + soft


def read_weights(logits: torch.Tensor, shrink: int | float) -> torch.Tensor:
    """Read weights from attention logits: int ``shrink`` = top-k (k = shrink), float = hard-shrink threshold on
    the logits then L1-normalise (the release's float branch), 0 = plain softmax."""
    if isinstance(shrink, bool):
        raise TypeError("shrink must be an int (top-k) or a float (threshold), not bool")
    if isinstance(shrink, int) and shrink > 0:
        return topk_shrink(logits, shrink)
    if isinstance(shrink, float) and shrink > 0:
        return F.normalize(hard_shrink(logits, shrink), p=1, dim=-1)
    return logits.softmax(dim=-1)


class MemoryQueue(nn.Module):
    """One FIFO memory queue per patch position: a non-trainable buffer ``memory`` (P, S, D), U(±1/√D) at start.

    ``forward(q)`` reads (q: (B, P, D) → (B, P, D)) with the memory detached and records ``q.detach()`` as
    pending; :meth:`update` — called after the optimiser step — writes the pending batch FIFO with a wrapping
    pointer. A forward pass never changes the memory. Under ``torch.distributed`` :meth:`update` all-gathers
    the pending features in rank order, so every rank enqueues the same block and the queues stay identical
    (``gather=False`` keeps rank-local queues instead).
    """

    def __init__(self, *, num_positions: int, num_slots: int, dim: int, shrink: int | float = 5) -> None:
        super().__init__()
        self.num_positions, self.num_slots, self.dim, self.shrink = num_positions, num_slots, dim, shrink
        bound = 1.0 / math.sqrt(dim)
        self.register_buffer("memory", torch.empty(num_positions, num_slots, dim).uniform_(-bound, bound))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # total items ever enqueued
        self._pending: torch.Tensor | None = None
        self.gather = True

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """query (B, P, D) → memory read (B, P, D); weights come from ``query · memoryᵀ``."""
        mem = self.memory.detach()
        logits = torch.einsum("bpd,psd->bps", query, mem)
        weights = read_weights(logits, self.shrink)
        if self.training:
            self._pending = query.detach()
        return torch.einsum("bps,psd->bpd", weights, mem)

    @torch.no_grad()
    def enqueue(self, values: torch.Tensor) -> None:
        """Write values (B, P, D) FIFO at the pointer (wrapping); pointer = total enqueued mod S."""
        n = values.shape[0]
        if n >= self.num_slots:  # only the last S survive
            values = values[-self.num_slots :]
            start = (int(self.ptr) + n - self.num_slots) % self.num_slots
        else:
            start = int(self.ptr)
        k = values.shape[0]
        slots = (start + torch.arange(k, device=values.device)) % self.num_slots
        self.memory[:, slots] = values.transpose(0, 1).to(self.memory.dtype)
        self.ptr.fill_((int(self.ptr) + n) % self.num_slots)
        self.count.add_(n)

    @torch.no_grad()
    def update(self) -> None:
        """Enqueue the features recorded by the last training forward (call after ``optimizer.step()``)."""
        if self._pending is None:
            return
        values, self._pending = self._pending, None
        if self.gather:
            values = all_gather_cat(values)
        self.enqueue(values)

    def ordered(self) -> torch.Tensor:
        """The queue's contents oldest first, (P, min(count, S), D) — for tests and slot inspection."""
        n = min(int(self.count), self.num_slots)
        idx = (int(self.ptr) - n + torch.arange(n)) % self.num_slots
        return self.memory[:, idx]


class LearnedMemory(nn.Module):
    """Trainable memory matrices, one per position: (P, S, D), read with shrinkage (SQUID's decoder memories and
    MemAE's memory, P = 1)."""

    def __init__(self, *, num_positions: int, num_slots: int, dim: int, shrink: int | float = 5) -> None:
        super().__init__()
        self.shrink = shrink
        bound = 1.0 / math.sqrt(dim)
        self.memory = nn.Parameter(torch.empty(num_positions, num_slots, dim).uniform_(-bound, bound))
        self.last_weights: torch.Tensor | None = None

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """query (B, P, D) → (B, P, D)."""
        logits = torch.einsum("bpd,psd->bps", query, self.memory)
        weights = read_weights(logits, self.shrink)
        self.last_weights = weights
        return torch.einsum("bps,psd->bpd", weights, self.memory)


def update_queues(model: nn.Module) -> None:
    """Write every queue's pending features; call once after each generator optimiser step."""
    for module in model.modules():
        if isinstance(module, MemoryQueue):
            module.update()
