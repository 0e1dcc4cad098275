"""What CRD's eager reference and its eager backend share: the NCE constant and the index check."""

from __future__ import annotations

import torch
from torch import Tensor

NCE_EPS = 1e-7  # the peers' constant in the NCE denominators


def check_indices(idx: Tensor, rows: int) -> None:
    """TypeError unless `idx` is int64, IndexError unless its values lie in [0, rows) (one host read)."""
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if idx.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(idx))
    if low < 0 or high >= rows:
        raise IndexError(f"idx must be in [0, {rows}), got values in [{low}, {high}]")
