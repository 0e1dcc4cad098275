"""Relational KD loss (RKD): every fused backend against the float64 eager reference.

Values and gradients of both terms (non-unit upstream gradients, both reductions, weights),
every dtype, 2-D / contiguous / channels_last inputs, Ds != Dt, odd B, B = 1 (every dtype) and 2,
duplicated embeddings (zero distances), several tiles and splits, exact squared distances, no B x B x D allocation,
mdistiller's formula and bad input (opcheck, compile, gradcheck: test_op_contracts.py).
Shapes stay tiny: the Triton kernels run in the interpreter here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from _compare import LargestTensor, check_against_reference
from conftest import DTYPES, TOL, assert_close_scaled, backends_with_torch, device_backends, feature, triton_backends
from test_sp import force_splits

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.kernels import rkd as rkd_kernels
from kdfast.reference import rkd as ref

TRITON = triton_backends("rkd")
WITH_TORCH = backends_with_torch("rkd")
# (student shape, teacher shape) per layout: odd B, Ds != Dt.
SHAPES = {"2d": ((5, 9), (5, 4)), "nchw": ((5, 3, 2, 2), (5, 2, 1, 3)), "nhwc": ((5, 3, 2, 2), (5, 2, 1, 3))}
UPSTREAM = (0.7, -1.3)  # d out / d [weighted distance term, weighted angle term] for reduction "none"


def check(backend, e_s, e_t, loss_tol, grad_tol, reduction="none", floor=1e-30, **weights):
    """The fused loss and gradient against the float64 reference on the same (rounded) inputs."""
    out, (grad,) = check_against_reference(
        lambda s, t: F.rkd_loss(s, t, reduction=reduction, backend=backend, **weights),
        lambda s, t: ref.rkd_loss(s, t, reduction=reduction, **weights),
        (e_s, e_t),
        loss_tol,
        grad_tol,
        upstream=UPSTREAM if reduction == "none" else 1.0,
        floor=floor,
    )
    return out, grad


@pytest.mark.parametrize("device,backend", device_backends("rkd"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", SHAPES)
def test_matches_reference(device, backend, dtype, layout):
    s_shape, t_shape = SHAPES[layout]
    e_s = feature(s_shape, dtype, device, layout == "nhwc", requires_grad=True, seed=1)
    e_t = feature(t_shape, dtype, device, layout == "nhwc", seed=2)
    _, grad = check(backend, e_s, e_t, *TOL[dtype])
    if layout == "nhwc":  # read in place: the gradient comes back in the student's layout
        assert grad.is_contiguous(memory_format=torch.channels_last)


WEIGHTS = {
    "default": dict(),
    "distance": dict(distance_weight=1.0, angle_weight=0.0),
    "angle": dict(distance_weight=0.0, angle_weight=2.0),
}


@pytest.mark.parametrize("device,backend", device_backends("rkd"))
@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=list(WEIGHTS))
def test_reduction_sum_and_weights(device, backend, weights):
    e_s = feature((6, 5), device=device, requires_grad=True, seed=3)
    e_t = feature((6, 7), device=device, seed=4)
    out, _ = check(backend, e_s, e_t, 2e-5, 2e-5, reduction="sum", **weights)
    terms = F.rkd_loss(e_s, e_t, reduction="none", backend=backend, **weights)
    torch.testing.assert_close(out, terms.sum())


@pytest.mark.parametrize("device,backend", device_backends("rkd"))
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_small_batches(device, backend, batch):
    """B = 1: no positive distance and no angle, loss and gradient 0 (mdistiller: NaN); B = 2:
    every cosine is 0 or 1; B = 3: finite."""
    e_s = feature((batch, 4), device=device, requires_grad=True, seed=5)
    out, grad = check(backend, e_s, feature((batch, 3), device=device, seed=6), 2e-5, 2e-5, floor=1e-2)
    if batch == 1:
        assert not out.any() and not grad.any()


@pytest.mark.parametrize("device,backend", device_backends("rkd"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_of_one(device, backend, dtype):
    """B = 1 in every dtype (a last batch of 1; Triton turns an int argument equal to 1 into a
    constexpr): terms and gradient exactly 0."""
    e_s = feature((1, 2, 2, 1), dtype, device, requires_grad=True, seed=5)
    out, grad = check(backend, e_s, feature((1, 3), dtype, device, seed=6), *TOL[dtype], floor=1e-2)
    assert not out.any() and not grad.any()


@pytest.mark.parametrize("device,backend", device_backends("rkd"))
@pytest.mark.parametrize("which", ["both", "student"])
def test_duplicated_embeddings(device, backend, which):
    """Duplicated rows have distance 1e-6 (clamped: no gradient) and n_ij = 0. Duplicated in both
    networks (one image twice), every term stays of the usual size; in the student alone, the
    angle gradient of F.normalize's clamp is 1/eps times larger, as the reference's. (Not the
    float32 "torch" backend: mdistiller's ``|e_i|^2 + |e_j|^2 - 2 <e_i, e_j>`` leaves rounding
    noise of |e|^2 instead of 0 there, 1e-3 instead of 1e-6 after the square root.)"""
    e_s = feature((7, 5), device=device, seed=7)
    e_t = feature((7, 6), device=device, seed=8)
    e_s[4] = e_s[1]
    e_s[6] = e_s[1]  # three equal rows: triplets whose both differences are 0
    if which == "both":
        e_t[4] = e_t[1]
        e_t[6] = e_t[1]
    _, grad = check(backend, e_s.requires_grad_(), e_t, 2e-5, 2e-5)
    assert (grad.abs().max() > 1e6) == (which == "student")


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("layout", ["2d", "nhwc"])
def test_several_tiles_and_splits(device, backend, layout, monkeypatch):
    """B and D span several tiles (BLOCK 16 here: 2 x 2 tiles of (j, k); BLOCK_D 8), the squared
    distances are split over D (4 splits of 8 columns, the student's last ones empty) and the
    triplet backward over the anchors (7 splits of at most 3)."""
    monkeypatch.setattr(rkd_kernels, "BLOCK", 16)
    force_splits(monkeypatch)
    shape = (19, 21) if layout == "2d" else (19, 5, 3, 1)
    e_s = feature(shape, device=device, channels_last=layout == "nhwc", requires_grad=True, seed=9)
    e_t = feature((19, 3, 3, 3), device=device, seed=10)
    check(backend, e_s, e_t, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_squared_distances_are_exact(device, backend, split, monkeypatch):
    """R_ab == R_ba bitwise, R_aa == 0 and R_ab == 0 for x_a == x_b, R_ac == R_bc: the kernels
    rely on it (a Gram matrix computed by tl.dot is not, e.g. in the interpreter); also when D
    is split (5 partial sums added in order)."""
    if split:
        force_splits(monkeypatch)
    x = feature((9, 37), device=device, seed=11)
    x[5] = x[2]
    _, sq_dist, _ = rkd_kernels.rkd_forward(x, x.T.contiguous().T)  # the teacher through other strides
    r = sq_dist[0]
    assert torch.equal(r, r.T) and torch.equal(r, sq_dist[1]) and not r.diagonal().any()
    assert r[2, 5] == 0 and torch.equal(r[2], r[5])
    expected = torch.cdist(x.double(), x.double()) ** 2
    assert_close_scaled(r, expected, 1e-6, "sq_dist")


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_teacher_dtype_and_no_teacher_gradient(device, backend):
    e_s = feature((4, 6), device=device, requires_grad=True, seed=12)
    e_t = feature((4, 2, 1, 1), torch.bfloat16, device, requires_grad=True, seed=13)
    check(backend, e_s, e_t, 2e-5, 2e-5)
    F.rkd_loss(e_s, e_t, backend=backend).backward()
    assert e_t.grad is None


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_gives_nan_terms(device, backend):
    e_s = feature((4, 3), device=device, seed=14)
    e_s[2, 1] = float("nan")
    assert torch.isnan(F.rkd_loss(e_s, feature((4, 3), device=device, seed=15), reduction="none", backend=backend)).all()


def test_reference_is_mdistillers_formula():
    """The reference equals a literal transcription of mdistiller's rkd_loss (float64, B >= 2)."""
    e_s = feature((8, 6), torch.float64, requires_grad=True, seed=16)
    e_t = feature((8, 5), torch.float64, seed=17)

    def pdist(e):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=1e-12).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def normalized(e):
        d = pdist(e)
        return d / d[d > 0].mean()

    def angle(e):
        norm = TF.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(norm, norm.transpose(1, 2)).view(-1)

    expected = 25 * TF.smooth_l1_loss(normalized(e_s), normalized(e_t)) + 50 * TF.smooth_l1_loss(angle(e_s), angle(e_t))
    actual = ref.rkd_loss(e_s, e_t)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(actual, e_s)[0], torch.autograd.grad(expected, e_s)[0], rtol=1e-10, atol=1e-14)


def test_module_matches_functional():
    e_s, e_t = feature((4, 5), seed=18), feature((4, 3), seed=19)
    module = knn.RKDLoss(distance_weight=2.0, angle_weight=3.0, reduction="none", backend="torch")
    torch.testing.assert_close(module(e_s, e_t), F.rkd_loss(e_s, e_t, 2.0, 3.0, "none", backend="torch"))
    assert "angle_weight=3.0" in repr(module)


# --- fused ops: memory, gradcheck, opcheck, torch.compile


@pytest.mark.parametrize("device,backend", TRITON)
def test_no_b_by_b_by_d_allocation(device, backend):
    """The Triton launchers allocate B x B matrices at most (B x D is larger here), never the
    B x B x D difference tensor the reference builds."""
    batch, depth = 8, 64
    e_s = feature((batch, depth), device=device, seed=20)
    e_t = feature((batch, depth), device=device, seed=21)
    with LargestTensor() as mode:
        _, sq_dist, stats = rkd_kernels.rkd_forward(e_s, e_t)
        rkd_kernels.rkd_backward(torch.ones(2, device=device), e_s, sq_dist, stats)
    assert mode.largest == batch * depth * 4
    with LargestTensor() as mode:
        ref.rkd_loss(e_s, e_t)
    assert mode.largest == batch * batch * depth * 4


@pytest.mark.parametrize("device,backend", TRITON)
def test_launcher_checks(device, backend):
    e = feature((3, 4), device=device)
    with pytest.raises(ValueError, match="one batch size"):
        rkd_kernels.rkd_forward(e, feature((2, 4), device=device))
    _, sq_dist, stats = rkd_kernels.rkd_forward(e, e)
    with pytest.raises(ValueError, match="sq_dist must be"):
        rkd_kernels.rkd_backward(torch.ones(2, device=device), e, sq_dist[0], stats)
    with pytest.raises(ValueError, match="grad_terms must be"):
        rkd_kernels.rkd_backward(torch.ones((), device=device), e, sq_dist, stats)


# --- bad input


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(e_s=torch.randn(4)), ValueError, "e_s must have at least 2 dims"),
        (dict(e_t=torch.randn(3, 5)), ValueError, "one batch size"),
        (dict(e_t=torch.ones(4, 3, dtype=torch.int64)), TypeError, "e_t must be float16"),
        (dict(e_s=torch.randn(4, 0)), ValueError, "e_s is empty"),
        (dict(e_t=torch.randn(4, 5, device="meta")), ValueError, "one device"),
        (dict(distance_weight=float("inf")), ValueError, "distance_weight must be a finite number"),
        (dict(angle_weight="50"), ValueError, "angle_weight must be a finite number"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
    ],
)
def test_bad_input(change, error, match):
    args: dict[str, Any] = dict(e_s=torch.randn(4, 3), e_t=torch.randn(4, 5))
    args.update(change)
    with pytest.raises(error, match=match):
        F.rkd_loss(**args)
