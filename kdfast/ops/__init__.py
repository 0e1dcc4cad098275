"""torch.library registration and backend dispatch, one module per op."""

from __future__ import annotations

import torch
from torch import Tensor


def namespace(backend: str):
    """torch.ops namespace of a fused backend: the C++ kernels ("cpu", "cuda") or the Triton ones."""
    return torch.ops.kdfast_triton if backend == "triton" else torch.ops.kdfast


def unit_stride(z: Tensor) -> Tensor:
    """`z`, or a contiguous copy if its last dim is not unit-stride."""
    return z if z.stride(-1) == 1 else z.contiguous()


def as_rows(f: Tensor) -> Tensor:
    """(B, ...) -> (B, D), flattened from dim 1 in memory order: a view for contiguous and
    channels_last maps (for losses built on Gram matrices the order of D does not matter)."""
    if f.dim() > 2:
        f = f.permute(0, *sorted(range(1, f.dim()), key=lambda d: -f.stride(d)))
    return f.flatten(1)
