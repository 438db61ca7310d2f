"""RNN-T (Graves 2012): the forward-algorithm loss against brute-force alignment enumeration, gradients, the chunked
joint, and a tiny end-to-end fit + greedy decode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.bigssl.rnnt import Joint, Predictor, TransducerModel, rnnt_greedy, rnnt_loss, rnnt_loss_chunked


def brute_force_nll(log_probs: torch.Tensor, target: list[int], blank: int = 0) -> float:
    """-log p(y|x) summing every alignment explicitly. ``log_probs``: (T, U+1, V) of one utterance (unpadded)."""
    num_t, u1, _ = log_probs.shape
    assert u1 == len(target) + 1
    lp = log_probs.double()
    terms: list[float] = []

    def walk(t: int, u: int, acc: float) -> None:
        if t == num_t - 1 and u == len(target):
            terms.append(acc + float(lp[t, u, blank]))  # the final blank
            return
        if t < num_t - 1:  # blank: next frame
            walk(t + 1, u, acc + float(lp[t, u, blank]))
        if u < len(target):  # emit the next label, same frame
            walk(t, u + 1, acc + float(lp[t, u, target[u]]))

    walk(0, 0, 0.0)
    assert len(terms) == math.comb(num_t - 1 + len(target), len(target))
    return -math.log(sum(math.exp(x) for x in terms))


def test_loss_matches_brute_force_t3_u2() -> None:
    torch.manual_seed(0)
    for _ in range(5):
        log_probs = F.log_softmax(torch.randn(1, 3, 3, 4, dtype=torch.float64) * 2, dim=-1)
        target = torch.randint(1, 4, (1, 2))
        loss = rnnt_loss(log_probs, target, torch.tensor([3]), torch.tensor([2]), reduction="none")
        expected = brute_force_nll(log_probs[0], target[0].tolist())
        assert loss.shape == (1,)
        assert loss.item() == pytest.approx(expected, abs=1e-5)
        assert loss.item() >= 0


def test_loss_batch_with_different_lengths() -> None:
    torch.manual_seed(1)
    lengths_t = torch.tensor([3, 2, 4, 1])
    lengths_u = torch.tensor([2, 1, 0, 3])
    bsz, max_t, max_u, vocab = 4, 4, 3, 5
    log_probs = F.log_softmax(torch.randn(bsz, max_t, max_u + 1, vocab), dim=-1)
    targets = torch.randint(1, vocab, (bsz, max_u))
    targets[1, 1:] = -1  # padding ids are ignored
    losses = rnnt_loss(log_probs, targets, lengths_t, lengths_u, reduction="none")
    for b in range(bsz):
        t, u = int(lengths_t[b]), int(lengths_u[b])
        expected = brute_force_nll(log_probs[b, :t, : u + 1], targets[b, :u].tolist())
        assert losses[b].item() == pytest.approx(expected, abs=1e-5)
    assert (losses >= 0).all()
    assert rnnt_loss(log_probs, targets, lengths_t, lengths_u, reduction="sum").item() == pytest.approx(
        losses.sum().item(), rel=1e-6
    )
    assert rnnt_loss(log_probs, targets, lengths_t, lengths_u).item() == pytest.approx(losses.mean().item(), rel=1e-6)


def test_loss_float32_matches_float64() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 20, 8, 6, dtype=torch.float64)
    targets = torch.randint(1, 6, (2, 7))
    args = (targets, torch.tensor([20, 15]), torch.tensor([7, 5]))
    l64 = rnnt_loss(F.log_softmax(logits, -1), *args, reduction="none")
    l32 = rnnt_loss(F.log_softmax(logits.float(), -1), *args, reduction="none")
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-4)


def test_gradcheck() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2], [3, 0]])
    t_len, u_len = torch.tensor([3, 2]), torch.tensor([2, 1])

    def fn(x: torch.Tensor) -> torch.Tensor:
        return rnnt_loss(F.log_softmax(x, dim=-1), targets, t_len, u_len, reduction="sum")

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


def test_gradient_no_nan_on_padding() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 6, 5, 7, requires_grad=True)
    targets = torch.randint(1, 7, (3, 4))
    loss = rnnt_loss(F.log_softmax(logits, -1), targets, torch.tensor([6, 2, 4]), torch.tensor([4, 0, 2]))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # padded frames / labels of utterance 1 get no gradient
    assert logits.grad[1, 2:].abs().max() == 0
    assert logits.grad[1, :, 1:].abs().max() == 0


def test_chunked_loss_equals_unchunked() -> None:
    torch.manual_seed(5)
    bsz, max_t, max_u, vocab = 3, 7, 4, 6
    predictor = Predictor(vocab_size=vocab, dim=8, hidden=12, num_layers=1)
    joint = Joint(enc_dim=10, pred_dim=12, joint_dim=16, vocab_size=vocab)
    enc = torch.randn(bsz, max_t, 10, requires_grad=True)
    targets = torch.randint(1, vocab, (bsz, max_u))
    t_len, u_len = torch.tensor([7, 4, 5]), torch.tensor([4, 2, 3])
    pred = predictor(targets)
    assert pred.shape == (bsz, max_u + 1, 12)

    full = rnnt_loss(F.log_softmax(joint(enc, pred), -1), targets, t_len, u_len, reduction="sum")
    params = [enc, *joint.parameters(), *predictor.parameters()]
    grads_full = torch.autograd.grad(full, params)
    for chunk_size, recompute in [(1, True), (2, False), (5, True)]:
        pred = predictor(targets)
        chunked = rnnt_loss_chunked(
            joint, enc, pred, targets, t_len, u_len, chunk_size=chunk_size, reduction="sum", recompute=recompute
        )
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(chunked, params)
        for g, g_full in zip(grads, grads_full):
            torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-5)


def test_train_tiny_transducer_and_greedy_decode() -> None:
    torch.manual_seed(0)
    vocab, feat, dim = 8, 6, 16
    x = torch.randn(2, 6, feat)
    targets = torch.tensor([[3, 5, 2, 2], [6, 1, 4, 0]])
    t_len, u_len = torch.tensor([6, 5]), torch.tensor([4, 3])
    encoder = torch.nn.Linear(feat, dim)
    predictor = Predictor(vocab_size=vocab, dim=dim, hidden=dim, num_layers=1)
    joint = Joint(enc_dim=dim, pred_dim=dim, joint_dim=32, vocab_size=vocab)
    params = [*encoder.parameters(), *predictor.parameters(), *joint.parameters()]
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(120):
        enc = encoder(x)
        loss = rnnt_loss_chunked(joint, enc, predictor(targets), targets, t_len, u_len, chunk_size=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert losses[-1] < 0.2
    with torch.no_grad():
        hyps = rnnt_greedy(encoder(x), predictor, joint, t_len, max_symbols_per_step=5)
    assert hyps == [[3, 5, 2, 2], [6, 1, 4]]


def test_greedy_respects_lengths_and_max_symbols() -> None:
    torch.manual_seed(0)
    vocab = 5
    predictor = Predictor(vocab_size=vocab, dim=4, hidden=4, num_layers=2)
    joint = Joint(enc_dim=3, pred_dim=4, joint_dim=4, vocab_size=vocab)
    with torch.no_grad():  # a joint that never predicts blank
        joint.out.weight.zero_()
        joint.out.bias.copy_(torch.tensor([-10.0, 5.0, 0.0, 0.0, 0.0]))
    hyps = rnnt_greedy(torch.randn(2, 4, 3), predictor, joint, torch.tensor([4, 1]), max_symbols_per_step=2)
    assert hyps == [[1] * 8, [1] * 2]


class _Encoder(torch.nn.Module):
    """A stand-in for the Conformer: per-frame Linear, lengths unchanged (what TransducerModel reads of it)."""

    def __init__(self, feat: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = torch.nn.Linear(feat, dim)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(hidden=self.proj(feats), lengths=lengths)


def test_transducer_model_loss_is_the_per_label_mean_and_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = TransducerModel(encoder=_Encoder(5, 8), vocab_size=6, pred_dim=4, pred_hidden=8, joint_dim=12, chunk_size=1)
    x, lengths = torch.randn(2, 7, 5), torch.tensor([7, 4])
    targets = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    loss = model.loss(x, lengths, targets)
    enc = model.encoder(x, lengths).hidden
    padded = torch.tensor([[1, 2, 3], [4, 0, 0]])
    lp = F.log_softmax(model.joint(enc, model.predictor(padded)), dim=-1)
    per = rnnt_loss(lp, padded, lengths, torch.tensor([3, 1]), reduction="none")
    torch.testing.assert_close(loss, (per / torch.tensor([3.0, 1.0])).mean())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_greedy_path_score_is_the_sum_of_the_chosen_log_probabilities() -> None:
    torch.manual_seed(1)
    vocab = 5
    predictor = Predictor(vocab_size=vocab, dim=4, hidden=6, num_layers=1)
    joint = Joint(enc_dim=3, pred_dim=6, joint_dim=8, vocab_size=vocab)
    with torch.no_grad():
        joint.out.bias.copy_(torch.tensor([0.5, 0.8, 0.0, 0.0, 0.0]))  # emits some labels, then blanks
    enc, lengths = torch.randn(2, 4, 3), torch.tensor([4, 2])
    scores: list[float] = []
    hyps = rnnt_greedy(enc, predictor, joint, lengths, max_symbols_per_step=3, scores=scores)
    for b in range(2):  # replay one utterance alone, frame by frame, summing each choice's log-probability
        torch.set_grad_enabled(False)
        expected, out, state, emitted = 0.0, *predictor.step(torch.tensor([0])), []
        for t in range(int(lengths[b])):
            for _ in range(3):
                lp = F.log_softmax(joint.step(enc[b : b + 1, t], out), dim=-1)[0]
                k = int(lp.argmax())
                expected += float(lp[k])
                if k == 0:
                    break
                emitted.append(k)
                out, state = predictor.step(torch.tensor([k]), state)
        torch.set_grad_enabled(True)
        assert hyps[b] == emitted
        assert scores[b] == pytest.approx(expected, abs=1e-5)
