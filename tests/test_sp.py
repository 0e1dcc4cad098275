"""Similarity-preserving loss (SP): every fused backend against the float64 eager reference.

Values and gradients (non-unit upstream gradient), every dtype, 2-D / contiguous / channels_last
inputs, Ds != Dt, odd B, B = 1 (every dtype) and 2, duplicated and zero rows, several tiles and
column splits, the Triton launchers' memory, mdistiller's formula and bad input
(opcheck, compile, gradcheck: test_op_contracts.py). Shapes stay tiny: the Triton
kernels run in the interpreter here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _compare import LargestTensor, check_against_reference
from conftest import DTYPES, TOL, backends_with_torch, device_backends, feature, triton_backends

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.kernels import relational
from kdfast.kernels import sp as sp_kernels
from kdfast.reference import sp as ref

TRITON = triton_backends("sp")
WITH_TORCH = backends_with_torch("sp")
# (student shape, teacher shape) per layout: odd B, Ds != Dt.
SHAPES = {"2d": ((5, 18), (5, 11)), "nchw": ((5, 3, 2, 3), (5, 4, 3, 2)), "nhwc": ((5, 3, 2, 3), (5, 4, 3, 2))}


def check(backend, f_s, f_t, loss_tol, grad_tol, upstream=1.0, floor=1e-30):
    """The fused loss and gradient against the float64 reference on the same (rounded) inputs."""
    loss, (grad,) = check_against_reference(
        lambda s, t: F.sp_loss(s, t, backend=backend), ref.sp_loss, (f_s, f_t), loss_tol, grad_tol, upstream=upstream, floor=floor
    )
    assert loss.shape == ()
    return loss, grad


@pytest.mark.parametrize("device,backend", device_backends("sp"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", SHAPES)
def test_matches_reference(device, backend, dtype, layout):
    s_shape, t_shape = SHAPES[layout]
    f_s = feature(s_shape, dtype, device, layout == "nhwc", requires_grad=True, seed=1)
    f_t = feature(t_shape, dtype, device, layout == "nhwc", seed=2)
    _, grad = check(backend, f_s, f_t, *TOL[dtype], upstream=-2.5)
    if layout == "nhwc":  # read in place: the gradient comes back in the student's layout
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", device_backends("sp"))
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_small_batches(device, backend, batch):
    """B = 1: G = [1] for both nets, loss and gradient 0; B = 2, 3: finite."""
    f_s = feature((batch, 7), device=device, requires_grad=True, seed=3)
    check(backend, f_s, feature((batch, 4), device=device, seed=4), 2e-5, 2e-5, floor=1e-2)


@pytest.mark.parametrize("device,backend", device_backends("sp"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_of_one(device, backend, dtype):
    """B = 1 in every dtype (a last batch of 1; Triton turns an int argument equal to 1 into a
    constexpr): loss and gradient 0 up to rounding."""
    f_s = feature((1, 3, 2, 2), dtype, device, requires_grad=True, seed=3)
    check(backend, f_s, feature((1, 5), dtype, device, seed=4), *TOL[dtype], upstream=2.0, floor=1e-2)


def force_splits(monkeypatch) -> None:
    """Makes the Triton launchers split D as far as they can (the interpreter's target is 1 program)."""
    monkeypatch.setattr(relational, "target_programs", lambda device: 1 << 20)
    monkeypatch.setattr(relational, "MIN_SPLIT_BLOCKS", 1)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_duplicated_rows(device, backend):
    f_s = feature((6, 9), device=device, seed=5)
    f_t = feature((6, 5), device=device, seed=6)
    f_s[4], f_t[4] = f_s[1], f_t[1]
    f_s[2] = f_s[0]  # the student alone
    check(backend, f_s.requires_grad_(), f_t, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_zero_rows(device, backend, which):
    """A zero row has a zero Gram row, clamped by eps: G row 0, and (student) the gradient of
    F.normalize's clamp, 1/eps times larger than the others."""
    f_s = feature((5, 6), device=device, seed=7)
    f_t = feature((5, 8), device=device, seed=8)
    if which != "teacher":
        f_s[3] = 0
    if which != "student":
        f_t[1] = 0
    check(backend, f_s.requires_grad_(), f_t, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_several_tiles_and_splits(device, backend, dtype, monkeypatch):
    """3 x 3 tiles of 16 rows, D split into 2 (student) and 3 (teacher) column blocks of 64 (the
    student's third split empty); float16: the tensor-core path (tl.dot of the native tiles, M
    as hi + lo), which the interpreter runs too."""
    monkeypatch.setattr(sp_kernels, "_block", lambda n: 16)
    force_splits(monkeypatch)
    f_s = feature((37, 70), dtype, device, requires_grad=True, seed=9)
    check(backend, f_s, feature((37, 3, 5, 9), dtype, device, seed=10), *TOL[dtype], upstream=3.0)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_teacher_dtype_and_no_teacher_gradient(device, backend):
    f_s = feature((4, 3, 2, 2), device=device, requires_grad=True, seed=11)
    f_t = feature((4, 2, 2, 2), torch.bfloat16, device, requires_grad=True, seed=12)
    check(backend, f_s, f_t, 2e-5, 2e-5)
    F.sp_loss(f_s, f_t, backend=backend).backward()
    assert f_t.grad is None


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_gives_nan_loss(device, backend):
    f_s = feature((3, 4), device=device, seed=13)
    f_s[1, 2] = float("nan")
    assert torch.isnan(F.sp_loss(f_s, feature((3, 4), device=device, seed=14), backend=backend))


def test_reference_is_mdistillers_formula():
    """The reference equals a literal transcription of mdistiller's similarity_loss (float64)."""
    f_s = feature((8, 4, 3, 3), torch.float64, requires_grad=True, seed=15)
    f_t = feature((8, 6, 2, 2), torch.float64, seed=16)
    g_s = torch.nn.functional.normalize(torch.mm(f_s.view(8, -1), f_s.view(8, -1).t()))
    g_t = torch.nn.functional.normalize(torch.mm(f_t.view(8, -1), f_t.view(8, -1).t()))
    expected = ((g_t - g_s) * (g_t - g_s)).view(-1, 1).sum(0) / 64
    actual = ref.sp_loss(f_s, f_t)
    torch.testing.assert_close(actual, expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(actual, f_s)[0], torch.autograd.grad(expected[0], f_s)[0], rtol=1e-10, atol=1e-14
    )


def test_module_matches_functional():
    f_s, f_t = feature((4, 5), seed=17), feature((4, 3), seed=18)
    assert knn.SPLoss(backend="torch")(f_s, f_t).item() == pytest.approx(F.sp_loss(f_s, f_t, backend="torch").item())
    assert "backend='torch'" in repr(knn.SPLoss(backend="torch"))


# --- fused ops: memory, gradcheck, opcheck, torch.compile


def run_sp(device, x_s, x_t) -> int:
    """The largest tensor (bytes) of the Triton forward and backward."""
    with LargestTensor() as mode:
        _, stats = sp_kernels.sp_forward(x_s, x_t)
        sp_kernels.sp_backward(torch.ones((), device=device), x_s, x_t, stats)
    return mode.largest


@pytest.mark.parametrize("device,backend", TRITON)
def test_memory(device, backend, monkeypatch):
    """The Triton launchers' largest buffers are the (2, splits, B, B) float32 Gram partials (B > D
    here: 2 B^2 floats at splits = 1); nothing of (B, D) but the inputs and the gradient in the
    student's dtype (B < D), even when D is split."""
    batch, depth = 40, 6
    x_s = feature((batch, depth), device=device, seed=19)
    assert run_sp(device, x_s, feature((batch, depth - 1), device=device, seed=20)) == 2 * batch * batch * 4
    batch, depth = 6, 300
    force_splits(monkeypatch)
    x_s = feature((batch, depth), torch.bfloat16, device, seed=19)
    assert run_sp(device, x_s, feature((batch, depth), torch.bfloat16, device, seed=20)) == batch * depth * 2


@pytest.mark.parametrize("device,backend", TRITON)
def test_launcher_checks(device, backend):
    x = feature((3, 4), device=device)
    with pytest.raises(ValueError, match="one batch size"):
        sp_kernels.sp_forward(x, feature((2, 4), device=device))
    with pytest.raises(ValueError, match="must be 2-D"):
        sp_kernels.sp_forward(x.view(3, 2, 2), x)
    _, stats = sp_kernels.sp_forward(x, x)
    with pytest.raises(ValueError, match="stats must be"):
        sp_kernels.sp_backward(torch.ones((), device=device), x, x, stats[:2])
    assert (
        min(sp_kernels._block(1), *sp_kernels.BLOCK_D.values(), *sp_kernels.BLOCK_N.values()) >= 16
    )  # tl.dot's smallest side on the GPU


# --- bad input


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(f_s=torch.randn(4)), ValueError, "f_s must have at least 2 dims"),
        (dict(f_t=torch.randn(3, 5)), ValueError, "one batch size"),
        (dict(f_s=torch.ones(4, 3, dtype=torch.int32)), TypeError, "f_s must be float16"),
        (dict(f_t=[[1.0]]), TypeError, "f_t must be a torch.Tensor"),
        (dict(f_s=torch.randn(4, 0), f_t=torch.randn(4, 0)), ValueError, "f_s is empty"),
        (dict(f_t=torch.randn(4, 5, device="meta")), ValueError, "one device"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
    ],
)
def test_bad_input(change, error, match):
    args: dict[str, Any] = dict(f_s=torch.randn(4, 3), f_t=torch.randn(4, 5))
    args.update(change)
    with pytest.raises(error, match=match):
        F.sp_loss(**args)
