"""Eager reference of the map-distance op: the attention-weighted distances between every student
and every teacher map of AFD (Ji et al., AAAI 2021) and RTK (Yang et al. 2022), ../shared/METHODS.md.
Ground truth of every fused backend and the ``backend="torch"`` implementation; any floating dtype,
float64 included (float16/bfloat16 are computed in float32).

Student maps ``f_s[s]`` (B, C_s, H_s, W_s), s < S; teacher maps ``f_t[t]`` (B, C_t, H_t, W_t),
t < T; attention weights ``att`` (B, T, S) (AFD: a softmax over s; RTK: over the top-r keys).

* Values, with ``pool_t`` the adaptive average pooling to (H_t, W_t) (the identity where the
  sizes agree; it upsamples where the student map is smaller) and ``normalize`` the L2
  normalisation along the flattened positions (``F.normalize``, eps 1e-12)::

      v_t[t]     = normalize(flatten(mean_c f_t[t]^2))                              (B, H_t W_t)
      v_s[s @ t] = normalize(flatten(pool_t(mean_c f_s[s]^2)))        pool="map"      (AFD's code)
      v_s[s @ t] = normalize(flatten(mean_c pool_t(f_s[s])^2))        pool="feature"

  ``pool="map"`` is what AFD's public code computes (its ``Sample`` module squares, averages the
  channels, then pools); ``pool="feature"`` pools the feature map itself first.
* Distances and loss, N_t = H_t W_t::

      dist[b, t, s] = mean_n (v_s[s @ t][b, n] - v_t[t][b, n])^2
      loss          = (1/B) sum_{b,t,s} att[b, t, s] dist[b, t, s]

  i.e. AFD's ``sum_t mean_b sum_s att * dist`` (its ``cal_diff`` per teacher map, summed).

The student values depend on t only through (H_t, W_t): the teachers are grouped by spatial size
(:func:`size_groups`), and one (B, S, N) student value tensor serves a whole group. The teacher
never receives a gradient; ``att`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdfast.numerics.map_distance import group_order, size_groups, values
from kdfast.reference.at import at_map


def reference_raw_maps(feats: list[Tensor]) -> list[Tensor]:
    """``mean_c f^2`` of every map, (B, H*W) in the compute dtype."""
    return [at_map(f, 2.0, "mean") for f in feats]


def pair_distances(v_s: Tensor, v_t: Tensor) -> Tensor:
    """``dist[b, t, s] = mean_n (v_s[b, s, n] - v_t[b, t, n])^2`` of one group, (B, T_u, S)."""
    return (v_s.unsqueeze(1) - v_t.unsqueeze(2)).pow(2).mean(-1)


def map_distances(f_s: Sequence[Tensor], f_t: Sequence[Tensor], pool: str = "map") -> Tensor:
    """(B, T, S) distances in the teachers' order, in the student's compute dtype."""
    v_s, v_t = values(f_s, f_t, pool, reference_raw_maps)
    dist = torch.cat([pair_distances(s, t) for s, t in zip(v_s, v_t)], 1)
    return dist[:, group_order(size_groups(f_t))[1]]


def map_distance_loss(f_s: Sequence[Tensor], f_t: Sequence[Tensor], att: Tensor, pool: str = "map") -> Tensor:
    """The 0-d loss in the student's compute dtype, computed as AFD's code does: per teacher map,
    ``(v_s - v_t.unsqueeze(1)).pow(2).mean(2)`` against all student values of its size, weighted
    by ``att[:, t]``, summed over s, averaged over b; summed over t."""
    v_s, v_t = values(f_s, f_t, pool, reference_raw_maps)
    att = att.to(v_s[0].dtype)
    loss = att.new_zeros(())
    for u, (_, ts) in enumerate(size_groups(f_t)):
        for i, t in enumerate(ts):
            diff = (v_s[u] - v_t[u][:, i].unsqueeze(1)).pow(2).mean(2)
            loss = loss + (diff * att[:, t]).sum(1).mean()
    return loss
