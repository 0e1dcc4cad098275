"""Eager reference of the similarity-preserving (SP) loss (Tung & Mori 2019), as mdistiller
computes it (``similarity_loss`` in mdistiller/distillers/SP.py); ground truth of every fused
backend. It materialises the B x B matrices, which the fused kernels never do.

With ``X = flatten(f)`` (B, D) per network (any rank >= 2, flattened from dim 1)::

    G = normalize(X X^T)          row-wise: G[i] = S[i] / max(||S[i]||_2, 1e-12) (F.normalize)
    loss = ||G_s - G_t||_F^2 / B^2

Student and teacher may have different D (a Gram matrix is B x B either way); the order of the
D elements does not matter (a channels_last map may be flattened in memory order). Computed in
float32 (float64 for float64 students; the teacher is converted to that dtype first and
detached). The usual loss weight (3000 on CIFAR) is the caller's. mdistiller returns a (1,)
tensor; this returns a 0-d one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import EPS, compute_dtype, matmul


def similarity(f: Tensor, dtype) -> Tensor:
    """Row-normalised Gram matrix ``normalize(X X^T)`` (B, B) of ``X = flatten(f)`` in `dtype`."""
    x = f.flatten(1).to(dtype)
    return F.normalize(matmul(x, x.T), p=2.0, dim=1, eps=EPS)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``||G_s - G_t||_F^2 / B^2`` (0-d) in the compute dtype of the student."""
    dtype = compute_dtype(f_s.dtype)
    diff = similarity(f_s, dtype) - similarity(f_t.detach(), dtype)
    return diff.pow(2).sum() / f_s.shape[0] ** 2
