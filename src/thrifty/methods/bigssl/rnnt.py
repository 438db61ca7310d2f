"""RNN Transducer (the faithful fine-tuning option of the BigSSL card), in pure torch.

- The transducer and its loss: Graves, *Sequence Transduction with Recurrent Neural Networks*, arXiv 1211.3711
  (2012). The loss is the negative log-likelihood summed over all alignments, computed by the forward algorithm in
  log space; gradients come from autograd.
- Prediction network and joint as in *Pushing the Limits of Semi-Supervised Learning for ASR* (Zhang et al.,
  arXiv 2010.10504): an LSTM prediction network (2 layers × 640 there) and ``joint = Linear(tanh(W_e enc + W_p pred))``.
- Memory: the joint tensor is B×T×(U+1)×V (the card's pitfall, espnet/espnet PR #3081, NVIDIA/NeMo PR #5216).
  :func:`rnnt_loss_chunked` evaluates it a few utterances at a time, each chunk trimmed to its own lengths and
  (by default) re-computed in the backward pass, so the full tensor never exists at once.

The forward algorithm runs over anti-diagonals ``t + u = n`` of the (T, U+1) lattice, vectorised over the batch and
over ``u``: ``α(t, u) = logaddexp(α(t-1, u) + blank(t-1, u), α(t, u-1) + y_{u}(t, u-1))``, ``α(0, 0) = 0`` and
``-log p(y|x) = -(α(T-1, U) + blank(T-1, U))``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from thrifty.methods.bigssl.tokens import BLANK, VOCAB_SIZE

__all__ = ["Joint", "Predictor", "TransducerModel", "rnnt_greedy", "rnnt_loss", "rnnt_loss_chunked"]

Reduction = Literal["mean", "sum", "none"]
_NEG = -1.0e30  # finite "minus infinity": keeps logaddexp gradients free of NaN on unreachable lattice cells


class Predictor(nn.Module):
    """LSTM prediction network. The blank id is the start symbol, so ``U`` labels give ``U + 1`` outputs.

    ``forward(targets (B, U) long) -> (B, U+1, hidden)``; :meth:`step` advances one label for decoding.
    """

    def __init__(
        self,
        *,
        vocab_size: int = VOCAB_SIZE,
        dim: int = 128,
        hidden: int = 640,
        num_layers: int = 2,
        blank: int = BLANK,
    ) -> None:
        super().__init__()
        self.blank = blank
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=num_layers, batch_first=True)

    def forward(self, targets: Tensor) -> Tensor:
        """(B, U) label ids (padding may be any id in range; it only affects outputs after the valid length)."""
        start = torch.full((targets.shape[0], 1), self.blank, dtype=torch.long, device=targets.device)
        x = self.embed(torch.cat([start, targets.clamp(min=0)], dim=1))
        out, _ = self.lstm(x)
        return out

    def step(self, token: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One label: ``token`` (B,) long -> output (B, hidden) and the new LSTM state ((L, B, H), (L, B, H))."""
        out, state = self.lstm(self.embed(token)[:, None, :], state)
        return out[:, 0], state


class Joint(nn.Module):
    """``logits = Linear(tanh(W_e enc + W_p pred))``.

    ``forward(enc (B, T, D), pred (B, U+1, H)) -> (B, T, U+1, V)``; :meth:`step` works on single frames/labels.
    """

    def __init__(self, *, enc_dim: int, pred_dim: int, joint_dim: int = 640, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim, bias=False)
        self.out = nn.Linear(joint_dim, vocab_size)

    def forward(self, enc: Tensor, pred: Tensor) -> Tensor:
        return self.out(torch.tanh(self.enc_proj(enc)[:, :, None, :] + self.pred_proj(pred)[:, None, :, :]))

    def step(self, enc: Tensor, pred: Tensor) -> Tensor:
        """(B, D) frame and (B, H) prediction-network output -> (B, V) logits."""
        return self.out(torch.tanh(self.enc_proj(enc) + self.pred_proj(pred)))


def _reduce(losses: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def rnnt_loss(
    log_probs: Tensor,
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    *,
    blank: int = BLANK,
    reduction: Reduction = "mean",
) -> Tensor:
    """Transducer negative log-likelihood by the forward algorithm (Graves 2012), in log space.

    ``log_probs``: (B, T, U+1, V) log-softmaxed joint outputs (computed in at least fp32); ``targets``: (B, U) long
    (padding arbitrary); ``logit_lengths``: (B,) valid frames (>= 1); ``target_lengths``: (B,) labels.
    Returns (B,) for ``reduction="none"``, else the sum or the batch mean.
    """
    if log_probs.dim() != 4:
        raise ValueError(f"log_probs must be (B, T, U+1, V), got shape {tuple(log_probs.shape)}")
    if log_probs.dtype not in (torch.float32, torch.float64):
        log_probs = log_probs.float()
    bsz, max_t, max_u1, _ = log_probs.shape
    max_u = max_u1 - 1
    if targets.shape[0] != bsz or targets.shape[1] < max_u:
        raise ValueError(f"targets {tuple(targets.shape)} do not fit log_probs {tuple(log_probs.shape)}")
    device = log_probs.device
    t_len = logit_lengths.to(device=device, dtype=torch.long)
    u_len = target_lengths.to(device=device, dtype=torch.long)
    if bool((t_len < 1).any()) or bool((t_len > max_t).any()) or bool((u_len < 0).any()) or bool((u_len > max_u).any()):
        raise ValueError("logit_lengths must be in [1, T] and target_lengths in [0, U]")

    lp_blank = log_probs[..., blank]  # (B, T, U+1)
    tgt = targets[:, :max_u].to(device=device, dtype=torch.long).clamp(min=0)
    lp_emit = log_probs[:, :, :max_u, :].gather(3, tgt[:, None, :, None].expand(bsz, max_t, max_u, 1))[..., 0]

    u = torch.arange(max_u1, device=device)
    final_n = t_len - 1 + u_len  # the diagonal holding α(T_b - 1, U_b)
    final_lp = lp_blank[torch.arange(bsz, device=device), t_len - 1, u_len]  # blank(T_b - 1, U_b)
    alpha = torch.full((bsz, max_u1), _NEG, dtype=log_probs.dtype, device=device)
    alpha = torch.where(u == 0, torch.zeros_like(alpha), alpha)  # diagonal 0: α(0, 0) = 0
    total = torch.where(final_n == 0, alpha[:, 0], torch.zeros_like(final_lp))
    neg = torch.tensor(_NEG, dtype=log_probs.dtype, device=device)
    for n in range(1, int(final_n.max()) + 1):
        t = n - u  # time index of each cell on this diagonal
        valid = (t >= 0) & (t < max_t)
        # from (t-1, u) by a blank
        from_t = (t >= 1) & valid
        ti = (t - 1).clamp(0, max_t - 1)
        stay = torch.where(from_t, alpha + lp_blank[:, ti, u], neg)
        # from (t, u-1) by emitting label u
        from_u = (u >= 1) & valid
        tj = t.clamp(0, max_t - 1)
        uj = (u - 1).clamp(min=0)
        prev = torch.cat([alpha.new_full((bsz, 1), _NEG), alpha[:, :-1]], dim=1)  # α(t, u-1) on diagonal n-1
        emit = torch.where(from_u, prev + lp_emit[:, tj, uj] if max_u > 0 else neg, neg)
        alpha = torch.where(valid, torch.logaddexp(stay, emit), neg)
        hit = final_n == n
        if bool(hit.any()):
            total = torch.where(hit, alpha.gather(1, u_len[:, None])[:, 0], total)
    return _reduce(-(total + final_lp), reduction)


def _chunk_loss(
    joint: Joint, enc: Tensor, pred: Tensor, targets: Tensor, t_len: Tensor, u_len: Tensor, blank: int
) -> Tensor:
    log_probs = F.log_softmax(joint(enc, pred).float(), dim=-1)
    return rnnt_loss(log_probs, targets, t_len, u_len, blank=blank, reduction="none")


def rnnt_loss_chunked(
    joint: Joint,
    enc: Tensor,
    pred: Tensor,
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    *,
    chunk_size: int = 1,
    blank: int = BLANK,
    reduction: Reduction = "mean",
    recompute: bool = True,
) -> Tensor:
    """:func:`rnnt_loss` of ``log_softmax(joint(enc, pred))`` computed ``chunk_size`` utterances at a time.

    ``enc``: (B, T, D) encoder output; ``pred``: (B, U+1, H) prediction-network output; the rest as in
    :func:`rnnt_loss`. Each chunk is trimmed to its longest utterance and label sequence. With ``recompute`` (and
    gradients enabled) each chunk's joint is re-evaluated during backward (activation checkpointing), so at most one
    chunk's (b, T, U+1, V) tensor is alive at a time in either pass. Equals the unchunked loss.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    t_len = logit_lengths.to(device=enc.device, dtype=torch.long)
    u_len = target_lengths.to(device=enc.device, dtype=torch.long)
    losses = []
    for start in range(0, enc.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        tt, uu = t_len[sl], u_len[sl]
        mt, mu = int(tt.max()), int(uu.max())
        args = (enc[sl, :mt], pred[sl, : mu + 1], targets[sl, :mu], tt, uu)
        if recompute and torch.is_grad_enabled():
            losses.append(checkpoint(_chunk_loss, joint, *args, blank, use_reentrant=False))
        else:
            losses.append(_chunk_loss(joint, *args, blank))
    return _reduce(torch.cat(losses), reduction)


@torch.no_grad()
def rnnt_greedy(
    encoder_out: Tensor,
    predictor: Predictor,
    joint: Joint,
    lengths: Tensor,
    *,
    max_symbols_per_step: int = 5,
    scores: list[float] | None = None,
) -> list[list[int]]:
    """Greedy transducer decoding: at each frame emit the argmax label until blank (at most ``max_symbols_per_step``).

    ``encoder_out``: (B, T, D); ``lengths``: (B,) valid frames. Returns label ids per utterance (blanks excluded).
    When ``scores`` is a list, it receives each utterance's path log-probability: the sum of the log-softmax of
    every choice made, blanks included (a frame that hits the symbol limit adds no blank).
    """
    bsz, max_t, _ = encoder_out.shape
    device = encoder_out.device
    blank = predictor.blank
    lengths = lengths.to(device)
    token = torch.full((bsz,), blank, dtype=torch.long, device=device)
    pred_out, state = predictor.step(token)
    hyps: list[list[int]] = [[] for _ in range(bsz)]
    total = torch.zeros(bsz, dtype=torch.float64, device=device)
    for t in range(max_t):
        active = lengths > t
        if not bool(active.any()):
            break
        frame = encoder_out[:, t]
        for _ in range(max_symbols_per_step):
            log_probs = F.log_softmax(joint.step(frame, pred_out).float(), dim=-1)
            top, best = log_probs.max(dim=-1)
            total += torch.where(active, top.double(), torch.zeros_like(total))
            emit = active & (best != blank)
            if not bool(emit.any()):
                break
            for b in emit.nonzero()[:, 0].tolist():
                hyps[b].append(int(best[b]))
            new_out, (h, c) = predictor.step(torch.where(emit, best, token), state)
            keep = emit[:, None]
            pred_out = torch.where(keep, new_out, pred_out)
            state = (torch.where(keep[None], h, state[0]), torch.where(keep[None], c, state[1]))
            active = emit  # only utterances that just emitted may emit again on this frame
    if scores is not None:
        scores[:] = total.tolist()
    return hyps


class TransducerModel(nn.Module):
    """Conformer encoder + LSTM prediction network + joint: the RNN-T fine-tuning model (*Pushing the Limits*).

    ``loss(feats (B, T, n_mels), lengths (B,), targets [(U_b,)]) -> ()``: the transducer NLL divided by each target's
    length, averaged over the batch (the same normalisation as :func:`~thrifty.methods.bigssl.model.ctc_loss`),
    with the joint evaluated ``chunk_size`` utterances at a time (:func:`rnnt_loss_chunked`).
    ``greedy(feats, lengths) -> (label ids per utterance, path log-probabilities)``.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        vocab_size: int = VOCAB_SIZE,
        pred_dim: int = 64,
        pred_hidden: int = 256,
        pred_layers: int = 1,
        joint_dim: int = 256,
        chunk_size: int = 8,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = Predictor(vocab_size=vocab_size, dim=pred_dim, hidden=pred_hidden, num_layers=pred_layers)
        self.joint = Joint(enc_dim=encoder.dim, pred_dim=pred_hidden, joint_dim=joint_dim, vocab_size=vocab_size)
        self.chunk_size = chunk_size

    def loss(self, feats: Tensor, lengths: Tensor, targets: list[Tensor]) -> Tensor:
        out = self.encoder(feats, lengths)
        target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long, device=feats.device)
        padded = nn.utils.rnn.pad_sequence([t.to(feats.device) for t in targets], batch_first=True)
        if padded.shape[1] == 0:
            padded = padded.new_zeros(len(targets), 1)
        per_utt = rnnt_loss_chunked(
            self.joint,
            out.hidden,
            self.predictor(padded),
            padded,
            out.lengths,
            target_lengths,
            chunk_size=self.chunk_size,
            reduction="none",
        )
        return (per_utt / target_lengths.clamp(min=1)).mean()

    @torch.no_grad()
    def greedy(self, feats: Tensor, lengths: Tensor) -> tuple[list[list[int]], list[float]]:
        out = self.encoder(feats, lengths)
        scores: list[float] = []
        hyps = rnnt_greedy(out.hidden, self.predictor, self.joint, out.lengths, scores=scores)
        return hyps, scores
