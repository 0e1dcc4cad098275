"""torch.library registration and backend dispatch of local correlation consistency (LCC).

Two ops, the same schemas on every fused backend (formulas in kdfast/reference/lcc.py), on maps
already prepared by ``reference.prepare`` (the grid divides H and W):

* ``lcc_forward(f_s, f_t, grid) -> (sums, inv_norm_s, inv_norm_t)``: the sums of ``Delta^2``
  over the intra, inter and cross entries (3,) and the inverse descriptor norms (N,), all in the
  accumulation dtype (float32; float64 for a float64 f_s).
* ``lcc_backward(grad_sums, f_s, f_t, inv_norm_s, inv_norm_t, grid) -> grad_f_s``
  (``empty_like(f_s)``).

The C++ kernels (kdfast._C) define them as ``torch.ops.kdfast.*``; the Triton kernels
(kdfast.kernels.lcc) as ``torch.ops.kdfast_triton.*``. This module registers, for both
namespaces, the fake kernels and the autograd formula (the teacher never gets a gradient).
Backend "torch" calls the eager reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _extension
from kdfast.ops import namespace, saveable_teacher
from kdfast.reference import lcc as reference
from kdfast.reference.at import compute_dtype


@torch.library.custom_op("kdfast_triton::lcc_forward", mutates_args=())
def _lcc_forward_triton(f_s: Tensor, f_t: Tensor, grid: int) -> tuple[Tensor, Tensor, Tensor]:
    from kdfast.kernels import lcc as kernels

    return kernels.lcc_forward(f_s, f_t, grid)


@torch.library.custom_op("kdfast_triton::lcc_backward", mutates_args=())
def _lcc_backward_triton(
    grad_sums: Tensor, f_s: Tensor, f_t: Tensor, inv_norm_s: Tensor, inv_norm_t: Tensor, grid: int
) -> Tensor:
    from kdfast.kernels import lcc as kernels

    return kernels.lcc_backward(grad_sums, f_s, f_t, inv_norm_s, inv_norm_t, grid)


def _forward_fake(f_s: Tensor, f_t: Tensor, grid: int) -> tuple[Tensor, Tensor, Tensor]:
    acc = compute_dtype(f_s.dtype)
    rows = f_s.shape[0] * grid * grid
    return f_s.new_empty((3,), dtype=acc), f_s.new_empty((rows,), dtype=acc), f_s.new_empty((rows,), dtype=acc)


def _backward_fake(grad_sums: Tensor, f_s: Tensor, f_t: Tensor, inv_norm_s: Tensor, inv_norm_t: Tensor, grid: int) -> Tensor:
    return torch.empty_like(f_s)


def _register(ns: str) -> None:
    ops = getattr(torch.ops, ns)

    def setup(ctx, inputs, output):
        f_s, f_t, ctx.grid = inputs
        _, inv_s, inv_t = output
        ctx.save_for_backward(f_s, f_t, inv_s, inv_t)

    def backward(ctx, grad_sums, _grad_inv_s, _grad_inv_t):
        if grad_sums is None:
            return None, None, None
        f_s, f_t, inv_s, inv_t = ctx.saved_tensors
        return ops.lcc_backward(grad_sums.contiguous(), f_s, f_t, inv_s, inv_t, ctx.grid), None, None

    torch.library.register_fake(f"{ns}::lcc_forward", _forward_fake)
    torch.library.register_fake(f"{ns}::lcc_backward", _backward_fake)
    torch.library.register_autograd(f"{ns}::lcc_forward", backward, setup_context=setup)


_register("kdfast_triton")
for library in _extension.cpp_libraries("lcc_forward"):
    _register(library)


def lcc_terms(f_s: Tensor, f_t: Tensor, grid: int, mask: Tensor | None, backend: str) -> Tensor:
    """(3,) unweighted term losses [L_intra, L_inter, L_cross] on `backend` (float32; float64
    for float64 students): ``prepare`` in torch, then one fused forward (and one backward)."""
    if backend == "torch":
        return reference.lcc_terms(f_s, f_t, grid, mask)
    f_s, f_t = reference.prepare(f_s, f_t.detach(), grid, mask)
    sums, _, _ = namespace(backend).lcc_forward(f_s, saveable_teacher(f_t, f_s), grid)
    counts = reference.term_counts(f_s.shape[0], grid)
    return torch.stack([s / max(c, 1) for s, c in zip(sums.unbind(), counts)])  # no host-to-device copy
