"""Attention transfer (AT): every fused backend against the float64 eager reference.

Values and gradients, every dtype and layout, multi-stage, edge cases and bad input
(opcheck, compile and gradcheck: tests/test_op_contracts.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, HAS_GPU, TOL, assert_close_scaled, device_backends

from kdfast import backends
from kdfast import functional as F
from kdfast import nn as knn
from kdfast.reference import at as ref

# (student (C, H, W), teacher (C, H, W)) per stage: odd sizes, Cs != Ct, a pooled stage.
STAGES = [((5, 7, 6), (8, 7, 6)), ((4, 4, 4), (2, 8, 8)), ((16, 3, 5), (16, 3, 5))]
# A student map larger than the teacher's is pooled too (tested in float32 and float64).
POOLED_STUDENT = [((3, 9, 7), (4, 3, 2))]


def make_features(shapes, batch, dtype, device, channels_last=False, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = []
    for shape in shapes:
        f = torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        if channels_last:
            f = f.contiguous(memory_format=torch.channels_last)
        feats.append(f.requires_grad_(requires_grad))
    return feats


def reference_loss_and_grads(f_s, f_t, p, mode):
    """float64 reference on the same (already rounded) inputs. A teacher map larger than the
    student's is pooled in its own dtype first, as every backend does (pooling is a torch op)."""
    s64 = [f.detach().double().requires_grad_() for f in f_s]
    t64 = [ref.align_spatial(s.detach(), t.detach())[1].double() for s, t in zip(f_s, f_t)]
    loss = ref.at_stage_losses(s64, t64, p, mode).sum()
    return loss, torch.autograd.grad(loss, s64)


@pytest.mark.parametrize("device,backend", device_backends("at"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_loss_matches_reference(device, backend, dtype, channels_last, mode):
    f_s = make_features([s for s, _ in STAGES], 3, dtype, device, channels_last, requires_grad=True, seed=1)
    f_t = make_features([t for _, t in STAGES], 3, dtype, device, channels_last, seed=2)
    loss = F.at_loss(f_s, f_t, mode=mode, backend=backend)
    grads = torch.autograd.grad(loss, f_s)
    expected_loss, expected_grads = reference_loss_and_grads(f_s, f_t, 2, mode)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == ref.compute_dtype(dtype)
    assert_close_scaled(loss, expected_loss, loss_tol, "loss")
    for i, (g, e, f) in enumerate(zip(grads, expected_grads, f_s)):
        assert g.dtype == dtype and g.shape == f.shape
        assert_close_scaled(g, e, grad_tol, f"grad[{i}]")


@pytest.mark.parametrize("device,backend", device_backends("at"))
@pytest.mark.parametrize("p,mode", [(1, "code"), (3, "code"), (4, "code"), (1, "paper"), (2.5, "paper"), (3, "paper")])
def test_at_loss_powers(device, backend, p, mode):
    stages = STAGES + POOLED_STUDENT
    f_s = make_features([s for s, _ in stages], 2, torch.float32, device, requires_grad=True, seed=3)
    f_t = make_features([t for _, t in stages], 2, torch.float32, device, seed=4)
    loss = F.at_loss(f_s, f_t, p=p, mode=mode, backend=backend)
    grads = torch.autograd.grad(loss, f_s)
    expected_loss, expected_grads = reference_loss_and_grads(f_s, f_t, p, mode)
    assert_close_scaled(loss, expected_loss, 2e-5, "loss")
    for g, e in zip(grads, expected_grads):
        assert_close_scaled(g, e, 1e-4, "grad")


@pytest.mark.parametrize("device,backend", device_backends("at"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,mode", [(2, "mean"), (3, "mean"), (2, "sum"), (1.5, "sum")])
@pytest.mark.parametrize("normalize", [True, False])
def test_attention_map_matches_reference(device, backend, dtype, p, mode, normalize):
    (feat,) = make_features([(6, 5, 3)], 3, dtype, device, channels_last=mode == "sum", requires_grad=True, seed=5)
    out = F.attention_map(feat, p=p, mode=mode, normalize=normalize, backend=backend)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (grad,) = torch.autograd.grad((out.double() * weight.to(device)).sum(), feat)
    f64 = feat.detach().double().requires_grad_()
    expected = ref.attention_map(f64, p, mode, normalize)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), f64)
    assert out.dtype == dtype and out.shape == (3, 15)
    out_tol = 1e-10 if dtype == torch.float64 else {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_close_scaled(out, expected, out_tol, "map")
    assert_close_scaled(grad, expected_grad, TOL[dtype][1], "grad")


@pytest.mark.parametrize("device,backend", device_backends("at"))
def test_multi_stage_is_sum_of_stages(device, backend):
    f_s = make_features([s for s, _ in STAGES], 2, torch.float32, device, seed=7)
    f_t = make_features([t for _, t in STAGES], 2, torch.float32, device, seed=8)
    per_stage = F.at_loss(f_s, f_t, reduction="none", backend=backend)
    singles = torch.stack([F.at_loss(s, t, backend=backend) for s, t in zip(f_s, f_t)])
    assert per_stage.shape == (3,)
    torch.testing.assert_close(per_stage, singles)
    torch.testing.assert_close(F.at_loss(f_s, f_t, backend=backend), per_stage.sum())
    assert knn.ATLoss(backend=backend)(f_s, f_t).item() == pytest.approx(per_stage.sum().item(), rel=1e-6)


@pytest.mark.parametrize("device,backend", device_backends("at"))
def test_upstream_gradient_and_teacher_gets_none(device, backend):
    f_s = make_features([s for s, _ in STAGES], 2, torch.float32, device, requires_grad=True, seed=9)
    f_t = make_features([t for _, t in STAGES], 2, torch.float32, device, requires_grad=True, seed=10)
    weights = torch.tensor([2.0, -0.5, 3.0], device=device)
    (F.at_loss(f_s, f_t, reduction="none", backend=backend) * weights).sum().backward()
    for s, t, w in zip(f_s, f_t, weights):
        ref_s = s.detach().double().requires_grad_()
        ref.at_stage_losses([ref_s], [t.detach().double()]).sum().backward()
        assert_close_scaled(s.grad, w.double().cpu() * ref_s.grad, 1e-4, "weighted grad")
    assert all(t.grad is None for t in f_t)


@pytest.mark.parametrize("device,backend", device_backends("at"))
def test_mixed_dtypes_and_odd_strides(device, backend):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(2, 4, 6, 5, generator=gen).to(device)
    f_s = base.transpose(2, 3).requires_grad_()  # h and w do not flatten: copied to contiguous
    f_t = torch.randn(2, 3, 5, 6, generator=gen).to(device, torch.bfloat16)
    loss = F.at_loss(f_s, f_t, backend=backend)
    (grad,) = torch.autograd.grad(loss, f_s)
    expected_loss, (expected_grad,) = reference_loss_and_grads([f_s], [f_t], 2, "code")
    assert_close_scaled(loss, expected_loss, 2e-5, "loss")
    assert_close_scaled(grad, expected_grad, 1e-4, "grad")


@pytest.mark.parametrize("device,backend", device_backends("at") + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_zero_maps_are_finite(device, backend, which, mode):
    f_s = torch.randn(2, 3, 4, 4, device=device)
    f_t = torch.randn(2, 5, 4, 4, device=device)
    if which in ("student", "both"):
        f_s = torch.zeros_like(f_s)
    if which in ("teacher", "both"):
        f_t = torch.zeros_like(f_t)
    f_s.requires_grad_()
    loss = F.at_loss(f_s, f_t, mode=mode, backend=backend)
    (grad,) = torch.autograd.grad(loss, f_s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    expected_loss, (expected_grad,) = reference_loss_and_grads([f_s], [f_t], 2, mode)
    assert_close_scaled(loss, expected_loss, 2e-5, "loss")
    assert_close_scaled(grad, expected_grad, 1e-4, "grad", floor=1e-2)  # exactly 0 for a zero teacher
    assert torch.isfinite(F.attention_map(torch.zeros(2, 3, 4, 4, device=device), backend=backend)).all()


@pytest.mark.parametrize("device,backend", device_backends("at") + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_and_inf_give_nan_loss(device, backend, bad):
    """Documented: NaN/Inf anywhere in a feature map gives a NaN loss on every backend."""
    f_s = torch.randn(2, 3, 4, 4, device=device)
    f_t = torch.randn(2, 3, 4, 4, device=device)
    f_s[1, 2, 3, 1] = bad
    assert torch.isnan(F.at_loss(f_s, f_t, backend=backend))
    assert torch.isnan(F.at_loss(f_t, f_s, backend=backend))


@pytest.mark.parametrize("device,backend", device_backends("at"))
def test_single_pixel_and_batch_one(device, backend):
    f_s = torch.randn(1, 3, 1, 1, device=device, requires_grad=True)
    f_t = torch.randn(1, 7, 2, 3, device=device)
    loss = F.at_loss(f_s, f_t, backend=backend)
    expected_loss, (expected_grad,) = reference_loss_and_grads([f_s], [f_t], 2, "code")
    # Exactly 0 (a one-pixel map normalises to 1): compare against the loss's natural scale.
    assert_close_scaled(loss, expected_loss, 2e-5, "loss", floor=1e-2)
    assert_close_scaled(torch.autograd.grad(loss, f_s)[0], expected_grad, 1e-4, "grad", floor=1e-2)


# --- fused ops: gradcheck, opcheck, torch.compile


# --- bad input


def _pair(**kwargs):
    base = dict(f_s=torch.randn(2, 3, 4, 4), f_t=torch.randn(2, 5, 4, 4))
    base.update(kwargs)
    return base


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(f_s=torch.randn(2, 3, 4)), ValueError, "f_s\\[0\\] must be 4-D"),
        (dict(f_t=torch.randn(3, 5, 4, 4)), ValueError, "batch sizes differ"),
        (dict(f_s=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "f_s\\[0\\] must be float16"),
        (dict(f_s=torch.randn(0, 3, 4, 4), f_t=torch.randn(0, 3, 4, 4)), ValueError, "f_s\\[0\\] is empty"),
        (dict(f_s=torch.randn(2, 0, 4, 4)), ValueError, "f_s\\[0\\] is empty"),
        (dict(f_t=torch.randn(2, 5, 4, 4, device="meta")), ValueError, "one device"),
        (dict(f_s=[torch.randn(2, 3, 4, 4)] * 2), ValueError, "as many stages"),
        (dict(f_s=[]), TypeError, "non-empty list"),
        (dict(f_s="features"), TypeError, "f_s must be a tensor"),
        (dict(p=0.5), ValueError, "p must be a finite number >= 1"),
        (dict(p=float("nan")), ValueError, "p must be a finite number >= 1"),
        (dict(p=2.5), ValueError, "needs an integer p"),
        (dict(mode="fast"), ValueError, "mode must be one of"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
        (
            dict(f_s=[torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, dtype=torch.float64)], f_t=[torch.randn(2, 3, 4, 4)] * 2),
            ValueError,
            "one dtype",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        F.at_loss(**_pair(**kwargs))


def test_attention_map_bad_input():
    with pytest.raises(ValueError, match="feat must be 4-D"):
        F.attention_map(torch.randn(3, 4))
    with pytest.raises(TypeError, match="feat must be float16"):
        F.attention_map(torch.ones(1, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="mode must be one of"):
        F.attention_map(torch.randn(1, 2, 3, 3), mode="max")


def _cxx_bad_calls():
    """(op, args, match): calls of the C++ AT ops that their checks (csrc/at.h) refuse. A meta tensor
    stands for a tensor on another device: the tests below call the CPU kernels directly with it."""
    f = torch.randn(2, 3, 4, 4)
    m = torch.rand(2, 16)
    meta_m = torch.rand(2, 16, device="meta")
    return [
        ("at_maps", ([], 2.0, "mean"), "at least one tensor"),
        ("at_maps", ([torch.randn(2, 3, 4)], 2.0, "mean"), "4-D"),
        ("at_maps", ([f, f.double()], 2.0, "mean"), "one dtype"),
        ("at_maps", ([f, f.to("meta")], 2.0, "mean"), "one device"),
        ("at_maps", ([f, torch.randn(2, 0, 4, 4)], 2.0, "mean"), "empty tensor"),
        ("at_maps", ([f], 2.0, "max"), "mode must be 'mean' or 'sum'"),
        ("at_maps", ([f], 0.5, "mean"), "p must be a finite number >= 1"),
        ("at_maps", ([f], 2.5, "mean"), "needs an integer p"),
        ("at_maps_backward", ([m, m], [f], 2.0, "mean"), "2 grad_maps for 1 feats"),
        ("at_maps_backward", ([torch.rand(2, 15)], [f], 2.0, "mean"), "must have shape \\(B, H\\*W\\)"),
        ("at_maps_backward", ([m.double()], [f], 2.0, "mean"), "must be Float"),
        ("at_maps_backward", ([meta_m], [f], 2.0, "mean"), "must be on the device of feats\\[0\\]"),
        ("at_map_loss", ([], [], "mse"), "equally many"),
        ("at_map_loss", ([m], [m], "l1"), "loss must be 'mse' or 'l2'"),
        ("at_map_loss", ([m.half()], [m.half()], "mse"), "float32 or float64"),
        ("at_map_loss", ([m], [torch.rand(2, 15)], "mse"), "must both be \\(B, HW\\)"),
        ("at_map_loss", ([m], [m.double()], "mse"), "share one dtype"),
        ("at_map_loss", ([m], [meta_m], "mse"), "on one device"),
    ]


@pytest.mark.parametrize("op,args,match", [pytest.param(*c, id=f"{c[0]}-{i}") for i, c in enumerate(_cxx_bad_calls())])
def test_cpu_and_cuda_kernels_refuse_alike(op, args, match):
    """csrc/cpu/at.cpp and csrc/cuda/at.cu (run on the CPU as cuda_emu) check their arguments with the
    same functions (csrc/at.h): both refuse each input with the same message, other devices included
    (the CUDA kernels used to be the only ones to check them)."""
    from kdfast.ops import namespace

    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)  # the CPU kernels, whatever the devices
    messages = []
    for backend in ("cpu", "cuda_emu"):
        reason = backends.unavailable_reason("at", backend, torch.device("cpu"))
        if reason:
            pytest.skip(reason)
        with pytest.raises(RuntimeError, match=match) as info:
            getattr(namespace(backend), op).default.redispatch(keys, *args)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.mark.skipif(HAS_GPU, reason="checks the error for a GPU backend on a machine without one")
def test_unavailable_backend_names_what_is_missing():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable.*CUDA tensors"):
        F.at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), backend="cuda")


def test_backend_choice_order(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    assert backends.resolve("at", None, cpu) == "torch"
    assert backends.resolve("at", "cpu", cpu) == "cpu"  # the argument beats the environment
    monkeypatch.delenv("KDFAST_BACKEND")
    assert backends.resolve("at", None, cpu) == "cpu"
    assert backends.resolve("at", "auto", cpu) == "cpu"
    assert backends.resolve("at", "auto", torch.device("meta")) == "torch"
    monkeypatch.setenv("KDFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        F.at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))


class _LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records instead of running."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_alignment_is_per_stage(monkeypatch, channels_last):
    """One launch for all stages, each with its own alignment: the 7x7 (contiguous) or 3-channel
    (channels_last) stage does not take the vector loads of the 56x56 stage away (meta tensors)."""
    from kdfast.kernels import at as kernels

    recorder = _LaunchRecorder()
    monkeypatch.setattr(kernels, "_at_maps_kernel", recorder)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    feats = [
        torch.empty(2, c, s, s, device="meta").contiguous(memory_format=memory_format) for c, s in ((64, 56), (48, 14), (3, 7))
    ]
    kernels.at_maps(feats, 2.0, "mean")
    ((_, args, kwargs),) = recorder.launches
    assert kwargs["ALIGNS"] == ((16, 16, 1) if channels_last else (16, 4, 1))  # stages by decreasing C
    assert all(isinstance(a, tuple) for a in args)  # tensors and integers: kernel arguments, no host table


def test_triton_stage_chunks(monkeypatch):
    """More stages than one launch takes: consecutive launches of at most MAX_STAGES."""
    from kdfast.kernels import at as kernels
    from kdfast.kernels._common import MAX_STAGES

    recorder = _LaunchRecorder()
    monkeypatch.setattr(kernels, "_at_maps_kernel", recorder)
    feats = [torch.empty(2, 4, 8, 8, device="meta") for _ in range(MAX_STAGES + 3)]
    kernels.at_maps(feats, 2.0, "mean")
    assert [len(args[0]) for _, args, _ in recorder.launches] == [MAX_STAGES, 3]


def test_triton_many_stages_match_reference():
    """Stages over several launches (maps, their backward and the loss) give the reference's values."""
    from kdfast.kernels._common import MAX_STAGES

    shapes = [((2 + i % 3, 3 + i % 4, 4), (3, 3 + i % 4, 4)) for i in range(MAX_STAGES + 2)]
    f_s = make_features([s for s, _ in shapes], 2, torch.float64, "cpu", requires_grad=True, seed=3)
    f_t = make_features([t for _, t in shapes], 2, torch.float64, "cpu", seed=4)
    loss = F.at_loss(f_s, f_t, backend="triton")
    grads = torch.autograd.grad(loss, f_s)
    e_loss, e_grads = reference_loss_and_grads(f_s, f_t, 2, "code")
    torch.testing.assert_close(loss, e_loss, rtol=1e-10, atol=0)
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-16)
