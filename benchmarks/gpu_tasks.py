"""The work of ``benchmarks.gpu_check``'s stages that runs in Python: one task per subprocess.

    python -m benchmarks.gpu_tasks environment --out ENV.json
    python -m benchmarks.gpu_tasks extension
    python -m benchmarks.gpu_tasks op-cases --device cuda|cpu
    python -m benchmarks.gpu_tasks op-sweep --device cuda|cpu --out OPS.csv --peaks PEAKS.json [--dry-run]
    python -m benchmarks.gpu_tasks e2e --device cuda|cpu --out E2E.csv [--dry-run]
    python -m benchmarks.gpu_tasks real-data --subset FILE --out DIR [--dry-run]

Each task is a separate process so that ``gpu_check`` can time-box it (kill it at its limit)
and run it under ``compute-sanitizer``. What each one does is in its function's docstring.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks import run as bench_run

# --- Environment and build check.


def environment(out: Path) -> int:
    """Write the device, torch, triton and CUDA versions and the CPU count to `out` (JSON)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {**common.environment(device), "cuda": torch.version.cuda or "", "cpus": os.cpu_count()}
    out.write_text(json.dumps(env, indent=2) + "\n")
    print(env)
    return 0


def extension() -> int:
    """Print which ops have compiled C++ (CPU) and CUDA kernels in kdfast._C; exit status 1 if
    the extension did not load."""
    from kdfast import _extension, backends

    if _extension.LOAD_ERROR is not None:
        print(f"kdfast._C failed to load: {_extension.LOAD_ERROR}")
        return 1
    for op in backends.OPS:
        have = [key for key in ("CPU", "CUDA") if backends.CPP_KERNELS[(op, key)]]
        print(f"{op}: {' '.join(have) or 'no kernels'}")
    return 0


# --- One small case of every op (the sanitizers' driver).


def all_specs() -> list[common.OpSpec]:
    """Every OpSpec of every benchmarks/bench_<family>.py, in benchmarks.run's order."""
    return [spec for family in bench_run.OPS for spec in importlib.import_module(f"benchmarks.bench_{family}").SPECS]


def op_cases(device: torch.device) -> int:
    """Forward and backward of every op on its smallest benchmark shape ("tiny"), float32 and
    bfloat16, through the fused backend of `device` ("cuda" on a GPU, "cpu" on the CPU); the
    loss and every gradient must be finite. Exit status: the number of failing cases."""
    backend = "cuda" if device.type == "cuda" else "cpu"
    failures = 0
    for spec in all_specs():
        for dtype in (torch.float32, torch.bfloat16):
            case = f"{spec.name} {backend} {common.dtype_name(dtype)} {common.shape_label(spec.shapes['tiny'][0])}"
            try:
                torch.manual_seed(0)
                inputs = spec.make_inputs(spec.shapes["tiny"][0], dtype, device)
                out = spec.fused(*inputs.args, backend=backend)
                grads = torch.autograd.grad(out, inputs.grad_inputs, inputs.grad_output)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads))
                print(f"{'ok' if finite else 'NOT FINITE'} {case}", flush=True)
                failures += not finite
            except Exception as error:  # noqa: BLE001 (report every op, not only the first failure)
                print(f"FAILED {case}: {type(error).__name__}: {error}", flush=True)
                failures += 1
    return failures


# --- Device peaks and the op sweep.


@dataclass(frozen=True)
class Peaks:
    """The device's ceilings measured in this run: copy bandwidth (bytes read + written) and
    matrix-product rate on random data."""

    copy_gbps: float
    copy_bytes: int  # size of the copied buffer
    matmul_tflops: float
    matmul_n: int  # n x n x n product
    matmul_dtype: str


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of `fn`: do_bench on the GPU, 5 timed calls after one warm-up on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _random_bytes(count: int, nbytes: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device) for _ in range(count)]


def measure_peaks(device: torch.device) -> Peaks:
    """A device-to-device copy of 2 GiB (64 MiB on the CPU) and an 8192^3 bf16 product (512^3
    float32 on the CPU), both on random data."""
    cuda = device.type == "cuda"
    nbytes = (2 << 30) if cuda else (64 << 20)
    dst, src = _random_bytes(2, nbytes, device)
    copy_ms = _median_ms(functools.partial(dst.copy_, src), device)
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    matmul_ms = _median_ms(functools.partial(torch.matmul, a, b), device)
    return Peaks(2 * nbytes / (copy_ms * 1e6), nbytes, 2 * n**3 / (matmul_ms * 1e9), n, common.dtype_name(dtype))


@dataclass(frozen=True)
class SweepPlan:
    """Which cases the op sweep times (see :func:`sweep_cases`)."""

    shape_set: str  # key of OpSpec.shapes
    dtypes: tuple[str, ...]
    fused: tuple[str, ...]  # fused backends, where available
    ops: tuple[str, ...] | None  # op names; None: every op
    compiled_ops: tuple[str, ...] | None  # ops also timed as torch.compile(reference); None: every op


# GPU: the quick CIFAR and ImageNet shapes, the training pass; compiled on each op's first shape.
GPU_SWEEP = SweepPlan("cuda-quick", ("bfloat16", "float32"), ("triton", "cuda"), None, None)
# CPU dry run: the same path on tiny shapes and two ops, no compiled case (an Inductor compile
# takes 10 to 60 s on a 2-core CPU).
DRY_SWEEP = SweepPlan("tiny", ("float32",), ("cpu",), ("masked_mse", "kd_loss"), ())
SWEEP_PASS = "fwd+bwd"


def sweep_cases(device: torch.device, plan: SweepPlan) -> list[common.Case]:
    """In this order: eager and every available fused backend on every shape of the plan's set
    in its first dtype; ``compiled`` on the first shape of each compiled op in that dtype; the
    other dtypes like the first. A sweep cut short by its time box loses the last ones first."""
    specs = [spec for spec in all_specs() if plan.ops is None or spec.name in plan.ops]

    def measured(dtypes: Sequence[str]) -> list[common.Case]:
        return [case for spec in specs for case in common.make_cases(
            [spec], device, plan.shape_set,
            ["eager", *(b for b in plan.fused if common.unavailable_reason(spec, b, device) is None)],
            dtypes, (SWEEP_PASS,))]  # fmt: skip

    compiled = [
        common.make_cases([spec], device, plan.shape_set, ["compiled"], plan.dtypes[:1], (SWEEP_PASS,))[0]
        for spec in specs
        if plan.compiled_ops is None or spec.name in plan.compiled_ops
    ]
    cases = measured(plan.dtypes[:1]) + compiled + measured(plan.dtypes[1:])
    return [case for case in cases if case.skip_reason is None]


def op_sweep(device: torch.device, out: Path, peaks_path: Path, dry_run: bool) -> int:
    """Measure the peaks (written to `peaks_path` as JSON), then time the sweep's cases with
    the benchmark harness (rows merged into the CSV `out` as they are measured on the GPU)."""
    peaks = measure_peaks(device)
    peaks_path.write_text(json.dumps(asdict(peaks), indent=2) + "\n")
    print(f"peaks: copy {peaks.copy_gbps:.1f} GB/s, matmul {peaks.matmul_tflops:.3g} TFLOP/s ({peaks.matmul_dtype})", flush=True)
    cases = sweep_cases(device, DRY_SWEEP if dry_run else GPU_SWEEP)
    print(f"{len(cases)} cases -> {out}", flush=True)
    timing = importlib.import_module(f"benchmarks.{device.type}_timing")  # cpu_timing or cuda_timing
    return timing.run(cases, out)


# --- End to end: kdfast bench --e2e.

E2E_METHODS = ("kd", "at", "dkd", "lcc", "lakd", "afd")


def e2e(device: torch.device, out: Path, dry_run: bool) -> int:
    """``kdfast bench --e2e`` for the E2E_METHODS that it has an eager peer for (the others are
    listed in `out` with suffix .missing.json), then ``--students 1 2 4`` for KD (N students on one
    teacher forward vs N separate runs); the dry run takes one method, batch 2, 1 step."""
    from kdfast import cli
    from kdfast.engine.bench import METHODS

    methods = [m for m in E2E_METHODS if m in METHODS][: 1 if dry_run else None]
    missing = [m for m in E2E_METHODS if m not in METHODS]
    out.with_suffix(".missing.json").write_text(json.dumps(missing) + "\n")
    if missing:
        print(f"no eager peer in kdfast/engine/bench.py for {', '.join(missing)}: not measured", flush=True)
    quick = ["--quick", "--batch", "2", "--iters", "1"] if dry_run else []
    status = cli.main(["bench", "--e2e", "--device", device.type, "--out", str(out), "--methods", *methods, *quick])
    students = ["bench", "--e2e", "--device", device.type, "--out", str(out), "--methods", "kd", "--students", "1", "2", "4"]
    return status or cli.main(students + (quick or ["--iters", "10"]))


# --- Real data: a CIFAR-10 teacher, then a KD student from it.


@dataclass(frozen=True)
class RealDataPlan:
    teacher: str
    student: str
    epochs: int
    batch_size: int
    lr: float
    max_train_batches: int | None  # per epoch; None: the whole subset


GPU_REAL_DATA = RealDataPlan("resnet20", "resnet8", epochs=10, batch_size=128, lr=0.1, max_train_batches=None)
DRY_REAL_DATA = RealDataPlan("resnet20", "resnet8", epochs=1, batch_size=32, lr=0.1, max_train_batches=2)


def real_data(subset: Path, out: Path, dry_run: bool) -> int:
    """Train `plan.teacher` on the subset (method vanilla), then distil `plan.student` from its
    best checkpoint with KD (CIFAR-100's KD config: 0.1 CE + 0.9 KD, T = 4), both for
    `plan.epochs` epochs, the learning rate x0.1 at 60% and 85% of them; write
    `out`/real_data.json: each run's best and last top-1 on the subset's test images and its
    wall time."""
    from benchmarks import gpu_data
    from kdfast.engine import load_config, train

    plan = DRY_REAL_DATA if dry_run else GPU_REAL_DATA
    milestones = sorted({max(1, round(plan.epochs * 0.6)), max(1, round(plan.epochs * 0.85))})
    with tempfile.TemporaryDirectory() as tmp:
        root = gpu_data.unpack(subset, Path(tmp))
        arrays = gpu_data.load(subset)
        common_overrides = [
            "data.dataset=cifar10", f"data.root={root}", f"data.batch_size={plan.batch_size}",
            f"optim.lr={plan.lr}", f"optim.milestones={milestones}", f"train.epochs={plan.epochs}",
            "train.progress=false", f"train.max_train_batches={plan.max_train_batches or 'null'}",
        ]  # fmt: skip
        runs = (
            ("teacher", "cifar100/teacher/resnet56", [f"model.student={plan.teacher}"]),
            ("student_kd", "cifar100/kd/resnet56_resnet20",
             [f"model.teacher={plan.teacher}", f"model.student={plan.student}",
              f"model.teacher_checkpoint={out / 'teacher' / 'best.pt'}"]),
        )  # fmt: skip
        results = {"train_images": len(arrays["train_y"]), "test_images": len(arrays["test_y"]), **asdict(plan)}
        for name, config, overrides in runs:
            cfg = load_config(config, [*common_overrides, *overrides, f"train.out_dir={out / name}"])
            print(f"== {name}: {cfg.model.student} ({cfg.method.name}), {cfg.train.epochs} epochs", flush=True)
            summary = train(cfg)
            results[name] = {"model": cfg.model.student, "method": cfg.method.name, **asdict(summary)}
            (out / "real_data.json").write_text(json.dumps(results, indent=2) + "\n")  # after each run: a cut stage keeps it
    for name, _, _ in runs:
        print(f"{name}: best top-1 {results[name]['best_top1']:.2f}%, {results[name]['wall_s']:.1f} s", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_tasks", description=__doc__.split("\n\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    env = tasks.add_parser("environment")
    tasks.add_parser("extension")
    cases = tasks.add_parser("op-cases")
    sweep = tasks.add_parser("op-sweep")
    bench = tasks.add_parser("e2e")
    real = tasks.add_parser("real-data")
    for task in (cases, sweep, bench):
        task.add_argument("--device", choices=("cpu", "cuda"), required=True)
    for task in (env, sweep, bench, real):
        task.add_argument("--out", type=Path, required=True)
    for task in (sweep, bench, real):
        task.add_argument("--dry-run", action="store_true")
    sweep.add_argument("--peaks", type=Path, required=True)
    real.add_argument("--subset", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.task == "environment":
        return environment(args.out)
    if args.task == "extension":
        return extension()
    if args.task == "op-cases":
        return min(op_cases(torch.device(args.device)), 1)
    if args.task == "op-sweep":
        return op_sweep(torch.device(args.device), args.out, args.peaks, args.dry_run)
    if args.task == "e2e":
        return e2e(torch.device(args.device), args.out, args.dry_run)
    return real_data(args.subset, args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
