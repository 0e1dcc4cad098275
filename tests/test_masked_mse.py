"""SoKD's masked feature loss (masked_mse): every fused backend against the float64 eager reference.

Values and gradients of x and y (non-unit upstream gradient), every dtype and reduction, masks
(B, 1, H, W) and (B, H, W), soft, binary, bool, of another dtype, strided or expanded; all-zero
masks; contiguous, channels_last, mixed and non-flattenable layouts; B = 1 and odd sizes; channel
splits and several tiles; gradients only where needed; inference-mode inputs; determinism; no
(B, C, H, W) allocation in the forward; autocast and bad input (opcheck, compile, gradcheck:
test_op_contracts.py). Shapes stay tiny: the Triton kernels run in the interpreter here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _compare import (
    LargestTensor,
    assert_deterministic,
    assert_float32_and_unchanged_under_autocast,
    check_against_reference,
)
from conftest import DTYPES, TOL, backends_with_torch, device_backends, triton_backends
from conftest import feature as conftest_feature
from torch.utils._python_dispatch import TorchDispatchMode

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.kernels import masked_mse as kernels
from kdfast.numerics import masked_mse as masked_mse_numerics
from kdfast.reference import masked_mse as ref

FUSED = device_backends("masked_mse")
TRITON = triton_backends("masked_mse")
WITH_TORCH = backends_with_torch("masked_mse")
REDUCTIONS = masked_mse_numerics.REDUCTIONS
SHAPE = (3, 5, 4, 3)  # odd B, C, H, W


def feature(shape=SHAPE, **kwargs):
    return conftest_feature(shape, **kwargs)


def spatial_mask(shape=SHAPE, kind="soft", dtype=torch.float32, device="cpu", keepdim=True, seed=100):
    """A (B, 1, H, W) (keepdim) or (B, H, W) mask: "soft" in [0, 1), "binary" 0/1, "bool"."""
    b, _, h, w = shape
    m = torch.rand((b, 1, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind != "soft":
        m = m > 0.5
    m = m.to(torch.bool if kind == "bool" else dtype).to(device)
    return m if keepdim else m[:, 0]


def check(backend, x, y, mask, reduction, loss_tol, grad_tol, upstream=1.0, floor=1e-30):
    """The loss and the gradients of x and y (those that require grad) against the float64 reference
    on the same (rounded) inputs."""
    loss, grads = check_against_reference(
        lambda x, y, m: F.masked_mse(x, y, m, reduction, backend=backend),
        lambda x, y, m: ref.masked_mse(x, y, m.double(), reduction),
        (x, y, mask),
        loss_tol,
        grad_tol,
        wrt=[i for i, t in enumerate((x, y)) if t.requires_grad],
        upstream=upstream,
        dtype=ref.loss_dtype(x, y),
        floor=floor,
    )
    assert loss.shape == ()
    return loss, grads


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(device, backend, dtype, reduction):
    x = feature(dtype=dtype, device=device, requires_grad=True, seed=1)
    y = feature(dtype=dtype, device=device, requires_grad=True, seed=2)
    check(backend, x, y, spatial_mask(dtype=dtype, device=device), reduction, *TOL[dtype], upstream=-2.5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize(
    "kind,mask_dtype,keepdim",
    [
        ("soft", torch.float32, False),
        ("binary", torch.float32, True),
        ("binary", torch.float16, False),
        ("bool", None, True),
        ("soft", torch.float64, True),
        ("soft", torch.bfloat16, False),
    ],
)
def test_masks(device, backend, kind, mask_dtype, keepdim):
    """(B, 1, H, W) and (B, H, W), soft, binary and bool masks, of another dtype than the maps."""
    x = feature(device=device, requires_grad=True, seed=3)
    y = feature(device=device, requires_grad=True, seed=4)
    mask = spatial_mask(kind=kind, dtype=mask_dtype, device=device, keepdim=keepdim)
    for reduction in REDUCTIONS:
        check(backend, x, y, mask, reduction, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_strided_and_expanded_masks(device, backend):
    """Masks read in place with their own strides: a slice, a transposed view, a batch-expanded one."""
    x = feature(device=device, requires_grad=True, seed=5)
    y = feature(device=device, seed=6)
    b, _, h, w = SHAPE
    wide = torch.rand((b, 2, h, 2 * w), generator=torch.Generator().manual_seed(7)).to(device)
    tall = torch.rand((b, w, h), generator=torch.Generator().manual_seed(8)).to(device)
    single = torch.rand((1, h, w), generator=torch.Generator().manual_seed(9)).to(device)
    for mask in (wide[:, 1:, :, ::2], tall.transpose(1, 2), single.expand(b, h, w)):
        check(backend, x, y, mask, "masked_mean", 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "channel_slice", "transposed"])
def test_layouts(device, backend, layout):
    """Read in place (contiguous, channels_last, mixed, a channel slice) or through a copy (h and w
    transposed do not flatten); the gradients come back in the inputs' layouts when dense."""
    x = feature(device=device, channels_last=layout != "transposed", seed=10)
    y = feature(device=device, channels_last=layout == "channels_last", seed=11)
    if layout == "channel_slice":
        x = feature((3, 9, 4, 3), device=device, seed=12)[:, 2:7]
    if layout == "transposed":
        x = feature((3, 5, 3, 4), device=device, seed=13).transpose(2, 3)
    x.requires_grad_()
    y.requires_grad_()
    _, (gx, gy) = check(backend, x, y, spatial_mask(device=device), "mean", 2e-5, 2e-5, upstream=0.5)
    if layout in ("channels_last", "mixed") and backend != "torch":
        assert gx.is_contiguous(memory_format=torch.channels_last)
        assert gy.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 5), (2, 1, 3, 1), (4, 33, 5, 7)], ids=str)
def test_shapes(device, backend, shape):
    x = feature(shape, device=device, requires_grad=True, seed=14)
    y = feature(shape, device=device, requires_grad=True, seed=15)
    for reduction in REDUCTIONS:
        check(backend, x, y, spatial_mask(shape, device=device, keepdim=False), reduction, 2e-5, 2e-5)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("channels_last", [False, True])
def test_several_tiles_and_channel_splits(device, backend, channels_last, monkeypatch):
    """Positions over several tiles and channels split over several programs (as on a GPU that
    wants more programs than a small map gives): the partial sums still add up."""
    # more channels than a tile holds; channels_last tiles are 128 channels x 16 positions
    shape = (2, 160, 3, 11) if channels_last else (2, 40, 13, 11)
    x = feature(shape, device=device, channels_last=channels_last, requires_grad=True, seed=16)
    y = feature(shape, device=device, requires_grad=True, seed=17)
    monkeypatch.setattr(kernels, "_min_programs", lambda device: 10_000)
    plan, grid = kernels._plan(x.detach())
    assert plan.hw_blocks > 1 and plan.c_splits > 1
    for reduction in REDUCTIONS:
        check(backend, x, y, spatial_mask(shape, device=device), reduction, 2e-5, 2e-5, upstream=3.0)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_zero_mask(device, backend, reduction):
    """A zero mask gives loss 0 and zero gradients; "masked_mean" divides by nothing (loss 0)."""
    x = feature(device=device, requires_grad=True, seed=18)
    y = feature(device=device, requires_grad=True, seed=19)
    loss = F.masked_mse(x, y, torch.zeros(3, 1, 4, 3, device=device), reduction, backend=backend)
    gx, gy = torch.autograd.grad(loss, (x, y))
    assert loss.item() == 0.0
    assert not gx.any() and not gy.any()


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_gradients_only_where_needed(device, backend):
    """x alone, y alone (a teacher branch: y is a trainable function of the teacher's features), both."""
    mask = spatial_mask(device=device, seed=20)
    for needs in ((True, False), (False, True), (True, True)):
        x = feature(device=device, requires_grad=needs[0], seed=21)
        y = feature(device=device, requires_grad=needs[1], seed=22)
        check(backend, x, y, mask, "sum", 2e-5, 2e-5)
        F.masked_mse(x, y, mask, backend=backend).backward()
        assert (x.grad is not None, y.grad is not None) == needs


class Calls(TorchDispatchMode):
    """The ops dispatched while active, with their arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,backend", FUSED)
def test_backward_asks_only_for_needed_gradients(device, backend):
    x = feature(device=device, seed=23)
    y = feature(device=device, requires_grad=True, seed=24)
    loss = F.masked_mse(x, y, spatial_mask(device=device), backend=backend)
    with Calls() as mode:
        loss.backward()
    (args,) = [a for name, a in mode.calls if "masked_mse_backward" in name]
    assert args[-2:] == (False, True)
    assert y.grad is not None and x.grad is None


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_mask_gets_no_gradient(device, backend):
    mask = spatial_mask(device=device, seed=25).requires_grad_()
    x = feature(device=device, requires_grad=True, seed=26)
    F.masked_mse(x, feature(device=device, seed=27), mask, "masked_mean", backend=backend).backward()
    assert mask.grad is None and x.grad is not None


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_inference_mode_inputs(device, backend):
    """A teacher feature and a mask made under torch.inference_mode work and give the same gradient."""
    grads = []
    for inference in (False, True):
        with torch.inference_mode(inference):
            y = feature(device=device, seed=28)
            mask = spatial_mask(device=device, seed=29)
        x = feature(device=device, requires_grad=True, seed=30)
        grads.append(torch.autograd.grad(F.masked_mse(x, y, mask, "masked_mean", backend=backend), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_mixed_dtypes_promote(device, backend):
    x = feature(dtype=torch.bfloat16, device=device, requires_grad=True, seed=31)
    y = feature(dtype=torch.float32, device=device, requires_grad=True, seed=32)
    loss, _ = check(backend, x, y, spatial_mask(device=device), "mean", *TOL[torch.bfloat16])  # x's grad is bf16
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("device,backend", FUSED)
def test_deterministic(device, backend):
    """Bitwise the same loss and gradients on every call, whatever the thread count."""
    shape = (5, 17, 9, 7)
    x = feature(shape, device=device, requires_grad=True, seed=33)
    y = feature(shape, device=device, requires_grad=True, seed=34)
    mask = spatial_mask(shape, device=device)
    assert_deterministic(lambda: F.masked_mse(x, y, mask, "masked_mean", backend=backend), [x, y])


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_gives_nan_loss(device, backend):
    x = feature(device=device, seed=35)
    x[1, 2, 0, 1] = float("nan")
    assert torch.isnan(F.masked_mse(x, feature(device=device, seed=36), spatial_mask(device=device), backend=backend))


def test_reference_formula():
    """The reference equals the formula written out: masked maps, F.mse_loss for "mean"."""
    x, y = feature(dtype=torch.float64, seed=37), feature(dtype=torch.float64, seed=38)
    mask = spatial_mask(dtype=torch.float64)
    masked = mask * (x - y)
    torch.testing.assert_close(ref.masked_mse(x, y, mask, "mean"), torch.nn.functional.mse_loss(mask * x, mask * y))
    torch.testing.assert_close(ref.masked_mse(x, y, mask, "sum"), masked.pow(2).sum())
    torch.testing.assert_close(
        ref.masked_mse(x, y, mask[:, 0], "masked_mean"), masked.pow(2).sum() / (x.shape[1] * mask.pow(2).sum())
    )


def test_module_matches_functional():
    x, y, mask = feature(seed=39), feature(seed=40), spatial_mask()
    module = knn.MaskedMSELoss("masked_mean", backend="torch")
    assert module(x, y, mask).item() == pytest.approx(F.masked_mse(x, y, mask, "masked_mean", backend="torch").item())
    assert "reduction='masked_mean', backend='torch'" in repr(module)


# --- fused ops: memory, gradcheck, opcheck, torch.compile, autocast


@pytest.mark.parametrize("device,backend", TRITON)
def test_forward_allocates_no_map(device, backend):
    """The forward launcher never expands the mask nor stores a (B, C, H, W) difference: only the
    (programs, 2) partial sums and two scalars; the reference, for contrast, builds several maps."""
    shape = (2, 16, 6, 6)
    x, y = feature(shape, device=device, seed=41), feature(shape, device=device, seed=42)
    mask = spatial_mask(shape, device=device)
    with LargestTensor() as mode:
        kernels.masked_mse_forward(x, y, mask[:, 0], "mean")
    assert mode.largest < x.numel() * 4 // 8
    with LargestTensor() as mode:
        ref.masked_mse(x, y, mask)
    assert mode.largest == x.numel() * 4


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_float32_and_unchanged_under_autocast(device, backend):
    x, y, mask = feature(device=device, seed=49), feature(device=device, seed=50), spatial_mask(device=device)
    assert_float32_and_unchanged_under_autocast(lambda: F.masked_mse(x, y, mask, backend=backend), device)


@pytest.mark.parametrize("device,backend", TRITON)
def test_launcher_checks(device, backend):
    x = feature(device=device)
    mask = spatial_mask(device=device, keepdim=False)
    with pytest.raises(ValueError, match="reduction must be"):
        kernels.masked_mse_forward(x, x, mask, "max")
    with pytest.raises(ValueError, match="mask must be"):
        kernels.masked_mse_forward(x, x, mask[:, None], "mean")
    with pytest.raises(TypeError, match="share one floating dtype"):
        kernels.masked_mse_forward(x, x.double(), mask, "mean")
    _, scale = kernels.masked_mse_forward(x, x, mask, "mean")
    with pytest.raises(ValueError, match="scale must be"):
        kernels.masked_mse_backward(torch.ones((), device=device), x, x, mask, scale.double(), True, True)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "cpu"])
def test_cpp_checks(device, backend):
    x = feature(device=device)
    mask = spatial_mask(device=device, keepdim=False)
    with pytest.raises(RuntimeError, match="reduction must be"):
        torch.ops.kdfast.masked_mse_forward(x, x, mask, "max")
    with pytest.raises(RuntimeError, match="mask must be"):
        torch.ops.kdfast.masked_mse_forward(x, x, mask[:, None], "mean")
    with pytest.raises(RuntimeError, match="share one floating dtype"):
        torch.ops.kdfast.masked_mse_forward(x, x.double(), mask, "mean")
    _, scale = torch.ops.kdfast.masked_mse_forward(x, x, mask, "mean")
    with pytest.raises(RuntimeError, match="scale must"):
        torch.ops.kdfast.masked_mse_backward(torch.ones(()), x, x, mask, scale.double(), True, True)


# --- bad input


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.randn(2, 3, 4)), ValueError, "x must be 4-D"),
        (dict(y=torch.randn(2, 3, 4, 4)), ValueError, "x and y must have one shape"),
        (dict(y=torch.ones(2, 3, 4, 5, dtype=torch.int32)), TypeError, "y must be float16"),
        (dict(mask=[[1.0]]), TypeError, "mask must be a torch.Tensor"),
        (dict(mask=torch.ones(2, 4, 5, dtype=torch.int64)), TypeError, "mask must be float16"),
        (dict(mask=torch.ones(2, 3, 4, 5)), ValueError, r"mask must be \(B, 1, H, W\)"),
        (dict(mask=torch.ones(1, 4, 5)), ValueError, r"mask must be \(B, 1, H, W\)"),
        (dict(mask=torch.ones(2, 4, 5, device="meta")), ValueError, "one device"),
        (dict(x=torch.randn(0, 3, 4, 5), y=torch.randn(0, 3, 4, 5)), ValueError, "x is empty"),
        (dict(reduction="none"), ValueError, "reduction must be one of"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
    ],
)
def test_bad_input(change, error, match):
    args: dict[str, Any] = dict(x=torch.randn(2, 3, 4, 5), y=torch.randn(2, 3, 4, 5), mask=torch.rand(2, 1, 4, 5))
    args.update(change)
    with pytest.raises(error, match=match):
        F.masked_mse(**args)
