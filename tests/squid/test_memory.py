"""SQUID memories: FIFO queue semantics, update timing, no gradient into the queue, shrinkage reads."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.squid.memory import (
    LearnedMemory,
    MemoryQueue,
    hard_shrink,
    read_weights,
    topk_shrink,
    update_queues,
)


def _queue(p=2, s=5, d=3, shrink=3):
    torch.manual_seed(0)
    return MemoryQueue(num_positions=p, num_slots=s, dim=d, shrink=shrink)


@pytest.mark.parametrize("batches", [[1, 1, 1], [2, 2, 2], [3, 4], [7], [2, 9, 1], [5, 5]])
def test_queue_is_fifo_with_wrapping_pointer(batches):
    q = _queue()
    fed = []
    total = 0
    for n in batches:
        vals = torch.arange(total, total + n, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 3).contiguous()
        q.enqueue(vals)
        fed.append(vals)
        total += n
    allv = torch.cat(fed)
    expect = allv[-min(total, 5) :].transpose(0, 1)  # last S vectors, oldest first
    assert int(q.ptr) == total % 5
    assert int(q.count) == total
    torch.testing.assert_close(q.ordered(), expect)
    # the slot written last sits just before the pointer
    torch.testing.assert_close(q.memory[:, (int(q.ptr) - 1) % 5], allv[-1])


def test_forward_never_changes_queue_and_update_writes_pending():
    q = _queue()
    before = q.memory.clone()
    x = torch.randn(4, 2, 3)
    q.train()
    q(x)
    q(x * 2)  # only the last forward's features are pending
    torch.testing.assert_close(q.memory, before)
    update_queues(torch.nn.Sequential(q))
    torch.testing.assert_close(q.ordered(), (x * 2).transpose(0, 1)[:, -4:])
    assert int(q.ptr) == 4
    # a second update without a forward writes nothing
    after = q.memory.clone()
    q.update()
    torch.testing.assert_close(q.memory, after)


def test_eval_forward_records_nothing():
    q = _queue()
    q.eval()
    q(torch.randn(4, 2, 3))
    before = q.memory.clone()
    q.update()
    torch.testing.assert_close(q.memory, before)
    assert int(q.count) == 0


def test_no_gradient_reaches_the_queue_but_the_query_gets_one():
    q = _queue(s=8, d=4, shrink=3)
    assert not q.memory.requires_grad
    q.memory.requires_grad_(True)  # even if someone asks for it, the read detaches the memory
    x = torch.randn(5, 2, 4, requires_grad=True)
    q.train()
    q(x).pow(2).sum().backward()
    assert q.memory.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert q._pending is not None and not q._pending.requires_grad


def test_queue_is_a_buffer_not_a_parameter():
    q = _queue()
    assert "memory" in dict(q.named_buffers()) and not list(q.parameters())
    assert "memory" in q.state_dict() and "ptr" in q.state_dict()


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_topk_read_keeps_k_minus_one_weights_summing_to_one(k):
    torch.manual_seed(k)
    logits = torch.randn(64, 3, 20) * 3  # continuous: no ties
    w = topk_shrink(logits, k)
    nonzero = (w > 0).sum(-1)
    assert (nonzero == k - 1).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(64, 3))
    # the survivors are the k-1 largest softmax weights
    top = logits.topk(k - 1, dim=-1).indices
    assert torch.gather(w, -1, top).gt(0).all()


def test_topk_is_straight_through_softmax_gradient():
    torch.manual_seed(1)
    logits = torch.randn(6, 10, requires_grad=True)
    g = torch.randn(6, 10)
    (topk_shrink(logits, 4) * g).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    (ref.softmax(-1) * g).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_hard_shrink_known_values():
    w = torch.tensor([0.5, 0.2, 0.2001, 0.1])
    out = hard_shrink(w, 0.2)
    assert out[1] == 0 and out[3] == 0  # at and below the threshold
    torch.testing.assert_close(out[0], torch.tensor(0.5), atol=1e-6, rtol=0)
    assert out[2] > 0


def test_read_weights_modes():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(read_weights(logits, 0), logits.softmax(-1))
    hard = read_weights(logits, 0.5)  # float: threshold on the logits, then L1-normalise (card / release)
    assert torch.equal(hard > 0, logits > 0.5)
    torch.testing.assert_close(hard, torch.tensor([[2.0, 1.0, 0.0, 0.0]]) / 3.0, atol=1e-6, rtol=0)
    with pytest.raises(TypeError):
        read_weights(logits, True)


def test_learned_memory_is_trainable_and_reads_per_position():
    torch.manual_seed(0)
    m = LearnedMemory(num_positions=3, num_slots=6, dim=4, shrink=3)
    x = torch.randn(2, 3, 4)
    out = m(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert m.memory.grad is not None and m.memory.grad.abs().sum() > 0
    # position p reads only memory p: changing memory 1 leaves positions 0 and 2 unchanged
    with torch.no_grad():
        base = m(x)
        m.memory[1] += 1.0
        moved = m(x)
    torch.testing.assert_close(moved[:, [0, 2]], base[:, [0, 2]])
    assert not torch.allclose(moved[:, 1], base[:, 1])
