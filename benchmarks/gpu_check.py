"""One prepared GPU session (``make gpu-check``): build, test, sanitize, benchmark, train on real data, report.

    python -m benchmarks.gpu_check [--stages NAME ...] [--dry-run] [--out DIR] [--budget-s S] [--list]

Runs the stages of :data:`STAGES` in order. Each command of a stage is a subprocess with its
own time box (``Command.timeout_s``, killed with its process group at the limit), and the
whole run has a deadline (``--budget-s``, default 470 s: under 8 minutes with the report): a
command gets the smaller of its box and the time left, and is skipped when less than
MIN_COMMAND_S remain. A failing or timed-out command is reported and the next one runs.

Everything lands in one folder: ``--out``, else ``$OUT`` when set (the lent machine's folder
that comes back), else ``benchmarks/results/gpu-<UTC date-time>/``. At most 8 files, written
after every stage so that a run cut short still leaves them: summary.json (everything the
table shows, plus each command's status and time), summary.txt (the table), tests.xml
(pytest's JUnit report), ops.csv (op sweep rows, ``benchmarks/common.py`` columns),
e2e.csv (``kdfast bench --e2e`` rows), logs.tar.gz (every command's log and the stages'
other files). The table is printed last.

``--dry-run`` runs the same stages on the CPU: no pip build (the extension is only checked),
three CPU tests of tests/test_gpu_check.py, the sanitizers' driver without compute-sanitizer
on the "cpu" backend, the sweep on tiny shapes, one e2e method, a one-epoch real-data run of
two batches. The test suite runs it (tests/test_gpu_check.py).

Adding a stage: write a function ``Context -> list[Command]`` (and, if it writes files the
summary should show, a reader in :func:`summarize`), then add a :class:`Stage` to STAGES.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from benchmarks import gpu_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 470
MIN_COMMAND_S = 10  # a command with less time left than this is skipped
# In a command's argv, replaced by its effective time box minus STOP_MARGIN_S: for tools that can
# stop themselves cleanly before they are killed (pytest-timeout's --session-timeout).
SECONDS_LEFT = "{seconds_left}"
STOP_MARGIN_S = 20
DATA_FILE = ROOT / ".gpu-data" / "cifar10-subset.npz.xz"  # benchmarks/gpu_data.py writes it (make gpu-data)
REPORT_FILES = ("summary.json", "summary.txt", "tests.xml", "ops.csv", "e2e.csv", "loader.csv")  # copied from the work folder


@dataclass(frozen=True)
class Context:
    """What the stages' command builders know."""

    dry_run: bool
    work: Path  # every command's log and output files
    data: Path  # the CIFAR-10 subset file
    python: str = sys.executable
    cpus: int = os.cpu_count() or 1

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def task(self, *args: str) -> list[str]:
        """argv of a benchmarks.gpu_tasks task."""
        return [self.python, "-m", "benchmarks.gpu_tasks", *args]


@dataclass(frozen=True)
class Command:
    name: str  # its log is <name>.log in the work folder
    argv: list[str]
    timeout_s: float  # time box on the GPU machine
    env: dict[str, str] = field(default_factory=dict)
    fallback_for: str | None = None  # run only when this earlier command of the stage did not pass


@dataclass(frozen=True)
class Stage:
    name: str
    what: str  # one line, for --list
    commands: Callable[[Context], list[Command]]


@dataclass
class Result:
    """How one command ended: "pass", "fail" (exit status), "timeout", "skipped" (no time
    left) or "unneeded" (a fallback whose command passed)."""

    name: str
    status: str
    wall_s: float = 0.0
    returncode: int | None = None
    note: str = ""


# --- The stages.


def build(ctx: Context) -> list[Command]:
    """pip's editable build for sm_90 on every core; if it fails, the same without the CUDA
    kernels (the editable install is what makes kdfast.kernels, i.e. Triton, importable), then
    the extension check. The dry run only checks the extension."""
    check = Command("extension", ctx.task("extension"), 60)
    if ctx.dry_run:
        return [check]
    pip = [ctx.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    # kdfast._C_emu (the CUDA kernels emulated on the CPU, for CPU tests) is not needed here
    env = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(ctx.cpus), "KDFAST_SKIP_CUDA_EMU": "1"}
    return [
        Command("build", pip, 300, env),
        Command("build-without-cuda", pip, 150, {**env, "KDFAST_SKIP_CUDA": "1"}, fallback_for="build"),
        check,
    ]


def correctness(ctx: Context) -> list[Command]:
    """The GPU part of the test suite (``-m gpu``: every op on cuda and triton, opcheck,
    compile, training on the GPU), per-test times in the JUnit report, xdist workers and a
    per-test timeout where those plugins are installed (they are on the lent machine)."""
    argv = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15", f"--junitxml={ctx.work / 'tests.xml'}"]
    if find_spec("pytest_timeout"):  # per test; for the session (2.3+): stop, write the report, before the kill
        argv.append("--timeout=120")
        if tuple(int(n) for n in version("pytest-timeout").split(".")[:2]) >= (2, 3):
            argv.append(f"--session-timeout={SECONDS_LEFT}")
    if ctx.dry_run:  # a few fast CPU tests (this script's own, so that no other module's renames break it)
        return [Command("tests", argv + ["tests/test_gpu_check.py", "-k", "round_trip or set_auto or shipped"], 240)]
    if find_spec("xdist"):
        argv += ["-n", str(min(8, ctx.cpus))]
    return [Command("tests", argv + ["-m", "gpu"], 150)]


def compute_sanitizer() -> str | None:
    """The compute-sanitizer on PATH or in the CUDA toolkit."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    found = shutil.which("compute-sanitizer")
    return found or next((str(p) for h in filter(None, homes) if (p := Path(h) / "bin" / "compute-sanitizer").is_file()), None)


def sanitizers(ctx: Context) -> list[Command]:
    """memcheck and racecheck on one small case of every op forward and backward through the
    CUDA backend (kdfast's kernels only, CUDA API errors not counted: torch's own probes make
    some; the caching allocator off, so that memcheck sees each tensor's own bounds). The dry
    run runs the driver on the "cpu" backend, unsanitized."""
    driver = ctx.task("op-cases", "--device", ctx.device)
    if ctx.dry_run:
        return [Command("op-cases", driver, 120)]
    tool = compute_sanitizer()
    if tool is None:
        missing = [
            ctx.python,
            "-c",
            "raise SystemExit('compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)')",
        ]
        return [Command("memcheck", missing, 10), Command("racecheck", missing, 10)]
    sanitize = [
        tool,
        "--error-exitcode",
        "1",
        "--print-limit",
        "20",
        "--report-api-errors",
        "no",
        "--kernel-name",
        "kns=kdfast",
        "--tool",
    ]
    return [
        Command("memcheck", [*sanitize, "memcheck", *driver], 60, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        Command("racecheck", [*sanitize, "racecheck", *driver], 60),
    ]


def ops(ctx: Context) -> list[Command]:
    """Device peaks (copy, bf16 matmul), then the op sweep of benchmarks/gpu_tasks.py."""
    argv = ctx.task(
        "op-sweep", "--device", ctx.device, "--out", str(ctx.work / "ops.csv"), "--peaks", str(ctx.work / "peaks.json")
    )
    return [Command("ops", argv + (["--dry-run"] if ctx.dry_run else []), 120)]


def e2e(ctx: Context) -> list[Command]:
    """``kdfast bench --e2e``: each method's distillation step against the eager fp32 peer."""
    argv = ctx.task("e2e", "--device", ctx.device, "--out", str(ctx.work / "e2e.csv"))
    return [Command("e2e", argv + (["--dry-run"] if ctx.dry_run else []), 120)]


def real_data(ctx: Context) -> list[Command]:
    """A CIFAR-10 teacher, then a KD student from it, on the carried subset."""
    if not ctx.data.is_file():
        missing = [ctx.python, "-c", f"raise SystemExit('{ctx.data} missing: run make gpu-data here and carry .gpu-data')"]
        return [Command("real-data", missing, 10)]
    argv = ctx.task("real-data", "--subset", str(ctx.data), "--out", str(ctx.work / "real_data"))
    return [Command("real-data", argv + (["--dry-run"] if ctx.dry_run else []), 150)]


def loader(ctx: Context) -> list[Command]:
    """ImageNet input alone (benchmarks/bench_loader.py: nvJPEG decode on the GPU vs PIL in workers),
    then the ResNet34 -> ResNet18 KD training step it has to feed (kdfast bench --e2e --pair imagenet)."""
    out = ["--out", str(ctx.work / "loader.csv")]
    bench = [ctx.python, "-m", "benchmarks.bench_loader", "--device", ctx.device, *out]
    step = [ctx.python, "-m", "kdfast.cli", "bench", "--e2e", "--pair", "imagenet", "--methods", "kd", "--device", ctx.device]
    if ctx.dry_run:
        return [
            Command("loader", [*bench, "--workers", "0", "--images", "16", "--batch", "8", "--epochs", "1"], 60),
            Command("imagenet-step", [*step, "--quick", "--batch", "1", "--iters", "1", *out], 60),
        ]
    workers = sorted({0, 4, min(16, ctx.cpus)})
    return [
        Command("loader", [*bench, "--images", "2000", "--batch", "256", "--epochs", "2", "--workers", *map(str, workers)], 90),
        Command("imagenet-step", [*step, "--batch", "256", "--iters", "10", *out], 60),
    ]


STAGES = (
    Stage("build", "pip install -e . for sm_90 on all cores; which kernels kdfast._C holds", build),
    Stage("correctness", "pytest -m gpu (JUnit XML, durations)", correctness),
    Stage("sanitizers", "compute-sanitizer memcheck and racecheck, every CUDA op fwd+bwd", sanitizers),
    Stage("ops", "copy and matmul peaks; every op and backend, eager and compiled, CIFAR/ImageNet shapes", ops),
    Stage(
        "e2e",
        "kdfast bench --e2e: KD, AT, DKD, LCC, LAKD, AFD vs the eager fp32 peer; 1, 2, 4 KD students "
        "on one teacher forward vs separate runs",
        e2e,
    ),
    Stage("real-data", "CIFAR-10 subset: resnet20 teacher, resnet8 KD student, top-1 and wall time", real_data),
    Stage(
        "loader",
        "ImageNet input alone: nvJPEG decode on the GPU vs PIL in workers, images/s; the ResNet34 -> ResNet18 KD step",
        loader,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
# Runs first, whatever --stages says: the device and versions that the report names.
ENVIRONMENT = Stage(
    "environment",
    "device, torch, triton, CUDA versions",
    lambda ctx: [Command("environment", ctx.task("environment", "--out", str(ctx.work / "environment.json")), 60)],
)


# --- Running.


def run_command(command: Command, ctx: Context, deadline: float) -> Result:
    """Run `command` with its log in the work folder, killed at min(its box, the deadline)."""
    timeout = min(command.timeout_s, deadline - time.monotonic())
    if timeout < MIN_COMMAND_S:
        return Result(command.name, "skipped", note="no time left in the budget")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **command.env}
    argv = [arg.replace(SECONDS_LEFT, str(max(1, int(timeout - STOP_MARGIN_S)))) for arg in command.argv]
    start = time.monotonic()
    with (ctx.work / f"{command.name}.log").open("w") as log:
        log.write(f"$ {' '.join(argv)}\n# time box {timeout:.0f} s, env {command.env}\n")
        log.flush()
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return Result(command.name, "timeout", time.monotonic() - start, None, f"killed after {timeout:.0f} s")
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): the command runs in its own session, end it too
            os.killpg(process.pid, signal.SIGKILL)
            raise
    status = "pass" if code == 0 else "fail"
    return Result(command.name, status, time.monotonic() - start, code, "" if code == 0 else f"exit status {code}")


def stage_status(results: list[Result]) -> str:
    """The worst command status: timeout, then fail, then skipped; else pass."""
    for status in ("timeout", "fail", "skipped"):
        if any(r.status == status for r in results):
            return status
    return "pass"


def summarize(ctx: Context, stages: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Everything the report shows, from the files the stages wrote so far."""
    work = ctx.work
    junit = work / "tests.xml"
    peaks = gpu_report.read_json(work / "peaks.json")
    sanitizer_logs = {tool: work / f"{tool}.log" for tool in ("memcheck", "racecheck")}
    return {
        "dry_run": ctx.dry_run,
        "environment": gpu_report.read_json(work / "environment.json"),
        "wall_s": wall_s,
        "stages": stages,
        "tests": gpu_report.test_counts(junit),
        "failed_tests": gpu_report.failed_tests(junit),
        "slowest_tests": gpu_report.slowest_tests(junit),
        "sanitizers": {tool: gpu_report.sanitizer_findings(log) for tool, log in sanitizer_logs.items() if log.is_file()},
        "peaks": peaks,
        "ops": gpu_report.op_summary(gpu_report.read_rows(work / "ops.csv"), peaks),
        "e2e": gpu_report.e2e_summary(gpu_report.read_rows(work / "e2e.csv")),
        "e2e_students": gpu_report.students_summary(gpu_report.read_rows(work / "e2e.csv")),
        "e2e_missing": json.loads((work / "e2e.missing.json").read_text()) if (work / "e2e.missing.json").is_file() else [],
        "real_data": gpu_report.read_json(work / "real_data" / "real_data.json"),
    }  # fmt: skip


def _json_safe(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(ctx: Context, report: Path, summary: dict[str, Any]) -> str:
    """summary.json, summary.txt, the result files and logs.tar.gz into `report`; returns the table."""
    text = gpu_report.table(summary)
    (ctx.work / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    (ctx.work / "summary.txt").write_text(text + "\n")
    report.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (ctx.work / name).is_file():
            shutil.copyfile(ctx.work / name, report / name)
    with tarfile.open(report / "logs.tar.gz.partial", "w:gz") as tar:
        for path in sorted(ctx.work.rglob("*")):
            if path.is_file() and path.name not in REPORT_FILES and path.suffix != ".pt":  # no checkpoints
                tar.add(path, arcname=str(path.relative_to(ctx.work)))
    os.replace(report / "logs.tar.gz.partial", report / "logs.tar.gz")
    return text


def report_dir(out: Path | None) -> Path:
    if out is not None:
        return out
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return RESULTS_DIR / f"gpu-{datetime.now(timezone.utc):%Y-%m-%d-%H%M}"


def run(ctx: Context, stage_names: Sequence[str], report: Path, budget_s: float) -> dict[str, Any]:
    """Run the named stages in order within `budget_s`; the report is rewritten after each."""
    start = time.monotonic()
    deadline = start + budget_s
    stages: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for stage in (ENVIRONMENT, *(s for s in STAGES if s.name in stage_names)):
        print(f"== {stage.name}: {stage.what}", flush=True)
        stage_start = time.monotonic()
        results: list[Result] = []
        for command in stage.commands(ctx):
            primary = next((r for r in results if r.name == command.fallback_for), None)
            if primary is not None and primary.status == "pass":
                results.append(Result(command.name, "unneeded"))
                continue
            result = run_command(command, ctx, deadline)
            results.append(result)
            print(f"   {command.name}: {result.status} in {result.wall_s:.1f} s {result.note}", flush=True)
        notes = "; ".join(
            f"{r.name}: {r.status}{' (' + r.note + ')' if r.note else ''}"
            for r in results
            if r.status not in ("pass", "unneeded")
        )
        stages.append(
            {
                "name": stage.name,
                "status": stage_status(results),
                "wall_s": time.monotonic() - stage_start,
                "note": notes,
                "commands": [asdict(r) for r in results],
            }
        )
        summary = summarize(ctx, stages, time.monotonic() - start)
        write_report(ctx, report, summary)
    summary = summarize(ctx, stages, time.monotonic() - start)
    print("\n" + write_report(ctx, report, summary), flush=True)
    print(f"\nreport: {report}", flush=True)
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=list(STAGE_NAMES), help="default: all, in order")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU, tiny (the CI test)")
    parser.add_argument("--out", type=Path, help="report folder (default: $OUT, else benchmarks/results/gpu-<date>/)")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help=f"deadline of the whole run (default {DEFAULT_BUDGET_S})"
    )
    parser.add_argument("--data", type=Path, default=DATA_FILE, help=f"CIFAR-10 subset (default {DATA_FILE.relative_to(ROOT)})")
    parser.add_argument("--list", action="store_true", help="list the stages and their commands' time boxes, run nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when every stage passed, else 1."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the running command is ended with this process.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
            ctx = Context(dry_run=args.dry_run, work=Path(work), data=args.data)
            if args.list:
                for stage in STAGES:
                    boxes = ", ".join(f"{c.name} {c.timeout_s:.0f} s" for c in stage.commands(ctx))
                    print(f"{stage.name:<12} {stage.what} [{boxes}]")
                return 0
            summary = run(ctx, args.stages, report_dir(args.out), args.budget_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if all(stage["status"] == "pass" for stage in summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
