"""Block attention (LAKD's NDAM, AFT-KD): the block maps, options and the weighting of the terms.

Ground floor (kdfast/numerics): used by the eager references and by the fused path alike."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import EPS, compute_dtype

TERMS = ("feat", "map")


REDUCTIONS = ("sum", "none", "terms")


WEIGHTINGS = ("none", "teacher")


def pooled_map(f: Tensor, grid: int, power: float) -> Tensor:
    """``P(f)``: the unnormalised block map ``pool_g(mean_c |f|^p)``, (B, C, H, W) -> (B, g*g),
    in the compute dtype."""
    m = f.to(compute_dtype(f.dtype)).abs().pow(power).mean(1, keepdim=True)
    return F.adaptive_avg_pool2d(m, (grid, grid)).flatten(1)


def block_map(f: Tensor, grid: int, power: float) -> Tensor:
    """``A(f) = P(f) / max(||P(f)||_2, 1e-12)`` per sample, (B, C, H, W) -> (B, g*g), in the
    compute dtype."""
    return F.normalize(pooled_map(f, grid, power), p=2.0, dim=1, eps=EPS)


def weigh(terms: Tensor, feature_weight: float, map_weight: float, reduction: str) -> Tensor:
    """The loss from the (L, 2) terms ``[feat, map]``: ``"sum"`` 0-d
    ``sum_l feature_weight * feat_l + map_weight * map_l``; ``"none"`` the (L,) weighted
    per-module losses; ``"terms"`` the unweighted terms themselves."""
    if reduction == "terms":
        return terms
    losses = feature_weight * terms[:, 0] + map_weight * terms[:, 1]
    return losses.sum() if reduction == "sum" else losses
