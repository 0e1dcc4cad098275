"""Eager reference of CRD's contrastive (NCE) loss against a memory bank (Tian et al., ICLR 2020),
as RepDistiller and mdistiller compute it (``ContrastMemory`` + ``ContrastLoss``); ground truth of
every fused backend. It gathers the (B, K+1, D) rows and builds the (B, K+1) scores, which the
fused kernels never do.

One side of CRD: the embeddings ``v`` (B, D) of one network (L2-normalised by the caller) are
scored against rows of the OTHER network's memory bank ``M`` (N, D), one bank row per training
image. ``idx`` (B, K+1) int64 names the rows: column 0 the positive (the sample's own row in the
peers' "exact" mode), columns 1..K the negatives. With temperature ``T``, the normalisation
constant ``Z`` (a 0-d tensor, a constant: no gradient), ``N`` the number of bank rows and the
peers' ``eps = 1e-7``::

    s[b, k] = <M[idx[b, k]], v[b]> / T
    P[b, k] = exp(s[b, k]) / Z
    c       = K / N                                   (K noise samples of the uniform noise 1 / N)
    loss    = -(1/B) sum_b [ log(P[b, 0] / (P[b, 0] + c + eps))
                           + sum_{k >= 1} log(c / (P[b, k] + c + eps)) ]

The two terms are computed as ``-log1p((c + eps) / P[b, 0])`` and ``-log1p((P[b, k] + eps) / c)``
(the same values without the cancellation of a log near 1). The peers fix ``Z`` on their first
batch, ``Z = mean_{b,k} exp(s[b, k]) * N`` over that batch (:func:`partition_sums` gives the per-row
sums ``sum_k exp(s[b, k])`` it is computed from), then keep it. The gradient flows to ``v`` only
(the bank is a buffer, ``Z`` a constant)::

    d loss / d v[b] = (1 / (B T)) [ -(c + eps) / (P[b, 0] + c + eps) M[idx[b, 0]]
                                    + sum_{k >= 1} P[b, k] / (P[b, k] + c + eps) M[idx[b, k]] ]

Computed in float32 (float64 for a float64 ``v``); the bank is converted to that dtype. An index
outside [0, N) raises an IndexError here (the fused kernels give a NaN loss instead: they cannot
raise without reading the indices on the host). The usual loss weight (0.8) and the sum of the
two sides are the caller's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.numerics.common import compute_dtype
from kdfast.numerics.crd import NCE_EPS, check_indices


def gathered(bank: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """The (B, K+1, D) bank rows named by `idx`, in `dtype` (IndexError for an index outside [0, N))."""
    check_indices(idx, bank.shape[0])
    return bank.detach().to(dtype).index_select(0, idx.reshape(-1)).view(*idx.shape, bank.shape[1])


def scores(emb: Tensor, bank: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """``s[b, k] = <M[idx[b, k]], v[b]> / T`` (B, K+1) in the compute dtype of `emb`."""
    dtype = compute_dtype(emb.dtype)
    rows = gathered(bank, idx, dtype)
    with torch.autocast(emb.device.type, enabled=False):
        return torch.bmm(rows, emb.to(dtype).unsqueeze(2)).squeeze(2) / temperature


def partition_sums(emb: Tensor, bank: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """``sum_k exp(s[b, k])`` (B,): the peers' ``Z`` is ``sum_b of this / (B (K+1)) * N``."""
    return scores(emb.detach(), bank, idx, temperature).exp().sum(1)


def crd_loss(emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor, temperature: float, n_data: int) -> Tensor:
    """The NCE loss of one side (0-d); see the module docstring."""
    p = scores(emb, bank, idx, temperature).exp() / z.detach().to(compute_dtype(emb.dtype))
    noise = (idx.shape[1] - 1) / float(n_data)
    # log(P / (P + c + eps)) = -log1p((c + eps) / P) and log(c / (P + c + eps)) = -log1p((P + eps) / c):
    # the peers' terms without the cancellation of a log near 1 (a positive with P >> c + eps)
    positive = torch.log1p((noise + NCE_EPS) / p[:, 0])
    negative = torch.log1p((p[:, 1:] + NCE_EPS) / noise) if noise > 0 else p[:, 1:]
    return (positive.sum() + negative.sum()) / emb.shape[0]
