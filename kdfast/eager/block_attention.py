"""Backend "torch" of the block-attention op family (LAKD's NDAM, AFT-KD's attention and feature
blocks): eager PyTorch, autograd through torch's ops, in the compute dtype of ``f_s[0]``.

Per module, with ``A`` the normalised block map of :func:`kdfast.numerics.block_attention.block_map`
(B, g*g) and ``h``, ``t`` the connector output and the teacher map aligned to one H x W::

    map  = mean_{b,k} (A(f_s) - A(f_t))^2
    feat = mean (h - t)^2                                 feature_grid 0
         = mean (pool_b(h) - pool_b(t))^2                 feature_grid b > 0
         = (1 / (B H W)) sum_b  sum_{i,j} A_t[b,i,j] Q[b,i,j] / max(m[b], 1e-12)   teacher weighting

where, for the teacher weighting, ``q = mean_c (h - t)^2`` (B, H, W), ``Q[b, i, j]`` sums q over
the pixels whose nearest cell is (i, j) (row ``floor(y g / H)``, column ``floor(x g / W)``) and
``m[b] = (1 / (H W)) sum_{i,j} A_t[b,i,j] n_i n_j`` is the mean of the nearest-upsampled teacher
map (n_i, n_j: the cell's pixel rows and columns). This is the mean of ``w (h - t)^2`` with
``w`` the upsampled map divided by its mean, computed without building ``w`` (B, H, W) nor the
weighted (B, C, H, W) product. The teacher is detached and never saved for backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.block_attention import block_map
from kdfast.numerics.common import EPS, align_spatial, compute_dtype


def nearest_cells(size: int, grid: int, device: torch.device) -> Tensor:
    """The nearest cell ``floor(y g / size)`` of every pixel row (or column) y, (size,) int64."""
    return torch.arange(size, device=device) * grid // size


def cell_sums(q: Tensor, grid: int) -> Tensor:
    """(B, g, g) sums of ``q`` (B, H, W) over the pixels of each nearest cell (exact adds, so a
    non-finite pixel stays in its own cell)."""
    batch, height, width = q.shape
    rows = q.new_zeros(batch, grid, width).index_add(1, nearest_cells(height, grid, q.device), q)
    return q.new_zeros(batch, grid, grid).index_add(2, nearest_cells(width, grid, q.device), rows)


def upsampled_mean(a_t: Tensor, grid: int, height: int, width: int) -> Tensor:
    """(B,) mean over H x W of the teacher map ``a_t`` (B, g*g) nearest-upsampled to H x W: each
    cell weighted by its pixel count."""
    rows = torch.bincount(nearest_cells(height, grid, a_t.device), minlength=grid).to(a_t.dtype)
    cols = torch.bincount(nearest_cells(width, grid, a_t.device), minlength=grid).to(a_t.dtype)
    return (a_t.view(-1, grid, grid) * rows[:, None] * cols[None, :]).sum((1, 2)) / (height * width)


def teacher_weighted_error(h: Tensor, t: Tensor, a_t: Tensor, grid: int) -> Tensor:
    """Mean of ``w (h - t)^2`` over (B, C, H, W), ``w`` the teacher map upsampled and normalised to
    mean 1 per sample (module docstring)."""
    batch, _, height, width = h.shape
    per_pixel = (h - t).square().mean(1)
    weighted = (a_t.view(batch, grid, grid) * cell_sums(per_pixel, grid)).sum((1, 2))
    return (weighted / upsampled_mean(a_t, grid, height, width).clamp_min(EPS)).sum() / (batch * height * width)


def feature_error(h: Tensor, t: Tensor, a_t: Tensor, grid: int, feature_grid: int, teacher_weighting: bool) -> Tensor:
    """``feat`` (0-d) of one module from ``h`` and ``t`` in the compute dtype, one H x W."""
    if feature_grid > 0:
        size = (feature_grid, feature_grid)
        return (F.adaptive_avg_pool2d(h, size) - F.adaptive_avg_pool2d(t, size)).square().mean()
    if teacher_weighting:
        return teacher_weighted_error(h, t, a_t, grid)
    return (h - t).square().mean()


def module_terms(
    s: Tensor, h: Tensor, t: Tensor, dtype: torch.dtype, grid: int, power: float, feature_grid: int, teacher_weighting: bool
) -> Tensor:
    """(2,) ``[feat, map]`` of one module in ``dtype``; ``t`` is the detached teacher."""
    h, t = align_spatial(h, t)
    a_t = block_map(t.to(dtype), grid, power)
    map_error = (block_map(s.to(dtype), grid, power) - a_t).square().mean()
    return torch.stack([feature_error(h.to(dtype), t.to(dtype), a_t, grid, feature_grid, teacher_weighting), map_error])


def block_attention_terms(
    f_s: Sequence[Tensor],
    h_s: Sequence[Tensor],
    f_t: Sequence[Tensor],
    grid: int = 4,
    power: float = 1.0,
    feature_grid: int = 0,
    teacher_weighting: bool = False,
) -> Tensor:
    """(L, 2) unweighted terms ``[feat, map]`` of every module, in the compute dtype of ``f_s[0]``
    (autocast off). Where ``h_s[l]`` and ``f_t[l]`` differ in H x W, the larger is
    adaptive-average-pooled to the smaller first, in its own dtype. The teacher is detached."""
    dtype = compute_dtype(f_s[0].dtype)
    with torch.autocast(f_s[0].device.type, enabled=False):
        rows = [
            module_terms(s, h, t.detach(), dtype, grid, power, feature_grid, teacher_weighting) for s, h, t in zip(f_s, h_s, f_t)
        ]
    return torch.stack(rows)
