"""CIFAR-10 and CIFAR-100 read from the official python version (the layout torchvision uses).

``root`` holds ``cifar-10-batches-py/{data_batch_1..5, test_batch}`` or
``cifar-100-python/{train, test}`` (``root`` may also be that folder itself). Each file is a
pickled dict with ``b"data"`` (uint8, N x 3072, rows of CHW-flattened 32 x 32 RGB images) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). The pickles are read with an
unpickler that only builds numpy arrays, so a tampered file cannot run code. MD5 sums are not
checked (rebuilt copies with other sums are accepted); the contents are validated instead.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarSpec:
    """Files, label key, classes and normalization statistics of one CIFAR variant."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


CIFAR = {
    # Per-channel statistics of the training sets: CIFAR-10's exact ones; CIFAR-100's as used by
    # the CRD / mdistiller KD benchmarks, so that their published teacher checkpoints see the
    # inputs they were trained on.
    "cifar10": CifarSpec(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "CIFAR10",
    ),
    "cifar100": CifarSpec(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        (0.5071, 0.4867, 0.4408),
        (0.2675, 0.2565, 0.2761),
        "CIFAR100",
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays, and refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def cifar_spec(name: str) -> CifarSpec:
    """The spec of "cifar10" or "cifar100"."""
    if name not in CIFAR:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR)}")
    return CIFAR[name]


def _read_batch(path: Path, spec: CifarSpec) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file, or a ValueError naming it."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f).load()
    except Exception as e:  # any unpickling failure means a damaged file
        raise ValueError(
            f"{spec.title} file {path} is truncated or corrupt ({type(e).__name__}: {e}); replace it with the original file"
        ) from e
    if not isinstance(batch, dict) or b"data" not in batch or spec.label_key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{spec.title} file {path} is not a CIFAR batch: expected a dict with keys "
            f"b'data' and {spec.label_key!r}, found {found}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[spec.label_key])
    row = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        raise ValueError(f"{spec.title} file {path}: b'data' must be uint8 of shape (N, {row}), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{spec.title} file {path}: {spec.label_key!r} must hold {len(data)} integer labels, "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(
            f"{spec.title} file {path}: labels must lie in [0, {spec.num_classes - 1}], got [{labels.min()}, {labels.max()}]"
        )
    data = np.require(data, requirements=["C", "W"])  # copies only a read-only or strided array
    return torch.from_numpy(data).view(-1, *IMAGE_SHAPE), torch.from_numpy(labels.astype(np.int64))


def _download(spec: CifarSpec, root: Path) -> None:
    """Fetch and extract the official archive into `root` with torchvision (checks its MD5)."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(datasets, spec.torchvision_class)
    download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)


def load_cifar(root: str | Path, name: str = "cifar10", train: bool = True, download: bool = False) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of a CIFAR split, in file order.

    Missing files raise FileNotFoundError saying which ones and where they belong; with
    ``download=True`` (network access needed) missing files are first fetched by torchvision.
    A truncated, corrupt or malformed file raises ValueError naming it.
    """
    spec = cifar_spec(name)
    root = Path(root).expanduser()
    folder = root if root.name == spec.folder else root / spec.folder
    files = [folder / f for f in (spec.train_files if train else spec.test_files)]
    if download and not all(f.is_file() for f in files):
        _download(spec, folder.parent)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{spec.title} {'training' if train else 'test'} data not found: missing {', '.join(missing)} in "
            f"{folder}. Put the official python-version files there (extract the archive from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html into {folder.parent}), or pass download=True to "
            f"fetch them with torchvision if network access is allowed."
        )
    images, labels = zip(*(_read_batch(f, spec) for f in files))
    return torch.cat(images), torch.cat(labels)
