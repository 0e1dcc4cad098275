"""Backend "torch" of the KD logit loss: per-row ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

Formula and the rules for classes of probability 0 (``-inf`` logits): kdfast/ops/kd.py and
METHODS.md. Computed in the compute dtype of ``z_s`` (:func:`kdfast.numerics.common.compute_dtype`);
the teacher is detached, so autograd differentiates the student's log-softmax only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.numerics.common import compute_dtype


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise KL terms ``exp(log_p) * (log_p - log_q)``, zeroed only where ``exp(log_p) == 0``.

    A class of probability 0 contributes exactly 0 (``0 log 0 = 0``), even where ``log_q == -inf``
    (whose product would be NaN); a NaN ``log_p`` or ``log_q`` gives a NaN term. The masking is in
    place: the product's backward keeps its inputs, not its output."""
    prob = torch.exp(log_p)
    terms = prob * (log_p - log_q)
    return terms.masked_fill_(prob == 0, 0.0)


def scaled_logits(z_s: Tensor, z_t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``(z_s / T, z_t / T)`` in the compute dtype of ``z_s``, the teacher detached."""
    dtype = compute_dtype(z_s.dtype)
    return z_s.to(dtype) / temperature, z_t.detach().to(dtype) / temperature


def kd_rows(z_s: Tensor, z_t: Tensor, temperature: float = 4.0) -> Tensor:
    """Per-row KD losses, shape (B,): ``T^2 * sum_k pt_k (log pt_k - log ps_k)``."""
    zs, zt = scaled_logits(z_s, z_t, temperature)
    return kl_terms(torch.log_softmax(zt, dim=1), torch.log_softmax(zs, dim=1)).sum(dim=1) * temperature**2
