"""LAKD's memory saving: one training step of a CIFAR pair in LAKD's three execution modes and with AT.

Variants (same pair, batch, synthetic CIFAR-100 images, seeded weights), each a full step as the
engine runs it, built and run as ``kdfast bench --e2e`` builds and runs its kdfast side
(``kdfast.engine.bench.kdfast_step``: the variant's training config through
``kdfast.engine.assembly.build_run``, the trainer's ``distill_step``): teacher ``features`` under
``inference_mode``, the distiller's forward, the backward (already run inside forward in LAKD's
local mode), an SGD step (momentum, weight decay):

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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import common

SPECS: tuple[common.OpSpec, ...] = ()
PAIRS = (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"))
VARIANTS = {  # variant -> (method, params)
    "lakd-local": ("lakd", {"mode": "local"}),
    "lakd-joint": ("lakd", {"mode": "joint"}),
    "lakd-end_to_end": ("lakd", {"mode": "end_to_end"}),
    "at": ("at", {}),
}
NUM_CLASSES = 100


def build_step(variant: str, teacher: str, student: str, batch: int, device: torch.device) -> tuple[Callable[[], None], int]:
    """One training step of `variant` on a fixed synthetic batch, as ``kdfast bench --e2e`` builds
    and runs kdfast's side (``kdfast.engine.bench.kdfast_step``: the training config assembled as
    ``kdfast train`` assembles it, the trainer's ``distill_step``), and the bytes of the teacher's
    Features."""
    from kdfast.engine import bench
    from kdfast.engine.trainer import teacher_features

    method, params = VARIANTS[variant]
    pair = bench.Pair(teacher, student, "cifar100", 32, NUM_CLASSES)
    data = bench.synthetic_batches(pair, batch, 1)
    step, run = bench.kdfast_step(bench.step_config(pair, method, params), device, data, batch, NUM_CLASSES)
    feats = teacher_features(run.teacher, data[0].to(device), device, run.students[0].cfg.train.amp)
    assert feats is not None  # both methods need a teacher
    tensors = [feats.logits, feats.pooled, *feats.stages, *feats.preact_stages, *feats.blocks]
    storages = {f.untyped_storage().data_ptr(): f.untyped_storage().nbytes() for f in tensors}
    return step, sum(storages.values())


def measure(
    pairs: Sequence[tuple[str, str]], variants: Sequence[str], batch: int, device: torch.device, iters: int, warmup: int
) -> list[common.Row]:
    """Every (pair, variant): warm-up steps, one step for the peak memory, `iters` timed steps
    (``kdfast.engine.timing.measure_step``)."""
    from kdfast.engine.timing import measure_step, quantiles

    rows = []
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # the engine's amp "auto"
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live tensor storages (common.LiveTensorBytes)"
    print(f"one training step, batch {batch}, {common.environment(device)['device']}; peak: {what}")
    print(f"{'pair':<24} {'variant':<16} {'peak MiB':>9} {'ms/step':>9}")
    for teacher, student in pairs:
        for variant in variants:
            step, teacher_bytes = build_step(variant, teacher, student, batch, device)
            times, peak = measure_step(step, device, warmup, iters)
            times_ms = quantiles(times)
            print(f"{teacher + '->' + student:<24} {variant:<16} {peak / 2**20:>9.1f} {times_ms[0]:>9.1f}", flush=True)
            note = f"peak: {what}; teacher Features {teacher_bytes / 2**20:.1f} MiB of it; {iters} timed steps"
            shape = f"{batch}x3x32x32"
            rows.append(
                common.measured_row(f"{teacher}->{student}", variant, "train_step", dtype, shape, times_ms, peak, device, note)
            )
    return rows


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
    path = args.out or common.default_results_path(device, "lakd")
    common.merge_csv(path, rows)
    print(f"rows written to {path}")


if __name__ == "__main__":
    main()
