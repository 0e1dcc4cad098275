"""torch.library registration and backend dispatch of the DKD logit loss (formulas in
kdfast/reference/dkd.py): ``dkd_forward`` / ``dkd_backward``, as ``torch.ops.kdfast.*`` (C++ CPU
and CUDA kernels) and ``torch.ops.kdfast_triton.*`` (kdfast.kernels.dkd)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _extension
from kdfast.ops import _row_loss, namespace, unit_stride
from kdfast.reference import dkd as reference

NUM_STATS = 6  # [lse_s, lse_t, lse_other_s, lse_other_t, lse_masked_s, lse_masked_t]


@torch.library.custom_op("kdfast_triton::dkd_forward", mutates_args=())
def _dkd_forward_triton(
    z_s: Tensor, z_t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from kdfast.kernels import dkd as kernels

    return kernels.dkd_forward(z_s, z_t, target, alpha, beta, temperature, with_grad)


@torch.library.custom_op("kdfast_triton::dkd_backward", mutates_args=())
def _dkd_backward_triton(
    grad_loss: Tensor, z_s: Tensor, z_t: Tensor, target: Tensor, stats: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    from kdfast.kernels import dkd as kernels

    return kernels.dkd_backward(grad_loss, z_s, z_t, target, stats, alpha, beta, temperature)


_row_loss.register("kdfast_triton", "dkd", num_tensors=3, num_stats=NUM_STATS)
for library in _extension.cpp_libraries("dkd_forward"):
    _row_loss.register(library, "dkd", num_tensors=3, num_stats=NUM_STATS)


def dkd_rows(
    z_s: Tensor, z_t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float, with_grad: bool, backend: str
) -> Tensor:
    """Per-row DKD losses (B,) on `backend`; `with_grad` computes the gradient in the forward."""
    if backend == "torch":
        return reference.dkd_rows(z_s, z_t, target, alpha, beta, temperature)
    ops = namespace(backend)
    loss, _, _ = ops.dkd_forward(
        unit_stride(z_s), unit_stride(z_t.detach()), target.contiguous(), alpha, beta, temperature, with_grad
    )
    return loss
