"""ReviewKD's hierarchical context loss (hcl): every fused backend against the float64 eager reference.

Losses and gradients (non-unit, per-stage upstream gradients) in every dtype; the peers' levels
and others (none, one, four); maps of every size relative to the levels (1x1, smaller than a level,
not divisible by it, non-square); contiguous, channels_last, mixed and strided layouts; a teacher
of another dtype or made under inference mode; more stages than one launch holds; the saved cells;
determinism; no map-sized allocation in the forward; launcher and functional errors (opcheck,
compile, gradcheck and the standard bad inputs: test_op_contracts.py). Shapes stay tiny: the Triton
kernels run in the interpreter and the CUDA kernels in the emulation here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _compare import (
    LargestTensor,
    assert_deterministic,
    assert_float32_and_unchanged_under_autocast,
    check_against_reference,
)
from conftest import DTYPES, TOL, assert_close_scaled, backends_with_torch, device_backends, triton_backends
from torch import Tensor

from kdfast import functional as KF
from kdfast import nn as knn
from kdfast.kernels import hcl as kernels
from kdfast.numerics import hcl as numerics
from kdfast.reference import hcl as ref

FUSED = device_backends("hcl")
TRITON = triton_backends("hcl")
WITH_TORCH = backends_with_torch("hcl")
# every level (5x5: 4 does not divide), the levels below 4 (4x3), only level 1 (2x2), none (1x1)
STAGES = ((2, 3, 5, 5), (2, 4, 4, 3), (2, 2, 2, 2), (2, 5, 1, 1))


def feature(shape, dtype=torch.float32, device="cpu", channels_last=False, requires_grad=False, seed=0):
    f = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(device)
    if channels_last:
        f = f.contiguous(memory_format=torch.channels_last)
    return f.requires_grad_(requires_grad)


def pairs(shapes=STAGES, dtype=torch.float32, device="cpu", t_dtype=None, seed=0, **kwargs):
    f_s = [feature(s, dtype, device, requires_grad=True, seed=seed + i, **kwargs) for i, s in enumerate(shapes)]
    f_t = [feature(s, t_dtype or dtype, device, seed=seed + 100 + i, **kwargs) for i, s in enumerate(shapes)]
    return f_s, f_t


def check(backend, f_s, f_t, levels=ref.LEVELS, loss_tol=2e-5, grad_tol=2e-5, floor=1e-30):
    """Stage losses and the student gradients of ``sum_i u_i loss_i`` (u non-uniform) against the
    float64 reference on the same (rounded) inputs."""
    losses, grads = check_against_reference(
        lambda s, t: KF.hcl_loss(s, t, levels, "none", backend=backend),
        lambda s, t: ref.hcl_stage_losses(s, t, levels),
        (f_s, f_t),
        loss_tol,
        grad_tol,
        upstream=torch.linspace(-1.5, 2.5, len(f_s), dtype=torch.float64),
        floor=floor,
    )
    assert losses.shape == (len(f_s),)
    return losses, grads


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, backend, dtype):
    f_s, f_t = pairs(dtype=dtype, device=device)
    check(backend, f_s, f_t, loss_tol=TOL[dtype][0], grad_tol=TOL[dtype][1])


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("levels", [(), (1,), (3, 1), (2, 4), (5, 2, 1, 1)], ids=str)
def test_levels(device, backend, levels):
    """No level, one, an unsorted pair, four levels of 31 bins together (the limit is 32)."""
    shapes = ((2, 3, 6, 7), (2, 2, 3, 3), (2, 4, 11, 5))
    f_s, f_t = pairs(shapes, device=device, seed=1)
    check(backend, f_s, f_t, levels)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "channel_slice", "transposed"])
def test_layouts(device, backend, layout):
    """Read in place: channels_last, student and teacher in different layouts, a channel slice,
    h and w transposed; the gradients come back in the students' layouts where they are dense."""
    shapes = ((2, 3, 5, 5), (2, 6, 4, 4))
    f_s, f_t = pairs(shapes, device=device, seed=2, channels_last=layout != "transposed")
    if layout == "mixed":
        f_t = [t.contiguous() for t in f_t]
    if layout == "channel_slice":
        f_s = [feature((2, 9, 5, 5), device=device, seed=3)[:, 2:5].requires_grad_(), f_s[1]]
    if layout == "transposed":
        f_s = [feature((2, 3, 5, 6), device=device, seed=4).transpose(2, 3).requires_grad_(), f_s[1]]
        f_t = [feature((2, 3, 5, 6), device=device, seed=5).transpose(2, 3), f_t[1].transpose(2, 3)]
    _, grads = check(backend, f_s, f_t)
    if layout in ("channels_last", "mixed") and backend != "torch":
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize(
    "shapes",
    [((1, 1, 1, 1),), ((1, 3, 1, 5),), ((2, 1, 3, 1),), ((3, 2, 7, 5), (3, 1, 9, 2)), ((2, 40, 9, 9),)],
    ids=str,
)
def test_shapes(device, backend, shapes):
    """Single elements, rows, columns, non-square maps, several channel and position blocks."""
    f_s, f_t = pairs(shapes, device=device, seed=5)
    check(backend, f_s, f_t)


@pytest.mark.parametrize("device,backend", FUSED)
def test_more_stages_than_one_launch_holds(device, backend):
    shapes = tuple((2, 1 + i % 3, 2 + i % 4, 3) for i in range(10))
    f_s, f_t = pairs(shapes, device=device, seed=6)
    check(backend, f_s, f_t)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_teacher_of_another_dtype(device, backend):
    f_s, f_t = pairs(device=device, t_dtype=torch.bfloat16, seed=7)
    check(backend, f_s, f_t)
    f_s, f_t = pairs(dtype=torch.bfloat16, device=device, t_dtype=torch.float32, seed=8)
    check(backend, f_s, f_t, loss_tol=TOL[torch.bfloat16][0], grad_tol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_inference_mode_teacher(device, backend):
    """A teacher made under torch.inference_mode works and gives the same gradients."""
    grads = []
    for inference in (False, True):
        with torch.inference_mode(inference):
            f_t = [feature(s, device=device, seed=9 + i) for i, s in enumerate(STAGES)]
        f_s = [feature(s, device=device, requires_grad=True, seed=20 + i) for i, s in enumerate(STAGES)]
        grads.append(torch.autograd.grad(KF.hcl_loss(f_s, f_t, backend=backend), f_s))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", FUSED)
def test_cells_are_the_bin_means(device, backend):
    """The saved cells: per (stage, sample, channel) row, the pooled differences of the active
    levels in order, zeros after them."""
    f_s, f_t = pairs(((2, 3, 5, 5), (2, 2, 3, 4), (2, 1, 1, 1)), device=device, seed=30)
    _, cells = getattr(torch.ops, {"triton": "kdfast_triton", "cuda_emu": "kdfast_emu"}.get(backend, "kdfast")).hcl_forward(
        [s.detach() for s in f_s], f_t, [4, 2, 1]
    )
    assert cells.shape == (2 * (3 + 2 + 1), 21)
    rows = []
    for s, t in zip(f_s, f_t):
        d = (s.detach() - t).double().cpu()
        active, _ = ref.active_levels(s.shape[2], [4, 2, 1])
        bins = [F.adaptive_avg_pool2d(d, level).flatten(2) for level, _ in active]
        row = torch.cat(bins, dim=2) if bins else d.new_zeros(d.shape[:2] + (0,))
        rows.append(F.pad(row, (0, 21 - row.shape[2])).flatten(0, 1))
    assert_close_scaled(cells, torch.cat(rows), 2e-6, "cells")


@pytest.mark.parametrize("device,backend", FUSED)
def test_deterministic(device, backend):
    """Bitwise the same losses and gradients on every call, whatever the thread count."""
    f_s, f_t = pairs(((3, 9, 6, 6), (3, 4, 3, 3)), device=device, seed=31)
    assert_deterministic(lambda: KF.hcl_loss(f_s, f_t, reduction="none", backend=backend), f_s)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_gives_nan_loss(device, backend):
    f_s, f_t = pairs(device=device, seed=32)
    f_t[1][0, 1, 2, 0] = float("nan")
    losses = KF.hcl_loss(f_s, f_t, reduction="none", backend=backend)
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2, 3]]).all()


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_float32_and_unchanged_under_autocast(device, backend):
    f_s, f_t = pairs(device=device, seed=33)
    assert_float32_and_unchanged_under_autocast(lambda: KF.hcl_loss(f_s, f_t, backend=backend), device)


def peer_hcl(fstudent: list[Tensor], fteacher: list[Tensor]) -> Tensor:
    """ReviewKD's hcl as the authors' code and mdistiller write it, transcribed: per stage the full
    MSE plus the pooled MSEs at 4, 2, 1 below the map's height, weights halving, normalised."""
    total = fstudent[0].new_zeros(())
    for fs, ft in zip(fstudent, fteacher):
        height = fs.shape[2]
        stage = F.mse_loss(fs, ft, reduction="mean")
        weight, norm = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= height:
                continue
            weight /= 2.0
            pooled_s = F.adaptive_avg_pool2d(fs, (level, level))
            pooled_t = F.adaptive_avg_pool2d(ft, (level, level))
            stage += F.mse_loss(pooled_s, pooled_t, reduction="mean") * weight
            norm += weight
        total = total + stage / norm
    return total


def test_reference_is_the_peers_formula():
    f_s, f_t = pairs(((4, 5, 8, 8), (4, 3, 7, 7), (4, 6, 4, 4), (4, 2, 1, 1)), dtype=torch.float64, seed=34)
    torch.testing.assert_close(ref.hcl_loss(f_s, f_t), peer_hcl(f_s, f_t), rtol=1e-14, atol=0)
    assert ref.active_levels(8, ref.LEVELS) == ([(4, 0.5), (2, 0.25), (1, 0.125)], 1.875)
    assert ref.active_levels(4, ref.LEVELS) == ([(2, 0.5), (1, 0.25)], 1.75)
    assert ref.active_levels(1, ref.LEVELS) == ([], 1.0)


def test_module_matches_functional():
    f_s, f_t = pairs(seed=35)
    module = knn.HCLLoss((3, 1), backend="torch")
    assert module(f_s, f_t).item() == pytest.approx(KF.hcl_loss(f_s, f_t, (3, 1), backend="torch").item())
    assert "levels=(3, 1), reduction='sum', backend='torch'" in repr(module)


@pytest.mark.parametrize("device,backend", TRITON)
def test_forward_allocates_no_map(device, backend):
    """The forward stores the cells and one partial per program, never a difference or a pooled
    copy of a map; the reference, for contrast, builds the (B, C, H, W) difference."""
    f_s, f_t = pairs(((2, 16, 12, 12),), device=device, seed=36)
    student = [f_s[0].detach()]
    with LargestTensor() as mode:
        kernels.hcl_forward(student, f_t, [4, 2, 1])
    assert mode.largest < f_s[0].numel() * 4 // 4  # the cells: 2 * 16 * 21 floats
    with LargestTensor() as mode:
        ref.hcl_loss(f_s, f_t)
    assert mode.largest == f_s[0].numel() * 4


def assert_forward_checks(forward, error: type[Exception], f_s: list[Tensor], f_t: list[Tensor]) -> None:
    """The level and shape checks that the Triton launcher and the C++ kernels share: `forward`
    (one of them, called with one stage) raises `error` with the same message."""
    for levels, message in (([2, 0], "levels must be >= 1"), ([4, 4, 1], "more than 32 bins"), ([1] * 5, "at most 4 levels")):
        with pytest.raises(error, match=message):
            forward(f_s, f_t, levels)
    with pytest.raises(error, match="must have one shape"):
        forward(f_s, [f_t[0][:, :2]], [4, 2, 1])


@pytest.mark.parametrize("device,backend", TRITON)
def test_launcher_checks(device, backend):
    f_s, f_t = pairs(((2, 3, 4, 4),), device=device, seed=37)
    f_s = [f_s[0].detach()]
    assert_forward_checks(kernels.hcl_forward, ValueError, f_s, f_t)
    with pytest.raises(ValueError, match="as many stages"):
        kernels.hcl_forward(f_s, f_t * 2, [4, 2, 1])
    _, cells = kernels.hcl_forward(f_s, f_t, [4, 2, 1])
    with pytest.raises(ValueError, match="cells must be the forward's"):
        kernels.hcl_backward(torch.ones(1, device=device), f_s, f_t, cells[:, :4], [4, 2, 1])
    with pytest.raises(ValueError, match="grad_losses must be"):
        kernels.hcl_backward(torch.ones(2, device=device), f_s, f_t, cells, [4, 2, 1])


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] in ("cpu", "cuda_emu")])
def test_cpp_checks(device, backend):
    lib = torch.ops.kdfast_emu if backend == "cuda_emu" else torch.ops.kdfast
    f_s, f_t = pairs(((2, 3, 4, 4),), device=device, seed=38)
    f_s = [f_s[0].detach()]
    assert_forward_checks(lib.hcl_forward, RuntimeError, f_s, f_t)
    _, cells = lib.hcl_forward(f_s, f_t, [4, 2, 1])
    with pytest.raises(RuntimeError, match="cells must have shape"):
        lib.hcl_backward(torch.ones(1), f_s, f_t, cells[:, :4], [4, 2, 1])
    with pytest.raises(RuntimeError, match="grad_losses must be"):
        lib.hcl_backward(torch.ones(2), f_s, f_t, cells, [4, 2, 1])


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(f_s=[torch.randn(2, 3, 4)]), ValueError, r"f_s\[0\] must be 4-D"),
        (dict(f_t=[torch.randn(2, 3, 4, 5)]), ValueError, "must have one shape"),
        (dict(f_t=[torch.randn(2, 3, 4, 4)] * 2), ValueError, "as many stages"),
        (dict(f_s=[torch.ones(2, 3, 4, 4, dtype=torch.int32)]), TypeError, r"f_s\[0\] must be float16"),
        (dict(f_s="x"), TypeError, "f_s must be a tensor"),
        (dict(levels=(4, 0)), ValueError, "levels must be ints >= 1"),
        (dict(levels=(6, 1)), ValueError, "at most 32 bins"),
        (dict(levels=4), ValueError, "levels must be a sequence"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
    ],
)
def test_bad_input(change, error, match):
    args: dict[str, Any] = dict(f_s=[torch.randn(2, 3, 4, 4)], f_t=[torch.randn(2, 3, 4, 4)])
    args.update(change)
    with pytest.raises(error, match=match):
        KF.hcl_loss(**args)


def test_check_levels():
    assert numerics.check_levels([4, 2, 1]) == (4, 2, 1)
    assert numerics.cell_count((4, 2, 1)) == 21
    with pytest.raises(ValueError):
        numerics.check_levels([True])
