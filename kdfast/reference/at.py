"""Eager reference of the attention-transfer (AT) op family.

This is the ground truth that every fused backend (Triton, CUDA C++, C++ CPU) is tested against,
and the ``backend="torch"`` implementation. It runs in any floating dtype, float64 included;
float16/bfloat16 inputs are computed in float32 (the accuracy the fused kernels promise).

Notation (../shared/METHODS.md, AT): a feature map ``f`` of shape (B, C, H, W), flattened over
space to (B, C, HW).

* Raw attention map (the channel reduction the kernels compute in one pass)::

      mode="mean":  m[b, hw] = (1/C) * sum_c f[b, c, hw] ** p     (the published code; p integer)
      mode="sum":   m[b, hw] =         sum_c |f[b, c, hw]| ** p   (the paper)

* Normalised map: ``a = m / max(||m||_2, 1e-12)`` along hw.
* Loss of one stage, with ``u_s``, ``u_t`` the normalised maps of student and teacher::

      loss="mse" (mode "code"):  mean_{b, hw} (u_s - u_t) ** 2
      loss="l2"  (mode "paper"): mean_b ||u_s - u_t||_2

  The multi-stage loss is the sum over stages. Where the student's and teacher's spatial sizes
  differ, the larger map is adaptive-average-pooled to the smaller one first
  (:func:`align_spatial`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdfast.numerics.at import AT_MODES, normalize_map
from kdfast.numerics.common import align_spatial, compute_dtype


def at_map(feat: Tensor, p: float = 2.0, mode: str = "mean") -> Tensor:
    """Raw (unnormalised) attention map, (B, C, H, W) -> (B, H*W) in the compute dtype."""
    f = feat.to(compute_dtype(feat.dtype)).flatten(2)
    if mode == "mean":
        return f.pow(p).mean(1)
    return f.abs().pow(p).sum(1)


def at_map_loss(m_s: Tensor, m_t: Tensor, loss: str = "mse") -> Tensor:
    """Per-sample loss of one stage from raw maps, (B, HW) x 2 -> (B,); summing gives the loss.

    ``mse``: ``sum_hw (u_s - u_t)^2 / (B * HW)``; ``l2``: ``||u_s - u_t||_2 / B``.
    """
    diff = normalize_map(m_s) - normalize_map(m_t)
    batch, hw = diff.shape
    if loss == "mse":
        return diff.pow(2).sum(1) / (batch * hw)
    return torch.linalg.vector_norm(diff, dim=1) / batch  # gradient 0 where u_s == u_t


def attention_map(feat: Tensor, p: float = 2.0, mode: str = "mean", normalize: bool = True) -> Tensor:
    """Attention map of one feature map, (B, C, H, W) -> (B, H*W), in ``feat``'s dtype."""
    m = at_map(feat, p, mode)
    if normalize:
        m = normalize_map(m)
    return m.to(feat.dtype)


def at_stage_losses(f_s: Sequence[Tensor], f_t: Sequence[Tensor], p: float = 2.0, mode: str = "code") -> Tensor:
    """AT loss of every (student, teacher) stage pair, shape (L,), in the compute dtype.

    The teacher is detached: it never receives a gradient.
    """
    map_mode, loss = AT_MODES[mode]
    losses = []
    for s, t in zip(f_s, f_t):
        s, t = align_spatial(s, t.detach())
        losses.append(at_map_loss(at_map(s, p, map_mode), at_map(t, p, map_mode), loss).sum())
    return torch.stack(losses)
