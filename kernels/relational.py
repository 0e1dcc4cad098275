"""Helpers shared by the relational kernels (sp.py, rkd.py): losses over the B x B pairs of the
rows of a student's (B, Ds) and a teacher's (B, Dt) matrix, read through their strides.

:func:`pair_kernel` computes the B x B matrix of every pair of rows of both networks, either
the Gram matrix ``S_ab = <x_a, x_b>`` (SP) or the squared distances ``R_ab = ||x_a - x_b||^2``
summed over the differences (RKD), with split-K parallelism: a program owns one
[BLOCK, BLOCK] tile (ti <= tj: the matrices are symmetric, the tile is also stored transposed),
one network and one of ``splits`` column ranges of ``chunk`` columns (a multiple of BLOCK_D),
and writes the tile's partial sums into plane ``(net, split)`` of a (2, splits, B, B) buffer.
:func:`summed` adds the planes of an entry in split order, so results are deterministic.
:func:`plan_splits` picks ``splits`` so that a launch has about :func:`target_programs`
programs, each with at least MIN_SPLIT_BLOCKS column blocks.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common

NUM_WARPS = 4
_PROGRAMS_PER_SM = 2
MIN_SPLIT_BLOCKS = 4  # column blocks of BLOCK_D per split at least


def num_warps(block: int) -> int:
    """Warps of a program that owns [block, block] or [block, 64] tiles: 8 from block 64 (with 4
    those spill registers where the rows are not 16-element aligned and every load is scalar)."""
    return 2 * NUM_WARPS if block >= 64 else NUM_WARPS


@triton.jit
def as_dtype(value, DTYPE: tl.constexpr):
    """An int kernel argument as a 0-d DTYPE tensor. ``value.to(DTYPE)`` would not compile where
    Triton specialised an int argument equal to 1 to a constexpr."""
    return tl.full([], 0, DTYPE) + value


@triton.jit
def span(start, n, BLOCK: tl.constexpr):
    """Indices ``start + [0, BLOCK)`` (int64) and which of them are < n."""
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    return idx, idx < n


@triton.jit
def load_rows(x, stride_b, stride_d, rows, ok, d0, n_cols, BLOCK_D: tl.constexpr):
    """[len(rows), BLOCK_D] ``x[rows, d0 + [0, BLOCK_D)]`` in x's dtype, 0 outside the rows ``ok``
    and the columns < n_cols."""
    offs = d0 + tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs < n_cols)[None, :]
    return tl.load(x + rows[:, None] * stride_b + offs[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def dot(a, b, acc, NATIVE: tl.constexpr):
    """``acc + a @ b`` in acc's dtype. NATIVE: a and b are float16/bfloat16 tiles multiplied as
    they are (tensor cores; their products are exact in float32, acc float32). Else they are
    converted to acc's dtype: IEEE float32 (never TF32) or float64."""
    if NATIVE:
        acc = tl.dot(a, b, acc)
    elif acc.dtype == tl.float64:
        acc = tl.dot(a.to(tl.float64), b.to(tl.float64), acc, out_dtype=tl.float64)
    else:
        acc = tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee")
    return acc


@triton.jit
def _tile(
    x,
    stride_b,
    stride_d,
    rows,
    ok_r,
    cols,
    ok_c,
    d0,
    d1,
    GRAM: tl.constexpr,
    ACC: tl.constexpr,
    NATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK, BLOCK] ``<x_a, x_b>`` (GRAM) or ``||x_a - x_b||^2`` over the columns [d0, d1) of
    the rows ``rows`` x ``cols``."""
    acc = tl.zeros([BLOCK, BLOCK], ACC)
    for c in range(d0, d1, BLOCK_D):
        a = load_rows(x, stride_b, stride_d, rows, ok_r, c, d1, BLOCK_D)
        b = load_rows(x, stride_b, stride_d, cols, ok_c, c, d1, BLOCK_D)
        if GRAM:
            acc = dot(a, tl.trans(b), acc, NATIVE)
        else:
            diff = a.to(ACC)[:, None, :] - b.to(ACC)[None, :, :]
            acc += tl.sum(diff * diff, axis=2)
    return acc


@triton.jit
def pair_kernel(
    xs,
    xt,
    out,
    n,
    ds,
    dt,
    sbs,
    sds,
    sbt,
    sdt,
    chunk_s,
    chunk_t,
    GRAM: tl.constexpr,
    ACC: tl.constexpr,
    NATIVE_S: tl.constexpr,
    NATIVE_T: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (tiles^2, splits, 2): the tile (ti, tj) = divmod(program_id(0), tiles), ti <= tj, of
    the student's (program_id(2) == 0) or teacher's matrix over the columns of split
    program_id(1), into ``out[net, split]`` (and transposed into (tj, ti))."""
    tiles = tl.cdiv(n, BLOCK)
    ti = tl.program_id(0) // tiles
    tj = tl.program_id(0) % tiles
    if ti <= tj:
        split = tl.program_id(1)
        net = tl.program_id(2)
        rows, ok_r = span(ti * BLOCK, n, BLOCK)
        cols, ok_c = span(tj * BLOCK, n, BLOCK)
        if net == 0:
            d0 = split * chunk_s
            tile = _tile(
                xs, sbs, sds, rows, ok_r, cols, ok_c, d0, tl.minimum(d0 + chunk_s, ds), GRAM, ACC, NATIVE_S, BLOCK, BLOCK_D
            )
        else:
            d0 = split * chunk_t
            tile = _tile(
                xt, sbt, sdt, rows, ok_r, cols, ok_c, d0, tl.minimum(d0 + chunk_t, dt), GRAM, ACC, NATIVE_T, BLOCK, BLOCK_D
            )
        nn = as_dtype(n, tl.int64)
        plane = out + (net * tl.num_programs(1) + split) * nn * nn
        # int32 offsets within a tile: int64 ones per element spill registers where n % 16 != 0
        local = tl.arange(0, BLOCK)[:, None] * n + tl.arange(0, BLOCK)[None, :]
        tl.store(plane + (ti * BLOCK * nn + tj * BLOCK) + local, tile, mask=ok_r[:, None] & ok_c[None, :])
        if ti != tj:  # the diagonal tile is complete (and may not be bitwise symmetric)
            tl.store(plane + (tj * BLOCK * nn + ti * BLOCK) + local, tl.trans(tile), mask=ok_c[:, None] & ok_r[None, :])


@triton.jit
def summed(partials, net, splits, nn, row, cols, ok):
    """``sum_split partials[net, split, row, cols]`` in split order (0 where not ok); ``nn``: n as
    int64."""
    offs = row * nn + cols
    acc = tl.load(partials + net * splits * nn * nn + offs, mask=ok, other=0.0)
    for split in range(1, splits):
        acc += tl.load(partials + (net * splits + split) * nn * nn + offs, mask=ok, other=0.0)
    return acc


def target_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: _PROGRAMS_PER_SM per SM (1 off CUDA)."""
    return _PROGRAMS_PER_SM * _common.sm_count(device) if device.type == "cuda" else 1


def bf16_dot(device: torch.device) -> bool:
    """Whether bfloat16 tiles go to tl.dot as they are: on CUDA; the interpreter's bfloat16 dot
    is wrong, so there they are converted to float32 first."""
    return device.type == "cuda"


def native_dot(dtype: torch.dtype, acc: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`dot` multiplies tiles of ``dtype`` as they are (see there)."""
    return acc == torch.float32 and (dtype == torch.float16 or (dtype == torch.bfloat16 and bf16_dot(device)))


def plan_splits(n: int, d: int, block: int, block_d: int, device: torch.device) -> int:
    """Splits of ``d`` columns (in ``block_d`` blocks) for :func:`pair_kernel` with tiles of side
    ``block``: about target_programs(device) programs over the upper-triangular tiles of both
    networks, at least MIN_SPLIT_BLOCKS blocks per split, none empty for the wider network (the
    narrower one's last splits may be: they write zeros)."""
    tiles = triton.cdiv(n, block)
    blocks = triton.cdiv(d, block_d)
    wanted = triton.cdiv(target_programs(device), tiles * (tiles + 1))  # 2 networks
    per = triton.cdiv(blocks, max(1, min(wanted, blocks // MIN_SPLIT_BLOCKS)))
    return triton.cdiv(blocks, per)


def pairs(x_s: Tensor, x_t: Tensor, gram: bool, block: int, block_d: int, out: Tensor | None = None) -> Tensor:
    """The (2, splits, B, B) partial sums of :func:`pair_kernel` in the accumulation dtype of x_s
    (splits from :func:`plan_splits` over max(Ds, Dt)); ``out``: a (2, B, B) buffer to write
    into when splits is 1."""
    n = x_s.size(0)
    device = x_s.device
    acc = _common.acc_dtype(x_s.dtype)
    splits = plan_splits(n, max(x_s.size(1), x_t.size(1)), block, block_d, device)
    chunk_s, chunk_t = (triton.cdiv(x.size(1), splits * block_d) * block_d for x in (x_s, x_t))
    if out is None or splits > 1:
        out = torch.empty((2, splits, n, n), dtype=acc, device=device)
    tiles = triton.cdiv(n, block)
    with _common.on_device(device):
        pair_kernel[(tiles * tiles, splits, 2)](
            x_s,
            x_t,
            out,
            *pair_args(x_s, x_t),
            chunk_s,
            chunk_t,
            GRAM=gram,
            ACC=_common.TL_DTYPES[acc],
            NATIVE_S=native_dot(x_s.dtype, acc, device),
            NATIVE_T=native_dot(x_t.dtype, acc, device),
            BLOCK=block,
            BLOCK_D=block_d,
            num_warps=num_warps(block),
        )
    return out.view(2, splits, n, n)


def check_pair(name: str, x_s: Tensor, x_t: Tensor) -> None:
    """A (B, Ds) student and (B, Dt) teacher: 2-D, floating, one B >= 1 and device, D >= 1."""
    for label, x in (("x_s", x_s), ("x_t", x_t)):
        if x.dim() != 2 or x.size(0) < 1 or x.size(1) < 1 or x.dtype not in _common.TL_DTYPES:
            raise ValueError(
                f"{name}: {label} must be 2-D (B >= 1, D >= 1) float16/bfloat16/"
                f"float32/float64, got {x.dtype} of shape {tuple(x.shape)}"
            )
    if x_s.size(0) != x_t.size(0) or x_s.device != x_t.device:
        raise ValueError(
            f"{name}: x_s and x_t must have one batch size and device, got "
            f"{tuple(x_s.shape)} on {x_s.device} and {tuple(x_t.shape)} on {x_t.device}"
        )


def pair_args(x_s: Tensor, x_t: Tensor) -> tuple[int, ...]:
    """The kernels' shape and stride arguments: n, ds, dt, stride_b_s, stride_d_s, stride_b_t, stride_d_t."""
    return (x_s.size(0), x_s.size(1), x_t.size(1), *x_s.stride(), *x_t.stride())
