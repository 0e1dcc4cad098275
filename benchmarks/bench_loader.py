"""ImageNet input pipeline alone: images/s of ``build_loaders("imagenet", ...)``'s training loader
per decode path and DataLoader worker count, no model.

A generated ImageFolder (``--images`` photo-like 500 x 375 JPEGs at quality 90, the size and
quality of a typical ImageNet file, in 10 class folders, in a temporary folder) is read by the
training loader as the engine builds it: ``decode="cpu"`` (PIL decode + RandomResizedCrop + flip
in the workers) and ``decode="gpu"`` (workers read the files; the main process decodes the batch
with ``torchvision.io.decode_jpeg(..., device=...)``, nvJPEG on CUDA, the CPU decoder on the CPU,
then crops and flips on the device). Every batch is normalized on the device and, on CUDA,
synchronized before the clock reads. One warm-up epoch (it starts the persistent workers and
fills the page cache), then ``--epochs`` timed epochs; images/s = images per epoch / epoch time.

Rows (``benchmarks/common.py`` columns): op ``imagenet-loader``, backend ``decode-<path>``,
pass ``workers=<n>``, dtype ``uint8->float32``, shape ``<images>x500x375-b<batch>``; median_ms,
p20_ms, p80_ms are milliseconds per batch (epoch time / batches); the note gives images/s and the
machine's load average. They are merged into ``results/loader-<device>.csv``.

    python -m benchmarks.bench_loader --device cpu                 # workers 0 1 2, both paths
    python -m benchmarks.bench_loader --device cuda --workers 0 4 8 16 --images 2000 --batch 256

Like the other modules it has no op ``SPECS`` (``benchmarks.run`` imports every ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks import common

SPECS = ()
HEIGHT, WIDTH, QUALITY, CLASSES = 375, 500, 90, 10


def write_image_folder(root: Path, images: int, seed: int = 0) -> None:
    """root/train/<class>/<i>.jpg (and root/val, the same files): `images` photo-like JPEGs (smooth gradients, blobs and noise, so
    that the compressed size is that of a photo, about 60-100 KB, not of noise or of a flat image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH] / max(HEIGHT, WIDTH)
    for i in range(images):
        folder = root / "train" / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(2, 12, 3), rng.uniform(2, 12, 3), rng.uniform(0, 6.3, 3)
        waves = np.sin(x[..., None] * fx * 6.3 + phase) + np.cos(y[..., None] * fy * 6.3 + phase)
        pixels = 128 + 60 * waves + rng.normal(0, 14, (HEIGHT, WIDTH, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=QUALITY)
    (root / "val").symlink_to(root / "train")  # build_loaders needs a val split; not measured


def epoch_times(root: Path, decode: str, workers: int, batch: int, device: torch.device, epochs: int) -> list[float]:
    """Seconds of each of `epochs` timed epochs of the training loader, after one warm-up epoch."""
    from kdfast.data import build_loaders

    loader = build_loaders("imagenet", root, batch, device, workers=workers, decode=decode, eval_batch_size=batch).train
    times = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for images, _ in loader:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            assert images.shape[1:] == (3, 224, 224)
        times.append(time.perf_counter() - start)
    return times[1:]


def measure(
    root: Path, images: int, decodes: Sequence[str], workers: Sequence[int], batch: int, device: torch.device, epochs: int
) -> list[common.Row]:
    """One row per (decode path, worker count)."""
    rows = []
    batches = -(-images // batch)
    print(f"{images} JPEGs {WIDTH}x{HEIGHT} q{QUALITY}, batch {batch}, {common.environment(device)['device']}")
    print(f"{'decode':<8} {'workers':>7} {'images/s':>9} {'ms/batch':>9}  load average")
    for decode in decodes:
        for count in workers:
            times = epoch_times(root, decode, count, batch, device, epochs)
            per_batch = common.summarize([t * 1e3 / batches for t in times])
            rate = images / statistics.median(times)
            load = " ".join(f"{v:.2f}" for v in os.getloadavg())
            print(f"{decode:<8} {count:>7} {rate:>9.1f} {per_batch[0]:>9.1f}  {load}", flush=True)
            note = (
                f"{rate:.1f} images/s; {epochs} timed epochs; load average {load} (1/5/15 min) on "
                f"{len(os.sched_getaffinity(0))} cores shared with other processes"
            )
            backend, pass_, shape = f"decode-{decode}", f"workers={count}", f"{images}x{WIDTH}x{HEIGHT}-b{batch}"
            rows.append(
                common.measured_row("imagenet-loader", backend, pass_, "uint8->float32", shape, per_batch, None, device, note)
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--decodes", nargs="+", choices=("cpu", "gpu"), default=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (part of the CSV's device name)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/loader-<device>.csv")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        write_image_folder(Path(folder), args.images)
        rows = measure(Path(folder), args.images, args.decodes, args.workers, args.batch, device, args.epochs)
    path = args.out or common.default_results_path(device, "loader")
    common.merge_csv(path, rows)
    print(f"rows written to {path}")


if __name__ == "__main__":
    main()
