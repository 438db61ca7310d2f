"""Length-bucketed distributed batches: every index once per epoch across ranks, equal step counts per rank (padding
only by repeating the first batches), frame budgets kept, (seed, epoch) determinism, less padding than random
batches, and clear errors for bad arguments."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from thrifty.data.buckets import LengthBucketBatches, padding_fraction


def random_lengths(n: int = 1000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return rng.uniform(1.0, 35.0, n).round(2).tolist()  # seconds, LibriSpeech-like spread


def shards(world_size: int, **kw) -> list[list[list[int]]]:
    return [list(LengthBucketBatches(rank=r, world_size=world_size, **kw)) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mode", [{"batch_size": 10}, {"max_frames": 200.0}])
def test_every_index_once_and_equal_rank_lengths(world_size: int, mode: dict) -> None:
    lengths = random_lengths(1000)
    kw = dict(lengths=lengths, num_buckets=10, seed=3, **mode)
    per_rank = shards(world_size, **kw)
    sizes = {len(b) for b in per_rank}
    assert len(sizes) == 1  # every rank runs the same number of steps
    assert [len(LengthBucketBatches(rank=r, world_size=world_size, **kw)) for r in range(world_size)] == [
        len(per_rank[0])
    ] * world_size
    glob = LengthBucketBatches(**kw).global_batches()
    flat = [i for rank in per_rank for b in rank for i in b]
    if len(glob) % world_size == 0:
        assert sorted(flat) == list(range(1000))
    else:  # padded: the repeats are exactly the first batches of the global list
        extra = world_size - len(glob) % world_size
        repeated = Counter(flat) - Counter(range(1000))
        assert sorted(repeated.elements()) == sorted(i for b in glob[:extra] for i in b)
        assert set(flat) == set(range(1000))


def test_padding_repeats_from_start_and_drop_last() -> None:
    lengths = [float(x) for x in range(1, 12)]  # 11 items, batches of 2 → 6 batches
    kw = dict(lengths=lengths, batch_size=2, num_buckets=1, shuffle=False)
    glob = LengthBucketBatches(**kw).global_batches()
    assert glob == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    four = shards(4, **kw)  # 6 batches → padded to 8 with global batches 0 and 1
    assert [len(r) for r in four] == [2, 2, 2, 2]
    assert four[2] == [[4, 5], [0, 1]] and four[3] == [[6, 7], [2, 3]]
    dropped = shards(4, drop_last=True, **kw)  # 6 → 4: one each
    assert [len(r) for r in dropped] == [1, 1, 1, 1]
    assert sorted(i for r in dropped for b in r for i in b) == list(range(8))
    # more ranks than batches: everyone still gets one (cycled) batch
    assert [len(r) for r in shards(8, lengths=[1.0, 2.0, 3.0], batch_size=1)] == [1] * 8


def test_max_frames_budget_and_oversize() -> None:
    lengths = random_lengths(500, seed=1)
    sampler = LengthBucketBatches(lengths=lengths, max_frames=120.0, num_buckets=8, seed=0)
    arr = np.asarray(lengths)
    for b in sampler:
        assert arr[b].max() * len(b) <= 120.0
    # batches are large for short items and small for long ones
    per_batch = [(arr[b].max(), len(b)) for b in sampler]
    short = [n for m, n in per_batch if m < 8]
    long_ = [n for m, n in per_batch if m > 30]
    assert short and long_ and np.median(short) >= 4 * np.median(long_)
    with pytest.raises(ValueError, match=r"1 item\(s\) are longer than max_frames"):
        LengthBucketBatches(lengths=[*lengths, 200.0], max_frames=120.0)


def test_deterministic_per_seed_and_epoch() -> None:
    lengths = random_lengths(300)
    a = LengthBucketBatches(lengths=lengths, batch_size=8, seed=5)
    b = LengthBucketBatches(lengths=lengths, batch_size=8, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(i for x in second for i in x) == list(range(300))
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first  # an epoch can be replayed
    assert list(LengthBucketBatches(lengths=lengths, batch_size=8, seed=6)) != first
    unshuffled = LengthBucketBatches(lengths=lengths, batch_size=8, shuffle=False)
    before = list(unshuffled)
    unshuffled.set_epoch(7)
    assert list(unshuffled) == before


def test_bucketing_pads_less_than_random_batches() -> None:
    lengths = random_lengths(2000, seed=2)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(lengths)).tolist()
    random_batches = [perm[i : i + 16] for i in range(0, len(perm), 16)]
    bucketed = LengthBucketBatches(lengths=lengths, batch_size=16, num_buckets=20)
    waste_random, waste_bucketed = padding_fraction(random_batches, lengths), padding_fraction(bucketed, lengths)
    assert waste_random > 0.3 and waste_bucketed < 0.05 and waste_bucketed < waste_random / 5
    assert padding_fraction([[0, 1]], [2.0, 2.0]) == 0.0
    assert padding_fraction([[0, 1]], [1.0, 3.0]) == pytest.approx(1 - 4 / 6)
    assert padding_fraction([], [1.0]) == 0.0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_size": 4, "max_frames": 10.0}, "exactly one"),
        ({}, "exactly one"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_frames": -1.0}, "max_frames"),
        ({"batch_size": 4, "rank": 2, "world_size": 2}, "rank"),
        ({"batch_size": 4, "rank": -1}, "rank"),
        ({"batch_size": 4, "world_size": 0}, "world_size"),
        ({"batch_size": 4, "num_buckets": 0}, "num_buckets"),
        ({"batch_size": 4, "lengths": []}, "non-empty"),
        ({"batch_size": 4, "lengths": [1.0, float("nan")]}, "finite"),
    ],
)
def test_bad_arguments(kw: dict, match: str) -> None:
    kw = {"lengths": [1.0, 2.0, 3.0], **kw}
    with pytest.raises(ValueError, match=match):
        LengthBucketBatches(**kw)


class _Lengths(Dataset):
    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((self.lengths[i],), i)


def test_works_as_dataloader_batch_sampler() -> None:
    lengths = [int(x) for x in np.random.default_rng(0).integers(5, 50, 64)]
    sampler = LengthBucketBatches(lengths=lengths, batch_size=4, num_buckets=4, rank=1, world_size=2)
    collate = lambda items: torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=-1)
    loader = DataLoader(_Lengths(lengths), batch_sampler=sampler, collate_fn=collate)
    assert len(loader) == len(sampler) == 8
    seen = []
    for batch in loader:
        assert batch.shape[0] <= 4
        seen.extend(int(row[0]) for row in batch)
    assert seen == [i for b in sampler for i in b]
