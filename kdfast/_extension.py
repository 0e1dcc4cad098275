"""Loading of the compiled extensions: kdfast._C (C++ CPU and CUDA C++ kernels, library kdfast)
and, when built, kdfast._C_emu (the CUDA C++ kernels compiled as host C++ and run on CPU tensors
through csrc/emu/cuda_emu.h, library kdfast_emu: the "cuda_emu" test backend).

If kdfast._C cannot be loaded, kdfast still imports with one warning: the "torch" and "triton"
backends keep working and the "cpu"/"cuda" backends raise an error that says why. kdfast._C_emu is
optional (not built with KDFAST_SKIP_CUDA_EMU=1): without it "cuda_emu" is unavailable, silently.
"""

from __future__ import annotations

import warnings

import torch

try:
    from kdfast import _C  # noqa: F401  (registers the kdfast:: ops)

    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    LOAD_ERROR = str(error)
    warnings.warn(
        f"kdfast: the compiled extension kdfast._C could not be loaded ({error}); the 'cpu' and "
        "'cuda' backends are unavailable, 'torch' and 'triton' still work. Build it with "
        "`pip install --no-build-isolation -e .` in the kdfast checkout.",
        RuntimeWarning,
        stacklevel=2,
    )

try:
    from kdfast import _C_emu  # noqa: F401  (registers the kdfast_emu:: ops)

    EMU_LOAD_ERROR: str | None = None
except ImportError as error:
    EMU_LOAD_ERROR = str(error)


def has_kernel(op: str, dispatch_key: str, library: str = "kdfast") -> bool:
    """Whether the extension of `library` ("kdfast": kdfast._C, "kdfast_emu": kdfast._C_emu) loaded
    and registered a `dispatch_key` ("CPU" or "CUDA") kernel for `library`::`op` (a stale build may
    lack newer ops). The op's schema must be defined (kdfast.ops.spec)."""
    error = LOAD_ERROR if library == "kdfast" else EMU_LOAD_ERROR
    return error is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{library}::{op}", dispatch_key)
