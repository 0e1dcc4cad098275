"""Local correlation consistency: the terms, the preparation of the maps the kernels take, the weighting.

Ground floor (kdfast/numerics): used by the eager references and by the fused path alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import align_spatial

TERMS = ("intra", "inter", "cross")


def grid_size(height: int, width: int, grid: int) -> tuple[int, int]:
    """Spatial size a map is pooled to so that a k x k grid divides it."""
    return grid * max(1, height // grid), grid * max(1, width // grid)


def term_counts(batch: int, grid: int) -> tuple[int, int, int]:
    """Number of ordered (n, m) entries of the intra, inter and cross terms."""
    positions = grid * grid
    return batch * positions**2, positions * batch * (batch - 1), batch * (batch - 1) * positions * (positions - 1)


def prepare(f_s: Tensor, f_t: Tensor, grid: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Aligned, masked maps whose height and width the grid divides (what the kernels take)."""
    f_s, f_t = align_spatial(f_s, f_t)
    if mask is not None:
        mask = mask.detach()
        if tuple(mask.shape[-2:]) != tuple(f_s.shape[-2:]):
            mask = F.adaptive_avg_pool2d(mask, (f_s.shape[-2], f_s.shape[-1]))
        f_s, f_t = f_s * mask.to(f_s.dtype), f_t * mask.to(f_t.dtype)
    size = grid_size(f_s.shape[-2], f_s.shape[-1], grid)
    if tuple(f_s.shape[-2:]) != size:
        f_s, f_t = F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def weigh_terms(losses: Tensor, terms: tuple[str, ...], weights: tuple[float, float, float], reduction: str) -> Tensor:
    """The (3,) term losses weighted (0 for terms not selected), summed for reduction "sum".
    Scaled by Python numbers: no host-to-device copy (which would wait for the GPU)."""
    weighted = torch.stack([loss * (w if name in terms else 0.0) for loss, name, w in zip(losses.unbind(), TERMS, weights)])
    return weighted.sum() if reduction == "sum" else weighted
