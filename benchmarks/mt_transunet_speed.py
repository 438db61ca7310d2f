"""MT-TransUNet speed: training and inference images/s of the recipe's network against a MONAI peer of matched size,
achieved FLOP/s against this CPU's fp32 matmul peak, peak RSS, and the per-batch cost of the data pipeline.

1. **Networks.** A training step is forward + loss + backward + Adam step on one prepared batch (half the images
   with masks, as the two-stream sampler draws them); inference is a forward in ``eval`` mode under
   ``inference_mode``. Candidates, timed in alternation (shuffled each round, median of ``--rounds``):

   * ``ours``: ``MTTransUNet`` in ``channels_last`` (model and input, as ``train.py`` runs it) with the paper's
     loss (arm ``seg+cls+dual``: CE_seg + 5·L_sdf + L_cons + 0.25·CE_cls, ramp at 1), through ``compute_loss``;
   * ``ours, seg+cls loss``: the same network with the peer's loss (CE_seg + 0.25·CE_cls), so the two differ
     only in the network;
   * ``ours, NCHW``: the paper's step without ``channels_last``;
   * ``peer`` (the reference of the × columns): MONAI's ``ViT`` (``spatial_dims=2``, ``classification=True``: a
     CLS token and a linear class head) with ``num_layers`` and ``patch_size`` set to ours, and UNETR's decoder
     built from MONAI's own ``UnetrBasicBlock`` / ``UnetrPrUpBlock`` / ``UnetrUpBlock`` / ``UnetOutBlock``,
     wired as ``monai.networks.nets.UNETR`` wires them, with one decoder level per 2x of the patch size (3 at
     patch 8, 4 at patch 16, the shipped UNETR's count); the skips are tapped after layers k·L/levels (UNETR's
     3, 6, 9 of 12). Loss CE_seg + 0.25·CE_cls. Why not ``UNETR`` itself: in monai 1.6 its depth is fixed at 12
     (``self.num_layers = 12``) and its patch size at 16 (a 4x4 token grid at 64²), so it can match neither our 4
     layers nor our 8x8 grid. Built this way with 12 layers and patch 16 it has the shipped UNETR's modules and
     parameter count (but for the q/k/v biases, which the peer keeps on to match ours);
   * ``peer, channels_last``: the same in ``channels_last``;
   * ``MONAI UNETR as shipped``: ``UNETR(spatial_dims=2)`` at our width, heads and MLP size with MONAI's defaults
     otherwise (12 layers, patch 16, instance norm, learned position embedding, no q/k/v bias, no CLS token);
     loss CE_seg only. For reference: it is not the matched peer.

   Matched between ours and the peer: input size, batch, Transformer width / heads / MLP size / depth, token grid
   (plus one CLS token), q/k/v biases, no position embedding (ours: the release's ``pos_embed="none"``; the peer:
   ``pos_embed_type="none"``), BatchNorm in the convolutions, dropout (0 in the miniature, 0.1 at ``full`` as the
   preset). UNETR's ``feature_size`` (``--peer-feature-size``) is 8 in the miniature: decoder widths 32/16/8 at 1/4,
   1/2, 1 as ours, 0.553 M parameters against our 0.595 M, 0.135 against 0.137 forward GFLOP per image. At ``full``
   it is 32 (widths 256/128/64/32 against our 256/128/64/16): 34.5 M parameters against our 48.4 M, 30.7 against 35.3
   forward GFLOP per image; our R50 stem holds many parameters at low resolution, and the parameter-matched feature
   size 64 (46.4 M) would cost 85 GFLOP per image, 2.4x ours, with 64 channels at full resolution. Left different, by
   design of the two architectures: ours tokenises with a CNN stem (three stride-2 conv stages in the miniature, the
   R50 hybrid at ``full``) whose stages are the decoder's skips, the peer tokenises with one ``patch_size``
   convolution and derives its skips from intermediate Transformer layers through transposed convolutions; ours has
   two extra heads (SDF at full resolution, deep supervision on the token grid) and computes the attention maps
   explicitly to return them (so does MONAI's ``SABlock`` with ``use_flash_attention=False``, its default); the
   peer's dropout (``full`` only) also drops attention weights. Hence the FLOPs per image differ: the table prints
   them. FLOPs are counted with ``FlopCounterMode`` on one training step (and one inference forward); GFLOP/s is the
   step's count over its median time, shown as a share of this CPU's measured fp32 matmul peak.
   Peak RSS: each candidate in a fresh process, the kernel's peak mark reset after one warm step, then two
   steps: the process's peak RSS, and the rise over its resting RSS.

2. **Pipeline** (per training batch, ``timeit`` medians): ``augment()`` (crop + flips of images and masks),
   ``normalised_sdf`` of the masked half's masks, the whole ``make_batch`` (both, plus the ``channels_last``
   copy), and ``dermoscopy.generate`` images/s (the synthetic data is drawn once per run and cached, so it is not
   a per-step cost). The first three are also shown as a share of our training step.

MONAI's ``ViT`` needs ``einops``; without it the peer rows are skipped with a note.

    python benchmarks/mt_transunet_speed.py                  # the miniature: 64², batch 16
    python benchmarks/mt_transunet_speed.py --full           # + R50-ViT-B/16 (4 layers) at 224², batch 2
    python benchmarks/mt_transunet_speed.py --quick          # 2 rounds, short pipeline timings (checks it runs)
    python benchmarks/mt_transunet_speed.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    flops_of,
    fmt_or_dash,
    fmt_rate,
    interleaved,
    isolated,
    matmul_peak_gflops,
    peak_rss_mb,
    step_memory,
    timeit,
)
from thrifty.data.dermoscopy import generate, normalised_sdf
from thrifty.methods.mt_transunet.augment import augment
from thrifty.methods.mt_transunet.config import CLASSES, ModelConfig, MTTransUNetConfig
from thrifty.methods.mt_transunet.data import lesion_set
from thrifty.methods.mt_transunet.losses import seg_ce
from thrifty.methods.mt_transunet.model import build_model, count_parameters
from thrifty.methods.mt_transunet.train import ARM_SPECS, Batch, compute_loss, make_batch

SEED = 0
SIZES: dict[str, dict[str, Any]] = {
    # the quick miniature: conv stem 16/32/64 -> 8x8 tokens, ViT 96 x 4 layers, 4 heads, MLP 384, decoder 32/16/8
    "mini": {
        "image_size": 64,
        "batch": 16,
        "model": {},
        "peer": {"patch": 8, "hidden": 96, "mlp": 384, "heads": 4, "layers": 4, "feature_size": 8},
        "stock": {"hidden": 96, "mlp": 384, "heads": 4, "feature_size": 16},
        "dropout": 0.0,
        "generate": 32,
    },
    # the full preset: R50-ViT-B/16 with the release's 4 layers, decoder 256/128/64/16, 14x14 tokens at 224²
    "full": {
        "image_size": 224,
        "batch": 2,
        "model": {
            "backbone": "r50_vit_b16",
            "dim": 768,
            "num_layers": 4,
            "num_heads": 12,
            "mlp_dim": 3072,
            "decoder_channels": [256, 128, 64, 16],
            "dropout": 0.1,
        },
        "peer": {"patch": 16, "hidden": 768, "mlp": 3072, "heads": 12, "layers": 4, "feature_size": 32},
        "stock": {"hidden": 768, "mlp": 3072, "heads": 12, "feature_size": 16},
        "dropout": 0.1,
        "generate": 4,
    },
}
# key -> label; "peer" is the reference of the ratio columns
CANDIDATES = {
    "ours": "ours MTTransUNet, channels_last, paper's loss (seg+cls+dual)",
    "ours-segcls": "ours MTTransUNet, channels_last, seg+cls loss (the peer's)",
    "ours-nchw": "ours MTTransUNet, NCHW, paper's loss",
    "peer": "MONAI ViT + UNETR decoder (matched), NCHW, seg+cls loss",
    "peer-cl": "MONAI ViT + UNETR decoder (matched), channels_last",
    "unetr": "MONAI UNETR as shipped (12 layers, patch 16), NCHW, seg loss",
}
NO_INFER = {"ours-segcls"}  # its inference is the "ours" row's


# --- the MONAI peer ---------------------------------------------------------------------------------------------


class MonaiViTUNETR(nn.Module):
    """MONAI's 2D ``ViT`` (CLS token, linear class head, no position embedding) with ``UNETR``'s decoder, both from
    MONAI's blocks, at a chosen depth and patch size. (B, 3, S, S) -> (seg logits (B, 2, S, S), class logits).

    ``levels = log2(patch)`` decoder levels: ``UnetrBasicBlock`` on the image (full resolution), ``levels - 1``
    ``UnetrPrUpBlock`` from Transformer layers k·layers/levels (up to 1/2 ... 1/(patch/2) resolution), and
    ``levels`` ``UnetrUpBlock`` from the final normed tokens back to full resolution, then ``UnetOutBlock``; the
    widths are ``feature_size · 2^k`` as in UNETR. With ``layers=12, patch=16`` this is the module list of
    ``monai.networks.nets.UNETR``.
    """

    def __init__(self, *, image_size: int, patch: int, hidden: int, mlp: int, heads: int, layers: int,
                 feature_size: int, dropout: float = 0.0, num_classes: int = len(CLASSES),
                 norm: str = "batch") -> None:  # fmt: skip
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
        from monai.networks.nets import ViT

        levels = int(math.log2(patch))
        if 2**levels != patch or image_size % patch:
            raise ValueError(f"patch {patch} must be a power of two dividing the image size {image_size}")
        f = feature_size
        self.grid, self.hidden = image_size // patch, hidden
        self.memory_format = torch.contiguous_format
        self.vit = ViT(in_channels=3, img_size=image_size, patch_size=patch, hidden_size=hidden, mlp_dim=mlp,
                       num_layers=layers, num_heads=heads, pos_embed_type="none", classification=True,
                       num_classes=num_classes, post_activation=None, dropout_rate=dropout, spatial_dims=2,
                       qkv_bias=True)  # fmt: skip
        self.taps = [k * layers // levels for k in range(1, levels)]
        common = {"spatial_dims": 2, "kernel_size": 3, "norm_name": norm, "res_block": True}
        self.encoder1 = UnetrBasicBlock(in_channels=3, out_channels=f, stride=1, **common)
        up = {"stride": 1, "upsample_kernel_size": 2, "conv_block": True, **common}
        self.encoders = nn.ModuleList(
            UnetrPrUpBlock(in_channels=hidden, out_channels=f * 2**k, num_layer=levels - 1 - k, **up)
            for k in range(1, levels)
        )
        widths = [f * 2**k for k in range(levels - 1, -1, -1)]
        self.decoders = nn.ModuleList(
            UnetrUpBlock(in_channels=ci, out_channels=co, upsample_kernel_size=2, **common)
            for ci, co in zip([hidden, *widths[:-1]], widths)
        )
        self.out = UnetOutBlock(spatial_dims=2, in_channels=f, out_channels=2)

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, hidden) -> (B, hidden, g, g), dropping the CLS token (UNETR's ``proj_feat``)."""
        b = tokens.shape[0]
        x = tokens[:, 1:].reshape(b, self.grid, self.grid, self.hidden).permute(0, 3, 1, 2)
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        t = vit.patch_embedding(x)
        t = torch.cat((vit.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        hidden_states = []
        for block in vit.blocks:
            t = block(t)
            hidden_states.append(t)
        t = vit.norm(t)
        skips = [enc(self._grid(hidden_states[i])) for enc, i in zip(self.encoders, self.taps)][::-1]
        skips.append(self.encoder1(x))
        y = self._grid(t)
        for dec, skip in zip(self.decoders, skips):
            y = dec(y, skip)
        return self.out(y), vit.classification_head(t[:, 0])


# --- candidates -------------------------------------------------------------------------------------------------


def model_config(size: dict) -> ModelConfig:
    return ModelConfig(**size["model"])


def prepared_batch(size: dict) -> Batch:
    """One training batch as the recipe makes it: synthetic lesions, first half with masks, augmented, SDF."""
    n, s = size["batch"], size["image_size"]
    arrays = generate(n, seed=SEED, size=s)
    arrays["has_mask"] = np.arange(n) < n // 2
    gen = torch.Generator().manual_seed(SEED)
    return make_batch(lesion_set(arrays), MTTransUNetConfig(), gen, torch.device("cpu"))


def build(key: str, size: dict, batch: Batch) -> tuple[nn.Module, Callable[[], None], Callable[[], None] | None]:
    """-> (model, train step, inference) of candidate ``key``."""
    torch.manual_seed(SEED)
    cfg = MTTransUNetConfig()
    s = size["image_size"]
    channels_last = key in ("ours", "ours-segcls", "peer-cl")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = batch.images.contiguous(memory_format=fmt)
    if key.startswith("ours"):
        model: nn.Module = build_model(model_config(size), num_classes=len(CLASSES), image_size=s)
        spec = ARM_SPECS["seg+cls" if key == "ours-segcls" else "seg+cls+dual"]
        b = Batch(images, batch.masks, batch.sdf, batch.has_mask, batch.labels)

        def loss_fn() -> torch.Tensor:
            return compute_loss(spec, model, b, cfg, ramp=1.0).total

    elif key.startswith("peer"):
        p = size["peer"]
        model = MonaiViTUNETR(image_size=s, patch=p["patch"], hidden=p["hidden"], mlp=p["mlp"], heads=p["heads"],
                              layers=p["layers"], feature_size=p["feature_size"], dropout=size["dropout"])  # fmt: skip
        model.memory_format = fmt

        def loss_fn() -> torch.Tensor:
            seg, cls = model(images)
            return seg_ce(seg, batch.masks, batch.has_mask) + cfg.loss.cls_weight * F.cross_entropy(cls, batch.labels)

    elif key == "unetr":
        from monai.networks.nets import UNETR

        p = size["stock"]
        model = UNETR(in_channels=3, out_channels=2, img_size=s, feature_size=p["feature_size"],
                      hidden_size=p["hidden"], mlp_dim=p["mlp"], num_heads=p["heads"], dropout_rate=size["dropout"],
                      spatial_dims=2)  # fmt: skip

        def loss_fn() -> torch.Tensor:
            return seg_ce(model(images), batch.masks, batch.has_mask)

    else:
        raise KeyError(key)
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)

    def train_step() -> None:
        model.train()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer() -> None:
        model.eval()
        model(images)

    return model, train_step, None if key in NO_INFER else infer


def tokens_of(key: str, size: dict, model: nn.Module) -> str:
    s = size["image_size"]
    if key.startswith("ours"):
        g = s // model.stride
    elif key.startswith("peer"):
        g = s // size["peer"]["patch"]
    else:
        g = s // 16
    layers = model.encoder.layers if key.startswith("ours") else model.vit.blocks
    cls = "" if key == "unetr" else "1+"
    return f"{cls}{g}x{g}, {len(layers)} layers"


def child(key: str, size_name: str, threads: int, steps: int, peer_feature_size: int) -> None:
    """Peak RSS of one candidate's training step in a fresh process."""
    if threads:
        torch.set_num_threads(threads)
    size = SIZES[size_name]
    size["peer"]["feature_size"] = peer_feature_size
    _, step, _ = build(key, size, prepared_batch(size))
    step()
    print(json.dumps(step_memory(step, steps=steps)))


# --- benchmark --------------------------------------------------------------------------------------------------


def bench_networks(size_name: str, args: argparse.Namespace, rounds: int, peak: float) -> dict[str, Any]:
    size = SIZES[size_name]
    n, s = size["batch"], size["image_size"]
    batch = prepared_batch(size)
    built, skipped = {}, {}
    for key in CANDIDATES:
        try:
            built[key] = build(key, size, batch)
        except Exception as err:  # e.g. MONAI's ViT without einops
            skipped[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:120]}"
    warmup = 1 if args.quick else 2
    train_t = interleaved({k: v[1] for k, v in built.items()}, warmup=warmup, rounds=rounds)
    infer_t = interleaved({k: v[2] for k, v in built.items() if v[2] is not None}, warmup=warmup, rounds=rounds)
    rows: dict[str, dict[str, Any]] = {}
    for key, (model, step, infer) in built.items():
        train_flops = flops_of(step)
        fwd_flops = flops_of(infer) if infer is not None else None
        mem = {"peak_mb": None, "delta_mb": None}
        if not args.no_memory:
            try:
                steps = "1" if args.quick else "2"
                fs = str(size["peer"]["feature_size"])
                mem = isolated("mt_transunet_speed", key, size_name, str(args.threads), steps, fs)
            except Exception as err:
                print(f"  (peak RSS of {key} not measured: {type(err).__name__})")
        rows[key] = {
            "label": CANDIDATES[key],
            "params": count_parameters(model),
            "tokens": tokens_of(key, size, model),
            "train_s": train_t[key],
            "train_img_s": n / train_t[key],
            "infer_img_s": n / infer_t[key] if key in infer_t else None,
            "fwd_gflop_per_img": fwd_flops / n / 1e9 if fwd_flops is not None else None,
            "train_gflop_per_img": train_flops / n / 1e9,
            "train_gflops": train_flops / train_t[key] / 1e9,
            "share_of_peak": train_flops / train_t[key] / 1e9 / peak,
            **mem,
        }
    ref = rows.get("peer")
    p, st = size["peer"], size["stock"]
    print(f"\n## {size_name}: {s}² images, batch {n} (half with masks); median of {rounds} interleaved rounds")
    print(f"peer: MONAI ViT(spatial_dims=2, patch {p['patch']}, hidden {p['hidden']}, mlp {p['mlp']}, heads "
          f"{p['heads']}, layers {p['layers']}, CLS token, no pos. embedding, qkv bias) + UNETR decoder "
          f"(feature_size {p['feature_size']}, batch norm); UNETR as shipped: feature_size {st['feature_size']}, "
          f"hidden {st['hidden']}, mlp {st['mlp']}, heads {st['heads']}, instance norm; "
          f"dropout {size['dropout']}")  # fmt: skip
    print("| network | params | tokens | train ms/step | train img/s | × peer | infer img/s | × peer | "
          "fwd GFLOP/img | train GFLOP/s | % of matmul peak | peak RSS MiB | step Δ MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        tr = f"{r['train_img_s'] / ref['train_img_s']:.2f}" if ref else "–"
        inf = fmt_rate(r["infer_img_s"]) if r["infer_img_s"] else "(as ours)"
        ir = f"{r['infer_img_s'] / ref['infer_img_s']:.2f}" if ref and r["infer_img_s"] else ""
        print(
            f"| {r['label']} | {r['params'] / 1e6:.3f}M | {r['tokens']} | {1e3 * r['train_s']:.1f} | "
            f"{fmt_rate(r['train_img_s'])} | {tr} | {inf} | {ir} | {fmt_or_dash(r['fwd_gflop_per_img'], '.3f')} | "
            f"{r['train_gflops']:.1f} | {100 * r['share_of_peak']:.1f}% | {fmt_or_dash(r['peak_mb'], '.0f')} | "
            f"{fmt_or_dash(r['delta_mb'], '.0f')} |"
        )
    for key, why in skipped.items():
        print(f"- skipped {CANDIDATES[key]}: {why}")
    if ref and "ours" in rows:
        o = rows["ours"]
        best = max((rows[k] for k in ("peer", "peer-cl") if k in rows), key=lambda r: r["train_img_s"])
        print(f"- ours/peer (paper's step in channels_last vs the matched peer in NCHW): train "
              f"{o['train_img_s'] / ref['train_img_s']:.2f}×, inference {o['infer_img_s'] / ref['infer_img_s']:.2f}×; "
              f"vs the peer's faster format: train {o['train_img_s'] / best['train_img_s']:.2f}×; parameters "
              f"{o['params'] / 1e6:.3f}M vs {ref['params'] / 1e6:.3f}M")  # fmt: skip
    return {"rows": rows, "skipped": skipped}


def bench_pipeline(size_name: str, args: argparse.Namespace, step_s: float | None) -> dict[str, Any]:
    size = SIZES[size_name]
    n, s = size["batch"], size["image_size"]
    cfg = MTTransUNetConfig()
    a = cfg.data.augment
    arrays = generate(n, seed=SEED, size=s)
    arrays["has_mask"] = np.arange(n) < n // 2
    part = lesion_set(arrays)
    masked = part.masks.numpy()[part.has_mask.numpy()].astype(np.uint8)
    gen = torch.Generator().manual_seed(SEED)
    reps = 3 if args.quick else 15
    n_gen = 4 if args.quick else size["generate"]

    def aug() -> None:
        augment(part.images, part.masks, generator=gen, crop_prob=a.crop_prob, crop_fraction=tuple(a.crop_fraction),
                flip=a.flip)  # fmt: skip

    times = {
        f"augment(), {n} images + masks": timeit(aug, warmup=1, repeats=reps),
        f"normalised_sdf, {len(masked)} mask{'s' if len(masked) != 1 else ''}": timeit(
            lambda: normalised_sdf(masked), warmup=1, repeats=reps
        ),
        "make_batch (augment + SDF + channels_last copy)": timeit(
            lambda: make_batch(part, cfg, gen, torch.device("cpu")), warmup=1, repeats=reps
        ),
    }
    gen_s = timeit(lambda: generate(n_gen, seed=SEED + 1, size=s), warmup=1 if not args.quick else 0,
                   repeats=max(1, reps // 3))  # fmt: skip
    print(f"\n### {size_name}: data pipeline per training batch ({s}², batch {n}); median of {reps}")
    print("| stage | ms/batch | % of our training step |")
    print("|---|---|---|")
    for name, t in times.items():
        share = f"{100 * t / step_s:.1f}%" if step_s else ""
        print(f"| {name} | {1e3 * t:.2f} | {share} |")
    print(f"- dermoscopy.generate: {n_gen / gen_s:.1f} images/s at {s}² ({1e3 * gen_s / n_gen:.1f} ms/image; drawn "
          "once per run and cached, not a per-step cost)")  # fmt: skip
    return {"ms": {k: 1e3 * v for k, v in times.items()}, "generate_images_per_s": n_gen / gen_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also the full preset (R50-ViT-B/16 at 224², batch 2)")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), help="sizes to run (default: mini; --full adds full)")
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds (default 7 mini / 3 full; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up, short pipeline timings")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    ap.add_argument("--peer-feature-size", type=int, default=0, help="UNETR feature_size of the matched peer "
                    "(default: 8 mini, 32 full)")  # fmt: skip
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        key, size_name, threads, steps, peer_feature_size = args.child
        child(key, size_name, int(threads), int(steps), int(peer_feature_size))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peer_feature_size:
        for size in SIZES.values():
            size["peer"]["feature_size"] = args.peer_feature_size
    sizes = args.sizes or ["mini"]
    if args.full and "full" not in sizes:
        sizes = [*sizes, "full"]
    t0 = time.perf_counter()
    peak = matmul_peak_gflops(seconds=0.3 if args.quick else 1.0)["peak"]
    import monai

    print(f"torch {torch.__version__}, monai {monai.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; fp32 matmul peak {peak:.1f} GFLOP/s")  # fmt: skip
    if args.quick:
        print("(--quick: few rounds and short pipeline timings; not for reporting)")
    out: dict[str, Any] = {"torch": torch.__version__, "monai": monai.__version__, "threads": torch.get_num_threads(),
                           "matmul_peak_gflops": peak, "quick": args.quick, "sizes": {}}  # fmt: skip
    for size_name in sizes:
        rounds = args.rounds or (2 if args.quick else 7 if size_name == "mini" else 3)
        nets = bench_networks(size_name, args, rounds, peak)
        ours = nets["rows"].get("ours")
        pipe = bench_pipeline(size_name, args, ours["train_s"] if ours else None)
        out["sizes"][size_name] = {"rounds": rounds, "networks": nets, "pipeline": pipe}
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MiB; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
