"""torch.library registration and backend dispatch of SoKD's masked feature loss (formulas in
kdfast/reference/masked_mse.py).

Op contract, the same on every fused backend (``torch.ops.kdfast_triton.*``: kdfast.kernels.masked_mse;
``torch.ops.kdfast.*``: the C++ CPU/CUDA kernels of kdfast._C, implementing the schemas declared here)::

    masked_mse_forward(Tensor x, Tensor y, Tensor mask, str reduction) -> (Tensor loss, Tensor scale)
    masked_mse_backward(Tensor grad_loss, Tensor x, Tensor y, Tensor mask, Tensor scale,
                        bool x_grad, bool y_grad) -> (Tensor grad_x, Tensor grad_y)

* ``x``, ``y``: (B, C, H, W) of one shape and one floating dtype, non-empty, any strides: read in
  place where h and w flatten into one strided dim (contiguous, channels_last, channel or batch
  slices), else through a contiguous copy. ``mask``: (B, H, W), any floating dtype (its own), any
  strides (same rule), broadcast over the channels inside the kernels (never expanded). No check
  reads values: NaN/Inf propagate.
* ``reduction``: "mean", "masked_mean" or "sum".
* ``loss``: 0-d, ``scale * sum_{b,c,h,w} m^2 (x - y)^2``; ``scale``: 0-d, ``1 / denom`` with
  denom ``B C H W`` ("mean"), ``C sum_{b,h,w} m^2`` ("masked_mean"; scale 0 where that is 0, so
  the loss of an all-zero mask is 0) or 1 ("sum"). Both in ACC: float32, float64 for float64 x;
  every sum accumulates in ACC.
* Forward: one launch over [channels x positions] tiles, each writing two partial sums, plus one
  single-program launch (one thread block; CPU: one loop) that adds them in a fixed order.
  Deterministic: the partition depends on the shapes and the device only, never on the values or
  the thread count.
* ``grad_loss``: 0-d, any floating dtype, read on the device (never on the host for CUDA/Triton).
  ``grad_x = 2 grad_loss scale m^2 (x - y)`` and ``grad_y = -grad_x``, in x's dtype, written by
  one launch that reads x, y and the mask once; each is ``empty_like`` of x's (y's) launch view
  (the input's own strides when it is dense), or an empty (0,) tensor when its flag is False.

This module declares the op once (schemas, fake kernels, autograd formula: ``SPEC``, registered in
every library by kdfast.ops.spec): the backward asks only for the gradients autograd needs
(``ctx.needs_input_grad``), and the mask never gets one. Backend "torch" calls the eager
implementation in kdfast/eager/masked_mse.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.eager import masked_mse as eager
from kdfast.numerics.common import compute_dtype
from kdfast.numerics.masked_mse import REDUCTIONS
from kdfast.ops import namespace, saveable_teacher
from kdfast.ops.at import hw_flattenable
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, contract, register, sample_tensor


def _grad_fake(t: Tensor, needed: bool) -> Tensor:
    """kernels.masked_mse.grad_buffer (triton is optional: not imported here)."""
    if not needed:
        return t.new_empty((0,))
    return torch.empty_like(t if hw_flattenable(t) else t.contiguous())


def _forward_fake(x: Tensor, y: Tensor, mask: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    check_rows("masked_mse_forward", x, y, dims=4)
    contract(x.shape == y.shape and x.dtype == y.dtype, "masked_mse_forward: x and y must have one shape and dtype")
    contract(mask.shape == (x.shape[0], *x.shape[2:]), "masked_mse_forward: mask must be (B, H, W)")
    contract(reduction in REDUCTIONS, f"masked_mse_forward: reduction must be one of {REDUCTIONS}")
    acc = compute_dtype(x.dtype)
    return x.new_empty((), dtype=acc), x.new_empty((), dtype=acc)


def _backward_fake(
    grad_loss: Tensor, x: Tensor, y: Tensor, mask: Tensor, scale: Tensor, x_grad: bool, y_grad: bool
) -> tuple[Tensor, Tensor]:
    return _grad_fake(x, x_grad), _grad_fake(y, y_grad)


def _setup(ctx, inputs, output):
    x, y, mask, _ = inputs
    ctx.save_for_backward(x, y, mask, output[1])


def _backward(ops, ctx, grad_loss, _grad_scale):
    x_grad, y_grad = ctx.needs_input_grad[:2]
    if grad_loss is None or not (x_grad or y_grad):
        return None, None, None, None
    x, y, mask, scale = ctx.saved_tensors
    grad_x, grad_y = ops.masked_mse_backward(grad_loss, x, y, mask, scale, x_grad, y_grad)
    return (grad_x if x_grad else None), (grad_y if y_grad else None), None, None


def _samples() -> tuple[Sample, ...]:
    x, y = sample_tensor(2, 3, 2, 3, seed=1, requires_grad=True), sample_tensor(2, 3, 2, 3, seed=2, requires_grad=True)
    mask = sample_tensor(2, 2, 3, seed=3, positive=True)
    samples = [
        Sample(reduction, lambda a, b, m, backend, r=reduction: masked_mse(a, b, m, r, backend), (x, y, mask))
        for reduction in REDUCTIONS
    ]
    samples.append(Sample("x only", lambda a, b, m, backend: masked_mse(a, b, m, "mean", backend), (x, y.detach(), mask)))
    return tuple(samples)


SPEC = register(
    OpSpec(
        "masked_mse",
        kernels=(
            Kernel("masked_mse_forward", "(Tensor x, Tensor y, Tensor mask, str reduction) -> (Tensor, Tensor)", _forward_fake),
            Kernel(
                "masked_mse_backward",
                "(Tensor grad_loss, Tensor x, Tensor y, Tensor mask, Tensor scale, bool x_grad, bool y_grad) -> (Tensor, Tensor)",
                _backward_fake,
            ),
        ),
        autograd=(Autograd("masked_mse_forward", _setup, _backward),),
        samples=_samples,
    )
)


def masked_mse(x: Tensor, y: Tensor, mask: Tensor, reduction: str, backend: str) -> Tensor:
    """The loss (0-d) on `backend`. x and y of different dtypes are converted to their promoted
    dtype; a (B, 1, H, W) mask is viewed as (B, H, W), a bool mask converted to x's dtype; the mask
    is detached. Inference tensors that the backward must re-read are copied (saveable_teacher)."""
    if backend == "torch":
        return eager.masked_mse(x, y, mask, reduction)
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dtype), y.to(dtype)
    mask = mask.detach()
    if mask.dim() == 4:
        mask = mask.select(1, 0)
    if not mask.is_floating_point():
        mask = mask.to(dtype)
    x, y = saveable_teacher(x, y), saveable_teacher(y, x)
    mask = saveable_teacher(mask, x if x.requires_grad else y)
    loss, _ = namespace(backend).masked_mse_forward(x, y, mask, reduction)
    return loss
