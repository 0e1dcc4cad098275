"""ImageNet (or any class-per-folder image tree) through DataLoader workers.

``root`` holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (torchvision's
``ImageFolder`` layout; the validation images must be sorted into class folders). Workers decode
and crop (train: ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()``; val: ``Resize(256)`` +
``CenterCrop(224)``) and hand over uint8 tensors in pinned memory; the copy to the device and the
normalization run in the main process, on the device.

Sampling follows ``EpochSchedule`` (``DistributedSampler``'s seed + epoch permutation and rank
strides, plus mid-epoch resume). The crop and flip of each image are drawn from a generator seeded
from (seed, epoch, image index), so they do not depend on which worker decodes the image, and a
resumed run sees the same augmented batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets, transforms

from kdfast.data.schedule import AUGMENT_STREAM, EpochSchedule, ScheduledLoader, mix_seed
from kdfast.data.transforms import Normalize

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def read_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB; a file PIL cannot decode raises ValueError naming it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


class SeededImageFolder(datasets.ImageFolder):
    """``ImageFolder`` indexed by ``(index, epoch)``: the transform draws its randomness from a
    CPU generator seeded from (seed, epoch, index), leaving the global RNG state as it was."""

    def __init__(self, root: str | Path, transform: Callable, seed: int = 0) -> None:
        super().__init__(str(root), transform=transform, loader=read_rgb)
        self.seed = seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, AUGMENT_STREAM, index))
            return super().__getitem__(index)


def image_folder(root: str | Path, train: bool, seed: int = 0) -> SeededImageFolder:
    """The ``train`` or ``val`` split under `root`, with the standard ImageNet transforms (uint8 output)."""
    folder = Path(root).expanduser() / ("train" if train else "val")
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageFolder split not found: {folder} does not exist; expected "
                                f"{Path(root) / 'train'} and {Path(root) / 'val'}, each with one folder of images per class")
    if train:
        crop = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    else:
        crop = [transforms.Resize(256), transforms.CenterCrop(224)]
    return SeededImageFolder(folder, transforms.Compose([*crop, transforms.PILToTensor()]), seed)


class _ScheduleBatches(Sampler):
    """Batch sampler: the ``(index, epoch)`` keys of the batches left in the schedule's epoch,
    fixed when the DataLoader starts an iteration (workers prefetch ahead of consumption)."""

    def __init__(self, schedule: EpochSchedule) -> None:
        self.schedule = schedule

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batches = self.schedule.epoch, self.schedule.remaining()
        return ([(i, epoch) for i in batch.tolist()] for batch in batches)


class WorkerLoader(ScheduledLoader):
    """Batches ``(images, labels)`` on `device` from an ``(index, epoch)``-keyed dataset of uint8
    (C, H, W) images, decoded by `workers` DataLoader processes (pinned memory on CUDA).

    ``train=True`` shuffles each epoch; the schedule (and so ``state_dict``) advances as batches
    reach the caller, not as workers prefetch them. Images are normalized with `mean`/`std` to
    `dtype` (NHWC-strided if `channels_last`).
    """

    def __init__(self, dataset: SeededImageFolder, batch_size: int, *, train: bool,
                 device: torch.device | str = "cpu", workers: int | None = None, drop_last: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False) -> None:
        self.device = torch.device(device)
        self.schedule = EpochSchedule(len(dataset), batch_size, shuffle=train, drop_last=drop_last,
                                      seed=seed, rank=rank, world_size=world_size)
        self.normalize = Normalize(mean, std, self.device, dtype=dtype, channels_last=channels_last)
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        # A private generator: the DataLoader then draws its worker base seeds without consuming the
        # global RNG (the images' randomness comes from SeededImageFolder anyway).
        self.dataloader = DataLoader(dataset, batch_sampler=_ScheduleBatches(self.schedule), num_workers=workers,
                                     pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                     generator=torch.Generator())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.dataloader:
            self.schedule.advance()
            yield (self.normalize(images.to(self.device, non_blocking=True)),
                   labels.to(self.device, non_blocking=True))
