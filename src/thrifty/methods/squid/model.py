"""SQUID's networks (Xiang et al., CVPR 2023, arXiv 2111.13495) and the baselines that share its backbone.

:class:`PatchUNet` is one backbone for every arm, switched by :class:`NetSettings`:

- **SQUID**: the image is cut into N×N patches, each encoded separately by a U-Net encoder (input conv, then
  ``level`` stride-2 residual double-conv blocks, filters r·[1, 2, 4, 8, 16, 16]); skips below
  ``initial_combine`` are re-assembled into full images. The bottleneck goes through the
  :class:`InpaintBlock` (space-aware memory queue + neighbour transformer + position code + masked shortcut),
  then a decoder whose levels named in ``decoder_memory`` carry learned per-position memories
  (``MemoryMatrixBlockV3``: top-k shrinkage, masked shortcut), and a sigmoid output. A *teacher* decoder with
  its own weights decodes the detached, un-inpainted bottleneck with detached skips; the distillation loss is
  the sum over levels of MSE(student, teacher) features.
- **AE**: the authors' baseline ``CAE`` (``MrGiovanni/SimSID`` ``models/baseline.py``) without its memory: the
  same blocks on the whole image (one "patch"), no skip connections (every decoder op ``none``), no memory,
  in-painting or teacher; scored by reconstruction error.
- **MemAE** (memory variant): the authors' ``CAE`` itself, one learned memory read by the flattened bottleneck
  of the whole image with a softmax (``memae_shrink = 0``, no entropy loss, as the CAE). The MemAE paper's
  options are settings: ``memae_shrink = 0.0025`` (hard shrinkage on the logits), ``loss.memae_entropy_w``,
  ``memae_scope="location"`` (one read per bottleneck location). The CAE's own code indexes the memory's
  returned tuple as a dict and cannot run as published; we read it as intended.
- **AE with skips** (``ae_skip``, an ablation): SQUID's patch-wise backbone with its concatenated skips and no
  memories. Trained long enough it learns the identity, anomalies included.

Shapes: images (B, 1, H, W) with H = W = N·cell; patches (B·P, C, h, w) with P = N², ordered row-major.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.squid.config import check_backbone
from thrifty.methods.squid.memory import LearnedMemory, MemoryQueue


@dataclasses.dataclass
class NetSettings:
    """Backbone and SQUID switches (defaults: the card's digit configuration at the miniature's width).

    Attributes:
        in_channels: 1 (grayscale throughout).
        image_size: H = W of the input.
        num_patches: N (the image is cut into N×N patches).
        base_filters: r; the filters are r·[1, 2, 4, 8, 16, 16].
        level: number of down blocks (digit setting: 3).
        initial_combine: skips of encoder levels below this are full images; the decoder re-assembles the
            patches at this level from the top.
        ops: decoder op per level from the bottom ('concat' the skip or 'none').
        inpaint: use the in-painting block at the bottleneck.
        queue: the in-painting memory is a FIFO queue (False: a learned memory, the "no queue" ablation).
        transformer: neighbour attention in the in-painting block (False: the memory read is used directly).
        shortcut_ratio: masked-shortcut keep probability of the in-painted feature (1.0 disables the shortcut).
        num_slots: S of the in-painting queue.
        shrink: top-k k (int) or hard threshold (float) for memory reads.
        decoder_memory: encoder-level indices whose decoder outputs pass a learned per-patch memory.
        decoder_slots: slots of each decoder memory.
        teacher: add the teacher decoder and the distillation loss.
        bottleneck_memory: MemAE: one learned memory over bottleneck feature vectors.
        memae_slots, memae_shrink: its slots and read (0 = softmax as the authors' CAE; > 0 hard-shrink threshold).
        memae_scope: ``image`` (one query per image: the flattened bottleneck) or ``location`` (one per
            bottleneck location).
        num_heads: heads of the neighbour attention.
        dropout: dropout in the in-painting FFN.
    """

    in_channels: int = 1
    image_size: int = 48
    num_patches: int = 3
    base_filters: int = 8
    level: int = 3
    initial_combine: int = 1
    ops: list[str] = dataclasses.field(default_factory=lambda: ["concat", "concat", "none"])
    inpaint: bool = True
    queue: bool = True
    transformer: bool = True
    shortcut_ratio: float = 0.95
    num_slots: int = 100
    shrink: int | float = 5
    decoder_memory: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    decoder_slots: int = 100
    teacher: bool = True
    bottleneck_memory: bool = False
    memae_slots: int = 100
    memae_shrink: float = 0.0
    memae_scope: str = "image"
    num_heads: int = 8
    dropout: float = 0.0

    def filters(self) -> list[int]:
        return [self.base_filters * m for m in (1, 2, 4, 8, 16, 16)]

    @property
    def cell(self) -> int:
        return self.image_size // self.num_patches

    def validate(self) -> None:
        check_backbone(self, self.image_size)


def patchify(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) → (B·n², C, H/n, W/n), patches in row-major order."""
    b, c, h, w = x.shape
    x = x.view(b, c, n, h // n, n, w // n).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * n * n, c, h // n, w // n)


def unpatchify(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B·n², C, h, w) → (B, C, n·h, n·w)."""
    bp, c, h, w = x.shape
    b = bp // (n * n)
    x = x.view(b, n, n, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, n * h, n * w)


def position_codes(num_positions: int) -> torch.Tensor:
    """(P, ⌊log₂P⌋ + 1) binary codes of the patch indices, most significant bit first."""
    bits = int(math.log2(num_positions)) + 1
    idx = torch.arange(num_positions)
    return ((idx.unsqueeze(1) >> torch.arange(bits - 1, -1, -1)) & 1).float()


class DoubleConv(nn.Module):
    """conv3×3(stride)-BN-ReLU, then a residual conv-BN-ReLU-conv-BN, then ReLU (the release's ``double_conv``)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return F.relu(self.conv2(x) + x)


class Up(nn.Module):
    """Bilinear upsampling to the skip's size, optional concatenation of the skip, then a :class:`DoubleConv`."""

    def __init__(self, in_ch: int, out_ch: int, *, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = DoubleConv(in_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        if self.op == "concat":
            x = torch.cat([skip, x], dim=1)
        return self.conv(x)


def masked_shortcut(new: torch.Tensor, old: torch.Tensor, ratio: float, training: bool) -> torch.Tensor:
    """Training only: per (sample, location) keep ``new`` with probability ``ratio``, else pass ``old``."""
    if not training or ratio >= 1.0:
        return new
    mask = torch.bernoulli(torch.full((new.shape[0], 1, *new.shape[2:]), ratio, device=new.device, dtype=new.dtype))
    return mask * new + (1.0 - mask) * old


def neighbour_reads(reads: torch.Tensor, n: int) -> torch.Tensor:
    """Memory reads of each patch's 8 grid neighbours (centre excluded, zeros beyond the border).

    reads (B, P, D) with P = n² → (B·P, 8, D), neighbours in row-major order of the 3×3 window.
    """
    b, p, d = reads.shape
    grid = reads.transpose(1, 2).reshape(b, d, n, n)
    cols = F.unfold(grid, kernel_size=3, padding=1)  # (B, D·9, P)
    cols = cols.view(b, d, 9, p).permute(0, 3, 2, 1)  # (B, P, 9, D)
    keep = [i for i in range(9) if i != 4]
    return cols[:, :, keep].reshape(b * p, 8, d)


class InpaintBlock(nn.Module):
    """SQUID's in-painting block on the bottleneck (B·P, C, h, w) → same shape.

    1. 1×1 conv to C/4 (+BN+ReLU); each patch flattens to D = (C/4)·h·w.
    2. Read the patch's own position memory (queue or learned) → m_self (B, P, D).
    3. Transformer: query = patch feature, keys/values = the 8 neighbours' memory reads;
       ``h = ReLU(LN(attn) + m_self)``, ``h = ReLU(LN(FFN(h)) + h)`` with FFN D → D/4 → D.
    4. Concatenate the binary position code, 1×1 conv back to C (+BN+ReLU).
    5. Masked shortcut (training only).
    """

    def __init__(self, s: NetSettings, channels: int, spatial: int) -> None:
        super().__init__()
        self.n = s.num_patches
        self.positions = s.num_patches**2
        self.transformer = s.transformer
        self.ratio = s.shortcut_ratio
        reduced = channels // 4
        self.dim = reduced * spatial * spatial
        self.reduce = nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced), nn.ReLU())
        mem_cls = MemoryQueue if s.queue else LearnedMemory
        self.memory = mem_cls(num_positions=self.positions, num_slots=s.num_slots, dim=self.dim, shrink=s.shrink)
        if s.transformer:
            self.attention = nn.MultiheadAttention(self.dim, s.num_heads, batch_first=True)
            self.norm1 = nn.LayerNorm(self.dim)
            self.ffn = nn.Sequential(
                nn.Linear(self.dim, self.dim // 4),
                nn.Dropout(s.dropout),
                nn.ReLU(),
                nn.Linear(self.dim // 4, self.dim),
                nn.Dropout(s.dropout),
            )
            self.norm2 = nn.LayerNorm(self.dim)
        self.register_buffer("codes", position_codes(self.positions), persistent=False)
        self.expand = nn.Sequential(
            nn.Conv2d(reduced + self.codes.shape[1], channels, 1), nn.BatchNorm2d(channels), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bp, _, h, w = x.shape
        b = bp // self.positions
        f = self.reduce(x)
        reduced = f.shape[1]
        query = f.reshape(b, self.positions, self.dim)
        m_self = self.memory(query)  # (B, P, D)
        if self.transformer:
            q = query.reshape(bp, 1, self.dim)
            kv = neighbour_reads(m_self, self.n)  # (B·P, 8, D)
            attn = self.attention(q, kv, kv, need_weights=False)[0]
            hid = F.relu(self.norm1(attn) + m_self.reshape(bp, 1, self.dim))
            hid = F.relu(self.norm2(self.ffn(hid)) + hid)
        else:
            hid = m_self
        hid = hid.reshape(bp, reduced, h, w)
        code = self.codes.repeat(b, 1).view(bp, -1, 1, 1).expand(-1, -1, h, w)
        out = self.expand(torch.cat([hid, code], dim=1))
        return masked_shortcut(out, x, self.ratio, self.training)


class PatchMemoryBlock(nn.Module):
    """A learned memory per patch position on a decoder feature map (the release's ``MemoryMatrixBlockV3``):
    each patch's whole map (C·h·w) is one query; masked shortcut in training."""

    def __init__(self, s: NetSettings, channels: int, spatial: int) -> None:
        super().__init__()
        self.positions = s.num_patches**2
        self.ratio = s.shortcut_ratio
        self.dim = channels * spatial * spatial
        self.memory = LearnedMemory(
            num_positions=self.positions, num_slots=s.decoder_slots, dim=self.dim, shrink=s.shrink
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bp = x.shape[0]
        read = self.memory(x.reshape(bp // self.positions, self.positions, self.dim)).reshape(x.shape)
        return masked_shortcut(read, x, self.ratio, self.training)


class BottleneckMemory(nn.Module):
    """MemAE-style: one learned memory read with hard shrinkage, by the whole flattened bottleneck of each image
    (``scope="image"``, slots of C·h·w) or by every bottleneck feature vector (``scope="location"``, slots of C)."""

    def __init__(self, s: NetSettings, channels: int, spatial: int) -> None:
        super().__init__()
        self.scope = s.memae_scope
        dim = channels * spatial * spatial if self.scope == "image" else channels
        self.memory = LearnedMemory(num_positions=1, num_slots=s.memae_slots, dim=dim, shrink=float(s.memae_shrink))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.scope == "image":
            return self.memory(x.reshape(b, 1, c * h * w)).view(b, c, h, w)
        q = x.permute(0, 2, 3, 1).reshape(-1, 1, c)
        return self.memory(q).view(b, h, w, c).permute(0, 3, 1, 2)

    def entropy(self) -> torch.Tensor:
        """MemAE's sparsity loss: mean entropy of the last read weights."""
        w = self.memory.last_weights
        return (-w * torch.log(w + 1e-12)).sum(-1).mean()


class PatchUNet(nn.Module):
    """The shared generator: SQUID, the AE or the MemAE-style model depending on :class:`NetSettings`.

    ``forward(x)`` with x (B, 1, H, W) in [0, 1] returns a dict:
        recon (B, 1, H, W) sigmoid output; teacher_recon (or None); dist_loss (scalar or None);
        bottleneck (B·P, C, h, w) encoder features; mem_entropy (scalar or None).
    """

    def __init__(self, s: NetSettings) -> None:
        super().__init__()
        s.validate()
        self.s = s
        f = s.filters()
        L = s.level
        self.in_conv = DoubleConv(s.in_channels, f[0])
        self.down = nn.ModuleList(DoubleConv(f[i], f[i + 1], stride=2) for i in range(L))

        def up_blocks() -> nn.ModuleList:
            return nn.ModuleList(
                Up(f[L - i] + (f[L - i - 1] if s.ops[i] == "concat" else 0), f[L - i - 1], op=s.ops[i])
                for i in range(L)
            )

        self.up = up_blocks()
        self.out_conv = nn.Conv2d(f[0], s.in_channels, 1)
        bottleneck_side = s.cell // 2**L
        self.inpaint = InpaintBlock(s, f[L], bottleneck_side) if s.inpaint else None
        self.decoder_memory = nn.ModuleDict(
            {str(j): PatchMemoryBlock(s, f[j], s.cell // 2**j) for j in s.decoder_memory}
        )
        self.bottleneck_memory = BottleneckMemory(s, f[L], bottleneck_side) if s.bottleneck_memory else None
        if s.teacher:
            self.teacher_up = up_blocks()
            self.teacher_out = nn.Conv2d(f[0], s.in_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch-wise encoder: bottleneck (B·P, C_L, h, w) and the skips (full images below initial_combine)."""
        n = self.s.num_patches
        x = self.in_conv(patchify(x, n))
        skips = []
        for i, block in enumerate(self.down):
            skips.append(unpatchify(x, n) if i < self.s.initial_combine else x)
            x = block(x)
        return x, skips

    def _decode(self, x, skips, ups, out_conv, memories: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n, L = self.s.num_patches, self.s.level
        feats = []
        for i, up in enumerate(ups):
            j = L - 1 - i
            if self.s.initial_combine == L - i:
                x = unpatchify(x, n)
            x = up(x, skips[j])
            if memories and str(j) in self.decoder_memory:
                x = self.decoder_memory[str(j)](x)
            feats.append(x)
        if self.s.initial_combine == 0:
            x = unpatchify(x, n)
        return torch.sigmoid(out_conv(x)), feats

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        z, skips = self.encode(x)
        h = z
        if self.bottleneck_memory is not None:
            h = self.bottleneck_memory(h)
        if self.inpaint is not None:
            h = self.inpaint(h)
        recon, feats = self._decode(h, skips, self.up, self.out_conv, memories=True)
        out: dict[str, torch.Tensor | None] = {
            "recon": recon,
            "bottleneck": z,
            "teacher_recon": None,
            "dist_loss": None,
            "mem_entropy": self.bottleneck_memory.entropy() if self.bottleneck_memory is not None else None,
        }
        if self.s.teacher:
            t_recon, t_feats = self._decode(
                z.detach(), [sk.detach() for sk in skips], self.teacher_up, self.teacher_out, memories=False
            )
            out["teacher_recon"] = t_recon
            out["dist_loss"] = sum(F.mse_loss(a, b) for a, b in zip(feats, t_feats))
        return out


class Discriminator(nn.Module):
    """Five stride-2 conv5×5 layers (1→16→32→64→128→128; BN after all but the first), LeakyReLU(0.2),
    then Linear → 1 logit. Input (B, 1, H, W) → (B,)."""

    def __init__(self, *, image_size: int, in_channels: int = 1) -> None:
        super().__init__()
        chans = [in_channels, 16, 32, 64, 128, 128]
        layers: list[nn.Module] = []
        side = image_size
        for i in range(5):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 5, stride=2, padding=2))
            if i > 0:
                layers.append(nn.BatchNorm2d(chans[i + 1]))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            side = (side - 1) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(128 * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)
