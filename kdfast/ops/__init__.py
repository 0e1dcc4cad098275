"""torch.library registration and backend dispatch, one module per op."""

from __future__ import annotations

import torch
from torch import Tensor


def namespace(backend: str):
    """torch.ops namespace of a fused backend: the C++ kernels ("cpu", "cuda"), the Triton ones, or
    the CUDA C++ kernels run on CPU tensors through the emulation ("cuda_emu")."""
    if backend == "triton":
        return torch.ops.kdfast_triton
    return torch.ops.kdfast_emu if backend == "cuda_emu" else torch.ops.kdfast


def unit_stride(z: Tensor) -> Tensor:
    """`z`, or a contiguous copy if its last dim is not unit-stride."""
    return z if z.stride(-1) == 1 else z.contiguous()


def as_rows(f: Tensor) -> Tensor:
    """(B, ...) -> (B, D), flattened from dim 1 in memory order: a view for contiguous and
    channels_last maps (for losses built on Gram matrices the order of D does not matter)."""
    if f.dim() > 2:
        strides = f.stride()
        f = f.permute(0, *sorted(range(1, f.dim()), key=lambda d: -strides[d]))
    return f.flatten(1)


def saveable_teacher(f_t: Tensor, f_s: Tensor) -> Tensor:
    """`f_t`, or a copy of it if it is an inference tensor (a teacher run under
    ``torch.inference_mode``) that the backward of a student requiring grad must re-read:
    autograd cannot save inference tensors."""
    if not torch.compiler.is_compiling() and f_t.is_inference() and f_s.requires_grad:
        return f_t.clone()
    return f_t
