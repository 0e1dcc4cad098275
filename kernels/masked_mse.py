"""Triton kernels of SoKD's masked feature loss; formulas in kdfast/reference/masked_mse.py, op
contract in kdfast/ops/masked_mse.py.

With ``x``, ``y`` (B, C, H, W) read as (B, C, HW) and the mask ``m`` (B, H, W) read as (B, HW):

* :func:`masked_mse_forward` -> ``(loss, scale)``: ``loss = scale * sum_{b,c,hw} m^2 (x - y)^2``,
  ``scale = 1 / denom`` (0 for a zero "masked_mean" denominator).
* :func:`masked_mse_backward` -> ``(grad_x, grad_y)``: ``grad_x = k m^2 (x - y)``,
  ``grad_y = -grad_x``, ``k = 2 * grad_loss * scale``, both written by one launch (each only
  when asked for).

Launch design. A program owns a [BLOCK_C, BLOCK_HW] tile column: one sample b, BLOCK_HW
positions and a range of channels that it walks BLOCK_C at a time. It reads the mask of its
positions once (its own strides: never expanded over the channels) and, in the forward, sums
``(x - y)^2`` over its channels per position before weighting by ``m^2``. Each forward program
writes its two partial sums ``[sum m^2 (x - y)^2, sum m^2]`` (the latter from the first channel
range of its positions only), and one single-program launch adds them in program order and
applies the reduction: deterministic, no atomics. The channels of a sample are split over
several programs only while the launch has fewer programs than the device wants (small late-stage
maps such as 8x8); the split never depends on the values.

Layout. x, y and the gradients are read and written with their own strides (contiguous,
channels_last, channel slices: any tensor whose h and w flatten into one strided dim; the
launchers copy any other to contiguous first). Triton specialises an integer argument equal to 1
as a constant, so the unit stride (hw for contiguous, c for channels_last) is known to the
compiler and the loads along it vectorise; the tile's unit-stride block follows x's layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common

REDUCTIONS = ("mean", "masked_mean", "sum")  # the REDUCTION constexpr is the index
_PROGRAMS_PER_SM = 4  # channels are split until a launch has this many programs per SM
_UNIT_BLOCK_MAX = 128  # the unit-stride block of a tile, at most (512 bytes of float32)
_TILE = 2048  # elements of a [BLOCK_C, BLOCK_HW] tile, at most (16 per thread at 4 warps)
_NUM_WARPS = 4
# The backward's tiles on 8 warps (8 elements a thread): on 4 warps ptxas spilled 4 bytes at 40
# registers (sm_80, bfloat16 channels_last) to fit more programs per SM; on 8 warps every
# specialisation takes 14-48 registers (sm_90 and sm_80, triton 3.6 and 3.8), no spills, at least
# as many warps resident per SM as before (measured with benchmarks/triton_compile.py).
_BACKWARD_WARPS = 8
_FINISH_BLOCK = 1024  # the finishing program sums the partials this many at a time
_MAX_OFFSET = 2**31 - 1  # element offsets inside one sample are 32-bit


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _column(tiles, mask, ACC: tl.constexpr, BLOCK_HW: tl.constexpr):
    """This program's tile column and its mask values. ``tiles`` = (C, HW, hw_blocks, c_splits,
    c_per_program), ``mask`` a (pointer, b stride, hw stride) view. Program ``pid`` owns
    sample ``b``, positions ``offs_hw`` (``hw_ok``: inside HW) and channels ``[c_start, c_end)``
    of its channel split; returns (b (int64), split, c_start, c_end, offs_hw, hw_ok, m[b, offs_hw]
    in ACC, 0 outside)."""
    channels, hw, hw_blocks, c_splits, c_per_program = tiles
    m_ptr, smb, smhw = mask
    pid = tl.program_id(0)
    split = pid % c_splits
    rest = pid // c_splits
    b = rest // hw_blocks
    offs_hw = (rest % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_start = split * c_per_program
    c_end = tl.minimum(c_start + c_per_program, channels)
    b = b.to(tl.int64)
    hw_ok = offs_hw < hw
    m = tl.load(m_ptr + b * smb + offs_hw * smhw, mask=hw_ok, other=0.0).to(ACC)
    return b, split, c_start, c_end, offs_hw, hw_ok, m


@triton.jit
def _sample(view, b):
    """Sample ``b`` of a (pointer, b, c, hw strides) view: (its first element, c stride, hw stride)."""
    ptr, stride_b, stride_c, stride_hw = view
    return ptr + b * stride_b, stride_c, stride_hw


@triton.jit
def _tile(sample, offs_c, offs_hw):
    """Pointers of the [BLOCK_C, BLOCK_HW] tile (offs_c, offs_hw) of a :func:`_sample`."""
    base, stride_c, stride_hw = sample
    return base + offs_c[:, None] * stride_c + offs_hw[None, :] * stride_hw


@triton.jit
def _difference(x, y, offs_c, offs_hw, tile_ok, ACC: tl.constexpr):
    """``x - y`` of two :func:`_sample` on a tile in ACC (0 outside ``tile_ok``)."""
    xv = tl.load(_tile(x, offs_c, offs_hw), mask=tile_ok, other=0.0).to(ACC)
    yv = tl.load(_tile(y, offs_c, offs_hw), mask=tile_ok, other=0.0).to(ACC)
    return xv - yv


# ----------------------------------------------------------------------------- kernels
#
# A (B, C, HW) tensor is passed as one tuple argument, its view (pointer, strides b, c, hw), the
# mask as (pointer, strides b, hw); ``tiles`` is :attr:`_Plan.tiles`.


@triton.jit
def _masked_mse_forward_kernel(
    x,
    y,
    mask,
    partials,
    tiles,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """partials[pid] = [sum over the tile column of m^2 (x - y)^2, sum of m^2 (first split only)]."""
    b, split, c_start, c_end, offs_hw, hw_ok, m = _column(tiles, mask, ACC, BLOCK_HW)
    x = _sample(x, b)
    y = _sample(y, b)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        d = _difference(x, y, offs_c, offs_hw, (offs_c < c_end)[:, None] & hw_ok[None, :], ACC)
        acc += d * d
    w = m * m
    out = partials + tl.program_id(0) * 2
    tl.store(out, tl.sum(tl.sum(acc, axis=0) * w, axis=0))
    tl.store(out + 1, tl.where(split == 0, tl.sum(w, axis=0), 0.0))


@triton.jit(do_not_specialize=["numel", "channels"])  # converted to ACC: never constexprs
def _masked_mse_finish_kernel(
    partials, n_partials, loss, scale, numel, channels, ACC: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr
):
    """loss = scale * sum of the partials' first column; scale = 1 / denom of the reduction."""
    sq = tl.zeros([BLOCK], ACC)
    m2 = tl.zeros([BLOCK], ACC)
    for i in range(0, n_partials, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        ok = offs < n_partials
        sq += tl.load(partials + offs * 2, mask=ok, other=0.0)
        m2 += tl.load(partials + offs * 2 + 1, mask=ok, other=0.0)
    total = tl.sum(sq, axis=0)
    if REDUCTION == 0:  # mean
        s = 1.0 / numel.to(ACC)
    elif REDUCTION == 1:  # masked_mean: 0 where C * sum m^2 is 0
        denom = channels.to(ACC) * tl.sum(m2, axis=0)
        positive = denom > 0
        s = tl.where(positive, 1.0 / tl.where(positive, denom, 1.0), 0.0)
    else:  # sum
        s = tl.full([], 1.0, ACC)
    tl.store(loss, total * s)
    tl.store(scale, s)


@triton.jit
def _masked_mse_backward_kernel(
    grad_loss,
    scale,
    x,
    y,
    mask,
    gx,
    gy,
    tiles,
    ACC: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """gx = k m^2 (x - y), gy = -gx on the program's tile column, k = 2 grad_loss scale."""
    b, _, c_start, c_end, offs_hw, hw_ok, m = _column(tiles, mask, ACC, BLOCK_HW)
    k = 2.0 * tl.load(grad_loss).to(ACC) * tl.load(scale)
    w = (k * m * m)[None, :]
    x = _sample(x, b)
    y = _sample(y, b)
    gx = _sample(gx, b)
    gy = _sample(gy, b)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tile_ok = (offs_c < c_end)[:, None] & hw_ok[None, :]
        g = w * _difference(x, y, offs_c, offs_hw, tile_ok, ACC)
        if NEED_X:
            tl.store(_tile(gx, offs_c, offs_hw), g.to(gx[0].dtype.element_ty), mask=tile_ok)
        if NEED_Y:
            tl.store(_tile(gy, offs_c, offs_hw), (-g).to(gy[0].dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------- host helpers


def hw_flattenable(t: Tensor) -> bool:
    """Whether the last two dims of ``t`` flatten into one strided dim."""
    h, w = t.shape[-2:]
    return h == 1 or w == 1 or t.stride(-2) == w * t.stride(-1)


def launch_view(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy where its h and w do not flatten (the layout the kernels read)."""
    return t if hw_flattenable(t) else t.contiguous()


def grad_buffer(x: Tensor, needed: bool) -> Tensor:
    """The gradient of ``x`` (or ``y``) as the backward returns it: ``empty_like`` of its launch
    view (same strides for a dense tensor), or an empty (0,) tensor where it is not asked for."""
    return torch.empty_like(launch_view(x)) if needed else x.new_empty((0,))


def _strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, channel, hw) strides of a flattenable (B, C, H, W) tensor; 0 for a dim of size 1."""
    b, c, h, w = t.shape
    hw_stride = t.stride(2) if w == 1 else t.stride(3)
    return (t.stride(0) if b > 1 else 0, t.stride(1) if c > 1 else 0, hw_stride if h * w > 1 else 0)


def _view(t: Tensor) -> tuple:
    """The kernel argument of a flattenable (B, C, H, W) tensor: (t, batch, channel, hw strides)."""
    return (t, *_strides(t))


def _mask_view(m: Tensor) -> tuple:
    """The kernel argument of a flattenable (B, H, W) mask: (m, batch, hw strides), 0 for a dim of size 1."""
    b, h, w = m.shape
    hw_stride = m.stride(1) if w == 1 else m.stride(2)
    return m, m.stride(0) if b > 1 else 0, hw_stride if h * w > 1 else 0


class _Plan(NamedTuple):
    """The tiles of one (B, C, HW) launch, shared by the forward and the backward."""

    channels: int
    hw: int
    block_c: int
    block_hw: int
    hw_blocks: int
    c_splits: int
    c_per_program: int

    @property
    def tiles(self) -> tuple[int, int, int, int, int]:
        """The kernels' ``tiles`` argument: (C, HW, hw_blocks, c_splits, c_per_program)."""
        return self.channels, self.hw, self.hw_blocks, self.c_splits, self.c_per_program


def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: _PROGRAMS_PER_SM per SM (1 off CUDA)."""
    return _PROGRAMS_PER_SM * _common.sm_count(device) if device.type == "cuda" else 1


def _plan(x: Tensor) -> tuple[_Plan, int]:
    """Tiles whose unit-stride block follows x's layout, and the grid: channels split in halves
    while the launch has fewer programs than :func:`_min_programs` and a split keeps a block."""
    batch, channels, h, w = x.shape
    hw = h * w
    _, stride_c, stride_hw = _strides(x)
    channels_last = stride_c == 1 and stride_hw != 1
    unit, other = (channels, hw) if channels_last else (hw, channels)
    unit_block = min(triton.next_power_of_2(unit), _UNIT_BLOCK_MAX)
    other_block = min(triton.next_power_of_2(other), _TILE // unit_block)
    block_c, block_hw = (unit_block, other_block) if channels_last else (other_block, unit_block)
    hw_blocks = triton.cdiv(hw, block_hw)
    c_blocks = triton.cdiv(channels, block_c)
    splits = 1
    while batch * hw_blocks * splits < _min_programs(x.device) and splits * 2 <= c_blocks:
        splits *= 2
    c_per_program = block_c * triton.cdiv(c_blocks, splits)
    c_splits = triton.cdiv(channels, c_per_program)
    return _Plan(channels, hw, block_c, block_hw, hw_blocks, c_splits, c_per_program), batch * hw_blocks * c_splits


def _check(name: str, x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The checked inputs in their launch views."""
    if x.dim() != 4 or y.shape != x.shape or x.numel() == 0:
        raise ValueError(
            f"{name}: x and y must be non-empty (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if mask.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"{name}: mask must be (B, H, W) = {(x.shape[0], *x.shape[2:])}, got {tuple(mask.shape)}")
    if x.dtype not in _common.TL_DTYPES or y.dtype != x.dtype or mask.dtype not in _common.TL_DTYPES:
        raise TypeError(
            f"{name}: x and y must share one floating dtype and mask be floating, got {x.dtype}, {y.dtype} and {mask.dtype}"
        )
    if y.device != x.device or mask.device != x.device:
        raise ValueError(f"{name}: x, y and mask must be on one device")
    views = launch_view(x), launch_view(y), launch_view(mask)
    for t in views[:2]:
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
        if extent > _MAX_OFFSET:
            raise ValueError(f"{name}: a sample spans more than 2^31 elements")
    return views


def _reduction(name: str, reduction: str) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return REDUCTIONS.index(reduction)


# ----------------------------------------------------------------------------- launchers


def masked_mse_forward(x: Tensor, y: Tensor, mask: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """``(loss, scale)``, both 0-d in float32 (float64 for float64 x): ``loss = scale * sum m^2
    (x - y)^2`` over (b, c, hw), ``scale = 1 / denom`` of ``reduction`` ("mean": B C H W,
    "masked_mean": C sum m^2 or scale 0 where that is 0, "sum": 1). ``x``, ``y`` (B, C, H, W) of one
    floating dtype, ``mask`` (B, H, W) of any floating dtype, all any strides. Two launches: the
    tiles, then one program adding their partial sums in order."""
    name = "masked_mse_forward"
    code = _reduction(name, reduction)
    x, y, mask = _check(name, x, y, mask)
    acc = _common.acc_dtype(x.dtype)
    plan, grid = _plan(x)
    partials = torch.empty((grid, 2), dtype=acc, device=x.device)
    loss = torch.empty((), dtype=acc, device=x.device)
    scale = torch.empty((), dtype=acc, device=x.device)
    tl_acc = _common.TL_DTYPES[acc]
    with _common.on_device(x.device):
        _masked_mse_forward_kernel[(grid,)](
            _view(x),
            _view(y),
            _mask_view(mask),
            partials,
            plan.tiles,
            ACC=tl_acc,
            BLOCK_C=plan.block_c,
            BLOCK_HW=plan.block_hw,
            num_warps=_NUM_WARPS,
        )
        _masked_mse_finish_kernel[(1,)](
            partials,
            grid,
            loss,
            scale,
            x.numel(),
            plan.channels,
            ACC=tl_acc,
            REDUCTION=code,
            BLOCK=min(triton.next_power_of_2(grid), _FINISH_BLOCK),
            num_warps=_NUM_WARPS,
        )
    return loss, scale


def masked_mse_backward(
    grad_loss: Tensor, x: Tensor, y: Tensor, mask: Tensor, scale: Tensor, x_grad: bool, y_grad: bool
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_y)`` of ``grad_loss * loss``: ``grad_x = 2 grad_loss scale m^2 (x - y)``,
    ``grad_y = -grad_x``, in x's dtype, from one launch: ``grad_buffer(x, x_grad)`` and
    ``grad_buffer(y, y_grad)`` (an empty (0,) tensor where the flag is False). ``grad_loss``: 0-d,
    any floating dtype, read on the device; ``scale``: the forward's."""
    name = "masked_mse_backward"
    x, y, mask = _check(name, x, y, mask)
    acc = _common.acc_dtype(x.dtype)
    for label, t, dtypes in (("grad_loss", grad_loss, tuple(_common.TL_DTYPES)), ("scale", scale, (acc,))):
        if t.shape != () or t.device != x.device or t.dtype not in dtypes:
            raise ValueError(
                f"{name}: {label} must be 0-d, one of {[str(d) for d in dtypes]}, on {x.device}; "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    grad_x, grad_y = grad_buffer(x, x_grad), grad_buffer(y, y_grad)
    if not (x_grad or y_grad):
        return grad_x, grad_y
    plan, grid = _plan(x)
    out_x, out_y = grad_x if x_grad else x, grad_y if y_grad else y  # an unused output: never written
    with _common.on_device(x.device):
        _masked_mse_backward_kernel[(grid,)](
            grad_loss,
            scale,
            _view(x),
            _view(y),
            _mask_view(mask),
            _view(out_x),
            _view(out_y),
            plan.tiles,
            ACC=_common.TL_DTYPES[acc],
            NEED_X=x_grad,
            NEED_Y=y_grad,
            BLOCK_C=plan.block_c,
            BLOCK_HW=plan.block_hw,
            num_warps=_BACKWARD_WARPS,
        )
    return grad_x, grad_y
