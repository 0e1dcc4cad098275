"""torch.library registration and backend dispatch of the relational KD loss (RKD; formulas in
kdfast/reference/rkd.py).

Op contract, the same on every fused backend (``torch.ops.kdfast_triton.*``: kdfast.kernels.rkd;
``torch.ops.kdfast.*``: the C++ CPU/CUDA kernels of kdfast._C, implementing the schemas declared here)::

    rkd_forward(Tensor e_s, Tensor e_t) -> (Tensor terms, Tensor sq_dist, Tensor stats)
    rkd_backward(Tensor grad_terms, Tensor e_s, Tensor sq_dist, Tensor stats) -> Tensor grad_e_s

* ``e_s`` (B, Ds), ``e_t`` (B, Dt): student and teacher embeddings, B >= 1, Ds and Dt >= 1 and
  independent, any strides (read in place), any floating dtypes (each its own). The loss dtype
  ACC is float32 (float64 for a float64 e_s; the C++ backends accumulate in it too).
* ``terms``: (2,) ACC, the unweighted ``[L_dist, L_angle]`` (means over the B^2 pairs and the
  B^3 triplets). The weights are applied by the caller.
* ``sq_dist``: (2, B, B) ACC contiguous, ``[R_s, R_t]`` with ``R[a, b] = ||e_a - e_b||^2`` summed
  over the differences (not via the Gram matrix): bitwise symmetric, exactly 0 for duplicated
  rows (saved for the backward).
* ``stats``: (3,) ACC, ``[scale_s, scale_t, mean_gx]``: ``scale = count / sum`` over the positive
  distances of each network (``x = d * scale`` are the normalised distances; 0 where no
  distance is positive, B = 1) and ``mean_gx = sum_ij smooth_l1'(x_s - x_t)_ij x_s_ij / count_s``
  (0 for count_s = 0).
* ``grad_terms``: (2,) (any floating dtype), read on the device, never on the host.
* ``grad_e_s``: (B, Ds) contiguous in e_s's dtype, the gradient of
  ``grad_terms[0] * L_dist + grad_terms[1] * L_angle``, as
  ``dE_i = 2 sum_j (dR_ij + dR_ji) (e_i - e_j)`` from ``dR = d loss / d R_s`` (kernels/rkd.py
  derives it).
* Every distance and cosine comes from R, exactly as kernels/rkd.py writes them (distances
  ``sqrt(max(R, 1e-12))`` off the diagonal, 0 on it; ``cos_ijk = ((R_ij + R_ik) - R_jk) / 2``
  times ``1 / max(sqrt(R_ij), 1e-12)`` and the same for ik, 0 where one of those lengths is below
  1e-12): nothing of size B x B x D is ever built. Extra memory: three B x B matrices (Triton:
  four, plus split partial sums of about 2.2 MB at most on 132 SMs; kernels/rkd.py).

This module declares the op once (schemas, fake kernels, autograd formula: the teacher gets no
gradient; ``SPEC``, registered in every library by kdfast.ops.spec). Backend "torch" calls the
eager implementation in kdfast/eager/rkd.py.
"""

from __future__ import annotations

from torch import Tensor

from kdfast.eager import rkd as eager
from kdfast.numerics.common import compute_dtype
from kdfast.ops import as_rows, namespace
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, register, sample_tensor


def _forward_fake(e_s: Tensor, e_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    check_rows("rkd_forward", e_s, e_t, dims=2)
    acc = compute_dtype(e_s.dtype)
    batch = e_s.shape[0]
    return e_s.new_empty((2,), dtype=acc), e_s.new_empty((2, batch, batch), dtype=acc), e_s.new_empty((3,), dtype=acc)


def _backward_fake(grad_terms: Tensor, e_s: Tensor, sq_dist: Tensor, stats: Tensor) -> Tensor:
    return e_s.new_empty(e_s.shape)


def _setup(ctx, inputs, output):
    _, sq_dist, stats = output
    ctx.save_for_backward(inputs[0], sq_dist, stats)


def _backward(ops, ctx, grad_terms, _grad_sq_dist, _grad_stats):
    if grad_terms is None:
        return None, None
    e_s, sq_dist, stats = ctx.saved_tensors
    return ops.rkd_backward(grad_terms.contiguous(), e_s, sq_dist, stats), None


def _samples() -> tuple[Sample, ...]:
    return (Sample("rows", rkd_terms, (sample_tensor(4, 5, seed=1, requires_grad=True), sample_tensor(4, 3, seed=2))),)


SPEC = register(
    OpSpec(
        "rkd",
        kernels=(
            Kernel("rkd_forward", "(Tensor e_s, Tensor e_t) -> (Tensor, Tensor, Tensor)", _forward_fake),
            Kernel("rkd_backward", "(Tensor grad_terms, Tensor e_s, Tensor sq_dist, Tensor stats) -> Tensor", _backward_fake),
        ),
        autograd=(Autograd("rkd_forward", _setup, _backward),),
        samples=_samples,
    )
)


def rkd_terms(e_s: Tensor, e_t: Tensor, backend: str) -> Tensor:
    """(2,) unweighted ``[L_dist, L_angle]`` on `backend` (float32; float64 for float64 students);
    the teacher is detached."""
    if backend == "torch":
        return eager.rkd_terms(e_s, e_t)
    terms, _, _ = namespace(backend).rkd_forward(as_rows(e_s), as_rows(e_t.detach()))
    return terms
