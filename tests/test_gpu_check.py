"""The prepared GPU session (benchmarks/gpu_check.py): its CPU dry run end to end, the CIFAR-10
subset it carries (benchmarks/gpu_data.py), and AUTO_GPU from a results file (benchmarks/auto_gpu.py)."""

from __future__ import annotations

import csv
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from benchmarks import auto_gpu, common, gpu_check, gpu_data
from kdfast import backends
from kdfast.data import load_cifar


def _fake_cifar10(root, per_batch: int = 32) -> None:
    """Official-layout CIFAR-10 files with random images (`per_batch` per file)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_subset_round_trip(tmp_path):
    """prepare() keeps the first images of each split; unpack() gives files load_cifar reads back exactly."""
    _fake_cifar10(tmp_path / "src")
    subset = gpu_data.prepare(tmp_path / "src", tmp_path / "data", train=50, test=10)
    root = gpu_data.unpack(subset, tmp_path / "unpacked")
    for train, count in ((True, 50), (False, 10)):
        expected_x, expected_y = load_cifar(tmp_path / "src", "cifar10", train=train)
        x, y = load_cifar(root, "cifar10", train=train)
        assert torch.equal(x, expected_x[:count]) and torch.equal(y, expected_y[:count])


def test_dry_run(tmp_path):
    """Every stage of the GPU session passes on the CPU and the report holds what it promises."""
    _fake_cifar10(tmp_path / "src")
    subset = gpu_data.prepare(tmp_path / "src", tmp_path / "data", train=64, test=32)
    report = tmp_path / "report"
    assert gpu_check.main(["--dry-run", "--out", str(report), "--data", str(subset)]) == 0
    assert sorted(p.name for p in report.iterdir()) == sorted(gpu_check.REPORT_FILES + ("logs.tar.gz",))
    summary = json.loads((report / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["environment", *gpu_check.STAGE_NAMES]
    assert all(s["status"] == "pass" for s in summary["stages"]), summary["stages"]
    assert summary["tests"]["passed"] > 0 and summary["tests"]["failed"] == 0
    assert {op["op"] for op in summary["ops"]} == {"masked_mse", "kd_loss"}
    assert all(op["best"] == "cpu" and op["vs_eager"] > 0 for op in summary["ops"])
    assert summary["peaks"]["copy_gbps"] > 0 and summary["peaks"]["matmul_tflops"] > 0
    assert summary["e2e"][0]["speedup"] > 0
    assert summary["real_data"]["student_kd"]["model"] == "resnet8"
    assert "ops (fwd+bwd" in (report / "summary.txt").read_text()


def _rows(times: dict[tuple[str, str, str], float]) -> list[dict[str, str]]:
    """Results rows of the sweep pass: (op, backend, shape) -> median ms."""
    return [
        {
            "op": op,
            "backend": backend,
            "pass": "fwd+bwd",
            "dtype": "bfloat16",
            "shape": shape,
            "median_ms": str(ms),
            "device": "NVIDIA H200",
        }
        for (op, backend, shape), ms in times.items()
    ]


def test_set_auto(tmp_path):
    """The faster of triton and cuda per op family (geometric mean of the time ratio over the
    cases both ran); families without a measurement keep their current choice."""
    rows = _rows({
        ("kd_loss", "triton", "512x100"): 1.0, ("kd_loss", "cuda", "512x100"): 2.0,
        ("dkd_loss", "triton", "512x100"): 1.0, ("dkd_loss", "cuda", "512x100"): 0.5,
        # family "at": cuda/triton 0.5 and 1.5, mean 0.87
        ("attention_map", "triton", "a"): 1.0, ("attention_map", "cuda", "a"): 0.5,
        ("at_loss", "triton", "a"): 1.0, ("at_loss", "cuda", "a"): 1.5,
        ("masked_mse", "triton", "a"): 1.0, ("masked_mse", "eager", "a"): 0.1,  # no cuda row: unchanged
    })  # fmt: skip
    results = tmp_path / "cuda-nvidia-h200.csv"
    with results.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    target = tmp_path / "auto_gpu.json"
    target.write_text(backends.AUTO_GPU_FILE.read_text())
    assert auto_gpu.main([str(results), "--write", str(target)]) == 0
    written = json.loads(target.read_text())
    assert written["choice"] == {**backends.AUTO_GPU, "kd": "triton", "dkd": "cuda", "at": "cuda"}
    assert written["device"] == "NVIDIA H200" and written["source"] == results.name


def test_shipped_auto_gpu_covers_every_op():
    assert set(backends.AUTO_GPU) == set(backends.OPS)
    assert set(backends.AUTO_GPU.values()) <= set(auto_gpu.CHOICES)


@pytest.mark.parametrize("stage", gpu_check.STAGES, ids=lambda s: s.name)
def test_gpu_commands_fit_the_budget(stage, tmp_path):
    """Every GPU command has a time box, and the boxes of a stage's commands that always run
    fit in the run's budget."""
    ctx = gpu_check.Context(dry_run=False, work=tmp_path, data=tmp_path / "missing")
    commands = stage.commands(ctx)
    assert commands and all(0 < c.timeout_s < gpu_check.DEFAULT_BUDGET_S for c in commands)
    assert sum(c.timeout_s for c in commands if c.fallback_for is None) < gpu_check.DEFAULT_BUDGET_S


def test_runner_time_boxes_and_fallbacks(tmp_path, monkeypatch):
    """A failing command is reported and its fallback runs; a passing one's fallback does not;
    a command is killed at the deadline; none starts after it."""
    python = [sys.executable, "-c"]
    stages = (
        gpu_check.Stage("first", "fails, then its fallback passes", lambda ctx: [
            gpu_check.Command("fails", [*python, "raise SystemExit(3)"], 30),
            gpu_check.Command("fallback", [*python, "pass"], 30, fallback_for="fails")]),
        gpu_check.Stage("second", "passes, its fallback is not run; then a hang", lambda ctx: [
            gpu_check.Command("passes", [*python, "pass"], 30),
            gpu_check.Command("unneeded", [*python, "raise SystemExit(1)"], 30, fallback_for="passes"),
            gpu_check.Command("hangs", [*python, "import time; time.sleep(60)"], 60)]),
        gpu_check.Stage("third", "past the deadline", lambda ctx: [gpu_check.Command("late", [*python, "pass"], 30)]),
    )  # fmt: skip
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    monkeypatch.setattr(gpu_check, "ENVIRONMENT", gpu_check.Stage("environment", "", lambda ctx: []))
    monkeypatch.setattr(gpu_check, "MIN_COMMAND_S", 1)
    ctx = gpu_check.Context(dry_run=True, work=tmp_path / "work", data=tmp_path / "missing")
    ctx.work.mkdir()
    summary = gpu_check.run(ctx, ["first", "second", "third"], tmp_path / "report", budget_s=8)
    status = {c["name"]: c["status"] for stage in summary["stages"] for c in stage["commands"]}
    assert status == {
        "fails": "fail",
        "fallback": "pass",
        "passes": "pass",
        "unneeded": "unneeded",
        "hangs": "timeout",
        "late": "skipped",
    }
    assert [s["status"] for s in summary["stages"]] == ["pass", "fail", "timeout", "skipped"]


def test_gpu_sweep_order():
    """Every op in eager and the fused backends in bfloat16, then compiled once per op, then
    float32: a sweep cut by its time box loses float32 first. Only the training pass."""
    from benchmarks import gpu_tasks

    cases = gpu_tasks.sweep_cases(torch.device("cuda"), gpu_tasks.GPU_SWEEP)
    names = {spec.name for spec in gpu_tasks.all_specs()}
    dtypes = [common.dtype_name(case.dtype) for case in cases]
    compiled = [i for i, case in enumerate(cases) if case.backend == "compiled"]
    assert {case.pass_ for case in cases} == {"fwd+bwd"}
    assert {case.spec.name for case in cases if case.backend == "eager"} == names
    assert sorted(cases[i].spec.name for i in compiled) == sorted(names)
    assert dtypes == sorted(dtypes) and dtypes[compiled[-1]] == "bfloat16" and dtypes[compiled[-1] + 1] == "float32"


def test_op_summary_and_roofline():
    """Best fused backend by geometric mean of time over the fastest, ratios to the references,
    roofline from GB/s or, for matrix-product ops, TFLOP/s."""
    from benchmarks import gpu_report

    rows = _rows({
        ("masked_mse", "eager", "a"): 4.0, ("masked_mse", "compiled", "a"): 2.0,
        ("masked_mse", "triton", "a"): 1.0, ("masked_mse", "cuda", "a"): 1.5,
        ("masked_mse", "eager", "b"): 8.0, ("masked_mse", "triton", "b"): 4.0, ("masked_mse", "cuda", "b"): 2.0,
        ("local_correlation_loss", "cuda", "256x64x8x8"): 1.0,
    })  # fmt: skip
    for row in rows:
        row["gbps"] = "500" if row["op"] == "masked_mse" else "0"
    peaks = {"copy_gbps": 1000.0, "matmul_tflops": 100.0}
    masked, lcc = gpu_report.op_summary(rows, peaks)
    assert (masked["best"], masked["wins"], masked["cases"]) == ("cuda", 1, 2)  # 1.5x and 1x of the fastest
    assert masked["vs_eager"] == pytest.approx((4 / 1.5 * 8 / 2) ** 0.5) and masked["vs_compiled"] == pytest.approx(2 / 1.5)
    assert masked["roofline_median"] == pytest.approx(0.5)
    # N = 16 * 256 regions of D = 64 * 8 * 8 / 16: 2 products of 2 N^2 D, x3 for fwd+bwd, in 1 ms
    assert lcc["roofline_max"] == pytest.approx(3 * 2 * 2 * 4096**2 * 256 / 1e9 / 100)


def test_sanitizer_summaries(tmp_path):
    from benchmarks import gpu_report

    log = tmp_path / "memcheck.log"
    log.write_text("========= COMPUTE-SANITIZER\nok kd_loss\n========= ERROR SUMMARY: 3 errors\n")
    assert gpu_report.sanitizer_findings(log) == 3
    log.write_text("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert gpu_report.sanitizer_findings(log) == 0
    log.write_text("killed before the end\n")
    assert gpu_report.sanitizer_findings(log) is None
