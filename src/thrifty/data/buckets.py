"""Length-bucketed, distributed batches for variable-length data (speech), as a DataLoader ``batch_sampler``.

Why bucket: a batch is padded to its longest item, so random batches of utterances lasting 1–35 s (LibriSpeech) or
up to 60 s (Libri-Light crops) spend much of the compute on padding. Grouping similar lengths first keeps the
padded share small (:func:`padding_fraction` measures it), and a frame budget (``max_frames``: longest item ×
count) instead of a fixed count keeps memory use per step about constant: many short utterances or few long ones.

Why pad the shards: under DDP every rank must run the same number of steps, since each backward waits for the
others' gradients; a rank with one batch more waits for ever. So all ranks build the same global batch list from
the same (seed, epoch) and take every ``world_size``-th batch, and the list is first made divisible by
``world_size``: by repeating batches from its start (a few utterances are seen twice an epoch) or, with
``drop_last=True``, by dropping the last few batches (a few are not seen this epoch; which ones changes with the
epoch when shuffling).

Recipe of one epoch: sort the indices by length and cut them into ``num_buckets`` quantile buckets (equal counts);
shuffle each bucket (when ``shuffle``) and cut it into batches, of ``batch_size`` items or greedily filled up to
``max_frames``; shuffle the order of all batches; pad or drop to a multiple of ``world_size``; give rank ``r``
batches ``r, r + world_size, …``. Every random choice comes from a generator seeded by (seed, epoch): all ranks agree
and an epoch can be replayed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)


class LengthBucketBatches:
    """Batches of indices of similar length, the same number for every DDP rank; see the module docstring.

    Give exactly one of ``batch_size`` (items per batch) and ``max_frames`` (a budget of padded length per batch:
    longest item in the batch × number of items, in the unit of ``lengths``; an item longer than the budget is an
    error, so filter those first). ``drop_last`` concerns only the remainder when sharding across ranks; the last,
    smaller batch of each bucket is kept. Call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``. In ``max_frames`` mode the number of batches can differ slightly between epochs (the
    greedy packing depends on the shuffled order); ``len()`` is that of the current epoch, the same on every rank.
    """

    def __init__(
        self,
        *,
        lengths: Sequence[float],
        batch_size: int | None = None,
        max_frames: float | None = None,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if (batch_size is None) == (max_frames is None):
            raise ValueError("LengthBucketBatches: give exactly one of batch_size and max_frames")
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"LengthBucketBatches: batch_size must be a positive integer, got {batch_size!r}")
        if max_frames is not None and not (math.isfinite(max_frames) and max_frames > 0):
            raise ValueError(f"LengthBucketBatches: max_frames must be a positive number, got {max_frames!r}")
        if num_buckets < 1:
            raise ValueError(f"LengthBucketBatches: num_buckets must be at least 1, got {num_buckets}")
        if world_size < 1:
            raise ValueError(f"LengthBucketBatches: world_size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"LengthBucketBatches: rank must be in [0, world_size={world_size}), got {rank}")
        arr = np.asarray(lengths, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("LengthBucketBatches: lengths must be a non-empty sequence of numbers")
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise ValueError("LengthBucketBatches: lengths must be finite and non-negative")
        if max_frames is not None and (arr > max_frames).any():
            over = int((arr > max_frames).sum())
            raise ValueError(
                f"LengthBucketBatches: {over} item(s) are longer than max_frames={max_frames} "
                f"(longest {arr.max():g}); filter them out or raise max_frames"
            )
        self.lengths = arr
        self.batch_size = None if batch_size is None else int(batch_size)
        self.max_frames = None if max_frames is None else float(max_frames)
        self.num_buckets = min(int(num_buckets), arr.size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = drop_last
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` from the next iteration on (call with the same value on every rank)."""
        self.epoch = int(epoch)

    def _pack(self, members: np.ndarray) -> list[list[int]]:
        if self.batch_size is not None:
            return [members[i : i + self.batch_size].tolist() for i in range(0, members.size, self.batch_size)]
        assert self.max_frames is not None
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0.0
        for i in members.tolist():
            n = self.lengths[i]
            if current and max(longest, n) * (len(current) + 1) > self.max_frames:
                batches.append(current)
                current, longest = [], 0.0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        return batches

    def global_batches(self) -> list[list[int]]:
        """All batches of the current epoch before sharding (identical on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.argsort(self.lengths, kind="stable")
        batches: list[list[int]] = []
        for bucket in np.array_split(order, self.num_buckets):
            if self.shuffle:
                bucket = rng.permutation(bucket)
            batches.extend(self._pack(bucket))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        batches = self.global_batches()
        n, ws = len(batches), self.world_size
        if n % ws:
            if self.drop_last:
                batches = batches[: n - n % ws]
                if not batches:
                    log.warning("LengthBucketBatches: %d batches for %d ranks and drop_last: nothing to run", n, ws)
            else:
                extra = ws - n % ws
                batches = batches + [batches[i % n] for i in range(extra)]
        mine = batches[self.rank :: ws]
        self._cache = (self.epoch, mine)
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._rank_batches():
            yield list(b)

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __repr__(self) -> str:
        mode = f"batch_size={self.batch_size}" if self.batch_size is not None else f"max_frames={self.max_frames:g}"
        return (
            f"LengthBucketBatches(n={self.lengths.size}, {mode}, num_buckets={self.num_buckets}, "
            f"rank={self.rank}/{self.world_size}, epoch={self.epoch})"
        )


def padding_fraction(batches: Iterable[Sequence[int]], lengths: Sequence[float]) -> float:
    """Share of the padded frames that is padding: 1 − Σ lengths / Σ (longest in batch × batch size).

    0 when every batch holds equal lengths; random batching of varied lengths wastes much more than bucketing.
    """
    arr = np.asarray(lengths, dtype=np.float64)
    padded = real = 0.0
    for b in batches:
        if len(b) == 0:
            continue
        sel = arr[np.asarray(b, dtype=np.int64)]
        padded += float(sel.max()) * len(b)
        real += float(sel.sum())
    return 0.0 if padded <= 0 else 1.0 - real / padded
