"""torch.library registration and backend dispatch of the DKD logit loss (formulas in
kdfast/reference/dkd.py): ``dkd_forward`` / ``dkd_backward``, as ``torch.ops.kdfast.*`` (C++ CPU
and CUDA kernels) and ``torch.ops.kdfast_triton.*`` (kdfast.kernels.dkd). Backend "torch" calls
the eager implementation in kdfast/eager/dkd.py."""

from __future__ import annotations

from torch import Tensor

from kdfast.eager import dkd as eager
from kdfast.ops import _row_loss, namespace, unit_stride
from kdfast.ops.spec import register

NUM_STATS = 6  # [lse_s, lse_t, lse_other_s, lse_other_t, lse_masked_s, lse_masked_t]


SPEC = register(
    _row_loss.spec(
        "dkd",
        "Tensor z_s, Tensor z_t, Tensor target, float alpha, float beta, float temperature, bool with_grad",
        "Tensor grad_loss, Tensor z_s, Tensor z_t, Tensor target, Tensor stats, float alpha, float beta, float temperature",
        num_tensors=3,
        num_stats=NUM_STATS,
        samples=lambda: _row_loss.samples(dkd_rows, (1.0, 8.0, 2.0), with_target=True),
    )
)


def dkd_rows(
    z_s: Tensor, z_t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float, with_grad: bool, backend: str
) -> Tensor:
    """Per-row DKD losses (B,) on `backend`; `with_grad` computes the gradient in the forward."""
    if backend == "torch":
        return eager.dkd_rows(z_s, z_t, target, alpha, beta, temperature)
    ops = namespace(backend)
    loss, _, _ = ops.dkd_forward(
        unit_stride(z_s), unit_stride(z_t.detach()), target.contiguous(), alpha, beta, temperature, with_grad
    )
    return loss
