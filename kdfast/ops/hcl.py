"""torch.library declaration and backend dispatch of ReviewKD's hierarchical context loss (HCL;
formulas in kdfast/reference/hcl.py).

Op contract, the same on every fused backend (``torch.ops.kdfast_triton.*``: kdfast.kernels.hcl;
``torch.ops.kdfast.*``: the C++ CPU/CUDA kernels of kdfast._C, implementing the schemas declared here)::

    hcl_forward(Tensor[] f_s, Tensor[] f_t, int[] levels) -> (Tensor losses, Tensor cells)
    hcl_backward(Tensor grad_losses, Tensor[] f_s, Tensor[] f_t, Tensor cells, int[] levels)
        -> Tensor[] grad_f_s

* L >= 1 stages; ``f_s[i]`` and ``f_t[i]`` (B, C_i, H_i, W_i) of one shape, one B for all stages,
  non-empty, any strides (read in place). All f_s share one floating dtype, all f_t one (possibly
  another); all on one device. No check reads values: NaN/Inf propagate.
* ``levels``: at most 4 pooled levels, each >= 1, of at most 32 bins together (sum l^2; the
  peers' 4, 2, 1 has 21), in the peers' order (the weights halve along it); possibly empty. A
  stage uses the levels l < H_i (the peers' test, on the height).
* ``losses``: (L,) the HCL of every stage (the reference's ``stage_loss``), float32 (float64 for
  float64 f_s); every sum accumulates in that dtype.
* ``cells``: (R, N) in the losses' dtype, R = B * sum_i C_i rows (stage-major, then sample, then
  channel), N = sum_l l^2: row r holds the bin means ``D_k`` of ``fs - ft`` of its (stage, b, c)
  plane, over the stage's active levels in order and each level's bins row-major in its first
  columns, zeros after them. Saved for the backward, which then reads each input once.
* ``grad_losses``: (L,), any floating dtype, read on the device. ``grad_f_s[i]``: ``empty_like``
  of f_s[i] (its layout when dense: contiguous, channels_last), f_s's dtype: the gradient of
  ``sum_i grad_losses[i] losses[i]``. The teacher gets no gradient.
* One launch for every stage and level in each direction (plus a tiny per-stage sum of the
  forward's partials; Triton launches at most 8 stages at once), deterministic: every partial
  is reduced in a fixed order (no atomics), the partition depends on the shapes only. Extra
  memory: the cells (R x N) and one partial sum per plane (CUDA, CPU) or per program (Triton);
  never a (B, C, H, W) difference or pooled copy of a map.

This module declares the op once (schemas, fake kernels, autograd formula: ``SPEC``, registered in
every library by kdfast.ops.spec) and dispatches it. Backend "torch" calls the eager implementation
in kdfast/eager/hcl.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdfast.eager import hcl as eager
from kdfast.numerics.common import compute_dtype
from kdfast.numerics.hcl import LEVELS, MAX_CELLS, MAX_LEVELS, cell_count
from kdfast.ops import namespace, saveable_teacher
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, contract, register, sample_tensor


def _forward_fake(f_s: list[Tensor], f_t: list[Tensor], levels: list[int]) -> tuple[Tensor, Tensor]:
    name = "hcl_forward"
    contract(len(f_s) >= 1 and len(f_t) == len(f_s), f"{name}: f_s and f_t must have as many stages (at least one)")
    check_rows(name, *f_s, *f_t, dims=4)
    for s, t in zip(f_s, f_t):
        contract(s.shape == t.shape, f"{name}: f_s[i] and f_t[i] must have one shape")
    contract(len(levels) <= MAX_LEVELS, f"{name}: at most {MAX_LEVELS} levels")
    contract(all(level >= 1 for level in levels), f"{name}: levels must be >= 1")
    contract(cell_count(levels) <= MAX_CELLS, f"{name}: at most {MAX_CELLS} bins together (sum l^2)")
    acc = compute_dtype(f_s[0].dtype)
    rows = f_s[0].shape[0] * sum(f.shape[1] for f in f_s)
    return f_s[0].new_empty((len(f_s),), dtype=acc), f_s[0].new_empty((rows, cell_count(levels)), dtype=acc)


def _backward_fake(grad_losses: Tensor, f_s: list[Tensor], f_t: list[Tensor], cells: Tensor, levels: list[int]) -> list[Tensor]:
    return [torch.empty_like(f) for f in f_s]


def _setup(ctx, inputs, output):
    f_s, f_t, ctx.levels = inputs
    ctx.stages = len(f_s)
    ctx.save_for_backward(*f_s, *f_t, output[1])


def _backward(ops, ctx, grad_losses, _grad_cells):
    n = ctx.stages
    # one gradient per input, in the inputs' structure (an empty int list is a list, others a leaf)
    no_levels: list[None] | None = [] if not ctx.levels else None
    if grad_losses is None:
        return [None] * n, [None] * n, no_levels
    saved = ctx.saved_tensors
    f_s, f_t, cells = list(saved[:n]), list(saved[n : 2 * n]), saved[2 * n]
    return ops.hcl_backward(grad_losses.contiguous(), f_s, f_t, cells, ctx.levels), [None] * n, no_levels


def _samples() -> tuple[Sample, ...]:
    shapes = ((2, 3, 5, 5), (2, 2, 2, 3), (2, 4, 1, 1))  # every level, only level 1 (H = 2), none (H = 1)
    f_s = tuple(sample_tensor(*s, seed=i, requires_grad=True) for i, s in enumerate(shapes))
    f_t = tuple(sample_tensor(*s, seed=10 + i) for i, s in enumerate(shapes))

    def pyramid(s1: Tensor, s2: Tensor, s3: Tensor, t1: Tensor, t2: Tensor, t3: Tensor, backend: str) -> Tensor:
        return hcl_stage_losses([s1, s2, s3], [t1, t2, t3], LEVELS, backend)

    return (
        Sample("levels 4, 2, 1", pyramid, (*f_s, *f_t)),
        Sample(
            "levels 3, 1",
            lambda s, t, backend: hcl_stage_losses([s], [t], (3, 1), backend),
            (sample_tensor(3, 2, 6, 4, seed=20, requires_grad=True), sample_tensor(3, 2, 6, 4, seed=21)),
        ),
        Sample("no levels", lambda s, t, backend: hcl_stage_losses([s], [t], (), backend), (f_s[0], f_t[0])),
    )


SPEC = register(
    OpSpec(
        "hcl",
        kernels=(
            Kernel("hcl_forward", "(Tensor[] f_s, Tensor[] f_t, int[] levels) -> (Tensor, Tensor)", _forward_fake),
            Kernel(
                "hcl_backward",
                "(Tensor grad_losses, Tensor[] f_s, Tensor[] f_t, Tensor cells, int[] levels) -> Tensor[]",
                _backward_fake,
            ),
        ),
        autograd=(Autograd("hcl_forward", _setup, _backward),),
        samples=_samples,
    )
)


def hcl_stage_losses(f_s: Sequence[Tensor], f_t: Sequence[Tensor], levels: Sequence[int], backend: str) -> Tensor:
    """(L,) HCL of every stage pair on `backend`; the teachers are detached (and copied where they
    are inference tensors the backward must re-read)."""
    if backend == "torch":
        return eager.hcl_stage_losses(f_s, f_t, levels)
    students = list(f_s)
    trained = next((s for s in students if s.requires_grad), students[0])
    teachers = [saveable_teacher(t.detach(), trained) for t in f_t]
    losses, _ = namespace(backend).hcl_forward(students, teachers, [int(level) for level in levels])
    return losses
