"""Backend "torch" of the relational KD loss (RKD; formulas: kdfast/ops/rkd.py, METHODS.md RKD).

Everything comes from the exact pairwise distances ``r_ij = ||e_i - e_j||`` (``torch.cdist``
without the Gram-matrix shortcut, made bitwise symmetric with a zero diagonal), so no B x B x D
tensor is built and duplicated rows are at distance exactly 0. With ``eps = 1e-12``:

* ``d_ij = sqrt(max(r_ij^2, eps))`` off the diagonal, ``d_ii = 0``; ``x = d * B (B - 1) / sum d``
  (0 when B = 1); ``L_dist = mean_ij smooth_l1(x_s - x_t)``.
* ``cos_ijk = <e_j - e_i, e_k - e_i> / (max(r_ij, eps) max(r_ik, eps))`` with the inner product
  ``(r_ij^2 + r_ik^2 - r_jk^2) / 2`` (0 whenever j == i or k == i);
  ``L_angle = mean_ijk smooth_l1(cos_s - cos_t)``.

``smooth_l1`` has beta 1. Computed in the student's compute dtype (float64 stays float64, else
float32); the teacher is detached and converted to it. NaN/Inf in an embedding give NaN terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import EPS, compute_dtype


def exact_distances(e: Tensor) -> Tensor:
    """(B, B) ``||e_i - e_j||`` from the differences (no Gram matrix): symmetric, 0 on the diagonal."""
    with torch.autocast(e.device.type, enabled=False):
        r = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")
    upper = r.triu(1)
    return upper + upper.T


def normalized_distances(r: Tensor) -> Tensor:
    """``d / mean of the off-diagonal d`` with ``d = sqrt(max(r^2, eps))`` off the diagonal, 0 on it."""
    batch = r.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=r.device)
    d = torch.where(off_diagonal, r.square().clamp(min=EPS).sqrt(), 0.0)
    if batch < 2:
        return d
    return d * (batch * (batch - 1) / d.sum())


def angle_cosines(r: Tensor) -> Tensor:
    """(B, B, B) ``cos_ijk`` between ``e_j - e_i`` and ``e_k - e_i`` from the distances ``r``."""
    sq = r.square()
    inner = (sq.unsqueeze(2) + sq.unsqueeze(1) - sq.unsqueeze(0)) * 0.5  # [i, j, k]: r_ij^2 + r_ik^2 - r_jk^2
    inverse_length = r.clamp(min=EPS).reciprocal()
    return inner * inverse_length.unsqueeze(2) * inverse_length.unsqueeze(1)


def rkd_terms(e_s: Tensor, e_t: Tensor) -> Tensor:
    """(2,) unweighted ``[L_dist, L_angle]`` in the compute dtype of the student."""
    dtype = compute_dtype(e_s.dtype)
    r_s = exact_distances(e_s.flatten(1).to(dtype))
    r_t = exact_distances(e_t.detach().flatten(1).to(dtype))
    distance = F.smooth_l1_loss(normalized_distances(r_s), normalized_distances(r_t), beta=1.0)
    angle = F.smooth_l1_loss(angle_cosines(r_s), angle_cosines(r_t), beta=1.0)
    return torch.stack((distance, angle))
