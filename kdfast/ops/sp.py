"""torch.library registration and backend dispatch of the similarity-preserving (SP) loss
(formulas in kdfast/reference/sp.py).

Op contract, the same on every fused backend (``torch.ops.kdfast_triton.*``: kdfast.kernels.sp;
``torch.ops.kdfast.*``: the C++ CPU/CUDA kernels of kdfast._C, implementing the schemas declared here)::

    sp_forward(Tensor x_s, Tensor x_t) -> (Tensor loss, Tensor stats)
    sp_backward(Tensor grad_loss, Tensor x_s, Tensor x_t, Tensor stats) -> Tensor grad_x_s

* ``x_s`` (B, Ds), ``x_t`` (B, Dt): the flattened student and teacher maps, B >= 1, Ds and Dt
  >= 1 and independent, any strides (read in place), any floating dtypes (each its own).
* ``loss``: 0-d, ``||G_s - G_t||_F^2 / B^2`` with ``G = normalize_rows(X X^T)`` (F.normalize,
  eps 1e-12). float32 (float64 for a float64 x_s; the C++ backends accumulate in it too).
* ``stats``: (B, 3) in the loss dtype, per row i ``[inv_s, inv_t, proj]``:
  ``inv = 1 / max(||S[i]||_2, 1e-12)`` of ``S = X X^T`` and
  ``proj = sum_j G_s_ij (G_s_ij - G_t_ij)``, 0 where ``||S_s[i]||_2 < 1e-12``.
* ``grad_loss``: 0-d (any floating dtype), read on the device (never on the host).
* ``grad_x_s``: (B, Ds) contiguous in x_s's dtype: the gradient of ``grad_loss * loss``, i.e.
  ``M X_s`` with ``M_ij = (a_i + a_j) S_s_ij - (b_i + b_j) S_t_ij``, ``k = 2 grad_loss / B^2``,
  ``a = k inv_s^2 (1 - proj)``, ``b = k inv_s inv_t``.
* Memory. Triton: the Gram matrices split over D, (2, splits, B, B) float32 partial sums (about
  2 programs per SM; at most ~8.6 MB when split, 8 B^2 bytes unsplit), M (B, B) and O(B), no
  (B, Ds) buffer (kernels/sp.py). CUDA: flash-style tiles recomputed from X, never a B x B
  matrix, extra memory O(B) plus float32 (B, Ds) gradient accumulators (up to 4, one per column
  split). C++ CPU: strips of 64 rows x B computed with at::mm (two strips,
  O(B)), plus accumulation-dtype copies of X_s/X_t for float16/bfloat16 inputs.

This module declares the op once (schemas, fake kernels, autograd formula: the teacher gets no
gradient; ``SPEC``, registered in every library by kdfast.ops.spec). Backend "torch" calls the
eager implementation in kdfast/eager/sp.py.
"""

from __future__ import annotations

from torch import Tensor

from kdfast.eager import sp as eager
from kdfast.numerics.common import compute_dtype
from kdfast.ops import as_rows, namespace, saveable_teacher
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, register, sample_tensor


def _forward_fake(x_s: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    check_rows("sp_forward", x_s, x_t, dims=2)
    acc = compute_dtype(x_s.dtype)
    return x_s.new_empty((), dtype=acc), x_s.new_empty((x_s.shape[0], 3), dtype=acc)


def _backward_fake(grad_loss: Tensor, x_s: Tensor, x_t: Tensor, stats: Tensor) -> Tensor:
    return x_s.new_empty(x_s.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _backward(ops, ctx, grad_loss, _grad_stats):
    if grad_loss is None:
        return None, None
    x_s, x_t, stats = ctx.saved_tensors
    return ops.sp_backward(grad_loss.contiguous(), x_s, x_t, stats), None


def _samples() -> tuple[Sample, ...]:
    return (
        Sample("rows", sp_loss, (sample_tensor(3, 4, seed=1, requires_grad=True), sample_tensor(3, 5, seed=2))),
        Sample("maps", sp_loss, (sample_tensor(3, 2, 1, 2, seed=3, requires_grad=True), sample_tensor(3, 3, seed=4))),
    )


SPEC = register(
    OpSpec(
        "sp",
        kernels=(
            Kernel("sp_forward", "(Tensor x_s, Tensor x_t) -> (Tensor, Tensor)", _forward_fake),
            Kernel("sp_backward", "(Tensor grad_loss, Tensor x_s, Tensor x_t, Tensor stats) -> Tensor", _backward_fake),
        ),
        autograd=(Autograd("sp_forward", _setup, _backward),),
        samples=_samples,
    )
)


def sp_loss(f_s: Tensor, f_t: Tensor, backend: str) -> Tensor:
    """The SP loss (0-d) on `backend`; the teacher is detached."""
    if backend == "torch":
        return eager.sp_loss(f_s, f_t)
    loss, _ = namespace(backend).sp_forward(as_rows(f_s), as_rows(saveable_teacher(f_t.detach(), f_s)))
    return loss
