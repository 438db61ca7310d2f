"""Small neural-network pieces used by two or more recipes: parameter counting and the NT-Xent contrastive loss.

``contrastive_logits`` / ``nt_xent`` came from the temporal-gradient recipe (cross-modal NT-Xent, Xiao et al.,
arXiv 2111.13241); with ``same_modality_negatives=True`` they are textbook SimCLR (Chen et al. 2020), which the
PE CAD recipe's SimCLR pretraining uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def contrastive_logits(
    emb_a: Tensor,
    emb_b: Tensor,
    *,
    temperature: float = 0.5,
    same_modality_negatives: bool = False,
) -> tuple[Tensor, Tensor]:
    """The (2N, 2N) similarity logits of the 2N views and each view's positive.

    Views are ordered ``[a_0 … a_{N-1}, b_0 … b_{N-1}]`` (rows L2-normalised first). Entry (i, j) is
    ``cos(v_i, v_j)/τ``; self-similarity (the diagonal) is ``-inf``, and so are the same-modality blocks when
    ``same_modality_negatives`` is False (the release's form). The positive of a_i is b_i and vice versa.

    Args:
        emb_a, emb_b: (N, D) embeddings of the same N clips in two modalities.
    Returns: logits (2N, 2N); targets (2N,) int64 with ``targets[i] = i + N``, ``targets[i + N] = i``.
    """
    if emb_a.shape != emb_b.shape or emb_a.dim() != 2:
        raise ValueError(f"emb_a and emb_b must both be (N, D); got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    n = emb_a.shape[0]
    views = F.normalize(torch.cat([emb_a, emb_b], dim=0), dim=1)  # (2N, D)
    logits = views @ views.t() / temperature  # (2N, 2N)
    idx = torch.arange(2 * n, device=emb_a.device)
    is_a = idx < n
    masked = idx[:, None] == idx[None, :]
    if not same_modality_negatives:
        masked = masked | (is_a[:, None] == is_a[None, :])
    logits = logits.masked_fill(masked, float("-inf"))
    targets = torch.where(is_a, idx + n, idx - n)
    return logits, targets


def nt_xent(
    emb_a: Tensor,
    emb_b: Tensor,
    *,
    temperature: float = 0.5,
    same_modality_negatives: bool = False,
) -> Tensor:
    """Symmetric cross-modal NT-Xent over the 2N views of N clips, averaged over all 2N anchors.

    Each anchor's positive is the same clip in the other modality. With ``same_modality_negatives=False``
    (default, the release's ``SimCLRLoss_PTV_New``) the negatives are the other N − 1 clips of the other
    modality, so the value is ``0.5·[CE(a·bᵀ/τ, diag) + CE(b·aᵀ/τ, diag)]``; with True they are all 2N − 2
    other views (textbook SimCLR).

    Args:
        emb_a, emb_b: (N, D) embeddings (normalised here), N >= 2 for any negative to exist.
        temperature: τ (release: 0.5).
    Returns: scalar.
    """
    logits, targets = contrastive_logits(
        emb_a, emb_b, temperature=temperature, same_modality_negatives=same_modality_negatives
    )
    return F.cross_entropy(logits, targets)
