"""Device helpers shared by the logit-distillation kernels of KD (kd.py) and DKD (dkd.py).

Both ops' kernels own ROWS rows of a student's and a teacher's (B, K) logits at a temperature T
(the launchers are softmax.launch_forward / launch_backward) and run the passes of softmax.py:

* :func:`row_start`: the prologue of every kernel (rows, row pointers, T);
* :func:`kl_pass` and :func:`grad_pass`: the forward's pass 1 and pass 2, either on one block of
  BLOCK_K classes kept in registers between the passes (ONE_BLOCK) or streamed over the row;
* :func:`saved_pair` and :func:`grad_from_lse`: a backward kernel's read of its saved per-row
  statistics and its gradient pass from the saved log-sum-exps.

Every helper is a ``@triton.jit`` function: inlined where it is called, no cost.
"""

import triton
import triton.language as tl

from kdfast.kernels import _common
from kdfast.kernels import softmax as sm


@triton.jit
def row_start(zs_ptr, zt_ptr, batch, stride_s, stride_t, t_hi, t_lo, ROWS: tl.constexpr, ACC: tl.constexpr):
    """(rows, row_ok, zs_rows, zt_rows, T): this program's rows (:func:`softmax.program_rows`,
    clamped in bounds), the [ROWS] pointers to their first student and teacher logits, and the
    temperature (passed as ``t_hi + t_lo``) in ACC."""
    rows, row_ok = sm.program_rows(batch, ROWS)
    zs_rows = zs_ptr + rows * stride_s
    zt_rows = zt_ptr + rows * stride_t
    return rows, row_ok, zs_rows, zt_rows, _common.scalar(t_hi, t_lo, ACC)


@triton.jit
def kl_pass(
    zs_rows,
    zt_rows,
    n,
    exclude,
    inv_t,
    EXCLUDE: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Pass 1 over the rows (``*_rows``: [ROWS] row pointers): ``(block, (m_s, l_s, m_t, l_t, a))``
    (:func:`softmax.kl_step`). With ONE_BLOCK (n <= BLOCK_K) the row is loaded once and ``block``
    = (cols, valid, zs, zt) keeps it for :func:`grad_pass`; otherwise the row is streamed and
    ``block`` is empty."""
    zs_rows = zs_rows[:, None]
    zt_rows = zt_rows[:, None]
    if ONE_BLOCK:
        cols, valid, zs, zt = sm.load_block(zs_rows, zt_rows, 0, n, BLOCK_K, ACC)
        m_s, l_s, m_t, l_t, a = sm.kl_init(ROWS, ACC)
        state = sm.kl_step(m_s, l_s, m_t, l_t, a, cols, valid, zs, zt, exclude, inv_t, EXCLUDE)
        return (cols, valid, zs, zt), state
    else:
        return (), sm.kl_stream(zs_rows, zt_rows, n, exclude, inv_t, EXCLUDE, ROWS, BLOCK_K, ACC)


@triton.jit
def grad_pass(
    grad_ptr,
    rows,
    row_ok,
    zs_rows,
    zt_rows,
    n,
    block,
    student,
    teacher,
    hit,
    inv_t,
    HIT: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Pass 2 of a forward kernel: writes ``grad[rows]`` (grad: (B, n) contiguous) = ``c_s exp((zs
    - shift_s) / T - off_s) - c_t exp((zt - shift_t) / T - off_t)``, ``hit_val`` at ``hit_col``
    with HIT (:func:`softmax.grad_tile`; ``*_rows``: [ROWS] row pointers, ``student`` = (shift_s,
    off_s, c_s), ``teacher`` likewise, ``hit`` = (hit_col, hit_val)), from the registers of
    :func:`kl_pass`'s ``block`` (ONE_BLOCK) or streamed (:func:`softmax.grad_stream`)."""
    grad_rows = grad_ptr + rows[:, None] * n
    if ONE_BLOCK:
        cols, valid, zs, zt = block
        g = sm.grad_tile(cols, valid, zs, zt, *student, *teacher, *hit, inv_t, HIT)
        sm.store_grad(grad_rows, cols, valid, row_ok, g)
    else:
        sm.grad_stream(
            grad_rows, zs_rows[:, None], zt_rows[:, None], n, row_ok, *student, *teacher, *hit, inv_t, HIT, BLOCK_K, ACC
        )


@triton.jit
def saved_pair(stats_ptr, stride_stats, rows, COL: tl.constexpr, ACC: tl.constexpr):
    """A backward kernel's saved student and teacher statistics of its rows, in ACC:
    (stats[rows, COL], stats[rows, COL + 1])."""
    stat_s = tl.load(stats_ptr + rows * stride_stats + COL).to(ACC)
    stat_t = tl.load(stats_ptr + rows * stride_stats + (COL + 1)).to(ACC)
    return stat_s, stat_t


@triton.jit
def grad_from_lse(
    grad_ptr,
    rows,
    row_ok,
    zs_rows,
    zt_rows,
    n,
    student,
    teacher,
    hit,
    inv_t,
    HIT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Pass 2 of a backward kernel from saved log-sum-exps: ``grad[rows]`` (grad: (B, n)
    contiguous) = ``c_s exp(zs - lse_s) - c_t exp(zt - lse_t)`` per class, ``hit_val`` at
    ``hit_col`` with HIT (:func:`softmax.grad_stream` with shift 0, offset lse; ``*_rows``: [ROWS]
    row pointers, ``student`` = (lse_s, c_s), ``teacher`` likewise, ``hit`` = (hit_col, hit_val))."""
    lse_s, c_s = student
    lse_t, c_t = teacher
    zero = tl.zeros([ROWS], ACC)
    student, teacher = (zero, lse_s, c_s), (zero, lse_t, c_t)
    grad_pass(grad_ptr, rows, row_ok, zs_rows, zt_rows, n, (), student, teacher, hit, inv_t, HIT, False, BLOCK_K, ACC)
