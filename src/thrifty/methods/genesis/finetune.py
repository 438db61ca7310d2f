"""Target-task fine-tuning of the Genesis recipe: the scripts the official repositories' users asked for
(ModelsGenesis#17, #37; SemanticGenesis#6, #7). Papers: arXiv 2004.07882, 2007.06959, 2102.10680.

* NCC (nodule false-positive reduction): :class:`~thrifty.methods.genesis.model.EncoderClassifier`, the pre-trained
  encoder plus global pooling and one logit, BCE-with-logits; scored by AUC.
* NCS (nodule segmentation): the whole :class:`~thrifty.methods.genesis.model.UNet3D` (encoder *and* decoder, as
  the papers fine-tune it) with logits out, BCE + soft Dice (``finetune.seg_loss=dice``: the Models Genesis
  release's Dice-only loss); scored by IoU and Dice of the mask thresholded at ``threshold``, averaged over cubes,
  and by the release's two-class mean IoU over thresholds 0.5 … 0.95 (:func:`release_mean_iou`, on the scale of
  the papers' NCS column). Pretexts without a decoder (rotation) transfer the encoder only.

Protocol: Adam (lr 1e-3), random flips of training cubes, validation score every ``eval_every`` steps, the best
validation step's weights kept, early stopping after ``patience`` validations without improvement; the test split
is scored once with the kept weights. The seed sets the new layers' initialisation, batch order and flips.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.core.metrics import roc_auc
from thrifty.core.run import MetricsLog, write_json
from thrifty.methods.genesis.config import SEG_LOSSES, GenesisConfig
from thrifty.methods.genesis.data import GenesisData, TaskSet, fraction_patients
from thrifty.methods.genesis.model import EncoderClassifier, UNet3D, load_encoder, load_weights, place, to_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- metrics


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0, pooled: bool = False
) -> torch.Tensor:
    """1 − soft Dice of sigmoid(logits) against a 0/1 target. (B, 1, d, h, w) → scalar.

    ``pooled=False``: per cube, then averaged over the batch. ``pooled=True``: one Dice over every voxel of the
    batch, as the Models Genesis release's ``dice_coef`` (``keras/downstream_tasks/utils.py``) flattens the whole
    batch, with the same smoothing ``eps`` = 1."""
    p = torch.sigmoid(logits).flatten(0 if pooled else 1)
    t = target.flatten(0 if pooled else 1)
    inter = (p * t).sum(-1)
    return (1 - (2 * inter + eps) / (p.sum(-1) + t.sum(-1) + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, *, kind: str = "bce_dice") -> torch.Tensor:
    """The NCS training loss of ``finetune.seg_loss``. (B, 1, d, h, w) logits and 0/1 target → scalar.

    ``bce_dice``: BCE-with-logits + per-cube soft Dice (the usual nodule-segmentation loss, our default).
    ``dice``: the Models Genesis release's loss, ``dice_coef_loss`` = 1 − ``dice_coef`` (soft Dice pooled over
    the batch, smoothing 1; ``keras/downstream_tasks/utils.py``, compiled by ``segmentation_model_compile``)."""
    if kind == "bce_dice":
        return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)
    if kind == "dice":
        return soft_dice_loss(logits, target, pooled=True)
    raise ValueError(f"unknown segmentation loss {kind!r}; choose from {list(SEG_LOSSES)}")


def iou_dice(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-cube IoU and Dice of binary masks (B, ...) → two (B,) arrays; an empty prediction of an empty target
    scores 1."""
    p = pred.flatten(1).bool()
    t = target.flatten(1).bool()
    inter = (p & t).sum(1).double()
    union = (p | t).sum(1).double()
    total = p.sum(1).double() + t.sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    return iou.numpy(), dice.numpy()


RELEASE_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # 0.5, 0.55 … 0.95, as np.arange(0.5, 1, 0.05)


def release_mean_iou(
    prob: torch.Tensor, target: torch.Tensor, *, thresholds: tuple[float, ...] = RELEASE_THRESHOLDS
) -> float:
    """The Models Genesis release's NCS score, in %: two-class (background and nodule) mean IoU, averaged over
    the mask thresholds 0.5, 0.55 … 0.95.

    ``prob`` (N, 1, d, h, w): sigmoid outputs; ``target`` (N, 1, d, h, w): 0/1 masks (> 0.5 is nodule).

    Source: ``mean_iou`` in ``keras/downstream_tasks/utils.py`` of ``MrGiovanni/ModelsGenesis``, the metric that
    ``segmentation_model_compile``/``segmentation_model_evaluation`` report as "[EVAL] IoU" (the notebook
    ``keras/downstream_tasks/lung nodule segmentation.ipynb`` prints 77.14 for Genesis Chest CT, the scale of the
    papers' NCS column). For each ``t`` of ``np.arange(0.5, 1.0, 0.05)`` it thresholds ``y_pred > t`` (strict) and calls
    ``tf.metrics.mean_iou(y_true, y_pred_t, 2)``, then averages the ten values. TF's ``mean_iou`` accumulates a
    2×2 confusion matrix (``_streaming_confusion_matrix``) and returns the mean over classes of
    TP_c / (TP_c + FP_c + FN_c), leaving out a class whose denominator is 0 (0 if both are).

    Aggregation: one confusion matrix per threshold over every voxel of the set (pooled, not per cube), which is
    what the streaming matrix holds after the last batch. Keras' ``evaluate`` itself prints the batch-size
    weighted mean of the running value after each batch; that artefact of the batch order is not reproduced.
    Background dominates a cube, so this score sits near 50 + IoU/2 and is not comparable with the foreground
    IoU of :func:`iou_dice`."""
    t = (target > 0.5).flatten()
    p = prob.flatten()
    n = t.numel()
    n_true = int(t.sum())
    scores = []
    for thr in thresholds:
        pred = p > thr
        tp = int((pred & t).sum())
        n_pred = int(pred.sum())
        fp, fn = n_pred - tp, n_true - tp
        tn = n - tp - fp - fn
        ious = [inter / den for inter, den in ((tn, tn + fp + fn), (tp, tp + fp + fn)) if den > 0]
        scores.append(sum(ious) / len(ious) if ious else 0.0)
    return 100 * sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------- networks


def build_network(task: str, cfg: GenesisConfig, init: Path | None) -> tuple[nn.Module, str]:
    """The task's network, with pre-trained weights from the arm's unit directory ``init`` (None: scratch).

    NCS networks of restoration arms load the whole pre-trained U-Net, the output conv included as the releases
    do (``finetune.ncs_init="unet"``), unless ``finetune.new_head`` asks for a freshly initialised output conv;
    ``ncs_init="encoder"`` transfers the encoder only. Returns (network, what was
    loaded: "scratch", "encoder" or "unet")."""
    width = cfg.pretrain.width
    if task == "ncc":
        net: nn.Module = EncoderClassifier(width=width)
    else:
        net = UNet3D(width=width, final_activation="none")
    if init is None:
        return net, "scratch"
    if task == "ncs" and cfg.finetune.ncs_init == "unet" and (init / "unet.safetensors").exists():
        state, _ = load_weights(init / "unet.safetensors")
        if cfg.finetune.new_head:  # the restoration head maps features to intensities, not to mask logits
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise ValueError(f"{init / 'unet.safetensors'} does not fit the U-Net: {missing} {unexpected}")
        return net, "unet"
    state, _ = load_weights(init / "encoder.safetensors")
    load_encoder(net, state)
    return net, "encoder"


def _flip(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random flips along each spatial axis, per sample, the same for a cube and its mask."""
    flips = torch.rand(x.shape[0], 3, generator=gen) < 0.5
    x = x.clone()
    y = y.clone() if y is not None else None
    for a in range(3):
        sel = flips[:, a]
        if sel.any():
            x[sel] = x[sel].flip(a + 2)
            if y is not None:
                y[sel] = y[sel].flip(a + 2)
    return x, y


@torch.no_grad()
def predict(
    net: nn.Module, x: torch.Tensor, device: torch.device, *, batch_size: int = 32, channels_last: bool = False
) -> torch.Tensor:
    """Outputs of ``net`` in eval mode for ``x`` (N, 1, d, h, w), in batches, on the CPU."""
    net.eval()
    out = torch.cat(
        [
            net(to_device(x[i : i + batch_size], device, channels_last=channels_last)).cpu().contiguous()
            for i in range(0, len(x), batch_size)
        ]
    )
    net.train()
    return out


THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 … 0.95


def score(
    task: str,
    net: nn.Module,
    split: TaskSet,
    cfg: GenesisConfig,
    device: torch.device,
    *,
    threshold: float | None = None,
) -> dict[str, float]:
    """NCC: ``{"auc"}`` in %. NCS: ``{"iou", "dice"}`` in %, means over cubes, of the mask at ``threshold`` on the
    sigmoid; with ``threshold=None`` every threshold of :data:`THRESHOLDS` is tried and the best IoU is returned with
    its ``"threshold"`` (for validation only: the test split is scored at the threshold validation chose). NCS also
    gives ``"release_miou"``, the release's metric (:func:`release_mean_iou`), which averages its own thresholds
    and so does not depend on ``threshold``."""
    if task == "ncc":
        logits = predict(net, split.ncc_cubes, device, channels_last=cfg.channels_last)[:, 0]
        return {"auc": 100 * roc_auc(logits.numpy(), split.ncc_labels.numpy())}
    prob = torch.sigmoid(predict(net, split.ncs_cubes, device, channels_last=cfg.channels_last))
    best: dict[str, float] = {}
    for t in THRESHOLDS if threshold is None else (threshold,):
        iou, dice = iou_dice(prob > t, split.ncs_masks > 0.5)
        if not best or iou.mean() > best["iou"] / 100:
            best = {"iou": 100 * float(iou.mean()), "dice": 100 * float(dice.mean()), "threshold": t}
    best["release_miou"] = release_mean_iou(prob, split.ncs_masks)
    return best


PRIMARY = {"ncc": "auc", "ncs": "iou"}


# ------------------------------------------------------------------------------------------------- one unit


def unit_dir(run_dir: Path, task: str, arm: str, fraction: float, seed: int) -> Path:
    return run_dir / "units" / "finetune" / task / f"frac{fraction:g}" / arm.replace("/", "-") / f"seed{seed}"


def finetune(
    task: str,
    arm: str,
    fraction: float,
    seed: int,
    cfg: GenesisConfig,
    data: GenesisData,
    init: Path | None,
    run_dir: Path,
    metrics: MetricsLog,
    device: torch.device,
) -> dict[str, Any]:
    """Fine-tune one (task, arm, label fraction, seed); validation picks the weights, test is read once."""
    out = unit_dir(run_dir, task, arm, fraction, seed)
    done = out / "result.json"
    if cfg.resume and done.exists():
        return json.loads(done.read_text())
    unit = f"finetune/{task}/frac{fraction:g}/{arm}/seed{seed}"
    metrics.truncate(unit, 0)
    f = cfg.finetune
    train = data.target_train.subset(fraction_patients(len(data.target_train.patients), fraction, seed=cfg.data.seed))
    xs, ys = (
        (train.ncc_cubes, train.ncc_labels.float()[:, None]) if task == "ncc" else (train.ncs_cubes, train.ncs_masks)
    )
    if len(xs) == 0:
        raise ValueError(f"{unit}: label fraction {fraction} leaves no {task} training cubes")
    torch.manual_seed(seed)
    net, loaded = build_network(task, cfg, init)
    place(net, device, channels_last=cfg.channels_last).train()
    opt = torch.optim.Adam(net.parameters(), lr=f.lr)
    gen = torch.Generator().manual_seed(seed)
    metric = PRIMARY[task]
    best: dict[str, Any] = {"score": -1.0, "step": 0, "state": copy.deepcopy(net.state_dict())}
    curve, stale, t0 = [], 0, time.perf_counter()
    for step in range(1, f.max_steps + 1):
        idx = torch.randint(0, len(xs), (f.batch_size,), generator=gen)
        x, y = xs[idx], ys[idx]
        if f.augment:
            x, y_flipped = _flip(x, y if task == "ncs" else None, gen)
            y = y_flipped if task == "ncs" else y
        logits = net(to_device(x, device, channels_last=cfg.channels_last))
        y = to_device(y, device, channels_last=cfg.channels_last)
        loss = (
            F.binary_cross_entropy_with_logits(logits, y)
            if task == "ncc"
            else segmentation_loss(logits, y, kind=f.seg_loss)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0:
            metrics.log({"unit": unit, "step": step, "loss": float(loss.detach())})
        if step % f.eval_every == 0 or step == f.max_steps:
            thr = None if f.select_threshold else f.threshold
            val = score(task, net, data.target_val.get("selection", unit), cfg, device, threshold=thr)
            curve.append([step, val[metric]])
            metrics.log({"unit": unit, "step": step, "split": "val", **val})
            if val[metric] > best["score"]:
                state = copy.deepcopy(net.state_dict())
                best, stale = {"score": val[metric], "step": step, "state": state, "threshold": val.get("threshold")}, 0
            else:
                stale += 1
                if stale >= f.patience:
                    break
    train_s = time.perf_counter() - t0
    net.load_state_dict(best["state"])
    test = (
        score(task, net, data.target_test.get("final_test", unit), cfg, device, threshold=best.get("threshold"))
        if f.test
        else {}  # a calibration pilot: validation only, and the access log shows no test read
    )
    result = {
        "task": task,
        "arm": arm,
        "fraction": fraction,
        "seed": seed,
        "init": loaded,
        "best_step": best["step"],
        "threshold": best.get("threshold"),
        "val": best["score"],
        "curve": curve,
        "test": test,
        "train_patients": len(train.patients),
        "train_cubes": len(xs),
        "train_seconds": train_s,
    }
    write_json(done, result)
    return result
