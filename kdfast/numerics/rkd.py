"""Relational KD: the reductions and the weighting of the two terms.

Ground floor (kdfast/numerics): used by the eager references and by the fused path alike."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("sum", "none")


def weigh(terms: Tensor, distance_weight: float, angle_weight: float, reduction: str) -> Tensor:
    """The (2,) unweighted terms -> the weighted sum ("sum") or the (2,) weighted terms ("none")."""
    weighted = torch.stack((terms[0] * distance_weight, terms[1] * angle_weight))
    return weighted.sum() if reduction == "sum" else weighted
