"""Front end of the BigSSL recipe: log-mel features and SpecAugment, in plain torch (no torchaudio).

* **Log-mel** (the card): 16 kHz audio → ``torch.stft`` (n_fft 400 = 25 ms, hop 160 = 10 ms, periodic Hann) →
  power spectrum → our own HTK mel filterbank (80 triangular bins, 0–8 kHz, area not normalised) →
  ``log(x + 1e-6)`` → global mean/variance normalisation with statistics of the training audio.
* **SpecAugment** (Park et al., arXiv 1904.08779; adaptive time masks from Park et al., arXiv 1912.05533):
  ``freq_masks`` masks of width U[0, F] on the mel axis, time masks whose number and maximum width scale with the
  utterance's length (``time_mask_ratio`` of the frames per mask, ``time_masks_per_frame`` × length masks, at most
  ``max_time_masks``), and an optional time warp. Masked values are set to 0, the mean of normalised features.
  The values are the card's unverified defaults (F=27, 2 frequency masks, masks ≤5% of the length, up to 10).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
LOG_EPS = 1e-6


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray | float:
    """HTK mel scale: 2595·log10(1 + f/700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray | float:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mel_filterbank(
    *,
    n_mels: int = N_MELS,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """Triangular HTK mel filters, shape (n_fft // 2 + 1, n_mels): filter m rises linearly from mel point m to m+1
    and falls to m+2, the ``n_mels + 2`` points equally spaced in mel between ``f_min`` and ``f_max``; peak 1."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    points = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, centre, upper = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    fb = np.clip(np.minimum(rising, falling), 0.0, None)  # (n_mels, n_freqs)
    return torch.from_numpy(fb.T.astype(np.float32))


class LogMel(torch.nn.Module):
    """Waveform (B, S) or (S,) float → log-mel (B, T, n_mels), T = 1 + S // hop (centred frames)."""

    def __init__(self, *, n_mels: int = N_MELS, n_fft: int = N_FFT, hop: int = HOP, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer(
            "fb", mel_filterbank(n_mels=n_mels, n_fft=n_fft, sample_rate=sample_rate), persistent=False
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        squeeze = wave.dim() == 1
        wave = wave[None] if squeeze else wave
        if wave.shape[-1] <= self.n_fft // 2:
            raise ValueError(f"a waveform needs more than {self.n_fft // 2} samples for log-mel, got {wave.shape[-1]}")
        spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (B, F, T)
        mel = torch.log(torch.matmul(power.transpose(1, 2), self.fb) + LOG_EPS)  # (B, T, n_mels)
        return mel[0] if squeeze else mel


def num_frames(num_samples: int | torch.Tensor, *, hop: int = HOP) -> int | torch.Tensor:
    """Frames of :class:`LogMel` for a waveform of ``num_samples`` (centred STFT)."""
    return 1 + num_samples // hop


@dataclasses.dataclass
class Normalizer:
    """Global per-bin mean and standard deviation of log-mel features (computed on training audio only)."""

    mean: torch.Tensor  # (n_mels,)
    std: torch.Tensor  # (n_mels,)

    @classmethod
    def fit(cls, feats: list[torch.Tensor]) -> Normalizer:
        """Statistics over every frame of ``feats`` (each (T, n_mels)), accumulated in float64."""
        total = sum(f.shape[0] for f in feats)
        if total == 0:
            raise ValueError("cannot fit feature statistics on zero frames")
        s = torch.stack([f.double().sum(0) for f in feats]).sum(0)
        s2 = torch.stack([f.double().square().sum(0) for f in feats]).sum(0)
        mean = s / total
        std = (s2 / total - mean.square()).clamp_min(1e-10).sqrt()
        return cls(mean.float(), std.float())

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}


@dataclasses.dataclass
class SpecAugmentConfig:
    """SpecAugment; widths in mel bins / frames of the 10 ms features (before subsampling)."""

    freq_masks: int = 2
    freq_width: int = 27
    time_masks_per_frame: float = 0.04
    max_time_masks: int = 10
    time_mask_ratio: float = 0.05
    time_warp: int = 0


def spec_augment(
    feats: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugmentConfig, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask a padded batch (B, T, n_mels) in place of a copy; masks stay within each utterance's length.

    Per utterance of length L: ``freq_masks`` masks of width U[0, freq_width]; ``min(max_time_masks,
    floor(time_masks_per_frame · L))`` time masks of width U[0, floor(time_mask_ratio · L)] (adaptive masking);
    with ``time_warp`` > 0 the frames are first warped: a point in [W, L−W) moves by U[−W, W] frames.
    """
    out = feats.clone()
    b, _, n_mels = out.shape
    g = generator

    def randint(high: int) -> int:  # U{0, …, high}
        return int(torch.randint(0, max(high, 0) + 1, (1,), generator=g))

    for i in range(b):
        length = int(lengths[i])
        if cfg.time_warp > 0 and length > 2 * cfg.time_warp + 1:
            out[i, :length] = _time_warp(out[i, :length], cfg.time_warp, g)
        for _ in range(cfg.freq_masks):
            width = randint(min(cfg.freq_width, n_mels))
            start = randint(n_mels - width)
            out[i, :length, start : start + width] = 0.0
        n_time = min(cfg.max_time_masks, math.floor(cfg.time_masks_per_frame * length))
        max_width = math.floor(cfg.time_mask_ratio * length)
        for _ in range(n_time):
            width = randint(max_width)
            start = randint(length - width)
            out[i, start : start + width] = 0.0
    return out


def _time_warp(x: torch.Tensor, w: int, g: torch.Generator | None) -> torch.Tensor:
    """Warp (L, C) in time: the frame at a random centre moves by up to ``w`` frames (piecewise-linear; the first
    and last frames stay in place, as in SpecAugment's sparse image warp)."""
    length = x.shape[0]
    centre = int(torch.randint(w, length - w, (1,), generator=g))
    target = centre + int(torch.randint(-w, w + 1, (1,), generator=g))
    target = min(max(target, 1), length - 1)
    left = F.interpolate(x[None, :centre].transpose(1, 2), size=target, mode="linear", align_corners=True)
    right = F.interpolate(x[None, centre:].transpose(1, 2), size=length - target, mode="linear", align_corners=True)
    return torch.cat([left, right], dim=2)[0].transpose(0, 1)
