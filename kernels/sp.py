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

Flash-style: no B x B matrix is ever stored. A program owns BLOCK_I rows i. The forward streams
the column tiles j twice, computing the S_s and S_t tiles from X (:func:`_gram_tile`): pass 1
accumulates the row norms, pass 2 the loss and proj rows. The backward recomputes the tiles, forms
the M tile and adds ``M X_s[j]`` into the program's rows of an fp32 (float64) gradient
accumulator, chunk by chunk of D (a read-modify-write of rows no other program touches, after a
barrier). Extra memory: O(B), plus that accumulator when X_s is float16/bfloat16.
Parallelism: ceil(B / BLOCK_I) programs; all the work is the 2 (forward) or 1 (backward)
recomputations of the B x B x (Ds + Dt) Gram products plus ``B^2 Ds`` for ``M X_s``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common, relational as rel
from kdfast.kernels.at import _sqrt
from kdfast.kernels.softmax import check_rows

_EPS = tl.constexpr(1e-12)
_N_STATS = tl.constexpr(3)  # stats columns: inv_s, inv_t, proj
BLOCK_I = 16  # the smallest tl.dot side: the most programs for small batches
BLOCK_J = 32
BLOCK_D = 64


@triton.jit
def _gram_tile(x, stride_b, stride_d, rows_a, ok_a, rows_b, ok_b, n_cols, ACC: tl.constexpr,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_A, BLOCK_B] tile ``<x_a, x_b>`` of the rows ``rows_a`` x ``rows_b`` (rows that are
    not ``ok`` read as 0): ``tl.dot`` over D in BLOCK_D chunks, in ACC with IEEE precision (never
    TF32: the loss compares normalised Gram rows of two networks)."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for d0 in range(0, n_cols, BLOCK_D):
        a = rel.load_rows(x, stride_b, stride_d, rows_a, ok_a, d0, n_cols, ACC, BLOCK_D)
        b = rel.load_rows(x, stride_b, stride_d, rows_b, ok_b, d0, n_cols, ACC, BLOCK_D)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def _tiles(xs, xt, rows_i, ok_i, j0, n, ds, dt, sbs, sds, sbt, sdt, ACC: tl.constexpr,
           BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns j0 + [0, BLOCK_J), their mask and the S_s and S_t tiles of (rows_i, those columns)."""
    rows_j, ok_j = rel.span(j0, n, BLOCK_J)
    s = _gram_tile(xs, sbs, sds, rows_i, ok_i, rows_j, ok_j, ds, ACC, BLOCK_I, BLOCK_J, BLOCK_D)
    t = _gram_tile(xt, sbt, sdt, rows_i, ok_i, rows_j, ok_j, dt, ACC, BLOCK_I, BLOCK_J, BLOCK_D)
    return rows_j, ok_j, s, t


@triton.jit
def _inv_norm(sq):
    """1 / max(sqrt(sq), eps) (NaN propagating) and whether sqrt(sq) >= eps."""
    norm = _sqrt(sq)
    return 1.0 / tl.where(norm < _EPS, _EPS, norm), norm >= _EPS


@triton.jit
def _sp_forward_kernel(xs, xt, stats, loss_rows, n, ds, dt, sbs, sds, sbt, sdt,
                       ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    rows_i, ok_i = rel.span(tl.program_id(0) * BLOCK_I, n, BLOCK_I)
    ss = tl.zeros([BLOCK_I], ACC)
    tt = tl.zeros([BLOCK_I], ACC)
    for j0 in range(0, n, BLOCK_J):
        _, _, s, t = _tiles(xs, xt, rows_i, ok_i, j0, n, ds, dt, sbs, sds, sbt, sdt, ACC,
                            BLOCK_I, BLOCK_J, BLOCK_D)
        ss += tl.sum(s * s, axis=1)
        tt += tl.sum(t * t, axis=1)
    inv_s, projected = _inv_norm(ss)
    inv_t, _ = _inv_norm(tt)

    loss = tl.zeros([BLOCK_I], ACC)
    proj = tl.zeros([BLOCK_I], ACC)
    for j0 in range(0, n, BLOCK_J):
        _, _, s, t = _tiles(xs, xt, rows_i, ok_i, j0, n, ds, dt, sbs, sds, sbt, sdt, ACC,
                            BLOCK_I, BLOCK_J, BLOCK_D)
        g_s = s * inv_s[:, None]
        diff = g_s - t * inv_t[:, None]  # 0 on the masked columns
        loss += tl.sum(diff * diff, axis=1)
        proj += tl.sum(g_s * diff, axis=1)
    out = stats + rows_i * _N_STATS
    tl.store(out, inv_s, mask=ok_i)
    tl.store(out + 1, inv_t, mask=ok_i)
    tl.store(out + 2, tl.where(projected, proj, 0.0), mask=ok_i)
    tl.store(loss_rows + rows_i, loss, mask=ok_i)


@triton.jit
def _coefficients(stats, rows, ok, k):
    """alpha = k inv_s^2 (1 - proj) and beta = k inv_s inv_t of the rows (0 where not ok)."""
    row = stats + rows * _N_STATS
    inv_s = tl.load(row, mask=ok, other=0.0)
    inv_t = tl.load(row + 1, mask=ok, other=0.0)
    proj = tl.load(row + 2, mask=ok, other=0.0)
    return k * inv_s * inv_s * (1.0 - proj), k * inv_s * inv_t


@triton.jit
def _sp_backward_kernel(grad_loss, xs, xt, stats, grad, n, ds, dt, sbs, sds, sbt, sdt,
                        ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    rows_i, ok_i = rel.span(tl.program_id(0) * BLOCK_I, n, BLOCK_I)
    size = n.to(ACC)
    k = 2.0 * tl.load(grad_loss).to(ACC) / (size * size)
    alpha_i, beta_i = _coefficients(stats, rows_i, ok_i, k)
    grad_rows = grad + rows_i[:, None] * ds
    for j0 in range(0, n, BLOCK_J):
        rows_j, ok_j, s, t = _tiles(xs, xt, rows_i, ok_i, j0, n, ds, dt, sbs, sds, sbt, sdt,
                                    ACC, BLOCK_I, BLOCK_J, BLOCK_D)
        alpha_j, beta_j = _coefficients(stats, rows_j, ok_j, k)
        m = (alpha_i[:, None] + alpha_j[None, :]) * s - (beta_i[:, None] + beta_j[None, :]) * t
        tl.debug_barrier()  # the previous j's stores into grad_rows are visible to every thread
        for d0 in range(0, ds, BLOCK_D):
            xj = rel.load_rows(xs, sbs, sds, rows_j, ok_j, d0, ds, ACC, BLOCK_D)
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = ok_i[:, None] & (offs < ds)[None, :]
            acc = tl.load(grad_rows + offs[None, :], mask=mask, other=0.0)
            acc = tl.dot(m, xj, acc, input_precision="ieee")
            tl.store(grad_rows + offs[None, :], acc, mask=mask)


def _constexprs(dtype: torch.dtype) -> dict[str, object]:
    return dict(ACC=_common.TL_DTYPES[_common.acc_dtype(dtype)], BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
                BLOCK_D=BLOCK_D, num_warps=rel.NUM_WARPS)


def sp_forward(x_s: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """SP loss of the (B, Ds) student and (B, Dt) teacher rows (any strides and floating dtypes)
    and the (B, 3) ``[inv_s, inv_t, proj]`` of the backward; both float32 (float64 for a float64
    student)."""
    rel.check_pair("sp_forward", x_s, x_t)
    n = x_s.size(0)
    acc = _common.acc_dtype(x_s.dtype)
    stats = torch.empty((n, 3), dtype=acc, device=x_s.device)
    loss_rows = torch.empty(n, dtype=acc, device=x_s.device)
    with _common.on_device(x_s.device):
        _sp_forward_kernel[(triton.cdiv(n, BLOCK_I),)](x_s, x_t, stats, loss_rows, *rel.pair_args(x_s, x_t),
                                                        **_constexprs(x_s.dtype))
    return loss_rows.sum() / (n * n), stats


def sp_backward(grad_loss: Tensor, x_s: Tensor, x_t: Tensor, stats: Tensor) -> Tensor:
    """Gradient of ``grad_loss * sp_loss`` w.r.t. x_s: contiguous (B, Ds) in x_s's dtype.
    ``grad_loss``: a 0-d tensor (read on the device); ``stats``: from :func:`sp_forward`."""
    name = "sp_backward"
    rel.check_pair(name, x_s, x_t)
    n = x_s.size(0)
    acc = _common.acc_dtype(x_s.dtype)
    check_rows(name, "grad_loss", grad_loss, (), _common.TL_DTYPES, x_s.device)
    check_rows(name, "stats", stats, (n, 3), (acc,), x_s.device)
    grad = torch.zeros((n, x_s.size(1)), dtype=acc, device=x_s.device)
    with _common.on_device(x_s.device):
        _sp_backward_kernel[(triton.cdiv(n, BLOCK_I),)](grad_loss, x_s, x_t, stats.contiguous(), grad,
                                                         *rel.pair_args(x_s, x_t), **_constexprs(x_s.dtype))
    return grad.to(x_s.dtype)
