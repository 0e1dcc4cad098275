"""Summaries of the files that ``benchmarks.gpu_check``'s stages write, and the table it prints last.

    python -m benchmarks.gpu_report FOLDER [--merge]    # a returned report: its table; --merge: rows into results/

Every function reads one kind of file and returns plain data (what goes into summary.json);
:func:`table` turns that summary into text. A missing file gives an empty summary, so a stage
that failed or was cut short still leaves a readable report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

REFERENCE_BACKENDS = ("eager", "compiled")
SWEEP_PASS = "fwd+bwd"
Stage = tuple[int, ...]


# --- Tests (pytest's JUnit XML).


def test_counts(junit: Path) -> dict[str, int]:
    """passed / failed / errors / skipped / total of a pytest JUnit XML report."""
    if not junit.is_file():
        return {}
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        counts[{"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]] += 1
    return {**counts, "total": sum(counts.values())}


def slowest_tests(junit: Path, count: int = 10) -> list[dict[str, Any]]:
    """The `count` slowest test cases: {"test": classname::name, "seconds"}."""
    if not junit.is_file():
        return []
    cases = [
        (float(c.get("time", 0)), f"{c.get('classname')}::{c.get('name')}")
        for c in ElementTree.parse(junit).getroot().iter("testcase")
    ]
    return [{"test": name, "seconds": round(seconds, 2)} for seconds, name in sorted(cases, reverse=True)[:count]]


def failed_tests(junit: Path) -> list[str]:
    """classname::name of every failed or erroring test case."""
    if not junit.is_file():
        return []
    return [
        f"{c.get('classname')}::{c.get('name')}"
        for c in ElementTree.parse(junit).getroot().iter("testcase")
        if any(child.tag in ("failure", "error") for child in c)
    ]


# --- Sanitizers (compute-sanitizer's summary lines).

SANITIZER_SUMMARY = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY): (\d+) (errors?|hazards?)")


def sanitizer_findings(log: Path) -> int | None:
    """The count in compute-sanitizer's last summary line of `log` (errors for memcheck,
    hazards for racecheck), or None if there is none (the tool did not finish)."""
    if not log.is_file():
        return None
    found = SANITIZER_SUMMARY.findall(log.read_text(errors="replace"))
    return int(found[-1][1]) if found else None


# --- Op sweep (rows of benchmarks/common.py's CSV) against the measured peaks.


def _stages(label: str) -> list[Stage]:
    return [tuple(int(n) for n in stage.split("x")) for stage in label.split("+")]


def _lcc_flops(stages: list[Stage]) -> float:
    """The two N x N correlation products of the default grid (4): N = 16 B regions of
    D = C H W / 16 elements, 2 N^2 D each."""
    b, c, h, w = stages[0]
    n, d = 16 * b, c * h * w / 16
    return 2 * (2 * n * n * d)


def _gram_flops(stages: list[Stage]) -> float:
    """The student and teacher B x B Gram products: 2 B^2 D each (D: all but the batch dim)."""
    return sum(2 * stage[0] ** 2 * math.prod(stage[1:]) for stage in stages)


# Forward FLOPs of the ops whose cost is matrix products (a lower bound: the products only);
# the backward counts twice the forward (two products per forward product).
FORWARD_FLOPS: dict[str, Callable[[list[Stage]], float]] = {
    "local_correlation_loss": _lcc_flops,
    "sp_loss": _gram_flops,
    "rkd_loss": _gram_flops,
}
PASS_FLOP_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _ms(row: dict[str, str]) -> float:
    try:
        value = float(row["median_ms"])
    except (KeyError, ValueError):
        return math.nan
    return value if value > 0 else math.nan


def roofline_fraction(row: dict[str, str], peaks: dict[str, float]) -> float:
    """max(GB/s / copy peak, TFLOP/s / matmul peak) of a row (TFLOP/s only for FORWARD_FLOPS ops)."""
    fractions = []
    if peaks.get("copy_gbps") and row.get("gbps"):
        fractions.append(float(row["gbps"]) / peaks["copy_gbps"])
    flops = FORWARD_FLOPS.get(row["op"])
    if flops and peaks.get("matmul_tflops"):
        tflops = flops(_stages(row["shape"])) * PASS_FLOP_FACTOR[row["pass"]] / (_ms(row) * 1e9)
        fractions.append(tflops / peaks["matmul_tflops"])
    fractions = [f for f in fractions if not math.isnan(f)]
    return max(fractions) if fractions else math.nan


def geomean(values: Iterable[float]) -> float:
    values = [v for v in values if v > 0 and not math.isnan(v)]
    return math.exp(statistics.fmean(map(math.log, values))) if values else math.nan


def op_summary(rows: list[dict[str, str]], peaks: dict[str, float]) -> list[dict[str, Any]]:
    """Per op, over its (shape, dtype) cases of the training pass (fwd+bwd): the fused backend
    with the smallest geometric mean of its time / the fastest fused time ("best"; "wins": the
    cases where it is the fastest, of "cases"), and for it the geometric mean of eager's time /
    its time ("vs_eager"), the same against compiled where compiled was timed ("vs_compiled"),
    and the median and largest roofline fraction of its rows."""
    groups: dict[str, dict[tuple[str, str], dict[str, dict[str, str]]]] = {}
    for row in rows:
        if row.get("pass") == SWEEP_PASS and not math.isnan(_ms(row)):
            groups.setdefault(row["op"], {}).setdefault((row["shape"], row["dtype"]), {})[row["backend"]] = row
    summary = []
    for op, cases in groups.items():
        fastest = {
            key: min((_ms(row) for b, row in case.items() if b not in REFERENCE_BACKENDS), default=math.nan)
            for key, case in cases.items()
        }
        fused = sorted({b for case in cases.values() for b in case if b not in REFERENCE_BACKENDS})
        if not fused:
            continue
        best = min(fused, key=lambda b: geomean(_ms(case[b]) / fastest[key] for key, case in cases.items() if b in case))
        mine = [case for case in cases.values() if best in case]
        ratios = {ref: geomean(_ms(c[ref]) / _ms(c[best]) for c in mine if ref in c) for ref in REFERENCE_BACKENDS}
        fractions = [roofline_fraction(c[best], peaks) for c in mine]
        fractions = [f for f in fractions if not math.isnan(f)]
        summary.append({
            "op": op, "best": best, "wins": sum(_ms(cases[key][best]) == fastest[key] for key in cases if best in cases[key]),
            "cases": len(cases), "vs_eager": ratios["eager"], "vs_compiled": ratios["compiled"],
            "roofline_median": statistics.median(fractions) if fractions else math.nan,
            "roofline_max": max(fractions) if fractions else math.nan,
        })  # fmt: skip
    return summary


# --- End to end (kdfast bench --e2e rows) and real data.


def e2e_summary(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per method: ms/step and images/s of eager-fp32 and kdfast, the speed-up, kdfast's peak memory."""
    by_method: dict[str, dict[str, dict[str, str]]] = {}
    for row in rows:
        if row["op"].startswith(STUDENTS_PREFIX):
            continue
        by_method.setdefault(row["op"].removeprefix("e2e_"), {})[row["backend"]] = row
    summary = []
    for method, runs in by_method.items():
        entry: dict[str, Any] = {"method": method}
        for backend, row in runs.items():
            batch = int(row["shape"].split("x")[0])
            entry[backend] = {
                "ms": _ms(row),
                "images_per_s": batch * 1e3 / _ms(row),
                "peak_mem_bytes": int(row["peak_mem_bytes"]) if row.get("peak_mem_bytes") else None,
            }
        if "eager-fp32" in runs and "kdfast" in runs:
            entry["speedup"] = entry["eager-fp32"]["ms"] / entry["kdfast"]["ms"]
        summary.append(entry)
    return summary


STUDENTS_PREFIX = "e2e_students_"


def students_summary(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per method and N (``kdfast bench --e2e --students``): ms per batch of N separate runs and of
    N students on one teacher forward, images/s per student of the latter, the speed-up."""
    found: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        if row["op"].startswith(STUDENTS_PREFIX):
            kind, n = row["backend"].removeprefix("kdfast-").rsplit("-", 1)
            entry = found.setdefault((row["op"].removeprefix(STUDENTS_PREFIX), int(n)), {})
            entry[kind] = _ms(row)
            entry["batch"] = int(row["shape"].split("x")[0])
    return [
        {
            "method": method,
            "n": n,
            "separate_ms": e.get("separate"),
            "shared_ms": e.get("shared"),
            "images_per_s_per_student": e["batch"] * 1e3 / e["shared"] if "shared" in e else None,
            "speedup": e["separate"] / e["shared"] if "separate" in e and "shared" in e else None,
        }
        for (method, n), e in found.items()
    ]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# --- The table printed last.


def fmt_num(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    """The summary as text: stages, tests, slowest tests, sanitizers, ops, e2e, real data."""
    env = summary.get("environment", {})
    lines = [
        (
            f"gpu-check on {env.get('device', '?')} (torch {env.get('torch', '?')}, triton {env.get('triton', '?')}), "
            f"{'DRY RUN (CPU), ' if summary.get('dry_run') else ''}{summary.get('wall_s', 0):.0f} s"
        )
    ]
    lines += ["", f"{'stage':<12} {'status':<8} {'s':>6}  notes"]
    for stage in summary.get("stages", []):
        lines.append(f"{stage['name']:<12} {stage['status']:<8} {stage['wall_s']:>6.1f}  {stage.get('note', '')}")
    tests = summary.get("tests", {})
    if tests:
        lines += ["", "tests: " + ", ".join(f"{k} {v}" for k, v in tests.items())]
        lines += [f"  FAILED {name}" for name in summary.get("failed_tests", [])[:20]]
        lines += ["slowest tests:"] + [f"  {t['seconds']:>7.2f} s  {t['test']}" for t in summary.get("slowest_tests", [])]
    sanitizers = summary.get("sanitizers", {})
    if sanitizers:
        lines += ["", "sanitizers: " + ", ".join(f"{tool} {'-' if n is None else n}" for tool, n in sanitizers.items())]
    peaks = summary.get("peaks", {})
    if peaks:
        lines += [
            "",
            (
                f"peaks: copy {peaks['copy_gbps']:.0f} GB/s (read + write), matmul {peaks['matmul_tflops']:.3g} "
                f"TFLOP/s ({peaks['matmul_dtype']} {peaks['matmul_n']}^3)"
            ),
        ]
    ops = summary.get("ops", [])
    if ops:
        lines += [
            "",
            f"ops ({SWEEP_PASS}; ratios: reference time / best time, geometric mean over cases):",
            f"{'op':<24} {'best':<7} {'wins':>7} {'x eager':>8} {'x compile':>9} {'roofline med':>12} {'max':>6}",
        ]
        for op in ops:
            lines.append(
                f"{op['op']:<24} {op['best']:<7} {op['wins']:>3}/{op['cases']:<3} {fmt_num(op['vs_eager'], '8.2f')} "
                f"{fmt_num(op['vs_compiled'], '9.2f')} {fmt_num(op['roofline_median'], '12.1%')} "
                f"{fmt_num(op['roofline_max'], '6.1%')}"
            )
    e2e = summary.get("e2e", [])
    if e2e:
        lines += ["", f"{'e2e method':<10} {'eager ms':>9} {'kdfast ms':>9} {'img/s':>9} {'speed-up':>8} {'peak MiB':>9}"]
        for entry in e2e:
            eager, fast = entry.get("eager-fp32", {}), entry.get("kdfast", {})
            peak = fast.get("peak_mem_bytes")
            lines.append(
                f"{entry['method']:<10} {fmt_num(eager.get('ms'), '9.2f')} {fmt_num(fast.get('ms'), '9.2f')} "
                f"{fmt_num(fast.get('images_per_s'), '9.0f')} {fmt_num(entry.get('speedup'), '7.2f')}x "
                f"{fmt_num(None if peak is None else peak / 2**20, '9.1f')}"
            )
    students = summary.get("e2e_students", [])
    if students:
        lines += ["", f"{'students':<10} {'N':>2} {'separate ms':>11} {'shared ms':>9} {'img/s/student':>13} {'speed-up':>8}"]
        for entry in students:
            lines.append(
                f"{entry['method']:<10} {entry['n']:>2} {fmt_num(entry['separate_ms'], '11.2f')} "
                f"{fmt_num(entry['shared_ms'], '9.2f')} {fmt_num(entry['images_per_s_per_student'], '13.0f')} "
                f"{fmt_num(entry['speedup'], '7.2f')}x"
            )
    missing = summary.get("e2e_missing", [])
    if missing:
        lines.append(f"  not in kdfast bench --e2e: {', '.join(missing)}")
    real = summary.get("real_data", {})
    if real:
        lines += [
            "",
            (
                f"real data: CIFAR-10, {real['train_images']} training / {real['test_images']} test images, "
                f"{real['epochs']} epochs, batch {real['batch_size']}"
            ),
        ]
        for name in ("teacher", "student_kd"):
            if name in real:
                run = real[name]
                lines.append(
                    f"  {name:<11} {run['model']:<9} top-1 best {run['best_top1']:.2f}% last "
                    f"{run['last_top1']:.2f}%, {run['wall_s']:.1f} s, {run['images_per_s']:.0f} img/s"
                )
    return "\n".join(lines)


# --- A returned report: reprint, merge into the device's results CSV.


def merge_into_results(folder: Path) -> Path | None:
    """Merge the ops.csv and e2e.csv rows of a report folder into the results CSV of their
    device (``benchmarks/results/cuda-<device>.csv``); returns that file (None: no rows)."""
    from benchmarks import common  # imports torch: only here

    rows = read_rows(folder / "ops.csv") + read_rows(folder / "e2e.csv")
    if not rows:
        return None
    path = common.results_path("cuda", rows[0]["device"])
    common.merge_csv(path, rows)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_report",
        description="Print a gpu_check report's table; --merge: its rows into benchmarks/results/.",
    )
    parser.add_argument("folder", type=Path, help="a gpu_check report folder (summary.json, ops.csv, e2e.csv, ...)")
    parser.add_argument(
        "--merge", action="store_true", help="merge ops.csv and e2e.csv into benchmarks/results/cuda-<device>.csv"
    )
    args = parser.parse_args(argv)
    print(table(read_json(args.folder / "summary.json")))
    if args.merge:
        print(f"rows merged into {merge_into_results(args.folder)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
