"""LAKD's memory saving: one training step of a CIFAR pair in LAKD's three execution modes and with AT.

Variants (same pair, batch, synthetic CIFAR-100 images, seeded weights), each a full step as the
engine runs it: teacher ``features`` under ``inference_mode``, the distiller's forward, the
backward (already run inside forward in LAKD's local mode), an SGD step (momentum, weight decay):

* ``lakd-local``: module-by-module backward, each module's activations freed before the next runs;
* ``lakd-joint``: the same detached modules, one backward of the summed local losses;
* ``lakd-end_to_end``: the same losses without the detach between modules (ordinary distillation);
* ``at``: the registered AT distiller (1000 x AT on every stage after the stem), for reference.

Peak memory is measured on one step after the warm-up, above what was allocated before it. CUDA:
``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus
``memory_allocated`` before the step. CPU: :class:`benchmarks.common.LiveTensorBytes`, the peak
of the tensor storages created during the step and still alive (allocator slack and scratch
memory inside one op are not counted): deterministic, unlike the times. The teacher's
``Features`` (every stage, block, pooled map and the logits, alive for the whole step) are part of
every variant's peak; their size is written in ``note``. Step times are medians over ``--iters``
steps (p20, p80 alongside).

Rows (``benchmarks/common.py`` columns): op ``<teacher>-><student>``, backend the variant, pass
``train_step``, shape ``Bx3x32x32``; they are merged into ``results/lakd-<device>.csv``.

    python -m benchmarks.bench_lakd --device cpu --threads 2           # both pairs, batch 64
    python -m benchmarks.bench_lakd --device cuda --iters 20

This module has no op ``SPECS`` (``SPECS`` is empty so that ``benchmarks.run`` can import every
``bench_*.py``) and, like them, imports kdfast only when run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import common
from kdfast.engine.bench import peak_bytes

SPECS: tuple[common.OpSpec, ...] = ()
PAIRS = (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"))
VARIANTS = {  # variant -> (method, params)
    "lakd-local": ("lakd", {"mode": "local"}),
    "lakd-joint": ("lakd", {"mode": "joint"}),
    "lakd-end_to_end": ("lakd", {"mode": "end_to_end"}),
    "at": ("at", {}),
}
NUM_CLASSES = 100
STEP_EPOCH = 10**6  # past LAKD's alpha ramp: the final weights


def build_step(variant: str, teacher: str, student: str, batch: int, device: torch.device) -> tuple[Callable[[], None], int]:
    """One training step of `variant` on a fixed synthetic batch, and the bytes of the teacher's Features."""
    from kdfast import distillers, models
    from kdfast.engine.trainer import autocast

    method, params = VARIANTS[variant]
    torch.manual_seed(0)
    t = models.create(teacher, NUM_CLASSES).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's Module.to overloads omit (device, memory_format=)
    t.eval().requires_grad_(False)
    s = models.create(student, NUM_CLASSES)
    distiller = distillers.create(method, s, t, params).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's Module.to overloads omit (device, memory_format=)
    opt = torch.optim.SGD(distiller.sgd_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)

    def teacher_features():
        with torch.inference_mode():
            return t.features(x)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, "auto"):
            feats = teacher_features()
            _, losses = distiller(x, y, feats, STEP_EPOCH)
        if not distiller.backward_done:
            sum(losses.values()).backward()
        opt.step()
        distiller.after_step(STEP_EPOCH)

    with autocast(device, "auto"):
        feats = teacher_features()
    tensors = [feats.logits, feats.pooled, *feats.stages, *feats.preact_stages, *feats.blocks]
    storages = {f.untyped_storage().data_ptr(): f.untyped_storage().nbytes() for f in tensors}
    return step, sum(storages.values())


def step_times(step: Callable[[], None], device: torch.device, iters: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of `iters` steps."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    if len(times) < 2:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), cuts[0], cuts[3]


def measure(
    pairs: Sequence[tuple[str, str]], variants: Sequence[str], batch: int, device: torch.device, iters: int, warmup: int
) -> list[common.Row]:
    """Every (pair, variant): warm-up steps, one step for the peak memory, `iters` timed steps."""
    rows = []
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # the engine's amp "auto"
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live tensor storages (common.LiveTensorBytes)"
    print(f"one training step, batch {batch}, {common.environment(device)['device']}; peak: {what}")
    print(f"{'pair':<24} {'variant':<16} {'peak MiB':>9} {'ms/step':>9}")
    for teacher, student in pairs:
        for variant in variants:
            step, teacher_bytes = build_step(variant, teacher, student, batch, device)
            for _ in range(warmup):
                step()
            peak = peak_bytes(step, device)
            median, p20, p80 = step_times(step, device, iters)
            print(f"{teacher + '->' + student:<24} {variant:<16} {peak / 2**20:>9.1f} {median:>9.1f}", flush=True)
            note = f"peak: {what}; teacher Features {teacher_bytes / 2**20:.1f} MiB of it; {iters} timed steps"
            rows.append(
                common.Row(
                    f"{teacher}->{student}",
                    variant,
                    "train_step",
                    dtype,
                    f"{batch}x3x32x32",
                    median,
                    p20,
                    p80,
                    peak,
                    float("nan"),
                    timestamp=common.now(),
                    note=note,
                    **common.environment(device),
                )
            )
    return rows


def results_path(device: torch.device) -> Path:
    """results/lakd-<device>.csv, e.g. lakd-cpu-amd-epyc-2-threads.csv."""
    default = common.default_results_path(device)
    return default.with_name(f"lakd-{default.name}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (part of the CSV's device name)")
    parser.add_argument("--pairs", nargs="+", default=[f"{t}:{s}" for t, s in PAIRS], help="teacher:student")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=tuple(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="default: results/lakd-<device>.csv")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pairs = [tuple(p.split(":")) for p in args.pairs]
    rows = measure(pairs, args.variants, args.batch, device, args.iters, args.warmup)
    path = args.out or results_path(device)
    common.merge_csv(path, rows)
    print(f"rows written to {path}")


if __name__ == "__main__":
    main()
