"""Backend "torch" of the DKD logit loss (Zhao et al. 2022, as mdistiller computes it).

Per row, with ``g`` the target class, ``zs = z_s / T``, ``zt = z_t / T``::

    TCKD = KL([pt_g, 1 - pt_g] || [ps_g, 1 - ps_g]),  log(1 - p_g) = logsumexp_{k != g} z - logsumexp z
    NCKD = KL(softmax(zt - 1000 e_g) || softmax(zs - 1000 e_g))
    loss = T^2 * (alpha * TCKD + beta * NCKD)

(kdfast/ops/dkd.py, METHODS.md). The target column is handled by gather/scatter on the scaled
logits: no (B, K) one-hot mask is built. Probability-0 classes add 0 (:func:`kl_terms`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.eager.kd import kl_terms, scaled_logits

MASK = 1000.0  # mdistiller's subtraction from the target logit in NCKD


def binary_log_probs(z: Tensor, column: Tensor) -> Tensor:
    """(B, 2) ``[log p_g, log(1 - p_g)]`` of ``softmax(z)`` per row, ``column`` the (B, 1) targets;
    ``1 - p_g`` as the log-sum-exp of the other classes (no ``log(0)`` when ``p_g`` rounds to 1)."""
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    others = torch.logsumexp(z.scatter(1, column, float("-inf")), dim=1, keepdim=True)
    return torch.cat((z.gather(1, column), others), dim=1) - lse


def non_target_log_probs(z: Tensor, column: Tensor) -> Tensor:
    """``log_softmax(z - MASK * one_hot(g))`` per row, ``column`` the (B, 1) targets."""
    return torch.log_softmax(z.scatter(1, column, z.gather(1, column) - MASK), dim=1)


def dkd_rows(z_s: Tensor, z_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Per-row DKD losses, shape (B,)."""
    zs, zt = scaled_logits(z_s, z_t, temperature)
    column = target.unsqueeze(1)
    tckd = kl_terms(binary_log_probs(zt, column), binary_log_probs(zs, column)).sum(dim=1)
    nckd = kl_terms(non_target_log_probs(zt, column), non_target_log_probs(zs, column)).sum(dim=1)
    return (alpha * tckd + beta * nckd) * temperature**2
