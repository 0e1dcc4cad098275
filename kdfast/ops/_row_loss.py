"""Fake kernels and autograd shared by the per-row logit losses (kd, dkd).

Such an op ``<op>_forward(z_s, z_t, *tensors, *scalars, with_grad) -> (loss, stats, grad)``
returns the per-row losses (B,), per-row softmax statistics (B, S) and, when ``with_grad``,
``d loss_b / d z_s[b]`` (B, K). Its backward:

* with ``with_grad`` (the loss is reduced to a scalar): the gradient computed by the forward is
  scaled in place by the incoming row weights, a device tensor (no host sync, no new B x K
  allocation). A second backward through the same graph therefore raises autograd's
  "modified by an inplace operation" error instead of returning a wrong gradient.
* without (``reduction="none"``): ``<op>_backward(grad_loss, z_s, z_t, *tensors, stats, *scalars)``
  recomputes it from the saved logits and statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.reference.at import compute_dtype


def forward_fake(num_stats: int):
    def fake(z_s: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
        acc = compute_dtype(z_s.dtype)
        rows = z_s.shape[0]
        grad = z_s.new_empty(z_s.shape if args[-1] else (0,))
        return z_s.new_empty((rows,), dtype=acc), z_s.new_empty((rows, num_stats), dtype=acc), grad

    return fake


def backward_fake(grad_loss: Tensor, z_s: Tensor, *args) -> Tensor:
    return z_s.new_empty(z_s.shape)


def register(ns: str, op: str, num_tensors: int, num_stats: int) -> None:
    """Fake kernels and autograd of ``{ns}::{op}_forward`` / ``_backward``; the forward takes
    `num_tensors` tensors (z_s, z_t, ...), then scalars, then ``with_grad``."""

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # no zero B x K gradient for the unused outputs stats, grad
        ctx.num_inputs = len(inputs)
        ctx.with_grad = inputs[-1]
        ctx.scalars = inputs[num_tensors:-1]
        if ctx.with_grad:
            ctx.save_for_backward(output[2])
        else:
            ctx.save_for_backward(*inputs[:num_tensors], output[1])

    def backward(ctx, grad_loss, _grad_stats, _grad_grad):
        rest = [None] * (ctx.num_inputs - 1)
        if grad_loss is None:
            return None, *rest
        if ctx.with_grad:
            (grad,) = ctx.saved_tensors
            return grad.mul_(grad_loss.unsqueeze(1)), *rest
        *tensors, stats = ctx.saved_tensors
        backward_op = getattr(getattr(torch.ops, ns), f"{op}_backward")
        return backward_op(grad_loss.contiguous(), *tensors, stats, *ctx.scalars), *rest

    torch.library.register_fake(f"{ns}::{op}_forward", forward_fake(num_stats))
    torch.library.register_fake(f"{ns}::{op}_backward", backward_fake)
    torch.library.register_autograd(f"{ns}::{op}_forward", backward, setup_context=setup)
