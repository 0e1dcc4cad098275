"""Backend "torch" of local correlation consistency (LCC): eager PyTorch, autograd through torch's ops.

With the maps prepared by :func:`kdfast.numerics.lcc.prepare` (aligned, masked, pooled so that the
grid k divides H and W into regions of rh x rw), row ``n = i * k^2 + p`` of sample i and region p::

    u[n] = x[n] / max(||x[n]||_2, 1e-12)     x[n]: region p of f[i] flattened in (c, y, x) order
    S = U U^T (per network, in its compute dtype),   D2 = (S_s - S_t)^2

Viewing D2 as (B, k^2, B, k^2) blocks ``D2[i, p, j, q]``, the three terms are its mean over the
entries with i = j (intra), i != j and p = q (inter), i != j and p != q (cross); a term without
entries is 0. Each N x N matrix is built once (N = B k^2); the terms are reduced from per-block sums
(B x B), so no N x N mask is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import EPS, compute_dtype, matmul
from kdfast.numerics.lcc import prepare, term_counts


def unit_regions(f: Tensor, grid: int) -> Tensor:
    """(B * k^2, C * rh * rw) region descriptors of a prepared map, L2-normalised (norm clamped to
    EPS), in the map's compute dtype: the non-overlapping rh x rw patches that ``unfold`` extracts
    are exactly the regions, in row-major region order and (c, y, x) element order."""
    height, width = f.shape[-2:]
    patch = (height // grid, width // grid)
    rows = F.unfold(f.to(compute_dtype(f.dtype)), kernel_size=patch, stride=patch).transpose(1, 2).flatten(0, 1)
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(EPS)


def self_similarity(f: Tensor, grid: int) -> Tensor:
    """S = U U^T (N x N) of the normalised region descriptors, in the map's compute dtype."""
    units = unit_regions(f, grid)
    return matmul(units, units.mT)


def off_diagonal_sum(pairs: Tensor) -> Tensor:
    """Sum of a (B, B) matrix's entries with i != j; the diagonal is dropped by selection (not by
    subtraction), so a non-finite diagonal entry does not leak into the result."""
    batch = pairs.shape[0]
    other = ~torch.eye(batch, dtype=torch.bool, device=pairs.device)
    return torch.where(other, pairs, 0).sum()


def lcc_terms(f_s: Tensor, f_t: Tensor, grid: int = 4, mask: Tensor | None = None) -> Tensor:
    """(3,) unweighted term losses [L_intra, L_inter, L_cross] (float32; float64 for float64 students).

    The teacher is detached; the student gets its gradient through autograd."""
    f_s, f_t = prepare(f_s, f_t.detach(), grid, mask)
    dtype = compute_dtype(f_s.dtype)
    batch, positions = f_s.shape[0], grid * grid
    delta = self_similarity(f_t, grid).to(dtype).neg_().add_(self_similarity(f_s, grid))
    blocks = delta.square().view(batch, positions, batch, positions)
    same_position = torch.diagonal(blocks, dim1=1, dim2=3).sum(-1)  # (B, B): sum over p = q
    intra = torch.diagonal(blocks, dim1=0, dim2=2).sum()
    count_intra, count_inter, count_cross = term_counts(batch, grid)
    zero = blocks.new_zeros(())
    inter = off_diagonal_sum(same_position) / count_inter if count_inter else zero
    cross = off_diagonal_sum(blocks.sum((1, 3)) - same_position) / count_cross if count_cross else zero
    return torch.stack([intra / count_intra, inter, cross])
