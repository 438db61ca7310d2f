"""The two-stream batch sampler (streams, epochs, DDP shards, determinism) and the poly schedule."""

from __future__ import annotations

import itertools

import pytest

from thrifty.methods.mt_transunet.sampling import TwoStreamBatchSampler, poly_lr

PRIMARY = list(range(0, 20))
SECONDARY = list(range(100, 113))


def _sampler(**kw) -> TwoStreamBatchSampler:
    args = dict(primary=PRIMARY, secondary=SECONDARY, primary_per_batch=4, secondary_per_batch=4, seed=7)
    args.update(kw)
    return TwoStreamBatchSampler(**args)


def test_halves_come_from_the_right_streams():
    s = _sampler()
    batches = list(s)
    assert len(batches) == len(s) == 5
    for b in batches:
        assert len(b) == 8
        assert set(b[:4]) <= set(PRIMARY) and set(b[4:]) <= set(SECONDARY)


def test_primary_epoch_has_no_duplicates_and_covers_the_stream():
    primary = [b[:4] for b in _sampler()]
    flat = list(itertools.chain.from_iterable(primary))
    assert sorted(flat) == PRIMARY


def test_secondary_cycles_within_an_epoch():
    s = _sampler()  # 5 batches × 4 = 20 secondary draws from 13 indices: one full pass, then a second
    secondary = list(itertools.chain.from_iterable(b[4:] for b in s))
    assert sorted(secondary[:13]) == SECONDARY
    assert len(set(secondary[13:])) == 7


def test_deterministic_and_set_epoch_changes_order():
    a, b = _sampler(), _sampler()
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(_sampler(seed=8)) != first


def test_shards_are_disjoint_across_two_ranks_and_equal_in_length():
    ranks = [_sampler(rank=r, world_size=2, primary_per_batch=2, secondary_per_batch=2) for r in range(2)]
    for epoch in (0, 3):
        for r in ranks:
            r.set_epoch(epoch)
        per_rank = [list(r) for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 5
        prim = [set(itertools.chain.from_iterable(b[:2] for b in batches)) for batches in per_rank]
        sec = [list(itertools.chain.from_iterable(b[2:] for b in batches)) for batches in per_rank]
        assert not prim[0] & prim[1] and prim[0] | prim[1] == set(PRIMARY)
        # 13 secondary indices: a 6-index shard per rank and pass; the ranks' first passes are disjoint
        assert len(set(sec[0][:6])) == len(set(sec[1][:6])) == 6 and not set(sec[0][:6]) & set(sec[1][:6])


def test_uneven_streams_give_every_rank_the_same_number_of_batches():
    ranks = [_sampler(primary=list(range(23)), rank=r, world_size=3, primary_per_batch=2) for r in range(3)]
    assert {len(r) for r in ranks} == {3} and {len(list(r)) for r in ranks} == {3}


def test_empty_secondary_takes_the_whole_batch_from_primary():
    s = _sampler(secondary=[])
    batches = list(s)
    assert len(s) == len(batches) == 2 and all(len(b) == 8 for b in batches)
    flat = list(itertools.chain.from_iterable(batches))
    assert len(set(flat)) == 16 and set(flat) <= set(PRIMARY)


def test_batch_at_and_steps_follow_the_epochs():
    s = _sampler()
    n = len(s)
    assert [s.batch_at(i) for i in range(n)] == s.epoch_batches(0)
    assert s.batch_at(n + 2) == s.epoch_batches(1)[2]
    assert list(itertools.islice(s.steps(3), 4)) == [s.batch_at(i) for i in range(3, 7)]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        _sampler(primary_per_batch=21)
    with pytest.raises(ValueError):
        _sampler(rank=2, world_size=2)
    with pytest.raises(ValueError):
        _sampler(secondary=[0, 200])  # overlaps the primary stream
    with pytest.raises(ValueError):
        _sampler(secondary=[100, 101], secondary_per_batch=4)


def test_poly_lr_endpoints_floor_and_monotone():
    assert poly_lr(0, base_lr=1e-3, max_steps=100) == 1e-3
    assert poly_lr(100, base_lr=1e-3, max_steps=100) == 5e-6
    assert poly_lr(500, base_lr=1e-3, max_steps=100) == 5e-6
    assert poly_lr(50, base_lr=1e-3, max_steps=100) == pytest.approx(1e-3 * 0.5**0.9)
    values = [poly_lr(i, base_lr=1e-3, max_steps=100) for i in range(101)]
    assert all(b <= a for a, b in itertools.pairwise(values)) and min(values) == 5e-6
    # the release: base 1e-5 over 40,000 iterations reaches the floor after ~54% of them
    assert poly_lr(21000, base_lr=1e-5, max_steps=40000) > 5e-6
    assert poly_lr(22000, base_lr=1e-5, max_steps=40000) == 5e-6
    assert poly_lr(10, base_lr=1e-3, max_steps=100, min_lr=0.0) == pytest.approx(1e-3 * 0.9**0.9)
