"""Benchmarks of local correlation consistency: ``local_correlation_loss``.

It runs with its defaults (grid k = 4, all three terms, unit weights, no mask, reduction "sum")
on one stage whose student and teacher maps have equal shapes (B, C, 8, 8): N = 16 B region
descriptors of D = 4 C elements. The work is O(N^2 D) (every pair of descriptors), so the cases
sweep B (N = 256 .. 65536) on a small CIFAR stage (C = 64, resnet56/resnet20's last) and a
resnet32x4/resnet8x4-like one (C = 256).

The eager reference materialises N x N matrices (about REFERENCE_BYTES_PER_ENTRY bytes per
entry at its peak, measured on the CPU): its cases above common.REFERENCE_MEMORY_LIMIT (N =
65536 needs about 100 GiB) are not run but recorded, with that estimate and the reason; so are
those of torch.compile of the reference, which builds the same matrices.
"""

from __future__ import annotations

import math

import torch

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional
from kdfast.reference import lcc as reference

GRID = 4
HW = 8
CHANNELS = (64, 256)
# Peak of the eager reference per N x N entry (float32 correlations, their difference, its
# square, boolean term masks and their nonzero indices; LiveTensorBytes at N = 512: fwd 15.6,
# bwd 16.0, fwd+bwd 21.0 bytes), rounded up for the graph that "bwd" retains.
REFERENCE_BYTES_PER_ENTRY = 24


def _shapes(batches: tuple[int, ...], channels: tuple[int, ...]) -> list[Shape]:
    return [((b, c, HW, HW),) for c in channels for b in batches]


SHAPES = {
    "cuda": _shapes((16, 64, 256, 1024, 4096), CHANNELS),
    "cuda-quick": _shapes((256,), (64,)) + _shapes((1024,), (256,)),
    "cpu": _shapes((16, 64, 256), (64,)) + _shapes((16,), (256,)),
    "cpu-quick": _shapes((64,), (64,)),
    "tiny": _shapes((4,), (16,)),
}


def lcc_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    (stage,) = shape
    f_s = torch.randn(stage, dtype=dtype, device=device, requires_grad=True)
    f_t = torch.randn(stage, dtype=dtype, device=device)
    return Inputs((f_s, f_t), (f_s,))


def _rows(shape: Shape) -> int:
    (stage,) = shape
    return stage[0] * GRID * GRID


def lcc_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of ``local_correlation_loss``: the least traffic, not the op's cost, which is
    compute (O(N^2 D) multiply-adds: GB/s is small by nature and compares backends only).

    fwd: read f_s and f_t once. bwd: read f_s and f_t (the tiles are recomputed), write the
    gradient of f_s. fwd+bwd: both.
    """
    (stage,) = shape
    size = element_size(dtype) * math.prod(stage)
    return by_pass(2 * size, 3 * size, pass_)


def lcc_reference_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Estimated peak of the eager reference: REFERENCE_BYTES_PER_ENTRY per N x N entry."""
    return REFERENCE_BYTES_PER_ENTRY * _rows(shape) ** 2


SPECS = (
    OpSpec(
        name="local_correlation_loss",
        family="lcc",
        reference=reference.local_correlation_loss,
        fused=functional.local_correlation_loss,
        make_inputs=lcc_inputs,
        bytes_moved=lcc_bytes,
        shapes=SHAPES,
        reference_bytes=lcc_reference_bytes,
    ),
)
