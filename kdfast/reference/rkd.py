"""Eager reference of the relational KD loss (RKD, Park et al. 2019), as mdistiller computes it
(``rkd_loss`` in mdistiller/distillers/RKD.py, squared=False, eps=1e-12); ground truth of every
fused backend. It builds the B x B x D difference tensor, which the fused kernels never do.

Embeddings ``e = flatten(f)`` (B, D) per network (any rank >= 2, flattened from dim 1); Ds and
Dt may differ. With ``eps = 1e-12``:

* Distance term. ``d_ij = sqrt(max(||e_i||^2 + ||e_j||^2 - 2 <e_i, e_j>, eps))`` for i != j and
  ``d_ii = 0`` (mdistiller's ``_pdist``: every off-diagonal distance is >= 1e-6, duplicated rows
  included). ``x = d / mean(d[d > 0])`` per network;
  ``L_dist = mean_ij smooth_l1(x_s - x_t)`` over the B^2 entries.
* Angle term. ``n_ij = normalize(e_j - e_i)`` (``v / max(||v||_2, eps)``: 0 for j == i and for
  duplicated rows), ``cos_ijk = <n_ij, n_ik>``, the angle at the FIRST index i (mdistiller's
  ``e.unsqueeze(0) - e.unsqueeze(1)``; ../shared/METHODS.md names it "at j", which is the same
  set of angles with the indices renamed); ``L_angle = mean_ijk smooth_l1(cos_s - cos_t)`` over
  the B^3 triplets.

``smooth_l1(z) = 0.5 z^2 if |z| < 1 else |z| - 0.5`` (beta = 1). The loss is
``distance_weight * L_dist + angle_weight * L_angle`` (25 and 50 in mdistiller).

Decided here (mdistiller does not define it): with B = 1 there is no positive distance, so
mdistiller's mean is NaN; here the normalised distances are then 0 and the whole loss is 0 (the
angle term of B = 1 is 0 anyway). Computed in float32 (float64 for float64 students; the teacher
is converted to that dtype first and detached). NaN/Inf in the embeddings give a NaN loss.

Precision: like mdistiller, the distances come from ``|e_i|^2 + |e_j|^2 - 2 <e_i, e_j>``, so in
float32 a duplicated pair gets rounding noise of |e|^2 (a distance of ~1e-3 instead of the
clamped 1e-6, with a gradient). The fused kernels sum the squared differences themselves and are
exact there; they are tested against this reference in float64, where both agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import EPS, compute_dtype, matmul
from kdfast.numerics.rkd import weigh


def pairwise_distances(e: Tensor) -> Tensor:
    """mdistiller's ``_pdist(e, squared=False, eps=1e-12)``: (B, B), 0 on the diagonal."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * matmul(e, e.T)).clamp(min=EPS).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return torch.where(eye, 0.0, d)


def normalized_distances(e: Tensor) -> Tensor:
    """``d / mean(d[d > 0])`` (all 0 when no distance is positive, i.e. B = 1)."""
    d = pairwise_distances(e)
    positive = d > 0
    count = positive.sum().to(d.dtype)
    total = torch.where(positive, d, 0.0).sum()
    scale = torch.where(count > 0, count / torch.where(count > 0, total, 1.0), 0.0)
    return d * scale


def angles(e: Tensor) -> Tensor:
    """(B, B, B) ``cos_ijk = <normalize(e_j - e_i), normalize(e_k - e_i)>``."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[i, j] = e_j - e_i
    unit = F.normalize(diff, p=2.0, dim=2, eps=EPS)
    return matmul(unit, unit.transpose(1, 2))


def rkd_terms(e_s: Tensor, e_t: Tensor) -> Tensor:
    """(2,) unweighted ``[L_dist, L_angle]`` in the compute dtype of the student."""
    dtype = compute_dtype(e_s.dtype)
    s = e_s.flatten(1).to(dtype)
    t = e_t.detach().flatten(1).to(dtype)
    distance = F.smooth_l1_loss(normalized_distances(s), normalized_distances(t), beta=1.0)
    angle = F.smooth_l1_loss(angles(s), angles(t), beta=1.0)
    return torch.stack((distance, angle))


def rkd_loss(
    e_s: Tensor, e_t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0, reduction: str = "sum"
) -> Tensor:
    """``distance_weight * L_dist + angle_weight * L_angle`` ("sum") or the (2,) weighted terms ("none")."""
    terms = rkd_terms(e_s, e_t)
    return weigh(terms, distance_weight, angle_weight, reduction)
