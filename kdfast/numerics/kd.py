"""Logit losses (KD, DKD): the reductions of per-row losses.

Ground floor (kdfast/numerics): used by the eager references and by the fused path alike."""

from __future__ import annotations

from torch import Tensor

REDUCTIONS = ("batchmean", "sum", "none")


def reduce_rows(rows: Tensor, reduction: str) -> Tensor:
    """Per-row losses (B,) -> the reduced loss."""
    if reduction == "batchmean":
        return rows.sum() / rows.shape[0]
    if reduction == "sum":
        return rows.sum()
    return rows
