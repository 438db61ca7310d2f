"""BigSSL speed: Conformer encoder training throughput against transformers' Wav2Vec2-Conformer encoder at a
matched size, log-mel feature extraction against transformers' feature extractors, and espeak-ng/flite synthesis.

1. **Conformer encoder, forward + backward** (no optimizer step: the step is elementwise per parameter and the
   parameter counts nearly match). Both encoders run in train mode with every dropout and LayerDrop at 0, float32,
   on the same thread count, fed the *same* (B, T', d) hidden states with the same valid mask (lengths from T' down
   to 0.8·T', as in a length-bucketed batch), so the convolutional subsampling is not part of the comparison:
   ``Conformer.blocks(x, valid)`` against ``Wav2Vec2ConformerEncoder(x, attention_mask=valid)``. The loss is the
   mean square of the outputs at valid frames. A further row times our whole encoder from 80-bin log-mel features
   (the 4x subsampling front end included), for reference. Matched: hidden size, layers, heads, FFN size, depthwise
   kernel, activation (SiLU/"swish" in FFN and conv module), macaron ½-FFN, BatchNorm in the conv module.
   Positions: our ``relative`` against HF ``relative`` (both Transformer-XL: sinusoidal relative encodings, a
   ``linear_pos`` projection and the learned biases u, v); our ``none`` against HF ``position_embeddings_type=None``
   (plain attention, the exact counterpart; HF's ``rotary`` is not timed). HF runs with its ``eager`` and its
   ``sdpa`` attention (``sdpa`` is what ``from_pretrained`` picks). Known differences: HF's encoder builds a
   positional-conv embedding (kernel 128, 16 groups) that its forward never calls, so it is left out of the
   "used" parameter count; HF's conv-module convolutions have no bias, ours have; HF adds a final LayerNorm
   after the blocks; HF's BatchNorm and depthwise convolution see padded frames, ours zero them and take the
   batch statistics over valid frames only (a little extra work for ours); we recompute the relative sinusoids
   in every layer, HF caches them.
   Throughput is reported in encoder frames/s (the valid sequence positions T' after 4x subsampling, 40 ms each)
   and in 10 ms input feature frames/s (the valid log-mel frames those positions come from, 4·T'+3 each);
   100 feature frames are one second of audio. FLOPs are counted with ``FlopCounterMode`` on one fwd+bwd of each
   implementation with the math SDPA backend forced (the CPU flash kernel is invisible to the counter), and shown
   as achieved GFLOP/s and as a share of this CPU's measured fp32 matmul peak. Peak memory is each candidate's
   fwd+bwd peak RSS above its resting RSS, measured in a fresh subprocess.
2. **Feature extraction**: a batch of 16 utterances of 5 s at 16 kHz, in seconds of audio per second. Ours
   (``LogMel``: torch.stft, 80 HTK mel bins) batched and per utterance (as the recipe's feature cache calls it);
   ``WhisperFeatureExtractor`` (80-bin log-mel, torch.stft when torch is importable) with ``padding="longest"``
   and with its default padding to 30 s (the audio-seconds count only the real 5 s); ``SeamlessM4TFeatureExtractor``
   (80-bin Kaldi fbank in numpy, per-utterance normalisation, stride-2 stacking). Both peers are built from their
   default configs, offline; a peer that fails to construct is skipped.
3. **Synthesis**: ``thrifty.data.speech.synthesize`` over 40 sentences with 1 and 2 worker threads, for espeak-ng
   and flite voices that are installed (utterances/s and audio seconds/s, resampling to 16 kHz included).

    python benchmarks/bigssl_speed.py                 # mini encoder (d=144, 4 layers, B=8, T'=150 = 6 s)
    python benchmarks/bigssl_speed.py --sizes mini base xl-1layer
    python benchmarks/bigssl_speed.py --quick         # fewer rounds, no memory subprocesses, 12 sentences
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_mb, interleaved, isolated, matmul_peak_gflops, peak_rss_mb, reset_peak_rss, table
from thrifty.methods.bigssl.features import SAMPLE_RATE, LogMel
from thrifty.methods.bigssl.model import Conformer

N_MELS = 80
SIZES = {
    # the card's "quick" miniature: 6 s of audio per utterance
    "mini": {"dim": 144, "layers": 4, "heads": 4, "ffn": 576, "kernel": 15, "batch": 8, "frames": 150},
    # Conformer-M-like width, 12 layers
    "base": {"dim": 256, "layers": 12, "heads": 4, "ffn": 1024, "kernel": 31, "batch": 8, "frames": 150},
    # one layer at the XL/XXL width of *Pushing the Limits* (8 heads, kernel 5)
    "xl-1layer": {"dim": 1024, "layers": 1, "heads": 8, "ffn": 4096, "kernel": 5, "batch": 4, "frames": 150},
}
# candidate key -> (label, positions, implementation)
CANDIDATES = {
    "ours-rel": ("thrifty Conformer.blocks, relative", "relative", "ours"),
    "hf-rel-eager": ("HF Wav2Vec2ConformerEncoder, relative, eager", "relative", "eager"),
    "hf-rel-sdpa": ("HF Wav2Vec2ConformerEncoder, relative, sdpa", "relative", "sdpa"),
    "ours-rel-frontend": ("thrifty Conformer incl. subsampling from 80-mel, relative", "relative", "ours-full"),
    "ours-none": ("thrifty Conformer.blocks, positions none", "none", "ours"),
    "hf-none-eager": ("HF Wav2Vec2ConformerEncoder, positions None, eager", "none", "eager"),
    "hf-none-sdpa": ("HF Wav2Vec2ConformerEncoder, positions None, sdpa", "none", "sdpa"),
}
GROUPS = {"relative": ["ours-rel", "hf-rel-eager", "hf-rel-sdpa", "ours-rel-frontend"]}
GROUPS["none"] = ["ours-none", "hf-none-eager", "hf-none-sdpa"]


# --- encoder ---------------------------------------------------------------------------------------------------


def inputs(s: dict) -> dict[str, torch.Tensor]:
    """The shared batch: hidden states (B, T', d), valid (B, T'), and the log-mel features that subsample to it."""
    g = torch.Generator().manual_seed(0)
    b, t = s["batch"], s["frames"]
    lengths = torch.linspace(t, round(0.8 * t), b).round().long()
    valid = torch.arange(t)[None, :] < lengths[:, None]
    x = torch.randn(b, t, s["dim"], generator=g)
    feat_lengths = 4 * lengths + 3  # ⌊(⌊(L−3)/2⌋+1−3)/2⌋+1 = L' for L = 4L'+3
    feats = torch.randn(b, 4 * t + 3, N_MELS, generator=g)
    return {"x": x, "valid": valid, "lengths": lengths, "feats": feats, "feat_lengths": feat_lengths}


def hf_encoder(s: dict, positions: str, impl: str) -> torch.nn.Module:
    from transformers import Wav2Vec2ConformerConfig
    from transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer import Wav2Vec2ConformerEncoder

    cfg = Wav2Vec2ConformerConfig(
        hidden_size=s["dim"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        conv_depthwise_kernel_size=s["kernel"],
        position_embeddings_type="relative" if positions == "relative" else None,
        hidden_act="swish",
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        conformer_conv_dropout=0.0,
        layerdrop=0.0,
    )
    cfg._attn_implementation = impl
    return Wav2Vec2ConformerEncoder(cfg)


def build(key: str, s: dict, data: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The module and a closure running one fwd+bwd that returns the (detached) output."""
    _, positions, impl = CANDIDATES[key]
    torch.manual_seed(0)
    valid = data["valid"]
    n_valid = valid.sum()

    def loss_of(y: torch.Tensor) -> torch.Tensor:
        return (y.square().mean(-1) * valid).sum() / n_valid

    if impl.startswith("ours"):
        m = Conformer(
            n_mels=N_MELS,
            dim=s["dim"],
            num_layers=s["layers"],
            num_heads=s["heads"],
            ffn_dim=s["ffn"],
            kernel_size=s["kernel"],
            dropout=0.0,
            positions=positions,
        )
        if impl == "ours-full":

            def forward() -> torch.Tensor:
                return m(data["feats"], data["feat_lengths"]).hidden
        else:

            def forward() -> torch.Tensor:
                return m.blocks(data["x"].clone(), valid)
    else:
        m = hf_encoder(s, positions, impl)

        def forward() -> torch.Tensor:  # HF zeroes padded frames of its input in place: give it a copy
            return m(data["x"].clone(), attention_mask=valid).last_hidden_state

    m.train()

    def step() -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        y = forward()
        loss_of(y).backward()
        return y.detach()

    return m, step


def used_params(m: torch.nn.Module, key: str) -> int:
    if key.startswith("ours"):
        skip = () if key.endswith("frontend") else ("subsample.",)
    else:
        skip = ("pos_conv_embed.",)  # built by HF's encoder, never called in its forward
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))


def count_flops(step: Callable[[], torch.Tensor]) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def child(key: str, size: str, threads: int) -> None:
    """Peak RSS of one candidate's fwd+bwd above its resting RSS, in a fresh process."""
    if threads:
        torch.set_num_threads(threads)
    s = SIZES[size]
    _, step = build(key, s, inputs(s))
    reset_peak_rss()
    before = current_rss_mb()
    for _ in range(2):
        step()
    print(json.dumps({"peak_delta_mb": peak_rss_mb() - before}))


def bench_encoder(size: str, args: argparse.Namespace, peak: float) -> None:
    s = SIZES[size]
    data = inputs(s)
    enc_frames = int(data["lengths"].sum())
    feat_frames = int(data["feat_lengths"].sum())
    print(
        f"\n== Conformer encoder fwd+bwd, size {size}: d={s['dim']}, {s['layers']} layers, {s['heads']} heads, "
        f"ffn {s['ffn']}, kernel {s['kernel']}; B={s['batch']}, T'={s['frames']} "
        f"({s['frames'] * 0.04:.0f} s), {enc_frames}/{s['batch'] * s['frames']} positions valid =="
    )
    problems = []
    for group, keys in GROUPS.items():
        steps, mods, skipped = {}, {}, {}
        for key in keys:
            try:
                m, step = build(key, s, data)
                y = step()
                bad = [n for n, p in m.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
                if not y.isfinite().all() or bad:
                    problems.append(f"{key}: non-finite {'output' if not y.isfinite().all() else 'grads ' + bad[0]}")
                steps[key], mods[key] = step, m
            except Exception as err:  # a peer that does not run with this transformers build
                skipped[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        times = interleaved(steps, warmup=1, rounds=args.rounds)
        mem = {}
        for key in steps:
            if args.quick:
                mem[key] = float("nan")
                continue
            try:
                mem[key] = isolated("bigssl_speed", key, size, str(args.threads))["peak_delta_mb"]
            except Exception:
                mem[key] = float("nan")
        ours_key = keys[0]
        rows = []
        for key, t in times.items():
            f = count_flops(steps[key])
            rows.append(
                [
                    CANDIDATES[key][0],
                    f"{used_params(mods[key], key) / 1e6:.3f}M",
                    f"{sum(p.numel() for p in mods[key].parameters()) / 1e6:.3f}M",
                    enc_frames / t,
                    feat_frames / t,
                    t / times[ours_key],
                    f / 1e9,
                    f / t / 1e9,
                    100 * f / t / 1e9 / peak,
                    mem[key],
                ]
            )
        print(f"\npositions: {group}")
        headers = ["implementation", "params used", "params built", "enc frames/s", "10ms frames/s", "time / ours"]
        print(table(rows, [*headers, "GFLOP/step", "GFLOP/s", "% matmul peak", "peak MiB"]))
        for key, why in skipped.items():
            print(f"skipped {CANDIDATES[key][0]}: {why}")
        for key in times:
            if key.startswith("hf"):
                print(f"  ours / {key}: {times[key] / times[ours_key]:.2f}x frames/s (blocks only, matched size)")
    print("numerics: " + ("outputs and gradients finite for every candidate" if not problems else "; ".join(problems)))


# --- feature extraction ------------------------------------------------------------------------------------------


def bench_features(args: argparse.Namespace) -> None:
    n, seconds = 16, 5.0
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32) for _ in range(n)]
    batch = np.stack(waves)
    logmel = LogMel()

    def ours_batched() -> None:
        with torch.inference_mode():
            logmel(torch.from_numpy(batch))

    def ours_each() -> None:
        with torch.inference_mode():
            for w in waves:
                logmel(torch.from_numpy(w))

    fns: dict[str, Callable[[], object]] = {
        "thrifty LogMel, batch of 16 (torch.stft)": ours_batched,
        "thrifty LogMel, one utterance at a time (as the recipe)": ours_each,
    }
    skipped = {}
    try:
        from transformers import WhisperFeatureExtractor

        whisper = WhisperFeatureExtractor()
        fns["HF WhisperFeatureExtractor, padding='longest' (torch.stft)"] = lambda: whisper(
            waves, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="longest"
        )
        if not args.quick:
            fns["HF WhisperFeatureExtractor, default pad to 30 s"] = lambda: whisper(
                waves, sampling_rate=SAMPLE_RATE, return_tensors="np"
            )
    except Exception as err:
        skipped["WhisperFeatureExtractor"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    try:
        from transformers import SeamlessM4TFeatureExtractor

        seamless = SeamlessM4TFeatureExtractor()
        fns["HF SeamlessM4TFeatureExtractor (numpy fbank)"] = lambda: seamless(
            waves, sampling_rate=SAMPLE_RATE, return_tensors="np"
        )
    except Exception as err:
        skipped["SeamlessM4TFeatureExtractor"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    for name, fn in list(fns.items()):
        try:
            fn()
        except Exception as err:
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
            del fns[name]
    times = interleaved(fns, warmup=1, rounds=max(3, args.rounds - 2))
    ref = times["thrifty LogMel, batch of 16 (torch.stft)"]
    rows = [[k, n * seconds / t, t * 1e3, t / ref] for k, t in times.items()]
    print(f"\n== log-mel feature extraction: {n} utterances x {seconds:.0f} s at {SAMPLE_RATE} Hz, 80 bins ==")
    print(table(rows, ["extractor", "audio s/s", "ms / batch", "time / ours batched"]))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


# --- synthesis ---------------------------------------------------------------------------------------------------

_FALLBACK = [
    "the quick brown fox jumps over the lazy dog",
    "now is the winter of our discontent made glorious summer",
    "in the beginning was the word and the word was with god",
    "a journey of a thousand miles begins with a single step",
    "all that glitters is not gold often have you heard that told",
    "you will be successful in your work if you keep on trying",
]


def bench_synthesis(args: argparse.Namespace) -> None:
    from thrifty.data.speech import Voice, flite_voices, sentences, synthesize

    count = 12 if args.quick else 40
    try:
        texts = sentences()[:count]
    except Exception as err:  # a text corpus package not installed
        print(f"(shipped sentences unavailable: {type(err).__name__}; using built-in sentences)")
        texts = [_FALLBACK[i % len(_FALLBACK)] for i in range(count)]
    voices: dict[str, list] = {}
    if shutil.which("espeak-ng"):
        voices["espeak-ng (en-us, en-gb; 150-190 wpm)"] = [
            Voice.espeak(a, speed=sp) for a, sp in (("en-us", 150), ("en-gb", 190), ("en-us", 175))
        ]
    if shutil.which("flite") and flite_voices():
        voices[f"flite ({flite_voices()[0]})"] = [Voice.flite(flite_voices()[0])]
    print(f"\n== synthesis: {len(texts)} sentences, 16 kHz, resampling included ==")
    if not voices:
        print("skipped: neither espeak-ng nor flite is installed")
        return
    rows = []
    for name, vs in voices.items():
        jobs = [(t, vs[i % len(vs)]) for i, t in enumerate(texts)]
        synthesize(*jobs[0])  # warm the engine's files and the voice listings
        for workers in (1, 2):
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                audio = list(pool.map(lambda j: synthesize(*j), jobs))
            dt = time.perf_counter() - t0
            secs = sum(len(a) for a in audio) / SAMPLE_RATE
            rows.append([name, workers, len(jobs) / dt, secs / dt, secs / len(jobs)])
    print(table(rows, ["engine", "workers", "utterances/s", "audio s/s", "mean utterance s"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["mini"], choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds (default 7, 3 with --quick)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no memory subprocesses, 12 sentences")
    ap.add_argument("--skip", nargs="*", default=[], choices=["encoder", "features", "synthesis"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    args.rounds = args.rounds or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    peak = matmul_peak_gflops()["peak"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s")
    if "encoder" not in args.skip:
        for size in args.sizes:
            bench_encoder(size, args, peak)
    if "features" not in args.skip:
        bench_features(args)
    if "synthesis" not in args.skip:
        bench_synthesis(args)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
