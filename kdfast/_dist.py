"""Reductions over the processes of torchrun's group: the one piece of distributed training that
layers below the engine (the distillers' epoch statistics) need too."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum"]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over every process, in place (itself when not distributed)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values
