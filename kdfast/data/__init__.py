"""Data for distillation runs: ``build_loaders(name, root, batch_size, device)``.

Datasets:

- ``"digits"`` (default, no files needed): scikit-learn's bundled digits upscaled to 32 x 32 RGB
  (``kdfast.data.digits``);
- ``"cifar10"``, ``"cifar100"``: the official python-version files under `root`
  (``kdfast.data.cifar``);
- ``"imagenet"``: an ``ImageFolder`` tree ``root/{train,val}/<class>/<image>``
  (``kdfast.data.imagenet``).

The small datasets live on the device as uint8 and are cropped, flipped (not the digits: a
mirrored 2 or 7 is no digit) and normalized there (``ResidentLoader``); ImageNet is read by
DataLoader workers (``WorkerLoader``) and decoded either by them with PIL (``decode="cpu"``) or
in the main process on the device (``decode="gpu"``: batched nvJPEG on CUDA; see
``kdfast.data.imagenet``). Both loaders
yield ``(images, labels)`` on the device (normalized float images, int64 labels) and share one
interface: ``len()`` (batches per epoch on this rank), ``num_samples``, ``set_epoch(epoch)``,
``state_dict()`` / ``load_state_dict()`` for exact mid-epoch resume. Sharding follows the
initialized process group (or explicit ``rank`` / ``world_size``); see ``kdfast.data.schedule``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, TypedDict

import torch
from torch import Tensor

from kdfast.data import cifar, digits
from kdfast.data.cifar import load_cifar
from kdfast.data.digits import load_digits32
from kdfast.data.resident import ResidentLoader
from kdfast.data.schedule import EpochSchedule, ScheduledLoader
from kdfast.data.transforms import Normalize, pad_crop_flip

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
DECODES = ("gpu", "cpu", "auto")  # ImageNet's decode path; "auto": gpu when the device is CUDA, else cpu


def resolve_decode(decode: str, device: torch.device | str) -> str:
    """The decode path ("gpu" or "cpu") that `decode` (one of ``DECODES``) means on `device`."""
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}; valid: {', '.join(DECODES)}")
    if decode == "auto":
        return "gpu" if torch.device(device).type == "cuda" else "cpu"
    return decode


def first_per_class(images: Tensor, labels: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The first `count` images of each class, in dataset order; ValueError when a class has fewer."""
    if count < 1:
        raise ValueError(f"train_per_class must be >= 1, got {count}")
    rank = torch.zeros_like(labels)  # position of each image among those of its class
    for label in labels.unique():
        where = labels == label
        if int(where.sum()) < count:
            raise ValueError(f"train_per_class={count}, but class {int(label)} has {int(where.sum())} training images")
        rank[where] = torch.arange(int(where.sum()))
    keep = rank < count
    return images[keep], labels[keep]


class _LoaderArgs(TypedDict):
    """The keyword arguments that ``build_loaders`` passes to both loaders of every dataset."""

    device: torch.device | str
    seed: int
    rank: int | None
    world_size: int | None
    dtype: torch.dtype
    channels_last: bool


class Loaders(NamedTuple):
    """What ``build_loaders`` returns: training loader, test loader and number of classes."""

    train: ScheduledLoader
    test: ScheduledLoader
    num_classes: int


def build_loaders(
    name: str = "digits",
    root: str | Path | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    *,
    eval_batch_size: int | None = None,
    download: bool = False,
    workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    train_per_class: int | None = None,
    decode: str = "auto",
) -> Loaders:
    """Training and test loaders of dataset `name` (one of ``DATASETS``) on `device`.

    root: the data folder (not used by "digits"). eval_batch_size: test batch size (default
    `batch_size`). download: let torchvision fetch missing CIFAR files (network needed).
    workers: DataLoader processes for ImageNet (default: the CPU cores available to the process,
    ``len(os.sched_getaffinity(0))``). decode: ImageNet's decode path, one of ``DECODES``: "cpu"
    (PIL in the workers), "gpu" (workers read the files; the batch is decoded, cropped and flipped
    on `device`, nvJPEG on CUDA) or "auto" (gpu on CUDA, else cpu); the same crops and flips on
    either path; the other datasets ignore it (they are not decoded per batch). seed: sample order and
    augmentation of every epoch. drop_last: drop each epoch's last partial training batch.
    dtype / channels_last: the images' dtype and memory format. train_per_class: train on the
    first N training images of each class only (in the split's order: a fixed subset, the same
    for every seed; digits and CIFAR), the test split unchanged.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    decode = resolve_decode(decode, device)
    if name != "digits" and root is None:
        raise ValueError(f"dataset {name!r} needs root, the folder that holds its files")
    common = _LoaderArgs(device=device, seed=seed, rank=rank, world_size=world_size, dtype=dtype, channels_last=channels_last)
    test_batch = eval_batch_size or batch_size

    if name == "imagenet":
        if train_per_class is not None:
            raise ValueError("train_per_class is for the device-resident datasets (digits, cifar10, cifar100)")
        from kdfast.data.imagenet import WorkerLoader, image_folder

        assert root is not None  # checked above
        train_set, test_set = image_folder(root, True, seed, decode), image_folder(root, False, seed, decode)
        return Loaders(
            WorkerLoader(train_set, batch_size, train=True, workers=workers, drop_last=drop_last, **common),
            WorkerLoader(test_set, test_batch, train=False, workers=workers, **common),
            len(train_set.classes),
        )

    if name == "digits":
        (train_x, train_y), (test_x, test_y) = load_digits32(True), load_digits32(False)
        mean, std, num_classes = digits.MEAN, digits.STD, digits.NUM_CLASSES
    else:
        spec = cifar.cifar_spec(name)
        assert root is not None  # checked above
        (train_x, train_y), (test_x, test_y) = (load_cifar(root, name, split, download) for split in (True, False))
        mean, std, num_classes = spec.mean, spec.std, spec.num_classes
    if train_per_class is not None:
        train_x, train_y = first_per_class(train_x, train_y, train_per_class)
    return Loaders(
        ResidentLoader(
            train_x, train_y, batch_size, train=True, drop_last=drop_last, flip=name != "digits", mean=mean, std=std, **common
        ),
        ResidentLoader(test_x, test_y, test_batch, train=False, mean=mean, std=std, **common),
        num_classes,
    )


__all__ = [
    "DATASETS",
    "DECODES",
    "EpochSchedule",
    "Loaders",
    "Normalize",
    "ResidentLoader",
    "ScheduledLoader",
    "build_loaders",
    "first_per_class",
    "load_cifar",
    "load_digits32",
    "pad_crop_flip",
    "resolve_decode",
]
