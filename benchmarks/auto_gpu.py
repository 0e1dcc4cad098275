"""Set the "auto" backend of CUDA tensors (``kdfast/auto_gpu.json``) from a GPU results file.

    python -m benchmarks.auto_gpu RESULTS.csv [--write PATH] [--pass fwd+bwd] [--check]

RESULTS.csv has ``benchmarks/common.py``'s columns (``ops.csv`` of a ``gpu_check`` report, or
``benchmarks/results/cuda-<device>.csv``). For every op family of ``kdfast.backends.OPS`` the
choice is "cuda" when, over the cases (op of the family, shape, dtype) of the pass that both
Triton and CUDA ran, the geometric mean of cuda time / triton time is below 1, else "triton".
A family with no such case keeps its current choice. ``--check`` prints the choice and writes
nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from benchmarks import gpu_report
from benchmarks import run as bench_run
from kdfast import backends

CHOICES = ("triton", "cuda")


def op_families() -> dict[str, str]:
    """Benchmarked op name -> kdfast.backends op family (e.g. "attention_map" -> "at")."""
    return {
        spec.name: spec.family for name in bench_run.OPS for spec in importlib.import_module(f"benchmarks.bench_{name}").SPECS
    }


def cuda_over_triton(rows: list[dict[str, str]], pass_: str) -> dict[str, tuple[float, int]]:
    """Per family: (geometric mean of cuda ms / triton ms, number of cases) over the cases of
    `pass_` where both backends have a time."""
    families = op_families()
    times: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        if row.get("pass") == pass_ and row.get("backend") in CHOICES and row.get("op") in families:
            try:
                ms = float(row["median_ms"])
            except ValueError:
                continue
            if ms > 0 and not math.isnan(ms):
                times.setdefault((row["op"], row["shape"], row["dtype"]), {})[row["backend"]] = ms
    ratios: dict[str, list[float]] = {}
    for (op, _, _), by_backend in times.items():
        if len(by_backend) == len(CHOICES):
            ratios.setdefault(families[op], []).append(by_backend["cuda"] / by_backend["triton"])
    return {family: (gpu_report.geomean(values), len(values)) for family, values in ratios.items()}


def choose(rows: list[dict[str, str]], current: dict[str, str], pass_: str) -> dict[str, str]:
    """The new choice of every family in `current` (see the module docstring)."""
    ratios = cuda_over_triton(rows, pass_)
    return {
        family: (("cuda" if ratios[family][0] < 1 else "triton") if family in ratios else old) for family, old in current.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="GPU results CSV (benchmarks/common.py columns)")
    parser.add_argument("--write", type=Path, default=backends.AUTO_GPU_FILE, help="default: kdfast/auto_gpu.json")
    parser.add_argument("--pass", dest="pass_", default=gpu_report.SWEEP_PASS, help="default: fwd+bwd (a training step)")
    parser.add_argument("--check", action="store_true", help="print the choice, write nothing")
    args = parser.parse_args(argv)
    rows = gpu_report.read_rows(args.results)
    if not rows:
        parser.error(f"{args.results}: no rows")
    current = json.loads(args.write.read_text())
    choice = choose(rows, current["choice"], args.pass_)
    ratios = cuda_over_triton(rows, args.pass_)
    print(f"{'family':<16} {'cases':>5} {'cuda/triton':>11}  choice")
    for family, backend in choice.items():
        ratio, cases = ratios.get(family, (math.nan, 0))
        change = "" if backend == current["choice"][family] else f" (was {current['choice'][family]})"
        print(f"{family:<16} {cases:>5} {gpu_report.fmt_num(ratio, '11.3f')}  {backend}{change}")
    if args.check:
        return 0
    devices = sorted({row.get("device", "") for row in rows} - {""})
    data = {"device": ", ".join(devices) or None, "source": args.results.name, "pass": args.pass_, "choice": choice}
    args.write.write_text(json.dumps(data, indent=2) + "\n")
    print(f"written to {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
