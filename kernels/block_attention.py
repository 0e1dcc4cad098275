"""Triton kernels of the block-attention op (LAKD's NDAM, AFT-KD's attention and feature blocks);
formulas in kdfast/reference/block_attention.py, op contract in kdfast/ops/block_attention.py.

Per module l and sample b, with ``f_s`` (Cs, Hs, Ws), ``h`` and ``t`` (Ct, H, W), grid g, power p,
feature grid fb and torch's adaptive-pooling bins (rows ``floor(i H / g) .. ceil((i + 1) H / g) - 1``,
columns alike; they overlap when g does not divide H)::

    P(f)[k]  = sum_{(y, x) in bin k} mean_c |f[c, y, x]|^p / area_k          k = i g + j
    A        = P / max(||P||_2, 1e-12)
    map_l   += sum_k (A_s - A_t)^2 / (B g^2)
    feat_l  += sum_{c,y,x} w[y, x] (h - t)^2 / (B Ct H W)                    fb == 0
    feat_l  += sum_{c,k} D[c, k]^2 / (B Ct fb^2),  D[c, k] = sum_{(y, x) in bin_fb k} (h - t) / area_k
    w[y, x]  = A_t[cell(y, x)] / max(mean_{y,x} A_t[cell(y, x)], 1e-12)      (teacher weighting; else 1)
    cell(y, x) = floor(y g / H) g + floor(x g / W)

Backward (``gm``, ``gf`` the upstream gradients of map_l and feat_l)::

    dA = gm 2 (A_s - A_t) / (B g^2)
    dP = (dA - A_s <A_s, dA>) / ||P_s||   (dA / 1e-12 where ||P_s|| < 1e-12)
    d f_s[c, y, x] = sum_{bins k containing (y, x)} dP[k] / area_k * p |f|^(p-1) sign(f) / Cs
    d h[c, y, x]   = gf 2 w[y, x] (h - t) / (B Ct H W)                               fb == 0
                   = sum_{bins k containing (y, x)} gf 2 D[c, k] / (B Ct fb^2 area_k)   fb > 0

Launch design. The forward is two launches and a torch sum, the backward one launch, each over
all modules (up to _common.MAX_STAGES; more are chunked). Nothing is staged on the host: the
modules' tensors, dims and strides are kernel arguments (tuples; a program selects its module's
values with a static loop over them), so launches captured in a CUDA graph replay with the same
arguments. Every program handles one (module, sample, split): a split is a range of channel
blocks times a range of position blocks of each tensor (positions are not split when fb > 0,
as D needs all of them), chosen by the launcher so that the launch has about 4 programs per SM
(LAKD's local mode launches one module at a time: B programs alone would leave an H200 idle);
the split depends only on the shapes and the device, never on values.

1. ``_partials_kernel``: per split, the partial bin sums of ``sum_c |f_s|^p`` and ``sum_c |t|^p``
   and the partial feature term: ``sum (h - t)^2`` (fb == 0; per cell(y, x) with teacher
   weighting, since w is known only once P_t is complete) or ``sum_{c,k} D[c, k]^2`` of its
   channels (fb > 0; D of a channel block as a product [channels, positions] x [positions, bins]
   with ``tl.dot`` in full precision), all stored to a (L, B, S, 3, G2) scratch.
2. ``_finish_kernel``: per (module, sample), the sums over the splits in a fixed order, P_s and
   P_t (to ``maps``), the map term and the feature term (weighted by w from A_t) to ``partials``
   (L, B, 2); torch sums them over B in a fixed order (deterministic; no atomics).
3. ``_backward_kernel``: per split, A_s, A_t (and w) from ``maps``, then the contiguous gradients
   of its channel and position range (D per channel block again where fb > 0).

Layouts: contiguous (positions at the literal unit stride: the threads run along positions and
the loads vectorise), channels_last (channels at the literal unit stride: the threads run along
channels and reduce across them, the loads coalesce and vectorise), or any other strides. The
launcher proves the largest power of two (<= 16 elements) dividing the launch's data pointers,
strides and unit-axis extents (ALIGN) and the kernels restate it with ``tl.multiple_of``. Loads
are converted to the accumulation dtype (float32; float64 for float64 students) before any
arithmetic.
"""

import math
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common
from kdfast.kernels._common import (
    CHANNELS_LAST,
    CONTIGUOUS,
    STRIDED,
    TL_DTYPES,
    acc_dtype,
    alignment,
    feature_power,
    feature_power_grad,
    hw_stride,
    layout_of,
    on_device,
    pick,
    pick_field,
    read_tile,
    sqrt_rn,
    stage_slices,
)

_EPS = tl.constexpr(1e-12)

# Per-module kernel arguments: ``dims[r]`` = (Cs, Hs, Ws, Ct, H, W) and ``strides[r]``, the
# (b, c, y, x) strides of f_s, h_s and f_t (a stride of a size-1 dim is 0; with channels_last the
# x column is the flattened position stride).
_DIMS_S = tl.constexpr(0)
_DIMS_T = tl.constexpr(3)
_FS = tl.constexpr(0)
_HS = tl.constexpr(4)
_FT = tl.constexpr(8)

_TILE = 2048  # elements of a [BLOCK_C, BLOCK_HW] tile, of a [bins, BLOCK_HW] membership mask and of D
_BLOCK_MIN = 16  # tl.dot's smallest dimension (the D products), and the smallest position block
_UNIT_BLOCK_MAX = 128  # the unit-stride block (512 bytes of float32)
_MAX_SPLITS = 64  # splits per (module, sample)
_PROGRAMS_PER_SM = 4  # splits are doubled until a launch has this many programs per SM
_NUM_WARPS = 4
# BLOCK_HW at most, for channels_last maps with a feature grid: there BLOCK_HW is the K of the D
# products' IEEE (FMA) tl.dot, whose operand rows sit in registers. It only binds for maps of at
# most 64 channels (BLOCK_C < 128); with 16 channels, BLOCK_HW = 64 spilled 48 bytes at 168
# registers (sm_90, triton 3.6), 32 spilled 20 (triton 3.8), 16 none (measured with ptxas,
# benchmarks/triton_compile.py).
_CL_DOT_K = 16


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _dims(dims, r, COL: tl.constexpr, LAYOUT: tl.constexpr, ALIGN: tl.constexpr):
    """(channels, height, width, height * width) at ``dims[r][COL:COL + 3]``; the unit-stride
    extent (positions or channels) restated as a multiple of ALIGN."""
    channels = pick_field(dims, r, COL, tl.int32)
    height = pick_field(dims, r, COL + 1, tl.int32)
    width = pick_field(dims, r, COL + 2, tl.int32)
    hw = height * width
    if LAYOUT == 0:
        hw = tl.multiple_of(hw, ALIGN)
    if LAYOUT == 1:
        channels = tl.multiple_of(channels, ALIGN)
    return channels, height, width, hw


@triton.jit
def _sample(ptrs, strides, r, COL: tl.constexpr, b, LAYOUT: tl.constexpr, ALIGN: tl.constexpr):
    """Pointer to sample ``b`` of module r's tensor ``ptrs[r]`` and its c, y, x strides; the
    alignment (ALIGN elements) of the pointer, batch stride and non-unit stride of the layout is
    restated for the compiler."""
    ptr = pick(ptrs, r)
    ptr = tl.multiple_of(ptr, ALIGN * (ptr.dtype.element_ty.primitive_bitwidth // 8))  # in bytes
    stride_b = tl.multiple_of(pick_field(strides, r, COL, tl.int64), ALIGN)
    sc = pick_field(strides, r, COL + 1, tl.int64)
    sx = pick_field(strides, r, COL + 3, tl.int64)
    if LAYOUT == 0:
        sc = tl.multiple_of(sc, ALIGN)
    if LAYOUT == 1:
        sx = tl.multiple_of(sx, ALIGN)
    return ptr + b * stride_b, sc, pick_field(strides, r, COL + 2, tl.int64), sx


@triton.jit
def _mask(offs_c, offs_hw, channels, hw):
    return (offs_c < channels)[:, None] & (offs_hw < hw)[None, :]


@triton.jit
def _read_pair(h, t, offs_c, offs_hw, width, mask, LAYOUT: tl.constexpr, ACC: tl.constexpr):
    """(t, h - t) of the sample views ``h`` and ``t`` at channels offs_c and positions offs_hw."""
    tv = read_tile(t, offs_c, offs_hw, width, mask, LAYOUT, ACC)
    return tv, read_tile(h, offs_c, offs_hw, width, mask, LAYOUT, ACC) - tv


@triton.jit
def _locate(batch, splits_c, splits_hw):
    """(module, sample, split) of this program, ``split = (channel split, splits_c, position split,
    splits_hw)`` (:func:`_split_ranges`)."""
    pid = tl.program_id(0)
    split = pid % (splits_c * splits_hw)
    rest = pid // (splits_c * splits_hw)
    return rest // batch, rest % batch, (split % splits_c, splits_c, split // splits_c, splits_hw)


@triton.jit
def _range(split, n_splits, extent, BLOCK: tl.constexpr):
    """[lo, hi) of split ``split`` of ``n_splits`` over the BLOCK-blocks of ``extent``: whole blocks,
    so that masks against ``extent`` itself (aligned) bound the last one."""
    per = tl.cdiv(tl.cdiv(extent, BLOCK), n_splits) * BLOCK
    lo = split * per
    return lo, tl.minimum(lo + per, extent)


@triton.jit
def _split_ranges(split, geometry, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """[c_lo, c_hi) and [hw_lo, hw_hi): the program's channels (BLOCK_C blocks) and positions
    (BLOCK_HW blocks) of a module tensor of ``geometry`` (C, H, W, H W) (:func:`_dims`), for its
    ``split`` (:func:`_locate`)."""
    c_lo, c_hi = _range(split[0], split[1], geometry[0], BLOCK_C)
    hw_lo, hw_hi = _range(split[2], split[3], geometry[3], BLOCK_HW)
    return c_lo, c_hi, hw_lo, hw_hi


@triton.jit
def _bins(offs_hw, hw, height, width, GRID: tl.constexpr, G2: tl.constexpr):
    """[G2, BLOCK_HW] membership of positions offs_hw in the adaptive-pooling bins k = i * GRID + j
    of a height x width map (bins k >= GRID^2 are padding: empty)."""
    k = tl.arange(0, G2)
    i = k // GRID
    j = k % GRID
    y0 = (i * height // GRID)[:, None]
    y1 = (((i + 1) * height + GRID - 1) // GRID)[:, None]
    x0 = (j * width // GRID)[:, None]
    x1 = (((j + 1) * width + GRID - 1) // GRID)[:, None]
    y = (offs_hw // width)[None, :]
    x = (offs_hw % width)[None, :]
    inside = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    return inside & (k < GRID * GRID)[:, None] & (offs_hw < hw)[None, :]


@triton.jit
def _inv_area(height, width, ACC: tl.constexpr, GRID: tl.constexpr, G2: tl.constexpr):
    """[G2] 1 / area of every bin (0 for padding bins)."""
    k = tl.arange(0, G2)
    i = k // GRID
    j = k % GRID
    rows = ((i + 1) * height + GRID - 1) // GRID - i * height // GRID
    cols = ((j + 1) * width + GRID - 1) // GRID - j * width // GRID
    valid = k < GRID * GRID
    return tl.where(valid, 1.0 / tl.where(valid, rows * cols, 1).to(ACC), 0.0)


@triton.jit
def _bin_sums(inside, v):
    """[G2]: sum of the position vector v [BLOCK_HW] over each bin."""
    return tl.sum(tl.where(inside, v[None, :], 0.0), axis=1)


@triton.jit
def _spread(inside, vk):
    """[BLOCK_HW]: sum of the bin vector vk [G2] over the bins containing each position."""
    return tl.sum(tl.where(inside, vk[:, None], 0.0), axis=0)


@triton.jit
def _cells(offs_hw, height, width, GRID: tl.constexpr, G2: tl.constexpr):
    """[G2, BLOCK_HW]: whether position offs_hw is in cell k, ``cell(y, x) = floor(y g / H) g +
    floor(x g / W)`` (the cells partition the map)."""
    cell = (offs_hw // width) * GRID // height * GRID + (offs_hw % width) * GRID // width
    return cell[None, :] == tl.arange(0, G2)[:, None]


@triton.jit
def _load_map(ptr, G2: tl.constexpr, GRID: tl.constexpr):
    """[G2] pooled map P stored at ``ptr`` (GRID^2 values; 0 in the padding bins)."""
    k = tl.arange(0, G2)
    return tl.load(ptr + k, mask=k < GRID * GRID, other=0.0)


@triton.jit
def _normalize(p):
    """(A = p / max(||p||, eps), 1 / max(||p||, eps), ||p||) of a bin vector (NaN propagating)."""
    n = sqrt_rn(tl.sum(p * p, axis=0))
    inv = 1.0 / tl.where(n < _EPS, _EPS, n)
    return p * inv, inv, n


@triton.jit
def _weights(a_t, height, width, GRID: tl.constexpr, G2: tl.constexpr):
    """[G2] per-cell weights ``A_t[k] / max(mean_{y,x} A_t[cell(y, x)], eps)``: cell (i, j) covers
    ``ceil((i + 1) H / g) - ceil(i H / g)`` rows (columns alike)."""
    k = tl.arange(0, G2)
    i = k // GRID
    j = k % GRID
    rows = ((i + 1) * height + GRID - 1) // GRID - (i * height + GRID - 1) // GRID
    cols = ((j + 1) * width + GRID - 1) // GRID - (j * width + GRID - 1) // GRID
    mean = tl.sum(a_t * (rows * cols).to(a_t.dtype), axis=0) / (height * width).to(a_t.dtype)
    return a_t / tl.where(mean < _EPS, _EPS, mean)


@triton.jit
def _pooled_partial(
    x,
    geometry,
    c_lo,
    c_hi,
    hw_lo,
    hw_hi,
    ACC: tl.constexpr,
    P: tl.constexpr,
    INT_P: tl.constexpr,
    GRID: tl.constexpr,
    G2: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """[G2] bin sums of ``sum_c |x|^p`` (``x`` a sample view, ``geometry`` its (C, H, W, H W)) over
    channels [c_lo, c_hi) and positions [hw_lo, hw_hi)."""
    channels, height, width, hw = geometry
    acc = tl.zeros([G2], ACC)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        m = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            v = read_tile(x, offs_c, offs_hw, width, _mask(offs_c, offs_hw, channels, hw), LAYOUT, ACC)
            m += feature_power(v, P, INT_P, False)
        acc += _bin_sums(_bins(offs_hw, hw, height, width, GRID, G2), tl.sum(m, axis=0))
    return acc


@triton.jit
def _dense_partial(
    h,
    t,
    geometry,
    c_lo,
    c_hi,
    hw_lo,
    hw_hi,
    ACC: tl.constexpr,
    P: tl.constexpr,
    INT_P: tl.constexpr,
    GRID: tl.constexpr,
    G2: tl.constexpr,
    WEIGHTED: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """fb == 0 over the sample views (h, t) (``geometry``: their (C, H, W, H W)) in the range: (the
    teacher's [G2] bin sums of ``sum_c |t|^p``, the feature term ``sum (h - t)^2``: per cell [G2]
    when WEIGHTED, else its total in element 0)."""
    channels, height, width, hw = geometry
    p_t = tl.zeros([G2], ACC)
    feat = tl.zeros([G2], ACC)
    total = tl.zeros([BLOCK_HW], ACC)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        sq = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
        m = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            tv, d = _read_pair(h, t, offs_c, offs_hw, width, _mask(offs_c, offs_hw, channels, hw), LAYOUT, ACC)
            sq += d * d
            m += feature_power(tv, P, INT_P, False)
        sq_hw = tl.sum(sq, axis=0)
        if WEIGHTED:
            feat += _bin_sums(_cells(offs_hw, height, width, GRID, G2), sq_hw)
        else:
            total += sq_hw
        p_t += _bin_sums(_bins(offs_hw, hw, height, width, GRID, G2), tl.sum(m, axis=0))
    if not WEIGHTED:
        feat = tl.where(tl.arange(0, G2) == 0, tl.sum(total, axis=0), 0.0)
    return p_t, feat


@triton.jit
def _block_diffs(
    h,
    t,
    offs_c,
    geometry,
    p_t,
    ACC: tl.constexpr,
    P: tl.constexpr,
    INT_P: tl.constexpr,
    GRID: tl.constexpr,
    G2: tl.constexpr,
    FGRID: tl.constexpr,
    FG2: tl.constexpr,
    MAP_T: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK_CF: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """D [BLOCK_CF, FG2] of the channels offs_c (pooled differences of the sample views h and t,
    ``geometry`` their (C, H, W, H W), over the fb x fb bins: ``(h - t) [channels, positions] x
    membership [positions, bins]`` by ``tl.dot`` in full precision), and with MAP_T the teacher's
    bin sums of ``|t|^p`` of these channels added to p_t."""
    channels, height, width, hw = geometry
    diffs = tl.zeros([BLOCK_CF, FG2], ACC)
    for hw0 in range(0, hw, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        tv, d = _read_pair(h, t, offs_c, offs_hw, width, _mask(offs_c, offs_hw, channels, hw), LAYOUT, ACC)
        inside = _bins(offs_hw, hw, height, width, FGRID, FG2)
        diffs = tl.dot(d, tl.trans(inside.to(ACC)), diffs, input_precision="ieee", out_dtype=ACC)
        if MAP_T:
            p_t += _bin_sums(_bins(offs_hw, hw, height, width, GRID, G2), tl.sum(feature_power(tv, P, INT_P, False), axis=0))
    return diffs * _inv_area(height, width, ACC, FGRID, FG2)[None, :], p_t


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["batch"])  # batch.to(ACC): never a constexpr
def _partials_kernel(
    fs,
    hs,
    ft,
    dims,
    strides,
    part,
    batch,
    splits_c,
    splits_hw,
    ACC: tl.constexpr,
    P: tl.constexpr,
    INT_P: tl.constexpr,
    GRID: tl.constexpr,
    G2: tl.constexpr,
    FGRID: tl.constexpr,
    FG2: tl.constexpr,
    WEIGHTED: tl.constexpr,
    LAYOUT: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CF: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """part[program] = [bin sums of P_s, of P_t, feature term] of one (module, sample, split)."""
    r, b, split = _locate(batch, splits_c, splits_hw)
    student = _dims(dims, r, _DIMS_S, LAYOUT, ALIGN)
    f = _sample(fs, strides, r, _FS, b, LAYOUT, ALIGN)
    c_lo, c_hi, hw_lo, hw_hi = _split_ranges(split, student, BLOCK_C, BLOCK_HW)
    p_s = _pooled_partial(f, student, c_lo, c_hi, hw_lo, hw_hi, ACC, P, INT_P, GRID, G2, LAYOUT, BLOCK_C, BLOCK_HW)
    # the connector output and the teacher: looked up only now (shorter live ranges)
    teacher = _dims(dims, r, _DIMS_T, LAYOUT, ALIGN)
    h = _sample(hs, strides, r, _HS, b, LAYOUT, ALIGN)
    t = _sample(ft, strides, r, _FT, b, LAYOUT, ALIGN)
    if FGRID > 0:
        p_t = tl.zeros([G2], ACC)
        sq = tl.zeros([BLOCK_CF, FG2], ACC)
        c_lo, c_hi, _, _ = _split_ranges(split, teacher, BLOCK_CF, BLOCK_HW)
        for c0 in range(c_lo, c_hi, BLOCK_CF):
            diffs, p_t = _block_diffs(
                h,
                t,
                c0 + tl.arange(0, BLOCK_CF),
                teacher,
                p_t,
                ACC,
                P,
                INT_P,
                GRID,
                G2,
                FGRID,
                FG2,
                True,
                LAYOUT,
                BLOCK_CF,
                BLOCK_HW,
            )
            sq += diffs * diffs
        feat = tl.where(tl.arange(0, G2) == 0, tl.sum(tl.sum(sq, axis=1), axis=0), 0.0)
    else:
        c_lo, c_hi, hw_lo, hw_hi = _split_ranges(split, teacher, BLOCK_C, BLOCK_HW)
        p_t, feat = _dense_partial(
            h,
            t,
            teacher,
            c_lo,
            c_hi,
            hw_lo,
            hw_hi,
            ACC,
            P,
            INT_P,
            GRID,
            G2,
            WEIGHTED,
            LAYOUT,
            BLOCK_C,
            BLOCK_HW,
        )
    out = part + tl.program_id(0).to(tl.int64) * (3 * G2) + tl.arange(0, G2)
    tl.store(out, p_s)
    tl.store(out + G2, p_t)
    tl.store(out + 2 * G2, feat)


@triton.jit(do_not_specialize=["batch"])  # batch.to(ACC): never a constexpr
def _finish_kernel(
    dims,
    part,
    partials,
    maps,
    batch,
    n_splits,
    ACC: tl.constexpr,
    GRID: tl.constexpr,
    G2: tl.constexpr,
    FGRID: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """P_s, P_t (to maps) and the partial terms [feat, map] of one (module, sample), summing the
    splits' part rows in order."""
    pid = tl.program_id(0)
    r = pid // batch
    b = pid % batch
    student = _dims(dims, r, _DIMS_S, 2, 1)
    cs, hs_, ws = student[0], student[1], student[2]
    ct, height, width, hw = _dims(dims, r, _DIMS_T, 2, 1)
    k = tl.arange(0, G2)
    p_s = tl.zeros([G2], ACC)
    p_t = tl.zeros([G2], ACC)
    feat = tl.zeros([G2], ACC)
    rows = part + pid.to(tl.int64) * n_splits * (3 * G2)
    for s0 in range(0, n_splits, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        tile = rows + offs[:, None] * (3 * G2) + k[None, :]
        mask = (offs < n_splits)[:, None]
        p_s += tl.sum(tl.load(tile, mask=mask, other=0.0), axis=0)
        p_t += tl.sum(tl.load(tile + G2, mask=mask, other=0.0), axis=0)
        feat += tl.sum(tl.load(tile + 2 * G2, mask=mask, other=0.0), axis=0)
    p_s = p_s * _inv_area(hs_, ws, ACC, GRID, G2) / cs.to(ACC)
    p_t = p_t * _inv_area(height, width, ACC, GRID, G2) / ct.to(ACC)
    diff = _normalize(p_s)[0] - _normalize(p_t)[0]
    map_term = tl.sum(diff * diff, axis=0) / (batch * GRID * GRID).to(ACC)
    if FGRID > 0:
        count = ct.to(ACC) * (FGRID * FGRID)
    else:
        count = ct.to(ACC) * hw.to(ACC)
        if WEIGHTED:
            feat = feat * _weights(_normalize(p_t)[0], height, width, GRID, G2)
    out = partials + pid * 2
    tl.store(out, tl.sum(feat, axis=0) / (batch.to(ACC) * count))
    tl.store(out + 1, map_term)
    valid = k < GRID * GRID
    maps_s = maps + (r * 2 * batch + b) * (GRID * GRID)
    tl.store(maps_s + k, p_s, mask=valid)
    tl.store(maps_s + batch * (GRID * GRID) + k, p_t, mask=valid)


@triton.jit(do_not_specialize=["batch"])  # batch.to(ACC): never a constexpr
def _backward_kernel(
    fs,
    hs,
    ft,
    grads_fs,
    grads_hs,
    dims,
    strides,
    grad_terms,
    maps,
    batch,
    splits_c,
    splits_hw,
    ACC: tl.constexpr,
    P: tl.constexpr,
    INT_P: tl.constexpr,
    GRID: tl.constexpr,
    G2: tl.constexpr,
    FGRID: tl.constexpr,
    FG2: tl.constexpr,
    WEIGHTED: tl.constexpr,
    LAYOUT: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CF: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """grad_f_s and grad_h_s (contiguous) of one (module, sample, split)'s channels and positions."""
    r, b, split = _locate(batch, splits_c, splits_hw)
    student = _dims(dims, r, _DIMS_S, LAYOUT, ALIGN)
    teacher = _dims(dims, r, _DIMS_T, LAYOUT, ALIGN)
    cs, hs_, ws, hw_s = student
    ct, height, width, hw = teacher
    f = _sample(fs, strides, r, _FS, b, LAYOUT, ALIGN)
    g_fs = pick(grads_fs, r) + b * (cs * hw_s).to(tl.int64)
    grad_map = tl.load(grad_terms + r * 2 + 1)

    maps_s = maps + (r * 2 * batch + b) * (GRID * GRID)
    a_s, inv_s, n_s = _normalize(_load_map(maps_s, G2, GRID))
    a_t = _normalize(_load_map(maps_s + batch * (GRID * GRID), G2, GRID))[0]

    # Student map: dP per bin, spread over the bins' positions and scaled by 1 / (area Cs).
    d_a = grad_map * 2.0 * (a_s - a_t) / (batch * GRID * GRID).to(ACC)
    proj = tl.where(n_s >= _EPS, tl.sum(a_s * d_a, axis=0), 0.0)
    d_p = (d_a - a_s * proj) * inv_s * _inv_area(hs_, ws, ACC, GRID, G2) / cs.to(ACC)
    c_lo, c_hi, hw_lo, hw_hi = _split_ranges(split, student, BLOCK_C, BLOCK_HW)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        d_m = _spread(_bins(offs_hw, hw_s, hs_, ws, GRID, G2), d_p)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = _mask(offs_c, offs_hw, cs, hw_s)
            v = read_tile(f, offs_c, offs_hw, ws, mask, LAYOUT, ACC)
            grad = d_m[None, :] * feature_power_grad(v, P, INT_P, False)
            tl.store(g_fs + offs_c[:, None] * hw_s + offs_hw[None, :], grad.to(g_fs.dtype.element_ty), mask=mask)

    # Connector output (its tensors looked up only now: shorter live ranges).
    h = _sample(hs, strides, r, _HS, b, LAYOUT, ALIGN)
    t = _sample(ft, strides, r, _FT, b, LAYOUT, ALIGN)
    g_h = pick(grads_hs, r) + b * (ct * hw).to(tl.int64)
    grad_feat = tl.load(grad_terms + r * 2)
    if FGRID > 0:
        coef = grad_feat * 2.0 / (batch.to(ACC) * ct.to(ACC) * FGRID * FGRID)
        inv_area = _inv_area(height, width, ACC, FGRID, FG2)
        c_lo, c_hi, _, _ = _split_ranges(split, teacher, BLOCK_CF, BLOCK_HW)
        for c0 in range(c_lo, c_hi, BLOCK_CF):
            offs_c = c0 + tl.arange(0, BLOCK_CF)
            diffs = _block_diffs(
                h, t, offs_c, teacher, tl.zeros([G2], ACC), ACC, P, INT_P, GRID, G2, FGRID, FG2, False, LAYOUT, BLOCK_CF, BLOCK_HW
            )[0]
            d_bins = coef * diffs * inv_area[None, :]
            for hw0 in range(0, hw, BLOCK_HW):
                offs_hw = hw0 + tl.arange(0, BLOCK_HW)
                inside = _bins(offs_hw, hw, height, width, FGRID, FG2).to(ACC)
                grad = tl.dot(d_bins, inside, input_precision="ieee", out_dtype=ACC)
                tl.store(
                    g_h + offs_c[:, None] * hw + offs_hw[None, :],
                    grad.to(g_h.dtype.element_ty),
                    mask=_mask(offs_c, offs_hw, ct, hw),
                )
    else:
        coef = grad_feat * 2.0 / (batch.to(ACC) * ct.to(ACC) * hw.to(ACC))
        wk = _weights(a_t, height, width, GRID, G2)
        c_lo, c_hi, hw_lo, hw_hi = _split_ranges(split, teacher, BLOCK_C, BLOCK_HW)
        for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
            offs_hw = hw0 + tl.arange(0, BLOCK_HW)
            w = tl.full([BLOCK_HW], coef, ACC)
            if WEIGHTED:
                w = coef * _spread(_cells(offs_hw, height, width, GRID, G2), wk)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask = _mask(offs_c, offs_hw, ct, hw)
                d = _read_pair(h, t, offs_c, offs_hw, width, mask, LAYOUT, ACC)[1]
                grad = w[None, :] * d
                tl.store(g_h + offs_c[:, None] * hw + offs_hw[None, :], grad.to(g_h.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host helpers


def _strides(t: Tensor, layout: int) -> tuple[int, int, int, int]:
    """(b, c, y, x) strides, 0 for a dim of size 1; with channels_last the x column is the stride
    of the flattened positions."""
    b, c, h, w = t.shape
    x = hw_stride(t) if layout == CHANNELS_LAST else t.stride(3)
    x_size = h * w if layout == CHANNELS_LAST else w
    s_b, s_c, s_y, s_x = (
        st if size > 1 else 0 for size, st in ((b, t.stride(0)), (c, t.stride(1)), (h, t.stride(2)), (x_size, x))
    )
    return s_b, s_c, s_y, s_x


def _alignment(tensors: list[Tensor], layout: int) -> int:
    """ALIGN: the largest power of two (<= 16) dividing every data pointer (in elements), batch
    stride, non-unit stride (c for contiguous, positions for channels_last) and unit-axis extent
    of ``tensors``; 1 for other layouts."""
    if layout == STRIDED:
        return 1
    values = []
    for t in tensors:
        sb, sc, _, sx = _strides(t, layout)
        extent, stride = (t.size(2) * t.size(3), sc) if layout == CONTIGUOUS else (t.size(1), sx)
        values += [t.data_ptr() // t.element_size(), sb, stride, extent]
    return alignment(values)


class _Plan(NamedTuple):
    """Blocks, splits and constexprs of a launch pair (forward or backward)."""

    splits_c: int
    splits_hw: int
    constexprs: dict[str, Any]

    @property
    def splits(self) -> int:
        return self.splits_c * self.splits_hw


def _blocks(tensors: list[Tensor], layout: int, bins: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): the unit-stride block (positions, or channels for channels_last) fits the
    largest map, in [16, 128]; the other fills a _TILE-element tile; a [bins, BLOCK_HW] membership
    mask stays within _TILE elements."""
    hw = triton.next_power_of_2(max(t.size(2) * t.size(3) for t in tensors))
    channels = triton.next_power_of_2(max(t.size(1) for t in tensors))
    hw_max = max(_TILE // bins, _BLOCK_MIN)
    if layout == CHANNELS_LAST:
        block_c = min(max(channels, _BLOCK_MIN), _UNIT_BLOCK_MAX)
        return block_c, max(min(hw, _TILE // block_c, hw_max), _BLOCK_MIN)
    block_hw = min(max(hw, _BLOCK_MIN), _UNIT_BLOCK_MAX, hw_max)
    return min(channels, _TILE // block_hw), block_hw


def _d_channels(fg2: int, backward: bool) -> int:
    """Channels of a D block [BLOCK_CF, FG2]: D of _TILE elements, except in the forward beyond 32
    bins, where 16 channels (the dot's least) keep its registers from spilling (measured with
    ptxas for sm_90, triton 3.6 and 3.8)."""
    return _TILE // fg2 if fg2 <= 32 or backward else _BLOCK_MIN


def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: _PROGRAMS_PER_SM per SM (1 off CUDA)."""
    return _PROGRAMS_PER_SM * _common.sm_count(device) if device.type == "cuda" else 1


def _splits(
    f_s: list[Tensor], h_s: list[Tensor], block_c: int, block_cf: int, block_hw: int, dense: bool, device: torch.device
) -> tuple[int, int]:
    """(channel splits, position splits) per (module, sample): doubled, along the axis with more
    blocks left per split, while the launch has fewer than :func:`_min_programs` programs
    (positions only when ``dense``, i.e. fb == 0)."""
    c_blocks = max(max(triton.cdiv(s.size(1), block_c), triton.cdiv(h.size(1), block_cf)) for s, h in zip(f_s, h_s))
    hw_blocks = max(triton.cdiv(t.size(2) * t.size(3), block_hw) for t in (*f_s, *h_s)) if dense else 1
    splits_c = splits_hw = 1
    target = _min_programs(device)
    while len(f_s) * f_s[0].size(0) * splits_c * splits_hw < target and splits_c * splits_hw < _MAX_SPLITS:
        c_ok, hw_ok = splits_c * 2 <= c_blocks, splits_hw * 2 <= hw_blocks
        if c_ok and (not hw_ok or c_blocks // splits_c >= hw_blocks // splits_hw):
            splits_c *= 2
        elif hw_ok:
            splits_hw *= 2
        else:
            break
    return splits_c, splits_hw


def _plan(
    f_s: list[Tensor],
    h_s: list[Tensor],
    f_t: list[Tensor],
    grid: int,
    power: float,
    feature_grid: int,
    teacher_weighting: bool,
    backward: bool = False,
) -> _Plan:
    tensors = [*f_s, *h_s, *f_t]
    layout = layout_of(tensors)
    g2 = triton.next_power_of_2(grid * grid)
    fg2 = max(triton.next_power_of_2(feature_grid**2), _BLOCK_MIN) if feature_grid > 0 else 1
    block_c, block_hw = _blocks(tensors, layout, max(g2, fg2))
    if feature_grid > 0 and layout == CHANNELS_LAST:
        block_hw = min(block_hw, _CL_DOT_K)
    block_cf = max(_BLOCK_MIN, min(block_c, _d_channels(fg2, backward), _TILE // block_hw)) if feature_grid > 0 else block_c
    splits_c, splits_hw = _splits(f_s, h_s, block_c, block_cf, block_hw, feature_grid == 0, f_s[0].device)
    power = float(power)
    constexprs = {
        "ACC": TL_DTYPES[acc_dtype(f_s[0].dtype)],
        "P": power,
        "INT_P": _common.int_power(power),
        "GRID": grid,
        "G2": g2,
        "FGRID": feature_grid,
        "FG2": fg2,
        "WEIGHTED": teacher_weighting,
        "LAYOUT": layout,
        "ALIGN": _alignment(tensors, layout),
        "BLOCK_C": block_c,
        "BLOCK_CF": block_cf,
        "BLOCK_HW": block_hw,
    }
    return _Plan(splits_c, splits_hw, constexprs)


def _module_args(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor], layout: int) -> tuple:
    """The per-module kernel arguments: f_s, h_s, f_t tuples, ``dims`` and ``strides``."""
    dims = tuple((*s.shape[1:], *h.shape[1:]) for s, h in zip(f_s, h_s))
    strides = tuple((*_strides(s, layout), *_strides(h, layout), *_strides(t, layout)) for s, h, t in zip(f_s, h_s, f_t))
    return tuple(f_s), tuple(h_s), tuple(f_t), dims, strides


def _check(
    f_s: list[Tensor],
    h_s: list[Tensor],
    f_t: list[Tensor],
    grid: int,
    power: float,
    feature_grid: int,
    teacher_weighting: bool,
    name: str,
) -> None:
    """The contract's checks, as the C++ entry points make them."""
    if len(f_s) == 0:
        raise ValueError(f"{name}: f_s must hold at least one module")
    if len(h_s) != len(f_s) or len(f_t) != len(f_s):
        raise ValueError(f"{name}: f_s, h_s and f_t must have equal lengths, got {len(f_s)}, {len(h_s)}, {len(f_t)}")
    batch = f_s[0].size(0) if f_s[0].dim() == 4 else -1
    for arg, tensors in (("f_s", f_s), ("h_s", h_s), ("f_t", f_t)):
        for i, f in enumerate(tensors):
            if f.dim() != 4:
                raise ValueError(f"{name}: {arg}[{i}] must be 4-D (B, C, H, W), got {f.dim()}-D")
            if f.size(0) != batch:
                raise ValueError(f"{name}: {arg}[{i}] has batch {f.size(0)}, f_s[0] has {batch}")
            if f.numel() == 0:
                raise ValueError(f"{name}: {arg}[{i}] is empty (shape {tuple(f.shape)})")
            if f.dtype != (f_t[0].dtype if arg == "f_t" else f_s[0].dtype):
                raise ValueError(f"{name}: all f_s and h_s must share one dtype, all f_t one dtype ({arg}[{i}])")
            if f.device != f_s[0].device:
                raise ValueError(f"{name}: all tensors must be on one device ({arg}[{i}])")
    for i, (h, t) in enumerate(zip(h_s, f_t)):
        if h.shape != t.shape:
            raise ValueError(f"{name}: h_s[{i}] {tuple(h.shape)} and f_t[{i}] {tuple(t.shape)} must have equal shapes")
    for arg, f in (("f_s", f_s[0]), ("f_t", f_t[0])):
        if f.dtype not in TL_DTYPES:
            raise TypeError(f"{name}: {arg} must be float16, bfloat16, float32 or float64, got {f.dtype}")
    if grid < 1:
        raise ValueError(f"{name}: grid must be >= 1, got {grid}")
    if feature_grid < 0:
        raise ValueError(f"{name}: feature_grid must be >= 0, got {feature_grid}")
    if not (math.isfinite(power) and power >= 1.0):
        raise ValueError(f"{name}: power must be a finite number >= 1, got {power}")
    if teacher_weighting and feature_grid != 0:
        raise ValueError(f"{name}: teacher_weighting needs feature_grid 0, got {feature_grid}")


# ----------------------------------------------------------------------------- launchers


def block_attention_forward(
    f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor], grid: int, power: float, feature_grid: int, teacher_weighting: bool
) -> tuple[Tensor, Tensor]:
    """``(terms (L, 2) [feat, map], maps (L, 2, B, g*g) [P_s, P_t])`` of every module: two launches
    (splits, then per (module, sample)) and torch's sum of the (L, B, 2) per-sample partials over B.
    Contract: kdfast/ops/block_attention.py."""
    _check(f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting, "block_attention_forward")
    plan = _plan(f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting)
    c = plan.constexprs
    acc = acc_dtype(f_s[0].dtype)
    batch, device = f_s[0].size(0), f_s[0].device
    part = torch.empty((len(f_s), batch, plan.splits, 3, c["G2"]), dtype=acc, device=device)
    partials = torch.empty((len(f_s), batch, 2), dtype=acc, device=device)
    maps = torch.empty((len(f_s), 2, batch, grid * grid), dtype=acc, device=device)
    block_s = min(triton.next_power_of_2(plan.splits), max(_TILE // c["G2"], 1))
    with on_device(device):
        for m in stage_slices(len(f_s)):
            args = _module_args(f_s[m], h_s[m], f_t[m], c["LAYOUT"])
            modules = len(args[0])
            _partials_kernel[(modules * batch * plan.splits,)](
                *args, part[m], batch, plan.splits_c, plan.splits_hw, num_warps=_NUM_WARPS, **c
            )
            _finish_kernel[(modules * batch,)](
                args[3],
                part[m],
                partials[m],
                maps[m],
                batch,
                plan.splits,
                ACC=c["ACC"],
                GRID=grid,
                G2=c["G2"],
                FGRID=feature_grid,
                WEIGHTED=teacher_weighting,
                BLOCK_S=block_s,
                num_warps=_NUM_WARPS,
            )
    return partials.sum(1), maps


def block_attention_backward(
    grad_terms: Tensor,
    f_s: list[Tensor],
    h_s: list[Tensor],
    f_t: list[Tensor],
    maps: Tensor,
    grid: int,
    power: float,
    feature_grid: int,
    teacher_weighting: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """Contiguous gradients of ``sum_l grad_terms[l, 0] feat_l + grad_terms[l, 1] map_l`` w.r.t.
    f_s and h_s, one launch. ``maps``: the forward's. Contract: kdfast/ops/block_attention.py."""
    name = "block_attention_backward"
    _check(f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting, name)
    acc = acc_dtype(f_s[0].dtype)
    batch, device = f_s[0].size(0), f_s[0].device
    if tuple(grad_terms.shape) != (len(f_s), 2) or not grad_terms.is_floating_point():
        raise ValueError(f"{name}: grad_terms must be a floating ({len(f_s)}, 2) tensor, got {tuple(grad_terms.shape)}")
    if tuple(maps.shape) != (len(f_s), 2, batch, grid * grid) or maps.dtype != acc:
        raise ValueError(f"{name}: maps must be the forward's ({len(f_s)}, 2, {batch}, {grid * grid}) {acc} tensor")
    if grad_terms.device != device or maps.device != device:
        raise ValueError(f"{name}: grad_terms and maps must be on {device}")
    grads_fs = [torch.empty(f.shape, dtype=f.dtype, device=device) for f in f_s]
    grads_hs = [torch.empty(h.shape, dtype=h.dtype, device=device) for h in h_s]
    plan = _plan(f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting, backward=True)
    grad_terms = grad_terms.to(acc).contiguous()
    maps = maps.contiguous()
    with on_device(device):
        for m in stage_slices(len(f_s)):
            fs, hs, ft, dims, strides = _module_args(f_s[m], h_s[m], f_t[m], plan.constexprs["LAYOUT"])
            _backward_kernel[(len(fs) * batch * plan.splits,)](
                fs,
                hs,
                ft,
                tuple(grads_fs[m]),
                tuple(grads_hs[m]),
                dims,
                strides,
                grad_terms[m],
                maps[m],
                batch,
                plan.splits_c,
                plan.splits_hw,
                num_warps=_NUM_WARPS,
                **plan.constexprs,
            )
    return grads_fs, grads_hs
