"""Logit losses KD and DKD: every fused backend against the float64 eager references.

Both ops share one contract (per-row losses, gradient computed in the forward for reduced losses
and in the backward for reduction="none"), so every test runs on both through LOSSES.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as TF
from _compare import check_against_reference
from conftest import assert_close_scaled, device_backends

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.ops import namespace
from kdfast.reference import dkd as dkd_reference
from kdfast.reference import kd as kd_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Relative tolerance (scaled by the reference's largest magnitude) of the loss and the gradient.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 1.6e-2)}


def _kd(z_s, z_t, target, backend=None, **kwargs):
    return F.kd_loss(z_s, z_t, backend=backend, **kwargs)


def _dkd(z_s, z_t, target, backend=None, **kwargs):
    return F.dkd_loss(z_s, z_t, target, backend=backend, **kwargs)


def _kd_ref(z_s, z_t, target, **kwargs):
    return kd_reference.kd_loss(z_s, z_t, **kwargs)


def _dkd_ref(z_s, z_t, target, **kwargs):
    return dkd_reference.dkd_loss(z_s, z_t, target, **kwargs)


LOSSES = {"kd": (_kd, _kd_ref), "dkd": (_dkd, _dkd_ref)}


def logits(batch, classes, dtype=torch.float32, device="cpu", scale=3.0, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    return z.requires_grad_(requires_grad)


def student_teacher(batch, classes, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    """A student's logits (seed `seed`, requiring grad) and a teacher's (seed `seed` + 1)."""
    return logits(batch, classes, dtype, device, scale, seed, requires_grad=True), logits(
        batch, classes, dtype, device, scale, seed + 1
    )


def targets(batch, classes, device="cpu", seed=0):
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)


def check(name, backend, z_s, z_t, target, loss_tol, grad_tol, weights=None, **kwargs):
    """The loss `name` (its rows weighted by `weights` in the backward) and the gradient of z_s
    against the float64 reference on the same (rounded) inputs."""
    fused, reference = LOSSES[name]
    check_against_reference(
        lambda s, t, y: fused(s, t, y, backend, **kwargs),
        lambda s, t, y: reference(s, t, y, **kwargs),
        (z_s, z_t, target),
        loss_tol,
        grad_tol,
        upstream=1.0 if weights is None else weights,
    )


@pytest.mark.parametrize("device,backend", device_backends("kd"))
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_reference(device, backend, name, dtype, reduction):
    z_s, z_t = student_teacher(7, 100, dtype, device, seed=1)
    weights = torch.randn(7, generator=torch.Generator().manual_seed(3)) if reduction == "none" else None
    check(name, backend, z_s, z_t, targets(7, 100, device), *TOL[dtype], weights=weights, reduction=reduction)


@pytest.mark.parametrize("device,backend", device_backends("kd"))
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "batch,classes,temperature,scale",
    [(1, 2, 4.0, 3.0), (5, 3, 0.5, 3.0), (3, 1000, 20.0, 3.0), (4, 100, 1.0, 1e4), (3, 64, 0.5, 1e4), (2, 21843, 4.0, 5.0)],
)
def test_shapes_temperatures_and_large_logits(device, backend, name, batch, classes, temperature, scale):
    z_s, z_t = student_teacher(batch, classes, device=device, scale=scale, seed=4)
    tol = 1e-5 if scale < 100 else 1e-4  # float32 logits of 1e4 carry ~1e-3 absolute rounding
    check(name, backend, z_s, z_t, targets(batch, classes, device), tol, tol, temperature=temperature)


@pytest.mark.parametrize("device,backend", device_backends("kd"))
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float64], ids=str)
def test_teacher_of_another_dtype(device, backend, name, teacher_dtype):
    z_s = logits(5, 50, torch.float32, device, seed=6, requires_grad=True)
    z_t = logits(5, 50, teacher_dtype, device, seed=7, requires_grad=True)
    check(name, backend, z_s, z_t, targets(5, 50, device), 1e-5, 1e-5)
    fused, _ = LOSSES[name]
    fused(z_s, z_t, targets(5, 50, device), backend).backward()
    assert z_t.grad is None


@pytest.mark.parametrize("device,backend", device_backends("kd"))
@pytest.mark.parametrize("name", LOSSES)
def test_upstream_gradient_scales(device, backend, name):
    z_s, z_t = student_teacher(6, 30, device=device, seed=8)
    fused, _ = LOSSES[name]
    (2 * fused(z_s, z_t, targets(6, 30, device), backend)).backward()
    double = z_s.grad.clone()
    z_s.grad = None
    fused(z_s, z_t, targets(6, 30, device), backend).backward()
    torch.testing.assert_close(double, 2 * z_s.grad)


@pytest.mark.parametrize("device,backend", device_backends("kd"))
@pytest.mark.parametrize("name", LOSSES)
def test_second_backward_is_refused(device, backend, name):
    """The reduced loss scales its forward-computed gradient in place: a second backward through
    the same graph must fail loudly, never return a twice-scaled gradient."""
    z_s = logits(4, 10, device=device, seed=10, requires_grad=True)
    loss = LOSSES[name][0](z_s, logits(4, 10, device=device, seed=11), targets(4, 10, device), backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("device,backend", device_backends("kd"))
@pytest.mark.parametrize("name", LOSSES)
def test_no_grad_and_eval(device, backend, name):
    z_s, z_t = student_teacher(4, 10, device=device, seed=12)
    fused, reference = LOSSES[name]
    with torch.no_grad():
        loss = fused(z_s, z_t, targets(4, 10, device), backend)
    expected = reference(z_s.detach().double().cpu(), z_t.double().cpu(), targets(4, 10))
    assert_close_scaled(loss, expected, 1e-5)


def hinton_kd_rows(z_s, z_t, temperature=4.0):
    """Per-row KD loss, a literal transcription of Hinton's formula (as mdistiller's kd_loss)."""
    log_ps = TF.log_softmax(z_s / temperature, 1)
    return TF.kl_div(log_ps, TF.softmax(z_t / temperature, 1), reduction="none").sum(1) * temperature**2


def mdistiller_dkd_rows(z_s, z_t, y, alpha=1.0, beta=8.0, temperature=4.0):
    """Per-row DKD loss, a literal transcription of mdistiller's dkd_loss (which sums the rows
    and divides by B)."""
    gt = torch.zeros_like(z_s).scatter_(1, y.unsqueeze(1), 1).bool()
    other = ~gt

    def split(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)

    p_s, p_t = split(TF.softmax(z_s / temperature, 1)), split(TF.softmax(z_t / temperature, 1))
    tckd = TF.kl_div(torch.log(p_s), p_t, reduction="none").sum(1) * temperature**2
    q_t = TF.softmax(z_t / temperature - 1000.0 * gt, 1)
    log_q_s = TF.log_softmax(z_s / temperature - 1000.0 * gt, 1)
    nckd = TF.kl_div(log_q_s, q_t, reduction="none").sum(1) * temperature**2
    return alpha * tckd + beta * nckd


def test_dkd_reference_is_mdistillers_formula():
    """The reference equals a literal transcription of mdistiller's dkd_loss (float64)."""
    z_s, z_t = student_teacher(16, 100, torch.float64, seed=14)
    y = targets(16, 100, seed=16)
    expected = mdistiller_dkd_rows(z_s, z_t, y).sum() / 16
    actual = dkd_reference.dkd_loss(z_s, z_t, y)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(actual, z_s)[0], torch.autograd.grad(expected, z_s)[0], rtol=1e-10, atol=1e-14)


def test_kd_reference_is_hintons_formula():
    z_s = logits(8, 20, torch.float64, seed=17)
    z_t = logits(8, 20, torch.float64, seed=18)
    expected = hinton_kd_rows(z_s, z_t).sum() / 8
    torch.testing.assert_close(kd_reference.kd_loss(z_s, z_t), expected, rtol=1e-12, atol=0)


# --- -inf logits (masked classes)

MASKED = float("-inf")
STAND_IN = -1e4  # finite stand-in of a masked logit: exp(-1e4 / T) is exactly 0 at T = 4 (float32, float64)
LITERAL = {"kd": lambda z_s, z_t, y: hinton_kd_rows(z_s, z_t), "dkd": mdistiller_dkd_rows}


def masked_logits(classes, dtype, device):
    """(z_s, z_t, target) of 5 rows with masked (-inf) classes, class `classes - 1` the target:
    0: one teacher class masked; 1: the teacher's target and two more classes masked; 2: the
    first half of the classes masked in both; 3: every teacher class but the target masked (a
    one-hot teacher); 4: the first 4096 classes (a whole Triton block, if K > 4096; else all but
    one non-target class) masked in both. Every student row keeps a finite non-target logit, and
    finite logits wherever the teacher's are finite (else the KL is +inf)."""
    z_s = logits(5, classes, torch.float64, seed=40)
    z_t = logits(5, classes, torch.float64, seed=41)
    y = torch.full((5,), classes - 1)
    z_t[0, 1] = MASKED
    z_t[1, [0, 2, classes - 1]] = MASKED
    z_s[2, : classes // 2] = z_t[2, : classes // 2] = MASKED
    z_t[3, :-1] = MASKED
    z_s[4, : min(4096, classes - 2)] = z_t[4, : min(4096, classes - 2)] = MASKED
    return z_s.to(dtype).to(device), z_t.to(dtype).to(device), y.to(device)


@pytest.mark.parametrize("device,backend", device_backends("kd") + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("classes", [12, 5000])
def test_masked_classes(device, backend, name, dtype, classes):
    """A -inf logit is a class of probability 0: its terms add 0 (kdfast/reference/kd.py). Every
    backend, the reference included, must equal the literal formulas applied to a finite stand-in
    (-1e4, whose probability is exactly 0 too), in the loss and in the gradient."""
    z_s, z_t, y = masked_logits(classes, dtype, device)
    z_s.requires_grad_()
    fused, _ = LOSSES[name]
    loss = fused(z_s, z_t, y, backend, reduction="sum")
    (grad,) = torch.autograd.grad(loss, z_s)
    rows = fused(z_s, z_t, y, backend, reduction="none")
    (rows_grad,) = torch.autograd.grad(rows, z_s, torch.linspace(0.5, 2.0, 5, device=device, dtype=rows.dtype))
    stand_in = [z.detach().double().cpu().nan_to_num(neginf=STAND_IN) for z in (z_s, z_t)]
    s64 = stand_in[0].requires_grad_()
    expected = LITERAL[name](s64, stand_in[1], y.cpu())
    (expected_grad,) = torch.autograd.grad(expected.sum(), s64, retain_graph=True)
    (expected_rows_grad,) = torch.autograd.grad(expected, s64, torch.linspace(0.5, 2.0, 5, dtype=torch.float64))
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all() and torch.isfinite(rows_grad).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close_scaled(rows, expected, tol, f"{name} rows")
    assert_close_scaled(loss, expected.sum(), tol, f"{name} loss")
    assert_close_scaled(grad, expected_grad, tol, f"{name} grad")
    assert_close_scaled(rows_grad, expected_rows_grad, tol, f"{name} rows grad")


# --- NaN logits

NAN_ROWS = [1, 2, 3, 4, 5]


def nan_logits(classes, dtype, device):
    """(z_s, z_t, target) of 7 rows, class `classes - 1` the target, and (z_s, z_t) without the
    NaNs. One NaN logit in each of rows 1-5: 1 in the teacher, 2 in the student (non-target
    classes; row 1's in the last block of a streamed row), 3 in the teacher's and 4 in the
    student's target, 5 in the teacher next to masked (-inf) classes; rows 0 and 6 (6 masked as
    5) have none."""
    z_s = logits(7, classes, torch.float64, seed=50)
    z_t = logits(7, classes, torch.float64, seed=51)
    z_s[5:, 0] = z_t[5:, 0] = z_t[5:, 2] = MASKED
    clean = [z.to(dtype).to(device) for z in (z_s, z_t)]
    z_t[1, classes - 2] = z_t[3, classes - 1] = z_t[5, 1] = float("nan")
    z_s[2, 1] = z_s[4, classes - 1] = float("nan")
    y = torch.full((7,), classes - 1, device=device)
    return z_s.to(dtype).to(device), z_t.to(dtype).to(device), y, clean


def rows_and_grads(name, backend, z_s, z_t, y):
    """Per-row losses, the batchmean loss, and the student's gradients of the summed loss (the
    gradient of the forward) and of the weighted rows (the backward's)."""
    fused = LOSSES[name][1] if backend == "reference" else partial(LOSSES[name][0], backend=backend)
    z_s = z_s.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fused(z_s, z_t, y, reduction="sum"), z_s)
    rows = fused(z_s, z_t, y, reduction="none")
    (rows_grad,) = torch.autograd.grad(rows, z_s, torch.linspace(0.5, 2.0, len(y), device=z_s.device, dtype=rows.dtype))
    return rows.detach(), fused(z_s, z_t, y).detach(), grad, rows_grad


@pytest.mark.parametrize(
    "device,backend",
    device_backends("kd") + [pytest.param("cpu", "torch", id="cpu-torch"), pytest.param("cpu", "reference", id="cpu-reference")],
)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("classes", [12, 5000])
def test_nan_logits_give_nan_rows(device, backend, name, dtype, classes):
    """A NaN logit of z_s or z_t, target or not, next to -inf logits or not, makes its row's loss
    and student gradient NaN (kdfast/reference/kd.py; the gradient wherever the student's logit is
    not -inf), on every backend; every other row is bit for bit that of the logits without NaN."""
    z_s, z_t, y, (clean_s, clean_t) = nan_logits(classes, dtype, device)
    nan_rows = torch.zeros(len(y), dtype=torch.bool, device=device)
    nan_rows[NAN_ROWS] = True
    rows, loss, *grads = rows_and_grads(name, backend, z_s, z_t, y)
    clean_rows, _, *clean_grads = rows_and_grads(name, backend, clean_s, clean_t, y)
    assert torch.isnan(rows[nan_rows]).all() and torch.isnan(loss)
    assert torch.equal(rows[~nan_rows], clean_rows[~nan_rows])
    for grad, clean_grad in zip(grads, clean_grads):
        assert torch.isnan(grad[nan_rows][~z_s[nan_rows].isneginf()]).all()
        assert torch.equal(grad[~nan_rows], clean_grad[~nan_rows])


def test_modules_match_functional():
    z_s, z_t, y = logits(4, 10, seed=19), logits(4, 10, seed=20), targets(4, 10)
    assert knn.KDLoss(temperature=2.0)(z_s, z_t).item() == pytest.approx(F.kd_loss(z_s, z_t, temperature=2.0).item())
    assert knn.DKDLoss(beta=2.0)(z_s, z_t, y).item() == pytest.approx(F.dkd_loss(z_s, z_t, y, beta=2.0).item())


# --- fused ops: memory, gradcheck, opcheck, torch.compile


def _big_allocations(fn, min_bytes):
    """Bytes allocated by each op of fn that allocated at least `min_bytes` (CPU profiler).

    An op's ``self_cpu_memory_usage`` is what the CPU allocator handed out inside the op and not
    inside its child ops, net of what the op freed (aten::div of a B x K tensor by a Python
    scalar shows B*K*4 - 4 bytes: it frees the scalar's tensor), so every allocation is counted
    once, by the op that made it, also inside kdfast's custom ops (the aten::empty of the C++
    kernels and of the Triton launcher are child ops). Not seen: a buffer allocated and freed
    inside one op (net 0), memory outside torch's CPU allocator (the Triton interpreter computes
    in numpy tiles of at most 4096 elements; a GPU kernel's registers and shared memory).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= min_bytes]


@pytest.mark.parametrize("device,backend", [p for p in device_backends("kd") if p.values[0] == "cpu"])
@pytest.mark.parametrize("name", LOSSES)
def test_fused_path_allocates_one_bk_tensor(device, backend, name):
    """Forward + backward of a reduced loss allocate one B x K tensor, the gradient: the forward
    writes it, the backward scales it in place (and autograd materializes no zero gradient for
    the unused outputs). The eager reference allocates many. Counted on the CPU by the profiler
    (see _big_allocations: the Triton interpreter's own numpy buffers are invisible to it, and
    the reference's count is a floor); test_fused_path_gpu_peak_memory counts on the GPU."""
    z_s, z_t = student_teacher(16, 512, device=device, seed=21)
    y = targets(16, 512, device)
    fused, reference = LOSSES[name]
    bk_bytes = z_s.numel() * z_s.element_size()
    grads = []
    allocations = _big_allocations(lambda: grads.extend(torch.autograd.grad(fused(z_s, z_t, y, backend), z_s)), bk_bytes // 2)
    assert allocations == [bk_bytes]
    assert grads[0].shape == z_s.shape
    eager = _big_allocations(lambda: torch.autograd.grad(reference(z_s, z_t, y), z_s), bk_bytes // 2)
    assert len(eager) >= 10  # KD: 14, DKD: 34 here (torch 2.14)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", LOSSES)
def test_fused_path_gpu_peak_memory(backend, name):
    """On the GPU, the caching allocator's peak during forward + backward of a reduced loss is
    the gradient plus at most 1 MiB (per-row outputs, allocator rounding); eager's is several
    B x K tensors."""
    z_s, z_t = student_teacher(256, 32768, device="cuda", seed=23)
    y = targets(256, 32768, "cuda")
    fused, reference = LOSSES[name]
    bk_bytes = z_s.numel() * z_s.element_size()

    def peak(loss_fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        (grad,) = torch.autograd.grad(loss_fn(), z_s)
        torch.cuda.synchronize()
        assert grad.shape == z_s.shape
        return torch.cuda.max_memory_allocated() - before

    assert bk_bytes <= peak(lambda: fused(z_s, z_t, y, backend)) <= bk_bytes + (1 << 20)
    assert peak(lambda: reference(z_s, z_t, y)) >= 3 * bk_bytes


# --- bad input


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(z_s=torch.randn(4)), ValueError, "z_s must be \\(B, K\\) logits"),
        (dict(z_s=torch.randn(4, 1), z_t=torch.randn(4, 1)), ValueError, "K >= 2"),
        (dict(z_t=torch.randn(4, 9)), ValueError, "one shape"),
        (dict(z_s=torch.ones(4, 10, dtype=torch.int32)), TypeError, "z_s must be float16"),
        (dict(z_t=torch.randn(4, 10, device="meta")), ValueError, "one device"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
    ],
)
def test_bad_input(name, change, error, match):
    args = dict(z_s=torch.randn(4, 10), z_t=torch.randn(4, 10))
    kwargs = {k: v for k, v in change.items() if k in ("temperature", "reduction")}
    args.update({k: v for k, v in change.items() if k not in kwargs})
    with pytest.raises(error, match=match):
        LOSSES[name][0](args["z_s"], args["z_t"], targets(4, 10), **kwargs)


@pytest.mark.parametrize(
    "target,error,match",
    [
        (torch.tensor([0, 1, 2, 10]), ValueError, "outside \\[0, 10\\)"),
        (torch.tensor([0, 1, -1, 3]), ValueError, "outside \\[0, 10\\)"),
        (torch.tensor([0, 1, 2, 3], dtype=torch.int32), TypeError, "target must be int64"),
        (torch.tensor([0, 1, 2]), ValueError, "target must have shape \\(4,\\)"),
        ([0, 1, 2, 3], TypeError, "target must be a torch.Tensor"),
    ],
)
def test_dkd_bad_target(target, error, match):
    with pytest.raises(error, match=match):
        F.dkd_loss(torch.randn(4, 10), torch.randn(4, 10), target)


@pytest.mark.parametrize("device,backend", device_backends("kd"))
def test_out_of_range_target_in_kernels_gives_nan_not_a_crash(device, backend):
    """Inside torch.compile the range check is skipped: the kernels must stay in bounds."""
    ops = namespace(backend)
    z = logits(3, 8, device=device, seed=31)
    loss, _, grad = ops.dkd_forward(z, z, torch.tensor([1, 8, -3], device=device), 1.0, 8.0, 4.0, True)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


@pytest.mark.parametrize("batch", [1, 64, 256, 2048, 4096])
@pytest.mark.parametrize("classes", [1, 2, 10, 100, 128, 1000, 21843, 32000])
def test_row_launch_shapes_on_a_132_sm_gpu(monkeypatch, batch, classes):
    """The Triton launch shape (no GPU needed): every row in exactly one program, packed tiles
    within the per-thread element limits that keep the sm_90 kernels free of register spills
    (kernels/softmax.py), and packing never leaves fewer programs than SMs."""
    from kdfast.kernels import softmax as sm

    monkeypatch.setattr(sm, "_min_programs", lambda device: 132)
    for acc in (torch.float32, torch.float64):
        launch = sm.row_launch(batch, classes, acc, torch.device("cuda"))
        (programs,) = launch.grid
        assert (programs - 1) * launch.rows < batch <= programs * launch.rows
        assert launch.one_block == (classes <= launch.block_k) and launch.block_k <= sm.MAX_BLOCK_K[acc]
        assert 1 <= launch.num_warps <= sm._MAX_WARPS
        elements_per_thread = launch.rows * launch.block_k / (32 * launch.num_warps)
        if launch.rows > 1:
            assert launch.rows * launch.block_k <= sm._MAX_PACKED_TILE and programs >= 132
            assert elements_per_thread <= sm._PACKED_ELEMS_PER_THREAD
        else:
            assert elements_per_thread <= sm._ROW_ELEMS_PER_THREAD
