"""Backend choice: the ``backend=`` argument > ``$KDFAST_BACKEND`` > the "auto" table.

Backends:

* ``"torch"``: the eager PyTorch implementation (kdfast/eager), any device, float64 included.
* ``"cpu"``: C++ CPU kernels of kdfast._C (CPU tensors).
* ``"cuda"``: CUDA C++ kernels of kdfast._C (CUDA tensors).
* ``"triton"``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``,
  which must be set before kdfast is imported).
* ``"cuda_emu"`` (tests only: never chosen by "auto", not in :data:`BACKENDS`): the CUDA C++ kernels
  of csrc/cuda executed on CPU tensors through the emulation of csrc/emu/cuda_emu.h (kdfast._C_emu);
  slow, small shapes only. Available when kdfast._C_emu was built and loaded.
* ``"auto"``: "cpu" for CPU tensors; for CUDA tensors the per-op choice in :data:`AUTO_GPU` (auto_gpu.json),
  falling back to whichever fused backend is available, then "torch".

Availability is probed once at import, so that choosing a backend stays traceable by
``torch.compile``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from kdfast import _extension
from kdfast.ops.spec import all_specs

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
TEST_BACKENDS = ("cuda_emu",)

# Fused ops and their kernel names (kdfast/ops/<op>.py declares each, kdfast.ops.spec registers it);
# the C++ backends need all of an op's kernels in kdfast._C.
OPS: dict[str, tuple[str, ...]] = {name: spec.kernel_names for name, spec in all_specs().items()}

# Backend that "auto" uses for CUDA tensors, per op ("triton" or "cuda"): the "choice" of
# auto_gpu.json, which `python -m benchmarks.auto_gpu RESULTS.csv` writes from a GPU results file
# (it also records the device and the file); Triton for every op until a GPU measurement exists.
AUTO_GPU_FILE = Path(__file__).with_name("auto_gpu.json")
AUTO_GPU: dict[str, str] = json.loads(AUTO_GPU_FILE.read_text())["choice"]

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_MISSING = None if importlib.util.find_spec("triton") is not None else "the triton package is not installed"
CPP_KERNELS = {
    (op, key): all(_extension.has_kernel(name, key) for name in names) for op, names in OPS.items() for key in ("CPU", "CUDA")
}
EMU_KERNELS = {op: all(_extension.has_kernel(name, "CPU", "kdfast_emu") for name in names) for op, names in OPS.items()}


def _cpp_missing(op: str, key: str) -> str | None:
    if _extension.LOAD_ERROR is not None:
        return f"the compiled extension kdfast._C failed to load ({_extension.LOAD_ERROR})"
    if not CPP_KERNELS[(op, key)]:
        if key == "CUDA":
            return "kdfast._C was built without CUDA kernels (KDFAST_SKIP_CUDA=1, a CPU build of torch, or no nvcc at build time)"
        return f"kdfast._C has no {key} kernels for '{op}' (rebuild the extension)"
    return None


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `op` on tensors on `device`, or None if it can."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        return _cpp_missing(op, "CPU")
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        return _cpp_missing(op, "CUDA")
    if backend == "cuda_emu":
        if device.type != "cpu":
            return f"backend 'cuda_emu' runs on CPU tensors, got tensors on {device}"
        if _extension.EMU_LOAD_ERROR is not None:
            return f"the emulation extension kdfast._C_emu is not loaded ({_extension.EMU_LOAD_ERROR})"
        if not EMU_KERNELS[op]:
            return f"kdfast._C_emu has no kernels for '{op}' (rebuild the extension)"
        return None
    if backend == "triton":
        if TRITON_MISSING:
            return TRITON_MISSING
        if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET):
            return None
        return (
            "backend 'triton' runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set before importing kdfast), "
            f"got tensors on {device}"
        )
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The concrete backend that runs `op` on `device` (never "auto").

    Raises ValueError for an unknown name and RuntimeError, naming what is missing, for a
    backend that cannot run here.
    """
    if backend is None:
        backend = os.environ.get("KDFAST_BACKEND", "auto")
    if backend not in BACKENDS + TEST_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS + TEST_BACKENDS}")
    if backend == "auto":
        candidates: tuple[str, ...]
        if device.type == "cpu":
            candidates = ("cpu", "torch")
        elif device.type == "cuda":
            first = AUTO_GPU[op]
            candidates = (first, "cuda" if first == "triton" else "triton", "torch")
        else:
            candidates = ("torch",)
        return next(b for b in candidates if unavailable_reason(op, b, device) is None)
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"kdfast: backend {backend!r} is unavailable for '{op}': {reason}")
    return backend


def available(op: str, device: torch.device) -> list[str]:
    """Concrete backends that can run `op` on `device`."""
    return [b for b in BACKENDS[1:] if unavailable_reason(op, b, device) is None]
