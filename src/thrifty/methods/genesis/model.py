"""3D networks of Models Genesis (Zhou et al., MedIA 2021, arXiv 2004.07882), Semantic Genesis (Haghighi et al.,
MICCAI 2020, arXiv 2007.06959) and TransVW (Haghighi et al., IEEE TMI 2021, arXiv 2102.10680).

* :class:`UNet3D` is the Models Genesis 3D U-Net. Four encoder levels, each two (Conv3d 3³ → BatchNorm3d → ReLU)
  blocks whose first conv outputs half the level's width (full size: 32→64, 64→128, 128→256, 256→512), 2×2×2
  max-pooling between levels (three pools, so every spatial size must be divisible by 8). The decoder upsamples
  with ConvTranspose3d (kernel 2, stride 2, channels kept), concatenates the skip and applies two
  (conv → BN → ReLU) blocks down to the skip's width; a 1×1×1 conv and (optionally) a sigmoid give the output.
* :class:`YNet3D` adds the Semantic Genesis / TransVW *visual-word* classification head on the bottleneck
  (Conv3d 3³ → BN → ReLU → global average pool → Linear → ``num_classes`` logits); ``num_classes=0`` drops it
  and the network is a plain restoration U-Net.
* :class:`EncoderClassifier` is the target-task network for nodule false-positive reduction: the same encoder,
  global average pooling over the bottleneck and a Linear layer to one logit.

Deliberate differences from the official PyTorch code:

* Standard :class:`torch.nn.BatchNorm3d`. The official ``ContBatchNorm3d`` always normalised with the statistics
  of the current batch, also in ``eval()``, so a sample's prediction depended on the other samples in its batch.
* Convolutions followed by BatchNorm have no bias (BN's shift makes it redundant; it would only ever receive a
  zero gradient).
* Widths are configurable: ``width`` multiplies the level widths (64, 128, 256, 512); the CPU miniature uses
  ``width=0.125``, i.e. levels of 4→8, 8→16, 16→32, 32→64 channels (298,701 parameters; the full-size
  U-Net has 19.07M).

Weights are exchanged with :func:`save_weights` / :func:`load_weights` (safetensors plus a JSON card next to it,
never pickle); :func:`encoder_state_dict` / :func:`load_encoder` move the pre-trained encoder (the down path)
between a restoration network and a target-task network.

Shapes: inputs (B, C_in, D, H, W) with D, H, W divisible by 8 (e.g. Models Genesis cubes of 64×64×32 are
stored as (B, 1, 32, 64, 64)); restoration outputs (B, C_out, D, H, W).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from thrifty.core.nn import count_parameters as count_parameters  # re-exported

FULL_WIDTHS = (64, 128, 256, 512)
FULL_HEAD_CHANNELS = 1024
NUM_POOLS = 3
DIVISOR = 2**NUM_POOLS
CARD_FORMAT = "thrifty.genesis.weights/1"

FinalActivation = Literal["sigmoid", "none"]


class WeightsError(ValueError):
    """A weights file or its card is missing, unreadable or does not fit the model; the message names the file."""


def resolve_widths(*, width: float = 1.0, widths: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
    """Level widths (the output channels of each encoder level) from a multiplier or an explicit tuple.

    Args:
        width: multiplier of the Models Genesis widths (64, 128, 256, 512); ignored when ``widths`` is given.
        widths: four explicit level widths, each even (the first conv of a level outputs half of it).

    Returns:
        (w1, w2, w3, w4), e.g. (8, 16, 32, 64) for ``width=0.125``.
    """
    if widths is None:
        if not (width > 0 and math.isfinite(width)):
            raise ValueError(f"width multiplier must be a positive number, got {width}")
        widths = tuple(max(2, 2 * round(w * width / 2)) for w in FULL_WIDTHS)
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4:
        raise ValueError(f"widths must name 4 encoder levels, got {len(widths)}: {widths}")
    if any(w < 2 or w % 2 for w in widths):
        raise ValueError(f"every level width must be an even number >= 2 (its first conv outputs half), got {widths}")
    return widths  # type: ignore[return-value]


def check_input(x: torch.Tensor, *, in_channels: int) -> None:
    """Raise a clear ``ValueError`` unless ``x`` is (B, in_channels, D, H, W) with D, H, W divisible by 8."""
    if x.dim() != 5:
        raise ValueError(f"expected a 5-D input (B, C, D, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channel(s), got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s < DIVISOR or s % DIVISOR for s in spatial):
        raise ValueError(
            f"every spatial size (D, H, W) must be a positive multiple of {DIVISOR} (the U-Net pools {NUM_POOLS} "
            f"times), got {spatial}"
        )


class ConvBNReLU(nn.Sequential):
    """Conv3d 3³ (padding 1, no bias) → BatchNorm3d → ReLU: (B, C_in, D, H, W) → (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two :class:`ConvBNReLU`: C_in → C_mid → C_out at unchanged spatial size."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, mid_channels), ConvBNReLU(mid_channels, out_channels))


class Encoder3D(nn.Module):
    """The Models Genesis down path.

    Level k (k = 0..3) is ``DoubleConv(C_{k-1}, w_k / 2, w_k)``; a 2×2×2 max-pool follows levels 0..2.

    Forward: (B, C_in, D, H, W) → bottleneck (B, w_4, D/8, H/8, W/8) and the skips
    [(B, w_1, D, H, W), (B, w_2, D/2, H/2, W/2), (B, w_3, D/4, H/4, W/4)].
    """

    def __init__(self, *, in_channels: int = 1, width: float = 1.0, widths: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.widths = resolve_widths(width=width, widths=widths)
        levels = []
        prev = self.in_channels
        for w in self.widths:
            levels.append(DoubleConv(prev, w // 2, w))
            prev = w
        self.levels = nn.ModuleList(levels)
        self.pool = nn.MaxPool3d(2)

    @property
    def out_channels(self) -> int:
        """Channels of the bottleneck (w_4)."""
        return self.widths[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        check_input(x, in_channels=self.in_channels)
        skips = []
        for k, level in enumerate(self.levels):
            x = level(x)
            if k < len(self.levels) - 1:
                skips.append(x)
                x = self.pool(x)
        return x, skips


class UpLevel(nn.Module):
    """ConvTranspose3d (kernel 2, stride 2, channels kept), concat with the skip, DoubleConv to the skip's width.

    Forward: x (B, C, d, h, w), skip (B, S, 2d, 2h, 2w) → (B, S, 2d, 2h, 2w).
    """

    def __init__(self, in_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels + skip_channels, skip_channels, skip_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet3D(nn.Module):
    """Models Genesis 3D U-Net for restoration (pre-training) and segmentation (fine-tuning).

    Args:
        in_channels: image channels (1 for CT).
        out_channels: output channels (1 for restoration / binary segmentation).
        width: multiplier of the full-size level widths (64, 128, 256, 512).
        widths: explicit level widths; overrides ``width``.
        final_activation: ``"sigmoid"`` (restoration: outputs in [0, 1]) or ``"none"`` (logits, e.g. for
            segmentation fine-tuning with BCE-with-logits / Dice on the sigmoid).

    Forward: (B, in_channels, D, H, W), D, H, W divisible by 8 → (B, out_channels, D, H, W).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        width: float = 1.0,
        widths: tuple[int, ...] | None = None,
        final_activation: FinalActivation = "sigmoid",
    ) -> None:
        super().__init__()
        if final_activation not in ("sigmoid", "none"):
            raise ValueError(f"final_activation must be 'sigmoid' or 'none', got {final_activation!r}")
        self.encoder = Encoder3D(in_channels=in_channels, width=width, widths=widths)
        w = self.encoder.widths
        self.decoder = nn.ModuleList([UpLevel(w[3], w[2]), UpLevel(w[2], w[1]), UpLevel(w[1], w[0])])
        self.head = nn.Conv3d(w[0], out_channels, kernel_size=1)
        self.out_channels = int(out_channels)
        self.final_activation = final_activation

    @property
    def widths(self) -> tuple[int, int, int, int]:
        return self.encoder.widths

    def config(self) -> dict:
        """Constructor arguments (JSON-able), enough to rebuild the network with :func:`build_model`."""
        return {
            "architecture": type(self).__name__,
            "in_channels": self.encoder.in_channels,
            "out_channels": self.out_channels,
            "widths": list(self.widths),
            "final_activation": self.final_activation,
        }

    def decode(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder + output layer: bottleneck (B, w_4, D/8, H/8, W/8) and skips → (B, out_channels, D, H, W)."""
        x = bottleneck
        for up, skip in zip(self.decoder, reversed(skips), strict=True):
            x = up(x, skip)
        x = self.head(x)
        return torch.sigmoid(x) if self.final_activation == "sigmoid" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, skips = self.encoder(x)
        return self.decode(bottleneck, skips)


def class_head(in_channels: int, hidden: int, num_classes: int) -> nn.Sequential:
    """The Semantic Genesis classification head on a bottleneck: Conv3d 3³ (no bias) → BN → ReLU → global average
    pool → Linear. (B, in_channels, d, h, w) → logits (B, num_classes)."""
    return nn.Sequential(
        ConvBNReLU(in_channels, hidden),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(hidden, num_classes),
    )


class YNet3D(UNet3D):
    """U-Net plus the visual-word classification head of Semantic Genesis / TransVW.

    The head reads the bottleneck: Conv3d 3³ (w_4 → head_channels, no bias) → BN → ReLU → global average pool →
    Linear(head_channels → num_classes). With ``num_classes=0`` (visual words off) the head does not exist.

    Args:
        num_classes: number of visual words (0: no head).
        head_channels: channels of the head's conv; default 1024 × ``width`` (1024 at full size).
        (the other arguments are those of :class:`UNet3D`)

    Forward: (B, in_channels, D, H, W) → (restoration (B, out_channels, D, H, W), logits (B, num_classes)),
    logits being ``None`` when there is no head.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        width: float = 1.0,
        widths: tuple[int, ...] | None = None,
        final_activation: FinalActivation = "sigmoid",
        num_classes: int = 0,
        head_channels: int | None = None,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            width=width,
            widths=widths,
            final_activation=final_activation,
        )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        if head_channels is None:
            ratio = self.widths[-1] / FULL_WIDTHS[-1]
            head_channels = max(1, round(FULL_HEAD_CHANNELS * ratio))
        self.head_channels = int(head_channels)
        self.word_head: nn.Module | None = None
        if self.num_classes > 0:
            self.word_head = class_head(self.widths[-1], self.head_channels, self.num_classes)

    def config(self) -> dict:
        return {**super().config(), "num_classes": self.num_classes, "head_channels": self.head_channels}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        bottleneck, skips = self.encoder(x)
        restoration = self.decode(bottleneck, skips)
        logits = self.word_head(bottleneck) if self.word_head is not None else None
        return restoration, logits


class EncoderClassifier(nn.Module):
    """Target-task classifier (nodule false-positive reduction): the U-Net encoder, GAP and Linear → logit(s).

    Args:
        in_channels, width, widths: as for :class:`UNet3D` (they must match the pre-trained encoder).
        num_outputs: logits per sample (1 for a binary task trained with BCE-with-logits).
        dropout: dropout probability before the Linear layer.

    Forward: (B, in_channels, D, H, W), D, H, W divisible by 8 → logits (B, num_outputs).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        width: float = 1.0,
        widths: tuple[int, ...] | None = None,
        num_outputs: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = Encoder3D(in_channels=in_channels, width=width, widths=widths)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.encoder.out_channels, num_outputs)
        self.num_outputs = int(num_outputs)
        self.dropout_p = float(dropout)

    @property
    def widths(self) -> tuple[int, int, int, int]:
        return self.encoder.widths

    def config(self) -> dict:
        return {
            "architecture": type(self).__name__,
            "in_channels": self.encoder.in_channels,
            "widths": list(self.widths),
            "num_outputs": self.num_outputs,
            "dropout": self.dropout_p,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, _ = self.encoder(x)
        return self.fc(self.dropout(self.pool(bottleneck).flatten(1)))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "UNet3D": UNet3D,
    "YNet3D": YNet3D,
    "EncoderClassifier": EncoderClassifier,
}


def build_model(config: Mapping) -> nn.Module:
    """Rebuild a network from its :meth:`config` (or a weights card holding those keys)."""
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    keys = {
        "UNet3D": ("in_channels", "out_channels", "widths", "final_activation"),
        "YNet3D": ("in_channels", "out_channels", "widths", "final_activation", "num_classes", "head_channels"),
        "EncoderClassifier": ("in_channels", "widths", "num_outputs", "dropout"),
    }[arch]
    kwargs = {k: config[k] for k in keys if k in config}
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    return cls(**kwargs)


def _encoder_of(model: nn.Module) -> Encoder3D:
    if isinstance(model, Encoder3D):
        return model
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, Encoder3D):
        raise TypeError(f"{type(model).__name__} has no Models Genesis encoder (an `encoder: Encoder3D` attribute)")
    return encoder


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's parameters and BatchNorm buffers, keyed relative to the encoder (e.g. ``levels.0.0.0.weight``).

    Works for :class:`UNet3D`, :class:`YNet3D`, :class:`EncoderClassifier` and a bare :class:`Encoder3D`; the
    tensors are detached CPU copies.
    """
    return {k: v.detach().cpu().clone() for k, v in _encoder_of(model).state_dict().items()}


def load_encoder(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load encoder weights (from :func:`encoder_state_dict`, or a whole-model state dict) into ``model``'s encoder.

    Keys may be relative to the encoder or carry an ``encoder.`` prefix (a full model's state dict: keys outside
    the encoder are then ignored).

    Returns:
        (missing, unexpected) encoder keys; with ``strict=True`` either being non-empty raises ``ValueError``,
        and so does a shape mismatch in any case.
    """
    encoder = _encoder_of(model)
    prefixed = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    own = prefixed if prefixed else dict(state)
    expected = encoder.state_dict()
    missing = sorted(k for k in expected if k not in own)
    unexpected = sorted(k for k in own if k not in expected)
    if strict and (missing or unexpected):
        raise ValueError(
            f"encoder weights do not fit {type(model).__name__}: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    for k, v in own.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"encoder weight {k!r} has shape {tuple(v.shape)} but {type(model).__name__} expects "
                f"{tuple(expected[k].shape)} (different widths?)"
            )
    encoder.load_state_dict({k: v for k, v in own.items() if k in expected}, strict=False)
    return missing, unexpected


def card_path(path: str | Path) -> Path:
    """The JSON card next to a weights file: ``x.safetensors`` → ``x.json``."""
    return Path(path).with_suffix(".json")


def save_weights(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, card: Mapping) -> Path:
    """Write ``model``'s state dict (or a state dict, e.g. :func:`encoder_state_dict`) as safetensors plus a card.

    The card (``path`` with suffix ``.json``) is ``card`` (e.g. the cube size, the pre-training recipe) completed
    with the model's :meth:`config` when ``model`` is a network, the format tag, the tensor count and the number
    of parameter values (BatchNorm running statistics excluded). Returns the path of the weights file.
    """
    path = Path(path)
    if isinstance(model, nn.Module):
        state = model.state_dict()
        info = dict(model.config()) if hasattr(model, "config") else {"architecture": type(model).__name__}
    else:
        state = dict(model)
        info = {}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    full_card = {
        **info,
        **dict(card),
        "format": CARD_FORMAT,
        "num_tensors": len(tensors),
        "num_parameters": int(sum(v.numel() for k, v in tensors.items() if not k.endswith(buffers))),
    }
    text = json.dumps(full_card, indent=2, sort_keys=True)  # fails early on a card that is not JSON-able
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "card_format": CARD_FORMAT})
    card_path(path).write_text(text + "\n")
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weights file written by :func:`save_weights`: (state dict of CPU tensors, card).

    Only safetensors and JSON are read (nothing is unpickled). A missing or unreadable file raises
    :class:`WeightsError` naming it.
    """
    path = Path(path)
    cpath = card_path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist")
    if not cpath.is_file():
        raise WeightsError(f"{cpath}: the card of {path.name} does not exist")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        card = json.loads(cpath.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{cpath}: not a readable JSON card ({err})") from None
    if not isinstance(card, dict):
        raise WeightsError(f"{cpath}: the card must be a JSON object, got {type(card).__name__}")
    return state, card


def to_device(x: torch.Tensor, device: torch.device | str, *, channels_last: bool = False) -> torch.Tensor:
    """Move a tensor; 5-D volumes (B, C, D, H, W) optionally in ``channels_last_3d`` memory format, which makes the
    3-D convolutions of the miniature U-Net about 1.5× faster on CPU (oneDNN's preferred layout)."""
    if channels_last and x.dim() == 5:
        return x.to(device, memory_format=torch.channels_last_3d)
    return x.to(device)


def place(model: nn.Module, device: torch.device | str, *, channels_last: bool = False) -> nn.Module:
    """Move a network (in place) to ``device``, its 5-D conv weights in ``channels_last_3d`` when asked."""
    return model.to(device, memory_format=torch.channels_last_3d) if channels_last else model.to(device)
