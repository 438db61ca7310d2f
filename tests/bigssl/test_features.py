"""BigSSL front end: HTK mel scale and filterbank, log-mel over torch.stft, global normalisation and SpecAugment.

Every reference is computed independently in the test (the HTK formula and triangular filters written as plain
loops, a naive O(n²) DFT of one reflect-padded, Hann-windowed frame), never copied out of the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thrifty.methods.bigssl.features import (
    LogMel,
    Normalizer,
    SpecAugmentConfig,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    num_frames,
    spec_augment,
)

SR, NFFT, HOPLEN, NMELS = 16000, 400, 160, 80


# ------------------------------------------------------------------------------------------------ references
def htk_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def htk_hz(mel: float) -> float:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_points(n_mels: int = NMELS, f_min: float = 0.0, f_max: float = SR / 2) -> list[float]:
    """The n_mels + 2 edge/centre frequencies (Hz), equally spaced on the HTK mel scale."""
    lo, hi = htk_mel(f_min), htk_mel(f_max)
    return [htk_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]


def loop_filterbank(n_mels: int = NMELS, n_fft: int = NFFT, sr: int = SR) -> np.ndarray:
    """Triangular filters, one value at a time: (n_fft // 2 + 1, n_mels)."""
    pts = mel_points(n_mels, 0.0, sr / 2)
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lower, centre, upper = pts[m], pts[m + 1], pts[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if lower < f <= centre:
                fb[k, m] = (f - lower) / (centre - lower)
            elif centre < f < upper:
                fb[k, m] = (upper - f) / (upper - centre)
    return fb


def naive_log_mel_frame(wave: np.ndarray, t: int) -> np.ndarray:
    """Frame ``t`` of a centred STFT (reflect padding n_fft//2), periodic Hann, naive DFT, HTK mel, log(x+1e-6)."""
    padded = np.pad(wave.astype(np.float64), NFFT // 2, mode="reflect")
    n = np.arange(NFFT)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / NFFT)  # periodic: denominator N, not N-1
    frame = padded[t * HOPLEN : t * HOPLEN + NFFT] * window
    power = np.zeros(NFFT // 2 + 1)
    for k in range(NFFT // 2 + 1):
        angle = -2.0 * np.pi * k * n / NFFT
        re, im = float(np.sum(frame * np.cos(angle))), float(np.sum(frame * np.sin(angle)))
        power[k] = re * re + im * im
    return np.log(power @ loop_filterbank() + 1e-6)


# ------------------------------------------------------------------------------------------------ mel scale
def test_htk_mel_known_values_and_round_trip():
    assert float(hz_to_mel(0.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(hz_to_mel(1000.0)) == pytest.approx(999.985, abs=1e-2)  # 2595·log10(1 + 1000/700)
    assert float(hz_to_mel(1000.0)) == pytest.approx(htk_mel(1000.0), rel=1e-12)
    assert float(hz_to_mel(8000.0)) == pytest.approx(htk_mel(8000.0), rel=1e-12)
    assert float(mel_to_hz(htk_mel(440.0))) == pytest.approx(440.0, rel=1e-12)
    hz = np.linspace(0.0, 8000.0, 97)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, rtol=1e-10, atol=1e-9)
    mel = np.linspace(0.0, 2840.0, 53)
    np.testing.assert_allclose(hz_to_mel(mel_to_hz(mel)), mel, rtol=1e-10, atol=1e-9)
    assert np.all(np.diff(hz_to_mel(hz)) > 0)  # strictly increasing


# ------------------------------------------------------------------------------------------------ filterbank
def test_filterbank_matches_loop_reference():
    fb = mel_filterbank()
    assert fb.shape == (NFFT // 2 + 1, NMELS) and fb.dtype == torch.float32
    np.testing.assert_allclose(fb.double().numpy(), loop_filterbank(), atol=1e-6)


def test_filterbank_triangles_support_and_peaks():
    fb = mel_filterbank().double().numpy()
    pts = mel_points()
    freqs = np.arange(NFFT // 2 + 1) * SR / NFFT
    assert fb.min() >= 0.0 and fb.max() <= 1.0 + 1e-6
    for m in range(NMELS):
        lower, centre, upper = pts[m], pts[m + 1], pts[m + 2]
        outside = (freqs <= lower + 1e-9) | (freqs >= upper - 1e-9)
        assert np.all(fb[outside, m] <= 1e-6), m  # zero outside the neighbours' centres (float round-off at 8 kHz)
        assert np.all(fb[~outside, m] > 0.0), m  # positive strictly inside
        assert np.any(~outside), m  # no empty filter at n_fft 400
        k = int(np.argmax(fb[:, m]))
        assert abs(freqs[k] - centre) <= SR / NFFT, m  # the peak sits in a bin next to the centre
        if centre - lower > SR / NFFT and upper - centre > SR / NFFT:
            assert fb[k, m] > 0.5, m  # a filter wider than a bin on both sides reaches at least half height
        inside = np.flatnonzero(~outside)
        rising, falling = inside[freqs[inside] <= centre], inside[freqs[inside] >= centre]
        assert np.all(np.diff(fb[rising, m]) > 0) and np.all(np.diff(fb[falling, m]) < 0), m


def test_filterbank_peaks_reach_one_on_a_fine_grid():
    """With a fine frequency grid the bin nearest each centre is within one grid step of the apex (height 1)."""
    n_fft = 8192
    fb = mel_filterbank(n_fft=n_fft).double().numpy()
    pts = mel_points()
    step = SR / n_fft
    for m in range(NMELS):
        half = min(pts[m + 1] - pts[m], pts[m + 2] - pts[m + 1])
        assert fb[:, m].max() >= 1.0 - step / half - 1e-6
        assert fb[:, m].max() <= 1.0 + 1e-6


def test_filterbank_matches_librosa_htk():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=SR, n_fft=NFFT, n_mels=NMELS, htk=True, norm=None)  # (n_mels, n_freqs)
    np.testing.assert_allclose(mel_filterbank().numpy(), ref.T, atol=1e-5)


# ------------------------------------------------------------------------------------------------ LogMel
@pytest.mark.parametrize("samples", [201, 400, 1599, 1600, 1601, 12345, 16000])
def test_logmel_frame_count(samples):
    out = LogMel()(torch.randn(samples))
    assert out.shape == (1 + samples // HOPLEN, NMELS)
    assert num_frames(samples) == 1 + samples // HOPLEN
    assert torch.equal(num_frames(torch.tensor([samples])), torch.tensor([1 + samples // HOPLEN]))
    assert torch.isfinite(out).all()


def test_logmel_sine_peaks_in_the_bin_nearest_1khz():
    t = np.arange(SR) / SR
    wave = torch.from_numpy(np.sin(2 * np.pi * 1000.0 * t).astype(np.float32))
    mel = LogMel()(wave)
    centres = np.array(mel_points()[1:-1])
    expected = int(np.argmin(np.abs(centres - 1000.0)))
    middle = mel[5:-5]  # away from the reflect-padded edges
    assert torch.all(middle.argmax(dim=1) == expected)
    # and a 3 kHz tone moves the peak up accordingly
    wave3 = torch.from_numpy(np.sin(2 * np.pi * 3000.0 * t).astype(np.float32))
    expected3 = int(np.argmin(np.abs(centres - 3000.0)))
    assert torch.all(LogMel()(wave3)[5:-5].argmax(dim=1) == expected3)


def test_logmel_values_match_naive_dft():
    rng = np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal(3200) + 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(3200) / SR)).astype(np.float32)
    mel = LogMel()(torch.from_numpy(wave)).double().numpy()
    for t in (0, 7, mel.shape[0] - 1):  # the first and last frames exercise the reflect padding
        np.testing.assert_allclose(mel[t], naive_log_mel_frame(wave, t), atol=1e-3, rtol=1e-4)


def test_logmel_silence_is_log_eps():
    mel = LogMel()(torch.zeros(800))
    np.testing.assert_allclose(mel.numpy(), math.log(1e-6), rtol=1e-6)


def test_logmel_batched_equals_per_utterance():
    torch.manual_seed(0)
    waves = torch.randn(3, 4000)
    lm = LogMel()
    batched = lm(waves)
    assert batched.shape == (3, 1 + 4000 // HOPLEN, NMELS)
    for i in range(3):
        torch.testing.assert_close(batched[i], lm(waves[i]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ Normalizer
def test_normalizer_standardises_training_features():
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 5.0, NMELS)
    offset = torch.linspace(-14.0, 3.0, NMELS)
    feats = [torch.randn(n, NMELS, generator=g) * scale + offset for n in (37, 120, 5, 64)]
    norm = Normalizer.fit(feats)
    allf = torch.cat(feats).double()
    torch.testing.assert_close(norm.mean.double(), allf.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.std.double(), allf.std(0, unbiased=False), atol=1e-5, rtol=1e-5)
    z = norm(torch.cat(feats)).double()
    torch.testing.assert_close(z.mean(0), torch.zeros(NMELS, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(NMELS, dtype=torch.float64), atol=1e-4, rtol=0)
    assert set(norm.state()) == {"mean", "std"}


def test_normalizer_constant_bin_stays_finite():
    feats = [torch.randn(50, NMELS), torch.randn(30, NMELS)]
    for f in feats:
        f[:, 3] = math.log(1e-6)  # a silent bin: zero variance
    norm = Normalizer.fit(feats)
    assert torch.isfinite(norm.std).all() and (norm.std > 0).all()
    z = norm(torch.cat(feats))
    assert torch.isfinite(z).all()
    assert z[:, 3].abs().max() < 1.0


def test_normalizer_rejects_no_frames():
    with pytest.raises(ValueError):
        Normalizer.fit([torch.zeros(0, NMELS)])


# ------------------------------------------------------------------------------------------------ SpecAugment
def positive_batch(lengths: list[int], t_max: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that are never 0 (so zeros are masks) with distinct padding values."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(len(lengths), t_max, NMELS, generator=g) + 1.0
    for i, n in enumerate(lengths):
        feats[i, n:] = -7.0 - i
    return feats, torch.tensor(lengths)


def test_spec_augment_does_not_modify_input_and_keeps_padding():
    feats, lengths = positive_batch([100, 64, 17], 100)
    before = feats.clone()
    cfg = SpecAugmentConfig(time_warp=5)
    out = spec_augment(feats, lengths, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(feats, before)
    assert out.shape == feats.shape
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(out[i, n:], before[i, n:])  # the padded frames stay what they were
    assert (out == 0).any()


def test_frequency_masks_zero_whole_bands_within_length():
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=27, time_masks_per_frame=0.0)
    lengths = [90, 40, 12]
    seen_masked = 0
    for seed in range(40):
        feats, lens = positive_batch(lengths, 90, seed)
        out = spec_augment(feats, lens, cfg, generator=torch.Generator().manual_seed(seed))
        for i, n in enumerate(lengths):
            zero = out[i, :n] == 0
            cols = zero[0]
            assert torch.equal(zero, cols.expand_as(zero))  # the same bins are zero at every valid frame
            assert torch.equal(out[i, :n][:, ~cols], feats[i, :n][:, ~cols])  # and nothing else changed
            idx = torch.nonzero(cols).flatten().tolist()
            runs = [r for r in np.split(np.array(idx), np.where(np.diff(idx) != 1)[0] + 1) if len(r)]
            assert len(runs) <= 2  # two masks (possibly overlapping or adjacent)
            assert int(cols.sum()) <= 2 * 27
            assert all(len(r) <= 2 * 27 for r in runs)
            assert torch.equal(out[i, n:], feats[i, n:])
            seen_masked += int(cols.any())
    assert seen_masked > 0


def zeroed_rows(x: torch.Tensor) -> torch.Tensor:
    return (x == 0).all(dim=-1)


@pytest.mark.parametrize("length", [20, 50, 100, 250, 400, 1000])
def test_adaptive_time_mask_bounds(length):
    cfg = SpecAugmentConfig(freq_masks=0, time_masks_per_frame=0.04, max_time_masks=10, time_mask_ratio=0.05)
    n_masks = min(10, (4 * length) // 100)  # exact integer floor of 0.04·L
    width = (5 * length) // 100  # exact integer floor of 0.05·L
    pad = 7
    counts = []
    for seed in range(30):
        feats, lens = positive_batch([length], length + pad, seed)
        out = spec_augment(feats, lens, cfg, generator=torch.Generator().manual_seed(seed))
        rows = zeroed_rows(out[0, :length])
        partly = (out[0, :length] == 0).any(-1)
        assert torch.equal(rows, partly)  # time masks zero whole frames
        assert torch.equal(out[0, :length][~rows], feats[0, :length][~rows])
        assert torch.equal(out[0, length:], feats[0, length:])
        counts.append(int(rows.sum()))
    assert max(counts) <= n_masks * width
    if length == 20:
        assert n_masks == 0 and max(counts) == 0  # 0.04·20 < 1: no time mask at all
    if length >= 250:
        assert max(counts) > 0
    if length == 1000:
        # the masks scale with the utterance: more frames are masked than the whole budget of a 100-frame one
        assert max(counts) > min(10, 4) * 5


def test_time_masks_scale_with_length():
    cfg = SpecAugmentConfig(freq_masks=0)
    mean_frac = {}
    for length in (100, 400):
        fr = []
        for seed in range(40):
            feats, lens = positive_batch([length], length, seed)
            out = spec_augment(feats, lens, cfg, generator=torch.Generator().manual_seed(seed))
            fr.append(float(zeroed_rows(out[0]).float().mean()))
        mean_frac[length] = sum(fr) / len(fr)
    # 100 frames: ≤4 masks of ≤5 frames; 400 frames: ≤10 masks of ≤20 frames → a larger masked fraction
    assert mean_frac[400] > mean_frac[100] > 0


def test_spec_augment_is_deterministic_under_a_seeded_generator():
    feats, lens = positive_batch([120, 80], 120)
    cfg = SpecAugmentConfig(time_warp=4)
    a = spec_augment(feats, lens, cfg, generator=torch.Generator().manual_seed(123))
    b = spec_augment(feats, lens, cfg, generator=torch.Generator().manual_seed(123))
    c = spec_augment(feats, lens, cfg, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("w", [2, 5, 10])
def test_time_warp_is_a_bounded_monotone_warp(w):
    """On a ramp x[t] = t the warped values are the source coordinates φ(t) of each output frame."""
    length, pad = 120, 5
    cfg = SpecAugmentConfig(freq_masks=0, time_masks_per_frame=0.0, time_warp=w)
    ramp = torch.arange(length + pad, dtype=torch.float32)[:, None].repeat(1, NMELS)[None]
    ramp[0, length:] = -1.0
    moved = 0
    for seed in range(25):
        out = spec_augment(ramp, torch.tensor([length]), cfg, generator=torch.Generator().manual_seed(seed))
        assert out.shape == ramp.shape
        assert torch.equal(out[0, length:], ramp[0, length:])
        phi = out[0, :length, 0]
        assert torch.equal(out[0, :length], phi[:, None].expand(length, NMELS))  # the same warp for every bin
        assert torch.all(phi[1:] >= phi[:-1] - 1e-4)  # monotone
        assert float(phi.min()) >= -1e-4 and float(phi.max()) <= length - 1 + 1e-4
        t = torch.arange(length, dtype=torch.float32)
        assert float((phi - t).abs().max()) <= w + 0.5 + 1e-4  # no frame moves further than the warp distance
        assert abs(float(phi[0])) <= 1e-4  # the first and last frames stay in place
        assert abs(float(phi[-1]) - (length - 1)) <= 1e-4
        moved += int(not torch.allclose(phi, t))
    assert moved > 0


def test_time_warp_skips_short_utterances():
    cfg = SpecAugmentConfig(freq_masks=0, time_masks_per_frame=0.0, time_warp=5)
    feats, lens = positive_batch([11], 11)  # 11 ≤ 2·5 + 1: nothing to warp
    out = spec_augment(feats, lens, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, feats)


def test_logmel_rejects_a_waveform_too_short_for_the_centred_stft():
    with pytest.raises(ValueError, match="samples"):
        LogMel()(torch.randn(200))
    assert LogMel()(torch.randn(201)).shape == (num_frames(201), 80)
