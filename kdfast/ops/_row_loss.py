"""The op declaration shared by the per-row logit losses (kd, dkd): kernels, fakes, autograd, samples.

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

from collections.abc import Callable

import torch
from torch import Tensor

from kdfast.numerics.common import compute_dtype
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, contract, sample_tensor


def forward_fake(num_stats: int):
    def fake(z_s: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
        check_rows("logit loss", z_s, args[0], dims=2)
        contract(z_s.shape == args[0].shape, "logit loss: z_s and z_t must have one shape")
        acc = compute_dtype(z_s.dtype)
        rows = z_s.shape[0]
        grad = z_s.new_empty(z_s.shape if args[-1] else (0,))
        return z_s.new_empty((rows,), dtype=acc), z_s.new_empty((rows, num_stats), dtype=acc), grad

    return fake


def backward_fake(grad_loss: Tensor, z_s: Tensor, *args) -> Tensor:
    return z_s.new_empty(z_s.shape)


def spec(
    op: str,
    forward_args: str,
    backward_args: str,
    num_tensors: int,
    num_stats: int,
    samples: Callable[[], tuple[Sample, ...]],
) -> OpSpec:
    """The spec of ``{op}_forward(z_s, z_t, ..., with_grad) -> (loss, stats, grad)`` (its
    arguments `forward_args`: `num_tensors` tensors, then scalars, then ``bool with_grad``) and
    ``{op}_backward(grad_loss, z_s, z_t, ..., stats, scalars) -> grad`` (`backward_args`)."""

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # no zero B x K gradient for the unused outputs stats, grad
        ctx.num_inputs = len(inputs)
        ctx.with_grad = inputs[-1]
        ctx.scalars = inputs[num_tensors:-1]
        if ctx.with_grad:
            ctx.save_for_backward(output[2])
        else:
            ctx.save_for_backward(*inputs[:num_tensors], output[1])

    def backward(ops, ctx, grad_loss, _grad_stats, _grad_grad):
        rest = [None] * (ctx.num_inputs - 1)
        if grad_loss is None:
            return None, *rest
        if ctx.with_grad:
            (grad,) = ctx.saved_tensors
            return grad.mul_(grad_loss.unsqueeze(1)), *rest
        *tensors, stats = ctx.saved_tensors
        backward_op = getattr(ops, f"{op}_backward")
        return backward_op(grad_loss.contiguous(), *tensors, stats, *ctx.scalars), *rest

    return OpSpec(
        op,
        kernels=(
            Kernel(f"{op}_forward", f"({forward_args}) -> (Tensor, Tensor, Tensor)", forward_fake(num_stats)),
            Kernel(f"{op}_backward", f"({backward_args}) -> Tensor", backward_fake),
        ),
        autograd=(Autograd(f"{op}_forward", setup, backward),),
        samples=samples,
    )


def samples(rows: Callable[..., Tensor], scalars: tuple[float, ...], with_target: bool = False) -> tuple[Sample, ...]:
    """Contract samples of a logit loss ``rows(z_s, z_t, [target,] *scalars, with_grad, backend)``:
    per-row losses without (``<op>_backward``) and with the in-forward gradient."""
    z_s, z_t = sample_tensor(3, 7, seed=1, requires_grad=True), sample_tensor(3, 7, seed=2)
    tensors = (z_s, z_t, torch.tensor([0, 6, 3])) if with_target else (z_s, z_t)

    def call(with_grad: bool) -> Callable[..., Tensor]:
        def run(*args: Tensor, backend: str) -> Tensor:
            return rows(*args, *scalars, with_grad, backend)

        return run

    return (Sample("rows", call(False), tensors), Sample("in-forward gradient", call(True), tensors, repeatable_backward=False))
