"""Loading of the compiled extension kdfast._C (C++ CPU and CUDA C++ kernels).

If it cannot be loaded, kdfast still imports with one warning: the "torch" and "triton"
backends keep working and the "cpu"/"cuda" backends raise an error that says why.
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


def has_op(op: str) -> bool:
    """Whether kdfast._C declares kdfast::`op` (a stale build may lack newer ops)."""
    return LOAD_ERROR is None and hasattr(torch.ops.kdfast, op)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether kdfast._C registered a `dispatch_key` ("CPU" or "CUDA") kernel for kdfast::`op`."""
    return has_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"kdfast::{op}", dispatch_key)
