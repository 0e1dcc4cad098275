"""Eager reference of local correlation consistency (LCC, Li et al., ECCV 2020): ground truth of
every fused backend. It materialises the N x N correlation matrices, which the kernels never do.

Both maps are aligned first (the larger adaptive-average-pooled to the smaller), optionally
multiplied by a spatial mask ``m`` (B, 1, H, W) (detached; pooled to the aligned size), then
adaptive-average-pooled to ``k * max(1, H // k)`` rows and ``k * max(1, W // k)`` columns when
the grid ``k`` does not divide them, so that all k x k regions have the same size (rh, rw).

Descriptor of region p = (py, px) of sample i, row ``n = i * k^2 + p`` (N = B * k^2 rows)::

    x[n] = flatten(f[i, :, py*rh:(py+1)*rh, px*rw:(px+1)*rw])      (D = C * rh * rw, order c, y, x)
    u[n] = x[n] / max(||x[n]||_2, 1e-12)
    S[n, m] = <u[n], u[m]>        computed within each network, so Cs != Ct needs no connector
    Delta = S_s - S_t

Entry (n, m) = ((i, p), (j, q)) is *intra* if i = j, *inter* if i != j and p = q, *cross* if
i != j and p != q. Each term is the mean of ``Delta^2`` over its ordered entries (intra: B k^4,
inter: k^2 B (B-1), cross: B (B-1) k^2 (k^2-1)); a term without entries (B = 1) is 0.
``L = w_intra * L_intra + w_inter * L_inter + w_cross * L_cross``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import EPS, compute_dtype, matmul
from kdfast.numerics.lcc import TERMS, prepare, term_counts, weigh_terms


def descriptors(f: Tensor, grid: int) -> Tensor:
    """Region descriptors (B * k^2, C * rh * rw) of a map whose height and width k divides, unnormalised."""
    batch, channels, height, width = f.shape
    rh, rw = height // grid, width // grid
    regions = f.reshape(batch, channels, grid, rh, grid, rw).permute(0, 2, 4, 1, 3, 5)
    return regions.reshape(batch * grid * grid, channels * rh * rw)


def correlation(f: Tensor, grid: int) -> Tensor:
    """The N x N correlation matrix of the L2-normalised region descriptors, in the compute dtype."""
    u = F.normalize(descriptors(f.to(compute_dtype(f.dtype)), grid), dim=1, eps=EPS)
    return matmul(u, u.T)


def term_masks(batch: int, grid: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean N x N masks of the intra, inter and cross entries."""
    positions = grid * grid
    index = torch.arange(batch * positions, device=device)
    sample, position = index // positions, index % positions
    same_sample = sample[:, None] == sample[None, :]
    same_position = position[:, None] == position[None, :]
    return same_sample, ~same_sample & same_position, ~same_sample & ~same_position


def lcc_terms(f_s: Tensor, f_t: Tensor, grid: int = 4, mask: Tensor | None = None) -> Tensor:
    """(3,) unweighted term losses [L_intra, L_inter, L_cross] (float32; float64 for float64 students)."""
    f_s, f_t = prepare(f_s, f_t.detach(), grid, mask)
    delta2 = (correlation(f_s, grid) - correlation(f_t, grid).to(compute_dtype(f_s.dtype))) ** 2
    masks = term_masks(f_s.shape[0], grid, f_s.device)
    counts = term_counts(f_s.shape[0], grid)
    return torch.stack([delta2[m].sum() / max(c, 1) for m, c in zip(masks, counts)])


def local_correlation_loss(
    f_s: Tensor,
    f_t: Tensor,
    grid: int = 4,
    terms: tuple[str, ...] = TERMS,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    mask: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:
    """Weighted LCC loss: the sum over `terms` of ``weight * L_term`` ("sum"), or the (3,) vector of
    weighted terms in TERMS order, 0 for terms not selected ("none")."""
    return weigh_terms(lcc_terms(f_s, f_t, grid, mask), terms, weights, reduction)
