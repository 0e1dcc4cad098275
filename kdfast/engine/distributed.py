"""Process groups from torchrun's environment (NCCL on GPU, gloo on CPU) and metric reduction."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdfast._dist import all_reduce_sum
from kdfast.engine.config import ConfigError

__all__ = ["Dist", "setup", "teardown", "all_reduce_sum", "process_share"]


@dataclass(frozen=True)
class Dist:
    """This process's place: rank, world size, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(requested_device: str = "auto") -> Dist:
    """Join the process group that torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK) describe.

    Without them (or with WORLD_SIZE=1) this is a single process. The backend is NCCL for CUDA
    devices and gloo for the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world_size, device)


def process_share(total: int, world_size: int, key: str) -> int:
    """Each process's part of a global batch `total` (the recipes' numbers are global: CIFAR's 64,
    ImageNet's 512); ConfigError naming `key` when it does not divide among the processes."""
    if total % world_size:
        raise ConfigError(
            f"{key}={total} is the batch of all processes together and does not divide among "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    return total // world_size


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
