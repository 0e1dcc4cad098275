"""torch.library registration and backend dispatch of the KD logit loss (formulas in
kdfast/reference/kd.py): ``kd_forward`` / ``kd_backward``, as ``torch.ops.kdfast.*`` (C++ CPU and
CUDA kernels) and ``torch.ops.kdfast_triton.*`` (kdfast.kernels.kd). Backend "torch" calls the
eager implementation in kdfast/eager/kd.py."""

from __future__ import annotations

from torch import Tensor

from kdfast.eager import kd as eager
from kdfast.ops import _row_loss, namespace, unit_stride
from kdfast.ops.spec import register

NUM_STATS = 2  # [lse_s, lse_t]


SPEC = register(
    _row_loss.spec(
        "kd",
        "Tensor z_s, Tensor z_t, float temperature, bool with_grad",
        "Tensor grad_loss, Tensor z_s, Tensor z_t, Tensor stats, float temperature",
        num_tensors=2,
        num_stats=NUM_STATS,
        samples=lambda: _row_loss.samples(kd_rows, (2.0,)),
    )
)


def kd_rows(z_s: Tensor, z_t: Tensor, temperature: float, with_grad: bool, backend: str) -> Tensor:
    """Per-row KD losses (B,) on `backend`; `with_grad` computes the gradient in the forward."""
    if backend == "torch":
        return eager.kd_rows(z_s, z_t, temperature)
    loss, _, _ = namespace(backend).kd_forward(unit_stride(z_s), unit_stride(z_t.detach()), temperature, with_grad)
    return loss
