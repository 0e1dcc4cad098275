"""Eager reference of SoKD's masked feature loss (../shared/METHODS.md, SoKD: ``L_DA = ||M * (phi(fs) - s(ft))||^2``,
the wrapped method's feature loss restricted to the area of mutual interest M); ground truth of
every fused backend. It builds the (B, C, H, W) masked difference, which the fused kernels never do.

With ``x``, ``y`` (B, C, H, W) (the student's connector output and the refined teacher feature)
and a spatial mask ``m`` (B, 1, H, W) or (B, H, W), broadcast over the channels::

    loss = sum_{b,c,h,w} (m[b,h,w] * (x[b,c,h,w] - y[b,c,h,w]))^2 / denom

    reduction "mean":        denom = B * C * H * W              (F.mse_loss of the masked maps)
    reduction "masked_mean": denom = C * sum_{b,h,w} m[b,h,w]^2  (the mean over the masked-in area;
                             the loss is 0 where that sum is 0: an all-zero mask)
    reduction "sum":         denom = 1

Gradients flow to ``x`` and ``y`` (``y`` may be a trainable function of the teacher's features:
SoKD's augmentation module), never to the mask:
``d loss / d x = 2 m^2 (x - y) / denom = -d loss / d y``. Computed in float32 (float64 when x or
y is float64): x and y are converted to the compute dtype of their promoted dtype, the mask too.
The loss weight (1000 for resnet32x4 -> resnet8x4 in the paper) is the caller's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.numerics.common import compute_dtype


def loss_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    """float64 when x or y is float64, else float32."""
    return compute_dtype(torch.promote_types(x.dtype, y.dtype))


def scale(mask_sq_sum: Tensor, numel: int, channels: int, reduction: str) -> Tensor:
    """``1 / denom`` (0 where a "masked_mean" denominator is 0) from ``sum m^2`` over (b, h, w)."""
    if reduction == "mean":
        return mask_sq_sum.new_tensor(1.0 / numel)
    if reduction == "sum":
        return mask_sq_sum.new_tensor(1.0)
    denom = channels * mask_sq_sum
    positive = denom > 0
    return torch.where(positive, 1.0 / torch.where(positive, denom, 1.0), 0.0)


def masked_mse(x: Tensor, y: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """``sum (m * (x - y))^2 / denom`` (0-d) in :func:`loss_dtype`; see the module docstring."""
    dtype = loss_dtype(x, y)
    m = mask.detach().to(dtype)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    weight = m.pow(2)  # m^2 (x - y)^2: a new tensor, so an inference-mode mask need not be saved
    total = (weight * (x.to(dtype) - y.to(dtype)).pow(2)).sum()
    return total * scale(weight.sum(), x.numel(), x.shape[1], reduction)
