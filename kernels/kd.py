"""Triton kernels of the KD logit loss (Hinton et al. 2015); formulas in kdfast/reference/kd.py.

With ``zs = z_s / T``, ``zt = z_t / T``, ``lse = logsumexp_k`` (natural log), ``log p = z - lse``:

* :func:`kd_forward` -> ``(loss (B,), stats (B, 2) = [lse_s, lse_t], grad)``::

      loss_b = T^2 sum_k pt_k (log pt_k - log ps_k)      (a term with pt_k == 0 adds 0)
      grad   = T (ps - pt)                                (only with with_grad; else empty)

* :func:`kd_backward` -> ``grad_loss[b] * T * (exp(zs - lse_s) - exp(zt - lse_t))``.

loss and stats are float32 (float64 for a float64 student), grad is (B, K) contiguous in
z_s's dtype; the teacher may have any floating dtype (each tensor is read through its own
pointer type, never converted). The reduction over the batch and the scaling by grad_output are
the caller's.

Kernel design (helpers in softmax.py and _logits.py): one program per ROWS rows, a single-pass online softmax
over [ROWS, BLOCK_K] blocks. Pass 1 computes both log-sum-exps and the loss, via
``KL = (a / l_t - (m_t - m_s)) / T + log(l_s / l_t)`` from the running maxima m, the rescaled
sums l and the rescaled pt-weighted log-ratio sum a; pass 2 (with_grad) writes
``T (exp((z_s - m_s)/T - log l_s) - exp((z_t - m_t)/T - log l_t))``. Rows of at most BLOCK_K
classes (ONE_BLOCK) are loaded once: pass 2 reuses the registers of pass 1. Nothing of size
B x K is allocated besides the returned gradient; no atomics (deterministic).
"""

import triton.language as tl
from torch import Tensor

from kdfast.kernels import _logits as lg
from kdfast.kernels import softmax as sm

_N_STATS = tl.constexpr(2)  # stats columns: lse_s, lse_t


@sm.row_kernel
def _kd_forward_kernel(
    zs_ptr,
    zt_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr,
    batch,
    n,
    stride_s,
    stride_t,
    t_hi,
    t_lo,
    WITH_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    rows, row_ok, zs_rows, zt_rows, temp = lg.row_start(zs_ptr, zt_ptr, batch, stride_s, stride_t, t_hi, t_lo, ROWS, ACC)
    inv_t = 1.0 / temp
    none = rows  # unused: nothing excluded (EXCLUDE=False)
    block, state = lg.kl_pass(zs_rows, zt_rows, n, none, inv_t, False, ONE_BLOCK, ROWS, BLOCK_K, ACC)
    m_s, l_s, m_t, l_t, a = state

    log_l_s = tl.log(l_s)
    log_l_t = tl.log(l_t)
    tl.store(loss_ptr + rows, temp * temp * sm.kl_rows(m_s, l_s, m_t, l_t, a, inv_t), mask=row_ok)
    tl.store(stats_ptr + rows * _N_STATS, m_s * inv_t + log_l_s, mask=row_ok)
    tl.store(stats_ptr + rows * _N_STATS + 1, m_t * inv_t + log_l_t, mask=row_ok)

    if WITH_GRAD:
        coef = tl.full([ROWS], 1.0, ACC) * temp
        student, teacher = (m_s, log_l_s, coef), (m_t, log_l_t, coef)
        hit = (none, coef)
        lg.grad_pass(
            grad_ptr, rows, row_ok, zs_rows, zt_rows, n, block, student, teacher, hit, inv_t, False, ONE_BLOCK, BLOCK_K, ACC
        )


@sm.row_kernel
def _kd_backward_kernel(
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
    t_hi,
    t_lo,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    rows, row_ok, zs_rows, zt_rows, temp = lg.row_start(zs_ptr, zt_ptr, batch, stride_s, stride_t, t_hi, t_lo, ROWS, ACC)
    inv_t = 1.0 / temp
    coef = tl.load(gl_ptr + rows * stride_gl).to(ACC) * temp
    lse_s, lse_t = lg.saved_pair(stats_ptr, stride_stats, rows, 0, ACC)
    lg.grad_from_lse(
        grad_ptr, rows, row_ok, zs_rows, zt_rows, n, (lse_s, coef), (lse_t, coef), (rows, coef), inv_t, False, ROWS, BLOCK_K, ACC
    )


def kd_forward(z_s: Tensor, z_t: Tensor, temperature: float, with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KD loss, stats ``[lse_s, lse_t]`` and (with_grad) ``T (ps - pt)``; see the module
    docstring. ``z_s``, ``z_t``: (B, K), floating, dtypes independent."""
    return sm.launch_forward(_kd_forward_kernel, "kd_forward", z_s, z_t, (), temperature, (), _N_STATS.value, with_grad)


def kd_backward(grad_loss: Tensor, z_s: Tensor, z_t: Tensor, stats: Tensor, temperature: float) -> Tensor:
    """``grad_loss[b] * T * (exp(zs - lse_s) - exp(zt - lse_t))``, (B, K) contiguous in z_s's
    dtype; ``stats``: (B, 2) ``[lse_s, lse_t]`` of :func:`kd_forward`; ``grad_loss``: (B,)."""
    return sm.launch_backward(_kd_backward_kernel, "kd_backward", grad_loss, z_s, z_t, (), stats, temperature, (), _N_STATS.value)
