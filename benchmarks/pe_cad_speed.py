"""PE CAD speed: stage-1 training and inference images/s of the miniature CNN and ViT against MONAI peers of matched
size, stage-2 exams/s of CC (BiGRU) and MIL, achieved FLOP/s against this CPU's fp32 matmul peak, peak RSS, and the
per-exam cost of scoring a DICOM exam (``thrifty score pe_cad``).

1. **Stage 1** (the ``quick`` preset: 64² three-slice stacks, batch 32). A training step is forward + BCE-with-logits
   + backward + Adam on one fixed batch (the recipe's augmentation is timed apart, in section 3, because it is the
   same for every network); inference is ``features`` + ``classify`` in ``eval`` mode under ``inference_mode`` at
   the recipe's ``eval_batch_size`` (256), what the feature stage and scoring run. Candidates, timed in alternation
   (shuffled each round, median of ``--rounds``):

   * ``cnn``: the recipe's ``SmallCNN`` (width 24, features 128; 0.268 M parameters), NCHW as ``train.py`` runs it;
   * ``cnn-cl``: the same in ``channels_last`` (model and input), a candidate optimisation;
   * ``resnet``: the CNN's peer (reference of its × columns), MONAI ``ResNet(block="basic", layers=[1, 1, 1, 1],
     block_inplanes=[24, 48, 72, 96], conv1_t_size=3, conv1_t_stride=2, no_max_pool=True, spatial_dims=2)``: the
     same stage widths, the same stride-16 map before global pooling, a linear head, 0.278 M parameters (+4%). It is
     a ResNet-10 with our widths: residual shortcuts and a second 3x3 conv at H/2 (layer 1), which our CNN leaves
     out (its docstring: ~35% of a step), so it costs 0.054 against 0.032 forward GFLOP per image;
   * ``resnet-flops``: MONAI ``ResNet`` with ``block_inplanes=[16, 32, 64, 128]``, otherwise the same: matched in
     FLOPs instead (0.032 GFLOP/image, 0.308 M parameters, +15%);
   * ``vit``: the recipe's ``SmallViT`` (MONAI ``ViT`` 2D, patch 8, hidden 96, 4 layers, 4 heads, MLP 384, no qkv
     bias, learnable positions, CLS token; 0.471 M parameters), through the recipe's ``features``/``classify``;
   * ``monai-vit``: the ViT's peer (reference of its × columns), MONAI's ``ViT(..., classification=True,
     num_classes=1, post_activation=None)`` with the same settings, called directly: the same network (but the
     unused cross-attention LayerNorm, 768 parameters, that ``SmallViT`` drops), so the ratio is what the wrapper
     costs.

2. **Stage 2** (``quick``: L = 64, BiGRU hidden 64, features 3 x 128, batch 8; ``--full``: also L = 192, hidden
   512, features 3 x 2048 as the release, at batch 8 instead of 64 so a CPU round stays short). Exams of 24-80 slices
   (the miniature's range; long ones resized to L, short ones padded) collated once with ``collate_exams``; a
   training step is forward + the RSNA-weighted BCE (image weight 0.0736 for ``cc`` / ``evit``, 0 for MIL, as
   ``train.stage2_unit``) + backward + Adam; inference is a forward over 64 exams (``evaluate_stage2`` reads chunks
   of 256). Kinds: ``cc`` (``PENet``), ``mil_attention``, ``mil_max`` (parameter-matched to CC), ``evit``.

3. **Pipeline** (``timeit`` medians): the stage-1 augmentation of one batch (share of the CNN's step); and scoring
   one synthetic exam (64², 48 slices) written as DICOM files: ``load_exam`` (decode, sort, rescale),
   ``preprocess_exam`` (window, lung box, resize), stage 1 (``ExamScorer.stage1``, preprocessing included), stage 2,
   and a feature-cache hit (digest of the files + ``.npz`` read), with randomly initialised networks of the quick
   sizes.

FLOPs are counted with ``FlopCounterMode`` (convolutions and matmuls, the GRU's included) on one training step and
one inference call; GFLOP/s is that count over the median time, shown as a share of the measured fp32 matmul peak.
Peak RSS: each training candidate in a fresh process, the kernel's peak mark reset after one warm step, then two
steps: the process's peak RSS, and the rise over its resting RSS.

    python benchmarks/pe_cad_speed.py                  # quick sizes, about 2 minutes on 2 cores
    python benchmarks/pe_cad_speed.py --full           # + the release's stage-2 size (L 192, hidden 512)
    python benchmarks/pe_cad_speed.py --quick          # 2 rounds, no memory subprocesses (checks it runs)
    python benchmarks/pe_cad_speed.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
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
from thrifty.core.nn import count_parameters
from thrifty.data import ctpa_synth
from thrifty.data.rsna_pe import load_exam, write_ct_series
from thrifty.methods.pe_cad.config import PECadConfig
from thrifty.methods.pe_cad.data import preprocess_exam
from thrifty.methods.pe_cad.losses import rsna_weighted_bce
from thrifty.methods.pe_cad.score import ExamScorer, exam_features
from thrifty.methods.pe_cad.stage1 import AugmentConfig, augment, build_backbone, stack_all
from thrifty.methods.pe_cad.stage2 import build_stage2, collate_exams

SEED = 0
IMAGE_SIZE, BATCH, EVAL_BATCH = 64, 32, 256
STAGE1 = {
    "cnn": "ours SmallCNN (w 24, D 128), NCHW",
    "cnn-cl": "ours SmallCNN, channels_last",
    "resnet": "MONAI ResNet basic [1,1,1,1], widths 24/48/72/96 (CNN peer)",
    "resnet-flops": "MONAI ResNet basic [1,1,1,1], widths 16/32/64/128 (FLOP-matched)",
    "vit": "ours SmallViT (MONAI ViT 2D, p8, 96 x 4)",
    "monai-vit": "MONAI ViT called directly, same settings (ViT peer)",
}
PEER_OF = {"cnn": "resnet", "cnn-cl": "resnet", "resnet": "resnet", "resnet-flops": "resnet", "vit": "monai-vit",
           "monai-vit": "monai-vit"}  # fmt: skip
VIT = {"patch_size": 8, "hidden_size": 96, "num_layers": 4, "num_heads": 4, "mlp_dim": 384}
STAGE2_SIZES: dict[str, dict[str, int]] = {
    "quick": {"seq_len": 64, "hidden": 64, "feature_dim": 128, "batch": 8, "infer_batch": 64},
    "full": {"seq_len": 192, "hidden": 512, "feature_dim": 2048, "batch": 8, "infer_batch": 16},
}
KINDS = ("cc", "mil_attention", "mil_max", "evit")
SLICE_TRAINED = ("cc", "evit")
IMAGE_WEIGHT = 0.0736


# --- stage 1 ----------------------------------------------------------------------------------------------------


class MonaiViTClassifier(nn.Module):
    """MONAI's 2D ``ViT`` with its CLS token and linear head, called directly: (N, 3, S, S) -> (N,) logits."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        self.vit = ViT(in_channels=3, img_size=(IMAGE_SIZE, IMAGE_SIZE), patch_size=(VIT["patch_size"],) * 2,
                       hidden_size=VIT["hidden_size"], mlp_dim=VIT["mlp_dim"], num_layers=VIT["num_layers"],
                       num_heads=VIT["num_heads"], proj_type="conv", pos_embed_type="learnable", classification=True,
                       num_classes=1, dropout_rate=0.0, spatial_dims=2, post_activation="none",
                       qkv_bias=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0][:, 0]


def stage1_model(key: str) -> nn.Module:
    torch.manual_seed(SEED)
    if key in ("cnn", "cnn-cl"):
        return build_backbone("small_cnn", image_size=IMAGE_SIZE, width=24, feature_dim=128)
    if key == "vit":
        return build_backbone("small_vit", image_size=IMAGE_SIZE, **VIT)
    if key == "monai-vit":
        return MonaiViTClassifier()
    from monai.networks.nets import ResNet

    widths = [24, 48, 72, 96] if key == "resnet" else [16, 32, 64, 128]
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=widths, spatial_dims=2, n_input_channels=3,
                  conv1_t_size=3, conv1_t_stride=2, no_max_pool=True, num_classes=1)  # fmt: skip


def stage1_batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images (32, 3, 64, 64), labels (32,), inference images (256, 3, 64, 64)): windowed synthetic slices."""
    spec = ctpa_synth.CTPASpec(size=IMAGE_SIZE, slices=(48, 48))
    slices, labels = [], []
    for i in range(6):
        ex = ctpa_synth.generate_exam(SEED, index=i, spec=spec)
        pre = preprocess_exam(ex.volume, size=IMAGE_SIZE, level=100.0, width=700.0, lung_crop=True)
        slices.append(stack_all(torch.from_numpy(pre["slices"]).float()))
        labels.append(torch.from_numpy(ex.slice_labels.astype(np.float32)))
    x, y = torch.cat(slices), torch.cat(labels)
    gen = torch.Generator().manual_seed(SEED)
    idx = torch.randperm(len(x), generator=gen)
    return x[idx[:BATCH]].contiguous(), y[idx[:BATCH]].contiguous(), x[idx[:EVAL_BATCH]].contiguous()


def build_stage1(key: str, x: torch.Tensor, y: torch.Tensor, xi: torch.Tensor):
    """-> (model, train step, inference) of a stage-1 candidate."""
    model = stage1_model(key)
    fmt = torch.channels_last if key == "cnn-cl" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x, xi = x.contiguous(memory_format=fmt), xi.contiguous(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    ours = key in ("cnn", "cnn-cl", "vit")

    def logits(inp: torch.Tensor) -> torch.Tensor:
        out = model(inp)
        return out if out.ndim == 1 else out[:, 0]

    def step() -> None:
        model.train()
        loss = F.binary_cross_entropy_with_logits(logits(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer() -> None:
        model.eval()
        if ours:  # what score_slices runs: penultimate features, then the head
            f = model.features(xi)
            torch.sigmoid(model.classify(f))
        else:
            torch.sigmoid(logits(xi))

    return model, step, infer


def bench_stage1(args: argparse.Namespace, rounds: int, peak: float) -> dict[str, Any]:
    x, y, xi = stage1_batches()
    built = {k: build_stage1(k, x, y, xi) for k in STAGE1}
    warmup = 1 if args.quick else 2
    train_t = interleaved({k: v[1] for k, v in built.items()}, warmup=warmup, rounds=rounds)
    infer_t = interleaved({k: v[2] for k, v in built.items()}, warmup=warmup, rounds=rounds)
    rows: dict[str, dict[str, Any]] = {}
    for key, (model, step, infer) in built.items():
        train_flops, fwd_flops = flops_of(step), flops_of(infer)
        mem = {"peak_mb": None, "delta_mb": None}
        if not args.no_memory:
            try:
                mem = isolated("pe_cad_speed", "stage1", key, str(args.threads), "2")
            except Exception as err:
                print(f"  (peak RSS of {key} not measured: {type(err).__name__})")
        rows[key] = {"label": STAGE1[key], "params": count_parameters(model), "train_s": train_t[key],
                     "train_img_s": BATCH / train_t[key], "infer_img_s": EVAL_BATCH / infer_t[key],
                     "fwd_gflop_per_img": fwd_flops / EVAL_BATCH / 1e9,
                     "train_gflops": train_flops / train_t[key] / 1e9, "infer_gflops": fwd_flops / infer_t[key] / 1e9,
                     **mem}  # fmt: skip
    print(f"\n## Stage 1: {IMAGE_SIZE}² three-slice stacks; train batch {BATCH} (forward + BCE + backward + Adam, no "
          f"augmentation), inference batch {EVAL_BATCH}; median of {rounds} interleaved rounds")  # fmt: skip
    print("| network | params | train ms/step | train img/s | × peer | infer img/s | × peer | fwd GFLOP/img | "
          "train GFLOP/s | train % of peak | infer % of peak | peak RSS MiB | step Δ MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        ref = rows[PEER_OF[key]]
        print(f"| {r['label']} | {r['params'] / 1e6:.3f}M | {1e3 * r['train_s']:.1f} | {fmt_rate(r['train_img_s'])} | "
              f"{r['train_img_s'] / ref['train_img_s']:.2f} | {fmt_rate(r['infer_img_s'])} | "
              f"{r['infer_img_s'] / ref['infer_img_s']:.2f} | {r['fwd_gflop_per_img']:.4f} | {r['train_gflops']:.1f} | "
              f"{100 * r['train_gflops'] / peak:.1f}% | {100 * r['infer_gflops'] / peak:.1f}% | "
              f"{fmt_or_dash(r['peak_mb'], '.0f')} | {fmt_or_dash(r['delta_mb'], '.0f')} |")  # fmt: skip
    c, v = rows["cnn"], rows["vit"]
    print(f"- CNN vs ViT (the recipe's arms, same batch): train {c['train_img_s'] / v['train_img_s']:.2f}x the ViT's "
          f"images/s ({1e3 * c['train_s']:.1f} vs {1e3 * v['train_s']:.1f} ms/step), inference "
          f"{c['infer_img_s'] / v['infer_img_s']:.2f}x")  # fmt: skip
    return {"rows": rows, "rounds": rounds}


# --- stage 2 ----------------------------------------------------------------------------------------------------


def stage2_batch(size: dict[str, int], n: int, seed: int):
    """``n`` exams of 24-80 slices with random features and labels, collated as the recipe collates them."""
    g = torch.Generator().manual_seed(seed)
    exams = []
    for _ in range(n):
        s = int(torch.randint(24, 81, (1,), generator=g))
        feats = torch.randn(s, size["feature_dim"], generator=g)
        slice_labels = (torch.rand(s, generator=g) < 0.1).float()
        exams.append((feats, slice_labels, (torch.rand(9, generator=g) < 0.3).float()))
    return collate_exams(exams, length=size["seq_len"])


def build_stage2_candidate(kind: str, size: dict[str, int], batch, infer_batch):
    torch.manual_seed(SEED)
    extra = {"attention": "release"} if kind == "cc" else {}
    model = build_stage2(kind, in_dim=3 * size["feature_dim"], hidden=size["hidden"], seq_len=size["seq_len"],
                         **extra)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    w = IMAGE_WEIGHT if kind in SLICE_TRAINED else 0.0

    def step() -> None:
        model.train()
        out = model(batch.x, batch.valid)
        loss = rsna_weighted_bce(out, batch.slice_labels, batch.exam_labels, batch.valid, image_weight=w,
                                 num_slices=batch.num_slices, positive_ratio=batch.positive_ratio).total  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer() -> None:
        model.eval()
        out = model(infer_batch.x, infer_batch.valid)
        torch.sigmoid(out.exam_logits), torch.sigmoid(out.slice_logits)

    return model, step, infer


def bench_stage2(size_name: str, args: argparse.Namespace, rounds: int, peak: float) -> dict[str, Any]:
    size = STAGE2_SIZES[size_name]
    batch = stage2_batch(size, size["batch"], SEED)
    infer_batch = stage2_batch(size, size["infer_batch"], SEED + 1)
    built = {k: build_stage2_candidate(k, size, batch, infer_batch) for k in KINDS}
    warmup = 1 if args.quick or size_name == "full" else 2
    train_t = interleaved({k: v[1] for k, v in built.items()}, warmup=warmup, rounds=rounds)
    infer_t = interleaved({k: v[2] for k, v in built.items()}, warmup=warmup, rounds=rounds)
    n, ni = size["batch"], size["infer_batch"]
    rows: dict[str, dict[str, Any]] = {}
    for key, (model, step, infer) in built.items():
        train_flops, fwd_flops = flops_of(step), flops_of(infer)
        mem = {"peak_mb": None, "delta_mb": None}
        if not args.no_memory:
            try:
                mem = isolated("pe_cad_speed", "stage2", f"{key}@{size_name}", str(args.threads), "2")
            except Exception as err:
                print(f"  (peak RSS of {key} not measured: {type(err).__name__})")
        rows[key] = {"params": count_parameters(model), "train_s": train_t[key], "train_exams_s": n / train_t[key],
                     "infer_exams_s": ni / infer_t[key], "fwd_gflop_per_exam": fwd_flops / ni / 1e9,
                     "train_gflops": train_flops / train_t[key] / 1e9, "infer_gflops": fwd_flops / infer_t[key] / 1e9,
                     **mem}  # fmt: skip
    print(f"\n## Stage 2 ({size_name}): L = {size['seq_len']}, hidden {size['hidden']}, features 3 x "
          f"{size['feature_dim']}; train batch {n} exams of 24-80 slices (forward + RSNA BCE + backward + Adam), "
          f"inference batch {ni}; median of {rounds} interleaved rounds")  # fmt: skip
    print("| kind | params | train ms/step | train exams/s | × CC | infer exams/s | × CC | fwd GFLOP/exam | "
          "train GFLOP/s | train % of peak | infer % of peak | peak RSS MiB | step Δ MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cc = rows["cc"]
    for key, r in rows.items():
        print(f"| {key} | {r['params'] / 1e6:.3f}M | {1e3 * r['train_s']:.1f} | {fmt_rate(r['train_exams_s'])} | "
              f"{r['train_exams_s'] / cc['train_exams_s']:.2f} | {fmt_rate(r['infer_exams_s'])} | "
              f"{r['infer_exams_s'] / cc['infer_exams_s']:.2f} | {r['fwd_gflop_per_exam']:.4f} | "
              f"{r['train_gflops']:.1f} | {100 * r['train_gflops'] / peak:.1f}% | "
              f"{100 * r['infer_gflops'] / peak:.1f}% | {fmt_or_dash(r['peak_mb'], '.0f')} | "
              f"{fmt_or_dash(r['delta_mb'], '.0f')} |")  # fmt: skip
    return {"rows": rows, "rounds": rounds, "size": size}


# --- pipeline ---------------------------------------------------------------------------------------------------


def _write_dicom(folder: Path, ex: ctpa_synth.Exam) -> None:
    write_ct_series(ex.volume, folder, positions=ex.positions, spacing=ex.spacing, study_uid=ex.study_uid)


def bench_pipeline(args: argparse.Namespace, cnn_step_s: float) -> dict[str, Any]:
    reps = 3 if args.quick else 9
    x = stage1_batches()[0]
    gen = torch.Generator().manual_seed(SEED)
    aug_s = timeit(lambda: augment(x, generator=gen, config=AugmentConfig()), warmup=1, repeats=reps)

    cfg = PECadConfig()
    cfg.stage2.kinds = ["cc"]
    backbone = build_backbone("small_cnn", image_size=IMAGE_SIZE, seed=SEED, width=24, feature_dim=128)
    model = build_stage2("cc", in_dim=3 * 128, hidden=cfg.stage2.hidden, seq_len=cfg.stage2.seq_len)
    card = {"image_size": IMAGE_SIZE, "window": [100.0, 700.0], "backbone": "small_cnn"}
    scorer = ExamScorer(backbone=backbone, model=model, kind="cc", cfg=cfg, card=card, stage1_digest="bench",
                        device=torch.device("cpu"))  # fmt: skip
    ex = ctpa_synth.generate_exam(SEED + 7, spec=ctpa_synth.CTPASpec(size=IMAGE_SIZE, slices=(48, 48)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "exam"
        folder.mkdir()
        _write_dicom(folder, ex)
        files = sorted(folder.iterdir())
        feats, probs = scorer.stage1(ex.volume)
        cache_dir = Path(tmp) / "cache"
        exam_features(scorer, folder, cache_dir)  # fill the cache
        stages: dict[str, Callable[[], object]] = {
            "decode": lambda: load_exam(files),
            "preprocess": lambda: preprocess_exam(
                ex.volume, size=IMAGE_SIZE, level=100.0, width=700.0, lung_crop=True, trivial=False
            ),
            "stage1": lambda: scorer.stage1(ex.volume),
            "stage2": lambda: scorer.stage2(feats),
            "cache_hit": lambda: exam_features(scorer, folder, cache_dir),
        }
        t = {k: timeit(fn, warmup=1, repeats=reps) for k, fn in stages.items()}
    labels = {
        "decode": "load_exam (48 DICOM files: decode, sort by z, rescale)",
        "preprocess": "preprocess_exam (window, lung box, resize to 64²)",
        "stage1": "stage 1 (preprocessing + SmallCNN features of 48 slices)",
        "stage2": "stage 2 (fit to L = 64, differences, CC)",
        "cache_hit": "feature-cache hit (sha256 of the files + .npz read)",
    }
    times = {labels[k]: v for k, v in t.items()}
    miss = t["decode"] + t["stage1"] + t["stage2"]
    hit = t["cache_hit"] + t["stage2"]
    print(f"\n## Pipeline; median of {reps}")
    print(f"- stage-1 augmentation (contrast, shift-scale-rotate, cutout) of a batch of {BATCH}: "
          f"{1e3 * aug_s:.2f} ms, {100 * aug_s / cnn_step_s:.0f}% of the CNN's training step")  # fmt: skip
    print("\nScoring one exam (48 slices of 64², random weights of the quick sizes):\n")
    print("| stage | ms/exam |")
    print("|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * t:.2f} |")
    print(f"- end to end without the cache (decode + stage 1 + stage 2): {1e3 * miss:.1f} ms/exam, "
          f"{1 / miss:.1f} exams/s; with a cache hit: {1e3 * hit:.2f} ms/exam ({miss / hit:.0f}x)")  # fmt: skip
    return {"augment_ms": 1e3 * aug_s, "scoring_ms": {k: 1e3 * v for k, v in times.items()},
            "exam_ms_miss": 1e3 * miss, "exam_ms_hit": 1e3 * hit}  # fmt: skip


# --- peak memory in a fresh process -----------------------------------------------------------------------------


def child(stage: str, key: str, threads: int, steps: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    if stage == "stage1":
        x, y, xi = stage1_batches()
        _, step, _ = build_stage1(key, x, y, xi)
    else:
        kind, size_name = key.split("@")
        size = STAGE2_SIZES[size_name]
        batch = stage2_batch(size, size["batch"], SEED)
        _, step, _ = build_stage2_candidate(kind, size, batch, batch)
    step()
    print(json.dumps(step_memory(step, steps=steps)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also stage 2 at the release's size (L 192, hidden 512)")
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds (default 7; 3 for --full's stage 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up, no memory subprocesses")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        stage, key, threads, steps = args.child
        child(stage, key, int(threads), int(steps))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.no_memory = True
    t0 = time.perf_counter()
    peak = matmul_peak_gflops(seconds=0.3 if args.quick else 1.0)["peak"]
    import monai

    print(f"torch {torch.__version__}, monai {monai.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; fp32 matmul peak {peak:.1f} GFLOP/s")  # fmt: skip
    if args.quick:
        print("(--quick: few rounds, no memory measurements; not for reporting)")
    rounds = args.rounds or (2 if args.quick else 7)
    out: dict[str, Any] = {"torch": torch.__version__, "monai": monai.__version__, "threads": torch.get_num_threads(),
                           "matmul_peak_gflops": peak, "quick": args.quick}  # fmt: skip
    out["stage1"] = bench_stage1(args, rounds, peak)
    out["stage2"] = {"quick": bench_stage2("quick", args, rounds, peak)}
    if args.full:
        out["stage2"]["full"] = bench_stage2("full", args, args.rounds or (2 if args.quick else 3), peak)
    out["pipeline"] = bench_pipeline(args, out["stage1"]["rows"]["cnn"]["train_s"])
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MiB; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
