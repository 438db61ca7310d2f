"""Conformer encoder and CTC head (Gulati et al., *Conformer*, arXiv 2005.08100), as used by BigSSL
(Zhang et al., arXiv 2109.13226) and its predecessor *Pushing the Limits of Semi-Supervised Learning for ASR*
(arXiv 2010.10504).

Shapes: features (B, T, n_mels) with lengths (B,) → 4× convolutional subsampling (two 3×3 stride-2 Conv2d + ReLU,
then Linear to ``dim``) → (B, T', dim) with T' = ⌊(⌊(T−3)/2⌋+1−3)/2⌋+1 → ``num_layers`` Conformer blocks.

A block (macaron): ``x + ½FFN(x) → x + MHSA(LN x) → x + Conv(x) → x + ½FFN(x) → LN``, with
FFN = LN, Linear d→4d, SiLU, Linear 4d→d; Conv = LN, pointwise d→2d, GLU, depthwise (odd kernel), BatchNorm, SiLU,
pointwise d→d. Attention positions are ``relative`` (Transformer-XL relative sinusoidal encodings with the two
learned biases u, v, as the original Conformer) or ``none`` (the XL/XXL/G models of *Pushing the Limits* and BigSSL
removed relative position embeddings; the convolution carries the position).

Padding: keys at padded frames are masked in attention, padded frames are zeroed before the depthwise convolution,
and BatchNorm's statistics are computed over valid frames only (:class:`MaskedBatchNorm1d`), so the outputs at
valid frames do not depend on how much padding a batch carries — in training mode too (a plain BatchNorm would
leak padding into the batch statistics; a documented deviation from implementations that use it).

Sizes (:data:`SIZES`): ``smoke`` and ``quick`` are the card's miniatures; ``xl`` and ``xxl`` follow *Pushing the
Limits* Table 1 (600M and 1B parameters, 8 heads, kernel 5, no relative positions); ``g`` is BigSSL's 8B model —
its row is **unverified** (the card marks the G size table as such): 36 layers, dim 3072, 16 heads.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.bigssl.tokens import VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class ConformerSize:
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    kernel_size: int
    positions: str


SIZES: dict[str, ConformerSize] = {
    "smoke": ConformerSize(dim=32, num_layers=1, num_heads=2, ffn_dim=128, kernel_size=15, positions="relative"),
    "quick": ConformerSize(dim=144, num_layers=4, num_heads=4, ffn_dim=576, kernel_size=15, positions="relative"),
    "xl": ConformerSize(dim=1024, num_layers=24, num_heads=8, ffn_dim=4096, kernel_size=5, positions="none"),
    "xxl": ConformerSize(dim=1024, num_layers=42, num_heads=8, ffn_dim=4096, kernel_size=5, positions="none"),
    "g": ConformerSize(dim=3072, num_layers=36, num_heads=16, ffn_dim=12288, kernel_size=5, positions="none"),
}


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Frames after two 3×3 stride-2 convolutions without padding: L → ⌊(L−3)/2⌋+1, twice."""
    for _ in range(2):
        lengths = torch.div(lengths - 3, 2, rounding_mode="floor") + 1
    return lengths.clamp_min(0)


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) bool, True at real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class ConvSubsampling(nn.Module):
    """(B, T, n_mels) → (B, T', dim): Conv2d(1→c, 3, 2), ReLU, Conv2d(c→c, 3, 2), ReLU, Linear(c·F' → dim)."""

    def __init__(self, *, n_mels: int, dim: int, channels: int | None = None):
        super().__init__()
        c = channels or dim
        self.conv = nn.Sequential(nn.Conv2d(1, c, 3, 2), nn.ReLU(), nn.Conv2d(c, c, 3, 2), nn.ReLU())
        f = ((n_mels - 3) // 2 + 1 - 3) // 2 + 1
        self.out = nn.Linear(c * f, dim)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if feats.shape[1] < 7:
            raise ValueError(f"4x subsampling needs at least 7 feature frames, got {feats.shape[1]}")
        x = self.conv(feats[:, None])  # (B, c, T', F')
        b, c, t, f = x.shape
        return self.out(x.permute(0, 2, 1, 3).reshape(b, t, c * f)), subsampled_lengths(lengths)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over channels of (B, C, T) whose training statistics use valid frames only."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if not self.training or valid is None:
            return super().forward(x)
        m = valid[:, None, :].to(x.dtype)  # (B, 1, T)
        n = m.sum().clamp_min(1.0)
        mean = (x * m).sum((0, 2)) / n
        var = ((x - mean[None, :, None]).square() * m).sum((0, 2)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # momentum None: a cumulative average, as nn.BatchNorm1d
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased, momentum)
        y = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + self.eps)
        return y * self.weight[None, :, None] + self.bias[None, :, None] if self.affine else y


class FeedForward(nn.Module):
    """LN, Linear d→ffn, SiLU, dropout, Linear ffn→d, dropout."""

    def __init__(self, *, dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, ffn_dim)
        self.down = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.dropout(F.silu(self.up(self.norm(x))))))


def relative_encodings(length: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal encodings of the relative distances L−1, …, 0, …, −(L−1): shape (2L−1, dim)."""
    pos = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    enc = torch.zeros(2 * length - 1, dim, device=device)
    enc[:, 0::2] = torch.sin(pos * inv)
    enc[:, 1::2] = torch.cos(pos * inv)
    return enc.to(dtype)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T−1) scores against relative positions T−1 … −(T−1) → (B, H, T, T) with [i, j] at distance i−j."""
    scores = scores.contiguous()  # the strided view below assumes a unit stride on the last axis
    b, h, t, _ = scores.shape
    # row i needs columns (T−1−i) … (2T−2−i): a strided view reads them without copying twice
    return scores.as_strided(
        (b, h, t, t),
        (scores.stride(0), scores.stride(1), scores.stride(2) - 1, scores.stride(3)),
        storage_offset=scores.storage_offset() + (t - 1) * scores.stride(3),
    )


class MultiHeadSelfAttention(nn.Module):
    """LN'd input (B, T, d) → (B, T, d). ``positions``: ``relative`` (Transformer-XL) or ``none``."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float, positions: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if positions not in ("relative", "none"):
            raise ValueError(f"positions must be 'relative' or 'none', got {positions!r}")
        self.num_heads, self.head_dim, self.positions = num_heads, dim // num_heads, positions
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        if positions == "relative":
            self.pos = nn.Linear(dim, dim, bias=False)
            self.bias_u = nn.Parameter(torch.zeros(num_heads, self.head_dim))
            self.bias_v = nn.Parameter(torch.zeros(num_heads, self.head_dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        mask = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~valid[:, None, None, :], float("-inf"))  # padded keys
        if self.positions == "relative":
            p = self.pos(relative_encodings(t, d, device=x.device, dtype=x.dtype))  # (2T−1, d)
            p = p.view(2 * t - 1, self.num_heads, self.head_dim).transpose(0, 1)  # (H, 2T−1, hd)
            bd = torch.matmul(q + self.bias_v[None, :, None], p.transpose(-1, -2)[None])  # (B, H, T, 2T−1)
            mask = mask + rel_shift(bd) / math.sqrt(self.head_dim)
            q = q + self.bias_u[None, :, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class ConvModule(nn.Module):
    """LN, pointwise d→2d, GLU, depthwise conv (odd kernel), BatchNorm (valid frames), SiLU, pointwise, dropout."""

    def __init__(self, *, dim: int, kernel_size: int, dropout: float):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"the depthwise kernel must be odd, got {kernel_size}")
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.batch_norm = MaskedBatchNorm1d(dim)
        self.pointwise_out = nn.Conv1d(dim, dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.norm(x).transpose(1, 2)), dim=1)  # (B, d, T)
        y = y.masked_fill(~valid[:, None, :], 0.0)  # padding must not reach valid frames through the kernel
        y = F.silu(self.batch_norm(self.depthwise(y), valid))
        return self.dropout(self.pointwise_out(y).transpose(1, 2))


class ConformerBlock(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, kernel_size: int, dropout: float, positions: str):
        super().__init__()
        self.ffn1 = FeedForward(dim=dim, ffn_dim=ffn_dim, dropout=dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim=dim, num_heads=num_heads, dropout=dropout, positions=positions)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = ConvModule(dim=dim, kernel_size=kernel_size, dropout=dropout)
        self.ffn2 = FeedForward(dim=dim, ffn_dim=ffn_dim, dropout=dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, T, d), valid (B, T) → (B, T, d)."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), valid))
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


@dataclasses.dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, T', dim)
    lengths: torch.Tensor  # (B,)
    valid: torch.Tensor  # (B, T') bool


class Conformer(nn.Module):
    """Subsampling + Conformer blocks. ``frontend`` and ``blocks`` are exposed separately because pre-training
    quantises the subsampled features and masks them before the blocks (and w2v-BERT reads the blocks in two
    modules)."""

    def __init__(
        self,
        *,
        n_mels: int = 80,
        dim: int = 144,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        kernel_size: int = 15,
        dropout: float = 0.1,
        positions: str = "relative",
        subsample_channels: int | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.subsample = ConvSubsampling(n_mels=n_mels, dim=dim, channels=subsample_channels)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            ConformerBlock(
                dim=dim,
                num_heads=num_heads,
                ffn_dim=ffn_dim or 4 * dim,
                kernel_size=kernel_size,
                dropout=dropout,
                positions=positions,
            )
            for _ in range(num_layers)
        )

    def frontend(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, n_mels) → subsampled features z (B, T', dim), lengths (B,), valid (B, T')."""
        z, lengths = self.subsample(feats, lengths)
        return z, lengths, valid_mask(lengths, z.shape[1])

    def blocks(self, x: torch.Tensor, valid: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """Run ``self.layers[layers]`` over (B, T', dim)."""
        for layer in self.layers[layers]:
            x = layer(x, valid)
        return x

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        z, lengths, valid = self.frontend(feats, lengths)
        return EncoderOutput(self.blocks(self.input_dropout(z), valid), lengths, valid)


class CTCModel(nn.Module):
    """Conformer + Linear CTC head over the character vocabulary (blank = 0)."""

    def __init__(self, *, encoder: Conformer, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, vocab_size)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ log-probabilities (B, T', V) and their lengths (B,)."""
        out = self.encoder(feats, lengths)
        return F.log_softmax(self.head(out.hidden).float(), dim=-1), out.lengths


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over utterances of the CTC negative log-likelihood divided by the target length (blank 0);
    utterances whose frames cannot fit the target give 0 (``zero_infinity``)."""
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return F.ctc_loss(
        log_probs.transpose(0, 1), flat, lengths.cpu(), target_lengths, blank=0, reduction="mean", zero_infinity=True
    )
