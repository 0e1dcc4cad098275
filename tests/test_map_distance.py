"""Map distances (AFD/RTK): every fused backend against the float64 eager reference.

Values and gradients (to the student maps and to att, non-unit upstream gradient) of
map_distance_loss, every dtype, both pooling orders, teacher maps of several sizes (groups in an
order that is not the teachers', a size that does not divide the student's, a student map upsampled
to a larger teacher map), T = S = 1, S != T, B = 1, contiguous / channels_last / strided maps,
several blocks of students and positions per program, map_distances, teacher of another dtype and
without gradient, inference-mode teacher, autocast, NaN, determinism, AFD's code transcribed, nn
form, op entry-point checks and bad input (opcheck, compile, gradcheck: test_op_contracts.py).
Shapes stay tiny: the Triton kernels run in the interpreter here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from _compare import assert_float32_and_unchanged_under_autocast, check_against_reference
from conftest import DTYPES, TOL, assert_close_scaled, backends_with_torch, device_backends

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.ops import namespace
from kdfast.reference import map_distance as ref

FUSED = device_backends("map_distance")
WITH_TORCH = backends_with_torch("map_distance")

# Student and teacher maps (C, H, W): teacher sizes 3x3 (teachers 0, 2), 6x6 (1, 4) and 5x4 (3), so
# the group order [0, 2, 1, 4, 3] is not the teachers' one; the 6x6 student is pooled to 5x4 (bins
# that do not divide), the 3x3 one upsampled to 6x6; S = 3 != T = 5.
STUDENTS = [(4, 6, 6), (5, 3, 3), (3, 5, 4)]
TEACHERS = [(3, 3, 3), (2, 6, 6), (2, 3, 3), (4, 5, 4), (3, 6, 6)]


def make(
    students=STUDENTS, teachers=TEACHERS, batch=3, dtype=torch.float32, device="cpu", teacher_dtype=None, layout="nchw", seed=0
):
    """f_s (requiring grad), f_t and att (B, T, S) (a softmax over s, requiring grad, in `dtype`);
    layout "nhwc" (channels_last) or "strided" (every map a transposed view)."""
    gen = torch.Generator().manual_seed(seed)

    def one(shape, dt):
        c, h, w = shape
        if layout == "strided":
            return torch.randn(batch, c, w, h, generator=gen, dtype=torch.float64).to(dt).to(device).transpose(2, 3)
        f = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64).to(dt).to(device)
        return f.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else f

    f_s = [one(s, dtype).requires_grad_() for s in students]
    f_t = [one(t, teacher_dtype or dtype) for t in teachers]
    logits = torch.randn(batch, len(teachers), len(students), generator=gen, dtype=torch.float64)
    att = logits.softmax(-1).to(dtype).to(device).requires_grad_()
    return f_s, f_t, att


def check(backend, f_s, f_t, att, loss_tol, grad_tol, pool="map", upstream=-1.7, floor=1e-30):
    """The loss and its gradients to f_s and att against the float64 reference on the same inputs."""
    loss, grads = check_against_reference(
        lambda s, t, a: F.map_distance_loss(s, t, a, pool=pool, backend=backend),
        lambda s, t, a: ref.map_distance_loss(s, t, a, pool),
        (f_s, f_t, att),
        loss_tol,
        grad_tol,
        wrt=(0, 2),
        upstream=upstream,
        floor=floor,
    )
    assert loss.shape == ()
    return loss, grads


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, backend, dtype):
    f_s, f_t, att = make(dtype=dtype, device=device, seed=1)
    check(backend, f_s, f_t, att, *TOL[dtype])


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pool_feature(device, backend, dtype):
    """pool="feature" pools the feature maps (in their dtype, before the square-mean)."""
    f_s, f_t, att = make(dtype=dtype, device=device, seed=2)
    check(backend, f_s, f_t, att, *TOL[dtype], pool="feature")


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("batch", [1, 2])
def test_single_pair(device, backend, batch):
    """T = S = 1, including B = 1 (att a constant weight)."""
    f_s, f_t, att = make([(3, 4, 4)], [(2, 2, 2)], batch, device=device, seed=3)
    check(backend, f_s, f_t, att, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("layout", ["nhwc", "strided"])
def test_layouts(device, backend, layout):
    """Maps read in place (or copied by the AT op), and a non-contiguous att."""
    f_s, f_t, att = make(device=device, layout=layout, seed=4)
    att = att.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    check(backend, f_s, f_t, att, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", FUSED)
def test_several_blocks(device, backend):
    """S = 17 students (two student blocks of 16 in Triton) and N = 17 x 17 = 289 positions (three
    Triton blocks of 128, two C++ CPU chunks of 256), next to a small group."""
    students = [(1, 3, 3)] * 16 + [(2, 17, 17)]
    f_s, f_t, att = make(students, [(2, 17, 17), (1, 2, 2), (3, 17, 17)], 2, device=device, seed=5)
    check(backend, f_s, f_t, att, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", FUSED)
def test_many_size_groups(device, backend):
    """33 teacher sizes (size groups): the CUDA kernels take 32 groups per launch (two launches)."""
    teachers = [(1, 1 + i // 6, 1 + i % 6) for i in range(33)]
    f_s, f_t, att = make([(2, 6, 6), (1, 4, 5)], teachers, 2, torch.float64, device, seed=21)
    check(backend, f_s, f_t, att, 1e-10, 1e-10)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_map_distances(device, backend):
    """(B, T, S) in the teachers' order, no gradient, and the loss is their att-weighted sum."""
    f_s, f_t, att = make(device=device, seed=6)
    dist = F.map_distances(f_s, f_t, backend=backend)
    s64, t64 = [f.detach().double().cpu() for f in f_s], [t.double().cpu() for t in f_t]
    assert dist.shape == att.shape and dist.dtype == torch.float32 and not dist.requires_grad
    assert_close_scaled(dist, ref.map_distances(s64, t64), 2e-5, "dist")
    loss = F.map_distance_loss(f_s, f_t, att, backend=backend)
    torch.testing.assert_close(loss, (att * dist).sum() / att.shape[0])
    assert_close_scaled(
        F.map_distances(f_s, f_t, pool="feature", backend=backend), ref.map_distances(s64, t64, "feature"), 2e-5, "dist (feature)"
    )


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_teacher_dtype_and_no_teacher_gradient(device, backend):
    f_s, f_t, att = make(device=device, teacher_dtype=torch.bfloat16, seed=7)
    f_t = [t.requires_grad_() for t in f_t]
    check(backend, f_s, f_t, att, 2e-5, 2e-5)
    F.map_distance_loss(f_s, f_t, att, backend=backend).backward()
    assert all(t.grad is None for t in f_t)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_teacher_from_inference_mode(device, backend):
    f_s, f_t, att = make(device=device, seed=8)
    with torch.inference_mode():
        frozen = [t.clone() for t in f_t]
    grads = [torch.autograd.grad(F.map_distance_loss(f_s, t, att, backend=backend), f_s + [att]) for t in (f_t, frozen)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_autocast_bf16(device, backend):
    """Under bf16 autocast the loss stays float32 and equal to the loss without it."""
    f_s, f_t, att = make(device=device, seed=9)
    assert_float32_and_unchanged_under_autocast(lambda: F.map_distance_loss(f_s, f_t, att, backend=backend), device)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_gives_nan_loss(device, backend):
    f_s, f_t, att = make(device=device, seed=10)
    f_t[1] = f_t[1].clone()
    f_t[1][0, 1, 2, 3] = float("nan")
    assert torch.isnan(F.map_distance_loss(f_s, f_t, att, backend=backend))


@pytest.mark.parametrize("device,backend", FUSED)
def test_deterministic(device, backend):
    f_s, f_t, att = make(device=device, seed=11)
    runs = []
    for _ in range(2):
        loss = F.map_distance_loss(f_s, f_t, att, backend=backend)
        runs.append((loss, *torch.autograd.grad(loss, f_s + [att])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_reference_is_afds_code():
    """The reference (pool="map") equals a transcription of AFD's code (clovaai/attention-feature-
    distillation, distiller: Sample, LinearTransformTeacher's values, Attention.cal_diff), given att."""
    f_s, f_t, att = make(dtype=torch.float64, seed=12)
    bs = f_s[0].size(0)
    loss = att.new_zeros(())
    for i, f in enumerate(f_t):
        sample = torch.nn.AdaptiveAvgPool2d(f.shape[2:])
        g_s = torch.stack([sample(s.pow(2).mean(1, keepdim=True)).view(bs, -1) for s in f_s], dim=1)
        v_s = TF.normalize(g_s, dim=2)
        v_t = TF.normalize(f.pow(2).mean(1).view(bs, -1), dim=1)
        diff = (v_s - v_t.unsqueeze(1)).pow(2).mean(2)
        loss = loss + torch.mul(diff, att[:, i]).sum(1).mean()
    actual = ref.map_distance_loss(f_s, f_t, att)
    torch.testing.assert_close(actual, loss, rtol=1e-12, atol=0)
    for a, e in zip(torch.autograd.grad(actual, f_s + [att]), torch.autograd.grad(loss, f_s + [att])):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-15)


def test_reference_groups():
    groups = ref.size_groups([torch.empty(1, 1, *size) for size in ((3, 3), (6, 6), (3, 3), (5, 4), (6, 6))])
    assert groups == [((3, 3), [0, 2]), ((6, 6), [1, 4]), ((5, 4), [3])]
    assert ref.group_order(groups) == ([0, 2, 1, 4, 3], [0, 2, 1, 4, 3])


def test_module_matches_functional():
    f_s, f_t, att = make(seed=13)
    module = knn.MapDistanceLoss(pool="feature", backend="torch")
    assert module(f_s, f_t, att).item() == pytest.approx(F.map_distance_loss(f_s, f_t, att, "feature", "torch").item())
    assert "pool='feature'" in repr(module)


# --- fused ops: gradcheck, opcheck, torch.compile, entry-point checks


def _values(device, dtype=torch.float32, seed=15):
    """Op inputs: two groups (T_u = 2, 1), S = 3, B = 2; unit-norm rows as the functional builds them."""
    gen = torch.Generator().manual_seed(seed)

    def rows(*shape):
        return TF.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).to(dtype).to(device)

    v_s, v_t = [rows(2, 3, 6), rows(2, 3, 4)], [rows(2, 2, 6), rows(2, 1, 4)]
    att = torch.rand(2, 3, 3, generator=gen, dtype=torch.float64).to(device)
    return v_s, v_t, att


@pytest.mark.parametrize("device,backend", FUSED)
def test_op_matches_reference(device, backend):
    """The op on its own: dist per group, the loss, grad_att and grad_v_s, with strided values."""
    v_s, v_t, att = _values(device, torch.float64, seed=16)
    v_s[0] = v_s[0].transpose(0, 1).contiguous().transpose(0, 1)  # batch and student strides swapped
    loss, dist = namespace(backend).map_distance_forward(v_s, v_t, att)
    expected = torch.cat([ref.pair_distances(s, t) for s, t in zip(v_s, v_t)], 1)
    torch.testing.assert_close(dist, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, (att * expected).sum() / 2, rtol=1e-12, atol=0)
    leaves = [v.clone().requires_grad_() for v in v_s] + [att.clone().requires_grad_()]
    e_loss = (leaves[-1] * torch.cat([ref.pair_distances(s, t) for s, t in zip(leaves[:2], v_t)], 1)).sum() / 2
    e_grads = torch.autograd.grad(3.0 * e_loss, leaves)
    grad_v_s, grad_att = namespace(backend).map_distance_backward(torch.tensor(3.0, device=device), v_s, v_t, att, dist)
    for g, e in zip([*grad_v_s, grad_att], e_grads):
        assert g.is_contiguous()
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device,backend", FUSED)
def test_entry_point_checks(device, backend):
    """The op entry points reject bad input with errors naming the argument (ValueError from the
    Triton launchers, RuntimeError from TORCH_CHECK)."""
    v_s, v_t, att = _values(device)
    forward = namespace(backend).map_distance_forward
    for args, match in [
        (([], [], att), "groups"),
        ((v_s, v_t[:1], att), "groups"),
        ((v_s, v_t, att[:, :2]), "att"),
        ((v_s, v_t, att.int()), "att"),
        (([v_s[0][:, :2], v_s[1]], v_t, att), "v_s\\[1\\]"),
        (([v_s[0], v_s[1][..., :3]], v_t, att), "v_s\\[1\\]"),
        (([v_s[0].double(), v_s[1]], v_t, att), "dtype"),
        (([v_s[0][0], v_s[1]], v_t, att), "v_s\\[0\\]"),
    ]:
        with pytest.raises((ValueError, RuntimeError), match=match):
            forward(*args)
    _, dist = forward(v_s, v_t, att)
    backward = namespace(backend).map_distance_backward
    with pytest.raises((ValueError, RuntimeError), match="dist"):
        backward(torch.tensor(1.0, device=device), v_s, v_t, att, dist[:1])
    with pytest.raises((ValueError, RuntimeError), match="grad_loss"):
        backward(torch.ones(2, device=device), v_s, v_t, att, dist)


# --- bad input of the functional layer


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(f_s=torch.randn(2, 3, 4)), ValueError, "f_s\\[0\\] must be 4-D"),
        (dict(f_t=[torch.randn(3, 4, 4, 4)]), ValueError, "batch sizes differ: f_t\\[0\\]"),
        (dict(f_t=[torch.ones(2, 4, 4, 4, dtype=torch.int64)]), TypeError, "f_t\\[0\\] must be float16"),
        (dict(f_s=[torch.randn(2, 4, 0, 4)]), ValueError, "f_s\\[0\\] is empty"),
        (dict(f_s=[torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, dtype=torch.float64)]), ValueError, "one dtype"),
        (dict(f_t=[torch.randn(2, 4, 4, 4, device="meta")]), ValueError, "one device"),
        (dict(f_s=[]), TypeError, "non-empty list"),
        (dict(att=[[1.0]]), TypeError, "att must be a torch.Tensor"),
        (dict(att=torch.ones(2, 1, 1, dtype=torch.int64)), TypeError, "att must be float16"),
        (dict(att=torch.rand(2, 1, 2)), ValueError, "att must be \\(B, T, S\\) = \\(2, 1, 1\\)"),
        (dict(att=torch.rand(2, 1, 1, device="meta")), ValueError, "one device"),
        (dict(pool="student"), ValueError, "pool must be one of"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
    ],
)
def test_bad_input(change, error, match):
    args: dict[str, Any] = dict(f_s=[torch.randn(2, 3, 4, 4)], f_t=[torch.randn(2, 4, 4, 4)], att=torch.rand(2, 1, 1))
    args.update(change)
    with pytest.raises(error, match=match):
        F.map_distance_loss(**args)


def test_map_distances_bad_input():
    with pytest.raises(ValueError, match="pool must be one of"):
        F.map_distances([torch.randn(2, 3, 4, 4)], [torch.randn(2, 4, 4, 4)], pool="x")
