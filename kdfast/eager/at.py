"""Attention transfer (AT), eager: the maps and the per-stage losses of backend "torch".

A feature map ``f`` (B, C, H, W) is flattened over space to (B, C, HW) and reduced over channels
to its raw map, ``mean_c f ** p`` (mode "mean") or ``sum_c |f| ** p`` (mode "sum"), then
L2-normalised along HW (``u = m / max(||m||_2, EPS)``). A stage's loss compares the student's and
the (detached) teacher's normalised maps ``d = u_s - u_t``: ``sum(d ** 2) / (B * HW)`` (loss
"mse", at_loss mode "code") or ``sum_b ||d_b||_2 / B`` (loss "l2", mode "paper"); spatial sizes
are aligned first by pooling the larger map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdfast.numerics.at import AT_MODES, normalize_map
from kdfast.numerics.common import align_spatial, compute_dtype


def channel_reduced_map(feat: Tensor, p: float, mode: str) -> Tensor:
    """Raw attention map (B, C, H, W) -> (B, HW) in the compute dtype, before normalisation."""
    flat = feat.to(compute_dtype(feat.dtype)).flatten(start_dim=2)
    if mode == "sum":
        return torch.sum(torch.pow(flat.abs(), p), dim=1)
    return torch.mean(torch.pow(flat, p), dim=1)


def attention_map(feat: Tensor, p: float = 2.0, mode: str = "mean", normalize: bool = True) -> Tensor:
    """Attention map of one feature map, (B, C, H, W) -> (B, H*W), in ``feat``'s dtype."""
    raw = channel_reduced_map(feat, p, mode)
    return (normalize_map(raw) if normalize else raw).to(feat.dtype)


def _stage_loss(student: Tensor, teacher: Tensor, p: float, map_mode: str, loss: str) -> Tensor:
    """Scalar loss of one stage from aligned (B, C, H, W) features (teacher already detached)."""
    gap = normalize_map(channel_reduced_map(student, p, map_mode)) - normalize_map(channel_reduced_map(teacher, p, map_mode))
    if loss == "mse":
        return torch.sum(gap * gap) / gap.numel()
    return torch.linalg.vector_norm(gap, dim=1).sum() / gap.shape[0]


def at_stage_losses(f_s: Sequence[Tensor], f_t: Sequence[Tensor], p: float = 2.0, mode: str = "code") -> Tensor:
    """AT loss of every (student, teacher) stage pair, shape (L,), in the compute dtype.

    The teacher is detached: it never receives a gradient.
    """
    map_mode, loss = AT_MODES[mode]
    stage_losses = [
        _stage_loss(*align_spatial(student, teacher.detach()), p, map_mode, loss) for student, teacher in zip(f_s, f_t)
    ]
    return torch.stack(stage_losses)
