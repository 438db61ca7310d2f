"""Losses of MT-TransUNet (Chen et al., arXiv 2112.01767) with DTC's dual-task consistency (Luo et al., AAAI 2021),
as pure functions.

The default objective (mode ``seg+cls+dual``) for a batch whose images carry class labels and, where
``has_mask``, a lesion mask:

    L = CE_seg(masked images) + w(e)·cons_weight·L_cons + sdf_weight·L_sdf(masked images) + cls_weight·CE_cls(all)

* ``CE_seg``: 2-class pixel cross-entropy (softmax over the channel), averaged over the masked images' pixels.
* ``L_sdf``: MSE between the tanh SDF head and the normalised ground-truth SDF (DTC convention: < 0 inside,
  > 0 outside), averaged over the masked images' pixels.
* ``L_cons``: ``mean((cat(1 − σ(−k·SDF), σ(−k·SDF)) − seg)²)`` over the *whole* batch (every image, both channels,
  every pixel); channel 1 is the foreground, ``k = 1500``. ``seg`` is ``softmax(seg_logits)`` (``on="probs"``, our
  default) or the raw logits (``on="logits"``, what the release feeds). Nothing is detached (as in the release and
  in DTC): the gradient reaches both the segmentation and the SDF head.
* ``w(e) = exp(−5·(1 − min(e, 40)/40)²)`` (:func:`ramp_weight`, the release's ``sigmoid_rampup``).
* ``CE_cls``: cross-entropy of the CLS head over every image (both halves carry labels).

The release's optional terms (weight 0 there) are exposed with the release's reductions: ``att``, ``cs``, ``ac`` (on
the head-averaged CLS→patch attention) and ``ds`` (deep supervision on the token grid); see each function.

Where we differ from the release (``JingyeChen/MT-TransUNet`` ``engine.py``): the masked images are chosen by
``has_mask`` rather than as the first ``batch_size/2`` rows; the segmentation term is the ordinary pixel CE (the
release adds ``MyLabelSmoothingLoss(dim=-1)``, which takes the log-softmax over the image *width* and averages over
both channels; :func:`release_seg_ce` reproduces it for comparison); a non-finite total raises instead of the step
being skipped silently.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

#: the constant the release adds to the batch total of the CLS attention before normalising it (``cs``/``ac``)
ATTENTION_EPS = 1e-3


def ramp_weight(epoch: float, *, length: float = 40.0) -> float:
    """The consistency ramp ``w(e) = exp(−5·(1 − min(max(e, 0), L)/L)²)``; ``w(0) = e⁻⁵ ≈ 0.0067``, ``w(L) = 1``,
    and 1 throughout when ``length`` is 0 (the release's/DTC's ``sigmoid_rampup``)."""
    if length < 0:
        raise ValueError(f"ramp length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(float(epoch), 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def _maps(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) from (B, H, W) or (B, 1, H, W)."""
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(x.shape)}")
        return x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
    return x


def _empty_zero(x: torch.Tensor) -> torch.Tensor:
    """An exact 0 that is part of ``x``'s graph (the sum of an empty slice: zero gradient, never NaN)."""
    return x[:0].sum()


def _grid_of(attn: torch.Tensor) -> int:
    """The token grid side ``g`` of an attention map (B, heads, 1+N, 1+N) with N = g·g."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (B, heads, 1+N, 1+N), got shape {tuple(attn.shape)}")
    n = attn.shape[-1] - 1
    g = math.isqrt(n)
    if g * g != n or n == 0:
        raise ValueError(f"attention has {n} patch tokens, not a square grid")
    return g


def cls_patch_attention(attn: torch.Tensor) -> torch.Tensor:
    """The head-averaged attention of the CLS token (query 0) to the patch tokens: (B, heads, 1+N, 1+N) -> (B, N)
    (the release's ``torch.mean(att, 1)[:, 0, 1:]``)."""
    _grid_of(attn)
    return attn.mean(dim=1)[:, 0, 1:]


def resize_mask(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Masks (B, H, W) or (B, 1, H, W) -> (B, size, size) float by nearest-neighbour resizing, as the release does
    for the token grid (``F.interpolate(mode="nearest")``: source pixel ``floor(i·H/size)``)."""
    m = _maps(masks).to(torch.float32)
    return F.interpolate(m[:, None], size=(size, size), mode="nearest")[:, 0]


def seg_ce(seg_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy of ``seg_logits`` (B, 2, H, W) against ``masks`` (B, H, W) or (B, 1, H, W) in {0, 1},
    averaged over the pixels of the images with ``has_mask`` (B,) bool. The other images' masks are never read
    (they may hold anything) and their logits get no gradient; with no masked image the result is an exact 0 that
    stays in the graph (so every DDP rank runs the same backward)."""
    sel = has_mask.to(torch.bool)
    if not bool(sel.any()):
        return _empty_zero(seg_logits)
    return F.cross_entropy(seg_logits[sel], _maps(masks)[sel].long())


def release_seg_ce(seg_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """The segmentation term the release actually optimises (``utils/loss.py`` ``MyLabelSmoothingLoss(classes=2,
    smoothing=0.0)``, default ``dim=-1``): ``mean(−cat(1 − y, y) · log_softmax(logits, dim=-1))`` over the masked
    images, i.e. the log-softmax runs over the image width, not the class channel, and the mean also runs over the
    two channels. For comparison only; :func:`seg_ce` is the method's term. Shapes as :func:`seg_ce`."""
    sel = has_mask.to(torch.bool)
    if not bool(sel.any()):
        return _empty_zero(seg_logits)
    y = _maps(masks)[sel].to(seg_logits.dtype)[:, None]
    target = torch.cat((1.0 - y, y), dim=1)
    return torch.mean(-target * seg_logits[sel].log_softmax(dim=-1))


def sdf_loss(sdf_pred: torch.Tensor, sdf_gt: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """MSE between the SDF head ``sdf_pred`` (B, 1, H, W) and the ground truth ``sdf_gt`` (B, H, W) or
    (B, 1, H, W), averaged over the pixels of the images with ``has_mask`` (B,); the other images' ``sdf_gt`` is
    never read. An exact 0 in the graph when no image has a mask."""
    sel = has_mask.to(torch.bool)
    if not bool(sel.any()):
        return _empty_zero(sdf_pred)
    return F.mse_loss(_maps(sdf_pred)[sel], _maps(sdf_gt)[sel].to(sdf_pred.dtype))


def sdf_to_mask(sdf: torch.Tensor, *, k: float = 1500.0) -> torch.Tensor:
    """The soft foreground implied by an SDF (negative inside): ``σ(−k·sdf)``, same shape."""
    return torch.sigmoid(-k * sdf)


def consistency_loss(
    seg_logits: torch.Tensor, sdf_pred: torch.Tensor, *, on: str = "probs", k: float = 1500.0
) -> torch.Tensor:
    """The dual-task consistency ``mean((cat(1 − σ(−k·sdf), σ(−k·sdf)) − seg)²)`` over the whole batch (all images,
    both channels, all pixels). ``seg_logits`` (B, 2, H, W) with channel 1 the foreground, ``sdf_pred``
    (B, 1, H, W). ``on="probs"`` compares with ``softmax(seg_logits)``; ``on="logits"`` with the raw logits (the
    release). Neither side is detached (the release and DTC)."""
    if seg_logits.ndim != 4 or seg_logits.shape[1] != 2:
        raise ValueError(f"seg_logits must be (B, 2, H, W), got shape {tuple(seg_logits.shape)}")
    if on == "probs":
        seg = seg_logits.softmax(dim=1)
    elif on == "logits":
        seg = seg_logits
    else:
        raise ValueError(f"on must be 'probs' or 'logits', got {on!r}")
    fg = sdf_to_mask(_maps(sdf_pred)[:, None], k=k)
    return torch.mean((torch.cat((1.0 - fg, fg), dim=1) - seg) ** 2)


def cls_ce(cls_logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the CLS head ``cls_logits`` (B, C) against ``labels`` (B,) int, averaged over every image."""
    return F.cross_entropy(cls_logits, labels.long(), label_smoothing=label_smoothing)


def att_loss(attn_first: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """``Σ (1 − mask_g) · A_cls`` summed over the masked images and the g×g grid: the CLS attention that falls
    outside the lesion. ``attn_first`` (B, heads, 1+N, 1+N) is the *first* returned attention map (the release's
    ``attention_maps[0]``), ``A_cls`` its head-averaged CLS→patch row, ``mask_g`` the mask (B, H, W) resized to
    g×g by nearest neighbour. An exact 0 in the graph when no image has a mask."""
    sel = has_mask.to(torch.bool)
    if not bool(sel.any()):
        return _empty_zero(attn_first)
    g = _grid_of(attn_first)
    a = cls_patch_attention(attn_first[sel]).reshape(-1, g, g)
    outside = 1.0 - resize_mask(_maps(masks)[sel], g).to(a.dtype)
    return (outside * a).sum()


def _normalised_attention(attn_last: torch.Tensor) -> torch.Tensor:
    """``Â = A / (ΣA + 1e-3)``, the head-averaged CLS→patch attention (B, N) divided by its total over the whole
    batch (the release's ``last_att_maps * (1 / (last_att_maps.sum() + 1e-3))``)."""
    a = cls_patch_attention(attn_last)
    return a / (a.sum() + ATTENTION_EPS)


def _resize_fg(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, H, W) -> (B, g·g) by bilinear resizing with ``align_corners=False`` (the release's
    ``F.interpolate(mode="bilinear")``; not antialiased)."""
    return F.interpolate(x[:, None], size=(g, g), mode="bilinear", align_corners=False).flatten(1)


def cs_loss(attn_last: torch.Tensor, seg_logits: torch.Tensor) -> torch.Tensor:
    """Classification–segmentation consistency ``Σ (Â − softmax_N(resize_g(seg foreground logit)))²`` summed over
    the whole batch and the N = g·g positions. ``attn_last`` (B, heads, 1+N, 1+N) is the last attention map,
    ``Â`` its head-averaged CLS→patch attention divided by its batch total (+1e-3), so ``Â`` sums to about 1 over
    the *batch* while each image's target sums to 1 (the release's scaling). ``seg_logits`` (B, 2, H, W); the
    foreground logit is resized bilinearly; nothing is detached."""
    g = _grid_of(attn_last)
    a = _normalised_attention(attn_last)
    target = _resize_fg(seg_logits[:, 1], g).softmax(dim=1)
    return ((a - target) ** 2).sum()


def ac_loss(attn_last: torch.Tensor, seg_logits: torch.Tensor) -> torch.Tensor:
    """Activation consistency ``−Σ Â · resize_g(softmax(seg)[:, 1])`` summed over the whole batch and the grid
    (``Â`` as in :func:`cs_loss`; the foreground probability resized bilinearly; nothing detached)."""
    g = _grid_of(attn_last)
    a = _normalised_attention(attn_last)
    fg = _resize_fg(seg_logits.softmax(dim=1)[:, 1], g)
    return -(a * fg).sum()


def ds_loss(ds_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Deep supervision: CE of the token-grid logits ``ds_logits`` (B, 2, g, g) against the mask (B, H, W) resized
    to g×g by nearest neighbour, averaged over the masked images' grid cells. An exact 0 in the graph when no image
    has a mask."""
    sel = has_mask.to(torch.bool)
    if not bool(sel.any()):
        return _empty_zero(ds_logits)
    g = ds_logits.shape[-1]
    if ds_logits.shape[-2] != g:
        raise ValueError(f"ds_logits must be (B, 2, g, g), got shape {tuple(ds_logits.shape)}")
    return F.cross_entropy(ds_logits[sel], resize_mask(_maps(masks)[sel], g).long())


@dataclasses.dataclass
class LossParts:
    """The total loss and its unweighted terms (scalars). A term that is off is an exact 0 outside the graph."""

    total: torch.Tensor
    seg: torch.Tensor
    sdf: torch.Tensor
    cons: torch.Tensor
    cls: torch.Tensor
    att: torch.Tensor
    cs: torch.Tensor
    ac: torch.Tensor
    ds: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name).detach()) for f in dataclasses.fields(self)}


def mt_loss(
    out,
    *,
    masks: torch.Tensor,
    sdf_gt: torch.Tensor,
    has_mask: torch.Tensor,
    labels: torch.Tensor,
    use_seg: bool,
    use_cls: bool,
    use_dual: bool,
    ramp: float,
    sdf_weight: float = 5.0,
    cls_weight: float = 0.25,
    cons_weight: float = 1.0,
    cons_on: str = "probs",
    seg_ce_form: str = "channel",
    sdf_k: float = 1500.0,
    label_smoothing: float = 0.0,
    att_weight: float = 0.0,
    cs_weight: float = 0.0,
    ac_weight: float = 0.0,
    ds_weight: float = 0.0,
) -> LossParts:
    """The recipe's loss on one batch.

    ``out`` has ``cls_logits`` (B, C), ``seg_logits`` (B, 2, H, W), ``sdf`` (B, 1, H, W), ``ds_logits`` (B, 2, g, g)
    and ``attentions`` (a list of (B, heads, 1+N, 1+N)); ``masks`` (B, H, W) in {0, 1} and ``sdf_gt`` (B, H, W) are
    read only where ``has_mask`` (B,) bool; ``labels`` (B,) int are used for every image; ``ramp`` is ``w(e)``.

        total = [use_seg]·CE_seg + [use_dual]·(ramp·cons_weight·L_cons + sdf_weight·L_sdf) + [use_cls]·cls_weight·CE_cls
                + att_weight·att + cs_weight·cs + ac_weight·ac + ds_weight·ds

    ``seg_ce_form``: ``channel`` (the pixel cross-entropy over the two classes; default) or ``release`` (the
    release's term, whose softmax runs over the image width: :func:`release_seg_ce`).

    A term that is off (its flag False or its weight 0) is not computed and adds nothing, so ``cls_only``
    (``use_seg=False, use_cls=True, use_dual=False``) gives exactly ``cls_weight·CE_cls`` (the release's
    ``cls_only`` uses weight 1: pass ``cls_weight=1`` for that). Raises ``ValueError`` when every term is off and
    ``FloatingPointError``, naming the non-finite terms, when the total is not finite (the release skips such
    steps silently).
    """
    if not (use_seg or use_cls or use_dual or att_weight or cs_weight or ac_weight or ds_weight):
        raise ValueError("every loss term is off (use_seg, use_cls, use_dual all False and no optional weight)")
    ref = out.cls_logits if use_cls else out.seg_logits
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    terms = dict.fromkeys(("seg", "sdf", "cons", "cls", "att", "cs", "ac", "ds"), zero)
    total = zero
    if seg_ce_form not in ("channel", "release"):
        raise ValueError(f"seg_ce_form must be 'channel' or 'release', got {seg_ce_form!r}")
    if use_seg:
        seg_fn = seg_ce if seg_ce_form == "channel" else release_seg_ce
        terms["seg"] = seg_fn(out.seg_logits, masks, has_mask)
        total = total + terms["seg"]
    if use_dual:
        terms["cons"] = consistency_loss(out.seg_logits, out.sdf, on=cons_on, k=sdf_k)
        terms["sdf"] = sdf_loss(out.sdf, sdf_gt, has_mask)
        total = total + ramp * cons_weight * terms["cons"] + sdf_weight * terms["sdf"]
    if use_cls:
        terms["cls"] = cls_ce(out.cls_logits, labels, label_smoothing=label_smoothing)
        total = total + cls_weight * terms["cls"]
    if att_weight:
        terms["att"] = att_loss(out.attentions[0], masks, has_mask)
        total = total + att_weight * terms["att"]
    if cs_weight:
        terms["cs"] = cs_loss(out.attentions[-1], out.seg_logits)
        total = total + cs_weight * terms["cs"]
    if ac_weight:
        terms["ac"] = ac_loss(out.attentions[-1], out.seg_logits)
        total = total + ac_weight * terms["ac"]
    if ds_weight:
        terms["ds"] = ds_loss(out.ds_logits, masks, has_mask)
        total = total + ds_weight * terms["ds"]
    if not bool(torch.isfinite(total)):
        bad = [f"{name}={float(t.detach())}" for name, t in terms.items() if not bool(torch.isfinite(t))]
        why = ", ".join(bad) or "the weighted sum overflowed"
        raise FloatingPointError(f"non-finite MT-TransUNet loss (total={float(total.detach())}): {why}")
    return LossParts(total=total, **terms)
