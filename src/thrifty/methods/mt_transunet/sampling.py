"""Batch sampling and the learning-rate schedule of MT-TransUNet (Chen et al., arXiv 2112.01767).

:class:`TwoStreamBatchSampler` follows the release's ``utils/sampler.py`` (itself from DTC / mean teacher): each
batch is ``primary_per_batch`` indices from the primary (masked) stream followed by ``secondary_per_batch`` from the
secondary (mask-free) stream; an *epoch* is one pass over the primary stream (the incomplete last batch is dropped);
the secondary stream is reshuffled and repeated as often as the epoch needs, restarting every epoch (the release
builds a fresh ``iterate_eternally`` in each ``__iter__``). Unlike the release it is seeded (deterministic in seed,
epoch and rank) and DDP-aware. :func:`poly_lr` is the release's ``utils/learning_rate.py`` ``adjust_learning_rate``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

_PRIMARY, _SECONDARY = 0, 1


class TwoStreamBatchSampler:
    """Batches of dataset indices, the first ``primary_per_batch`` from ``primary`` (masked images), then
    ``secondary_per_batch`` from ``secondary`` (mask-free images). Use it as a ``DataLoader(batch_sampler=...)``.

    * **Epochs.** Each epoch the primary stream is permuted once and cut into ``len(self)`` batches (the remainder
      is dropped); the secondary stream is permuted afresh for every pass it makes within the epoch, so a batch
      that straddles two secondary passes may repeat a secondary index (as in the release).
    * **DDP.** Each epoch (and each secondary pass) draws one permutation of the whole stream, identical on every
      rank; rank ``r`` of ``w`` takes positions ``r, r + w, …`` of its first ``w·⌊n/w⌋`` entries. The ranks'
      shards of a stream are therefore disjoint within an epoch (pass), equal in size, and change from epoch to
      epoch; every rank yields the same number of batches. The global batch is ``w·(primary_per_batch +
      secondary_per_batch)``.
    * **Empty secondary** (e.g. every training image has its mask) or ``secondary_per_batch == 0``: the whole batch,
      ``primary_per_batch + secondary_per_batch`` indices, comes from the primary stream.
    * **Determinism.** Batches depend only on (``seed``, epoch, ``rank``, ``world_size``) and the index lists;
      :meth:`set_epoch` chooses the epoch that ``__iter__`` yields.
    * **Step-based loops.** :meth:`batch_at` (``step`` -> the batch of epoch ``step // len(self)``) and
      :meth:`steps` (an endless iterator from a start step) ignore :meth:`set_epoch`; a loop resumed at step ``s``
      sees the same batches as one that ran through. The fractional epoch for the ramp is ``step / len(self)``.
    """

    def __init__(
        self,
        *,
        primary: Sequence[int],
        secondary: Sequence[int],
        primary_per_batch: int,
        secondary_per_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if primary_per_batch < 1 or secondary_per_batch < 0:
            raise ValueError(
                "need primary_per_batch >= 1 and secondary_per_batch >= 0, "
                f"got {primary_per_batch} and {secondary_per_batch}"
            )
        self.primary = [int(i) for i in primary]
        self.secondary = [int(i) for i in secondary]
        for name, stream in (("primary", self.primary), ("secondary", self.secondary)):
            if len(set(stream)) != len(stream):
                raise ValueError(f"the {name} stream repeats an index")
        if set(self.primary) & set(self.secondary):
            raise ValueError("an index is in both the primary and the secondary stream")
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        if self.secondary and secondary_per_batch:
            self.primary_per_batch, self.secondary_per_batch = primary_per_batch, secondary_per_batch
        else:
            self.primary_per_batch, self.secondary_per_batch = primary_per_batch + secondary_per_batch, 0
        self._primary_shard = len(self.primary) // world_size
        self._secondary_shard = len(self.secondary) // world_size
        if self._primary_shard < self.primary_per_batch:
            raise ValueError(
                f"each of {world_size} rank(s) gets {self._primary_shard} primary indices, fewer than the "
                f"{self.primary_per_batch} a batch needs"
            )
        if self.secondary_per_batch and self._secondary_shard < self.secondary_per_batch:
            raise ValueError(
                f"each of {world_size} rank(s) gets {self._secondary_shard} secondary indices, fewer than the "
                f"{self.secondary_per_batch} a batch needs"
            )
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch (on every rank)."""
        return self._primary_shard // self.primary_per_batch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that ``__iter__`` yields (call before each epoch, like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def _shard(self, stream: list[int], shard: int, *key: int) -> list[int]:
        """This rank's shard of one permutation of ``stream``, the permutation keyed by (seed, *key)."""
        rng = np.random.default_rng([self.seed % 2**63, *key])
        perm = rng.permutation(len(stream))[: shard * self.world_size][self.rank :: self.world_size]
        return [stream[i] for i in perm]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` on this rank, in order."""
        n, p, s = len(self), self.primary_per_batch, self.secondary_per_batch
        primary = self._shard(self.primary, self._primary_shard, _PRIMARY, epoch)
        secondary: list[int] = []
        passes = 0
        while len(secondary) < n * s:
            secondary += self._shard(self.secondary, self._secondary_shard, _SECONDARY, epoch, passes)
            passes += 1
        return [primary[i * p : (i + 1) * p] + secondary[i * s : (i + 1) * s] for i in range(n)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches(self.epoch))

    def batch_at(self, step: int) -> list[int]:
        """The batch of global step ``step`` (>= 0): batch ``step % len(self)`` of epoch ``step // len(self)``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(int(step), len(self))
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.epoch_batches(epoch))
        return list(self._cache[1][i])

    def steps(self, start: int = 0) -> Iterator[list[int]]:
        """An endless iterator over :meth:`batch_at` from step ``start``:
        ``for step, batch in zip(range(start, max_steps), sampler.steps(start)): ...``."""
        for step in itertools.count(start):
            yield self.batch_at(step)


def poly_lr(step: int, *, base_lr: float, max_steps: int, power: float = 0.9, min_lr: float = 5e-6) -> float:
    """The release's poly schedule: ``max(base_lr·(1 − min(step, max_steps)/max_steps)^power, min_lr)``. As in the
    release the floor is a plain ``max``, so it also applies when ``base_lr < min_lr`` (the lr is then ``min_lr``
    throughout); at the release's base 1e-5 the floor 5e-6 is reached after ~54% of the iterations. Negative steps
    count as 0."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    t = min(max(int(step), 0), max_steps) / max_steps
    return max(base_lr * (1.0 - t) ** power, min_lr)
