"""Map distances (AFD, RTK), eager: the distances and the loss of backend "torch".

The values (:func:`kdfast.numerics.map_distance.values`) are the L2-normalised ``mean_c f^2`` maps,
one (B, S, N_u) student tensor and one (B, T_u, N_u) teacher tensor per teacher size group u.
Distances and loss::

    dist[b, t, s] = mean_n (v_s[s @ t][b, n] - v_t[t][b, n])^2 = ||v_s - v_t||_2^2 / N_t
    loss          = (1/B) sum_{b,t,s} att[b, t, s] dist[b, t, s]

Each group's distances come from one pairwise-distance call (no (B, T_u, S, N_u) difference tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdfast.eager.at import channel_reduced_map
from kdfast.numerics.map_distance import group_order, size_groups, values


def _square_maps(feats: list[Tensor]) -> list[Tensor]:
    """``mean_c f^2`` of every map, (B, H*W) in the compute dtype."""
    return [channel_reduced_map(feat, 2.0, "mean") for feat in feats]


def _group_distances(v_s: Tensor, v_t: Tensor) -> Tensor:
    """(B, T_u, S) mean squared differences between every teacher and every student value row."""
    with torch.autocast(v_s.device.type, enabled=False):
        euclid = torch.cdist(v_t, v_s, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return euclid.square() / v_s.shape[-1]


def _distances_by_group(f_s: Sequence[Tensor], f_t: Sequence[Tensor], pool: str) -> Tensor:
    """(B, T, S) distances with the teachers in group order (:func:`group_order`)."""
    v_s, v_t = values(f_s, f_t, pool, _square_maps)
    return torch.cat([_group_distances(s, t) for s, t in zip(v_s, v_t)], dim=1)


def map_distances(f_s: Sequence[Tensor], f_t: Sequence[Tensor], pool: str = "map") -> Tensor:
    """(B, T, S) distances in the teachers' order, in the student's compute dtype."""
    _, position = group_order(size_groups(f_t))
    return _distances_by_group(f_s, f_t, pool)[:, position]


def map_distance_loss(f_s: Sequence[Tensor], f_t: Sequence[Tensor], att: Tensor, pool: str = "map") -> Tensor:
    """The 0-d loss ``sum_{b,t,s} att * dist / B`` in the student's compute dtype; the teacher
    gets no gradient, ``att`` and the students do."""
    order, _ = group_order(size_groups(f_t))
    dist = _distances_by_group(f_s, f_t, pool)
    weights = att.to(dist.dtype)[:, order]
    return torch.sum(weights * dist) / dist.shape[0]
