"""Eager reference of the block-attention op family: LAKD's non-directional activation maps (NDAM)
and AFT-KD's attention and feature blocks (../shared/METHODS.md). Ground truth of every fused
backend and the ``backend="torch"`` implementation; any floating dtype, float64 included
(float16/bfloat16 are computed in float32).

Per module (or stage) l: ``f_s`` the student map (B, Cs, Hs, Ws) (the module's own output),
``h_s`` its connector output (B, Ct, H, W) and ``f_t`` the teacher map (B, Ct, H, W).

* Block map with grid g and power p >= 1 (p = 1: LAKD's NDAM; p = 2: AFT's attention block)::

      P(f)[b, i, j] = adaptive_avg_pool2d(mean_c |f|^p, (g, g))[b, i, j]
      A(f) = P / max(||P[b]||_2, 1e-12)          flattened to (B, g*g)

  The bins are torch's adaptive pooling ones (rows floor(i H / g) .. ceil((i + 1) H / g) - 1,
  columns alike): they overlap when g does not divide H, and g may exceed H.
* Two unweighted terms per module::

      map  = mean_{b, k} (A(f_s) - A(f_t))^2
      feat = mean_{b,c,y,x} (h - t)^2                          feature_grid 0
           = mean_{b,c,y,x} w[b, y, x] (h - t)^2               feature_grid 0, teacher weighting
           = mean_{b,c,i,j} (pool_b(h) - pool_b(t))^2           feature_grid b > 0 (AFT)

  with ``w[b, y, x] = A_t[b, floor(y g / H), floor(x g / W)]`` (the teacher's map as (B, g, g),
  nearest-upsampled to H x W) divided by ``max(mean_{y,x} of it, 1e-12)`` (mean 1), and
  ``pool_b`` the adaptive average pooling to (b, b).

The teacher never receives a gradient; ``w`` is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.block_attention import block_map
from kdfast.numerics.common import EPS, align_spatial, compute_dtype


def teacher_weight(a_t: Tensor, grid: int, height: int, width: int) -> Tensor:
    """``w`` (B, H, W): the teacher's block map ``a_t`` (B, g*g) nearest-upsampled to H x W
    (cell ``(floor(y g / H), floor(x g / W))``) and divided by ``max(mean_{y,x}, 1e-12)``."""
    rows = torch.arange(height, device=a_t.device) * grid // height
    cols = torch.arange(width, device=a_t.device) * grid // width
    w = a_t.view(-1, grid, grid)[:, rows[:, None], cols[None, :]]
    return w / w.mean((1, 2), keepdim=True).clamp_min(EPS)


def feature_term(h: Tensor, t: Tensor, a_t: Tensor, grid: int, feature_grid: int, teacher_weighting: bool) -> Tensor:
    """``feat`` of one module (0-d) from ``h``, ``t`` of equal shapes in the compute dtype and the
    teacher's block map ``a_t``."""
    if feature_grid > 0:
        size = (feature_grid, feature_grid)
        return (F.adaptive_avg_pool2d(h, size) - F.adaptive_avg_pool2d(t, size)).pow(2).mean()
    sq = (h - t).pow(2)
    if teacher_weighting:
        sq = sq * teacher_weight(a_t, grid, h.shape[2], h.shape[3]).unsqueeze(1)
    return sq.mean()


def block_attention_terms(
    f_s: Sequence[Tensor],
    h_s: Sequence[Tensor],
    f_t: Sequence[Tensor],
    grid: int = 4,
    power: float = 1.0,
    feature_grid: int = 0,
    teacher_weighting: bool = False,
) -> Tensor:
    """(L, 2) unweighted terms ``[feat, map]`` of every module, in the compute dtype of ``f_s[0]``.

    Where ``h_s[l]`` and ``f_t[l]`` differ in H x W, the larger is adaptive-average-pooled to the
    smaller first (in its own dtype, as every backend does). The teacher is detached.
    """
    dtype = compute_dtype(f_s[0].dtype)
    rows = []
    with torch.autocast(f_s[0].device.type, enabled=False):
        for s, h, t in zip(f_s, h_s, f_t):
            h, t = align_spatial(h, t.detach())
            a_s = block_map(s.to(dtype), grid, power)
            a_t = block_map(t.to(dtype), grid, power)
            feat = feature_term(h.to(dtype), t.to(dtype), a_t, grid, feature_grid, teacher_weighting)
            rows.append(torch.stack([feat, (a_s - a_t).pow(2).mean()]))
    return torch.stack(rows)
