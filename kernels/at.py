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

Launch design. Every launcher covers all stages (up to _common.MAX_STAGES; more are chunked) in ONE
kernel launch, and allocates nothing on the host: the stages' tensors and integers (extents,
strides, first program ids) are kernel arguments, tuples indexed by ``tl.static_range`` over
the stages, so a launch captured in a CUDA graph replays with the same arguments. The kernel
body is instantiated once per stage (``if`` the program belongs to the stage), each copy with
the stage's own alignment ``ALIGNS[s]``: the largest power of two (<= 16 elements) that the
launcher proves divides the stage's data pointers, strides and unit-axis extent, restated in the
kernel with ``tl.multiple_of``. A 7x7 stage therefore reads with scalar loads while the 56x56
stage of the same launch reads 16-byte vectors.

The map kernel (the maps, or with ``ys`` their backward) tiles a (stage, sample, hw block) as
[BLOCK_C, BLOCK_HW] and reduces over the channels inside the program (deterministic, no atomics).
The memory layout is a constexpr: for contiguous tensors hw has the literal unit stride, for
channels_last c has; a tensor of the other layout is converted first.
"""

import math
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common
from kdfast.kernels._common import (
    TL_DTYPES,
    acc_dtype,
    alignment,
    chunks,
    feature_power,
    feature_power_grad,
    hw_stride,
    on_device,
    sqrt_rn,
)

_EPS = tl.constexpr(1e-12)  # normalize(v) = v / max(||v||_2, eps), as F.normalize

# Block sizes of the map kernel (one config: multi-config autotuning breaks the interpreter). The
# unit-stride block (BLOCK_HW for contiguous, BLOCK_C for channels_last) fits the smallest stage,
# clamped to [32, 128] elements: rows are read in 128-byte (float32) segments, yet small late-stage
# maps (8x8) mask little. The other block fills a _TILE-element tile (16 elements per thread at 4
# warps, 8 on the backward's 8). Then BLOCK_HW is halved (down to 32 for contiguous, 1 for
# channels_last) until the launch has _PROGRAMS_PER_SM programs per SM, so that a small late-stage
# map still fills the GPU: 8x8x256 at B=64 on an H100 runs as 128 programs of 256x32 elements
# (contiguous) or 1024 programs of 256x4 (channels_last) instead of 64 of 256x64. Stages are
# launched in order of decreasing C, so the longest programs start first.
_UNIT_BLOCK_MIN = 32
_UNIT_BLOCK_MAX = 128
_TILE = 2048
_PROGRAMS_PER_SM = 4
_NUM_WARPS = 4
# The map backward runs its tiles on 8 warps (8 elements a thread): on 4 warps ptxas spilled 48
# bytes at 48 registers (sm_80, float32 channels_last) to fit more programs per SM; on 8 warps
# every specialisation takes 12-53 registers on sm_80 and sm_90 (triton 3.6 and 3.8), no spills.
_BACKWARD_WARPS = 8
_LOSS_BLOCK_MAX = 1024  # the loss kernel streams each (B, HW) row in blocks of up to this many


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _i32(v):
    """An integer kernel argument as an int32 scalar tensor (Triton turns an integer argument
    equal to 1 into a constexpr, which has no ``.to`` nor ``tl.multiple_of``)."""
    return tl.full([], v, tl.int32)


@triton.jit
def _i64(v):
    """An integer kernel argument as an int64 scalar tensor (see :func:`_i32`)."""
    return tl.full([], v, tl.int64)


@triton.jit
def _in_stage(pid, firsts, s: tl.constexpr):
    """Whether program ``pid`` belongs to stage ``s``: ``firsts[s] <= pid < firsts[s + 1]``."""
    return (pid >= firsts[s]) & (pid < firsts[s + 1])


@triton.jit
def _stage_tensor(ptr, b, stride_b, stride, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Pointer to sample ``b`` of a stage tensor and its stride along the non-unit axis, with the
    stage's proven alignment (``ALIGN`` elements) restated for the compiler."""
    ptr = tl.multiple_of(ptr, ALIGN * (DTYPE.primitive_bitwidth // 8))  # in bytes
    stride_b = tl.multiple_of(_i64(stride_b), ALIGN)
    return ptr + b * stride_b, tl.multiple_of(_i64(stride), ALIGN)


@triton.jit
def _stage_block(local, channels, hw, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Sample, hw offsets [BLOCK_HW], channels and hw of the stage's program ``local``."""
    channels = _i32(channels)
    hw = _i32(hw)
    if CHANNELS_LAST:  # the unit-stride extent bounds the masks of the vector loads
        channels = tl.multiple_of(channels, ALIGN)
    else:
        hw = tl.multiple_of(hw, ALIGN)
    blocks = tl.cdiv(hw, BLOCK_HW)
    offs_hw = (local % blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return local // blocks, offs_hw, channels, hw


@triton.jit
def _tile(offs_c, offs_hw, stride, CHANNELS_LAST: tl.constexpr):
    """[BLOCK_C, BLOCK_HW] element offsets; the unit stride is a literal 1."""
    if CHANNELS_LAST:
        offs = offs_c[:, None] + offs_hw[None, :] * stride
    else:
        offs = offs_c[:, None] * stride + offs_hw[None, :]
    return offs


@triton.jit
def _channel_tile(
    x, stride, c0, channels, offs_hw, hw_mask, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Channel offsets ``c0 + [0, BLOCK_C)``, the [BLOCK_C, BLOCK_HW] tile's mask and the feature
    ``x`` there, in ACC (0 outside the mask)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask = (offs_c < channels)[:, None] & hw_mask[None, :]
    v = tl.load(x + _tile(offs_c, offs_hw, stride, CHANNELS_LAST), mask=mask, other=0.0)
    return offs_c, mask, v.to(ACC)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _at_maps_kernel(
    xs,
    maps,
    firsts,
    channels,
    hws,
    x_sb,
    x_s,
    ys,
    y_sb,
    y_s,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    P: tl.constexpr,
    INT_P: tl.constexpr,
    ODD_SIGNED: tl.constexpr,
    MEAN: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ALIGNS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """The maps ``m[b, hw] = scale * sum_c g(f[b, c, hw])`` of every stage where ``ys`` (and
    ``y_sb``, ``y_s``) are None, else the feature gradients ``df[b, c, hw] = dm[b, hw] * scale *
    g'(f[b, c, hw])`` into ``ys`` from the map gradients dm in ``maps``. The programs ``firsts[s] ..
    firsts[s + 1] - 1`` cover stage s, each a sample and BLOCK_HW positions of it."""
    pid = tl.program_id(0)
    for s in tl.static_range(len(xs)):
        if _in_stage(pid, firsts, s):
            ALIGN: tl.constexpr = ALIGNS[s]
            b, offs_hw, n_c, hw = _stage_block(pid - firsts[s], channels[s], hws[s], CHANNELS_LAST, ALIGN, BLOCK_HW)
            x, x_stride = _stage_tensor(xs[s], b, x_sb[s], x_s[s], DTYPE, ALIGN)
            hw_mask = offs_hw < hw
            if ys is None:
                acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
                for c0 in range(0, n_c, BLOCK_C):
                    _, _, v = _channel_tile(x, x_stride, c0, n_c, offs_hw, hw_mask, ACC, CHANNELS_LAST, BLOCK_C)
                    acc += feature_power(v, P, INT_P, ODD_SIGNED)  # g(0) = 0 for the masked lanes
                out = tl.sum(acc, axis=0)
                if MEAN:
                    out = out * (1.0 / n_c.to(ACC))
                tl.store(maps[s] + b * hw + offs_hw, out, mask=hw_mask)
            else:
                y, y_stride = _stage_tensor(ys[s], b, y_sb[s], y_s[s], DTYPE, ALIGN)
                d_map = tl.load(maps[s] + b * hw + offs_hw, mask=hw_mask, other=0.0)
                if MEAN:
                    d_map = d_map * (1.0 / n_c.to(ACC))
                for c0 in range(0, n_c, BLOCK_C):
                    offs_c, mask, v = _channel_tile(x, x_stride, c0, n_c, offs_hw, hw_mask, ACC, CHANNELS_LAST, BLOCK_C)
                    d = d_map[None, :] * feature_power_grad(v, P, INT_P, ODD_SIGNED)
                    tl.store(y + _tile(offs_c, offs_hw, y_stride, CHANNELS_LAST), d.to(DTYPE), mask=mask)


@triton.jit
def _row_block(ms, mt, j, hw, BLOCK: tl.constexpr):
    """Offsets ``j + [0, BLOCK)``, their mask and both maps' values there (0 past hw)."""
    offs = j + tl.arange(0, BLOCK)
    mask = offs < hw
    return offs, mask, tl.load(ms + offs, mask=mask, other=0.0), tl.load(mt + offs, mask=mask, other=0.0)


@triton.jit
def _map_loss_row(
    loss, ms, mt, grad, hw, b, batch, ACC: tl.constexpr, MSE: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr
):
    """Loss and d loss / d m_s of one (stage, sample): three passes over HW (the sums ss, tt,
    st; the squared normalised difference; the gradient)."""
    hw = tl.multiple_of(_i32(hw), ALIGN)
    start = b.to(tl.int64) * hw
    ms = tl.multiple_of(ms, ALIGN * (ACC.primitive_bitwidth // 8)) + start
    mt = tl.multiple_of(mt, ALIGN * (ACC.primitive_bitwidth // 8)) + start
    grad = tl.multiple_of(grad, ALIGN * (ACC.primitive_bitwidth // 8)) + start

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
    ns = sqrt_rn(ss)
    nt = sqrt_rn(tl.sum(tt, axis=0))
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
        tl.store(loss, sq / n)
        k = 2.0 / n  # d loss / d u_s = k * (u_s - u_t)
    else:
        l2 = sqrt_rn(sq)
        tl.store(loss, l2 / batch)
        positive = l2 > 0  # k = 0 where l2 == 0 (or NaN), without dividing by 0 there
        k = tl.where(positive, 1.0 / (tl.where(positive, l2, 1.0) * batch), 0.0)
    # d u_s / d m_s = (I - u_s u_s^T) / ||m_s|| where the norm is not clamped, I / eps otherwise.
    proj = tl.where(ns >= _EPS, ss * inv_s * inv_s - st * inv_s * inv_t, 0.0)
    for j in range(0, hw, BLOCK):
        offs, mask, s, t = _row_block(ms, mt, j, hw, BLOCK)
        us = s * inv_s
        tl.store(grad + offs, k * inv_s * ((us - t * inv_t) - us * proj), mask=mask)


@triton.jit
def _at_map_loss_kernel(
    maps_s, maps_t, grads, hws, losses, batch, ACC: tl.constexpr, MSE: tl.constexpr, ALIGNS: tl.constexpr, BLOCK: tl.constexpr
):
    """One program per (stage, sample): ``losses[stage, b]`` and the stage's gradient row b."""
    pid = tl.program_id(0)
    stage = pid // batch
    b = pid % batch
    for s in tl.static_range(len(maps_s)):
        if stage == s:
            ALIGN: tl.constexpr = ALIGNS[s]
            _map_loss_row(losses + pid, maps_s[s], maps_t[s], grads[s], hws[s], b, batch, ACC, MSE, ALIGN, BLOCK)


# ----------------------------------------------------------------------------- host helpers


def _power(p: float, mode: str) -> dict[str, float | int | bool]:
    """The constexprs P, INT_P, ODD_SIGNED and MEAN of g, validated as csrc/at.h parse_map_mode and
    make_power do."""
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
        "INT_P": _common.int_power(p),
        "ODD_SIGNED": mode == "mean" and integer and p % 2 == 1,
        "MEAN": mode == "mean",
    }


def _check_feats(feats: list[Tensor], name: str) -> None:
    """The checks of csrc/at.h check_feature_list, plus the supported dtypes."""
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
    if feats[0].dtype not in TL_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {feats[0].dtype}")


def _fits(t: Tensor, channels_last: bool) -> bool:
    """Whether ``t`` reads as (B, C, HW) with a unit stride along hw (c for channels_last)."""
    b, c, h, w = t.shape
    if not (h == 1 or w == 1 or t.stride(2) == w * t.stride(3)):
        return False
    if channels_last:
        return c == 1 or t.stride(1) == 1
    return h * w == 1 or hw_stride(t) == 1


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _strides(t: Tensor, channels_last: bool) -> tuple[int, int]:
    """A stage tensor's batch stride and its stride along the non-unit axis (hw for channels_last,
    c for contiguous), each 0 where its dim has size 1 (so that it divides by anything)."""
    b, c, h, w = t.shape
    stride, size = (hw_stride(t), h * w) if channels_last else (t.stride(1), c)
    return t.stride(0) if b > 1 else 0, stride if size > 1 else 0


def _alignment(tensors: list[Tensor], channels_last: bool) -> int:
    """ALIGN of one stage (:func:`_common.alignment`) of every data pointer (in elements), stride
    and unit-axis extent of its ``tensors``."""
    values = []
    for t in tensors:
        unit_extent = t.size(1) if channels_last else t.size(2) * t.size(3)
        values += [t.data_ptr() // t.element_size(), *_strides(t, channels_last), unit_extent]
    return alignment(values)


def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: _PROGRAMS_PER_SM per SM (1 off CUDA)."""
    return _PROGRAMS_PER_SM * _common.sm_count(device) if device.type == "cuda" else 1


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


class _MapLaunch(NamedTuple):
    """What the maps and their backward share: the feats in the launch layout, stage order and constexprs."""

    feats: list[Tensor]
    channels_last: bool
    order: list[int]  # stages in launch order: most channels (longest programs) first
    constexprs: dict[str, Any]


def _map_launch(feats: list[Tensor], p: float, mode: str, name: str) -> _MapLaunch:
    """Validates, converts every feat to the layout of the first one, chooses the blocks."""
    _check_feats(feats, name)
    power = _power(p, mode)
    channels_last = not _fits(feats[0], False) and _fits(feats[0], True)
    feats = [f if _fits(f, channels_last) else f.contiguous(memory_format=_memory_format(channels_last)) for f in feats]
    order = sorted(range(len(feats)), key=lambda s: -feats[s].size(1))
    block_c, block_hw = _map_blocks(feats, channels_last)
    dtype = feats[0].dtype
    constexprs = dict(
        DTYPE=TL_DTYPES[dtype],
        ACC=TL_DTYPES[acc_dtype(dtype)],
        CHANNELS_LAST=channels_last,
        BLOCK_C=block_c,
        BLOCK_HW=block_hw,
        **power,
    )
    return _MapLaunch(feats, channels_last, order, constexprs)


def _tensor_args(tensors: list[Tensor], channels_last: bool) -> tuple[tuple[Tensor, ...], tuple[int, ...], tuple[int, ...]]:
    """The stages' ``tensors`` as the kernel's tuple arguments: themselves, their batch strides and
    their strides along the non-unit axis (:func:`_strides`)."""
    batch_strides, strides = zip(*[_strides(t, channels_last) for t in tensors])
    return tuple(tensors), batch_strides, strides


def _run_maps(launch: _MapLaunch, maps: list[Tensor], grads: list[Tensor] | None = None) -> None:
    """Launches :func:`_at_maps_kernel` over all stages (one launch per _common.MAX_STAGES): the maps
    into ``maps``, or with ``grads`` (launch layout) the feature gradients into them from the map
    gradients ``maps``. Every argument is a kernel argument: nothing is staged on the host."""
    cl = launch.channels_last
    with on_device(launch.feats[0].device):
        for stages in chunks(launch.order):
            feats = [launch.feats[s] for s in stages]
            ys = None if grads is None else [grads[s] for s in stages]
            firsts = _first_programs(feats, launch.constexprs["BLOCK_HW"])
            xs, x_sb, x_s = _tensor_args(feats, cl)
            y_tensors, y_sb, y_s = (None, None, None) if ys is None else _tensor_args(ys, cl)
            stage_tensors = [[f] for f in feats] if ys is None else [[f, y] for f, y in zip(feats, ys)]
            _at_maps_kernel[(firsts[-1],)](
                xs,
                tuple(maps[s] for s in stages),
                tuple(firsts),
                tuple(f.size(1) for f in feats),
                tuple(f.size(2) * f.size(3) for f in feats),
                x_sb,
                x_s,
                ys=y_tensors,  # the backward's: None in the forward
                y_sb=y_sb,
                y_s=y_s,
                ALIGNS=tuple(_alignment(t, cl) for t in stage_tensors),
                num_warps=_NUM_WARPS if grads is None else _BACKWARD_WARPS,
                **launch.constexprs,
            )


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
    acc = acc_dtype(feats[0].dtype)
    maps = [torch.empty((f.size(0), f.size(2) * f.size(3)), dtype=acc, device=f.device) for f in launch.feats]
    _run_maps(launch, maps)
    return maps


def at_maps_backward(grad_maps: list[Tensor], feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    """Gradient of :func:`at_maps` w.r.t. the feats, all stages in one launch.

    ``df[b, c, hw] = dm[b, hw] * scale * g'(f[b, c, hw])``, ``g'(x) = p |x|^(p-1)`` times
    ``sign(x)`` (not for the odd-signed g), with ``|x|^0 = 1`` and ``sign(0) = 0``.
    ``grad_maps[i]``: (B_i, H_i*W_i) in the maps' dtype. Returns ``torch.empty_like(feats[i])``
    filled (same dtype and memory format).
    """
    if len(grad_maps) != len(feats):
        raise ValueError(f"at_maps_backward: {len(grad_maps)} grad_maps for {len(feats)} feats")
    launch = _map_launch(feats, p, mode, "at_maps_backward")
    acc = acc_dtype(feats[0].dtype)
    for s, (g, f) in enumerate(zip(grad_maps, feats)):
        if g.dim() != 2 or tuple(g.shape) != (f.size(0), f.size(2) * f.size(3)):
            raise ValueError(f"at_maps_backward: grad_maps[{s}] must have shape (B, H*W) of feats[{s}]")
        if g.dtype != acc or g.device != f.device:
            raise ValueError(f"at_maps_backward: grad_maps[{s}] must be {acc} on {f.device}")
    grads = [torch.empty_like(f) for f in feats]
    # The kernel writes the launch layout; a grad of the other layout is filled by a copy.
    bufs = [
        g if _fits(g, launch.channels_last) else torch.empty_like(f, memory_format=_memory_format(launch.channels_last))
        for g, f in zip(grads, launch.feats)
    ]
    _run_maps(launch, [g.contiguous() for g in grad_maps], bufs)
    for g, buf in zip(grads, bufs):
        if buf is not g:
            g.copy_(buf)
    return grads


def at_map_loss(maps_s: list[Tensor], maps_t: list[Tensor], loss: str) -> tuple[Tensor, list[Tensor]]:
    """Per-sample AT loss of every stage from raw maps, and its gradient w.r.t. ``maps_s``.

    With ``u = m / max(||m||_2, 1e-12)`` per row: ``mse = sum_hw (u_s - u_t)^2 / (B * HW)``,
    ``l2 = ||u_s - u_t||_2 / B`` (gradient 0 where u_s == u_t). ``maps_s[i]``, ``maps_t[i]``:
    (B, HW_i), float32 or float64, one B and dtype for all. Returns the losses (L, B) and the
    gradients (B, HW_i) (contiguous), from one launch (per _common.MAX_STAGES stages) of one program per
    (stage, sample).
    """
    if len(maps_s) == 0 or len(maps_s) != len(maps_t):
        raise ValueError("at_map_loss: expected equally many (>= 1) student and teacher maps")
    if loss not in ("mse", "l2"):
        raise ValueError(f"at_map_loss: loss must be 'mse' or 'l2', got '{loss}'")
    dtype, device = maps_s[0].dtype, maps_s[0].device
    if dtype not in (torch.float32, torch.float64):
        raise ValueError("at_map_loss: maps must be float32 or float64")
    for s, (m_s, m_t) in enumerate(zip(maps_s, maps_t)):
        # maps_s[0] is known 2-D when a later stage compares its B with it
        if m_s.dim() != 2 or m_s.shape != m_t.shape or m_s.size(0) != maps_s[0].size(0) or m_s.size(1) == 0:
            raise ValueError(f"at_map_loss: maps_s[{s}] and maps_t[{s}] must both be (B, HW) with one B for all")
        if m_s.dtype != dtype or m_t.dtype != dtype:
            raise ValueError("at_map_loss: maps must share one dtype")
        if m_s.device != device or m_t.device != device:
            raise ValueError("at_map_loss: maps must be on one device")
    batch = maps_s[0].size(0)
    maps_s = [m.contiguous() for m in maps_s]
    maps_t = [m.contiguous() for m in maps_t]
    grads = [torch.empty_like(m) for m in maps_s]
    losses = torch.empty((len(maps_s), batch), dtype=dtype, device=device)
    if batch > 0:
        block = min(triton.next_power_of_2(max(m.size(1) for m in maps_s)), _LOSS_BLOCK_MAX)
        size = dtype.itemsize
        with on_device(device):
            for stages in chunks(list(range(len(maps_s)))):
                ms, mt, gs = ([t[s] for s in stages] for t in (maps_s, maps_t, grads))
                aligns = tuple(alignment((m.size(1), *(t.data_ptr() // size for t in ts))) for m, *ts in zip(ms, ms, mt, gs))
                _at_map_loss_kernel[(len(stages) * batch,)](
                    tuple(ms),
                    tuple(mt),
                    tuple(gs),
                    tuple(m.size(1) for m in ms),
                    losses[stages[0] :],
                    batch,
                    ACC=TL_DTYPES[dtype],
                    MSE=loss == "mse",
                    ALIGNS=aligns,
                    BLOCK=block,
                    num_warps=_NUM_WARPS,
                )
    return losses, grads
