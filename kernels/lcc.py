"""Triton kernels of local correlation consistency (LCC); formulas in kdfast/reference/lcc.py.

The maps f_s (B, Cs, H, W) and f_t (B, Ct, H, W) are already prepared (aligned, masked, pooled):
the grid k divides H and W, regions are rh x rw with rh = H / k, rw = W / k. Row
``n = i * k^2 + py * k + px`` (N = B * k^2 rows) is the descriptor of region (py, px) of sample i::

    x[n][d] = f[i, c, py * rh + y, px * rw + x]        (D = C * rh * rw elements (c, y, x))
    inv[n]  = 1 / max(||x[n]||_2, 1e-12),   S[n, m] = <x[n], x[m]> inv[n] inv[m]
    Delta   = S_s - S_t

* :func:`lcc_forward` -> ``(sums (3,), inv_s (N,), inv_t (N,))``, ``sums[c]`` the sum of
  ``Delta^2`` over the ordered entries (n, m) of class c: 0 intra (i == j), 1 inter (i != j,
  p == q), 2 cross (i != j, p != q), with ``i = n // k^2``, ``p = n % k^2``.
* :func:`lcc_backward` -> the gradient w.r.t. f_s of ``sum_c grad_sums[c] * sums[c]``: with
  ``u[n] = x[n] inv_s[n]``, ``w(n, m) = grad_sums[class(n, m)]`` and
  ``g[n] = 4 sum_m w(n, m) Delta[n, m] u[m]``, ``grad_x[n] = inv_s[n] (g[n] - u[n] <u[n], g[n]>)``
  (``inv_s[n] g[n]`` where ``||x[n]|| <= 1e-12``), scattered back to the map positions.

Nothing of size N x N is ever stored: flash-style tiles. Rows and columns are cut into blocks of
BLOCK descriptors; a tile's two Gram blocks ``X_s[rows] X_s[cols]^T`` and ``X_t[rows] X_t[cols]^T``
are accumulated with ``tl.dot`` over chunks of BLOCK_K descriptor elements (each network over its
own D; float64 tiles as summed broadcast products instead, see :func:`_mm`), scaled by the
inverse norms into the Delta tile, whose entries are classified by (i == j, p == q). The maps
are read in place through their strides: ``x[n][d]`` lies at ``base(n) + off(d)`` with a per-row
base (sample, region corner) and a per-element offset (c, y, x); a channels_last map is walked
with c innermost (any order of d gives the same dot products), so loads follow the unit stride.
Every load is converted to the accumulation dtype (float32; float64 for float64 students) before
any arithmetic, and float32 dots run in IEEE precision (no TF32).

Launches (every reduction deterministic, no atomics):

1. ``_norms_kernel``: inv_s and inv_t, one program per BLOCK rows, both maps.
2. forward ``_sums_kernel``: Delta is symmetric, so only half the tiles are computed. Row
   block a pairs with column blocks ``b = (a + o) mod nb`` for ``o = 0 .. nb // 2``; a tile
   counts once for o = 0 (the diagonal) and for o = nb / 2 (even nb: both (a, b) and (b, a) are
   visited), twice otherwise. Every row block has nb // 2 + 1 tiles (balanced); when there are
   fewer row blocks than the device wants programs, the offsets are split over SPLITS programs
   per row block. Each program writes its 3 partial sums; torch sums the (nb * SPLITS, 3)
   partials (O(N) memory).
3. backward ``_grad_tiles_kernel``: with ``Q = 4 w Delta``, ``g = Q U`` and
   ``<u[n], g[n]> = sum_m Q[n, m] S_s[n, m]``: the projection comes from the tiles themselves,
   not from a pass over g. Program (a, s) owns row block a and the column blocks of split s; it
   recomputes each Delta tile (with the S_s tile it comes from), adds ``(Q inv_s[cols]) @
   X_s[cols]`` to its accumulator rows ``g[s, rows]`` chunk by chunk of Ds (read-modify-write
   by the program alone, L2-resident) and sums ``rowsum(Q S_s)`` into ``proj[s, rows]``.
   SPLITS is 1 once there are at least as many row blocks as SMs, else at most _MAX_SPLITS.
4. ``_grad_kernel``: sums the splits' accumulators and projections in split order and writes
   ``grad_x`` in one pass over them and x. Extra memory: SPLITS x N x (Ds + 1)
   accumulation-dtype values. (Writing grad_x from the tile program itself when SPLITS is 1
   saves this launch but keeps ~28 more registers live across the tile loop: see _TILE_MAXNREG.)
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common

_EPS = tl.constexpr(1e-12)  # inv = 1 / max(||x||_2, eps), as F.normalize

# Tile side (rows = columns, a power of two in [16, 32]: tl.dot needs >= 16) and descriptor chunk,
# by accumulation dtype (float64 multiplies [side, chunk, side] products in registers: smaller).
# The side starts at the largest and is halved while the launch has fewer than
# _PROGRAMS_PER_SM programs per SM for a full (nb x nb) tile grid, so a small N still fills the
# GPU (N = 256 on an H100: a side of 16, 16 x 16 tiles). Measured for sm_90 (triton 3.6 and 3.8):
# IEEE float32 dots keep whole operand rows in registers, so a side
# of 64 spills (triton 3.6: 24-1188 bytes on 4 to 16 warps) and a chunk of 32 does at side 32
# (12-56 bytes on 4 warps); side 32 with 16-element chunks takes <= 140 registers forward and,
# with the backward's launch options below, <= 80 backward.
_MAX_BLOCK = {torch.float32: 32, torch.float64: 32}
_MIN_BLOCK = 16
_BLOCK_K = {torch.float32: 16, torch.float64: 4}
_NUM_WARPS = 8
_PROGRAMS_PER_SM = 4
# Backward tile kernel launch options (float16/bfloat16/float32 maps; float64 keeps the defaults).
# Triton's default software pipelining (3 stages) double-buffers the float32 operand chunks of
# every tile loop in registers and shared memory: 178-184 registers for contiguous float32 maps
# (one 8-warp program per SM) and 128 for channels_last ones. One stage (plain loads; the other
# programs on the SM hide their latency) needs 72-106 registers before ptxas fits them to an
# occupancy step, and a cap of 80 registers, 3 programs of 8 warps per SM (65536 / (3 * 256)
# rounded down to ptxas's allocation unit of 8), then compiles with no spills on sm_90 (triton
# 3.6 and 3.8) and sm_80 (3.8), 72 still without spills: a margin. Without the cap ptxas picks
# its own step (80 or 128 on sm_90) and kept 4-16 bytes in local memory around the 80-register
# step (triton 3.8, bfloat16 contiguous maps) whatever the loop's form. Measured 2026-12-04.
_TILE_STAGES = 1
_TILE_MAXNREG = 80
# Every column split of the backward owns an N x Ds accumulator (float32; float64 for float64
# maps): at most this many, only while there are fewer row blocks than SMs.
_MAX_SPLITS = 4


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _row_base(n, grid, rh, rw, stride_b, stride_y, stride_x):
    """Offset (int64) of the first element of the region of rows ``n``."""
    k2 = grid * grid
    p = n % k2
    return (n // k2).to(tl.int64) * stride_b + ((p // grid) * rh) * stride_y + ((p % grid) * rw) * stride_x


@triton.jit
def _element(d, channels, rh, rw, C_INNER: tl.constexpr):
    """(c, y, x) of descriptor elements ``d``: order (c, y, x), or (y, x, c) when C_INNER."""
    if C_INNER:
        c = d % channels
        r = d // channels
    else:
        c = d // (rh * rw)
        r = d % (rh * rw)
    return c, r // rw, r % rw


@triton.jit
def _offset(d, channels, rh, rw, stride_c, stride_y, stride_x, C_INNER: tl.constexpr):
    """Offsets of descriptor elements ``d`` within a region."""
    c, y, x = _element(d, channels, rh, rw, C_INNER)
    return c * stride_c + y * stride_y + x * stride_x


@triton.jit
def _mm(a, b, acc):
    """``acc + a @ b``: tl.dot in IEEE float32 (no TF32); in float64, whose tl.dot does not
    compile for NVIDIA GPUs in Triton 3.8 (an MMAv2 assertion), summed broadcast products."""
    if acc.dtype == tl.float64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _gram(x, rows, cols, regions, C_INNER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK, BLOCK] tile ``<x[rows], x[cols]>`` of one map ``x`` (a map tuple, see
    :class:`_Map`; 0 outside [0, n))."""
    n, grid, rh, rw = regions
    ptr, channels, dim, stride_b, stride_c, stride_y, stride_x = x
    row_base = _row_base(rows, grid, rh, rw, stride_b, stride_y, stride_x)
    col_base = _row_base(cols, grid, rh, rw, stride_b, stride_y, stride_x)
    rows_ok = rows < n
    cols_ok = cols < n
    acc = tl.zeros([BLOCK, BLOCK], ACC)
    for k0 in range(0, dim, BLOCK_K):
        d = k0 + tl.arange(0, BLOCK_K)
        d_ok = d < dim
        off = _offset(d, channels, rh, rw, stride_c, stride_y, stride_x, C_INNER)
        a = tl.load(ptr + row_base[:, None] + off[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        b = tl.load(ptr + off[:, None] + col_base[None, :], mask=d_ok[:, None] & cols_ok[None, :], other=0.0).to(ACC)
        acc = _mm(a, b, acc)
    return acc


@triton.jit
def _delta(
    rows,
    cols,
    regions,
    inv_s,
    inv_t,
    xs,
    xt,
    S_C_INNER: tl.constexpr,
    T_C_INNER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The tiles ``Delta = S_s - S_t`` and ``S_s`` at [rows, cols] (exactly 0 outside [0, n)^2)."""
    n = regions[0]
    gs = _gram(xs, rows, cols, regions, S_C_INNER, ACC, BLOCK, BLOCK_K)
    gt = _gram(xt, rows, cols, regions, T_C_INNER, ACC, BLOCK, BLOCK_K)
    rows_ok = rows < n
    cols_ok = cols < n
    s_r = tl.load(inv_s + rows, mask=rows_ok, other=0.0)
    s_c = tl.load(inv_s + cols, mask=cols_ok, other=0.0)
    t_r = tl.load(inv_t + rows, mask=rows_ok, other=0.0)
    t_c = tl.load(inv_t + cols, mask=cols_ok, other=0.0)
    corr_s = gs * s_r[:, None] * s_c[None, :]  # 0 outside: the masked loads gave gs = 0
    delta = corr_s - gt * t_r[:, None] * t_c[None, :]
    return tl.where(rows_ok[:, None] & cols_ok[None, :], delta, 0.0), corr_s


@triton.jit
def _classes(rows, cols, grid):
    """[BLOCK, BLOCK] masks: same sample (i == j), same position (p == q)."""
    k2 = grid * grid
    same_sample = (rows // k2)[:, None] == (cols // k2)[None, :]
    same_position = (rows % k2)[:, None] == (cols % k2)[None, :]
    return same_sample, same_position


@triton.jit
def _sum_squares(x, rows, regions, C_INNER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """``||x[rows]||^2`` of the map tuple ``x`` ([BLOCK], 0 outside [0, n))."""
    n, grid, rh, rw = regions
    ptr, channels, dim, stride_b, stride_c, stride_y, stride_x = x
    base = _row_base(rows, grid, rh, rw, stride_b, stride_y, stride_x)
    rows_ok = rows < n
    acc = tl.zeros([BLOCK, BLOCK_K], ACC)
    for k0 in range(0, dim, BLOCK_K):
        d = k0 + tl.arange(0, BLOCK_K)
        off = _offset(d, channels, rh, rw, stride_c, stride_y, stride_x, C_INNER)
        v = tl.load(ptr + base[:, None] + off[None, :], mask=rows_ok[:, None] & (d < dim)[None, :], other=0.0).to(ACC)
        acc += v * v
    return tl.sum(acc, axis=1)


@triton.jit
def _split_sum(g, rows64, d, mask, n, dim, n_splits, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """``sum_s g[s, rows, d]`` of the (SPLITS, n, dim) accumulators, in split order."""
    acc = tl.zeros([BLOCK, BLOCK_K], ACC)
    for s in range(0, n_splits):
        acc += tl.load(g + (s * n + rows64)[:, None] * dim + d[None, :], mask=mask, other=0.0)
    return acc


@triton.jit
def _tile_range(per_split, count, BLOCK: tl.constexpr):
    """Program (a, split) of a tile launch: (a, split, its work items ``first .. last - 1`` of the
    row block's ``count``, the row block's BLOCK rows)."""
    a = tl.program_id(0)
    split = tl.program_id(1)
    first = split * per_split
    last = tl.minimum(first + per_split, count)
    return a, split, first, last, a * BLOCK + tl.arange(0, BLOCK)


# ----------------------------------------------------------------------------- kernels
#
# A map is passed as one tuple argument (:class:`_Map`): (pointer, C, D, strides b, c, y, x), the
# region geometry as one tuple ``regions`` = (N, grid, rh, rw).


@triton.jit
def _norms_kernel(
    inv_s,
    inv_t,
    regions,
    xs,
    xt,
    S_C_INNER: tl.constexpr,
    T_C_INNER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """inv[n] = 1 / max(||x[n]||, eps) of BLOCK rows, student (axis 1 = 0) or teacher (1)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(1) == 0:
        ss = _sum_squares(xs, rows, regions, S_C_INNER, ACC, BLOCK, BLOCK_K)
        out = inv_s
    else:
        ss = _sum_squares(xt, rows, regions, T_C_INNER, ACC, BLOCK, BLOCK_K)
        out = inv_t
    norm = _common.sqrt_rn(ss)
    tl.store(out + rows, 1.0 / tl.where(norm < _EPS, _EPS, norm), mask=rows < regions[0])


@triton.jit
def _sums_kernel(
    partial,
    regions,
    inv_s,
    inv_t,
    xs,
    xt,
    n_blocks,
    per_split,
    S_C_INNER: tl.constexpr,
    T_C_INNER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial class sums of Delta^2 over the tiles (a, (a + o) mod nb) of this program's offsets."""
    a, split, first, last, rows = _tile_range(per_split, n_blocks // 2 + 1, BLOCK)
    grid = regions[1]
    intra = tl.zeros([BLOCK], ACC)
    inter = tl.zeros([BLOCK], ACC)
    cross = tl.zeros([BLOCK], ACC)
    for o in range(first, last):
        cols = ((a + o) % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        delta, _ = _delta(rows, cols, regions, inv_s, inv_t, xs, xt, S_C_INNER, T_C_INNER, ACC, BLOCK, BLOCK_K)
        weight = tl.where((o == 0) | (2 * o == n_blocks), 1.0, 2.0)
        sq = delta * delta * weight
        same_sample, same_position = _classes(rows, cols, grid)
        intra += tl.sum(tl.where(same_sample, sq, 0.0), axis=1)
        inter += tl.sum(tl.where(~same_sample & same_position, sq, 0.0), axis=1)
        cross += tl.sum(tl.where(~same_sample & ~same_position, sq, 0.0), axis=1)
    out = partial + (a * tl.num_programs(1) + split) * 3
    tl.store(out, tl.sum(intra, axis=0))
    tl.store(out + 1, tl.sum(inter, axis=0))
    tl.store(out + 2, tl.sum(cross, axis=0))


@triton.jit
def _grad_tiles_kernel(
    g,
    proj,
    grad_sums,
    grad_sums_stride,
    regions,
    inv_s,
    inv_t,
    xs,
    xt,
    n_blocks,
    per_split,
    S_C_INNER: tl.constexpr,
    T_C_INNER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Over the split's column blocks b, with ``Q = 4 w Delta``: ``g[split, rows] = sum_b (Q
    inv_s[cols]) @ X_s[cols]`` and ``proj[split, rows] = sum_b rowsum(Q S_s)`` (= ``<u[n], g[n]>``,
    as g = Q U)."""
    n, grid, rh, rw = regions
    x_s, cs, ds, sbs, scs, sys, sxs = xs
    a, split, first, last, rows = _tile_range(per_split, n_blocks, BLOCK)
    w_intra = 4.0 * tl.load(grad_sums).to(ACC)
    w_inter = 4.0 * tl.load(grad_sums + grad_sums_stride).to(ACC)
    w_cross = 4.0 * tl.load(grad_sums + 2 * grad_sums_stride).to(ACC)
    rows_ok = rows < n
    g_rows = g + (split * n + rows.to(tl.int64))[:, None] * ds
    row_proj = tl.zeros([BLOCK], ACC)
    for b in range(first, last):
        cols = b * BLOCK + tl.arange(0, BLOCK)
        cols_ok = cols < n
        delta, corr_s = _delta(rows, cols, regions, inv_s, inv_t, xs, xt, S_C_INNER, T_C_INNER, ACC, BLOCK, BLOCK_K)
        same_sample, same_position = _classes(rows, cols, grid)
        q = delta * tl.where(same_sample, w_intra, tl.where(same_position, w_inter, w_cross))
        row_proj += tl.sum(q * corr_s, axis=1)
        p = q * tl.load(inv_s + cols, mask=cols_ok, other=0.0)[None, :]
        col_base = _row_base(cols, grid, rh, rw, sbs, sys, sxs)
        started = b > first  # the first column block starts the accumulator: nothing is loaded
        # g_rows is read back by other threads of the program than those that stored it
        tl.debug_barrier()
        for k0 in range(0, ds, BLOCK_K):
            d = k0 + tl.arange(0, BLOCK_K)
            d_ok = d < ds
            off = _offset(d, cs, rh, rw, scs, sys, sxs, S_C_INNER)
            xc = tl.load(x_s + col_base[:, None] + off[None, :], mask=cols_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
            mask = rows_ok[:, None] & d_ok[None, :]
            acc = tl.load(g_rows + d[None, :], mask=mask & started, other=0.0)
            acc = _mm(p, xc, acc)
            tl.store(g_rows + d[None, :], acc, mask=mask)
    tl.store(proj + split * n + rows, row_proj, mask=rows_ok)


@triton.jit
def _grad_kernel(
    out,
    g,
    proj,
    n_splits,
    inv_s,
    regions,
    xs,
    strides_out,
    S_C_INNER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad_x of BLOCK rows from the splits' partial g and proj, summed in split order: ``grad_x =
    inv (g - u proj)`` (``u = x inv``, ``proj = <u, g>``), ``inv g`` where the norm is clamped
    (inv = 1 / eps), written at the map positions (``strides_out``: b, c, y, x)."""
    n, grid, rh, rw = regions
    x_s, cs, ds, sbs, scs, sys, sxs = xs
    sbo, sco, syo, sxo = strides_out
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rows_ok = rows < n
    row_proj = tl.zeros([BLOCK], ACC)
    for s in range(n_splits):
        row_proj += tl.load(proj + s * n + rows, mask=rows_ok, other=0.0)
    rows64 = rows.to(tl.int64)
    inv = tl.load(inv_s + rows, mask=rows_ok, other=0.0)
    x_coef = tl.where(inv < 1.0 / _EPS, inv * row_proj, 0.0)
    x_base = _row_base(rows, grid, rh, rw, sbs, sys, sxs)
    o_base = _row_base(rows, grid, rh, rw, sbo, syo, sxo)
    for k0 in range(0, ds, BLOCK_K):
        d = k0 + tl.arange(0, BLOCK_K)
        mask = rows_ok[:, None] & (d < ds)[None, :]
        c, y, x = _element(d, cs, rh, rw, S_C_INNER)
        v = tl.load(x_s + x_base[:, None] + (c * scs + y * sys + x * sxs)[None, :], mask=mask, other=0.0).to(ACC)
        gv = _split_sum(g, rows64, d, mask, n, ds, n_splits, ACC, BLOCK, BLOCK_K)
        grad = inv[:, None] * (gv - v * x_coef[:, None])
        tl.store(out + o_base[:, None] + (c * sco + y * syo + x * sxo)[None, :], grad.to(out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host helpers


class _Map(NamedTuple):
    """A prepared map as the kernels read it: ``args`` = (pointer, C, D, strides b, c, y, x), one
    tuple kernel argument, and C_INNER."""

    args: tuple
    c_inner: bool


def _map(f: Tensor, grid: int) -> _Map:
    b, c, h, w = f.shape
    dim = c * (h // grid) * (w // grid)
    return _Map((f, c, dim, *f.stride()), f.stride(1) < f.stride(3))


def _check(name: str, f_s: Tensor, f_t: Tensor, grid: int) -> None:
    for label, f in (("f_s", f_s), ("f_t", f_t)):
        if f.dim() != 4 or f.numel() == 0 or f.dtype not in _common.TL_DTYPES:
            raise ValueError(
                f"{name}: {label} must be a non-empty 4-D (B, C, H, W) float16/bfloat16/"
                f"float32/float64 tensor, got {f.dtype} of shape {tuple(f.shape)}"
            )
    if (f_s.shape[0], *f_s.shape[2:]) != (f_t.shape[0], *f_t.shape[2:]) or f_s.device != f_t.device:
        raise ValueError(
            f"{name}: f_s and f_t must share B, H, W and the device, got "
            f"{tuple(f_s.shape)} on {f_s.device} and {tuple(f_t.shape)} on {f_t.device}"
        )
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"{name}: grid must be an int >= 1, got {grid!r}")
    if f_s.shape[2] % grid or f_s.shape[3] % grid:
        raise ValueError(f"{name}: grid {grid} must divide H and W, got {tuple(f_s.shape[2:])}")


def _target_programs(device: torch.device) -> int:
    """Programs a tile launch should have: _PROGRAMS_PER_SM per SM."""
    return _PROGRAMS_PER_SM * _common.sm_count(device)


def _block(n: int, acc: torch.dtype, device: torch.device) -> int:
    """Tile side: _MAX_BLOCK, halved (down to _MIN_BLOCK) while nb^2 tiles cannot fill the device."""
    block = _MAX_BLOCK[acc]
    while block > _MIN_BLOCK and triton.cdiv(n, block) ** 2 < _target_programs(device):
        block //= 2
    return block


def _split(work: int, splits: int) -> tuple[int, int]:
    """(programs per row block, work items per program): ``work`` items (tile offsets or column
    blocks) of a row block over at most ``splits`` programs, none of them empty."""
    per = triton.cdiv(work, max(1, min(work, splits)))
    return triton.cdiv(work, per), per


class _Launch(NamedTuple):
    n: int
    regions: tuple  # n, grid, rh, rw
    maps: tuple  # the student's and the teacher's map tuples (_Map.args)
    constexprs: dict
    block: int
    n_blocks: int


def _launch(f_s: Tensor, f_t: Tensor, grid: int, block: int | None) -> _Launch:
    b, _, h, w = f_s.shape
    n = b * grid * grid
    acc = _common.acc_dtype(f_s.dtype)
    block = block or _block(n, acc, f_s.device)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    ms, mt = _map(f_s, grid), _map(f_t, grid)
    constexprs = dict(
        S_C_INNER=ms.c_inner,
        T_C_INNER=mt.c_inner,
        ACC=_common.TL_DTYPES[acc],
        BLOCK=block,
        BLOCK_K=_BLOCK_K[acc],
        num_warps=_NUM_WARPS,
    )
    return _Launch(n, (n, grid, h // grid, w // grid), (ms.args, mt.args), constexprs, block, triton.cdiv(n, block))


# ----------------------------------------------------------------------------- launchers


def lcc_forward(
    f_s: Tensor, f_t: Tensor, grid: int, *, block: int | None = None, splits: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Class sums of ``Delta^2`` and the inverse descriptor norms of both maps (module docstring).

    ``f_s`` (B, Cs, H, W), ``f_t`` (B, Ct, H, W): float16/bfloat16/float32/float64 (dtypes
    independent), any strides, ``grid`` dividing H and W. Returns ``sums`` (3,) [intra, inter,
    cross], ``inv_norm_s`` and ``inv_norm_t`` (N,), all float32 (float64 for a float64 f_s).
    ``block`` (tile side, a power of two >= 16) and ``splits`` (programs per row block) override
    the launch heuristics.
    """
    _check("lcc_forward", f_s, f_t, grid)
    launch = _launch(f_s, f_t, grid, block)
    acc = _common.acc_dtype(f_s.dtype)
    device = f_s.device
    inv_s = torch.empty(launch.n, dtype=acc, device=device)
    inv_t = torch.empty(launch.n, dtype=acc, device=device)
    nb = launch.n_blocks
    offsets = nb // 2 + 1
    n_splits, per = _split(offsets, splits or triton.cdiv(_target_programs(device), nb))
    partial = torch.empty((nb * n_splits, 3), dtype=acc, device=device)
    with _common.on_device(device):
        _norms_kernel[(nb, 2)](inv_s, inv_t, launch.regions, *launch.maps, **launch.constexprs)
        _sums_kernel[(nb, n_splits)](partial, launch.regions, inv_s, inv_t, *launch.maps, nb, per, **launch.constexprs)
    return partial.sum(0), inv_s, inv_t


def lcc_backward(
    grad_sums: Tensor,
    f_s: Tensor,
    f_t: Tensor,
    inv_norm_s: Tensor,
    inv_norm_t: Tensor,
    grid: int,
    *,
    block: int | None = None,
    splits: int | None = None,
) -> Tensor:
    """Gradient w.r.t. ``f_s`` of ``sum_c grad_sums[c] * sums[c]`` (module docstring).

    ``grad_sums`` (3,) and the inverse norms (N,) of :func:`lcc_forward` live on the maps'
    device (grad_sums is read by the kernel: no host sync). Returns ``torch.empty_like(f_s)``
    filled. ``block`` and ``splits`` override the launch heuristics.
    """
    name = "lcc_backward"
    _check(name, f_s, f_t, grid)
    launch = _launch(f_s, f_t, grid, block)
    acc = _common.acc_dtype(f_s.dtype)
    device = f_s.device
    _common.check_rows(name, "grad_sums", grad_sums, (3,), _common.TL_DTYPES, device)
    _common.check_rows(name, "inv_norm_s", inv_norm_s, (launch.n,), (acc,), device)
    _common.check_rows(name, "inv_norm_t", inv_norm_t, (launch.n,), (acc,), device)
    inv_s, inv_t = inv_norm_s.contiguous(), inv_norm_t.contiguous()
    ds = launch.maps[0][2]
    nb = launch.n_blocks
    # splits only while the row blocks leave SMs without a program (each split costs an N x Ds
    # accumulator; a tile program of 8 warps at _TILE_MAXNREG registers fits 3 times per SM)
    n_splits, per = _split(nb, splits or min(triton.cdiv(_common.sm_count(device), nb), _MAX_SPLITS))
    g = torch.empty((n_splits, launch.n, ds), dtype=acc, device=device)
    proj = torch.empty((n_splits, launch.n), dtype=acc, device=device)
    grad = torch.empty_like(f_s)
    tile_options = {} if acc == torch.float64 else {"num_stages": _TILE_STAGES, "maxnreg": _TILE_MAXNREG}
    with _common.on_device(device):
        _grad_tiles_kernel[(nb, n_splits)](
            g,
            proj,
            grad_sums,
            grad_sums.stride(0),
            launch.regions,
            inv_s,
            inv_t,
            *launch.maps,
            nb,
            per,
            **launch.constexprs,
            **tile_options,
        )
        _grad_kernel[(nb,)](
            grad,
            g,
            proj,
            n_splits,
            inv_s,
            launch.regions,
            launch.maps[0],
            grad.stride(),
            S_C_INNER=launch.constexprs["S_C_INNER"],
            ACC=launch.constexprs["ACC"],
            BLOCK=launch.block,
            BLOCK_K=launch.constexprs["BLOCK_K"],
            num_warps=launch.constexprs["num_warps"],
        )
    return grad
