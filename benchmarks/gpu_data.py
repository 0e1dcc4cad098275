"""The CIFAR-10 subset that travels to a lent GPU machine (``make gpu-data``), and its unpacking there.

    python -m benchmarks.gpu_data [--source DIR] [--out .gpu-data] [--train 20000] [--test 2000]

A lent machine receives the working tree only (at most 64 MiB, carried paths included) and
has no network, so the real-data stage of ``benchmarks.gpu_check`` reads a subset prepared
here: the first `--train` training images and the first `--test` test images of the official
python-version CIFAR-10 under `--source` (``/work/shared/data``: its README says that test
images 0..999 are the exact originals and the others JPEG-decoded ones). The subset is one
file, :data:`SUBSET_NAME`: an ``.npz`` (images as N x 32 x 32 x 3 uint8, labels as int64)
compressed with xz after a byte-delta filter of distance 3 (neighbouring pixels of one
channel), about 0.67 of the raw bytes: 20,000 + 2,000 images take about 45 MB.

:func:`unpack` writes the subset back in the official layout (``cifar-10-batches-py/``,
``data_batch_1..5`` and ``test_batch``), which ``kdfast.data.load_cifar`` reads as it reads
the real files.
"""

from __future__ import annotations

import argparse
import io
import lzma
import pickle
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdfast.data import cifar

SUBSET_NAME = "cifar10-subset.npz.xz"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".gpu-data"
DEFAULT_SOURCE = Path("/work/shared/data")
# Delta of distance 3 in HWC order: each byte minus the same channel of the previous pixel.
XZ_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 3}, {"id": lzma.FILTER_LZMA2, "preset": 9}]
TRAIN_BATCHES = 5  # data_batch_1..5, as the official layout has
TRAVEL_LIMIT = 64 << 20  # what one call to the lent machine may send: working tree + carried paths


def _hwc(images) -> np.ndarray:
    """(N, 3, 32, 32) uint8 tensor -> (N, 32, 32, 3) numpy array."""
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


def prepare(source: Path, out_dir: Path, train: int, test: int) -> Path:
    """Write the first `train` training and `test` test images of CIFAR-10 under `source` to
    `out_dir`/SUBSET_NAME; returns the file."""
    train_x, train_y = cifar.load_cifar(source, "cifar10", train=True)
    test_x, test_y = cifar.load_cifar(source, "cifar10", train=False)
    if train > len(train_x) or test > len(test_x):
        raise ValueError(f"asked for {train} + {test} images; {source} has {len(train_x)} + {len(test_x)}")
    buffer = io.BytesIO()
    np.savez(
        buffer,
        train_x=_hwc(train_x[:train]),
        train_y=train_y[:train].numpy(),
        test_x=_hwc(test_x[:test]),
        test_y=test_y[:test].numpy(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SUBSET_NAME
    partial = path.with_suffix(".partial")
    partial.write_bytes(lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ, filters=XZ_FILTERS))
    partial.replace(path)
    return path


def load(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a subset file: train_x, test_x (N, 32, 32, 3) uint8; train_y, test_y int64."""
    with np.load(io.BytesIO(lzma.decompress(path.read_bytes()))) as arrays:
        return {name: arrays[name] for name in arrays.files}


def unpack(path: Path, root: Path) -> Path:
    """Write the subset at `path` as official CIFAR-10 python-version files under
    `root`/cifar-10-batches-py (the training images split over 5 batches); returns `root`."""
    arrays = load(path)
    spec = cifar.cifar_spec("cifar10")
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CHW-flattened, as the official rows
        with open(folder / name, "wb") as file:
            pickle.dump({b"data": np.ascontiguousarray(rows), spec.label_key: labels.astype(np.int64)}, file, protocol=2)

    for name, images, labels in zip(
        spec.train_files, np.array_split(arrays["train_x"], TRAIN_BATCHES), np.array_split(arrays["train_y"], TRAIN_BATCHES)
    ):
        write(name, images, labels)
    write(spec.test_files[0], arrays["test_x"], arrays["test_y"])
    return root


def tree_bytes(root: Path) -> int:
    """Bytes of the working tree that a call to the lent machine sends: the files git tracks or
    would track (untracked, not ignored)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True, check=True
    ).stdout.decode()
    return sum(path.stat().st_size for name in listing.split("\0") if name and (path := root / name).is_file())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_data", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help=f"folder holding cifar-10-batches-py/ (default {DEFAULT_SOURCE})"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"output folder (default {DEFAULT_DIR})")
    parser.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    parser.add_argument("--test", type=int, default=2000, help="test images (default 2000)")
    args = parser.parse_args(argv)
    path = prepare(args.source, args.out, args.train, args.test)
    subset = path.stat().st_size
    print(f"{path}: {args.train} training + {args.test} test images, {subset / 2**20:.1f} MiB")
    tree = tree_bytes(Path(__file__).resolve().parent.parent)
    total = tree + subset
    print(
        f"a call carrying it sends {tree / 2**20:.1f} MiB of working tree + {subset / 2**20:.1f} MiB = "
        f"{total / 2**20:.1f} MiB (limit {TRAVEL_LIMIT >> 20} MiB)"
    )
    return 0 if total < TRAVEL_LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
