"""CPU timing through pytest-benchmark: one benchmark test per case, run by :func:`run`.

:func:`run` runs this file with ``pytest.main`` and a plugin that parametrises
:func:`test_case` with the cases, then converts pytest-benchmark's JSON (every round's time is
in it) into rows, merged into the CSV at the end of the run. The project's test suite never collects this file:
``testpaths = ["tests"]``, and its name does not match ``test_*.py``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from benchmarks import common

MAX_TIME_S = 0.3  # pytest-benchmark: rounds run for about this long (at least MIN_ROUNDS)
MIN_ROUNDS = 5


class CasesPlugin:
    """Parametrises the ``case`` argument of :func:`test_case` with the cases to run."""

    def __init__(self, cases: Sequence[common.Case]) -> None:
        self.cases = list(cases)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", self.cases, ids=[case.id for case in self.cases])


def test_case(benchmark, case: common.Case) -> None:
    """Warm up, measure peak memory once, then let pytest-benchmark time the calls.

    A pass with a setup (a backward that runs once per forward) is timed one call per round
    (``benchmark.pedantic``, the setup untimed), for as many rounds as fit in about MAX_TIME_S
    of setup and call together (at least MIN_ROUNDS).
    """
    timed = common.prepare(case)
    benchmark.extra_info.update(case_id=case.id, peak_mem_bytes=common.peak_memory_bytes(timed, case), timestamp=common.now())
    if timed.setup is None:
        benchmark(timed.run)
        return
    start = time.perf_counter()
    timed()
    rounds = max(MIN_ROUNDS, math.ceil(MAX_TIME_S / (time.perf_counter() - start)))
    benchmark.pedantic(timed.run, setup=timed.setup, rounds=rounds, iterations=1)


def run(cases: Sequence[common.Case], out: Path) -> int:
    """Time `cases` with pytest-benchmark and merge their rows into the CSV `out`. Exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "benchmark.json"
        exit_code = pytest.main(
            [
                __file__,
                "-q",
                "-p",
                "no:cacheprovider",
                "--benchmark-enable",  # the project's addopts disable benchmarks for the test suite
                f"--benchmark-json={report}",
                f"--benchmark-max-time={MAX_TIME_S}",
                f"--benchmark-min-rounds={MIN_ROUNDS}",
                "--benchmark-columns=median,iqr,rounds,iterations",
                "--benchmark-sort=name",
            ],  # fmt: skip
            plugins=[CasesPlugin(cases)],
        )
        rows = rows_from_json(report, cases) if report.exists() else []
    common.merge_csv(out, rows)
    print(f"{len(rows)} of {len(cases)} cases measured; rows in {out}")
    return int(exit_code)


def rows_from_json(path: Path, cases: Sequence[common.Case]) -> list[common.Row]:
    """Rows from a pytest-benchmark JSON report (``stats.data``: seconds per call, every round)."""
    by_id = {case.id: case for case in cases}
    rows = []
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench["extra_info"]
        times_ms = [seconds * 1e3 for seconds in bench["stats"]["data"]]
        case = by_id[info["case_id"]]
        rows.append(common.make_row(case, common.summarize(times_ms), info["peak_mem_bytes"], info["timestamp"]))
    return rows
