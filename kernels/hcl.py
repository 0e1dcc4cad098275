"""Triton kernels of ReviewKD's hierarchical context loss (HCL); formulas in kdfast/reference/hcl.py,
op contract in kdfast/ops/hcl.py.

Per stage (B, C, H, W) with ``d = fs - ft``, the active levels ``l_j < H`` (weights ``w_j = 2^-(j+1)``,
``tot = 1 + sum w_j``) and their bins k (torch's adaptive-pooling bins, rows
``floor(i H / l) .. ceil((i + 1) H / l) - 1``, columns alike; they overlap where l does not divide H)::

    D[c, k]  = sum_{(y, x) in bin k} d[c, y, x] / area_k                      (the saved cells)
    loss    += full sum d^2 + sum_{c,k} scale_k D[c, k]^2
    full     = 1 / (B C H W tot),  scale_k = w_j(k) / (B C l_j(k)^2 tot)
    d fs     = 2 g (full d + sum_{bins k holding (y, x)} scale_k D[c, k] / area_k)

Launch design. Every launcher covers all stages (up to _common.MAX_STAGES; more are chunked) in ONE
launch and allocates nothing on the host but its outputs: the stages' tensors, sizes, strides and
first program ids are kernel arguments (tuples; a program selects its stage's values with a static
loop over them), the bins and weights are computed in the kernel from the levels (constexprs) and
the stage's H and W. A program owns (stage, sample, BLOCK_C channels) and walks its positions
BLOCK_HW at a time: the [BLOCK_C, BLOCK_HW] tile of d gives sum d^2 and, through a full-precision
``tl.dot`` with the [BLOCK_HW, CELLS2] bin membership of its positions, the bin sums of all
levels at once. The forward writes the program's cells and one partial loss; a one-program-per-stage
launch adds a stage's partials in program order (deterministic, no atomics). The backward reads the
cells, spreads ``scale D / area`` back with the transposed product and writes the gradient tile.

Layouts: contiguous (positions at the literal unit stride), channels_last (channels at unit stride),
or any strides (read through the (c, y, x) strides), chosen per launch from every tensor it reads
and writes. Loads are converted to the accumulation dtype (float32; float64 for float64 students)
before any arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels._common import (
    CHANNELS_LAST,
    TL_DTYPES,
    acc_dtype,
    layout_of,
    on_device,
    pick,
    pick_field,
    pick_int,
    read_tile,
    stage_of,
    stage_slices,
    tile_offsets,
)

_MAX_LEVELS = 4
_MAX_CELLS = 32  # bins of all levels together (sum l^2): the peers' 4, 2, 1 has 21
_BLOCK_MIN = 16  # tl.dot's smallest dimension
# Channels and positions of a tile, at most, and the positions of a tile where bins are summed
# (_DOT_K): the bin sums are an FMA (ieee) tl.dot, whose operand rows sit in registers along all of
# K (the positions). Measured with ptxas: 64 x 64 tiles on 4 warps took 200-255 registers and
# spilled (sm_90, triton 3.8); 32 x 32 on 4 warps spilled 4-8 bytes at 128 registers (sm_90, triton
# 3.6 and 3.8) and at 80 (sm_80); 32 x 16 on 8 warps takes 62-104 registers in the forward and
# 48-68 in the backward (sm_90, triton 3.6 and 3.8), no spills.
_BLOCK_MAX = 32
_TILE = 1024
_DOT_K = 16
_FINISH_BLOCK = 1024
_NUM_WARPS = 8  # see _DOT_K

# Columns of a stage's row of ``strides``: f_s, f_t, grad (c, y, x each; batch separately).
_S = tl.constexpr(0)
_T = tl.constexpr(4)
_G = tl.constexpr(8)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _add_level(k, height, level, row, col, weight_of, weight, total, first, LV: tl.constexpr):
    """Numbers the bins of level LV (if active, l < H) after the ``first`` bins of the levels before
    it: their level, row and column of bins, and the level's weight (halved from the last one)."""
    if LV > 0:
        active = height > LV
        weight = tl.where(active, weight * 0.5, weight)
        total += tl.where(active, weight, 0.0)
        inside = active & (k >= first) & (k < first + LV * LV)
        r = k - first
        row = tl.where(inside, r // LV, row)
        col = tl.where(inside, r % LV, col)
        level = tl.where(inside, LV, level)
        weight_of = tl.where(inside, weight, weight_of)
        first += tl.where(active, LV * LV, 0)
    return level, row, col, weight_of, weight, total, first


@triton.jit
def _bins(
    height,
    width,
    planes,
    ACC: tl.constexpr,
    L0: tl.constexpr,
    L1: tl.constexpr,
    L2: tl.constexpr,
    L3: tl.constexpr,
    CELLS2: tl.constexpr,
):
    """The stage's active bins k < CELLS2 (numbered level by level, row-major in a level): their
    bounds y0, y1, x0, x1 [CELLS2] (empty past the last), 1 / area, the loss scale
    ``w_j / (planes l_j^2 tot)`` (0 past the last) and ``full = 1 / (planes H W tot)``, planes = B C."""
    k = tl.arange(0, CELLS2)
    level = tl.zeros([CELLS2], tl.int32)
    row = tl.zeros([CELLS2], tl.int32)
    col = tl.zeros([CELLS2], tl.int32)
    weight_of = tl.zeros([CELLS2], ACC)
    weight = tl.full([], 1.0, ACC)
    total = tl.full([], 1.0, ACC)
    first = tl.zeros([], tl.int32)
    level, row, col, weight_of, weight, total, first = _add_level(k, height, level, row, col, weight_of, weight, total, first, L0)
    level, row, col, weight_of, weight, total, first = _add_level(k, height, level, row, col, weight_of, weight, total, first, L1)
    level, row, col, weight_of, weight, total, first = _add_level(k, height, level, row, col, weight_of, weight, total, first, L2)
    level, row, col, weight_of, weight, total, first = _add_level(k, height, level, row, col, weight_of, weight, total, first, L3)
    valid = level > 0
    lv = tl.where(valid, level, 1)
    y0 = tl.where(valid, row * height // lv, 0)
    y1 = tl.where(valid, ((row + 1) * height + lv - 1) // lv, 0)
    x0 = (col * width) // lv
    x1 = ((col + 1) * width + lv - 1) // lv
    area = tl.where(valid, (y1 - y0) * (x1 - x0), 1).to(ACC)
    inv_area = tl.where(valid, 1.0 / area, 0.0)
    scale = tl.where(valid, weight_of / (planes * (lv * lv).to(ACC) * total), 0.0)
    full = 1.0 / (planes * (height * width).to(ACC) * total)
    return y0, y1, x0, x1, inv_area, scale, full


@triton.jit
def _membership(offs_hw, hw, width, y0, y1, x0, x1):
    """[CELLS2, BLOCK_HW]: whether bin k holds position offs_hw (y * width + x)."""
    y = (offs_hw // width)[None, :]
    x = (offs_hw % width)[None, :]
    inside = (y >= y0[:, None]) & (y < y1[:, None]) & (x >= x0[:, None]) & (x < x1[:, None])
    return inside & (offs_hw < hw)[None, :]


@triton.jit
def _view(ptrs, strides, r, COL: tl.constexpr, b):
    """Stage r's tensor ``ptrs[r]`` at sample b with its (c, y, x) strides: columns COL .. COL + 2
    of ``strides``, the batch stride at COL + 3."""
    ptr = pick(ptrs, r) + b * pick_field(strides, r, COL + 3, tl.int64)
    sc = pick_field(strides, r, COL, tl.int64)
    return ptr, sc, pick_field(strides, r, COL + 1, tl.int64), pick_field(strides, r, COL + 2, tl.int64)


@triton.jit
def _stage(fs, ft, dims, strides, firsts, batch, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's stage r, sample b, channels offs_c and their mask, the stage's C, H, W, H W and
    ``planes = B C`` (in ACC), and its f_s and f_t views at sample b (:func:`_view`)."""
    pid = tl.program_id(0)
    r = stage_of(pid, firsts)
    channels = pick_field(dims, r, 0, tl.int32)
    height = pick_field(dims, r, 1, tl.int32)
    width = pick_field(dims, r, 2, tl.int32)
    local = pid - pick_int(firsts, r, tl.int32)
    c_blocks = tl.cdiv(channels, BLOCK_C)
    b = (local // c_blocks).to(tl.int64)
    offs_c = (local % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    planes = tl.full([], batch, tl.int64).to(ACC) * channels.to(ACC)
    s = _view(fs, strides, r, _S, b)
    t = _view(ft, strides, r, _T, b)
    return r, b, offs_c, offs_c < channels, channels, height, width, height * width, planes, s, t


@triton.jit
def _cell_rows(cells, rows, n_cells, r, b, channels, offs_c, c_ok, CELLS2: tl.constexpr):
    """[BLOCK_C, CELLS2] pointers to the cells of the program's channels (stage r's rows start at
    ``rows[r]``; row ``b C + c``) and their mask."""
    k = tl.arange(0, CELLS2)
    row = pick_int(rows, r, tl.int32).to(tl.int64) + b * channels + offs_c
    return cells + row[:, None] * n_cells + k[None, :], c_ok[:, None] & (k < n_cells)[None, :]


@triton.jit
def _difference(s, t, offs_c, c_ok, hw0, hw, width, ACC: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Positions ``hw0 + [0, BLOCK_HW)``, the tile's [BLOCK_C, BLOCK_HW] mask and d = fs - ft there,
    in ACC (0 outside the mask), of the views s and t."""
    offs_hw = hw0 + tl.arange(0, BLOCK_HW)
    mask = c_ok[:, None] & (offs_hw < hw)[None, :]
    d = read_tile(s, offs_c, offs_hw, width, mask, LAYOUT, ACC) - read_tile(t, offs_c, offs_hw, width, mask, LAYOUT, ACC)
    return offs_hw, mask, d


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["batch", "n_cells"])
def _hcl_forward_kernel(
    fs,
    ft,
    dims,
    strides,
    firsts,
    rows,
    cells,
    partials,
    batch,
    n_cells,
    ACC: tl.constexpr,
    L0: tl.constexpr,
    L1: tl.constexpr,
    L2: tl.constexpr,
    L3: tl.constexpr,
    CELLS2: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """cells rows of the program's channels (bin means) and partials[pid] (its share of the loss)."""
    r, b, offs_c, c_ok, channels, height, width, hw, planes, s, t = _stage(fs, ft, dims, strides, firsts, batch, ACC, BLOCK_C)
    sq = tl.zeros([BLOCK_C], ACC)
    if CELLS2 > 0:
        y0, y1, x0, x1, inv_area, scale, full = _bins(height, width, planes, ACC, L0, L1, L2, L3, CELLS2)
        sums = tl.zeros([BLOCK_C, CELLS2], ACC)
    else:
        full = 1.0 / (planes * hw.to(ACC))
    for hw0 in range(0, hw, BLOCK_HW):
        offs_hw, _, d = _difference(s, t, offs_c, c_ok, hw0, hw, width, ACC, LAYOUT, BLOCK_HW)
        sq += tl.sum(d * d, axis=1)
        if CELLS2 > 0:
            inside = _membership(offs_hw, hw, width, y0, y1, x0, x1).to(ACC)
            sums = tl.dot(d, tl.trans(inside), sums, input_precision="ieee", out_dtype=ACC)
    partial = full * tl.sum(sq, axis=0)
    if CELLS2 > 0:
        means = sums * inv_area[None, :]
        partial += tl.sum(tl.sum(means * means * scale[None, :], axis=1), axis=0)
        out, out_mask = _cell_rows(cells, rows, n_cells, r, b, channels, offs_c, c_ok, CELLS2)
        tl.store(out, means, mask=out_mask)
    tl.store(partials + tl.program_id(0), partial)


@triton.jit
def _hcl_finish_kernel(partials, firsts, losses, first_stage, BLOCK: tl.constexpr):
    """losses[first_stage + s] = sum of the stage's partials, in program order."""
    s = tl.program_id(0)
    lo = pick_int(firsts, s, tl.int32)
    hi = pick_int(firsts, s + 1, tl.int32)
    acc = tl.zeros([BLOCK], partials.dtype.element_ty)
    for i in range(lo, hi, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < hi, other=0.0)
    tl.store(losses + first_stage + s, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["batch", "n_cells"])
def _hcl_backward_kernel(
    fs,
    ft,
    grads,
    dims,
    strides,
    firsts,
    rows,
    cells,
    grad_losses,
    batch,
    n_cells,
    ACC: tl.constexpr,
    L0: tl.constexpr,
    L1: tl.constexpr,
    L2: tl.constexpr,
    L3: tl.constexpr,
    CELLS2: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """The gradient of f_s on the program's channels: 2 g (full d + spread of scale D / area)."""
    r, b, offs_c, c_ok, channels, height, width, hw, planes, s, t = _stage(fs, ft, dims, strides, firsts, batch, ACC, BLOCK_C)
    k2 = 2.0 * tl.load(grad_losses + r).to(ACC)
    if CELLS2 > 0:
        y0, y1, x0, x1, inv_area, scale, full = _bins(height, width, planes, ACC, L0, L1, L2, L3, CELLS2)
        means_at, means_mask = _cell_rows(cells, rows, n_cells, r, b, channels, offs_c, c_ok, CELLS2)
        means = tl.load(means_at, mask=means_mask, other=0.0)
        spread = means * (k2 * scale * inv_area)[None, :]
    else:
        full = 1.0 / (planes * hw.to(ACC))
    full = k2 * full
    g = _view(grads, strides, r, _G, b)
    for hw0 in range(0, hw, BLOCK_HW):
        offs_hw, mask, d = _difference(s, t, offs_c, c_ok, hw0, hw, width, ACC, LAYOUT, BLOCK_HW)
        grad = full * d
        if CELLS2 > 0:
            inside = _membership(offs_hw, hw, width, y0, y1, x0, x1).to(ACC)
            grad = tl.dot(spread, inside, grad, input_precision="ieee", out_dtype=ACC)
        out = g[0] + tile_offsets(offs_c, offs_hw, width, g[1], g[2], g[3], LAYOUT)
        tl.store(out, grad.to(g[0].dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host helpers


def _strides(t: Tensor, layout: int) -> tuple[int, int, int, int]:
    """(c, y, x, b) strides; with channels_last the x column is the stride of the flattened
    positions (that of y where W == 1)."""
    x = t.stride(2) if layout == CHANNELS_LAST and t.size(3) == 1 else t.stride(3)
    return t.stride(1), t.stride(2), x, t.stride(0)


class _Plan(NamedTuple):
    layout: int
    block_c: int
    block_hw: int
    cells2: int


def _plan(f_s: list[Tensor], tensors: list[Tensor], n_cells: int) -> _Plan:
    """Layout and blocks of a launch: the unit-stride block fits the largest map (positions, or
    channels for channels_last) in [16, 32], the other fills a _TILE-element tile, also in [16, 32]."""
    layout = layout_of(tensors)
    hw = triton.next_power_of_2(max(f.size(2) * f.size(3) for f in f_s))
    channels = triton.next_power_of_2(max(f.size(1) for f in f_s))
    if layout == CHANNELS_LAST:
        block_c = min(max(channels, _BLOCK_MIN), _BLOCK_MAX)
        block_hw = min(max(hw, _BLOCK_MIN), _TILE // block_c, _BLOCK_MAX)
    else:
        block_hw = min(max(hw, _BLOCK_MIN), _BLOCK_MAX)
        block_c = min(max(channels, _BLOCK_MIN), _TILE // block_hw, _BLOCK_MAX)
    cells2 = max(triton.next_power_of_2(n_cells), _BLOCK_MIN) if n_cells > 0 else 0
    if cells2 > 0:
        block_hw = min(block_hw, _DOT_K)
    return _Plan(layout, block_c, block_hw, cells2)


def _check(name: str, f_s: list[Tensor], f_t: list[Tensor], levels: list[int]) -> tuple[int, int]:
    """The contract's checks, as the C++ entry points make them; returns (R, N)."""
    if len(f_s) == 0:
        raise ValueError(f"{name}: f_s must hold at least one stage")
    if len(f_t) != len(f_s):
        raise ValueError(f"{name}: f_s and f_t must have as many stages, got {len(f_s)} and {len(f_t)}")
    if len(levels) > _MAX_LEVELS:
        raise ValueError(f"{name}: at most {_MAX_LEVELS} levels, got {list(levels)}")
    if any(level < 1 for level in levels):
        raise ValueError(f"{name}: levels must be >= 1, got {list(levels)}")
    n_cells = sum(level * level for level in levels)
    if n_cells > _MAX_CELLS:
        raise ValueError(f"{name}: the levels {list(levels)} have more than {_MAX_CELLS} bins together (sum l^2)")
    rows = 0
    for i, (s, t) in enumerate(zip(f_s, f_t)):
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(f"{name}: f_s[{i}] and f_t[{i}] must be 4-D (B, C, H, W), got {tuple(s.shape)} and {tuple(t.shape)}")
        if s.shape != t.shape:
            raise ValueError(f"{name}: f_s[{i}] {tuple(s.shape)} and f_t[{i}] {tuple(t.shape)} must have one shape")
        if s.numel() == 0:
            raise ValueError(f"{name}: f_s[{i}] is empty (shape {tuple(s.shape)})")
        if s.size(0) != f_s[0].size(0):
            raise ValueError(f"{name}: f_s[{i}] has batch {s.size(0)}, f_s[0] has {f_s[0].size(0)}")
        if s.dtype not in TL_DTYPES or t.dtype not in TL_DTYPES:
            raise TypeError(f"{name}: f_s and f_t must be float16, bfloat16, float32 or float64, got {s.dtype} and {t.dtype}")
        if s.dtype != f_s[0].dtype or t.dtype != f_t[0].dtype:
            raise ValueError(f"{name}: all f_s must share one dtype and all f_t one dtype (stage {i})")
        if s.device != f_s[0].device or t.device != f_s[0].device:
            raise ValueError(f"{name}: all tensors must be on one device (stage {i})")
        if s.size(1) * s.size(2) * s.size(3) >= 2**31:
            raise ValueError(f"{name}: f_s[{i}] {tuple(s.shape)}: C H W must be below 2^31")
        rows += s.size(0) * s.size(1)
    return rows, n_cells


def _constexprs(levels: list[int], plan: _Plan, acc: torch.dtype) -> dict[str, object]:
    padded = [*levels, 0, 0, 0, 0][:_MAX_LEVELS]
    return {
        "ACC": TL_DTYPES[acc],
        **{f"L{j}": padded[j] for j in range(_MAX_LEVELS)},
        "CELLS2": plan.cells2,
        "LAYOUT": plan.layout,
        "BLOCK_C": plan.block_c,
        "BLOCK_HW": plan.block_hw,
    }


def _stage_args(f_s: list[Tensor], f_t: list[Tensor], grads: list[Tensor], layout: int, first_row: int, block_c: int):
    """dims, strides, firsts (programs) and rows (first cell row) of a chunk's stages."""
    dims = tuple(tuple(f.shape[1:]) for f in f_s)
    strides = tuple((*_strides(s, layout), *_strides(t, layout), *_strides(g, layout)) for s, t, g in zip(f_s, f_t, grads))
    firsts, rows = [0], []
    for f in f_s:
        firsts.append(firsts[-1] + f.size(0) * triton.cdiv(f.size(1), block_c))
        rows.append(first_row)
        first_row += f.size(0) * f.size(1)
    return dims, strides, tuple(firsts), tuple(rows)


def _launches(
    f_s: list[Tensor], f_t: list[Tensor], grads: list[Tensor], plan: _Plan
) -> Iterator[tuple[slice, tuple, tuple, tuple[int, ...], tuple[int, ...]]]:
    """Per launch (at most MAX_STAGES stages): its stages and their dims, strides, firsts and rows
    (:func:`_stage_args`), the cell rows numbered on from the launch before."""
    first_row = 0
    for chunk in stage_slices(len(f_s)):
        dims, strides, firsts, rows = _stage_args(f_s[chunk], f_t[chunk], grads[chunk], plan.layout, first_row, plan.block_c)
        yield chunk, dims, strides, firsts, rows
        first_row = rows[-1] + f_s[chunk][-1].size(0) * f_s[chunk][-1].size(1)


# ----------------------------------------------------------------------------- launchers


def hcl_forward(f_s: list[Tensor], f_t: list[Tensor], levels: list[int]) -> tuple[Tensor, Tensor]:
    """``(losses (L,), cells (R, N))`` of every stage: one launch (per MAX_STAGES stages) of
    (stage, sample, channel block) programs and one of a program per stage adding their partials.
    Contract: kdfast/ops/hcl.py."""
    f_s, f_t, levels = list(f_s), list(f_t), [int(level) for level in levels]
    n_rows, n_cells = _check("hcl_forward", f_s, f_t, levels)
    acc = acc_dtype(f_s[0].dtype)
    device = f_s[0].device
    losses = torch.empty((len(f_s),), dtype=acc, device=device)
    cells = torch.empty((n_rows, n_cells), dtype=acc, device=device)
    plan = _plan(f_s, [*f_s, *f_t], n_cells)
    consts = _constexprs(levels, plan, acc)
    with on_device(device):
        for chunk, dims, strides, firsts, rows in _launches(f_s, f_t, f_s, plan):
            programs = firsts[-1]
            partials = torch.empty((programs,), dtype=acc, device=device)
            _hcl_forward_kernel[(programs,)](
                tuple(f_s[chunk]),
                tuple(f_t[chunk]),
                dims,
                strides,
                firsts,
                rows,
                cells,
                partials,
                f_s[0].size(0),
                n_cells,
                num_warps=_NUM_WARPS,
                **consts,
            )
            stages = len(dims)
            _hcl_finish_kernel[(stages,)](
                partials,
                firsts,
                losses,
                chunk.start,
                BLOCK=min(triton.next_power_of_2(max(programs, 1)), _FINISH_BLOCK),
                num_warps=_NUM_WARPS,
            )
    return losses, cells


def hcl_backward(grad_losses: Tensor, f_s: list[Tensor], f_t: list[Tensor], cells: Tensor, levels: list[int]) -> list[Tensor]:
    """The gradients of ``sum_i grad_losses[i] losses[i]`` w.r.t. every f_s[i] (``empty_like`` of it),
    one launch (per MAX_STAGES stages). ``cells``: the forward's. Contract: kdfast/ops/hcl.py."""
    name = "hcl_backward"
    f_s, f_t, levels = list(f_s), list(f_t), [int(level) for level in levels]
    n_rows, n_cells = _check(name, f_s, f_t, levels)
    acc = acc_dtype(f_s[0].dtype)
    device = f_s[0].device
    if tuple(grad_losses.shape) != (len(f_s),) or grad_losses.dtype not in TL_DTYPES or grad_losses.device != device:
        raise ValueError(
            f"{name}: grad_losses must be a floating ({len(f_s)},) tensor on {device}, got "
            f"{grad_losses.dtype} {tuple(grad_losses.shape)} on {grad_losses.device}"
        )
    if tuple(cells.shape) != (n_rows, n_cells) or cells.dtype != acc or cells.device != device:
        raise ValueError(
            f"{name}: cells must be the forward's ({n_rows}, {n_cells}) {acc} tensor on {device}, got "
            f"{cells.dtype} {tuple(cells.shape)} on {cells.device}"
        )
    grads = [torch.empty_like(f) for f in f_s]
    plan = _plan(f_s, [*f_s, *f_t, *grads], n_cells)
    consts = _constexprs(levels, plan, acc)
    grad_losses = grad_losses.to(acc).contiguous()
    cells = cells.contiguous()
    with on_device(device):
        for chunk, dims, strides, firsts, rows in _launches(f_s, f_t, grads, plan):
            _hcl_backward_kernel[(firsts[-1],)](
                tuple(f_s[chunk]),
                tuple(f_t[chunk]),
                tuple(grads[chunk]),
                dims,
                strides,
                firsts,
                rows,
                cells,
                grad_losses[chunk],
                f_s[0].size(0),
                n_cells,
                num_warps=_NUM_WARPS,
                **consts,
            )
    return grads
