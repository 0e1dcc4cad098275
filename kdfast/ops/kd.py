"""torch.library registration and backend dispatch of the KD logit loss (formulas in
kdfast/reference/kd.py): ``kd_forward`` / ``kd_backward``, as ``torch.ops.kdfast.*`` (C++ CPU and
CUDA kernels) and ``torch.ops.kdfast_triton.*`` (kdfast.kernels.kd)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _extension
from kdfast.ops import _row_loss, namespace, unit_stride
from kdfast.reference import kd as reference

NUM_STATS = 2  # [lse_s, lse_t]


@torch.library.custom_op("kdfast_triton::kd_forward", mutates_args=())
def _kd_forward_triton(z_s: Tensor, z_t: Tensor, temperature: float, with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from kdfast.kernels import kd as kernels

    return kernels.kd_forward(z_s, z_t, temperature, with_grad)


@torch.library.custom_op("kdfast_triton::kd_backward", mutates_args=())
def _kd_backward_triton(grad_loss: Tensor, z_s: Tensor, z_t: Tensor, stats: Tensor, temperature: float) -> Tensor:
    from kdfast.kernels import kd as kernels

    return kernels.kd_backward(grad_loss, z_s, z_t, stats, temperature)


_row_loss.register("kdfast_triton", "kd", num_tensors=2, num_stats=NUM_STATS)
for library in _extension.cpp_libraries("kd_forward"):
    _row_loss.register(library, "kd", num_tensors=2, num_stats=NUM_STATS)


def kd_rows(z_s: Tensor, z_t: Tensor, temperature: float, with_grad: bool, backend: str) -> Tensor:
    """Per-row KD losses (B,) on `backend`; `with_grad` computes the gradient in the forward."""
    if backend == "torch":
        return reference.kd_rows(z_s, z_t, temperature)
    loss, _, _ = namespace(backend).kd_forward(unit_stride(z_s), unit_stride(z_t.detach()), temperature, with_grad)
    return loss
