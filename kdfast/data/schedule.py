"""Which samples each batch holds, epoch by epoch and rank by rank, and where iteration stands.

Both loaders (the device-resident one for CIFAR/digits and the worker-based one for ImageNet)
share this schedule, so they shard, shuffle and resume alike:

- the sample order of an epoch depends only on (seed, epoch): a CPU ``torch.Generator`` seeded
  from both, so every rank and every device type computes the same permutation (the
  ``DistributedSampler`` rule), and rank ``r`` of ``w`` takes positions ``r, r + w, r + 2w, ...``;
- training (``shuffle=True``) drops the last ``n % w`` samples of each permutation so that every
  rank gets the same number of batches (DDP needs it); evaluation (``shuffle=False``) covers every
  sample once in dataset order, ranks differing by at most one sample;
- the position is (epoch, next batch), so a ``state_dict`` saved mid-epoch resumes with exactly
  the batches that were still to come.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
ORDER_STREAM = 0  # mix_seed stream tags: the epoch's sample order ...
AUGMENT_STREAM = 1  # ... and its augmentation draws


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (a splitmix64 chain): nearby inputs give unrelated seeds."""
    state = 0
    for value in values:
        state = (state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the given values, else those of the initialized process group, else (0, 1)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class EpochSchedule:
    """The batches of sample indices of each epoch on one rank, and the position (epoch, batch)."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank, self.world_size = distributed_defaults(rank, world_size)
        self.epoch = 0
        self.batch = 0
        if len(self) == 0:
            raise ValueError(
                f"no batch to serve: {self.num_samples} samples on rank {self.rank} of {self.world_size} "
                f"(dataset of {dataset_size}), batch_size {batch_size}, drop_last={drop_last}"
            )

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before drop_last)."""
        if self.shuffle:
            return self.dataset_size // self.world_size
        return len(range(self.rank, self.dataset_size, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for `epoch`, in order (int64, CPU)."""
        if not self.shuffle:
            return torch.arange(self.rank, self.dataset_size, self.world_size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, ORDER_STREAM))
        order = torch.randperm(self.dataset_size, generator=generator)
        return order[self.rank : self.num_samples * self.world_size : self.world_size]

    def remaining(self, device: torch.device | str = "cpu") -> list[Tensor]:
        """The index batches still to come in the current epoch, on `device` (one transfer)."""
        indices = self.indices(self.epoch)[self.batch * self.batch_size : len(self) * self.batch_size]
        return list(indices.to(device).split(self.batch_size))

    def advance(self) -> None:
        """Mark one batch as served; after the last one of an epoch, move to the next epoch."""
        self.batch += 1
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """The position and the settings that must match on resume."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; the same world size and batch size are required."""
        for key in ("world_size", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume exactly: the state was saved with {key}={state[key]}, "
                    f"this loader has {key}={getattr(self, key)}"
                )
        if not 0 <= state["batch"] < len(self):
            raise ValueError(f"saved batch {state['batch']} is outside this loader's {len(self)} batches per epoch")
        self.epoch, self.batch, self.seed = state["epoch"], state["batch"], state["seed"]


class ScheduledLoader:
    """Base of the loaders: length, epoch and resume state, all delegated to ``self.schedule``.

    Iterating yields the batches left in the current epoch and advances the position as each
    batch is handed out, so ``state_dict()`` taken after a batch says where the next one starts;
    after an epoch's last batch the position moves to the next epoch by itself (``set_epoch``
    may still be called at each epoch's start, as with ``DistributedSampler``).
    """

    schedule: EpochSchedule
    # When True, training batches are ``(images, labels, indices)``: indices (B,) int64 on the
    # device, the samples' positions in the dataset (for methods with per-image state: CRD).
    yield_indices: bool = False

    def __len__(self) -> int:
        return len(self.schedule)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        """The batches left in the current epoch: ``(images, labels)``, or ``(images, labels,
        indices)`` with ``yield_indices`` (each loader's own)."""
        raise NotImplementedError

    if TYPE_CHECKING:  # declared for the type checker only: each loader has its own

        @property
        def labels(self) -> Tensor:
            """The (N,) int64 labels of every sample, in dataset order (ResidentLoader's
            attribute, WorkerLoader's property)."""
            ...

    @property
    def batch_size(self) -> int:
        return self.schedule.batch_size

    @property
    def num_samples(self) -> int:
        """Samples per epoch on this rank (for images/s and averaging)."""
        return len(self) * self.batch_size if self.schedule.drop_last else self.schedule.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.schedule.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
