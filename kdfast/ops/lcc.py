"""torch.library registration and backend dispatch of local correlation consistency (LCC).

Two ops, the same schemas on every fused backend (formulas in kdfast/reference/lcc.py), on maps
already prepared by ``kdfast.numerics.lcc.prepare`` (the grid divides H and W):

* ``lcc_forward(f_s, f_t, grid) -> (sums, inv_norm_s, inv_norm_t)``: the sums of ``Delta^2``
  over the intra, inter and cross entries (3,) and the inverse descriptor norms (N,), all in the
  accumulation dtype (float32; float64 for a float64 f_s).
* ``lcc_backward(grad_sums, f_s, f_t, inv_norm_s, inv_norm_t, grid) -> grad_f_s``
  (``empty_like(f_s)``).

This module declares them once (``SPEC``: schemas, fake kernels, the autograd formula; the teacher
never gets a gradient); kdfast.ops.spec registers them as ``torch.ops.kdfast.*`` (C++ kernels of
kdfast._C), ``torch.ops.kdfast_emu.*`` and ``torch.ops.kdfast_triton.*`` (kdfast.kernels.lcc).
Backend "torch" calls the eager implementation in kdfast/eager/lcc.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.eager import lcc as eager
from kdfast.numerics.common import compute_dtype
from kdfast.numerics.lcc import prepare, term_counts
from kdfast.ops import namespace, saveable_teacher
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, contract, register, sample_tensor


def _forward_fake(f_s: Tensor, f_t: Tensor, grid: int) -> tuple[Tensor, Tensor, Tensor]:
    check_rows("lcc_forward", f_s, f_t, dims=4)
    contract(f_s.shape[2:] == f_t.shape[2:], "lcc_forward: f_s and f_t must have one spatial size")
    contract(grid >= 1 and f_s.shape[2] % grid == 0 and f_s.shape[3] % grid == 0, "lcc_forward: the grid must divide H and W")
    acc = compute_dtype(f_s.dtype)
    rows = f_s.shape[0] * grid * grid
    return f_s.new_empty((3,), dtype=acc), f_s.new_empty((rows,), dtype=acc), f_s.new_empty((rows,), dtype=acc)


def _backward_fake(grad_sums: Tensor, f_s: Tensor, f_t: Tensor, inv_norm_s: Tensor, inv_norm_t: Tensor, grid: int) -> Tensor:
    return torch.empty_like(f_s)


def _setup(ctx, inputs, output):
    f_s, f_t, ctx.grid = inputs
    _, inv_s, inv_t = output
    ctx.save_for_backward(f_s, f_t, inv_s, inv_t)


def _backward(ops, ctx, grad_sums, _grad_inv_s, _grad_inv_t):
    if grad_sums is None:
        return None, None, None
    f_s, f_t, inv_s, inv_t = ctx.saved_tensors
    return ops.lcc_backward(grad_sums.contiguous(), f_s, f_t, inv_s, inv_t, ctx.grid), None, None


def _samples() -> tuple[Sample, ...]:
    f_s, f_t = sample_tensor(2, 3, 4, 4, seed=1, requires_grad=True), sample_tensor(2, 5, 4, 4, seed=2)
    return (
        Sample("grid 2", lambda a, b, backend: lcc_terms(a, b, 2, None, backend), (f_s, f_t)),
        Sample(
            "masked",
            lambda a, b, m, backend: lcc_terms(a, b, 2, m, backend),
            (f_s, f_t, sample_tensor(2, 1, 4, 4, seed=3, positive=True)),
        ),
    )


SPEC = register(
    OpSpec(
        "lcc",
        kernels=(
            Kernel("lcc_forward", "(Tensor f_s, Tensor f_t, int grid) -> (Tensor, Tensor, Tensor)", _forward_fake),
            Kernel(
                "lcc_backward",
                "(Tensor grad_sums, Tensor f_s, Tensor f_t, Tensor inv_norm_s, Tensor inv_norm_t, int grid) -> Tensor",
                _backward_fake,
            ),
        ),
        autograd=(Autograd("lcc_forward", _setup, _backward),),
        samples=_samples,
    )
)


def lcc_terms(f_s: Tensor, f_t: Tensor, grid: int, mask: Tensor | None, backend: str) -> Tensor:
    """(3,) unweighted term losses [L_intra, L_inter, L_cross] on `backend` (float32; float64
    for float64 students): ``prepare`` in torch, then one fused forward (and one backward)."""
    if backend == "torch":
        return eager.lcc_terms(f_s, f_t, grid, mask)
    f_s, f_t = prepare(f_s, f_t.detach(), grid, mask)
    sums, _, _ = namespace(backend).lcc_forward(f_s, saveable_teacher(f_t, f_s), grid)
    counts = term_counts(f_s.shape[0], grid)
    return torch.stack([s / max(c, 1) for s, c in zip(sums.unbind(), counts)])  # no host-to-device copy
