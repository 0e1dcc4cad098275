"""ReviewKD's hierarchical context loss (HCL), eager: the per-stage losses of backend "torch".

One stage, student ``fs`` and detached teacher ``ft`` of one (B, C, H, W) shape, with the active
levels ``l_j`` and weights ``w_j`` of :func:`kdfast.numerics.hcl.active_levels` (``tot = 1 +
sum_j w_j``)::

    loss = (mean(d^2) + sum_j w_j mean(pool_{l_j}(d)^2)) / tot,    d = fs - ft

``pool_l`` is ``adaptive_avg_pool2d`` to (l, l). Pooling is linear, so the pooled difference
``pool_l(fs) - pool_l(ft)`` is pooled from ``d`` itself: one difference tensor per stage, and the
teacher is never saved for the backward. Computed in float32 (float64 for a float64 student).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import compute_dtype
from kdfast.numerics.hcl import LEVELS, active_levels


def _mean_square(x: Tensor) -> Tensor:
    """``mean(x^2)`` over every element, 0-d."""
    return torch.mean(x * x)


def _stage_hcl(student: Tensor, teacher: Tensor, levels: Sequence[int]) -> Tensor:
    """The 0-d HCL of one stage (module docstring)."""
    dtype = compute_dtype(student.dtype)
    diff = student.to(dtype) - teacher.detach().to(dtype)
    active, total = active_levels(student.shape[2], levels)
    weighted = _mean_square(diff)
    for level, weight in active:
        weighted = weighted + weight * _mean_square(F.adaptive_avg_pool2d(diff, (level, level)))
    return weighted / total


def hcl_stage_losses(f_s: Sequence[Tensor], f_t: Sequence[Tensor], levels: Sequence[int] = LEVELS) -> Tensor:
    """(L,) HCL of every (student, teacher) stage pair; ValueError if the lists differ in length."""
    return torch.stack([_stage_hcl(student, teacher, levels) for student, teacher in zip(f_s, f_t, strict=True)])
