"""Triton kernels of the similarity-preserving (SP) loss; formulas in kdfast/reference/sp.py.

With ``S = X X^T`` of the (B, D) student rows (S_s) and teacher rows (S_t), ``n_i = ||S[i]||_2``,
``inv_i = 1 / max(n_i, 1e-12)`` and ``G = diag(inv) S`` (row-normalised, as F.normalize):

* :func:`sp_forward` -> ``(loss, stats)``: ``loss = sum_ij (G_s - G_t)_ij^2 / B^2`` and the (B, 3)
  ``stats = [inv_s, inv_t, proj]``, ``proj_i = sum_j G_s_ij (G_s - G_t)_ij`` (0 where
  ``n_s_i < 1e-12``: there F.normalize's clamp cuts the norm out of the gradient).
* :func:`sp_backward` -> ``dX_s``: with ``k = 2 * grad_loss / B^2``, ``d loss / d G_s = k (G_s - G_t)``
  and the row-normalisation Jacobian, ``d loss / d S_s = diag(alpha) S_s - diag(beta) S_t``
  where ``alpha = k inv_s^2 (1 - proj)`` and ``beta = k inv_s inv_t``; since S is symmetric,
  ``dX_s = (dS + dS^T) X_s = M X_s`` with ``M_ij = (alpha_i + alpha_j) S_s_ij - (beta_i + beta_j) S_t_ij``.

Kernels (a launch each):

1. ``relational.pair_kernel``: S_s and S_t, split-K over D into (2, splits, B, B) partial sums
   (upper-triangular [BLOCK, BLOCK] tiles stored twice; splits chosen so that about 2 programs
   per SM run: 64 splits at B = 64, D = 16384). float16/bfloat16 tiles go to tl.dot as they are
   (tensor cores: exact products, float32 sums; bfloat16 through float32 in the interpreter,
   whose bfloat16 dot is wrong); float32 tiles with IEEE precision (never TF32: the loss
   compares normalised Gram rows of two networks); float64 in float64.
2. forward ``_sp_rows_kernel`` (a program per row i): adds the splits in order, then two passes
   over the row: the norms, then the loss row and proj (as differences of G, no cancellation of
   ``|G_s|^2 + |G_t|^2 - 2 <G_s, G_t>``). ``loss`` is the sum of the B loss rows.
   backward ``_sp_m_kernel`` (a program per row i): the row of M, and its largest magnitude.
3. backward ``_sp_grad_kernel`` (a [BLOCK, BLOCK_N] tile of dX_s per program): ``M X_s``. For
   float16/bfloat16 X_s on tensor cores: each row of M is divided by its largest magnitude (no
   float16 underflow) and split into two 16-bit terms ``hi + lo`` (relative error 2^-18 for
   bfloat16, 2^-22 for float16 above its subnormals), both multiplied with the native X_s tile;
   float32 (IEEE) and float64 as above.

Work: forward one Gram product per network, only its upper-triangular tiles (about
B^2 (Ds + Dt) / 2 multiply-adds), backward the same plus ``B^2 Ds`` for ``M X_s`` (twice on
tensor cores); the row kernels O(splits B^2). Deterministic: no
atomics, every sum in a fixed order. Extra memory: the (2, splits, B, B) partials (at most about
2 * 2 * 132 * 64^2 floats = 8.6 MB when splits > 1, 8 B^2 bytes at splits = 1), M (B, B) and
O(B) statistics; the gradient is written once, in x_s's dtype.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common
from kdfast.kernels import relational as rel
from kdfast.kernels._common import check_rows, sqrt_rn

_EPS = tl.constexpr(1e-12)
_N_STATS = tl.constexpr(3)  # stats columns: inv_s, inv_t, proj
# Gram columns per tl.dot (BLOCK_D) and gradient columns per program (BLOCK_N), by how the tiles go
# to tl.dot (:func:`_dot_kind`): "native" (16-bit tiles as they are, tensor cores), "float32" (IEEE
# FMA dots, which hold whole operand rows in registers), "float32_sm80" (the same before sm_90)
# and "float64". Measured with ptxas (benchmarks/triton_compile.py, float32 Gram at B = 64, BLOCK
# 64, 8 warps): on sm_90 64 columns compile at 127 registers without spills where 32 spill 8-16
# bytes at 128; on sm_80 64 columns spill 88-144 bytes at 255 registers and 32 spill 40 at 80,
# 16 columns none (128 registers). float64 [64, 64] tiles would take 256 KiB of shared memory.
BLOCK_D = {"native": 64, "float32": 64, "float32_sm80": 16, "float64": 32}
BLOCK_N = {"native": 64, "float32": 64, "float32_sm80": 32, "float64": 32}
MAX_BLOCK_C = 1024  # row kernels: columns per step


@triton.jit
def _inv_norm(norm):
    """1 / max(norm, eps), NaN propagating."""
    return 1.0 / tl.where(norm < _EPS, _EPS, norm)


@triton.jit
def _sp_rows_kernel(partials, stats, loss_rows, n, splits, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row i = program_id(0) from the Gram partials: ``stats[i] = [inv_s, inv_t, proj]`` and
    ``loss_rows[i] = sum_j (G_s - G_t)_ij^2``."""
    i = tl.program_id(0).to(tl.int64)
    nn = rel.as_dtype(n, tl.int64)
    ss = tl.zeros([BLOCK_C], ACC)
    tt = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, n, BLOCK_C):
        cols, ok = rel.span(c0, n, BLOCK_C)
        s = rel.summed(partials, 0, splits, nn, i, cols, ok)
        t = rel.summed(partials, 1, splits, nn, i, cols, ok)
        ss += s * s
        tt += t * t
    norm_s = sqrt_rn(tl.sum(ss, axis=0))
    inv_s = _inv_norm(norm_s)
    inv_t = _inv_norm(sqrt_rn(tl.sum(tt, axis=0)))

    loss = tl.zeros([BLOCK_C], ACC)
    proj = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, n, BLOCK_C):
        cols, ok = rel.span(c0, n, BLOCK_C)
        g_s = rel.summed(partials, 0, splits, nn, i, cols, ok) * inv_s
        diff = g_s - rel.summed(partials, 1, splits, nn, i, cols, ok) * inv_t  # 0 on the masked columns
        loss += diff * diff
        proj += g_s * diff
    out = stats + i * _N_STATS
    tl.store(out, inv_s)
    tl.store(out + 1, inv_t)
    tl.store(out + 2, tl.where(norm_s >= _EPS, tl.sum(proj, axis=0), 0.0))
    tl.store(loss_rows + i, tl.sum(loss, axis=0))


@triton.jit
def _coefficients(stats, rows, ok, k):
    """alpha = k inv_s^2 (1 - proj) and beta = k inv_s inv_t of the rows (0 where not ok)."""
    row = stats + rows * _N_STATS
    inv_s = tl.load(row, mask=ok, other=0.0)
    inv_t = tl.load(row + 1, mask=ok, other=0.0)
    proj = tl.load(row + 2, mask=ok, other=0.0)
    return k * inv_s * inv_s * (1.0 - proj), k * inv_s * inv_t


@triton.jit
def _sp_m_kernel(grad_loss, partials, stats, m, scales, n, splits, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row i = program_id(0) of M (from the Gram partials) and ``scales[i] = max_j |M_ij|``
    (1 where that is 0)."""
    i = tl.program_id(0).to(tl.int64)
    nn = rel.as_dtype(n, tl.int64)
    size = rel.as_dtype(n, ACC)
    k = 2.0 * tl.load(grad_loss).to(ACC) / (size * size)
    alpha_i, beta_i = _coefficients(stats, i, i < nn, k)
    largest = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, n, BLOCK_C):
        cols, ok = rel.span(c0, n, BLOCK_C)
        alpha_j, beta_j = _coefficients(stats, cols, ok, k)
        row = (alpha_i + alpha_j) * rel.summed(partials, 0, splits, nn, i, cols, ok) - (beta_i + beta_j) * rel.summed(
            partials, 1, splits, nn, i, cols, ok
        )
        tl.store(m + i * nn + cols, row, mask=ok)
        largest = tl.maximum(largest, tl.abs(row))
    scale = tl.max(largest, axis=0)
    tl.store(scales + i, tl.where(scale > 0.0, scale, 1.0))


@triton.jit
def _sp_grad_kernel(
    m, scales, xs, grad, n, ds, sb, sd, ACC: tl.constexpr, NATIVE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr
):
    """The [BLOCK, BLOCK_N] tile (program_id(0), program_id(1)) of ``dX_s = M X_s``. NATIVE:
    X_s's float16/bfloat16 tiles as they are, times ``hi + lo`` of the scaled M rows."""
    rows, ok_r = rel.span(tl.program_id(0) * BLOCK, n, BLOCK)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_c = cols < ds
    nn = rel.as_dtype(n, tl.int64)
    acc = tl.zeros([BLOCK, BLOCK_N], ACC)
    if NATIVE:
        scale = tl.load(scales + rows, mask=ok_r, other=1.0)
        inv_scale = 1.0 / scale
    for j0 in range(0, n, BLOCK):
        js, ok_j = rel.span(j0, n, BLOCK)
        mt = tl.load(m + rows[:, None] * nn + js[None, :], mask=ok_r[:, None] & ok_j[None, :], other=0.0)
        xj = tl.load(xs + js[:, None] * sb + cols[None, :] * sd, mask=ok_j[:, None] & ok_c[None, :], other=0.0)
        if NATIVE:
            mt = mt * inv_scale[:, None]
            hi = mt.to(xj.dtype)
            acc = tl.dot(hi, xj, acc)
            acc = tl.dot((mt - hi.to(ACC)).to(xj.dtype), xj, acc)
        else:
            acc = rel.dot(mt, xj, acc, False)
    if NATIVE:
        acc = acc * scale[:, None]
    tl.store(grad + rows[:, None] * ds + cols[None, :], acc.to(grad.dtype.element_ty), mask=ok_r[:, None] & ok_c[None, :])


def _block(n: int) -> int:
    """Tile side of the Gram and gradient tiles: 16 (tl.dot's smallest), 32 or 64."""
    return min(64, max(16, triton.next_power_of_2(n)))


@functools.cache
def _sm80_fma(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU before sm_90 (the narrower float32 tiles of BLOCK_D/BLOCK_N);
    False off CUDA: the interpreter runs the sm_90 widths."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9


def _dot_kind(dtypes: tuple[torch.dtype, ...], device: torch.device) -> str:
    """The key of BLOCK_D/BLOCK_N for tiles of ``dtypes`` (all native, or not) on ``device``."""
    acc = _common.acc_dtype(dtypes[0])
    if all(rel.native_dot(dtype, acc, device) for dtype in dtypes):
        return "native"
    if acc == torch.float64:
        return "float64"
    return "float32_sm80" if _sm80_fma(device) else "float32"


def _block_d(block: int, x_s: Tensor, x_t: Tensor) -> int:
    """Gram columns per tl.dot: BLOCK_D (the native width only if both networks' dots are
    native), at most 2 * block (16 x 64 float32 tiles spill a few bytes where the rows are not
    16-element aligned)."""
    return min(BLOCK_D[_dot_kind((x_s.dtype, x_t.dtype), x_s.device)], 2 * block)


def _block_c(n: int) -> int:
    """Columns per step of the row kernels."""
    return min(MAX_BLOCK_C, max(16, triton.next_power_of_2(n)))


def sp_forward(x_s: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """SP loss of the (B, Ds) student and (B, Dt) teacher rows (any strides and floating dtypes)
    and the (B, 3) ``[inv_s, inv_t, proj]`` of the backward; both float32 (float64 for a float64
    student)."""
    rel.check_pair("sp_forward", x_s, x_t)
    n = x_s.size(0)
    acc = _common.acc_dtype(x_s.dtype)
    block = _block(n)
    partials = rel.pairs(x_s, x_t, True, block, _block_d(block, x_s, x_t))
    stats = torch.empty((n, 3), dtype=acc, device=x_s.device)
    loss_rows = torch.empty(n, dtype=acc, device=x_s.device)
    with _common.on_device(x_s.device):
        _sp_rows_kernel[(n,)](
            partials,
            stats,
            loss_rows,
            n,
            partials.size(1),
            ACC=_common.TL_DTYPES[acc],
            BLOCK_C=_block_c(n),
            num_warps=rel.NUM_WARPS,
        )
    return loss_rows.sum() / (n * n), stats


def sp_backward(grad_loss: Tensor, x_s: Tensor, x_t: Tensor, stats: Tensor) -> Tensor:
    """Gradient of ``grad_loss * sp_loss`` w.r.t. x_s: contiguous (B, Ds) in x_s's dtype.
    ``grad_loss``: a 0-d tensor (read on the device); ``stats``: from :func:`sp_forward`."""
    name = "sp_backward"
    rel.check_pair(name, x_s, x_t)
    n, ds = x_s.shape
    acc = _common.acc_dtype(x_s.dtype)
    device = x_s.device
    check_rows(name, "grad_loss", grad_loss, (), _common.TL_DTYPES, device)
    check_rows(name, "stats", stats, (n, 3), (acc,), device)
    block = _block(n)
    partials = rel.pairs(x_s, x_t, True, block, _block_d(block, x_s, x_t))
    m = torch.empty((n, n), dtype=acc, device=device)
    scales = torch.empty(n, dtype=acc, device=device)
    grad = torch.empty((n, ds), dtype=x_s.dtype, device=device)
    tl_acc = _common.TL_DTYPES[acc]
    with _common.on_device(device):
        _sp_m_kernel[(n,)](
            grad_loss,
            partials,
            stats.contiguous(),
            m,
            scales,
            n,
            partials.size(1),
            ACC=tl_acc,
            BLOCK_C=_block_c(n),
            num_warps=rel.NUM_WARPS,
        )
        kind = _dot_kind((x_s.dtype,), device)
        _sp_grad_kernel[(triton.cdiv(n, block), triton.cdiv(ds, BLOCK_N[kind]))](
            m,
            scales,
            x_s,
            grad,
            n,
            ds,
            *x_s.stride(),
            ACC=tl_acc,
            NATIVE=kind == "native",
            BLOCK=block,
            BLOCK_N=BLOCK_N[kind],
            num_warps=rel.num_warps(block),
        )
    return grad
