"""Eager reference of the DKD logit loss (Zhao et al. 2022), exactly as mdistiller computes it.

With ``g`` the target class of a row, ``gt`` its one-hot mask, ``T`` the temperature,
``ps = softmax(z_s / T)``, ``pt = softmax(z_t / T)``::

    TCKD_b = KL([pt_g, 1 - pt_g] || [ps_g, 1 - ps_g])                (binary target/non-target split)
    NCKD_b = KL(softmax(z_t/T - 1000 gt) || softmax(z_s/T - 1000 gt)) (the non-target classes)
    loss_b = T^2 * (alpha * TCKD_b + beta * NCKD_b)

mdistiller's ``1 - ps_g`` is the sum of the non-target probabilities; here it is computed in log
space (``log(1 - ps_g) = logsumexp_{k != g}(z_s/T) - logsumexp_k(z_s/T)``), the same value
without the catastrophic ``log(0)`` when ``ps_g`` rounds to 1. The ``- 1000 gt`` mask is kept as
mdistiller has it (with |z/T| >~ 1000 it no longer removes the target class; that is the
published formula). Gradient w.r.t. ``z_s[b, k]``::

    T * alpha * (ps_k - (pt_g if k == g else (1 - pt_g) * ps_k / (1 - ps_g)))
      + T * beta * (qs_k - qt_k),     qs, qt = the two masked softmaxes

``reduction``: "batchmean" (default; mdistiller's ``/ B``), "sum" or "none" (per row). The
linear warm-up of the DKD weight over the first epochs belongs to the distiller, not the loss.

``-inf`` logits (masked classes) follow kdfast/reference/kd.py: a term of probability 0 adds 0,
in TCKD and NCKD alike, including a masked target and a teacher whose only finite logit is the
target (then ``pt_other = 0`` and ``qt`` is one-hot on the target). Not supported: a student row
whose non-target logits are all -inf (its gradient is NaN here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import compute_dtype
from kdfast.numerics.kd import reduce_rows
from kdfast.reference.kd import kl_terms

MASK = 1000.0  # mdistiller's gt-mask magnitude


def _split_log_probs(z: Tensor, target: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """log p_g and log(1 - p_g) of softmax(z) per row, both in log space (z_g gathered, not
    ``(z * gt).sum``: a -inf logit times 0 would be NaN)."""
    lse = torch.logsumexp(z, dim=1)
    log_target = z.gather(1, target.unsqueeze(1)).squeeze(1) - lse
    log_other = torch.logsumexp(z.masked_fill(gt.bool(), float("-inf")), dim=1) - lse
    return log_target, log_other


def dkd_rows(z_s: Tensor, z_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Per-row DKD loss, shape (B,)."""
    dtype = compute_dtype(z_s.dtype)
    zs = z_s.to(dtype) / temperature
    zt = z_t.detach().to(dtype) / temperature
    gt = F.one_hot(target, zs.shape[1]).to(dtype)
    s_target, s_other = _split_log_probs(zs, target, gt)
    t_target, t_other = _split_log_probs(zt, target, gt)
    tckd = kl_terms(t_target, s_target) + kl_terms(t_other, s_other)
    log_qs = F.log_softmax(zs - MASK * gt, dim=1)
    log_qt = F.log_softmax(zt - MASK * gt, dim=1)
    nckd = kl_terms(log_qt, log_qs).sum(1)
    return (alpha * tckd + beta * nckd) * temperature**2


def dkd_loss(
    z_s: Tensor,
    z_t: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "batchmean",
) -> Tensor:
    return reduce_rows(dkd_rows(z_s, z_t, target, alpha, beta, temperature), reduction)
