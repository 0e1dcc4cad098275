"""Local correlation consistency (LCC): every fused backend against the float64 eager reference.

Values and gradients (all terms, each term alone, a non-unit upstream gradient), every dtype and
layout, shapes that need pooling, masks, edge cases (B = 1, zero maps), bad input, the tiling of
the Triton kernels (odd/even tile counts, split programs), no N x N allocation (opcheck,
compile, gradcheck: test_op_contracts.py). Shapes stay tiny: the Triton kernels run in the interpreter here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _compare import check_against_reference
from conftest import DTYPES, TOL, assert_close_scaled, backends_with_torch, device_backends, feature, triton_backends

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.reference import lcc as ref

TRITON = triton_backends("lcc")
WITH_TORCH = backends_with_torch("lcc")


def check(backend, f_s, f_t, loss_tol, grad_tol, upstream=1.0, floor=1e-30, mask=None, **kwargs):
    """The fused loss and student gradient against the float64 reference on the same (rounded) inputs."""
    return check_against_reference(
        lambda s, t, m: F.local_correlation_loss(s, t, mask=m, backend=backend, **kwargs),
        lambda s, t, m: ref.local_correlation_loss(s, t, mask=m, **kwargs),
        (f_s, f_t, mask),
        loss_tol,
        grad_tol,
        upstream=upstream,
        floor=floor,
    )


@pytest.mark.parametrize("device,backend", device_backends("lcc"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference(device, backend, dtype, channels_last):
    f_s = feature((3, 4, 8, 8), dtype, device, channels_last, requires_grad=True, seed=1)
    f_t = feature((3, 6, 8, 8), dtype, device, channels_last, seed=2)
    check(backend, f_s, f_t, *TOL[dtype], weights=(1.0, 2.5, 0.5))


@pytest.mark.parametrize("device,backend", device_backends("lcc"))
@pytest.mark.parametrize("term", ref.TERMS)
def test_each_term_alone(device, backend, term):
    f_s = feature((3, 3, 4, 4), device=device, requires_grad=True, seed=3)
    f_t = feature((3, 5, 4, 4), device=device, seed=4)
    out, _ = check(backend, f_s, f_t, 2e-5, 2e-5, terms=(term,), weights=(2.0, 3.0, 4.0), grid=2)
    assert out > 0


@pytest.mark.parametrize("device,backend", device_backends("lcc"))
def test_upstream_gradient_and_teacher_gets_none(device, backend):
    f_s = feature((3, 3, 4, 4), device=device, requires_grad=True, seed=5)
    f_t = feature((3, 5, 4, 4), device=device, requires_grad=True, seed=6)
    upstream = torch.tensor([2.0, -0.5, 3.0])
    out, _ = check(backend, f_s, f_t, 2e-5, 2e-5, upstream=upstream, reduction="none", grid=2, weights=(1.0, 0.5, 2.0))
    assert out.shape == (3,)
    F.local_correlation_loss(f_s, f_t, grid=2, backend=backend).backward()
    assert f_t.grad is None


@pytest.mark.parametrize("device,backend", device_backends("lcc"))
@pytest.mark.parametrize(
    "s_shape,t_shape,grid",
    [
        ((3, 4, 7, 7), (3, 2, 7, 7), 3),  # grid does not divide H: pooled to 6x6
        ((2, 3, 8, 8), (2, 5, 4, 4), 2),  # Hs > Ht: the student is pooled
        ((2, 3, 4, 4), (2, 5, 8, 8), 4),  # Ht > Hs: the teacher is pooled
        ((3, 2, 8, 4), (3, 3, 8, 4), 2),  # non-square regions (4 x 2)
        ((2, 3, 5, 3), (2, 3, 5, 3), 4),  # grid larger than H and W: pooled to 4x4
        ((2, 5, 4, 4), (2, 3, 4, 4), 1),  # one region per sample
    ],
)
def test_shapes(device, backend, s_shape, t_shape, grid):
    f_s = feature(s_shape, device=device, requires_grad=True, seed=7)
    f_t = feature(t_shape, device=device, seed=8)
    check(backend, f_s, f_t, 2e-5, 2e-5, grid=grid)


@pytest.mark.parametrize("device,backend", device_backends("lcc"))
@pytest.mark.parametrize("mask_hw", [(8, 8), (4, 4), (3, 5)])
def test_mask(device, backend, mask_hw):
    f_s = feature((2, 3, 8, 8), device=device, requires_grad=True, seed=9)
    f_t = feature((2, 4, 8, 8), device=device, seed=10)
    mask = torch.rand((2, 1, *mask_hw), generator=torch.Generator().manual_seed(11)).to(device).requires_grad_()
    check(backend, f_s, f_t, 2e-5, 2e-5, mask=mask)
    (F.local_correlation_loss(f_s, f_t, mask=mask, backend=backend)).backward()
    assert mask.grad is None  # the mask is detached


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_batch_one(device, backend):
    f_s = feature((1, 3, 4, 4), device=device, requires_grad=True, seed=12)
    f_t = feature((1, 5, 4, 4), device=device, seed=13)
    out, _ = check(backend, f_s, f_t, 2e-5, 2e-5, reduction="none")
    assert out[0] > 0 and out[1] == 0 and out[2] == 0


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_zero_maps_are_finite(device, backend, which):
    f_s = feature((2, 3, 4, 4), device=device, seed=14)
    f_t = feature((2, 5, 4, 4), device=device, seed=15)
    if which in ("student", "both"):
        f_s = torch.zeros_like(f_s)
    if which in ("teacher", "both"):
        f_t = torch.zeros_like(f_t)
    # Exactly 0 for zero students (their normalised descriptors are 0): compare on the loss's scale.
    check(backend, f_s.requires_grad_(), f_t, 2e-5, 2e-5, floor=1e-2, grid=2)


@pytest.mark.parametrize("device,backend", device_backends("lcc"))
def test_mixed_dtypes_and_odd_strides(device, backend):
    f_s = feature((2, 3, 4, 6), device=device, seed=16).transpose(2, 3).requires_grad_()  # (2, 3, 6, 4)
    f_t = feature((2, 5, 6, 4), torch.bfloat16, device, channels_last=True, seed=17)
    check(backend, f_s, f_t, 2e-5, 2e-5, grid=2)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_gives_nan_loss(device, backend):
    f_s = feature((2, 3, 4, 4), device=device, seed=18)
    f_t = feature((2, 3, 4, 4), device=device, seed=19)
    f_s[1, 2, 3, 1] = float("nan")
    assert torch.isnan(F.local_correlation_loss(f_s, f_t, backend=backend))
    assert torch.isnan(F.local_correlation_loss(f_t, f_s, backend=backend))


def test_module_matches_functional():
    f_s, f_t = feature((2, 3, 4, 4), seed=20), feature((2, 5, 4, 4), seed=21)
    mask = torch.rand(2, 1, 4, 4)
    module = knn.LocalCorrelationLoss(grid=2, terms=("intra", "cross"), weights=(1.0, 2.0, 3.0), backend="torch")
    expected = F.local_correlation_loss(f_s, f_t, 2, ("intra", "cross"), (1.0, 2.0, 3.0), mask, backend="torch")
    torch.testing.assert_close(module(f_s, f_t, mask), expected)
    assert "grid=2" in repr(module)


# --- the Triton kernels themselves: tiles, splits, layouts


def _sums_reference(f_s, f_t, grid):
    """float64 class sums of Delta^2 and inverse norms of prepared maps (no division by counts)."""
    s64, t64 = f_s.detach().double().cpu(), f_t.detach().double().cpu()
    counts = torch.tensor([max(c, 1) for c in ref.term_counts(f_s.shape[0], grid)], dtype=torch.float64)
    inv = [1 / ref.descriptors(f, grid).norm(dim=1).clamp_min(ref.EPS) for f in (s64, t64)]
    return ref.lcc_terms(s64, t64, grid) * counts, *inv


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize(
    "batch,block,splits,channels_last",
    [(3, 16, None, False), (4, 16, 2, True), (5, 16, 3, False), (5, 32, 9, False), (4, 16, 1, False)],
    ids=["nb3", "nb4-split2-nhwc", "nb5-split3", "nb3-partial-block", "nb4"],
)
def test_triton_tiles_and_splits(device, backend, batch, block, splits, channels_last):
    from kdfast.kernels import lcc as kernels

    f_s = feature((batch, 3, 4, 4), device=device, channels_last=channels_last, seed=22)
    f_t = feature((batch, 5, 4, 4), torch.float16, device, seed=23)
    sums, inv_s, inv_t = kernels.lcc_forward(f_s, f_t, 4, block=block, splits=splits)
    expected_sums, expected_inv_s, expected_inv_t = _sums_reference(f_s, f_t, 4)
    assert_close_scaled(sums, expected_sums, 2e-5, "sums")
    assert_close_scaled(inv_s, expected_inv_s, 2e-6, "inv_s")
    assert_close_scaled(inv_t, expected_inv_t, 2e-6, "inv_t")

    grad_sums = torch.tensor([0.5, 0.0, -2.0, 0.0, 1.5, 0.0], device=device)[::2]  # strided: read in place
    grad = kernels.lcc_backward(grad_sums, f_s, f_t, inv_s, inv_t, 4, block=block, splits=splits)
    s64 = f_s.detach().double().cpu().requires_grad_()
    expected = ref.lcc_terms(s64, f_t.double().cpu(), 4) * torch.tensor(ref.term_counts(batch, 4)).double()
    (expected_grad,) = torch.autograd.grad(expected, s64, grad_sums.double().cpu())
    assert grad.stride() == f_s.stride()
    assert_close_scaled(grad, expected_grad, 2e-5, "grad")


@pytest.mark.parametrize("device,backend", TRITON)
def test_triton_launcher_checks(device, backend):
    from kdfast.kernels import lcc as kernels

    f = feature((2, 3, 4, 4), device=device)
    with pytest.raises(ValueError, match="grid 3 must divide H and W"):
        kernels.lcc_forward(f, f, 3)
    with pytest.raises(ValueError, match="share B, H, W"):
        kernels.lcc_forward(f, feature((2, 3, 4, 2), device=device), 2)
    with pytest.raises(ValueError, match="block must be a power of two >= 16"):
        kernels.lcc_forward(f, f, 2, block=24)
    _, inv_s, inv_t = kernels.lcc_forward(f, f, 2)
    with pytest.raises(ValueError, match="grad_sums must be \\(3,\\)"):
        kernels.lcc_backward(torch.ones(2, device=device), f, f, inv_s, inv_t, 2)
    with pytest.raises(ValueError, match="inv_norm_s must be \\(8,\\)"):
        kernels.lcc_backward(torch.ones(3, device=device), f, f, inv_s[:4], inv_t, 2)


# --- fused ops: memory, opcheck, torch.compile


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made by an op while running fn (profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


# Not "cuda_emu": the CUDA backward holds a stripe of P of up to kStripeElements entries (csrc/cuda/lcc.cu),
# the whole N x N at this N; its bound is test_gpu_peak_memory's.
@pytest.mark.parametrize("device,backend", [p for p in device_backends("lcc") if p.id in ("cpu-cpu", "cpu-triton")])
def test_no_n_by_n_allocation(device, backend):
    """Forward + backward of the fused path allocate nothing near N x N (N = 128 descriptors of
    2 elements: the largest legitimate buffers, maps and N x D accumulators, are 1 KiB); the
    reference, as a control that the profiler sees the allocations, builds 64 KiB N x N matrices."""
    f_s = feature((8, 2, 4, 4), requires_grad=True, seed=24)
    f_t = feature((8, 3, 4, 4), seed=25)
    n = 8 * 4 * 4

    def run(name):
        return lambda: torch.autograd.grad(F.local_correlation_loss(f_s, f_t, backend=name), f_s)

    run(backend)()  # warm-up (compilation, caches)
    assert _largest_allocation(run("torch")) >= n * n * 4
    assert _largest_allocation(run(backend)) < n * n // 4


@pytest.mark.parametrize("device,backend", [p for p in device_backends("lcc") if p.values[0] == "cuda"])
def test_gpu_peak_memory(device, backend):
    """N = 16384: one float32 N x N matrix would be 1 GiB; the fused path stays far below."""
    f_s = feature((1024, 16, 8, 8), device="cuda", requires_grad=True, seed=26)
    f_t = feature((1024, 32, 8, 8), device="cuda", seed=27)
    n = 1024 * 16
    torch.autograd.grad(F.local_correlation_loss(f_s, f_t, backend=backend), f_s)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.autograd.grad(F.local_correlation_loss(f_s, f_t, backend=backend), f_s)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < n * n


# --- bad input


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(f_s=torch.randn(2, 3, 4)), ValueError, "f_s must be 4-D"),
        (dict(f_t=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "f_t must be float16"),
        (dict(f_s=torch.randn(0, 3, 4, 4), f_t=torch.randn(0, 3, 4, 4)), ValueError, "f_s is empty"),
        (dict(f_t=torch.randn(3, 5, 4, 4)), ValueError, "one batch size"),
        (dict(f_t=torch.randn(2, 5, 4, 4, device="meta")), ValueError, "one device"),
        (dict(grid=0), ValueError, "grid must be an int >= 1"),
        (dict(grid=2.0), ValueError, "grid must be an int >= 1"),
        (dict(grid=True), ValueError, "grid must be an int >= 1"),
        (dict(terms=()), ValueError, "non-empty subset"),
        (dict(terms=("intra", "global")), ValueError, "non-empty subset"),
        (dict(terms="intra"), TypeError, "terms must be a sequence"),
        (dict(weights=(1.0, 1.0)), ValueError, "weights must be 3 numbers"),
        (dict(weights=(1.0, float("nan"), 1.0)), ValueError, "weights \\(inter\\) must be a finite number"),
        (dict(weights=(1.0, "2", 1.0)), ValueError, "weights \\(inter\\) must be a finite number"),
        (dict(mask=torch.rand(2, 2, 4, 4)), ValueError, "mask must be \\(B, 1, h, w\\)"),
        (dict(mask=torch.rand(3, 1, 4, 4)), ValueError, "mask must be \\(B, 1, h, w\\) with B = 2"),
        (dict(mask=torch.rand(2, 4, 4)), ValueError, "mask must be \\(B, 1, h, w\\)"),
        (dict(mask=torch.ones(2, 1, 4, 4, dtype=torch.bool)), TypeError, "mask must be float16"),
        (dict(mask=[[1.0]]), TypeError, "mask must be a torch.Tensor"),
        (dict(mask=torch.rand(2, 1, 4, 4, device="meta")), ValueError, "one device"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
    ],
)
def test_bad_input(change, error, match):
    args: dict[str, Any] = dict(f_s=torch.randn(2, 3, 4, 4), f_t=torch.randn(2, 5, 4, 4))
    args.update(change)
    with pytest.raises(error, match=match):
        F.local_correlation_loss(**args)
