"""Temporal gradient speed: training clips/s of the recipe's arms (supervised, FixMatch, TG-full) and achieved FLOP/s
against this CPU's fp32 matmul peak; our R3D-18 against MONAI's 3D ResNet-18 at the same widths; inference of the RGB
network alone against the two-stream forward; the data pipeline's share of a TG step; PyAV decoding frames/s.

    python benchmarks/temporal_gradient_speed.py                  # the miniature (8 x 32², widths 8..64, 8 + 8 clips)
                                                                  # and the release's widths 64..512 at 8 x 112² (2 + 2)
    python benchmarks/temporal_gradient_speed.py --sizes mini     # under a minute
    python benchmarks/temporal_gradient_speed.py --sizes full --threads 2 --rounds 5

Tables, per size:

1. Training step (``compute_loss`` + backward + gradient clipping + SGD, as ``train_unit`` runs it) on one batch drawn
   by ``draw_step``. Clips per step count the labelled clips plus the weak and the strong unlabelled views, as the
   recipe's cost table does; TG-full runs each of them through both streams.
2. Peer: ``R3D18`` + ``I3DHead`` against MONAI's ``ResNet(block="basic", layers=[2, 2, 2, 2])`` at the same widths,
   cross-entropy + SGD. MONAI repeats an int ``conv1_t_size`` / ``conv1_t_stride`` over all three axes, so the literal
   ``conv1_t_size=3, conv1_t_stride=1`` builds a 3x3x3 stem of stride 1 (every later map 2x larger in H and W, ~4x
   the FLOPs); the row with ``conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2)`` has our stem. What still differs
   (``R3D18`` follows MMAction2's ``ResNet3d`` as the release configures it): MONAI's max-pool after the stem is
   3x3x3 with stride 2 on every axis, so its layer1 runs at T/2, while ours pools 1x3x3 (stride 1, 2, 2) and halves
   T only after layer1 (``pool2``, 2x1x1), so our layer1 costs twice MONAI's; MONAI's projection shortcuts have a
   bias (``bias_downsample=True``); its BN eps is 1e-5 (ours 1e-3); its head has no dropout (ours 0.5).
3. Inference clips/s: ``model(x)`` (RGB backbone + head, what ``predict`` runs), the exported RGB-only model
   (``drop_training_branches``), and ``forward_streams`` (both backbones, all heads).
4. Data pipeline of one TG-full step, each piece on the step's labelled + unlabelled videos (strong views: unlabelled
   only), in ms and as a share of the TG-full optimisation step of table 1. Inputs are uint8 noise videos of the
   size's raw frames (mini: 16 x 32², as the synthetic data; full: 64 x 128², a short side of 128 cropped to 112).
5. Decoding (once, after the sizes): a 64-frame clip written with ``write_video`` (libx264, CRF 18) at 32² and
   112², then ``read_video`` of every frame and of 8 sampled frames (``indices``: it decodes up to the last one).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from common import flops_of, interleaved, matmul_peak_gflops
from thrifty.data.video import read_video, sample_clip_indices, write_video
from thrifty.methods.temporal_gradient import augment, tg
from thrifty.methods.temporal_gradient.config import TemporalGradientConfig
from thrifty.methods.temporal_gradient.data import (
    StepClips,
    TGData,
    VideoSet,
    draw_step,
    frame_indices,
    normalised,
    to_float,
    two_streams,
    weak_views,
)
from thrifty.methods.temporal_gradient.model import R3D18, I3DHead, count_parameters
from thrifty.methods.temporal_gradient.train import ARM_SPECS, build_model, compute_loss

SIZES = {
    "mini": dict(widths=(8, 16, 32, 64), proj_dim=64, classes=10, raw_frames=16, raw_side=32, clip_len=8, interval=2,
                 crop=32, labelled=8, unlabelled=8, crop_area=(0.5, 1.0), flip_p=0.0),
    "full": dict(widths=(64, 128, 256, 512), proj_dim=512, classes=101, raw_frames=64, raw_side=128, clip_len=8,
                 interval=8, crop=112, labelled=2, unlabelled=2, crop_area=(0.08, 1.0), flip_p=0.5),
}  # fmt: skip
ARMS = ("supervised", "fixmatch_03", "tg_full")
POOL = 16  # videos in the stand-in training split
DECODE_SIDES = (32, 112)
DECODE_FRAMES = 64


def make_cfg(size: dict) -> TemporalGradientConfig:
    cfg = TemporalGradientConfig()
    d, m = cfg.data, cfg.model
    d.synthetic.num_frames, d.synthetic.size = size["raw_frames"], size["raw_side"]
    d.clip_len, d.frame_interval, d.crop_size = size["clip_len"], size["interval"], size["crop"]
    d.crop_area, d.flip_p = list(size["crop_area"]), size["flip_p"]
    d.labelled_per_step, d.unlabelled_per_step = size["labelled"], size["unlabelled"]
    m.widths, m.proj_dim = list(size["widths"]), size["proj_dim"]
    cfg.optim.lr = 0.01  # small, so that repeated steps on one batch stay finite
    cfg.validate()
    return cfg


def stand_in_data(size: dict) -> TGData:
    """A training split of uint8 noise videos (N, F, H, W, 3); validation and test are never read here."""
    rng = np.random.default_rng(0)
    f, s = size["raw_frames"], size["raw_side"]
    videos = rng.integers(0, 256, (POOL, f, s, s, 3), dtype=np.uint8)
    labels = np.arange(POOL, dtype=np.int64) % size["classes"]
    names = [str(k) for k in range(size["classes"])]
    return TGData(class_names=names, train=VideoSet(videos, labels), val=None, test=None, seed=0, info={})


def train_steps(cfg: TemporalGradientConfig, size: dict, clips: StepClips) -> dict[str, tuple[Callable[[], None], int]]:
    """arm -> (one optimisation step as ``train_unit`` runs it, clips per step)."""
    out = {}
    o = cfg.optim
    for arm in ARMS:
        spec = ARM_SPECS[arm]
        torch.manual_seed(0)
        model = build_model(cfg, spec, size["classes"])
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

        def step(model=model, opt=opt, spec=spec) -> None:
            model.train()
            loss = compute_loss(spec, model, clips, cfg, cfg.max_steps - 1).total  # past the pseudo-label warm-up
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            opt.step()

        out[arm] = (step, size["labelled"] + (2 * size["unlabelled"] if spec.unlabelled else 0))
    return out


def peer_nets(size: dict) -> dict[str, nn.Module]:
    w, k = list(size["widths"]), size["classes"]
    kw = dict(block="basic", layers=[2, 2, 2, 2], block_inplanes=w, spatial_dims=3, n_input_channels=3, num_classes=k)
    torch.manual_seed(0)
    return {
        "ours: R3D18 + I3DHead": nn.Sequential(R3D18(widths=w), I3DHead(in_dim=w[-1], num_classes=k)),
        "MONAI ResNet, stem 3×7×7 stride (1, 2, 2) (matched)": ResNet(
            **kw, conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2)
        ),
        "MONAI ResNet, conv1_t_size=3, conv1_t_stride=1 (stem 3×3×3 stride 1)": ResNet(
            **kw, conv1_t_size=3, conv1_t_stride=1
        ),
    }


def peer_table(size: dict, rounds: int) -> None:
    torch.manual_seed(0)
    n = size["labelled"] + size["unlabelled"]
    x = torch.randn(n, 3, size["clip_len"], size["crop"], size["crop"])
    y = torch.randint(0, size["classes"], (n,))
    nets = peer_nets(size)
    train, infer = {}, {}
    for name, net in nets.items():
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def train_step(net=net, opt=opt) -> None:
            net.train()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        @torch.inference_mode()
        def infer_step(net=net) -> None:
            net.eval()
            net(x)

        train[name], infer[name] = train_step, infer_step
    train_t = interleaved(train, warmup=2, rounds=rounds)
    infer_t = interleaved(infer, warmup=2, rounds=rounds)
    peer = "MONAI ResNet, stem 3×7×7 stride (1, 2, 2) (matched)"
    print(f"\nPeer: 3D ResNet-18 at widths {size['widths']}, batch {n} × {size['clip_len']} × {size['crop']}², "
          "cross-entropy + SGD; ratios against the matched MONAI row")  # fmt: skip
    print("| network | params | GFLOP/clip (fwd) | train clips/s | ours / peer (train) | infer clips/s | "
          "ours / peer (infer) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    ours = "ours: R3D18 + I3DHead"
    for name, net in nets.items():
        gf = flops_of(infer[name]) / n / 1e9
        tr, inf = train_t[name], infer_t[name]
        print(f"| {name} | {count_parameters(net) / 1e6:.3f}M | {gf:.3g} | {n / tr:.1f} | {tr / train_t[ours]:.2f} | "
              f"{n / inf:.1f} | {inf / infer_t[ours]:.2f} |")  # fmt: skip
    print(f"ours / matched MONAI: {train_t[peer] / train_t[ours]:.2f}× training clips/s, "
          f"{infer_t[peer] / infer_t[ours]:.2f}× inference clips/s "
          "(\"ours / peer\": our clips/s over the row's)")  # fmt: skip


def inference_table(cfg: TemporalGradientConfig, size: dict, clips: StepClips, rounds: int) -> None:
    torch.manual_seed(0)
    model = build_model(cfg, ARM_SPECS["tg_full"], size["classes"]).eval()
    exported = copy.deepcopy(model).drop_training_branches().eval()
    x, x_tg = torch.cat([clips.rgb_l, clips.rgb_uw]), torch.cat([clips.tg_l, clips.tg_uw])
    n = len(x)
    fns = {
        "RGB network: model(x) (what predict runs)": lambda: model(x),
        "exported RGB-only model (drop_training_branches)": lambda: exported(x),
        "both streams: model(x, x_tg) (training forward)": lambda: model(x, x_tg),
    }
    params = {
        "RGB network: model(x) (what predict runs)": count_parameters(exported),
        "exported RGB-only model (drop_training_branches)": count_parameters(exported),
        "both streams: model(x, x_tg) (training forward)": count_parameters(model),
    }
    with torch.inference_mode():
        t = interleaved(fns, warmup=2, rounds=rounds)
        flops = {k: flops_of(fn) for k, fn in fns.items()}
    rgb = "RGB network: model(x) (what predict runs)"
    print(f"\nInference (eval mode, batch {n}): the RGB network alone against the two-stream forward")
    print("| forward | params used | GFLOP/clip | clips/s | time / RGB network |")
    print("|---|---|---|---|---|")
    for name in fns:
        print(f"| {name} | {params[name] / 1e6:.3f}M | {flops[name] / n / 1e9:.3g} | {n / t[name]:.1f} | "
              f"{t[name] / t[rgb]:.2f} |")  # fmt: skip


def pipeline_table(
    cfg: TemporalGradientConfig, size: dict, data: TGData, step_s: float, rounds: int, gen: torch.Generator
) -> None:
    n_l, n_u = size["labelled"], size["unlabelled"]
    n = n_l + n_u
    labelled = np.arange(POOL)
    counter = itertools.count(1)
    video = to_float(data.train.videos[:n])  # (n, 3, F, H, W)
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(frame_indices(n, video.shape[2], cfg, context=1, rng=rng, test_mode=False)[:, 0])
    rgb, motion = two_streams(video, idx, "tg")
    rgb_w, tg_w = weak_views(rgb, motion, cfg, gen)
    rgb_s, tg_s = augment.strong_augment_pair(rgb_w[n_l:], tg_w[n_l:], generator=gen)
    g = (idx - 1)[:, None, :, None, None].expand(n, 3, idx.shape[1], *video.shape[-2:])

    def draw(unlabelled: bool) -> StepClips:
        return draw_step(data, labelled, cfg, seed=0, step=next(counter), rank=0, world=1, gen=gen,
                         unlabelled=unlabelled)  # fmt: skip

    whole = "draw_step, TG-full (the whole pipeline)"
    fns = {
        whole: lambda: draw(True),
        "draw_step, supervised (labelled clips only)": lambda: draw(False),
        "uint8 → float videos (to_float)": lambda: to_float(data.train.videos[:n]),
        "RGB frames alone (gather_frames)": lambda: tg.gather_frames(video, idx - 1),
        "RGB + TG (two_streams)": lambda: two_streams(video, idx, "tg"),
        "the same RGB frames, unchecked torch.gather": lambda: torch.gather(video, 2, g),
        "shared crop + flip, both streams (weak_views)": lambda: weak_views(rgb, motion, cfg, gen),
        "strong_augment_pair (unlabelled clips)": lambda: augment.strong_augment_pair(
            rgb_w[n_l:], tg_w[n_l:], generator=gen
        ),
        "normalise the weak and strong views": lambda: [normalised(v) for v in (rgb_w, tg_w, rgb_s, tg_s)],
    }
    t = interleaved(fns, warmup=2, rounds=rounds)
    print(f"\nData pipeline per TG-full step ({n_l} labelled + {n_u} unlabelled videos of {video.shape[2]} × "
          f"{video.shape[-1]}², clips {size['clip_len']} × {size['crop']}²; "
          "strong views of the unlabelled only)")  # fmt: skip
    print("| piece | ms/step | % of the TG-full optimisation step | % of draw_step |")
    print("|---|---|---|---|")
    for name in fns:
        print(f"| {name} | {1e3 * t[name]:.2f} | {100 * t[name] / step_s:.1f}% | {100 * t[name] / t[whole]:.0f}% |")
    tg_only = t["RGB + TG (two_streams)"] - t["RGB frames alone (gather_frames)"]
    print(f"TG on the fly costs {1e3 * tg_only:.2f} ms per step over gathering RGB alone "
          f"({100 * tg_only / step_s:.1f}% of the optimisation step); the whole draw_step is "
          f"{100 * t[whole] / (t[whole] + step_s):.0f}% of a step that includes it")  # fmt: skip


def test_video(side: int) -> np.ndarray:
    """A moving sinusoid grating and a moving bright square: (64, side, side, 3) uint8, compressible like video."""
    t = np.arange(DECODE_FRAMES, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    frames = 0.5 + 0.4 * np.sin(2 * np.pi * (xx / 16 + yy / 23 + t / 12))
    frames = np.repeat(frames[..., None], 3, axis=-1) * np.array([1.0, 0.8, 0.6], dtype=np.float32)
    k = max(side // 6, 2)
    for i in range(DECODE_FRAMES):
        y0, x0 = (i * 2) % (side - k), (i * 3) % (side - k)
        frames[i, y0 : y0 + k, x0 : x0 + k] = 1.0
    return (frames * 255).astype(np.uint8)


def decode_table(rounds: int) -> None:
    idx8 = sample_clip_indices(DECODE_FRAMES, clip_len=8, interval=8, test_mode=True)[0]  # 1, 9, ..., 57
    early = sample_clip_indices(DECODE_FRAMES, clip_len=8, interval=2, test_mode=True)[0]  # the miniature's spacing
    reads = {
        "read_video, every frame": None,
        f"read_video(indices=8 frames, {idx8[0]}..{idx8[-1]} every 8)": idx8,
        "read_video(indices=the 8 frames and their predecessors, for TG)": np.stack([idx8 - 1, idx8]),
        f"read_video(indices=8 frames, {early[0]}..{early[-1]} every 2)": early,
    }
    print(f"\nDecoding with PyAV: a {DECODE_FRAMES}-frame clip written by write_video (libx264, CRF 18, yuv420p)")
    print("| side | call | ms/call | frames returned | frames decoded | returned frames/s | decoded frames/s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for side in DECODE_SIDES:
            frames = test_video(side)
            path = Path(tmp) / f"clip{side}.mp4"
            write_video(path, frames)
            fns: dict[str, Callable[[], object]] = {
                name: (lambda ix=ix, path=path: read_video(path, indices=ix)) for name, ix in reads.items()
            }
            out = Path(tmp) / f"written{side}.mp4"
            fns["write_video (encode)"] = lambda frames=frames, out=out: write_video(out, frames)
            t = interleaved(fns, warmup=1, rounds=rounds)
            for name, ix in [*reads.items(), ("write_video (encode)", None)]:
                returned = DECODE_FRAMES if ix is None else int(np.size(ix))
                decoded = DECODE_FRAMES if ix is None else int(np.max(ix)) + 1
                print(f"| {side}² | {name} | {1e3 * t[name]:.2f} | {returned} | {decoded} | {returned / t[name]:.0f} | "
                      f"{decoded / t[name]:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()["peak"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s")
    for size_name in args.sizes:
        size = SIZES[size_name]
        cfg = make_cfg(size)
        data = stand_in_data(size)
        gen = torch.Generator().manual_seed(0)
        clips = draw_step(data, np.arange(POOL), cfg, seed=0, step=1, rank=0, world=1, gen=gen, unlabelled=True)
        steps = train_steps(cfg, size, clips)
        t = interleaved({k: v[0] for k, v in steps.items()}, warmup=2, rounds=args.rounds)
        print(f"\n{size_name}: R3D-18 widths {size['widths']}, clips {size['clip_len']} × {size['crop']}², "
              f"{size['labelled']} labelled + {size['unlabelled']} unlabelled videos per step")  # fmt: skip
        print("| arm | clips/step | train ms/step | train clips/s | × supervised (clips/s) | GFLOP/step | "
              "train GFLOP/s | % of matmul peak |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        sup_cps = steps["supervised"][1] / t["supervised"]
        for arm, (step, n) in steps.items():
            flops = flops_of(step)
            gflops = flops / t[arm] / 1e9
            print(f"| {arm} | {n} | {1e3 * t[arm]:.1f} | {n / t[arm]:.1f} | {n / t[arm] / sup_cps:.2f} | "
                  f"{flops / 1e9:.3g} | {gflops:.1f} | {100 * gflops / peak:.1f}% |")  # fmt: skip
        peer_table(size, args.rounds)
        inference_table(cfg, size, clips, args.rounds)
        pipeline_table(cfg, size, data, t["tg_full"], args.rounds, gen)
    decode_table(args.rounds)


if __name__ == "__main__":
    main()
