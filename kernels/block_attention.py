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

Launch design. ONE forward launch and ONE backward launch cover all modules: program
``r * B + b`` handles sample b of the module in table row r (rows ordered by decreasing work).
The table (int64, on the device) holds per module its index, dims, and for every tensor a data
pointer and its 4 strides (the maps are read in place, any layout); all f_s and h_s share one
dtype and all f_t one (constexprs). A program makes two or three passes over its sample:

1. ``P_s`` over f_s (positions outer, channels inner: the bins are applied once per position block);
2. ``P_t`` and the feature term over (h, t) together, except with teacher weighting, where ``P_t``
   is a pass of its own (w needs it) before the weighted feature pass; with fb > 0 this pass runs
   channels outer (D[c, :] of a channel block is complete after its positions).

Bins are membership masks [bins, positions] built from integer arithmetic per position block.
The forward writes P_s and P_t to ``maps`` and per-(module, sample) partial terms, already
divided by their counts, to ``partials`` (L, B, 2); torch sums them over B (fixed order:
deterministic). The backward recomputes A_s, A_t (and w) from ``maps``, D per channel block
(fb > 0), and writes contiguous gradients. Loads are converted to the accumulation dtype
(float32; float64 for float64 students) before any arithmetic; no atomics.

Where every tensor of a launch has flattenable positions with unit stride (contiguous maps)
the position stride is a literal 1 (HW_UNIT), so loads along positions vectorize; other
layouts (channels_last included) are read through their strides.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import at as at_kernels
from kdfast.kernels._common import TL_DTYPES, acc_dtype, on_device

_EPS = tl.constexpr(1e-12)

# Table columns. A tensor takes 5 columns: data pointer and the strides of b, c, y, x.
_MODULE = tl.constexpr(0)
_CS = tl.constexpr(1)  # student map channels, height, width (3 columns)
_CT = tl.constexpr(4)  # h/t channels, height, width (3 columns)
_FS = tl.constexpr(7)
_HS = tl.constexpr(12)
_FT = tl.constexpr(17)
_GFS = tl.constexpr(22)  # contiguous gradient outputs (backward only)
_GHS = tl.constexpr(23)
_ROW = tl.constexpr(24)

_BLOCK_HW_MAX = 128
_BLOCK_HW_MIN = 16
_TILE = 2048  # elements of a [BLOCK_C, BLOCK_HW] tile
_TILE_3D = 8192  # elements of the [BLOCK_CF, FG2, BLOCK_HW] products of the block feature pass
_NUM_WARPS = 4


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _dims(row, COL: tl.constexpr):
    """(channels, height, width) at ``row[COL:COL + 3]``."""
    return (tl.load(row + COL).to(tl.int32), tl.load(row + COL + 1).to(tl.int32),
            tl.load(row + COL + 2).to(tl.int32))


@triton.jit
def _sample(row, COL: tl.constexpr, b, DTYPE: tl.constexpr):
    """Pointer to sample ``b`` of the tensor at ``row[COL:COL + 5]`` and its c, y, x strides."""
    base = tl.load(row + COL).to(tl.pointer_type(DTYPE))
    return (base + b * tl.load(row + COL + 1), tl.load(row + COL + 2), tl.load(row + COL + 3),
            tl.load(row + COL + 4))


@triton.jit
def _offsets(offs_c, offs_hw, width, sc, sy, sx, HW_UNIT: tl.constexpr):
    """[BLOCK_C, BLOCK_HW] element offsets of channels offs_c at positions offs_hw (y * width + x)."""
    if HW_UNIT:
        pos = offs_hw.to(tl.int64)
    else:
        y = offs_hw // width
        pos = y * sy + (offs_hw - y * width) * sx
    return offs_c[:, None] * sc + pos[None, :]


@triton.jit
def _mask(offs_c, offs_hw, channels, hw):
    return (offs_c < channels)[:, None] & (offs_hw < hw)[None, :]


@triton.jit
def _load(ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


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
def _normalize(p):
    """(A = p / max(||p||, eps), 1 / max(||p||, eps), ||p||) of a bin vector (NaN propagating)."""
    n = at_kernels._sqrt(tl.sum(p * p, axis=0))
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
def _cell_weights(wk, offs_hw, height, width, GRID: tl.constexpr, G2: tl.constexpr):
    """[BLOCK_HW]: w[y, x] = wk[cell(y, x)]."""
    cell = (offs_hw // width) * GRID // height * GRID + (offs_hw % width) * GRID // width
    return tl.sum(tl.where(cell[None, :] == tl.arange(0, G2)[:, None], wk[:, None], 0.0), axis=0)


@triton.jit
def _pooled_map(ptr, sc, sy, sx, channels, height, width, ACC: tl.constexpr, P: tl.constexpr,
                INT_P: tl.constexpr, GRID: tl.constexpr, G2: tl.constexpr, HW_UNIT: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """P [G2] of one sample: positions outer, channels inner."""
    hw = height * width
    acc = tl.zeros([G2], ACC)
    for hw0 in range(0, hw, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        m = tl.zeros([BLOCK_HW], ACC)
        for c0 in range(0, channels, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            v = _load(ptr, _offsets(offs_c, offs_hw, width, sc, sy, sx, HW_UNIT),
                      _mask(offs_c, offs_hw, channels, hw), ACC)
            m += tl.sum(at_kernels._g(v, P, INT_P, False), axis=0)
        acc += _bin_sums(_bins(offs_hw, hw, height, width, GRID, G2), m)
    return acc * _inv_area(height, width, ACC, GRID, G2) / channels.to(ACC)


@triton.jit
def _dense_pass(hp, h_sc, h_sy, h_sx, tp, t_sc, t_sy, t_sx, gp, wk, coef, channels, height, width,
                ACC: tl.constexpr, P: tl.constexpr, INT_P: tl.constexpr, GRID: tl.constexpr,
                G2: tl.constexpr, WEIGHTED: tl.constexpr, MAP_T: tl.constexpr, GRAD: tl.constexpr,
                GRAD_DTYPE: tl.constexpr, HW_UNIT: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_HW: tl.constexpr):
    """Feature term of fb == 0 over (h, t), positions outer: returns ``sum w (h - t)^2`` and, with
    MAP_T, the teacher's P [G2]. With GRAD it writes ``coef * w * (h - t)`` to the contiguous gp
    instead (the sum is then not needed)."""
    hw = height * width
    sq = tl.zeros([BLOCK_HW], ACC)
    p_t = tl.zeros([G2], ACC)
    for hw0 in range(0, hw, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        w = tl.full([BLOCK_HW], 1.0, ACC)
        if WEIGHTED:
            w = _cell_weights(wk, offs_hw, height, width, GRID, G2)
        sq_hw = tl.zeros([BLOCK_HW], ACC)
        m = tl.zeros([BLOCK_HW], ACC)
        for c0 in range(0, channels, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = _mask(offs_c, offs_hw, channels, hw)
            tv = _load(tp, _offsets(offs_c, offs_hw, width, t_sc, t_sy, t_sx, HW_UNIT), mask, ACC)
            d = _load(hp, _offsets(offs_c, offs_hw, width, h_sc, h_sy, h_sx, HW_UNIT), mask, ACC) - tv
            if GRAD:
                grad = coef * w[None, :] * d
                tl.store(gp + offs_c[:, None] * hw + offs_hw[None, :], grad.to(GRAD_DTYPE), mask=mask)
            else:
                sq_hw += tl.sum(d * d, axis=0)
            if MAP_T:
                m += tl.sum(at_kernels._g(tv, P, INT_P, False), axis=0)
        sq += w * sq_hw
        if MAP_T:
            p_t += _bin_sums(_bins(offs_hw, hw, height, width, GRID, G2), m)
    return tl.sum(sq, axis=0), p_t * _inv_area(height, width, ACC, GRID, G2) / channels.to(ACC)


@triton.jit
def _block_diffs(hp, h_sc, h_sy, h_sx, tp, t_sc, t_sy, t_sx, offs_c, channels, height, width,
                 p_t, ACC: tl.constexpr, P: tl.constexpr, INT_P: tl.constexpr, GRID: tl.constexpr,
                 G2: tl.constexpr, FGRID: tl.constexpr, FG2: tl.constexpr, MAP_T: tl.constexpr,
                 HW_UNIT: tl.constexpr, BLOCK_CF: tl.constexpr, BLOCK_HW: tl.constexpr):
    """D [BLOCK_CF, FG2] of the channels offs_c (pooled differences of h and t over the fb x fb
    bins), and with MAP_T the teacher's bin sums of ``|t|^p`` of these channels added to p_t."""
    hw = height * width
    diffs = tl.zeros([BLOCK_CF, FG2], ACC)
    for hw0 in range(0, hw, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = _mask(offs_c, offs_hw, channels, hw)
        tv = _load(tp, _offsets(offs_c, offs_hw, width, t_sc, t_sy, t_sx, HW_UNIT), mask, ACC)
        d = _load(hp, _offsets(offs_c, offs_hw, width, h_sc, h_sy, h_sx, HW_UNIT), mask, ACC) - tv
        inside = _bins(offs_hw, hw, height, width, FGRID, FG2)
        diffs += tl.sum(tl.where(inside[None, :, :], d[:, None, :], 0.0), axis=2)
        if MAP_T:
            if GRID != FGRID:
                inside = _bins(offs_hw, hw, height, width, GRID, G2)
            p_t += _bin_sums(inside, tl.sum(at_kernels._g(tv, P, INT_P, False), axis=0))
    return diffs * _inv_area(height, width, ACC, FGRID, FG2)[None, :], p_t


@triton.jit
def _locate(meta, batch):
    """This program's table row, module index and sample."""
    pid = tl.program_id(0)
    row = meta + (pid // batch) * _ROW
    return row, tl.load(row + _MODULE), pid % batch


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["batch"])
def _forward_kernel(meta, partials, maps, batch, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
                    ACC: tl.constexpr, P: tl.constexpr, INT_P: tl.constexpr, GRID: tl.constexpr,
                    G2: tl.constexpr, FGRID: tl.constexpr, FG2: tl.constexpr, WEIGHTED: tl.constexpr,
                    HW_UNIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CF: tl.constexpr,
                    BLOCK_HW: tl.constexpr):
    """P_s, P_t and the partial terms of one (module, sample)."""
    row, module, b = _locate(meta, batch)
    cs, hs, ws = _dims(row, _CS)
    ct, height, width = _dims(row, _CT)
    fs, fs_sc, fs_sy, fs_sx = _sample(row, _FS, b, S_DTYPE)
    hp, h_sc, h_sy, h_sx = _sample(row, _HS, b, S_DTYPE)
    tp, t_sc, t_sy, t_sx = _sample(row, _FT, b, T_DTYPE)

    p_s = _pooled_map(fs, fs_sc, fs_sy, fs_sx, cs, hs, ws, ACC, P, INT_P, GRID, G2, HW_UNIT, BLOCK_C, BLOCK_HW)
    if FGRID > 0:
        p_t = tl.zeros([G2], ACC)
        sq = tl.zeros([BLOCK_CF, FG2], ACC)
        for c0 in range(0, ct, BLOCK_CF):
            diffs, p_t = _block_diffs(hp, h_sc, h_sy, h_sx, tp, t_sc, t_sy, t_sx, c0 + tl.arange(0, BLOCK_CF),
                                      ct, height, width, p_t, ACC, P, INT_P, GRID, G2, FGRID, FG2, True,
                                      HW_UNIT, BLOCK_CF, BLOCK_HW)
            sq += diffs * diffs
        feat = tl.sum(tl.sum(sq, axis=1), axis=0)
        p_t = p_t * _inv_area(height, width, ACC, GRID, G2) / ct.to(ACC)
        count = ct.to(ACC) * (FGRID * FGRID)
    elif WEIGHTED:
        p_t = _pooled_map(tp, t_sc, t_sy, t_sx, ct, height, width, ACC, P, INT_P, GRID, G2, HW_UNIT, BLOCK_C,
                          BLOCK_HW)
        a_t, _, _ = _normalize(p_t)
        feat, _ = _dense_pass(hp, h_sc, h_sy, h_sx, tp, t_sc, t_sy, t_sx, hp, _weights(a_t, height, width, GRID, G2),
                              0.0, ct, height, width, ACC, P, INT_P, GRID, G2, True, False, False, S_DTYPE,
                              HW_UNIT, BLOCK_C, BLOCK_HW)
        count = ct.to(ACC) * (height * width).to(ACC)
    else:
        feat, p_t = _dense_pass(hp, h_sc, h_sy, h_sx, tp, t_sc, t_sy, t_sx, hp, tl.zeros([G2], ACC), 0.0, ct,
                                height, width, ACC, P, INT_P, GRID, G2, False, True, False, S_DTYPE, HW_UNIT,
                                BLOCK_C, BLOCK_HW)
        count = ct.to(ACC) * (height * width).to(ACC)

    a_s, _, _ = _normalize(p_s)
    a_t, _, _ = _normalize(p_t)
    diff = a_s - a_t
    map_term = tl.sum(diff * diff, axis=0) / (batch * GRID * GRID).to(ACC)
    out = partials + (module * batch + b) * 2
    tl.store(out, feat / (batch.to(ACC) * count))
    tl.store(out + 1, map_term)
    k = tl.arange(0, G2)
    valid = k < GRID * GRID
    maps_s = maps + (module * 2 * batch + b) * (GRID * GRID)
    tl.store(maps_s + k, p_s, mask=valid)
    tl.store(maps_s + batch * (GRID * GRID) + k, p_t, mask=valid)


@triton.jit(do_not_specialize=["batch"])
def _backward_kernel(meta, grad_terms, maps, batch, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
                     ACC: tl.constexpr, P: tl.constexpr, INT_P: tl.constexpr, GRID: tl.constexpr,
                     G2: tl.constexpr, FGRID: tl.constexpr, FG2: tl.constexpr, WEIGHTED: tl.constexpr,
                     HW_UNIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CF: tl.constexpr,
                     BLOCK_HW: tl.constexpr):
    """grad_f_s and grad_h_s of one (module, sample)."""
    row, module, b = _locate(meta, batch)
    cs, hs, ws = _dims(row, _CS)
    ct, height, width = _dims(row, _CT)
    fs, fs_sc, fs_sy, fs_sx = _sample(row, _FS, b, S_DTYPE)
    hp, h_sc, h_sy, h_sx = _sample(row, _HS, b, S_DTYPE)
    tp, t_sc, t_sy, t_sx = _sample(row, _FT, b, T_DTYPE)
    g_fs = tl.load(row + _GFS).to(tl.pointer_type(S_DTYPE)) + b * (cs * hs * ws).to(tl.int64)
    g_h = tl.load(row + _GHS).to(tl.pointer_type(S_DTYPE)) + b * (ct * height * width).to(tl.int64)
    grad_feat = tl.load(grad_terms + module * 2)
    grad_map = tl.load(grad_terms + module * 2 + 1)

    k = tl.arange(0, G2)
    valid = k < GRID * GRID
    maps_s = maps + (module * 2 * batch + b) * (GRID * GRID)
    p_s = tl.load(maps_s + k, mask=valid, other=0.0)
    p_t = tl.load(maps_s + batch * (GRID * GRID) + k, mask=valid, other=0.0)
    a_s, inv_s, n_s = _normalize(p_s)
    a_t, _, _ = _normalize(p_t)

    # Student map: dP per bin, spread over the bins' positions and scaled by 1 / (area Cs).
    d_a = grad_map * 2.0 * (a_s - a_t) / (batch * GRID * GRID).to(ACC)
    proj = tl.where(n_s >= _EPS, tl.sum(a_s * d_a, axis=0), 0.0)
    d_p = (d_a - a_s * proj) * inv_s * _inv_area(hs, ws, ACC, GRID, G2) / cs.to(ACC)
    hw_s = hs * ws
    for hw0 in range(0, hw_s, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        d_m = _spread(_bins(offs_hw, hw_s, hs, ws, GRID, G2), d_p)
        for c0 in range(0, cs, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = _mask(offs_c, offs_hw, cs, hw_s)
            v = _load(fs, _offsets(offs_c, offs_hw, ws, fs_sc, fs_sy, fs_sx, HW_UNIT), mask, ACC)
            grad = d_m[None, :] * at_kernels._g_grad(v, P, INT_P, False)
            tl.store(g_fs + offs_c[:, None] * hw_s + offs_hw[None, :], grad.to(S_DTYPE), mask=mask)

    # Connector output.
    hw = height * width
    if FGRID > 0:
        coef = grad_feat * 2.0 / (batch.to(ACC) * ct.to(ACC) * FGRID * FGRID)
        inv_area = _inv_area(height, width, ACC, FGRID, FG2)
        for c0 in range(0, ct, BLOCK_CF):
            offs_c = c0 + tl.arange(0, BLOCK_CF)
            diffs, unused_p_t = _block_diffs(hp, h_sc, h_sy, h_sx, tp, t_sc, t_sy, t_sx, offs_c, ct, height, width,
                                             p_t, ACC, P, INT_P, GRID, G2, FGRID, FG2, False, HW_UNIT, BLOCK_CF,
                                             BLOCK_HW)
            d_bins = coef * diffs * inv_area[None, :]
            for hw0 in range(0, hw, BLOCK_HW):
                offs_hw = hw0 + tl.arange(0, BLOCK_HW)
                inside = _bins(offs_hw, hw, height, width, FGRID, FG2)
                grad = tl.sum(tl.where(inside[None, :, :], d_bins[:, :, None], 0.0), axis=1)
                tl.store(g_h + offs_c[:, None] * hw + offs_hw[None, :], grad.to(S_DTYPE),
                         mask=_mask(offs_c, offs_hw, ct, hw))
    else:
        coef = grad_feat * 2.0 / (batch.to(ACC) * ct.to(ACC) * hw.to(ACC))
        _dense_pass(hp, h_sc, h_sy, h_sx, tp, t_sc, t_sy, t_sx, g_h, _weights(a_t, height, width, GRID, G2), coef,
                    ct, height, width, ACC, P, INT_P, GRID, G2, WEIGHTED, False, True, S_DTYPE, HW_UNIT, BLOCK_C,
                    BLOCK_HW)


# ----------------------------------------------------------------------------- host helpers


def _check(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor], grid: int, power: float,
           feature_grid: int, teacher_weighting: bool, name: str) -> None:
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


def _columns(t: Tensor) -> list[int]:
    return [t.data_ptr(), *t.stride()]


def _hw_unit(t: Tensor) -> bool:
    """Whether positions y * W + x of ``t`` are at unit stride (contiguous per channel)."""
    _, _, h, w = t.shape
    return (w == 1 or t.stride(3) == 1) and (h == 1 or t.stride(2) == w)


def _launch(kernel, f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting, tensor_args, grads=None):
    """One launch of ``kernel`` over every (module, sample), rows ordered by decreasing work."""
    order = sorted(range(len(f_s)), key=lambda i: -(f_s[i].numel() + 2 * h_s[i].numel()))
    rows = []
    for i in order:
        s, h, t = f_s[i], h_s[i], f_t[i]
        outs = [grads[0][i].data_ptr(), grads[1][i].data_ptr()] if grads is not None else [0, 0]
        rows.append([i, *s.shape[1:], *h.shape[1:], *_columns(s), *_columns(h), *_columns(t), *outs])
    power = float(power)
    integer = power.is_integer() and power <= at_kernels._MAX_INT_POWER
    tensors = [*f_s, *h_s, *f_t]
    block_hw = min(max(triton.next_power_of_2(max(f.size(2) * f.size(3) for f in tensors)), _BLOCK_HW_MIN),
                   _BLOCK_HW_MAX)
    block_c = min(triton.next_power_of_2(max(f.size(1) for f in tensors)), _TILE // block_hw)
    fg2 = triton.next_power_of_2(max(feature_grid, 1) ** 2)
    device, batch = f_s[0].device, f_s[0].size(0)
    with on_device(device):
        kernel[(len(f_s) * batch,)](
            at_kernels._device_table(rows, device), *tensor_args, batch,
            S_DTYPE=TL_DTYPES[f_s[0].dtype], T_DTYPE=TL_DTYPES[f_t[0].dtype], ACC=TL_DTYPES[acc_dtype(f_s[0].dtype)],
            P=power, INT_P=int(power) if integer else -1, GRID=grid, G2=triton.next_power_of_2(grid * grid),
            FGRID=feature_grid, FG2=fg2, WEIGHTED=teacher_weighting, HW_UNIT=all(_hw_unit(f) for f in tensors),
            BLOCK_C=block_c, BLOCK_CF=max(1, min(block_c, _TILE_3D // (fg2 * block_hw))), BLOCK_HW=block_hw,
            num_warps=_NUM_WARPS)


# ----------------------------------------------------------------------------- launchers


def block_attention_forward(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor], grid: int, power: float,
                            feature_grid: int, teacher_weighting: bool) -> tuple[Tensor, Tensor]:
    """``(terms (L, 2) [feat, map], maps (L, 2, B, g*g) [P_s, P_t])`` of every module, one launch
    (plus torch's sum of the (L, B, 2) per-sample partials over B). Contract:
    kdfast/ops/block_attention.py."""
    _check(f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting, "block_attention_forward")
    acc = acc_dtype(f_s[0].dtype)
    batch, device = f_s[0].size(0), f_s[0].device
    partials = torch.empty((len(f_s), batch, 2), dtype=acc, device=device)
    maps = torch.empty((len(f_s), 2, batch, grid * grid), dtype=acc, device=device)
    _launch(_forward_kernel, f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting, (partials, maps))
    return partials.sum(1), maps


def block_attention_backward(grad_terms: Tensor, f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor],
                             maps: Tensor, grid: int, power: float, feature_grid: int,
                             teacher_weighting: bool) -> tuple[list[Tensor], list[Tensor]]:
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
    grads = ([torch.empty(f.shape, dtype=f.dtype, device=device) for f in f_s],
             [torch.empty(h.shape, dtype=h.dtype, device=device) for h in h_s])
    _launch(_backward_kernel, f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting,
            (grad_terms.to(acc).contiguous(), maps.contiguous()), grads)
    return grads
