"""The build: kdfast._C is loaded with its CPU kernels, and its CUDA kernels whenever this torch
and toolkit can compile them (GPU or not); kdfast._C_emu with the CUDA kernels as host C++; without
the extensions kdfast still imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from kdfast import _extension, backends

CAN_BUILD_CUDA = torch.version.cuda is not None and (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_extension_loaded_with_cpu_kernels():
    assert _extension.LOAD_ERROR is None
    assert all(backends.CPP_KERNELS[(op, "CPU")] for op in backends.OPS)


def test_cuda_kernels_compiled_and_linked():
    if not CAN_BUILD_CUDA or os.environ.get("KDFAST_SKIP_CUDA") == "1":
        assert not any(backends.CPP_KERNELS[(op, "CUDA")] for op in backends.OPS)
    else:
        assert all(backends.CPP_KERNELS[(op, "CUDA")] for op in backends.OPS)


def test_cuda_emulation_built_with_every_op():
    """kdfast._C_emu (the "cuda_emu" backend) is built unless KDFAST_SKIP_CUDA_EMU=1: without it every
    cuda_emu test would be skipped."""
    if os.environ.get("KDFAST_SKIP_CUDA_EMU") == "1":
        pytest.skip("KDFAST_SKIP_CUDA_EMU=1")
    assert _extension.EMU_LOAD_ERROR is None
    assert all(backends.EMU_KERNELS[op] for op in backends.OPS)


MISSING_EXTENSION = """
import sys, warnings
sys.modules["kdfast._C"] = None  # as if the extension had not been built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, kdfast
    from kdfast import functional as F
print("warnings", sum("kdfast._C" in str(w.message) for w in caught))
f = torch.randn(2, 3, 4, 4)
print("auto", F.at_loss(f, f + 1).item() >= 0)
try:
    F.at_loss(f, f, backend="cpu")
except RuntimeError as error:
    print("cpu-error", "kdfast._C" in str(error))
"""


def test_import_without_extension_warns_once_and_falls_back():
    out = subprocess.run([sys.executable, "-c", MISSING_EXTENSION], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["warnings", "1", "auto", "True", "cpu-error", "True"]
