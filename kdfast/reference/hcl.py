"""Eager reference of ReviewKD's hierarchical context loss (HCL; ../shared/METHODS.md, ReviewKD), the
ground truth of every fused backend of the ``hcl`` op.

For one stage, with the student's fused feature ``fs`` and the teacher's ``ft`` (both (B, C, H, W)
of one shape) and the pooling levels ``levels`` (the peers': 4, 2, 1)::

    active  = [l for l in levels if l < H]          (the peers skip a level l >= H, tested on H)
    w_j     = 2^-(j + 1) for the j-th active level  (halving from 1: 1/2, 1/4, 1/8, ...)
    loss    = (MSE(fs, ft) + sum_j w_j MSE(pool_l(fs), pool_l(ft))) / (1 + sum_j w_j)

``MSE`` is the mean over every element (``F.mse_loss``), ``pool_l`` torch's
``adaptive_avg_pool2d`` to (l, l) (bins ``floor(i H / l) .. ceil((i + 1) H / l)``, overlapping
where l does not divide H; columns alike). The HCL of a list of stages is the sum of the stage
losses. Gradients flow to ``fs`` only (the teacher is detached):
``d loss / d fs[y, x] = (2 / tot) (d[y, x] / (B C H W) + sum_j w_j sum_{bins k of level l_j
holding (y, x)} D_k / (B C l_j^2 area_k))`` with ``d = fs - ft`` and ``D_k`` the bin mean of d.

Computed in float32 (float64 for a float64 student), whatever the input dtypes. The loss weight
(1.0, with a linear warm-up, on CIFAR) is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import compute_dtype
from kdfast.numerics.hcl import LEVELS, active_levels


def stage_loss(f_s: Tensor, f_t: Tensor, levels: Sequence[int] = LEVELS) -> Tensor:
    """The HCL of one stage (0-d), see the module docstring."""
    dtype = compute_dtype(f_s.dtype)
    s, t = f_s.to(dtype), f_t.detach().to(dtype)
    # differences first: an inference-mode teacher is never saved for the backward
    loss = (s - t).pow(2).mean()
    active, total = active_levels(f_s.shape[2], levels)
    for level, weight in active:
        pooled = F.adaptive_avg_pool2d(s, (level, level)) - F.adaptive_avg_pool2d(t, (level, level))
        loss = loss + pooled.pow(2).mean() * weight
    return loss / total


def hcl_stage_losses(f_s: Sequence[Tensor], f_t: Sequence[Tensor], levels: Sequence[int] = LEVELS) -> Tensor:
    """(L,) HCL of every (student, teacher) stage pair."""
    return torch.stack([stage_loss(s, t, levels) for s, t in zip(f_s, f_t, strict=True)])


def hcl_loss(f_s: Sequence[Tensor], f_t: Sequence[Tensor], levels: Sequence[int] = LEVELS, reduction: str = "sum") -> Tensor:
    """The HCL summed over the stages ("sum", 0-d) or per stage ("none", (L,))."""
    losses = hcl_stage_losses(f_s, f_t, levels)
    return losses.sum() if reduction == "sum" else losses
