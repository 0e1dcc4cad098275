"""GPU timing through ``triton.testing.do_bench``: one case after the other, each row merged into
the CSV as soon as it is measured (a run cut short keeps what it measured)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import common


def measure(case: common.Case) -> common.Row:
    """Warm up, measure peak memory once, then time with do_bench (its own warm-up included; by
    hand for a pass with a setup: common.cuda_times)."""
    timed = common.prepare(case)
    peak = common.peak_memory_bytes(timed, case)
    return common.make_row(case, common.cuda_times(timed), peak, common.now())


def run(cases: Sequence[common.Case], out: Path) -> int:
    """Measure `cases` into the CSV `out`; a failing case is reported and skipped. Exit status."""
    failures = 0
    for case in cases:
        try:
            row = measure(case)
        except Exception as error:  # e.g. a backend's kernel missing or failing: go on
            failures += 1
            print(f"FAILED {case.id}: {type(error).__name__}: {error}", flush=True)
            continue
        finally:
            torch.cuda.empty_cache()
        common.merge_csv(out, [row])
        print(
            f"{case.id}: median {row.median_ms:.4f} ms [p20 {row.p20_ms:.4f}, p80 {row.p80_ms:.4f}], "
            f"{row.gbps:.1f} GB/s, peak {row.peak_mem_bytes} B",
            flush=True,
        )
    print(f"{len(cases) - failures} of {len(cases)} cases measured; rows in {out}")
    return 1 if failures else 0
