"""A loader that keeps a whole small dataset on the device as uint8 (the airbench approach).

No DataLoader, no workers, no host-to-device copy per batch: each batch is a gather from the
resident uint8 tensor, augmented and normalized by a few tensor ops on the device. The same
code runs on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from kdfast.data.schedule import AUGMENT_STREAM, EpochSchedule, ScheduledLoader, mix_seed
from kdfast.data.transforms import Normalize, pad_crop_flip


class ResidentLoader(ScheduledLoader):
    """Batches ``(images, labels)`` from uint8 images held on `device`.

    ``train=True``: each epoch a shuffled order (see ``EpochSchedule``), and per image a random
    crop of the image zero-padded by `padding` pixels plus, with `flip`, a random horizontal flip
    (torchvision ``RandomCrop(H, padding=padding)`` + ``RandomHorizontalFlip()``). The draws are made once per
    epoch on a CPU generator seeded from (seed, epoch), one per dataset image, so they do not
    depend on the device, the rank or where iteration resumed. ``train=False``: dataset order,
    no augmentation.

    Yields images normalized with `mean`/`std` (per channel, in [0, 1] units) as `dtype`
    (NHWC-strided if `channels_last`) and int64 labels, both on `device`.
    """

    labels: Tensor  # (N,) int64, on the device

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        padding: int = 4,
        flip: bool = True,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(
                f"labels must be 1-D with one label per image, got shape {tuple(labels.shape)} for {len(images)} images"
            )
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.train = train
        self.padding = padding
        self.flip = flip
        self.normalize = Normalize(mean, std, self.device, dtype=dtype, channels_last=channels_last)
        self.schedule = EpochSchedule(
            len(images), batch_size, shuffle=train, drop_last=drop_last, seed=seed, rank=rank, world_size=world_size
        )

    def _augment_draws(self, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """(top, left, flip) for every dataset image in `epoch`, on the device."""
        generator = torch.Generator().manual_seed(mix_seed(self.schedule.seed, epoch, AUGMENT_STREAM))
        n = len(self.images)
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator)
        flip = torch.randint(0, 2, (n,), generator=generator, dtype=torch.bool) & self.flip
        return offsets[0].to(self.device), offsets[1].to(self.device), flip.to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        draws = self._augment_draws(self.schedule.epoch) if self.train else None
        for index in self.schedule.remaining(self.device):
            self.schedule.advance()
            images = self.images[index]
            if draws is not None:
                top, left, flip = (d[index] for d in draws)
                images = pad_crop_flip(images, top, left, flip, self.padding)
            if self.yield_indices:
                yield self.normalize(images), self.labels[index], index
            else:
                yield self.normalize(images), self.labels[index]
