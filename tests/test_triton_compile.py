"""The GPU compile check (benchmarks/triton_compile.py) with the project's Triton, and negative
controls showing that it reports what it is meant to catch.

The check needs real JITFunctions, so it runs in a subprocess without TRITON_INTERPRET (which
conftest.py sets for this process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path = ROOT, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_every_triton_specialisation_compiles_for_sm90_and_sm80(tmp_path):
    """Every specialisation of the shape catalogue compiles for sm_90 (the main shapes for sm_80),
    without spills (outside float64), within the shared-memory and grid limits."""
    result = _run(["-m", "benchmarks.triton_compile", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-30000:] + result.stderr[-3000:]
    for arch in ("sm90", "sm80"):
        assert list(tmp_path.glob(f"triton-compile-{arch}-triton*.csv"))


CONTROLS = """
import triton
import triton.language as tl


@triton.jit
def int_to_float(out, n):  # n == 1 is specialised to a constexpr: a Python int has no .to()
    tl.store(out, n.to(tl.float32))


@triton.jit
def wide_rows(x, out, BLOCK: tl.constexpr):  # a [BLOCK, BLOCK] float32 tile on one warp spills
    offs = tl.arange(0, BLOCK)
    tile = tl.load(x + offs[:, None] * BLOCK + offs[None, :])
    tl.store(out + offs[:, None] * BLOCK + offs[None, :], tl.exp(tile) / tl.sum(tile, axis=1)[:, None])
"""

PROBE = """
import torch
from benchmarks import triton_compile as tc
from benchmarks.triton_launches import DEVICES, Launch, describe, grid_errors
import controls

x = torch.empty(1 << 20, device="meta")
launches = [
    Launch("controls:int_to_float", (1, 1, 1), [describe(x), describe(1)], {}, "control", "float32", "n=1"),
    Launch("controls:int_to_float", (1, 1, 1), [describe(x), describe(7)], {}, "control", "float32", "n=7"),
    Launch("controls:wide_rows", (1, 70000, 1), [describe(x), describe(x)],
           {"BLOCK": describe(128), "num_warps": describe(1)}, "control", "float32", "wide"),
]
specs = tc.specialise(launches, 90)
tc.compile_all(specs, 90, 1)
for line in tc.failures(specs, DEVICES["sm90"]) + [e for la in launches for e in grid_errors(la)]:
    print("FAIL", line)
wide = next(spec for spec in specs if spec.launch.kernel == "controls:wide_rows").result
spilled = wide["spill_stores"] + wide["spill_loads"]
for bound in (spilled - 1, spilled):  # RESIDUAL_SPILLS: a bound below the spill fails, the spill itself passes
    tc.RESIDUAL_SPILLS["controls:wide_rows"] = bound
    print("BOUND", bound == spilled, any(f.startswith("spills") for f in tc.failures(specs, DEVICES["sm90"])))
"""


def test_check_reports_compile_errors_spills_and_grid_limits(tmp_path):
    """Negative controls: an int argument equal to 1 used as a tensor, a spilling tile and a grid
    with y > 65535 are each reported; the same kernel with n != 1 compiles; a RESIDUAL_SPILLS
    bound passes the spill it covers and fails one byte more."""
    (tmp_path / "controls.py").write_text(textwrap.dedent(CONTROLS))
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    result = _run([str(tmp_path / "probe.py")], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("compile error" in f and "int_to_float" in f and "n=1" in f for f in fails), fails
    assert not any("n=7" in f for f in fails), fails
    assert any(f.startswith("FAIL spills") and "wide_rows" in f for f in fails), fails
    assert any("grid y = 70000" in f for f in fails), fails
    bounds = [line for line in result.stdout.splitlines() if line.startswith("BOUND")]
    assert bounds == ["BOUND False True", "BOUND True False"], result.stdout[-3000:]
