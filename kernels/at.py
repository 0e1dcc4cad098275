"""Triton kernels of the attention-transfer (AT) op family; formulas in kdfast/reference/at.py.

A feature map ``f`` (B, C, H, W) is read as (B, C, HW). With ``g(x) = |x|^p`` (``x^p``, keeping
the sign, when mode == "mean" and p is an odd integer) and ``scale = 1/C`` ("mean") or 1 ("sum"):

* :func:`at_maps`:           ``m[b, hw] = scale * sum_c g(f[b, c, hw])``
* :func:`at_maps_backward`:  ``df[b, c, hw] = dm[b, hw] * scale * g'(f[b, c, hw])``, where
  ``g'(x) = p |x|^(p-1)``, times ``sign(x)`` unless odd-signed; ``|x|^0 = 1``, ``sign(0) = 0``.
* :func:`at_map_loss`:       per (stage, sample), with ``u = m / n``, ``n = max(||m||_2, 1e-12)``:
  ``mse = sum_hw (u_s - u_t)^2 / (B * HW)`` or ``l2 = ||u_s - u_t||_2 / B``, and
  ``d loss / d m_s = k / n_s * ((u_s - u_t) - u_s * <u_s, u_s - u_t>)``, where
  ``d loss / d u_s = k (u_s - u_t)``: ``k = 2 / (B * HW)`` (mse) or ``1 / (B * l2)`` (l2; 0 where
  l2 == 0), and the projection term ``<u_s, .>`` is dropped where ``||m_s|| < 1e-12`` (clamped).

The semantics match csrc/cpu/at.cpp exactly (powers, signs, 0^0, the eps clamp, output dtypes).
Accumulation is in float32 (float64 for float64 inputs); maps are float32 (float64).

Launch design. Every launcher covers all stages in ONE kernel launch. It builds a small int64
table, one row per stage (shapes, data pointers, strides, first program id), on the tensors'
device (pinned host memory + non-blocking copy on CUDA: no host sync). A program scans the rows'
first program ids (a static loop over the constexpr number of stages) to find its stage and
turns the row's integers into typed pointers with ``.to(tl.pointer_type(...))``.

The map kernels tile a (stage, sample, hw block) as [BLOCK_C, BLOCK_HW] and reduce over the
channels inside the program (deterministic, no atomics). The memory layout is a constexpr: for
contiguous tensors hw has the literal unit stride, for channels_last c has; a tensor of the other
layout is converted first. Since the row's pointers, strides and extents are runtime values, the
launcher proves their common power-of-two divisibility (ALIGN) and the kernel restates it with
``tl.multiple_of``, so loads along the unit axis vectorize on the GPU.
"""

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels._common import TL_DTYPES as _TL_DTYPES, acc_dtype as _acc_dtype, on_device as _on_device

_EPS = tl.constexpr(1e-12)  # normalize(v) = v / max(||v||_2, eps), as F.normalize

# Integer powers up to this one are computed with exact products, larger or real ones as
# exp2(p * log2|x|) (no libdevice pow: it does not run in the Triton interpreter).
_MAX_INT_POWER = 8

# Block sizes of the map kernels (one config: multi-config autotuning breaks the interpreter).
# The unit-stride block (BLOCK_HW for contiguous, BLOCK_C for channels_last) fits the smallest
# stage, clamped to [32, 128] elements: rows are read in 128-byte (float32) segments, yet small
# late-stage maps (8x8) mask little. The other block fills a _TILE-element tile (16 elements per
# thread at 4 warps). Then BLOCK_HW is halved (down to 32 for contiguous, 1 for channels_last)
# until the launch has _PROGRAMS_PER_SM programs per SM, so that a small late-stage map still fills
# the GPU: 8x8x256 at B=64 on an H100 runs as 128 programs of 256x32 elements (contiguous) or
# 1024 programs of 256x4 (channels_last) instead of 64 of 256x64. Table rows are ordered by
# decreasing C, so the longest programs start first.
_UNIT_BLOCK_MIN = 32
_UNIT_BLOCK_MAX = 128
_TILE = 2048
_PROGRAMS_PER_SM = 4
_MAX_ALIGN = 16  # elements; the divisibility Triton itself assumes for its integer arguments
_NUM_WARPS = 4
_LOSS_BLOCK_MAX = 1024  # the loss kernel streams each (B, HW) row in blocks of up to this many

# Columns of a map-kernel table row. A tensor is described by 3 columns: its data pointer, its
# batch stride and its stride along the non-unit axis (c for contiguous, hw for channels_last),
# a stride being stored as 0 where its dim has size 1 (so it is divisible by anything).
_FIRST = tl.constexpr(0)  # first program id of the stage
_CHANNELS = tl.constexpr(1)
_HW = tl.constexpr(2)
_X = tl.constexpr(3)  # the feature map
_MAP = tl.constexpr(6)  # the (B, HW) map: output of at_maps, input of at_maps_backward
_Y = tl.constexpr(7)  # the feature gradient (at_maps_backward only)
_ROW = tl.constexpr(10)

# Columns of a loss-kernel table row.
_MS = tl.constexpr(0)
_MT = tl.constexpr(1)
_GRAD = tl.constexpr(2)
_LEN = tl.constexpr(3)
_LOSS_ROW = tl.constexpr(4)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _sign(x):
    """sign(x) in x's dtype: -1, 0 or 1 (0 for 0 and NaN)."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _abs_pow(ax, P: tl.constexpr, INT_P: tl.constexpr):
    """``ax ** P`` for ``ax = |x|``: INT_P >= 0 marks an integer P == INT_P, computed as exact
    products (so ``0 ** 0 = 1``); otherwise ``exp2(P * log2(ax))`` with ``0 ** P = 0``."""
    if INT_P >= 0:
        r = tl.full(ax.shape, 1.0, ax.dtype)
        for _ in tl.static_range(INT_P):
            r = r * ax
    else:
        zero = ax == 0  # log2 of 1 there, not of 0: no -inf (nor interpreter warnings)
        r = tl.where(zero, 0.0, tl.exp2(P * tl.log2(tl.where(zero, 1.0, ax))))
    return r


@triton.jit
def _g(x, P: tl.constexpr, INT_P: tl.constexpr, ODD_SIGNED: tl.constexpr):
    """g(x) = |x|^p, or sign(x) |x|^p when ODD_SIGNED."""
    r = _abs_pow(tl.abs(x), P, INT_P)
    if ODD_SIGNED:
        r = _sign(x) * r
    return r


@triton.jit
def _g_grad(x, P: tl.constexpr, INT_P: tl.constexpr, ODD_SIGNED: tl.constexpr):
    """g'(x) = p |x|^(p-1), times sign(x) unless ODD_SIGNED."""
    r = P * _abs_pow(tl.abs(x), P - 1, INT_P - 1)
    if not ODD_SIGNED:
        r = _sign(x) * r
    return r


@triton.jit
def _sqrt(x):
    """Correctly rounded sqrt (tl.sqrt is approximate in float32)."""
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _locate(meta, N_STAGES: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
            BLOCK_HW: tl.constexpr):
    """This program's table row, sample, hw offsets [BLOCK_HW], channels and hw of its stage."""
    pid = tl.program_id(0)
    stage = 0
    for s in tl.static_range(1, N_STAGES):
        stage += (pid >= tl.load(meta + s * _ROW + _FIRST)).to(tl.int32)
    row = meta + stage * _ROW
    channels = tl.load(row + _CHANNELS).to(tl.int32)
    hw = tl.load(row + _HW).to(tl.int32)
    if CHANNELS_LAST:  # the unit-stride extent bounds the masks of the vector loads
        channels = tl.multiple_of(channels, ALIGN)
    else:
        hw = tl.multiple_of(hw, ALIGN)
    local = pid - tl.load(row + _FIRST).to(tl.int32)
    blocks = tl.cdiv(hw, BLOCK_HW)
    offs_hw = (local % blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return row, local // blocks, offs_hw, channels, hw


@triton.jit
def _sample(row, COL: tl.constexpr, b, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Pointer to sample ``b`` of the tensor described at ``row[COL:COL + 3]``, and its stride
    along the non-unit axis."""
    base = tl.load(row + COL).to(tl.pointer_type(DTYPE))
    base = tl.multiple_of(base, ALIGN * (DTYPE.primitive_bitwidth // 8))  # in bytes
    stride_b = tl.multiple_of(tl.load(row + COL + 1), ALIGN)
    stride = tl.multiple_of(tl.load(row + COL + 2), ALIGN)
    return base + b * stride_b, stride


@triton.jit
def _tile(offs_c, offs_hw, stride, CHANNELS_LAST: tl.constexpr):
    """[BLOCK_C, BLOCK_HW] element offsets; the unit stride is a literal 1."""
    if CHANNELS_LAST:
        offs = offs_c[:, None] + offs_hw[None, :] * stride
    else:
        offs = offs_c[:, None] * stride + offs_hw[None, :]
    return offs


@triton.jit
def _channel_block(c0, channels, hw_mask, BLOCK_C: tl.constexpr):
    """Channel offsets ``c0 + [0, BLOCK_C)`` and the tile's [BLOCK_C, BLOCK_HW] mask."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    return offs_c, (offs_c < channels)[:, None] & hw_mask[None, :]


@triton.jit
def _map_ptr(row, b, hw, ACC: tl.constexpr):
    """Pointer to row ``b`` of the stage's contiguous (B, HW) map."""
    return tl.load(row + _MAP).to(tl.pointer_type(ACC)) + b * hw


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _at_maps_kernel(meta, N_STAGES: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                    P: tl.constexpr, INT_P: tl.constexpr, ODD_SIGNED: tl.constexpr,
                    MEAN: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """m[b, hw] = scale * sum_c g(f[b, c, hw]) for one (stage, sample, hw block)."""
    row, b, offs_hw, channels, hw = _locate(meta, N_STAGES, CHANNELS_LAST, ALIGN, BLOCK_HW)
    x, stride = _sample(row, _X, b, DTYPE, ALIGN)
    hw_mask = offs_hw < hw
    acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for c0 in range(0, channels, BLOCK_C):
        offs_c, mask = _channel_block(c0, channels, hw_mask, BLOCK_C)
        v = tl.load(x + _tile(offs_c, offs_hw, stride, CHANNELS_LAST), mask=mask, other=0.0)
        acc += _g(v.to(ACC), P, INT_P, ODD_SIGNED)  # g(0) = 0 for the masked lanes
    m = tl.sum(acc, axis=0)
    if MEAN:
        m = m * (1.0 / channels.to(ACC))
    tl.store(_map_ptr(row, b, hw, ACC) + offs_hw, m, mask=hw_mask)


@triton.jit
def _at_maps_backward_kernel(meta, N_STAGES: tl.constexpr, DTYPE: tl.constexpr,
                             ACC: tl.constexpr, P: tl.constexpr, INT_P: tl.constexpr,
                             ODD_SIGNED: tl.constexpr, MEAN: tl.constexpr,
                             CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """df[b, c, hw] = dm[b, hw] * scale * g'(f[b, c, hw]) for one (stage, sample, hw block)."""
    row, b, offs_hw, channels, hw = _locate(meta, N_STAGES, CHANNELS_LAST, ALIGN, BLOCK_HW)
    x, x_stride = _sample(row, _X, b, DTYPE, ALIGN)
    y, y_stride = _sample(row, _Y, b, DTYPE, ALIGN)
    hw_mask = offs_hw < hw
    dm = tl.load(_map_ptr(row, b, hw, ACC) + offs_hw, mask=hw_mask, other=0.0)
    if MEAN:
        dm = dm * (1.0 / channels.to(ACC))
    for c0 in range(0, channels, BLOCK_C):
        offs_c, mask = _channel_block(c0, channels, hw_mask, BLOCK_C)
        v = tl.load(x + _tile(offs_c, offs_hw, x_stride, CHANNELS_LAST), mask=mask, other=0.0)
        d = dm[None, :] * _g_grad(v.to(ACC), P, INT_P, ODD_SIGNED)
        tl.store(y + _tile(offs_c, offs_hw, y_stride, CHANNELS_LAST), d.to(DTYPE), mask=mask)


@triton.jit
def _row_block(ms, mt, j, hw, BLOCK: tl.constexpr):
    """Offsets ``j + [0, BLOCK)``, their mask and both maps' values there (0 past hw)."""
    offs = j + tl.arange(0, BLOCK)
    mask = offs < hw
    return offs, mask, tl.load(ms + offs, mask=mask, other=0.0), tl.load(mt + offs, mask=mask, other=0.0)


@triton.jit
def _at_map_loss_kernel(meta, losses, batch, ACC: tl.constexpr, MSE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Loss and d loss / d m_s of one (stage, sample): three passes over HW (the sums ss, tt,
    st; the squared normalised difference; the gradient)."""
    pid = tl.program_id(0)
    row = meta + (pid // batch) * _LOSS_ROW
    hw = tl.load(row + _LEN).to(tl.int32)
    start = (pid % batch).to(tl.int64) * hw
    ms = tl.load(row + _MS).to(tl.pointer_type(ACC)) + start
    mt = tl.load(row + _MT).to(tl.pointer_type(ACC)) + start
    grad = tl.load(row + _GRAD).to(tl.pointer_type(ACC)) + start

    ss = tl.zeros([BLOCK], ACC)
    tt = tl.zeros([BLOCK], ACC)
    st = tl.zeros([BLOCK], ACC)
    for j in range(0, hw, BLOCK):
        _, _, s, t = _row_block(ms, mt, j, hw, BLOCK)
        ss += s * s
        tt += t * t
        st += s * t
    ss = tl.sum(ss, axis=0)
    st = tl.sum(st, axis=0)
    ns = _sqrt(ss)
    nt = _sqrt(tl.sum(tt, axis=0))
    inv_s = 1.0 / tl.where(ns < _EPS, _EPS, ns)  # max(n, eps), NaN propagating as std::max
    inv_t = 1.0 / tl.where(nt < _EPS, _EPS, nt)

    sq = tl.zeros([BLOCK], ACC)
    for j in range(0, hw, BLOCK):
        _, _, s, t = _row_block(ms, mt, j, hw, BLOCK)
        diff = s * inv_s - t * inv_t
        sq += diff * diff
    sq = tl.sum(sq, axis=0)

    if MSE:
        n = (batch * hw.to(tl.int64)).to(ACC)
        tl.store(losses + pid, sq / n)
        k = 2.0 / n  # d loss / d u_s = k * (u_s - u_t)
    else:
        l2 = _sqrt(sq)
        tl.store(losses + pid, l2 / batch)
        positive = l2 > 0  # k = 0 where l2 == 0 (or NaN), without dividing by 0 there
        k = tl.where(positive, 1.0 / (tl.where(positive, l2, 1.0) * batch), 0.0)
    # d u_s / d m_s = (I - u_s u_s^T) / ||m_s|| where the norm is not clamped, I / eps otherwise.
    proj = tl.where(ns >= _EPS, ss * inv_s * inv_s - st * inv_s * inv_t, 0.0)
    for j in range(0, hw, BLOCK):
        offs, mask, s, t = _row_block(ms, mt, j, hw, BLOCK)
        us = s * inv_s
        tl.store(grad + offs, k * inv_s * ((us - t * inv_t) - us * proj), mask=mask)


# ----------------------------------------------------------------------------- host helpers


def _power(p: float, mode: str) -> dict[str, float | int | bool]:
    """The constexprs P, INT_P, ODD_SIGNED and MEAN of g, validated as csrc/common.h does."""
    if mode not in ("mean", "sum"):
        raise ValueError(f"at_maps: mode must be 'mean' or 'sum', got '{mode}'")
    p = float(p)
    if not (math.isfinite(p) and p >= 1.0):
        raise ValueError(f"at_maps: p must be a finite number >= 1, got {p}")
    integer = p.is_integer()
    if mode == "mean" and not integer:
        raise ValueError(f"at_maps: mode 'mean' computes f^p and needs an integer p, got {p}")
    return {
        "P": p,
        "INT_P": int(p) if integer and p <= _MAX_INT_POWER else -1,
        "ODD_SIGNED": mode == "mean" and integer and p % 2 == 1,
        "MEAN": mode == "mean",
    }


def _check_feats(feats: list[Tensor], name: str) -> None:
    """The checks of csrc/common.h check_feature_list, plus the supported dtypes."""
    if len(feats) == 0:
        raise ValueError(f"{name}: expected at least one tensor")
    for f in feats:
        if f.dim() != 4:
            raise ValueError(f"{name}: expected 4-D (B, C, H, W) tensors, got {f.dim()}-D")
        if f.dtype != feats[0].dtype:
            raise ValueError(f"{name}: all tensors must share one dtype")
        if f.device != feats[0].device:
            raise ValueError(f"{name}: all tensors must be on one device")
        if f.numel() == 0:
            raise ValueError(f"{name}: empty tensor of shape {tuple(f.shape)}")
    if feats[0].dtype not in _TL_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {feats[0].dtype}")


def _hw_stride(t: Tensor) -> int:
    """Stride of the flattened hw dim (valid where h and w flatten into one)."""
    return t.stride(2) if t.size(3) == 1 else t.stride(3)


def _fits(t: Tensor, channels_last: bool) -> bool:
    """Whether ``t`` reads as (B, C, HW) with a unit stride along hw (c for channels_last)."""
    b, c, h, w = t.shape
    if not (h == 1 or w == 1 or t.stride(2) == w * t.stride(3)):
        return False
    if channels_last:
        return c == 1 or t.stride(1) == 1
    return h * w == 1 or _hw_stride(t) == 1


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _columns(t: Tensor, channels_last: bool) -> list[int]:
    """A tensor's 3 table columns: data pointer, batch stride, non-unit-axis stride."""
    b, c, h, w = t.shape
    stride, size = (_hw_stride(t), h * w) if channels_last else (t.stride(1), c)
    return [t.data_ptr(), t.stride(0) if b > 1 else 0, stride if size > 1 else 0]


def _alignment(tensors: list[Tensor], channels_last: bool) -> int:
    """ALIGN: the largest power of two (<= _MAX_ALIGN) dividing every data pointer (in elements),
    stride column and unit-axis extent of ``tensors``."""
    g = 0
    for t in tensors:
        ptr, stride_b, stride = _columns(t, channels_last)
        unit_extent = t.size(1) if channels_last else t.size(2) * t.size(3)
        for v in (ptr // t.element_size(), stride_b, stride, unit_extent):
            g = math.gcd(g, v)
    return min(g & -g, _MAX_ALIGN)  # g > 0: data pointers are never 0


@functools.lru_cache(maxsize=None)
def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device (1 off CUDA: the interpreter)."""
    if device.type != "cuda":
        return 1
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _first_programs(feats: list[Tensor], block_hw: int) -> list[int]:
    """First program id of every stage, then the total."""
    first = [0]
    for f in feats:
        first.append(first[-1] + f.size(0) * triton.cdiv(f.size(2) * f.size(3), block_hw))
    return first


def _map_blocks(feats: list[Tensor], channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW); see the comment above _UNIT_BLOCK_MIN."""
    channels = [f.size(1) for f in feats]
    hws = [f.size(2) * f.size(3) for f in feats]
    unit, other = (channels, hws) if channels_last else (hws, channels)
    unit_block = min(max(triton.next_power_of_2(min(unit)), _UNIT_BLOCK_MIN), _UNIT_BLOCK_MAX)
    other_block = min(triton.next_power_of_2(max(other)), _TILE // unit_block)
    block_c, block_hw = (unit_block, other_block) if channels_last else (other_block, unit_block)
    smallest = 1 if channels_last else _UNIT_BLOCK_MIN
    target = _min_programs(feats[0].device)
    while block_hw > smallest and _first_programs(feats, block_hw)[-1] < target:
        block_hw //= 2
    return block_c, block_hw


def _device_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """The int64 table on ``device``, copied from pinned memory without a host sync on CUDA."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


class _MapLaunch(NamedTuple):
    """What the two map kernels share: the feats in the launch layout, grid and constexprs."""

    feats: list[Tensor]
    channels_last: bool
    first: list[int]  # first program id of every stage, then the total
    order: list[int]  # stage of every table row: most channels (longest programs) first
    constexprs: dict[str, object]


def _map_launch(feats: list[Tensor], p: float, mode: str, name: str) -> _MapLaunch:
    """Validates, converts every feat to the layout of the first one, chooses the blocks."""
    _check_feats(feats, name)
    power = _power(p, mode)
    channels_last = not _fits(feats[0], False) and _fits(feats[0], True)
    feats = [f if _fits(f, channels_last) else f.contiguous(memory_format=_memory_format(channels_last))
             for f in feats]
    order = sorted(range(len(feats)), key=lambda s: -feats[s].size(1))
    block_c, block_hw = _map_blocks(feats, channels_last)
    dtype = feats[0].dtype
    constexprs = dict(N_STAGES=len(feats), DTYPE=_TL_DTYPES[dtype], ACC=_TL_DTYPES[_acc_dtype(dtype)],
                      CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw, **power)
    first = _first_programs([feats[s] for s in order], block_hw)
    return _MapLaunch(feats, channels_last, first, order, constexprs)


def _run_maps(kernel: triton.JITFunction, launch: _MapLaunch, maps: list[Tensor],
              grads: list[Tensor] | None = None) -> None:
    """One launch of ``kernel`` over all stages; ``grads`` (launch layout) for the backward."""
    cl = launch.channels_last
    rows = []
    for i, s in enumerate(launch.order):
        f = launch.feats[s]
        y = _columns(grads[s], cl) if grads is not None else [0, 0, 0]
        rows.append([launch.first[i], f.size(1), f.size(2) * f.size(3), *_columns(f, cl),
                     maps[s].data_ptr(), *y])
    align = _alignment(launch.feats + (grads or []), cl)
    device = launch.feats[0].device
    with _on_device(device):
        kernel[(launch.first[-1],)](_device_table(rows, device), ALIGN=align, num_warps=_NUM_WARPS,
                                    **launch.constexprs)


# ----------------------------------------------------------------------------- launchers


def at_maps(feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    """Raw attention maps of all stages in one launch.

    ``m[b, hw] = scale * sum_c g(f[b, c, hw])`` with ``g(x) = |x|^p`` (``x^p`` keeping the sign
    for mode "mean" and odd integer p) and ``scale = 1/C`` ("mean", integer p) or 1 ("sum");
    p >= 1. ``feats``: 4-D (B_i, C_i, H_i, W_i), one floating dtype and device, any strides
    (contiguous and channels_last are read in place). Returns contiguous (B_i, H_i*W_i) maps in
    float32 (float64 for float64 feats).
    """
    launch = _map_launch(feats, p, mode, "at_maps")
    acc = _acc_dtype(feats[0].dtype)
    maps = [torch.empty((f.size(0), f.size(2) * f.size(3)), dtype=acc, device=f.device)
            for f in launch.feats]
    _run_maps(_at_maps_kernel, launch, maps)
    return maps


def at_maps_backward(grad_maps: list[Tensor], feats: list[Tensor], p: float,
                     mode: str) -> list[Tensor]:
    """Gradient of :func:`at_maps` w.r.t. the feats, all stages in one launch.

    ``df[b, c, hw] = dm[b, hw] * scale * g'(f[b, c, hw])``, ``g'(x) = p |x|^(p-1)`` times
    ``sign(x)`` (not for the odd-signed g), with ``|x|^0 = 1`` and ``sign(0) = 0``.
    ``grad_maps[i]``: (B_i, H_i*W_i) in the maps' dtype. Returns ``torch.empty_like(feats[i])``
    filled (same dtype and memory format).
    """
    if len(grad_maps) != len(feats):
        raise ValueError(f"at_maps_backward: {len(grad_maps)} grad_maps for {len(feats)} feats")
    launch = _map_launch(feats, p, mode, "at_maps_backward")
    acc = _acc_dtype(feats[0].dtype)
    for s, (g, f) in enumerate(zip(grad_maps, feats)):
        if g.dim() != 2 or tuple(g.shape) != (f.size(0), f.size(2) * f.size(3)):
            raise ValueError(f"at_maps_backward: grad_maps[{s}] must have shape (B, H*W) of feats[{s}]")
        if g.dtype != acc or g.device != f.device:
            raise ValueError(f"at_maps_backward: grad_maps[{s}] must be {acc} on {f.device}")
    grads = [torch.empty_like(f) for f in feats]
    # The kernel writes the launch layout; a grad of the other layout is filled by a copy.
    bufs = [g if _fits(g, launch.channels_last)
            else torch.empty_like(f, memory_format=_memory_format(launch.channels_last))
            for g, f in zip(grads, launch.feats)]
    _run_maps(_at_maps_backward_kernel, launch, [g.contiguous() for g in grad_maps], bufs)
    for g, buf in zip(grads, bufs):
        if buf is not g:
            g.copy_(buf)
    return grads


def at_map_loss(maps_s: list[Tensor], maps_t: list[Tensor], loss: str) -> tuple[Tensor, list[Tensor]]:
    """Per-sample AT loss of every stage from raw maps, and its gradient w.r.t. ``maps_s``.

    With ``u = m / max(||m||_2, 1e-12)`` per row: ``mse = sum_hw (u_s - u_t)^2 / (B * HW)``,
    ``l2 = ||u_s - u_t||_2 / B`` (gradient 0 where u_s == u_t). ``maps_s[i]``, ``maps_t[i]``:
    (B, HW_i), float32 or float64, one B and dtype for all. Returns the losses (L, B) and the
    gradients (B, HW_i) (contiguous), from one launch of one program per (stage, sample).
    """
    if len(maps_s) == 0 or len(maps_s) != len(maps_t):
        raise ValueError("at_map_loss: expected equally many (>= 1) student and teacher maps")
    if loss not in ("mse", "l2"):
        raise ValueError(f"at_map_loss: loss must be 'mse' or 'l2', got '{loss}'")
    dtype, device = maps_s[0].dtype, maps_s[0].device
    if dtype not in (torch.float32, torch.float64):
        raise ValueError("at_map_loss: maps must be float32 or float64")
    for s, (ms, mt) in enumerate(zip(maps_s, maps_t)):
        # maps_s[0] is known 2-D when a later stage compares its B with it
        if ms.dim() != 2 or ms.shape != mt.shape or ms.size(0) != maps_s[0].size(0) or ms.size(1) == 0:
            raise ValueError(f"at_map_loss: maps_s[{s}] and maps_t[{s}] must both be (B, HW) "
                             "with one B for all")
        if ms.dtype != dtype or mt.dtype != dtype:
            raise ValueError("at_map_loss: maps must share one dtype")
        if ms.device != device or mt.device != device:
            raise ValueError("at_map_loss: maps must be on one device")
    batch = maps_s[0].size(0)
    maps_s = [m.contiguous() for m in maps_s]
    maps_t = [m.contiguous() for m in maps_t]
    grads = [torch.empty_like(m) for m in maps_s]
    losses = torch.empty((len(maps_s), batch), dtype=dtype, device=device)
    if batch > 0:
        rows = [[ms.data_ptr(), mt.data_ptr(), g.data_ptr(), ms.size(1)]
                for ms, mt, g in zip(maps_s, maps_t, grads)]
        block = min(triton.next_power_of_2(max(m.size(1) for m in maps_s)), _LOSS_BLOCK_MAX)
        with _on_device(device):
            _at_map_loss_kernel[(len(maps_s) * batch,)](
                _device_table(rows, device), losses, batch, ACC=_TL_DTYPES[dtype], MSE=loss == "mse",
                BLOCK=block, num_warps=_NUM_WARPS)
    return losses, grads
