"""torch.library registration and backend dispatch of the block-attention op (LAKD's NDAM and
AFT-KD's attention/feature blocks; formulas in kdfast/reference/block_attention.py).

Op contract, the same on every fused backend (``torch.ops.kdfast_triton.*``:
kdfast.kernels.block_attention; ``torch.ops.kdfast.*``: the C++ CPU/CUDA kernels of kdfast._C,
implementing the schemas declared here)::

    block_attention_forward(Tensor[] f_s, Tensor[] h_s, Tensor[] f_t, int grid, float power,
        int feature_grid, bool teacher_weighting) -> (Tensor terms, Tensor maps)
    block_attention_backward(Tensor grad_terms, Tensor[] f_s, Tensor[] h_s, Tensor[] f_t,
        Tensor maps, int grid, float power, int feature_grid, bool teacher_weighting)
        -> (Tensor[] grad_f_s, Tensor[] grad_h_s)

* L >= 1 modules; ``f_s[l]`` (B, Cs, Hs, Ws) the student map, ``h_s[l]`` its connector output and
  ``f_t[l]`` the teacher map, (B, Ct, H, W) of equal shapes. One B for all; shapes otherwise
  free per module; any strides. All f_s and h_s share one floating dtype, all f_t one (possibly
  another); all on one device.
* ``grid`` g >= 1, ``power`` p >= 1, ``feature_grid`` >= 0; ``teacher_weighting`` only with
  feature_grid 0.
* ``terms``: (L, 2) unweighted ``[feat, map]`` per module, float32 (float64 for float64 f_s).
* ``maps``: (L, 2, B, g*g) in the terms dtype: the unnormalised pooled maps P of the student
  (index 0) and the teacher (index 1), saved for the backward.
* ``grad_terms``: (L, 2), any floating dtype. ``grad_f_s``, ``grad_h_s``: contiguous, in the
  inputs' shapes and dtype: the gradient of ``sum_l grad_terms[l, 0] feat_l + grad_terms[l, 1]
  map_l``. The teacher gets no gradient.
* Launches cover all modules at once (each backend's module docstring gives its design: Triton
  splits a (module, sample) over several programs, two launches forward and one backward); every
  partial is reduced in a fixed order (deterministic, no atomics).

This module declares the op once (schemas, fake kernels, autograd formula: ``SPEC``, registered in
every library by kdfast.ops.spec) and dispatches it. Backend "torch" calls the eager implementation in
kdfast/eager/block_attention.py.
"""

from __future__ import annotations

from torch import Tensor

from kdfast.eager import block_attention as eager
from kdfast.numerics.common import align_spatial, compute_dtype
from kdfast.ops import namespace, saveable_teacher
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, contract, register, sample_tensor


def _forward_fake(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor], grid: int, *knobs) -> tuple[Tensor, Tensor]:
    contract(len(f_s) >= 1 and len(f_s) == len(h_s) == len(f_t), "block_attention: expected equally many (>= 1) maps")
    check_rows("block_attention", *f_s, *h_s, *f_t, dims=4)
    contract(all(h.shape == t.shape for h, t in zip(h_s, f_t)), "block_attention: h_s[l] and f_t[l] must match")
    contract(grid >= 1, "block_attention: grid must be >= 1")
    acc = compute_dtype(f_s[0].dtype)
    terms = f_s[0].new_empty((len(f_s), 2), dtype=acc)
    return terms, f_s[0].new_empty((len(f_s), 2, f_s[0].shape[0], grid * grid), dtype=acc)


def _backward_fake(grad_terms: Tensor, f_s: list[Tensor], h_s: list[Tensor], *rest) -> tuple[list[Tensor], list[Tensor]]:
    return [f.new_empty(f.shape) for f in f_s], [h.new_empty(h.shape) for h in h_s]


def _setup(ctx, inputs, output):
    f_s, h_s, f_t, *ctx.knobs = inputs
    ctx.modules = len(f_s)
    ctx.save_for_backward(*f_s, *h_s, *f_t, output[1])


def _backward(ops, ctx, grad_terms, _grad_maps):
    n = ctx.modules
    if grad_terms is None:
        return [None] * n, [None] * n, [None] * n, None, None, None, None
    *tensors, maps = ctx.saved_tensors
    f_s, h_s, f_t = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
    grad_f_s, grad_h_s = ops.block_attention_backward(grad_terms.contiguous(), f_s, h_s, f_t, maps, *ctx.knobs)
    return grad_f_s, grad_h_s, [None] * n, None, None, None, None


def _samples() -> tuple[Sample, ...]:
    f_s = (sample_tensor(2, 2, 5, 3, seed=1, requires_grad=True), sample_tensor(2, 3, 4, 4, seed=2, requires_grad=True))
    h_s = (sample_tensor(2, 3, 5, 3, seed=3, requires_grad=True), sample_tensor(2, 2, 3, 3, seed=4, requires_grad=True))
    f_t = (sample_tensor(2, 3, 5, 3, seed=5), sample_tensor(2, 2, 3, 3, seed=6))

    def blocks(grid: int, power: float, feature_grid: int, teacher_weighting: bool):
        def run(*tensors: Tensor, backend: str) -> Tensor:
            f_s, h_s, f_t = (list(tensors[i : i + 2]) for i in (0, 2, 4))
            return block_attention_terms(f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting, backend)

        return run

    knobs = {"ndam teacher-weighted": (4, 1.0, 0, True), "aft": (3, 2.0, 2, False)}
    return tuple(Sample(label, blocks(*k), (*f_s, *h_s, *f_t)) for label, k in knobs.items())


_KNOBS = "int grid, float power, int feature_grid, bool teacher_weighting"
SPEC = register(
    OpSpec(
        "block_attention",
        kernels=(
            Kernel(
                "block_attention_forward",
                f"(Tensor[] f_s, Tensor[] h_s, Tensor[] f_t, {_KNOBS}) -> (Tensor, Tensor)",
                _forward_fake,
            ),
            Kernel(
                "block_attention_backward",
                f"(Tensor grad_terms, Tensor[] f_s, Tensor[] h_s, Tensor[] f_t, Tensor maps, {_KNOBS}) -> (Tensor[], Tensor[])",
                _backward_fake,
            ),
        ),
        autograd=(Autograd("block_attention_forward", _setup, _backward),),
        samples=_samples,
    )
)


def block_attention_terms(
    f_s: list[Tensor],
    h_s: list[Tensor],
    f_t: list[Tensor],
    grid: int,
    power: float,
    feature_grid: int,
    teacher_weighting: bool,
    backend: str,
) -> Tensor:
    """(L, 2) unweighted ``[feat, map]`` of every module on `backend` (float32; float64 for
    float64 students). ``h_s[l]`` and ``f_t[l]`` are aligned first (the larger pooled to the
    smaller, a torch op); the teacher is detached. One fused launch forward, one backward."""
    if backend == "torch":
        return eager.block_attention_terms(f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting)
    pairs = [align_spatial(h, t.detach()) for h, t in zip(h_s, f_t)]
    # The backward re-reads f_t whenever f_s or h_s requires grad: copy inference tensors then.
    teachers = [saveable_teacher(saveable_teacher(t, h), s) for s, (h, t) in zip(f_s, pairs)]
    terms, _ = namespace(backend).block_attention_forward(
        list(f_s), [h for h, _ in pairs], teachers, grid, power, feature_grid, teacher_weighting
    )
    return terms
