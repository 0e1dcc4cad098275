"""Eager reference of the KD logit loss (Hinton et al. 2015); ground truth of every fused backend.

With ``T`` the temperature, ``ps = softmax(z_s / T)`` and ``pt = softmax(z_t / T)`` per row::

    loss_b = T^2 * KL(pt_b || ps_b) = T^2 * sum_k pt_bk * (log pt_bk - log ps_bk)
    d loss_b / d z_s[b] = T * (ps_b - pt_b)

``reduction``: "batchmean" (``sum_b loss_b / B``, the default, as mdistiller), "sum", or "none"
(the (B,) vector). Computed in float32 (float64 for float64 students); the teacher is detached.

Classes of zero probability. A term with ``pt_k == 0`` adds 0 (``0 log 0 = 0``), so a ``-inf``
logit (a masked class) is legitimate: in the teacher it adds 0 to the loss and ``T ps_k`` to
the gradient; in both it adds 0 to either. Only a ``-inf`` student logit under a teacher
probability > 0 makes the loss ``+inf`` (the true KL). Every row needs a finite logit in each
of z_s and z_t; ``+inf`` and NaN logits give NaN rows. Every fused backend follows these rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import compute_dtype
from kdfast.numerics.kd import reduce_rows


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``p * (log p - log q)`` elementwise, ``p = exp(log_p)``; 0 where ``p == 0`` (also where
    ``log q`` is ``-inf`` there: ``F.kl_div`` would give NaN); NaN where ``log_p`` or ``log_q`` is."""
    p = log_p.exp()
    return torch.where(p != 0, p * (log_p - log_q), torch.zeros_like(p))


def kd_rows(z_s: Tensor, z_t: Tensor, temperature: float = 4.0) -> Tensor:
    """Per-row ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, shape (B,)."""
    dtype = compute_dtype(z_s.dtype)
    log_ps = F.log_softmax(z_s.to(dtype) / temperature, dim=1)
    log_pt = F.log_softmax(z_t.detach().to(dtype) / temperature, dim=1)
    return kl_terms(log_pt, log_ps).sum(1) * temperature**2


def kd_loss(z_s: Tensor, z_t: Tensor, temperature: float = 4.0, reduction: str = "batchmean") -> Tensor:
    return reduce_rows(kd_rows(z_s, z_t, temperature), reduction)
