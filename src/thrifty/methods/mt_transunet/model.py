"""Network of the MT-TransUNet recipe: one Transformer carrying a CLS token and the patch tokens, four heads.

Chen et al., *MT-TransUNet: Mediating Multi-Task Tokens in Transformers for Skin Lesion Segmentation and
Classification* (arXiv 2112.01767); official code ``JingyeChen/MT-TransUNet``, whose network is the TransUNet copy
``model/networks/vit_seg_modeling_combine.py`` (+ ``vit_seg_modeling_resnet_skip.py``, ``vit_seg_configs.py``).
Written here from that reading (no code copied). The data flow, for an input (B, 3, H, W)::

    stem(x)                      -> map (B, C, g_h, g_w) at 1/s, skips [1/(s/2), ..., 1/2] (deepest first)
    patch embedding (1x1 conv)   -> (B, N, dim), N = g_h·g_w   (the release's hybrid patch size 1 on grid 14)
    [CLS] prepended              -> (B, 1+N, dim)              (the release: no position embedding is added)
    pre-norm Transformer + LN    -> encoded (B, 1+N, dim) and one softmax attention map per layer
    cls head   Linear(dim, K) on encoded[:, 0]                 -> cls_logits (B, K)
    ds head    conv3x3(dim, 2) on encoded[:, 1:] as a grid     -> ds_logits (B, 2, g_h, g_w)
    cascaded upsampler over the same grid, with skips          -> (B, decoder_channels[-1], H, W)
    seg head   conv3x3(., 2)                                   -> seg_logits (B, 2, H, W)
    SDF head   conv3x3(., 1), tanh                             -> sdf (B, 1, H, W) in [-1, 1]

Backbones:

* ``r50_vit_b16`` (the ``full`` preset): TransUNet's hybrid. ``R50Stem`` is the release's ``ResNetV2`` (width 64,
  weight-standardised convs, GroupNorm(32, eps 1e-6); root 7x7/2 conv, 3x3/2 max-pool without padding, three
  stages of bottleneck units ``(3, 4, 9)``; stage outputs zero-padded at the bottom/right to exactly 1/4 and 1/8),
  giving a 14x14 grid at 224² and skips 512@1/8, 256@1/4, 64@1/2 (``n_skip=3``). The upsampler is
  ``conv_more`` (dim -> 512) and blocks (256, 128, 64, 16) with skips (512, 256, 64, 0).
  :func:`load_transunet_npz` reads the ImageNet-21k ``R50+ViT-B_16.npz`` under the key names of the release's
  ``load_from``. NB: the release's ``get_b16_config`` (inherited by ``get_r50_b16_config``) sets
  ``transformer.num_layers = 4``, not ViT-B's 12; 4 layers is what makes the paper's "48 M parameters".
  Parameters at 224² with ``decoder_channels`` (256, 128, 64, 16): 48,439,608 with 4 layers, 105,142,584 with 12.
* ``mini`` (the miniature): :class:`MiniStem`, stages of (conv3x3/2-BN-ReLU, conv3x3-BN-ReLU) with widths
  ``stem_channels`` (16/32/64: 64² -> 8x8 tokens), skips from every stage but the last; the upsampler's
  ``conv_more`` maps dim -> ``decoder_channels[0]``. At the config defaults (decoder 32/16/8): 594,960 parameters
  (the 4x96 Transformer alone is 447,552), near the card's "about 0.5 M"; decoder 64/32/16 gives 715,848.

Deviations from the release (all deliberate):

* The release builds ``position_embeddings`` but its addition is commented out; here ``pos_embed="none"`` creates
  no position parameter at all, and ``"learned"`` (an ablation) adds a zero-initialised (1, 1+N, dim) parameter
  (the release's init), bilinearly resized over the patch grid when the input's grid differs from the built one.
* The CLS token is loaded from the ``.npz`` key ``cls`` when present (the release leaves it at zeros);
  ``load_transunet_npz(..., load_cls=False)`` reproduces the release.
* ``conv_more`` of the mini backbone maps to ``decoder_channels[0]`` (the release hard-codes 512 head channels,
  kept for ``r50_vit_b16``). The mini stem uses BatchNorm and plain convs (the R50 stem is faithful).
* Non-square inputs are supported (the release assumes a square grid, ``sqrt(n_patch)``); H and W must be
  multiples of the stem's stride (16 for R50, 2^len(stem_channels) for mini), else ``ValueError``.
* Dropout: the release's ``attention_dropout_rate`` is 0, so attention has none here; ``dropout`` is the
  release's ``dropout_rate`` (embeddings and MLP; 0.1 at ViT-B, 0 in the miniature).
* Inputs with one channel are repeated to three, as the release does; other channel counts raise.
* The classification head's width is ``num_classes`` (the release hard-codes 3); the segmentation heads have
  2 classes as the release's ``n_classes = 2``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thrifty.core.nn import count_parameters as count_parameters  # re-exported

__all__ = [
    "Attention",
    "Block",
    "CascadedUpsampler",
    "DecoderBlock",
    "Encoder",
    "MTOutput",
    "MTTransUNet",
    "MiniStem",
    "Mlp",
    "R50Stem",
    "StdConv2d",
    "build_model",
    "count_parameters",
    "export_transunet_npz",
    "load_transunet_npz",
]

logger = logging.getLogger(__name__)

#: the release's ``n_classes``: lesion vs background
SEG_CLASSES = 2
#: the release's hard-coded ``head_channels`` of ``conv_more`` (R50-ViT-B/16)
R50_HEAD_CHANNELS = 512


@dataclasses.dataclass
class MTOutput:
    """What :meth:`MTTransUNet.forward` returns (g_h × g_w is the token grid, N = g_h·g_w).

    Attributes:
        cls_logits: (B, num_classes) from the final (normed) CLS token.
        seg_logits: (B, 2, H, W) segmentation logits.
        sdf: (B, 1, H, W) signed-distance prediction, tanh'd into [-1, 1].
        ds_logits: (B, 2, g_h, g_w) deep-supervision logits on the token grid.
        attentions: one (B, heads, 1+N, 1+N) softmax map per layer (rows sum to 1; the CLS token is index 0).
    """

    cls_logits: Tensor
    seg_logits: Tensor
    sdf: Tensor
    ds_logits: Tensor
    attentions: list[Tensor]


# ----------------------------------------------------------------------------------------------------- Transformer
class Attention(nn.Module):
    """Multi-head self-attention returning its weights (explicit softmax; SDPA would not expose them).

    (B, T, dim) -> output (B, T, dim) and weights (B, heads, T, T). Separate query/key/value/out projections, as the
    release (and its ``.npz`` keys) has them.
    """

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        weights = torch.softmax(scores, dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(x.shape)
        return self.out(context), weights


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout; Xavier-uniform weights, N(0, 1e-6) biases (the release's init).
    (B, T, dim) -> (B, T, dim)."""

    def __init__(self, *, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.dropout = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer block (LayerNorm eps 1e-6). (B, T, dim) -> (B, T, dim) and (B, heads, T, T)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = Mlp(dim=dim, mlp_dim=mlp_dim, dropout=dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, weights = self.attn(self.attention_norm(x))
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), weights


class Encoder(nn.Module):
    """``num_layers`` blocks and a final LayerNorm. (B, T, dim) -> (B, T, dim) and a list of (B, heads, T, T)."""

    def __init__(self, *, dim: int, num_layers: int, num_heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(dim=dim, num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout) for _ in range(num_layers)
        )
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        attentions = []
        for layer in self.layers:
            x, weights = layer(x)
            attentions.append(weights)
        return self.encoder_norm(x), attentions


# ---------------------------------------------------------------------------------------------------------- stems
class MiniStem(nn.Module):
    """The miniature's conv stem: per width c, conv3x3/2-BN-ReLU then conv3x3-BN-ReLU.

    (B, in_channels, H, W) -> map (B, channels[-1], H/s, W/s) with s = 2^len(channels), and the earlier stages'
    outputs as skips, deepest first: [(B, channels[-2], 2H/s, 2W/s), ..., (B, channels[0], H/2, W/2)].
    """

    def __init__(self, *, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if not channels or min(channels) < 1:
            raise ValueError(f"stem channels must be a non-empty list of positive widths, got {list(channels)}")
        stages = []
        cin = in_channels
        for c in channels:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, c, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                )
            )
            cin = c
        self.stages = nn.ModuleList(stages)
        self.out_channels = int(channels[-1])
        self.skip_channels: tuple[int, ...] = tuple(int(c) for c in reversed(channels[:-1]))
        self.stride = 2 ** len(channels)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                skips.append(x)
        return x, skips[::-1]


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (per output channel: zero mean, unit biased variance, eps 1e-5)."""

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Bottleneck(nn.Module):
    """The release's ``PreActBottleneck`` (despite the name, conv-GN-ReLU ordering; stride on the 3x3 conv).

    ``relu(gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x)))))))) + proj(x))``; ``proj`` = StdConv1x1 (stride) +
    GroupNorm(cout, cout) when the stride or width changes, else identity.
    (B, cin, H, W) -> (B, cout, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, *, cin: int, cout: int, cmid: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, cmid, eps=1e-6)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(32, cmid, eps=1e-6)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, cout, eps=1e-6)
        self.downsample: StdConv2d | None = None
        self.gn_proj: nn.GroupNorm | None = None
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride=stride, bias=False)
            self.gn_proj = nn.GroupNorm(cout, cout)  # eps 1e-5, as the release

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.gn_proj(self.downsample(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class R50Stem(nn.Module):
    """TransUNet's ResNetV2 hybrid stem (``vit_seg_modeling_resnet_skip.ResNetV2``, width factor 1).

    (B, 3, H, W), H and W multiples of 16 -> map (B, 1024, H/16, W/16) and skips, deepest first,
    [(B, 512, H/8, W/8), (B, 256, H/4, W/4), (B, 64, H/2, W/2)]. At 224²: 14x14 tokens, skips at 28, 56, 112.
    The unpadded max-pool gives H/4 - 1 rows; stage outputs are zero-padded at the bottom/right to H/4 and
    H/8 for the skips (the release's ``right_size`` fix), while the unpadded map goes on.
    """

    def __init__(self, *, units: Sequence[int] = (3, 4, 9), width: int = 64) -> None:
        super().__init__()
        if len(units) != 3 or min(units) < 1:
            raise ValueError(f"resnet_units must be three positive block counts, got {list(units)}")
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(3, width, 7, stride=2, padding=3, bias=False),
                gn=nn.GroupNorm(32, width, eps=1e-6),
                relu=nn.ReLU(inplace=True),
            )
        )
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        cin = width
        for b, (n_units, mult, stride) in enumerate(zip(units, (4, 8, 16), (1, 2, 2)), start=1):
            cout, cmid = width * mult, width * mult // 4
            seq = OrderedDict()
            for u in range(1, n_units + 1):
                seq[f"unit{u}"] = Bottleneck(cin=cin, cout=cout, cmid=cmid, stride=stride if u == 1 else 1)
                cin = cout
            blocks[f"block{b}"] = nn.Sequential(seq)
        self.body = nn.Sequential(blocks)
        self.units = tuple(int(u) for u in units)
        self.out_channels = width * 16
        self.skip_channels: tuple[int, ...] = (width * 8, width * 4, width)
        self.stride = 16

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h, w = x.shape[-2:]
        x = self.root(x)
        skips = [x]
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=0)
        for i, block in enumerate(self.body):
            x = block(x)
            if i < len(self.body) - 1:
                th, tw = h // (4 * (i + 1)), w // (4 * (i + 1))  # 1/4, then 1/8
                ph, pw = th - x.shape[-2], tw - x.shape[-1]
                if not (0 <= ph < 3 and 0 <= pw < 3):
                    raise RuntimeError(f"R50 stage {i + 1} gave {tuple(x.shape[-2:])}, expected about {(th, tw)}")
                skips.append(F.pad(x, (0, pw, 0, ph)) if ph or pw else x)
        return x, skips[::-1]


# -------------------------------------------------------------------------------------------------------- decoder
def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Bilinear x2 upsampling (align_corners=True, as ``nn.UpsamplingBilinear2d``), concat the skip if any, two
    conv3x3-BN-ReLU. (B, cin, h, w) [+ (B, skip, 2h, 2w)] -> (B, cout, 2h, 2w)."""

    def __init__(self, *, cin: int, cout: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.conv1 = _conv_bn_relu(cin + skip_channels, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CascadedUpsampler(nn.Module):
    """TransUNet's ``DecoderCup``: ``conv_more`` (conv3x3-BN-ReLU, in_dim -> head_channels), then one
    :class:`DecoderBlock` per entry of ``decoder_channels``; block i concatenates skip i when
    ``skip_channels[i] > 0`` (missing entries count as 0).

    (B, in_dim, g_h, g_w) and skips (deepest first) -> (B, decoder_channels[-1], g_h·2^k, g_w·2^k), k blocks.
    """

    def __init__(
        self, *, in_dim: int, head_channels: int, decoder_channels: Sequence[int], skip_channels: Sequence[int] = ()
    ) -> None:
        super().__init__()
        if not decoder_channels or min(decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be non-empty positive widths, got {list(decoder_channels)}")
        if len(skip_channels) > len(decoder_channels):
            raise ValueError(f"{len(skip_channels)} skips for {len(decoder_channels)} decoder blocks")
        skips = [*skip_channels, *[0] * (len(decoder_channels) - len(skip_channels))]
        self.conv_more = _conv_bn_relu(in_dim, head_channels)
        cins = [head_channels, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(cin=ci, cout=co, skip_channels=sk) for ci, co, sk in zip(cins, decoder_channels, skips)
        )
        self.out_channels = int(decoder_channels[-1])

    def forward(self, x: Tensor, skips: Sequence[Tensor] = ()) -> Tensor:
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if block.skip_channels and i < len(skips) else None)
        return x


# ---------------------------------------------------------------------------------------------------------- model
class MTTransUNet(nn.Module):
    """MT-TransUNet: stem -> 1x1 patch embedding -> [CLS] + patch tokens -> Transformer -> four heads.

    Args:
        stem: :class:`MiniStem` or :class:`R50Stem` (anything with ``out_channels``, ``skip_channels``, ``stride``
            and ``forward(x) -> (map, skips)``).
        dim / num_layers / num_heads / mlp_dim: the Transformer.
        decoder_channels: the cascaded upsampler's block widths; ``len == log2(stem.stride)`` so that the
            output is at the input's resolution.
        head_channels: ``conv_more``'s width (``None``: ``decoder_channels[0]``; the release: 512).
        pos_embed: ``"none"`` (the release: no position parameter) or ``"learned"`` ((1, 1+N, dim), zeros).
        dropout: embedding and MLP dropout.
        num_classes: classification classes (3: melanoma, seborrheic keratosis, nevus).
        image_size: the side the learned position embedding is built for (other sizes are resized to).

    ``forward(x)``: (B, 3, H, W) -> :class:`MTOutput`.
    """

    def __init__(
        self, *, stem: nn.Module, dim: int, num_layers: int, num_heads: int, mlp_dim: int,
        decoder_channels: Sequence[int], head_channels: int | None = None, pos_embed: str = "none",
        dropout: float = 0.0, num_classes: int = 3, image_size: int = 64,
    ) -> None:  # fmt: skip
        super().__init__()
        if pos_embed not in ("none", "learned"):
            raise ValueError(f"pos_embed must be 'none' or 'learned', got {pos_embed!r}")
        stride = int(stem.stride)
        if 2 ** len(decoder_channels) != stride:
            raise ValueError(
                f"the stem's stride is {stride}, so the upsampler needs {int(math.log2(stride))} decoder blocks "
                f"to reach the input resolution; got decoder_channels={list(decoder_channels)}"
            )
        if image_size % stride:
            raise ValueError(f"image_size ({image_size}) must be a multiple of the stem's stride {stride}")
        self.stem = stem
        self.stride = stride
        self.dim = dim
        self.num_heads = num_heads
        self.grid = image_size // stride
        self.patch_embed = nn.Conv2d(stem.out_channels, dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed: nn.Parameter | None = None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.embed_dropout = nn.Dropout(dropout)
        self.encoder = Encoder(dim=dim, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout)
        self.decoder = CascadedUpsampler(
            in_dim=dim, head_channels=head_channels or decoder_channels[0], decoder_channels=decoder_channels,
            skip_channels=tuple(stem.skip_channels),
        )  # fmt: skip
        self.seg_head = nn.Conv2d(self.decoder.out_channels, SEG_CLASSES, 3, padding=1)
        self.sdf_head = nn.Conv2d(self.decoder.out_channels, 1, 3, padding=1)
        self.ds_head = nn.Conv2d(dim, SEG_CLASSES, 3, padding=1)
        self.cls_head = nn.Linear(dim, num_classes)

    def _position(self, gh: int, gw: int) -> Tensor:
        """The learned position embedding for a g_h x g_w grid: (1, 1+N, dim)."""
        assert self.pos_embed is not None
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.transpose(1, 2).reshape(1, self.dim, self.grid, self.grid)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bilinear", align_corners=False)
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> MTOutput:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        b, _, h, w = x.shape
        if h % self.stride or w % self.stride or h == 0 or w == 0:
            raise ValueError(f"image height and width must be positive multiples of {self.stride}, got {h}x{w}")
        feats, skips = self.stem(x)
        tokens = self.patch_embed(feats)  # (B, dim, g_h, g_w)
        gh, gw = tokens.shape[-2:]
        seq = torch.cat([self.cls_token.expand(b, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
        if self.pos_embed is not None:
            seq = seq + self._position(gh, gw)
        encoded, attentions = self.encoder(self.embed_dropout(seq))  # (B, 1+N, dim)
        grid = encoded[:, 1:].transpose(1, 2).reshape(b, self.dim, gh, gw)
        decoded = self.decoder(grid, skips)
        return MTOutput(
            cls_logits=self.cls_head(encoded[:, 0]),
            seg_logits=self.seg_head(decoded),
            sdf=torch.tanh(self.sdf_head(decoded)),
            ds_logits=self.ds_head(grid),
            attentions=attentions,
        )


def build_model(cfg: Any, *, num_classes: int = 3, image_size: int = 64) -> MTTransUNet:
    """The network described by ``cfg`` (a :class:`~thrifty.methods.mt_transunet.config.ModelConfig`).

    ``mini``: :class:`MiniStem` (``cfg.stem_channels``) and ``conv_more`` of width ``decoder_channels[0]``.
    ``r50_vit_b16``: :class:`R50Stem` (``cfg.resnet_units``), ``conv_more`` of width 512, the Transformer from
    ``cfg.dim/num_layers/num_heads/mlp_dim`` (the ``full`` preset sets ViT-B's) and ``cfg.decoder_channels``
    (the release's (256, 128, 64, 16)); a ``cfg.weights`` ``.npz`` is loaded by :func:`load_transunet_npz`.
    """
    if cfg.backbone not in ("mini", "r50_vit_b16"):
        raise ValueError(f"config key 'model.backbone' must be 'mini' or 'r50_vit_b16', got {cfg.backbone!r}")
    if cfg.pos_embed not in ("none", "learned"):
        raise ValueError(f"config key 'model.pos_embed' must be 'none' or 'learned', got {cfg.pos_embed!r}")
    for key in ("dim", "num_layers", "num_heads", "mlp_dim"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config key 'model.{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"config key 'model.dim' ({cfg.dim}) must be divisible by 'model.num_heads' ({cfg.num_heads})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"config key 'model.dropout' must be in [0, 1), got {cfg.dropout}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    stem: MiniStem | R50Stem
    if cfg.backbone == "mini":
        if cfg.weights:
            raise ValueError("config key 'model.weights' (a TransUNet .npz) needs model.backbone='r50_vit_b16'")
        stem = MiniStem(channels=list(cfg.stem_channels))
        head_channels = None
        blocks_key = "model.stem_channels"
    else:
        stem = R50Stem(units=list(cfg.resnet_units))
        head_channels = R50_HEAD_CHANNELS
        blocks_key = "the R50 stem's stride 16"
    n_blocks = int(math.log2(stem.stride))
    if len(cfg.decoder_channels) != n_blocks:
        raise ValueError(
            f"config key 'model.decoder_channels' needs {n_blocks} entries (one per 2x upsampling; {blocks_key}), "
            f"got {list(cfg.decoder_channels)}"
        )
    if image_size % stem.stride:
        raise ValueError(f"image size {image_size} must be a multiple of {stem.stride} for backbone {cfg.backbone!r}")
    model = MTTransUNet(
        stem=stem, dim=cfg.dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
        decoder_channels=list(cfg.decoder_channels), head_channels=head_channels, pos_embed=cfg.pos_embed,
        dropout=cfg.dropout, num_classes=num_classes, image_size=image_size,
    )  # fmt: skip
    if cfg.weights:
        left = load_transunet_npz(model, cfg.weights)
        logger.info("loaded %s; %d parameter tensors left at their initialisation", cfg.weights, len(left))
    return model


# ------------------------------------------------------------------------------------------------- .npz weights
_ATT = "MultiHeadDotProductAttention_1"
_FC = ("MlpBlock_3/Dense_0", "MlpBlock_3/Dense_1")


def _npz_plan(model: MTTransUNet, *, load_cls: bool = True) -> list[tuple[str, str, str]]:
    """(npz key, parameter name, conversion) for every tensor the release's ``load_from`` reads (+ ``cls``).

    Conversions: ``conv`` HWIO <-> OIHW; ``dense`` (in, out) <-> (out, in); ``qkv`` (dim, heads, hd) <-> (out, in);
    ``out`` (heads, hd, dim) <-> (out, in); ``vec`` any shape with the parameter's size, flattened; ``same``.
    """
    if not isinstance(model.stem, R50Stem):
        raise ValueError("TransUNet .npz weights fit only the r50_vit_b16 backbone (an R50Stem)")
    plan = [("embedding/kernel", "patch_embed.weight", "conv"), ("embedding/bias", "patch_embed.bias", "vec")]
    if load_cls:
        plan.append(("cls", "cls_token", "same"))
    if model.pos_embed is not None:
        plan.append(("Transformer/posembed_input/pos_embedding", "pos_embed", "pos"))
    plan += [
        ("Transformer/encoder_norm/scale", "encoder.encoder_norm.weight", "vec"),
        ("Transformer/encoder_norm/bias", "encoder.encoder_norm.bias", "vec"),
    ]
    for i in range(len(model.encoder.layers)):
        root, p = f"Transformer/encoderblock_{i}", f"encoder.layers.{i}"
        for name in ("query", "key", "value", "out"):
            plan.append((f"{root}/{_ATT}/{name}/kernel", f"{p}.attn.{name}.weight", "out" if name == "out" else "qkv"))
            plan.append((f"{root}/{_ATT}/{name}/bias", f"{p}.attn.{name}.bias", "vec"))
        for key, fc in zip(_FC, ("fc1", "fc2")):
            plan += [
                (f"{root}/{key}/kernel", f"{p}.ffn.{fc}.weight", "dense"),
                (f"{root}/{key}/bias", f"{p}.ffn.{fc}.bias", "vec"),
            ]
        for key, norm in (("LayerNorm_0", "attention_norm"), ("LayerNorm_2", "ffn_norm")):
            plan += [
                (f"{root}/{key}/scale", f"{p}.{norm}.weight", "vec"),
                (f"{root}/{key}/bias", f"{p}.{norm}.bias", "vec"),
            ]
    plan += [
        ("conv_root/kernel", "stem.root.conv.weight", "conv"),
        ("gn_root/scale", "stem.root.gn.weight", "vec"),
        ("gn_root/bias", "stem.root.gn.bias", "vec"),
    ]
    for bname, block in model.stem.body.named_children():
        for uname, unit in block.named_children():
            prefix, p = f"{bname}/{uname}", f"stem.body.{bname}.{uname}"
            for j in (1, 2, 3):
                plan.append((f"{prefix}/conv{j}/kernel", f"{p}.conv{j}.weight", "conv"))
                plan += [
                    (f"{prefix}/gn{j}/scale", f"{p}.gn{j}.weight", "vec"),
                    (f"{prefix}/gn{j}/bias", f"{p}.gn{j}.bias", "vec"),
                ]
            if unit.downsample is not None:
                plan += [
                    (f"{prefix}/conv_proj/kernel", f"{p}.downsample.weight", "conv"),
                    (f"{prefix}/gn_proj/scale", f"{p}.gn_proj.weight", "vec"),
                    (f"{prefix}/gn_proj/bias", f"{p}.gn_proj.bias", "vec"),
                ]
    return plan


def _to_torch(key: str, arr: np.ndarray, target: Tensor, kind: str, grid: int) -> Tensor:
    """The npz array ``arr`` converted to ``target``'s layout; a shape mismatch raises naming ``key``."""
    shape = tuple(target.shape)
    a = np.asarray(arr)
    if kind == "conv" and a.ndim == 4:
        a = a.transpose(3, 2, 0, 1)
    elif kind == "dense" and a.ndim == 2:
        a = a.T
    elif kind in ("qkv", "out") and a.size == target.numel() and a.ndim >= 2:
        # q/k/v kernels are (in, heads, hd), the out kernel (heads, hd, out): check the unsplit axis
        if (a.shape[0] if kind == "qkv" else a.shape[-1]) == (shape[1] if kind == "qkv" else shape[0]):
            a = a.reshape(shape[1], shape[0]).T
    elif kind == "vec" and a.size == target.numel():
        a = a.reshape(shape)
    elif kind == "pos" and a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == shape[2] and a.shape != shape:
        a = _resize_pos(a, shape, grid)
    if tuple(a.shape) != shape:
        raise ValueError(f"npz key {key!r}: shape {tuple(arr.shape)} does not fit the model's {shape}")
    return torch.from_numpy(np.ascontiguousarray(a))


def _resize_pos(a: np.ndarray, shape: tuple[int, ...], grid: int) -> np.ndarray:
    """A (1, 1+n², dim) position embedding (CLS first) bilinearly resized to (1, 1+grid², dim)."""
    old = math.isqrt(a.shape[1] - 1)
    if old * old != a.shape[1] - 1 or shape[1] != 1 + grid * grid:
        return a  # not a square grid with CLS: the caller's shape check raises
    g = torch.from_numpy(np.ascontiguousarray(a[:, 1:])).float().transpose(1, 2).reshape(1, -1, old, old)
    g = F.interpolate(g, size=(grid, grid), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    return np.concatenate([a[:, :1], g.numpy().astype(a.dtype)], axis=1)


def load_transunet_npz(model: MTTransUNet, path: str | Path, *, load_cls: bool = True) -> list[str]:
    """Load the ImageNet-21k ``R50+ViT-B_16.npz`` (TransUNet / MT-TransUNet ``load_from`` key names) into an
    ``r50_vit_b16`` model: patch embedding, encoder blocks ``0..num_layers-1`` (extra npz blocks ignored),
    encoder norm, root conv/GN and every bottleneck unit, plus ``cls`` when present and ``load_cls``.

    The npz's ``Transformer/posembed_input/pos_embedding`` is read only when the model has ``pos_embed="learned"``
    (resized bilinearly over the grid if needed); with ``"none"`` (the release) it is ignored.

    Returns: names of the model parameters left at their initialisation (heads, decoder, ...).
    Raises: ``FileNotFoundError`` (no file), ``KeyError`` (a needed key is absent), ``ValueError`` (wrong shape).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TransUNet weights {path} do not exist (nothing is downloaded)")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    npz = np.load(path, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz archive")
    with npz:
        plan = _npz_plan(model, load_cls=load_cls and "cls" in npz.files)
        converted = {}
        for key, name, kind in plan:
            if key not in npz.files:
                raise KeyError(f"{path}: npz key {key!r} (for parameter {name!r}) is missing")
            converted[name] = _to_torch(key, npz[key], params[name], kind, model.grid)
    with torch.no_grad():
        for name, value in converted.items():
            params[name].copy_(value)
            loaded.add(name)
    return [name for name in params if name not in loaded]


def export_transunet_npz(model: MTTransUNet, path: str | Path) -> list[str]:
    """Write ``model``'s backbone and Transformer under the release's ``.npz`` key names and layouts (the inverse
    of :func:`load_transunet_npz`: HWIO kernels, (dim, heads, hd) q/k/v kernels, (heads, hd, dim) out kernels,
    (heads, hd) q/k/v biases). Returns the keys written."""
    params = dict(model.named_parameters())
    heads = model.num_heads
    arrays: dict[str, np.ndarray] = {}
    for key, name, kind in _npz_plan(model):
        t = params[name].detach().cpu().numpy()
        if kind == "conv":
            t = t.transpose(2, 3, 1, 0)
        elif kind == "dense":
            t = t.T
        elif kind == "qkv":
            t = t.T.reshape(t.shape[1], heads, -1)
        elif kind == "out":
            t = t.T.reshape(heads, -1, t.shape[0])
        elif kind == "vec" and "/MultiHeadDotProductAttention_1/" in key and not key.endswith("out/bias"):
            t = t.reshape(heads, -1)
        arrays[key] = np.ascontiguousarray(t)
    np.savez(Path(path), **arrays)
    return list(arrays)
