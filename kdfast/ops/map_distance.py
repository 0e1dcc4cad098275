"""torch.library registration and backend dispatch of the map-distance op (AFD/RTK: the
attention-weighted distances between every student and every teacher map; formulas in
kdfast/reference/map_distance.py).

The functional layer groups the teacher maps by spatial size (U unique sizes, in order of first
appearance: ``kdfast.numerics.map_distance.size_groups``) and builds, per group u, the student values ``v_s[u]``
(B, S, N_u) (every student map's ``mean_c f^2`` adaptive-average-pooled to that size, or the map
pooled first with ``pool="feature"``; then normalised) and the teacher values ``v_t[u]``
(B, T_u, N_u), both from the fused AT op (p = 2, mode "mean"; one launch for the teachers, one
for the students); it permutes att's T axis into group order (and the distances back).

Op contract, the same on every fused backend (``torch.ops.kdfast_triton.*``:
kdfast.kernels.map_distance; ``torch.ops.kdfast.*``: the C++ CPU/CUDA kernels of kdfast._C,
implementing the schemas declared here)::

    map_distance_forward(Tensor[] v_s, Tensor[] v_t, Tensor att) -> (Tensor loss, Tensor dist)
    map_distance_backward(Tensor grad_loss, Tensor[] v_s, Tensor[] v_t, Tensor att, Tensor dist)
        -> (Tensor[] grad_v_s, Tensor grad_att)

* U >= 1 groups; ``v_s[u]`` (B, S, N_u), ``v_t[u]`` (B, T_u, N_u), B, S, T_u, N_u >= 1, one B and S
  for all groups. All v_s and v_t share one floating dtype and one device. Their positions (last
  dim) are read in place where they have unit stride (a contiguous copy is made otherwise); the
  other strides are free.
* ``att`` (B, T, S), T = sum_u T_u, teachers in group order; any floating dtype, on the values'
  device. Triton reads it in place (strides, dtype); the C++ kernels read an accumulation-dtype
  contiguous copy (B*T*S elements).
* ``dist`` (B, T, S) contiguous, float32 (float64 for float64 values):
  ``dist[b, t, s] = mean_n (v_s[u][b, s, n] - v_t[u][b, t', n])^2``, t' the index of t in its group.
* ``loss`` 0-d in the dist dtype: ``(1/B) sum_{b,t,s} att * dist``.
* ``grad_loss``: 0-d, any floating dtype, read on the device. ``grad_att = grad_loss * dist / B``
  (contiguous, att's dtype); ``grad_v_s[u][b, s, n] = (grad_loss / B) sum_{t in u} att[b, t, s]
  * 2 (v_s[u][b, s, n] - v_t[u][b, t', n]) / N_u`` (contiguous, the values' dtype). v_t gets no
  gradient; ``dist`` is not differentiable.
* One forward launch over every (sample, teacher map), the groups' pointers passed by value as
  kernel arguments (each program writes its dist row and its partial ``sum_s att * dist``; the
  B*T partials are summed in a fixed order), and one backward launch over every (group, sample,
  block of positions); Triton splits a launch only between groups of different alignment.
  Accumulation in float32 (float64 for float64 values); deterministic (no atomics).

This module declares the op once (schemas, fake kernels, autograd formula: ``SPEC``, registered in
every library by kdfast.ops.spec) and builds the values. Backend "torch" calls the eager
implementation in kdfast/eager/map_distance.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdfast.eager import map_distance as eager
from kdfast.numerics.common import compute_dtype
from kdfast.numerics.map_distance import POOLS, group_order, size_groups, values
from kdfast.ops import at as at_ops
from kdfast.ops import namespace
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, contract, register, sample_tensor


def _forward_fake(v_s: list[Tensor], v_t: list[Tensor], att: Tensor) -> tuple[Tensor, Tensor]:
    contract(len(v_s) >= 1 and len(v_s) == len(v_t), "map_distance: expected equally many (>= 1) groups")
    check_rows("map_distance", *v_s, *v_t, dims=3)
    teachers = sum(v.shape[1] for v in v_t)
    contract(att.shape == (v_s[0].shape[0], teachers, v_s[0].shape[1]), "map_distance: att must be (B, T, S)")
    acc = compute_dtype(v_s[0].dtype)
    return v_s[0].new_empty((), dtype=acc), v_s[0].new_empty(att.shape, dtype=acc)


def _backward_fake(
    grad_loss: Tensor, v_s: list[Tensor], v_t: list[Tensor], att: Tensor, dist: Tensor
) -> tuple[list[Tensor], Tensor]:
    return [v.new_empty(v.shape) for v in v_s], att.new_empty(att.shape)


def _setup(ctx, inputs, output):
    v_s, v_t, att = inputs
    ctx.groups = len(v_s)
    ctx.save_for_backward(*v_s, *v_t, att, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ops, ctx, grad_loss, _grad_dist):
    n = ctx.groups
    if grad_loss is None:
        return [None] * n, [None] * n, None
    *values, att, dist = ctx.saved_tensors
    grad_v_s, grad_att = ops.map_distance_backward(grad_loss.contiguous(), values[:n], values[n:], att, dist)
    return grad_v_s, [None] * n, grad_att


def _samples() -> tuple[Sample, ...]:
    """Three teachers in two size groups, not in group order; two students; att differentiable."""
    f_s = (sample_tensor(2, 3, 4, 4, seed=1, requires_grad=True), sample_tensor(2, 2, 2, 2, seed=2, requires_grad=True))
    f_t = (sample_tensor(2, 4, 2, 2, seed=3), sample_tensor(2, 3, 4, 4, seed=4), sample_tensor(2, 2, 2, 2, seed=5))
    att = sample_tensor(2, 3, 2, seed=6, positive=True, requires_grad=True)

    def distances(pool: str):
        def run(s1: Tensor, s2: Tensor, t1: Tensor, t2: Tensor, t3: Tensor, a: Tensor, backend: str) -> Tensor:
            return map_distance_loss([s1, s2], [t1, t2, t3], a, pool, backend)

        return run

    return tuple(Sample(f"pool {pool}", distances(pool), (*f_s, *f_t, att)) for pool in POOLS)


SPEC = register(
    OpSpec(
        "map_distance",
        kernels=(
            Kernel("map_distance_forward", "(Tensor[] v_s, Tensor[] v_t, Tensor att) -> (Tensor, Tensor)", _forward_fake),
            Kernel(
                "map_distance_backward",
                "(Tensor grad_loss, Tensor[] v_s, Tensor[] v_t, Tensor att, Tensor dist) -> (Tensor[], Tensor)",
                _backward_fake,
            ),
        ),
        autograd=(Autograd("map_distance_forward", _setup, _backward),),
        samples=_samples,
    )
)


def _fused_values(f_s: Sequence[Tensor], f_t: Sequence[Tensor], pool: str, backend: str) -> tuple[list[Tensor], list[Tensor]]:
    """The values of every group (kdfast.numerics.map_distance.values) with ``mean_c f^2`` from the fused AT op."""
    ops = namespace(backend)

    def raw_maps(feats: list[Tensor]) -> list[Tensor]:
        return ops.at_maps([f if at_ops.hw_flattenable(f) else f.contiguous() for f in feats], 2.0, "mean")

    return values(f_s, f_t, pool, raw_maps)


def _distances(f_s: Sequence[Tensor], f_t: Sequence[Tensor], att: Tensor, pool: str, backend: str) -> tuple[Tensor, Tensor]:
    """(loss, dist in the teachers' order) from one fused launch."""
    order, position = group_order(size_groups(f_t))
    identity = order == list(range(len(order)))
    v_s, v_t = _fused_values(f_s, f_t, pool, backend)
    loss, dist = namespace(backend).map_distance_forward(v_s, v_t, att if identity else att[:, order])
    return loss, dist if identity else dist[:, position]


def map_distance_loss(f_s: Sequence[Tensor], f_t: Sequence[Tensor], att: Tensor, pool: str, backend: str) -> Tensor:
    """The 0-d loss on `backend` (float32; float64 for float64 students); the teacher is detached."""
    if backend == "torch":
        return eager.map_distance_loss(f_s, f_t, att, pool)
    return _distances(f_s, f_t, att, pool, backend)[0]


def map_distances(f_s: Sequence[Tensor], f_t: Sequence[Tensor], pool: str, backend: str) -> Tensor:
    """The (B, T, S) distances on `backend`, without gradient (the forward launch with att = 0)."""
    with torch.no_grad():
        if backend == "torch":
            return eager.map_distances(f_s, f_t, pool)
        zeros = f_s[0].new_zeros((), dtype=compute_dtype(f_s[0].dtype)).expand(f_s[0].shape[0], len(f_t), len(f_s))
        return _distances(f_s, f_t, zeros, pool, backend)[1]
