"""Run kdfast's benchmarks and merge the rows into the device's CSV (benchmarks/README.md).

    python -m benchmarks.run [--ops at] [--device cpu|cuda] [--quick] [--out PATH] [--backends ...]
                             [--dtypes ...] [--passes ...] [--shapes TEXT] [--threads N] [--list]

GPU cases are timed with triton.testing.do_bench (cuda_timing.py), CPU cases with
pytest-benchmark (cpu_timing.py). Rows replace those with the same (op, backend, pass, dtype,
shape) in the CSV.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import common

PACKAGE_DIR = Path(__file__).parent
OPS = tuple(sorted(path.stem.removeprefix("bench_") for path in PACKAGE_DIR.glob("bench_*.py")))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=OPS, help="op families (bench_<op>.py); default: all")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="a few shapes only (same timing settings)")
    parser.add_argument("--out", type=Path, help="CSV to merge into; default: benchmarks/results/<device>.csv")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=common.REFERENCE_BACKENDS + common.FUSED_BACKENDS,
        help="default: eager, compiled and every fused backend available on the device (triton on "
        "the CPU, i.e. the interpreter, only when named here: then with tiny shapes)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=tuple(common.DTYPES), help="default: float32 bfloat16 (+ float16 on cuda)")
    parser.add_argument("--passes", nargs="+", choices=common.PASSES, default=common.PASSES)
    parser.add_argument("--shapes", default="", metavar="TEXT", help="only shapes whose label contains TEXT, e.g. 256x64x56x56")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="CPU: torch.set_num_threads(N) (part of the CPU device: own CSV)"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    interpreted = device.type == "cpu" and "triton" in (args.backends or ())
    if interpreted:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of kdfast
    specs = [spec for op in args.ops for spec in importlib.import_module(f"benchmarks.bench_{op}").SPECS]
    for spec in specs:
        for backend in args.backends or ():
            reason = common.unavailable_reason(spec, backend, device)
            if reason:
                sys.exit(f"backend {backend!r} cannot run {spec.name} on {device}: {reason}")
    shape_set = common.shape_set_name(device, args.quick, interpreted)
    dtypes = args.dtypes or common.DEFAULT_DTYPES[device.type]
    cases = common.make_cases(specs, device, shape_set, args.backends, dtypes, args.passes, args.shapes)
    if args.list:
        print("\n".join(case.id for case in cases))
        return 0
    out = args.out or common.default_results_path(device)
    print(f"{len(cases)} cases on {common.environment(device)['device']} -> {out}", flush=True)
    skipped = [case for case in cases if case.skip_reason]
    if skipped:  # recorded, not run
        common.merge_csv(out, [common.unmeasured_row(case) for case in skipped])
        print("\n".join(f"{case.id}: {case.skip_reason}" for case in skipped), flush=True)
    timing = importlib.import_module(f"benchmarks.{device.type}_timing")  # cpu_timing or cuda_timing
    return timing.run([case for case in cases if not case.skip_reason], out)


if __name__ == "__main__":
    sys.exit(main())
