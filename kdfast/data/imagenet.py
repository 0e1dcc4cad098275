"""ImageNet (or any class-per-folder image tree) through DataLoader workers.

``root`` holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (torchvision's
``ImageFolder`` layout; the validation images must be sorted into class folders). Train images
get ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()``, validation images ``Resize(256)`` +
``CenterCrop(224)``, then normalization on the device. Two decode paths (``decode``):

- ``"cpu"``: workers decode and crop with PIL (:class:`SeededImageFolder`) and hand over uint8
  tensors in pinned memory; the copy to the device and the normalization run in the main process;
- ``"gpu"``: workers only read each file's compressed bytes (:class:`EncodedImageFolder`); the
  main process decodes the batch's JPEGs with one batched ``torchvision.io.decode_jpeg(...,
  device=device)`` call (nvJPEG on CUDA; on the CPU the CPU decoder runs the same code) and crops,
  resizes (antialiased, per image) and flips on the device. Files the batched decoder is not given
  (not a 3-component JPEG: PNG, greyscale or CMYK JPEG, ...) or that it fails on are decoded with
  PIL on the CPU, one by one, as the ``"cpu"`` path does.

Sampling follows ``EpochSchedule`` (``DistributedSampler``'s seed + epoch permutation and rank
strides, plus mid-epoch resume). The crop and flip of each image are drawn from a generator seeded
from (seed, epoch, image index) with torchvision's own draws (``RandomResizedCrop.get_params``,
then the flip's coin), on both paths: they do not depend on the worker or the path that decodes
the image, a resumed run sees the same augmented batches, and both paths crop the same boxes.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, default_collate
from torchvision import datasets, transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from kdfast.data.schedule import AUGMENT_STREAM, EpochSchedule, ScheduledLoader, mix_seed
from kdfast.data.transforms import Normalize

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP = 224  # the side of every image handed out
RESIZE = 256  # validation: the shorter side before the center crop
RANDOM_CROP = transforms.RandomResizedCrop(CROP)  # its scale and ratio ranges, shared by both paths
FLIP = transforms.RandomHorizontalFlip()
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def default_workers() -> int:
    """DataLoader workers when none are configured: the CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB; a file PIL cannot decode raises ValueError naming it."""
    with open(path, "rb") as f:
        return decode_rgb(f, path)


def decode_rgb(source: BinaryIO, path: str) -> Image.Image:
    """The image in the open file `source` (read from `path`) as RGB; ValueError naming `path`
    when PIL cannot decode it."""
    try:
        return Image.open(source).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def seeded(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Seed the global CPU RNG for the augmentation of image `index` in `epoch`; restore it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, epoch, AUGMENT_STREAM, index))
        yield


def draw_crop(seed: int, epoch: int, index: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, flip) of image `index` (height x width) in `epoch`:
    the draws of the PIL path's ``RandomResizedCrop(224)`` then ``RandomHorizontalFlip()``."""
    with seeded(seed, epoch, index):
        top, left, h, w = RANDOM_CROP.get_params(torch.empty(0, height, width), RANDOM_CROP.scale, RANDOM_CROP.ratio)
        return top, left, h, w, bool(torch.rand(1) < FLIP.p)


def jpeg_components(data: bytes | memoryview) -> int:
    """Colour components of the JPEG in `data` (3: YCbCr, 1: greyscale, 4: CMYK/YCCK) from its
    frame header; 0 when `data` is no JPEG or the header is not found."""
    if data[:3] != b"\xff\xd8\xff":
        return 0
    at = 2
    while at + 10 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _SOF_MARKERS:
            return data[at + 9]
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return 0


@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    """Silence torchvision 0.29's per-call DeprecationWarning of its image I/O (TorchCodec supersedes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class SeededImageFolder(datasets.ImageFolder):
    """``ImageFolder`` indexed by ``(index, epoch)``: the transform draws its randomness from a
    CPU generator seeded from (seed, epoch, index), leaving the global RNG state as it was."""

    def __init__(self, root: str | Path, transform: Callable, seed: int = 0) -> None:
        super().__init__(str(root), transform=transform, loader=read_rgb)
        self.seed = seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key
        with seeded(self.seed, epoch, index):
            return super().__getitem__(index)

    collate = staticmethod(default_collate)

    def to_device(self, batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """The collated (uint8 images, labels) of the workers, copied to `device`."""
        images, labels = batch
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def decode_jpegs(data: list[Tensor], device: torch.device) -> list[Tensor]:
    """The JPEG files `data` (CPU uint8 bytes) decoded to RGB on `device` by one batched
    ``decode_jpeg`` call (nvJPEG on CUDA); [] when `data` is empty or the decoder fails on one."""
    if not data:
        return []
    with contextlib.suppress(RuntimeError), _torchvision_io():
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return []


class EncodedBatch(NamedTuple):
    """A batch as ``EncodedImageFolder``'s workers hand it over: compressed files and their keys."""

    data: list[Tensor]  # each file's bytes, uint8 (N,)
    components: list[int]  # jpeg_components of each file
    labels: Tensor
    indices: list[int]
    epoch: int


def collate_encoded(samples: list[tuple[Tensor, int, int, int]]) -> EncodedBatch:
    """``EncodedImageFolder`` items (bytes, label, index, epoch) -> one ``EncodedBatch`` (in the worker)."""
    data, labels, indices, epochs = zip(*samples, strict=True)
    components = [jpeg_components(memoryview(d.numpy())) for d in data]
    return EncodedBatch(list(data), components, torch.tensor(labels), list(indices), epochs[0])


class EncodedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` indexed by ``(index, epoch)`` whose workers only read files (their bytes as
    a uint8 tensor, like ``torchvision.io.read_file``, which 0.29 deprecates and which refuses
    empty files): the batch is
    decoded, cropped and flipped in the main process on the device (``to_device``), with the crop
    and flip of ``SeededImageFolder`` (``draw_crop``) when `train`, else resize + center crop."""

    def __init__(self, root: str | Path, train: bool, seed: int = 0) -> None:
        super().__init__(str(root))
        self.train = train
        self.seed = seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int, int]:
        index, epoch = key
        path, label = self.samples[index]
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8)), label, index, epoch

    collate = staticmethod(collate_encoded)

    def to_device(self, batch: EncodedBatch, device: torch.device) -> tuple[Tensor, Tensor]:
        """(uint8 (B, 3, 224, 224) images, labels) on `device` from the workers' compressed files."""
        images = self.decode(batch, device)
        crops = [self.crop(image, index, batch.epoch) for image, index in zip(images, batch.indices, strict=True)]
        return torch.stack(crops), batch.labels.to(device, non_blocking=True)

    def decode(self, batch: EncodedBatch, device: torch.device) -> list[Tensor]:
        """Each file of `batch` as uint8 (3, H, W) RGB on `device`: the 3-component JPEGs by one
        batched ``decode_jpeg`` call, the other files (and all of them, one by one, when that call
        fails on a damaged one) through ``decode_one``."""
        jpegs = [i for i, c in enumerate(batch.components) if c == 3]
        decoded = dict(zip(jpegs, decode_jpegs([batch.data[i] for i in jpegs], device), strict=False))
        return [
            decoded[i] if i in decoded else self.decode_one(data, index, device, c == 3)
            for i, (data, index, c) in enumerate(zip(batch.data, batch.indices, batch.components, strict=True))
        ]

    def decode_one(self, data: Tensor, index: int, device: torch.device, jpeg: bool) -> Tensor:
        """File `index` (bytes `data`) as uint8 (3, H, W) RGB on `device`: ``decode_jpeg`` if it is a
        3-component `jpeg` it can decode, else PIL on the CPU (ValueError naming the file if neither can)."""
        if jpeg:
            with contextlib.suppress(RuntimeError), _torchvision_io():
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        image = decode_rgb(io.BytesIO(data.numpy().tobytes()), self.samples[index][0])
        return transforms.functional.pil_to_tensor(image).to(device)

    def crop(self, image: Tensor, index: int, epoch: int) -> Tensor:
        """uint8 (3, 224, 224): the train crop + flip of image `index` drawn for `epoch`, or the
        validation resize + center crop."""
        if not self.train:
            return F.center_crop(F.resize(image, [RESIZE], antialias=True), [CROP])
        top, left, h, w, flip = draw_crop(self.seed, epoch, index, image.shape[-2], image.shape[-1])
        out = F.resized_crop(image, top, left, h, w, [CROP, CROP], antialias=True)
        return F.horizontal_flip(out) if flip else out


def image_folder(root: str | Path, train: bool, seed: int = 0, decode: str = "cpu") -> SeededImageFolder | EncodedImageFolder:
    """The ``train`` or ``val`` split under `root`, with the standard ImageNet transforms (uint8
    output), decoded by the workers with PIL (`decode` "cpu") or on the device ("gpu")."""
    folder = Path(root).expanduser() / ("train" if train else "val")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageFolder split not found: {folder} does not exist; expected "
            f"{Path(root) / 'train'} and {Path(root) / 'val'}, each with one folder of images per class"
        )
    if decode == "gpu":
        return EncodedImageFolder(folder, train, seed)
    crop = [RANDOM_CROP, FLIP] if train else [transforms.Resize(RESIZE), transforms.CenterCrop(CROP)]
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
    """Batches ``(images, labels)`` on `device` from an ``(index, epoch)``-keyed dataset, read by
    `workers` DataLoader processes (default: ``default_workers()``; pinned memory on CUDA) and
    turned into uint8 (B, C, H, W) images on the device by the dataset's ``to_device``.

    ``train=True`` shuffles each epoch; the schedule (and so ``state_dict``) advances as batches
    reach the caller, not as workers prefetch them. Images are normalized with `mean`/`std` to
    `dtype` (NHWC-strided if `channels_last`).
    """

    def __init__(
        self,
        dataset: SeededImageFolder | EncodedImageFolder,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        workers: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        mean: tuple[float, ...] = MEAN,
        std: tuple[float, ...] = STD,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.schedule = EpochSchedule(
            len(dataset), batch_size, shuffle=train, drop_last=drop_last, seed=seed, rank=rank, world_size=world_size
        )
        self.normalize = Normalize(mean, std, self.device, dtype=dtype, channels_last=channels_last)
        self.dataset = dataset
        workers = default_workers() if workers is None else workers
        # A private generator: the DataLoader then draws its worker base seeds without consuming the
        # global RNG (the images' randomness comes from SeededImageFolder anyway).
        self.dataloader: DataLoader[Any] = DataLoader(
            dataset,
            batch_sampler=_ScheduleBatches(self.schedule),
            num_workers=workers,
            collate_fn=dataset.collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator(),
        )

    @property
    def labels(self) -> Tensor:
        """The (N,) int64 labels of every image, in dataset order."""
        return torch.as_tensor(self.dataset.targets, dtype=torch.int64)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # the index batches the sampler hands out when the iteration starts (yield_indices)
        indices = iter(self.schedule.remaining(self.device)) if self.yield_indices else None
        for batch in self.dataloader:
            self.schedule.advance()
            images, labels = self.dataset.to_device(batch, self.device)
            if indices is not None:
                yield self.normalize(images), labels, next(indices)
            else:
                yield self.normalize(images), labels
