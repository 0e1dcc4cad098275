"""Triton kernels of the DKD logit loss (Zhao et al. 2022, mdistiller's formula); formulas in
kdfast/reference/dkd.py.

With ``zs = z_s / T``, ``zt = z_t / T``, ``g = target[b]``, ``lse`` the log-sum-exp over all
classes, ``lse_other`` over ``k != g`` and ``lse_masked`` of ``z - 1000 [k == g]`` (mdistiller's
mask, exactly: with |z| >~ 1000 it no longer removes the target):

* :func:`dkd_forward` -> ``(loss (B,), stats (B, 6), grad)``, stats columns
  ``[lse_s, lse_t, lse_other_s, lse_other_t, lse_masked_s, lse_masked_t]``::

      loss_b = T^2 (alpha TCKD + beta NCKD)
      TCKD   = sum_{i in {target, other}} pt_i (log pt_i - log ps_i),
               log p_target = z_g - lse, log p_other = lse_other - lse
      NCKD   = sum_k qt_k (log qt_k - log qs_k),  log q_k = z_k - 1000 [k == g] - lse_masked
      (terms with pt_i == 0 or qt_k == 0 add 0)
      grad_k = T alpha (ps_k - (pt_g if k == g else exp(lse_other_t - lse_t + zs_k - lse_other_s)))
               + T beta (qs_k - qt_k)                         (only with with_grad; else empty)

* :func:`dkd_backward` -> ``grad_loss[b]`` times that gradient.

A target outside [0, K) is never dereferenced: its row's loss and gradient are NaN. -inf logits
(masked classes) add 0 where their probability is 0 (kdfast/reference/dkd.py), also when every
non-target teacher logit is -inf: then ``d = +inf``, which every formula below takes exactly.

Kernel design (helpers in softmax.py and _logits.py, as kd.py): pass 1 streams the classes ``k != g`` only
(m, l, a of the non-target softmax p'), and gathers the target logits ``z_g``. Everything else
is per-row algebra on ``d = z_g / T - lse_other`` (the target's log-odds against the rest):
``lse = lse_other + softplus(d)``, ``lse_masked = lse_other + softplus(d - 1000)``,
``log p_target = -softplus(-d)``, ``log p_other = -softplus(d)``, ``log q_target =
-softplus(1000 - d)``, ``log w = log sum_{k != g} q_k = -softplus(d - 1000)``, and
``NCKD = kl(qt_target) + wt (KL(pt' || ps') + log wt - log ws)``. For ``k != g`` the gradient is
``c_s p's_k - c_t p't_k`` with ``c_s = T (alpha (ps_other - pt_other) + beta ws)`` and
``c_t = T beta wt``, at ``g`` it is ``-T (alpha (ps_other - pt_other) + beta (ws - wt))``; a
difference of two probabilities ``x_other - y_other`` is taken as ``y_target - x_target`` where
``x_other + y_other >= 1`` (the smaller operands round less). Rows of at most BLOCK_K classes
are loaded once (ONE_BLOCK); nothing of size B x K besides the gradient; no atomics.
"""

import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common
from kdfast.kernels import _logits as lg
from kdfast.kernels import softmax as sm

_MASK = tl.constexpr(1000.0)  # mdistiller's gt-mask magnitude (subtracted from z / T)
_N_STATS = tl.constexpr(6)  # stats columns, see the module docstring


@triton.jit
def _other_minus(x_target, x_other, y_target, y_other):
    """``x_other - y_other`` (= ``y_target - x_target``) from whichever pair is smaller."""
    return tl.where(x_other + y_other < 1.0, x_other - y_other, y_target - x_target)


@triton.jit
def _dkd_rows(d_s, d_t, temp, alpha, beta, scale):
    """Per-row log-probabilities and gradient coefficients from the target log-odds d_s, d_t.

    Returns (loss terms without KL(pt' || ps'): tckd, nckd_target, log_ws, log_wt;
    gradient: c_s, c_t, value at the target), the gradient scaled by ``scale``."""
    lp_s_g = -sm.softplus(-d_s)  # log ps_target
    lp_s_o = -sm.softplus(d_s)  # log ps_other
    lp_t_g = -sm.softplus(-d_t)
    lp_t_o = -sm.softplus(d_t)
    dm_s = d_s - _MASK
    dm_t = d_t - _MASK
    log_ws = -sm.softplus(dm_s)  # log sum_{k != g} qs_k
    log_wt = -sm.softplus(dm_t)
    lq_s_g = -sm.softplus(-dm_s)  # log qs_target = dm + log ws (no inf - inf for d = +inf)
    lq_t_g = -sm.softplus(-dm_t)
    tckd = sm.kl_term(lp_t_g, lp_t_g - lp_s_g) + sm.kl_term(lp_t_o, lp_t_o - lp_s_o)
    nckd_target = sm.kl_term(lq_t_g, lq_t_g - lq_s_g)

    ws = tl.exp(log_ws)
    wt = tl.exp(log_wt)
    dp = _other_minus(tl.exp(lp_s_g), tl.exp(lp_s_o), tl.exp(lp_t_g), tl.exp(lp_t_o))
    dq = _other_minus(tl.exp(lq_s_g), ws, tl.exp(lq_t_g), wt)
    k = temp * scale
    c_s = k * (alpha * dp + beta * ws)
    c_t = k * beta * wt
    at_target = -k * (alpha * dp + beta * dq)
    return tckd, nckd_target, log_ws, log_wt, c_s, c_t, at_target


@triton.jit
def _dkd_targets(zs_rows, zt_rows, n, rows, target_ptr, stride_target, ACC: tl.constexpr):
    """The target g of each row (``rows`` are clamped in bounds), the gathered z_s[g], z_t[g] in
    ACC and g's validity (:func:`softmax.gather`; ``*_rows``: [ROWS] row pointers)."""
    g = tl.load(target_ptr + rows * stride_target)
    zg_s, g_ok = sm.gather(zs_rows, g, n, ACC)
    zg_t, _ = sm.gather(zt_rows, g, n, ACC)
    return g, zg_s, zg_t, g_ok


@sm.row_kernel
def _dkd_forward_kernel(
    zs_ptr,
    zt_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr,
    batch,
    n,
    stride_s,
    stride_t,
    target_ptr,
    stride_target,
    t_hi,
    t_lo,
    alpha_hi,
    alpha_lo,
    beta_hi,
    beta_lo,
    WITH_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    rows, row_ok, zs_rows, zt_rows, temp = lg.row_start(zs_ptr, zt_ptr, batch, stride_s, stride_t, t_hi, t_lo, ROWS, ACC)
    alpha = _common.scalar(alpha_hi, alpha_lo, ACC)
    beta = _common.scalar(beta_hi, beta_lo, ACC)
    g, zg_s, zg_t, g_ok = _dkd_targets(zs_rows, zt_rows, n, rows, target_ptr, stride_target, ACC)
    inv_t = 1.0 / temp
    block, state = lg.kl_pass(zs_rows, zt_rows, n, g, inv_t, True, ONE_BLOCK, ROWS, BLOCK_K, ACC)
    m_s, l_s, m_t, l_t, a = state

    log_l_s = tl.log(l_s)
    log_l_t = tl.log(l_t)
    # d = z_g / T - lse_other, from raw differences (NaN for a target out of range)
    d_s = (zg_s - m_s) * inv_t - log_l_s
    d_t = (zg_t - m_t) * inv_t - log_l_t
    one = tl.full([ROWS], 1.0, ACC)
    tckd, nckd_target, log_ws, log_wt, c_s, c_t, at_target = _dkd_rows(d_s, d_t, temp, alpha, beta, one)
    kl_other = sm.kl_term(log_wt, sm.kl_rows(m_s, l_s, m_t, l_t, a, inv_t) + log_wt - log_ws)
    loss = temp * temp * (alpha * tckd + beta * (nckd_target + kl_other))
    tl.store(loss_ptr + rows, tl.where(g_ok, loss, float("nan")), mask=row_ok)

    lo_s = m_s * inv_t + log_l_s
    lo_t = m_t * inv_t + log_l_t
    stats = stats_ptr + rows * _N_STATS
    tl.store(stats, lo_s + sm.softplus(d_s), mask=row_ok)
    tl.store(stats + 1, lo_t + sm.softplus(d_t), mask=row_ok)
    tl.store(stats + 2, lo_s, mask=row_ok)
    tl.store(stats + 3, lo_t, mask=row_ok)
    tl.store(stats + 4, lo_s + sm.softplus(d_s - _MASK), mask=row_ok)
    tl.store(stats + 5, lo_t + sm.softplus(d_t - _MASK), mask=row_ok)

    if WITH_GRAD:
        bad = tl.where(g_ok, 0.0, float("nan"))  # NaN gradient rows for a target out of range
        c_s += bad
        c_t += bad
        student, teacher = (m_s, log_l_s, c_s), (m_t, log_l_t, c_t)
        hit = (g, at_target)
        lg.grad_pass(
            grad_ptr, rows, row_ok, zs_rows, zt_rows, n, block, student, teacher, hit, inv_t, True, ONE_BLOCK, BLOCK_K, ACC
        )


@sm.row_kernel
def _dkd_backward_kernel(
    gl_ptr,
    stride_gl,
    zs_ptr,
    zt_ptr,
    stats_ptr,
    stride_stats,
    grad_ptr,
    batch,
    n,
    stride_s,
    stride_t,
    target_ptr,
    stride_target,
    t_hi,
    t_lo,
    alpha_hi,
    alpha_lo,
    beta_hi,
    beta_lo,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    rows, row_ok, zs_rows, zt_rows, temp = lg.row_start(zs_ptr, zt_ptr, batch, stride_s, stride_t, t_hi, t_lo, ROWS, ACC)
    alpha = _common.scalar(alpha_hi, alpha_lo, ACC)
    beta = _common.scalar(beta_hi, beta_lo, ACC)
    g, zg_s, zg_t, g_ok = _dkd_targets(zs_rows, zt_rows, n, rows, target_ptr, stride_target, ACC)
    inv_t = 1.0 / temp
    lo_s, lo_t = lg.saved_pair(stats_ptr, stride_stats, rows, 2, ACC)  # lse_other_s, lse_other_t
    scale = tl.load(gl_ptr + rows * stride_gl).to(ACC)
    _, _, _, _, c_s, c_t, at_target = _dkd_rows(zg_s * inv_t - lo_s, zg_t * inv_t - lo_t, temp, alpha, beta, scale)
    bad = tl.where(g_ok, 0.0, float("nan"))
    student, teacher = (lo_s, c_s + bad), (lo_t, c_t + bad)
    lg.grad_from_lse(
        grad_ptr, rows, row_ok, zs_rows, zt_rows, n, student, teacher, (g, at_target), inv_t, True, ROWS, BLOCK_K, ACC
    )


def dkd_forward(
    z_s: Tensor, z_t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row DKD loss, the 6 stats and (with_grad) the gradient; see the module docstring.
    ``z_s``, ``z_t``: (B, K), floating, dtypes independent; ``target``: (B,) int64."""
    return sm.launch_forward(
        _dkd_forward_kernel, "dkd_forward", z_s, z_t, (target,), temperature, (alpha, beta), _N_STATS.value, with_grad
    )


def dkd_backward(
    grad_loss: Tensor, z_s: Tensor, z_t: Tensor, target: Tensor, stats: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    """``grad_loss[b]`` times the DKD gradient, (B, K) contiguous in z_s's dtype. ``stats``:
    (B, 6) of :func:`dkd_forward` (only ``lse_other_s``, ``lse_other_t`` are read: with the
    gathered ``z_g`` they give every other statistic)."""
    return sm.launch_backward(
        _dkd_backward_kernel, "dkd_backward", grad_loss, z_s, z_t, (target,), stats, temperature, (alpha, beta), _N_STATS.value
    )
