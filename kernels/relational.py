"""Helpers shared by the relational kernels (sp.py, rkd.py): losses over the B x B pairs of the
rows of a student's (B, Ds) and a teacher's (B, Dt) matrix, read through their strides."""

import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common

NUM_WARPS = 4


@triton.jit
def span(start, n, BLOCK: tl.constexpr):
    """Indices ``start + [0, BLOCK)`` (int64) and which of them are < n."""
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    return idx, idx < n


@triton.jit
def load_rows(x, stride_b, stride_d, rows, ok, d0, n_cols, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """[len(rows), BLOCK_D] ``x[rows, d0 + [0, BLOCK_D)]`` in ACC, 0 outside the rows ``ok`` and D."""
    offs = d0 + tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs < n_cols)[None, :]
    return tl.load(x + rows[:, None] * stride_b + offs[None, :] * stride_d, mask=mask, other=0.0).to(ACC)


def check_pair(name: str, x_s: Tensor, x_t: Tensor) -> None:
    """A (B, Ds) student and (B, Dt) teacher: 2-D, floating, one B >= 1 and device, D >= 1."""
    for label, x in (("x_s", x_s), ("x_t", x_t)):
        if x.dim() != 2 or x.size(0) < 1 or x.size(1) < 1 or x.dtype not in _common.TL_DTYPES:
            raise ValueError(f"{name}: {label} must be 2-D (B >= 1, D >= 1) float16/bfloat16/"
                             f"float32/float64, got {x.dtype} of shape {tuple(x.shape)}")
    if x_s.size(0) != x_t.size(0) or x_s.device != x_t.device:
        raise ValueError(f"{name}: x_s and x_t must have one batch size and device, got "
                         f"{tuple(x_s.shape)} on {x_s.device} and {tuple(x_t.shape)} on {x_t.device}")


def pair_args(x_s: Tensor, x_t: Tensor) -> tuple[int, ...]:
    """The kernels' shape and stride arguments: n, ds, dt, stride_b_s, stride_d_s, stride_b_t, stride_d_t."""
    return (x_s.size(0), x_s.size(1), x_t.size(1), *x_s.stride(), *x_t.stride())
