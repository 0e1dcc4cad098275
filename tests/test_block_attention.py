"""Block attention (LAKD's NDAM loss, AFT-KD's loss): every fused backend against the float64 eager
reference.

Values and gradients (per-term upstream weights) of ndam_loss (weighting none / teacher) and
aft_loss, every dtype, grids that divide H, that do not (overlapping bins) and that exceed it,
L = 1 and L = 3 modules of different shapes, powers 1, 2 (and 1.5, 3 through the op), contiguous /
channels_last / strided inputs, spatial alignment of h_s and f_t, B = 1, zero and NaN maps,
several blocks per program, teacher without gradient, inference-mode teacher, autocast, reductions
and nn forms, determinism and bad input (opcheck, compile, gradcheck: test_op_contracts.py).
Shapes stay tiny: the Triton kernels run in the interpreter here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import DTYPES, TOL, assert_close_scaled, backends_with_torch, device_backends

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.numerics import block_attention as block_attention_numerics
from kdfast.numerics.common import compute_dtype
from kdfast.ops import block_attention as ops
from kdfast.ops import namespace
from kdfast.reference import block_attention as ref

FUSED = device_backends("block_attention")
WITH_TORCH = backends_with_torch("block_attention")

# (f_s (Cs, Hs, Ws), h_s (Ct, H, W), f_t (Ct, H, W)) per module. With grid 4: H = 7 (bins
# overlap), 3 (grid > H), 4 (divides); Cs != Ct, Hs != H.
THREE = [((3, 7, 5), (6, 7, 5), (6, 7, 5)), ((4, 4, 4), (5, 3, 3), (5, 3, 3)), ((2, 8, 6), (3, 4, 4), (3, 4, 4))]
ONE = [((3, 7, 6), (4, 7, 6), (4, 7, 6))]
# h_s larger than f_t (h_s pooled) and f_t larger than h_s (f_t pooled).
UNALIGNED = [((3, 6, 6), (4, 6, 6), (4, 3, 3)), ((2, 5, 5), (3, 2, 3), (3, 5, 7))]
# (functional, keyword arguments, power, feature grid (None: the grid), teacher weighting)
# fn, its extra keyword arguments, power, feature_grid (None: the grid), teacher weighting
VARIANTS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, Any], float, int | None, bool]] = {
    "ndam": (F.ndam_loss, {}, 1.0, 0, False),
    "ndam_teacher": (F.ndam_loss, {"weighting": "teacher"}, 1.0, 0, True),
    "aft": (F.aft_loss, {}, 2.0, None, False),
}


def make(modules, batch=3, dtype=torch.float32, device="cpu", teacher_dtype=None, layout="nchw", seed=0):
    """f_s, h_s (requiring grad) and f_t lists; layout "nhwc" (channels_last) or "strided"
    (every map a transposed view: no unit stride along positions)."""
    gen = torch.Generator().manual_seed(seed)

    def one(shape, dt):
        c, h, w = shape
        if layout == "strided":
            f = torch.randn(batch, c, w, h, generator=gen, dtype=torch.float64).to(dt).to(device).transpose(2, 3)
        else:
            f = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64).to(dt).to(device)
        return f.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else f

    f_s = [one(s, dtype).requires_grad_() for s, _, _ in modules]
    h_s = [one(h, dtype).requires_grad_() for _, h, _ in modules]
    f_t = [one(t, teacher_dtype or dtype) for _, _, t in modules]
    return f_s, h_s, f_t


def upstream(modules, seed=1):
    return torch.randn(len(modules), 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def fused_terms(variant, f_s, h_s, f_t, grid, backend):
    fn, kwargs, _, _, _ = VARIANTS[variant]
    return fn(f_s, h_s, f_t, grid=grid, reduction="terms", backend=backend, **kwargs)


def expected_terms(variant, f_s, h_s, f_t, grid, weights):
    """float64 reference terms and gradients of ``sum(weights * terms)`` on the same inputs."""
    _, _, power, feature_grid, weighted = VARIANTS[variant]
    s64 = [f.detach().double().cpu().requires_grad_() for f in f_s]
    h64 = [h.detach().double().cpu().requires_grad_() for h in h_s]
    t64 = [t.detach().double().cpu() for t in f_t]
    fgrid = grid if feature_grid is None else feature_grid
    terms = ref.block_attention_terms(s64, h64, t64, grid, power, fgrid, weighted)
    return terms, torch.autograd.grad((terms * weights).sum(), s64 + h64)


def check(variant, f_s, h_s, f_t, grid, backend, loss_tol, grad_tol, floor=1e-30):
    weights = upstream(f_s)
    terms = fused_terms(variant, f_s, h_s, f_t, grid, backend)
    grads = torch.autograd.grad((terms * weights.to(terms)).sum(), f_s + h_s)
    e_terms, e_grads = expected_terms(variant, f_s, h_s, f_t, grid, weights)
    assert terms.shape == (len(f_s), 2) and terms.dtype == compute_dtype(f_s[0].dtype)
    for j, name in enumerate(block_attention_numerics.TERMS):
        assert_close_scaled(terms[:, j], e_terms[:, j], loss_tol, name, floor)
    for i, (g, e, x) in enumerate(zip(grads, e_grads, f_s + h_s)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close_scaled(g, e, grad_tol, f"grad[{i}]", floor)
    return terms, grads


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(device, backend, dtype, variant):
    f_s, h_s, f_t = make(THREE, 3, dtype, device, seed=2)
    check(variant, f_s, h_s, f_t, 4, backend, *TOL[dtype])


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("grid", [1, 3, 9])
def test_grids(device, backend, variant, grid):
    """grid 1 (one bin: every map term 0), 3 (divides no H here), 9 (> every H)."""
    f_s, h_s, f_t = make(THREE, 2, torch.float64, device, seed=3)
    check(variant, f_s, h_s, f_t, grid, backend, 1e-10, 1e-10, floor=1e-3)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize(
    "power,feature_grid,weighted", [(1.5, 0, True), (3.0, 0, False), (3.0, 2, False), (1.5, 5, False), (1.0, 5, False)]
)
def test_op_powers_and_feature_grids(device, backend, power, feature_grid, weighted):
    """The op's knobs beyond the two functionals: any power >= 1, feature grid != grid (5 > H)."""
    f_s, h_s, f_t = make(THREE, 2, torch.float64, device, seed=4)
    weights = upstream(THREE, seed=5)
    terms = ops.block_attention_terms(f_s, h_s, f_t, 3, power, feature_grid, weighted, backend)
    grads = torch.autograd.grad((terms * weights).sum(), f_s + h_s)
    s64 = [f.detach().requires_grad_() for f in f_s]
    h64 = [h.detach().requires_grad_() for h in h_s]
    e_terms = ref.block_attention_terms(s64, h64, f_t, 3, power, feature_grid, weighted)
    e_grads = torch.autograd.grad((e_terms * weights).sum(), s64 + h64)
    assert_close_scaled(terms, e_terms, 1e-10, "terms")
    for g, e in zip(grads, e_grads):
        assert_close_scaled(g, e, 1e-10, "grad")


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["nhwc", "strided"])
def test_layouts(device, backend, variant, layout):
    f_s, h_s, f_t = make(THREE, 2, torch.float32, device, layout=layout, seed=6)
    check(variant, f_s, h_s, f_t, 4, backend, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("variant", VARIANTS)
def test_single_module_and_batch_one(device, backend, variant):
    (s,), (h,), (t,) = make(ONE, 1, torch.float64, device, seed=7)
    fn, kwargs, _, _, _ = VARIANTS[variant]
    loss = fn(s, h, t, backend=backend, **kwargs)  # single tensors, not lists
    assert loss.shape == ()
    check(variant, [s], [h], [t], 4, backend, 1e-10, 1e-10)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("variant", VARIANTS)
def test_spatial_alignment(device, backend, variant):
    """h_s and f_t of different H x W: the larger is pooled to the smaller before the kernel."""
    f_s, h_s, f_t = make(UNALIGNED, 2, torch.float64, device, seed=8)
    check(variant, f_s, h_s, f_t, 4, backend, 1e-10, 1e-10)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_dtype_and_no_teacher_gradient(device, backend, variant):
    f_s, h_s, f_t = make(THREE, 2, torch.float32, device, teacher_dtype=torch.bfloat16, seed=9)
    f_t = [t.requires_grad_() for t in f_t]
    terms, _ = check(variant, f_s, h_s, f_t, 4, backend, 2e-5, 2e-5)
    fused_terms(variant, f_s, h_s, f_t, 4, backend).sum().backward()
    assert all(t.grad is None for t in f_t)


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("variant", VARIANTS)
def test_several_blocks(device, backend, variant):
    """Positions (13 x 11 = 143) and channels (40) span several blocks of one program."""
    modules = [((40, 13, 11), (40, 13, 11), (40, 13, 11))]
    f_s, h_s, f_t = make(modules, 2, torch.float64, device, seed=10)
    check(variant, f_s, h_s, f_t, 4, backend, 1e-10, 1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_triton_splits(monkeypatch, variant, layout):
    """Every (module, sample) split over channel and position ranges (as on a large GPU): the same
    values and gradients, and the same bits on a rerun."""
    from kdfast.kernels import block_attention as kernels

    monkeypatch.setattr(kernels, "_min_programs", lambda device: 10_000)
    modules = [((40, 13, 11), (136, 6, 6), (136, 6, 6)), ((20, 5, 5), (24, 5, 5), (24, 5, 5))]
    f_s, h_s, f_t = make(modules, 2, torch.float64, layout=layout, seed=12)
    _, _, power, feature_grid, weighted = VARIANTS[variant]
    fgrid = 4 if feature_grid is None else feature_grid
    plan = kernels._plan(f_s, h_s, f_t, 4, power, fgrid, weighted)
    assert plan.splits > 1 and (plan.splits_hw == 1 or fgrid == 0)
    terms = check(variant, f_s, h_s, f_t, 4, "triton", 1e-10, 1e-10)[0]
    again = fused_terms(variant, f_s, h_s, f_t, 4, "triton")
    assert torch.equal(terms, again)


def test_triton_module_chunks():
    """More modules than one launch takes (tuple arguments of at most MAX_STAGES): same values."""
    from kdfast.kernels._common import MAX_STAGES

    modules = [((2, 3 + i % 3, 4), (3, 4, 3 + i % 2), (3, 4, 3 + i % 2)) for i in range(MAX_STAGES + 1)]
    f_s, h_s, f_t = make(modules, 2, torch.float64, seed=13)
    check("ndam", f_s, h_s, f_t, 2, "triton", 1e-10, 1e-10)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_triton_local_module_fills_an_h200(monkeypatch, layout):
    """LAKD's local mode launches one module at a time: at B = 64 a resnet8x4 or resnet20 module
    still gets at least 3 programs per SM of a 132-SM GPU, not 64 programs; a small 64x8x8 map,
    which has only 2 blocks, gets them both (meta tensors: no data)."""
    from kdfast.kernels import block_attention as kernels

    monkeypatch.setattr(kernels, "_min_programs", lambda device: 4 * 132)
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    for c, h, w in ((64, 32, 32), (128, 16, 16), (256, 8, 8), (16, 32, 32), (64, 8, 8)):
        f = [torch.empty(64, c, h, w, device="meta").contiguous(memory_format=memory_format)]
        plan = kernels._plan(f, f, f, 4, 1.0, 0, False)
        assert 64 * plan.splits >= (128 if (c, h, w) == (64, 8, 8) else 3 * 132), (c, h, w, plan)


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("variant", ["ndam_teacher", "aft"])
def test_many_modules_and_a_large_map(device, backend, layout, variant):
    """17 modules (the CUDA kernels take 16 per launch: two launches), the first with 24 x 24 = 576
    positions (more than the 512 threads of a CUDA block) and 40 channels (two 32-channel tiles)."""
    modules = [((40, 24, 24), (40, 24, 24), (40, 24, 24))] + [((3, 4, 4), (2, 3, 3), (2, 3, 3))] * 16
    f_s, h_s, f_t = make(modules, 1, torch.float64, device, layout=layout, seed=11)
    check(variant, f_s, h_s, f_t, 4, backend, 1e-10, 1e-10)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("variant", ["ndam_teacher", "aft"])
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_zero_maps_are_finite(device, backend, variant, which):
    """A zero map has P = 0, clamped by eps (A = 0; the student's gradient through the clamp);
    a zero teacher gives zero weights (clamped mean)."""
    f_s, h_s, f_t = make(THREE[:2], 2, torch.float32, device, seed=11)
    if which != "teacher":
        f_s = [torch.zeros_like(f).requires_grad_() for f in f_s]
    if which != "student":
        f_t = [torch.zeros_like(t) for t in f_t]
    terms, grads = check(variant, f_s, h_s, f_t, 4, backend, 2e-5, 2e-5, floor=1e-2)
    assert torch.isfinite(terms).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("which,variant", [("f_s", "ndam"), ("h_s", "aft"), ("f_t", "ndam_teacher")])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_gives_nan_loss(device, backend, variant, which):
    maps = dict(zip(("f_s", "h_s", "f_t"), make(ONE, 2, torch.float32, device, seed=12)))
    maps[which] = [m.detach().clone() for m in maps[which]]
    maps[which][0][1, 0, 2, 3] = float("nan")
    fn, kwargs, _, _, _ = VARIANTS[variant]
    assert torch.isnan(fn(**maps, backend=backend, **kwargs))


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_teacher_from_inference_mode(device, backend):
    f_s, h_s, f_t = make(THREE[:2], 2, torch.float32, device, seed=13)
    with torch.inference_mode():
        frozen = [t.clone() for t in f_t]
    grads = []
    for teachers in (f_t, frozen):
        for variant in ("ndam_teacher", "aft"):
            loss = fused_terms(variant, f_s, h_s, teachers, 4, backend).sum()
            grads.append(torch.autograd.grad(loss, f_s + h_s))
    for plain, inferred in zip(grads[:2], grads[2:]):
        for a, b in zip(plain, inferred):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_autocast_bf16(device, backend):
    """Under bf16 autocast the loss stays float32 and equal to the loss without it."""
    f_s, h_s, f_t = make(THREE, 2, torch.float32, device, seed=14)
    for variant in VARIANTS:
        plain = fused_terms(variant, f_s, h_s, f_t, 4, backend)
        with torch.autocast(device, dtype=torch.bfloat16):
            mixed = fused_terms(variant, f_s, h_s, f_t, 4, backend)
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_reductions_and_modules(device, backend):
    f_s, h_s, f_t = make(THREE, 2, torch.float32, device, seed=15)
    terms = F.ndam_loss(f_s, h_s, f_t, reduction="terms", backend=backend)
    per_module = F.ndam_loss(f_s, h_s, f_t, feature_weight=0.5, map_weight=3.0, reduction="none", backend=backend)
    torch.testing.assert_close(per_module, 0.5 * terms[:, 0] + 3.0 * terms[:, 1])
    total = knn.NDAMLoss(feature_weight=0.5, map_weight=3.0, backend=backend)(f_s, h_s, f_t)
    torch.testing.assert_close(total, per_module.sum())
    terms = F.aft_loss(f_s, h_s, f_t, grid=2, reduction="terms", backend=backend)
    weights = dict(grid=2, attention_weight=2.0, feature_weight=0.25, backend=backend)
    per_stage = F.aft_loss(f_s, h_s, f_t, reduction="none", **weights)
    torch.testing.assert_close(per_stage, 0.25 * terms[:, 0] + 2.0 * terms[:, 1])
    total = knn.AFTLoss(**weights)(f_s, h_s, f_t)
    torch.testing.assert_close(total, per_stage.sum())
    assert "weighting='none'" in repr(knn.NDAMLoss()) and "attention_weight=1.0" in repr(knn.AFTLoss())


@pytest.mark.parametrize("device,backend", FUSED)
def test_deterministic(device, backend):
    f_s, h_s, f_t = make(THREE, 3, torch.float32, device, seed=16)
    runs = []
    for _ in range(2):
        terms = fused_terms("aft", f_s, h_s, f_t, 4, backend)
        runs.append((terms, *torch.autograd.grad(terms.sum(), f_s + h_s)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- the reference against literal transcriptions of the formulas


def test_reference_formulas():
    gen = torch.Generator().manual_seed(17)
    f_s, h, t = (torch.randn(2, c, 8, 4, generator=gen, dtype=torch.float64) for c in (3, 5, 5))
    # Grid 2 divides 8 x 4: 4 x 2 blocks; NDAM = normalize(block means of mean_c |f|).
    blocks = lambda f, p: f.abs().pow(p).mean(1).reshape(2, 2, 4, 2, 2).mean((2, 4)).reshape(2, 4)  # noqa: E731
    a_s, a_t = (torch.nn.functional.normalize(blocks(f, 1), dim=1) for f in (f_s, t))
    torch.testing.assert_close(F.ndam_map(f_s, 2), a_s)
    map_term = (a_s - a_t).pow(2).mean()
    w = torch.nn.functional.interpolate(a_t.view(2, 1, 2, 2), size=(8, 4), mode="nearest")
    w = w / w.mean((2, 3), keepdim=True)
    weighted = (w * (h - t).pow(2)).mean()
    terms = ref.block_attention_terms([f_s], [h], [t], 2, 1.0, 0, True)
    torch.testing.assert_close(terms[0], torch.stack([weighted, map_term]))
    # AFT: attention blocks of mean_c f^2, feature blocks pooled to 2 x 2.
    a_s, a_t = (torch.nn.functional.normalize(blocks(f, 2), dim=1) for f in (f_s, t))
    pooled = lambda f: f.reshape(2, 5, 2, 4, 2, 2).mean((3, 5))  # noqa: E731
    expected = torch.stack([(pooled(h) - pooled(t)).pow(2).mean(), (a_s - a_t).pow(2).mean()])
    torch.testing.assert_close(F.aft_loss(f_s, h, t, grid=2, reduction="terms", backend="torch")[0], expected)


def test_reference_weights_with_overlapping_bins():
    """H = 7, g = 4: the weight of row y is the teacher map's cell floor(4 y / 7), mean 1."""
    a_t = torch.rand(1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    w = ref.teacher_weight(a_t, 4, 7, 5)
    rows, cols = [0, 0, 1, 1, 2, 2, 3], [0, 0, 1, 2, 3]
    expected = torch.stack([torch.stack([a_t[0, 4 * i + j] for j in cols]) for i in rows])
    torch.testing.assert_close(w[0], expected / expected.mean())


# --- fused ops: gradcheck, opcheck, torch.compile, launcher checks


@pytest.mark.parametrize("device,backend", FUSED)
def test_entry_point_checks(device, backend):
    """The op entry points reject bad input with errors naming the argument (ValueError from the
    Triton launchers, RuntimeError from TORCH_CHECK)."""
    x = torch.randn(2, 3, 4, 4, device=device)
    names = ("f_s", "h_s", "f_t", "grid", "power", "feature_grid", "teacher_weighting")
    good: dict[str, Any] = dict(zip(names, ([x], [x], [x], 4, 1.0, 0, False)))
    forward = namespace(backend).block_attention_forward
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(f_s=[]), "f_s"),
        (dict(h_s=[x, x]), "h_s"),
        (dict(f_t=[x[:, :, :3]]), "f_t"),
        (dict(h_s=[x[0]]), "h_s"),
        (dict(h_s=[x[:1]], f_t=[x[:1]]), "batch|h_s"),
        (dict(h_s=[x.double()], f_t=[x.double()]), "h_s"),
        (dict(grid=0), "grid"),
        (dict(feature_grid=-1), "feature_grid"),
        (dict(power=0.5), "power"),
        (dict(feature_grid=2, teacher_weighting=True), "teacher_weighting"),
    ]
    for change, match in cases:
        with pytest.raises((ValueError, RuntimeError), match=match):
            forward(*{**good, **change}.values())
    terms, maps = forward(*good.values())
    with pytest.raises((ValueError, RuntimeError), match="maps"):
        namespace(backend).block_attention_backward(terms, [x], [x], [x], maps[:, :1], 4, 1.0, 0, False)


# --- bad input of the functional layer


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(f_s=torch.randn(2, 3, 4)), ValueError, "f_s\\[0\\] must be 4-D"),
        (dict(h_s=torch.randn(3, 4, 4, 4)), ValueError, "batch sizes differ: h_s\\[0\\]"),
        (dict(f_t=torch.randn(2, 5, 4, 4)), ValueError, "one channel count"),
        (dict(f_t=torch.ones(2, 4, 4, 4, dtype=torch.int64)), TypeError, "f_t\\[0\\] must be float16"),
        (dict(h_s=torch.randn(2, 4, 0, 4)), ValueError, "h_s\\[0\\] is empty"),
        (dict(h_s=torch.randn(2, 4, 4, 4, dtype=torch.float64)), ValueError, "one dtype"),
        (dict(f_t=torch.randn(2, 4, 4, 4, device="meta")), ValueError, "one device"),
        (dict(h_s=[torch.randn(2, 4, 4, 4)] * 2), ValueError, "as many modules"),
        (dict(f_s=[]), TypeError, "non-empty list"),
        (dict(grid=0), ValueError, "grid must be an int >= 1"),
        (dict(grid=2.0), ValueError, "grid must be an int >= 1"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
    ],
)
@pytest.mark.parametrize("fn", [F.ndam_loss, F.aft_loss])
def test_bad_input(fn, change, error, match):
    args = dict(f_s=torch.randn(2, 3, 4, 4), h_s=torch.randn(2, 4, 4, 4), f_t=torch.randn(2, 4, 4, 4))
    args.update(change)
    with pytest.raises(error, match=match):
        fn(**args)


def test_bad_knobs():
    args = (torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="weighting must be one of"):
        F.ndam_loss(*args, weighting="student")
    with pytest.raises(ValueError, match="map_weight must be a finite number"):
        F.ndam_loss(*args, map_weight=float("inf"))
    not_a_number: Any = None
    with pytest.raises(ValueError, match="attention_weight must be a finite number"):
        F.aft_loss(*args, attention_weight=not_a_number)
    with pytest.raises(ValueError, match="grid must be an int >= 1"):
        F.ndam_map(args[0], grid=-1)
