"""Benchmarks of the block-attention losses: ``ndam_loss`` (LAKD, weighting "none" and "teacher")
and ``aft_loss`` (AFT-KD), all modules of a network in one call (as in training).

Defaults otherwise (grid 4, unit weights, reduction "sum"). A module is a student map f_s and a
teacher map f_t (standard normal, one dtype); the connector output h_s is a leaf of f_t's shape
(the connector itself is not part of the op). A shape lists, per module, the student's then the
teacher's (B, C, H, W), joined by "+"; h_s has the teacher's shape.

Shapes: the stage maps of the CIFAR pairs resnet32x4 -> resnet8x4 (64x32x32, 128x16x16,
256x8x8 for both), wrn_40_2 -> wrn_16_2 (32x32x32, 64x16x16, 128x8x8) and resnet56 -> resnet20
(16x32x32, 32x16x16, 64x8x8), and ImageNet ResNet34 -> ResNet18 (64x56x56, 128x28x28, 256x14x14,
512x7x7). The GPU sweep takes CIFAR at B = 64 and 256 and ImageNet at B = 256; the CPU sweep
B = 64 CIFAR resnet32x4 and ImageNet at B = 16; "tiny" ones are for the Triton interpreter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional
from kdfast.reference import block_attention as reference

CIFAR_PAIRS = {
    "resnet32x4_resnet8x4": ((64, 32, 32), (128, 16, 16), (256, 8, 8)),
    "wrn_40_2_wrn_16_2": ((32, 32, 32), (64, 16, 16), (128, 8, 8)),
    "resnet56_resnet20": ((16, 32, 32), (32, 16, 16), (64, 8, 8)),
}
IMAGENET_STAGES = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
TINY_NET = ((8, 8, 8), (16, 4, 4))


def _networks(batches: tuple[int, ...], nets: tuple[tuple[tuple[int, int, int], ...], ...]) -> list[Shape]:
    """Per network and batch size: (student, teacher) stage pairs flattened (here of equal shapes)."""
    return [tuple((b, *chw) for chw in net for _ in range(2)) for b in batches for net in nets]


SHAPES = {
    "cuda": _networks((64, 256), tuple(CIFAR_PAIRS.values())) + _networks((256,), (IMAGENET_STAGES,)),
    "cuda-quick": _networks((64,), (CIFAR_PAIRS["resnet32x4_resnet8x4"],)) + _networks((256,), (IMAGENET_STAGES,)),
    "cpu": _networks((64,), (CIFAR_PAIRS["resnet32x4_resnet8x4"],)) + _networks((16,), (IMAGENET_STAGES,)),
    "cpu-quick": _networks((64,), (CIFAR_PAIRS["resnet56_resnet20"],)),
    "tiny": _networks((2,), (TINY_NET,)),
}


def module_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    students, teachers = shape[0::2], shape[1::2]
    f_s = [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in students]
    h_s = [torch.randn(t, dtype=dtype, device=device, requires_grad=True) for t in teachers]
    f_t = [torch.randn(t, dtype=dtype, device=device) for t in teachers]
    return Inputs((f_s, h_s, f_t), (*f_s, *h_s))


def module_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model, summed over modules: fwd reads f_s, h_s and f_t once (the teacher-weighted
    variant reads f_t twice, not counted); bwd reads them and writes the gradients of f_s and h_s.
    Nothing else of their size is written (maps of B*g*g elements, a few scalars)."""
    size = element_size(dtype)
    student = sum(math.prod(s) for s in shape[0::2]) * size
    teacher = sum(math.prod(t) for t in shape[1::2]) * size
    return by_pass(student + 2 * teacher, 2 * student + 3 * teacher, pass_)


def reference_ndam(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """Eager ``ndam_loss`` (grid 4, weighting "none", unit weights, reduction "sum")."""
    return reference.block_attention_terms(f_s, h_s, f_t, 4, 1.0, 0, False).sum()


def reference_ndam_teacher(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """Eager ``ndam_loss`` with weighting "teacher"."""
    return reference.block_attention_terms(f_s, h_s, f_t, 4, 1.0, 0, True).sum()


def reference_aft(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """Eager ``aft_loss`` (grid 4, unit weights, reduction "sum")."""
    return reference.block_attention_terms(f_s, h_s, f_t, 4, 2.0, 4, False).sum()


def ndam_teacher_loss(f_s: list[Tensor], h_s: list[Tensor], f_t: list[Tensor], backend: str) -> Tensor:
    return functional.ndam_loss(f_s, h_s, f_t, weighting="teacher", backend=backend)


def _spec(name: str, reference_fn, fused_fn) -> OpSpec:
    return OpSpec(
        name=name,
        family="block_attention",
        reference=reference_fn,
        fused=fused_fn,
        make_inputs=module_inputs,
        bytes_moved=module_bytes,
        shapes=SHAPES,
    )


SPECS = (
    _spec("ndam_loss", reference_ndam, functional.ndam_loss),
    _spec("ndam_loss_teacher", reference_ndam_teacher, ndam_teacher_loss),
    _spec("aft_loss", reference_aft, functional.aft_loss),
)
