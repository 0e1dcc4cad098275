"""Map distances (AFD/RTK): the teachers' size groups and the values the kernels take.

Ground floor (kdfast/numerics): used by the eager references and by the fused path alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.at import normalize_map
from kdfast.numerics.common import compute_dtype

POOLS = ("map", "feature")


RawMaps = Callable[[list[Tensor]], list[Tensor]]  # feats (B, C, H, W) -> raw maps mean_c f^2 (B, H*W)


def size_groups(f_t: Sequence[Tensor]) -> list[tuple[tuple[int, int], list[int]]]:
    """The teachers' spatial sizes in order of first appearance, each with its teacher indices."""
    groups: dict[tuple[int, int], list[int]] = {}
    for t, f in enumerate(f_t):
        groups.setdefault((f.shape[-2], f.shape[-1]), []).append(t)
    return list(groups.items())


def group_order(groups: Sequence[tuple[tuple[int, int], list[int]]]) -> tuple[list[int], list[int]]:
    """``(order, position)``: the teacher indices group after group, and the place of each teacher
    in that order (``order[position[t]] == t``)."""
    order = [t for _, ts in groups for t in ts]
    position = [0] * len(order)
    for k, t in enumerate(order):
        position[t] = k
    return order, position


def pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Adaptive average pooling of (B, C, H, W) to ``size``; ``x`` itself where H x W is ``size``."""
    return x if tuple(x.shape[-2:]) == size else F.adaptive_avg_pool2d(x, size)


def values(f_s: Sequence[Tensor], f_t: Sequence[Tensor], pool: str, raw_maps: RawMaps) -> tuple[list[Tensor], list[Tensor]]:
    """Per size group u (:func:`size_groups`): the student values (B, S, N_u) and the teacher
    values (B, T_u, N_u), both in the student's compute dtype; the teacher's are detached.

    ``raw_maps`` computes ``mean_c f^2`` of a list of maps (the reference's eager formula, or the
    fused AT op in one launch per call): once for the teachers and once for the students.
    """
    groups = size_groups(f_t)
    dtype = compute_dtype(f_s[0].dtype)
    maps_t = raw_maps([t.detach() for t in f_t])
    if pool == "map":
        maps_s = raw_maps(list(f_s))
        square = [m.view(f.shape[0], 1, f.shape[2], f.shape[3]) for m, f in zip(maps_s, f_s)]
        pooled = [[pool_to(m, size).flatten(1) for m in square] for size, _ in groups]
    else:
        maps = raw_maps([pool_to(f, size) for size, _ in groups for f in f_s])
        pooled = [maps[u * len(f_s) : (u + 1) * len(f_s)] for u in range(len(groups))]
    v_s = [normalize_map(torch.stack(ms, 1)).to(dtype) for ms in pooled]
    v_t = [normalize_map(torch.stack([maps_t[t] for t in ts], 1)).to(dtype) for _, ts in groups]
    return v_s, v_t
