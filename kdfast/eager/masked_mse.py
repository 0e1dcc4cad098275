"""Backend "torch" of SoKD's masked feature loss (formula: kdfast/ops/masked_mse.py, METHODS.md SoKD).

``loss = sum_{b,h,w} m[b,h,w]^2 sum_c (x - y)[b,c,h,w]^2 / denom`` with denom ``B C H W`` ("mean"),
``C sum m^2`` ("masked_mean", the loss 0 where that sum is 0) or 1 ("sum"). The channel sum is
taken first, so the mask is applied to a (B, H, W) map and never broadcast over the channels.
Gradients reach x and y through autograd, never the mask. Computed in the compute dtype of x's
and y's promoted dtype (float64 stays float64, else float32), the mask converted to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.numerics.common import compute_dtype


def spatial_weight(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``m^2`` (B, H, W) in `dtype` from a detached (B, H, W) or (B, 1, H, W) mask of any dtype."""
    m = mask.detach()
    if m.dim() == 4:
        m = m.select(1, 0)
    return m.to(dtype).square()


def reciprocal_or_zero(denom: Tensor) -> Tensor:
    """``1 / denom``, 0 where `denom` is 0 (an all-zero mask under "masked_mean")."""
    return torch.where(denom == 0, torch.inf, denom).reciprocal()


def masked_mse(x: Tensor, y: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """The 0-d loss of the module docstring, in the compute dtype of x's and y's promoted dtype."""
    dtype = compute_dtype(torch.promote_types(x.dtype, y.dtype))
    weight = spatial_weight(mask, dtype)
    per_position = (x.to(dtype) - y.to(dtype)).square().sum(1)  # (B, H, W): sum_c (x - y)^2
    total = (weight * per_position).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / x.numel()
    return total * reciprocal_or_zero(weight.sum() * x.shape[1])
