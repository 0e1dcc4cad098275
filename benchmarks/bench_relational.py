"""Benchmarks of the relational losses: ``sp_loss`` and ``rkd_loss``.

Both run with their defaults (SP: nothing to choose; RKD: distance weight 25, angle weight 50,
reduction "sum") on a student/teacher pair (standard normal, one dtype); a shape is the pair,
labelled ``student+teacher``.

* ``sp_loss`` on the last stage of the CIFAR students and teachers (64x8x8: resnet56/resnet20;
  128x8x8: wrn_40_2/wrn_16_2; 256x8x8: resnet32x4/resnet8x4) and of ImageNet ResNets (512x7x7).
  The work is O(B^2 D) multiply-adds (D = C*H*W): the fused C++ kernels recompute Gram tiles
  instead of storing the B x B matrices; the Triton kernels store them, split over D.
* ``rkd_loss`` on pooled embeddings (B, D): CIFAR 64 (resnet20) and 256 (resnet8x4), ImageNet
  512 (resnet34 -> resnet18) and 2048 -> 512 (resnet50 -> resnet18), B up to 1024. The work is
  O(B^2 D + B^3); the eager reference builds B x B x D difference tensors (about
  RKD_REFERENCE_BYTES per B^2 (Ds + Dt) at its peak, measured on the CPU), so its cases above
  common.REFERENCE_MEMORY_LIMIT are recorded without being run.

The byte models count the least traffic (inputs read once, gradient written once), not the ops'
cost, which is compute: GB/s is small by nature and compares backends only. The GPU sweep takes
every shape; the CPU sweep a few that a 2-core machine finishes in minutes; "tiny" ones are for
the Triton interpreter.
"""

from __future__ import annotations

import math

import torch

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional
from kdfast.reference import rkd as rkd_reference
from kdfast.reference import sp as sp_reference

# Peak of the eager RKD reference per B^2 (Ds + Dt) (float32 differences, their normalisation
# and the cosines of both networks, the student's retained for the backward; LiveTensorBytes at
# B = 64, D = 128: fwd 10.1, bwd 10.0, fwd+bwd 12.1 bytes), rounded up.
RKD_REFERENCE_BYTES = 13


def _maps(batches: tuple[int, ...], chws: tuple[tuple[int, int, int], ...]) -> list[Shape]:
    """SP pairs: student and teacher maps of one shape."""
    return [((b, *chw), (b, *chw)) for chw in chws for b in batches]


def _embeddings(batches: tuple[int, ...], dims: tuple[tuple[int, int], ...]) -> list[Shape]:
    """RKD pairs: (B, Ds) student and (B, Dt) teacher embeddings."""
    return [((b, ds), (b, dt)) for ds, dt in dims for b in batches]


CIFAR_LAST = ((64, 8, 8), (128, 8, 8), (256, 8, 8))
SP_SHAPES = {
    "cuda": _maps((64, 256, 512), CIFAR_LAST) + _maps((256,), ((512, 7, 7),)),
    "cuda-quick": _maps((64, 512), ((256, 8, 8),)),
    "cpu": _maps((64,), CIFAR_LAST[::2]) + _maps((256,), ((256, 8, 8),)),
    "cpu-quick": _maps((64,), ((256, 8, 8),)),
    "tiny": _maps((4,), ((16, 2, 2),)),
}
RKD_SHAPES = {
    "cuda": _embeddings((64, 256, 1024), ((64, 64), (256, 256))) + _embeddings((256, 1024), ((512, 512), (512, 2048))),
    "cuda-quick": _embeddings((64,), ((256, 256),)) + _embeddings((1024,), ((512, 512),)),
    "cpu": _embeddings((64,), ((64, 64), (256, 256))) + _embeddings((256,), ((256, 256),)),
    "cpu-quick": _embeddings((64,), ((256, 256),)),
    "tiny": _embeddings((4,), ((16, 16),)),
}


def pair_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    student, teacher = shape
    x_s = torch.randn(student, dtype=dtype, device=device, requires_grad=True)
    return Inputs((x_s, torch.randn(teacher, dtype=dtype, device=device)), (x_s,))


def pair_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of both ops: fwd reads the student and the teacher once; bwd reads them (the
    fused backward of SP recomputes the teacher's Gram tiles; RKD's reads the student and its
    saved B x B matrices, not counted) and writes the student's gradient. fwd+bwd: both."""
    student, teacher = (element_size(dtype) * math.prod(stage) for stage in shape)
    return by_pass(student + teacher, 2 * student + teacher, pass_)


def rkd_reference_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Estimated peak of the eager RKD reference: RKD_REFERENCE_BYTES per B^2 (Ds + Dt)."""
    (batch, ds), (_, dt) = shape
    return RKD_REFERENCE_BYTES * batch * batch * (ds + dt)


SPECS = (
    OpSpec(
        name="sp_loss",
        family="sp",
        reference=sp_reference.sp_loss,
        fused=functional.sp_loss,
        make_inputs=pair_inputs,
        bytes_moved=pair_bytes,
        shapes=SP_SHAPES,
    ),
    OpSpec(
        name="rkd_loss",
        family="rkd",
        reference=rkd_reference.rkd_loss,
        fused=functional.rkd_loss,
        make_inputs=pair_inputs,
        bytes_moved=pair_bytes,
        shapes=RKD_SHAPES,
        reference_bytes=rkd_reference_bytes,
    ),
)
