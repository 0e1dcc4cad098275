"""Backend "torch" of the similarity-preserving (SP) loss (Tung & Mori 2019, mdistiller's
``similarity_loss``).

With ``X = flatten(f)`` (B, D) per network, ``S = X X^T`` and ``G[i] = S[i] / max(||S[i]||_2, EPS)``::

    loss = ||G_s - G_t||_F^2 / B^2        (0-d)

(kdfast/ops/sp.py, METHODS.md). Computed in the compute dtype of ``f_s``, the teacher converted to
it and detached; the B x B matrices are materialised (the fused kernels avoid them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.numerics.common import EPS, compute_dtype, matmul


def row_normalised_gram(f: Tensor, dtype: torch.dtype) -> Tensor:
    """``G = S / max(||S_i||_2, EPS)`` row-wise, ``S = X X^T`` of ``X = f.flatten(1)`` in `dtype`, (B, B)."""
    rows = f.flatten(1).to(dtype)
    gram = matmul(rows, rows.T)
    return gram / torch.linalg.vector_norm(gram, dim=1, keepdim=True).clamp_min(EPS)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``||G_s - G_t||_F^2 / B^2`` (0-d); the difference is formed in place in ``G_s`` (the
    division's backward keeps its inputs, not its output)."""
    dtype = compute_dtype(f_s.dtype)
    diff = row_normalised_gram(f_s, dtype).sub_(row_normalised_gram(f_t.detach(), dtype))
    return diff.square().sum() / f_s.shape[0] ** 2
