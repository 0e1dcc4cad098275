"""Backend "torch" of CRD's contrastive (NCE) loss against a memory bank (formulas:
kdfast/ops/crd.py, METHODS.md CRD).

With the scores ``s[b, k] = <M[idx[b, k]], v[b]> / T``, ``P = exp(s) / Z``, ``c = K / N`` and
``eps = 1e-7``::

    loss = (1/B) sum_b [ log1p((c + eps) / P[b, 0]) + sum_{k >= 1} log1p((P[b, k] + eps) / c) ]

(the peers' ``-log(P / (P + c + eps))`` and ``-log(c / (P + c + eps))`` without the cancellation
of a log near 1). The scores are taken from whichever is smaller: the (B, N) products with the
whole bank, then the named columns picked out (the usual case: N <= (K+1) D), or the (B, K+1, D)
gathered rows. Autograd gives the gradient to ``v`` only (the bank and ``Z`` are constants).
Computed in float32 (float64 for a float64 ``v``), the bank converted to that dtype. ``idx``
must be int64 (TypeError) with every value in [0, N) (IndexError: read on the host).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.numerics.common import compute_dtype
from kdfast.numerics.crd import NCE_EPS, check_indices


def bank_scores(emb: Tensor, bank: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """(B, K+1) ``<M[idx[b, k]], v[b]> / T`` in the compute dtype of `emb`; the bank is detached."""
    check_indices(idx, bank.shape[0])
    dtype = compute_dtype(emb.dtype)
    v = emb.to(dtype)
    memory = bank.detach().to(dtype)
    rows, dim = memory.shape
    with torch.autocast(emb.device.type, enabled=False):
        if rows <= idx.shape[1] * dim:
            if memory.is_inference():
                memory = memory.clone()  # saved by the matmul for v's gradient
            products = (v @ memory.T).gather(1, idx)
        else:
            products = torch.einsum("bkd,bd->bk", memory[idx], v)
    return products / temperature


def partition_sums(emb: Tensor, bank: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """``sum_k exp(s[b, k])`` (B,), without gradient: the peers' ``Z`` is their mean times N."""
    with torch.no_grad():
        return bank_scores(emb, bank, idx, temperature).exp().sum(1)


def crd_loss(emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor, temperature: float, n_data: int) -> Tensor:
    """The 0-d NCE loss of one side (module docstring), ``c = K / n_data``."""
    p = bank_scores(emb, bank, idx, temperature).exp() / z.detach().to(compute_dtype(emb.dtype))
    negatives = idx.shape[1] - 1
    loss = torch.log1p((negatives / n_data + NCE_EPS) / p[:, 0]).sum()
    if negatives > 0:
        noise = negatives / n_data
        loss = loss + torch.log1p((p[:, 1:] + NCE_EPS) / noise).sum()
    return loss / emb.shape[0]
