"""Benchmarks of the attention-transfer (AT) ops: ``attention_map`` and ``at_loss``.

Both run with their defaults (p=2; ``attention_map``: mode "mean", normalised; ``at_loss``:
mode "code", reduction "sum"). Student and teacher feature maps have equal shapes. ``at_loss``
is measured on single stages and on the stages of one network in one call (as in training).

Shapes: CIFAR stages of resnet56 (16x32x32, 32x16x16, 64x8x8) and resnet32x4 (64x32x32,
128x16x16, 256x8x8), ImageNet ResNet stages (64x56x56, 128x28x28, 256x14x14, 512x7x7).
The GPU sweep takes all of them (CIFAR at B = 64, 256, 512; ImageNet at B = 256); the CPU sweep
a subset that a 2-core machine finishes within 15 minutes (benchmarks/README.md); "tiny" ones
are for the Triton interpreter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from benchmarks.common import Inputs, OpSpec, Shape, Stage, by_pass, element_size
from kdfast import functional
from kdfast.reference import at as reference

CIFAR_NETS = {
    "resnet56": ((16, 32, 32), (32, 16, 16), (64, 8, 8)),
    "resnet32x4": ((64, 32, 32), (128, 16, 16), (256, 8, 8)),
}
CIFAR_STAGES = tuple(chw for net in CIFAR_NETS.values() for chw in net)
IMAGENET_STAGES = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
# The CPU sweep's single CIFAR stages: the first and last of each network (each shape costs a
# torch.compile of its own; the middle stages are in the multi-stage cases).
CIFAR_CPU_STAGES = tuple(chw for net in CIFAR_NETS.values() for chw in (net[0], net[-1]))
TINY_NET = ((16, 8, 8), (32, 4, 4), (64, 2, 2))


def _single(batches: tuple[int, ...], chws: tuple[tuple[int, int, int], ...]) -> list[Shape]:
    """One-stage shapes: every batch size with every (C, H, W)."""
    return [((b, *chw),) for b in batches for chw in chws]


def _networks(batches: tuple[int, ...], nets: tuple[tuple[tuple[int, int, int], ...], ...]) -> list[Shape]:
    """Multi-stage shapes: all stages of a network in one call, for every batch size."""
    return [tuple((b, *chw) for chw in net) for b in batches for net in nets]


SINGLE_STAGE = {
    "cuda": _single((64, 256, 512), CIFAR_STAGES) + _single((256,), IMAGENET_STAGES),
    "cuda-quick": _single((256,), ((64, 32, 32),)) + _single((256,), ((256, 14, 14),)),
    "cpu": _single((64,), CIFAR_CPU_STAGES) + _single((256,), ((64, 32, 32),)) + _single((32,), IMAGENET_STAGES[::3]),
    "cpu-quick": _single((64,), ((64, 8, 8),)),
    "tiny": _single((4,), ((64, 8, 8),)),
}
NETWORKS = {
    "cuda": _networks((64, 256, 512), tuple(CIFAR_NETS.values())) + _networks((256,), (IMAGENET_STAGES,)),
    "cuda-quick": _networks((256,), (CIFAR_NETS["resnet32x4"],)),
    "cpu": _networks((64,), tuple(CIFAR_NETS.values())),
    "cpu-quick": _networks((64,), (CIFAR_NETS["resnet56"],)),
    "tiny": _networks((4,), (TINY_NET,)),
}


def _features(shape: Shape, dtype: torch.dtype, device: torch.device, requires_grad: bool) -> list[Tensor]:
    return [torch.randn(stage, dtype=dtype, device=device, requires_grad=requires_grad) for stage in shape]


def _numel(stage: Stage) -> int:
    return math.prod(stage)


def _map_numel(stage: Stage) -> int:
    batch, _, height, width = stage
    return batch * height * width


def attention_map_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    (feat,) = _features(shape, dtype, device, requires_grad=True)
    grad_map = torch.randn(_map_numel(shape[0]), dtype=dtype, device=device).view(feat.shape[0], -1)
    return Inputs((feat,), (feat,), grad_map)


def attention_map_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of ``attention_map`` on one (B, C, H, W) map f; the map a has B*H*W elements.

    fwd: read f once, write a (f's dtype). bwd: read f and the upstream gradient of a (f's
    dtype), write the gradient of f. fwd+bwd: both (f is read twice: the backward needs the
    upstream gradient, which only exists after the forward).
    """
    (stage,) = shape
    size = element_size(dtype)
    fwd = (_numel(stage) + _map_numel(stage)) * size
    bwd = (2 * _numel(stage) + _map_numel(stage)) * size
    return by_pass(fwd, bwd, pass_)


def at_loss_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    students = _features(shape, dtype, device, requires_grad=True)
    teachers = _features(shape, dtype, device, requires_grad=False)
    return Inputs((students, teachers), tuple(students))


def reference_at_loss(f_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """The eager reference of ``at_loss`` (mode "code", reduction "sum")."""
    return reference.at_stage_losses(f_s, f_t).sum()


def at_loss_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of ``at_loss``, summed over stages; student and teacher maps have the same shape.

    fwd: read every student and teacher feature map once; nothing of size B*C*H*W is written
    (a few scalars, and maps of B*H*W elements, which are not counted). bwd: read the student
    maps and the float32 gradient of their attention maps (B*H*W each), write the student
    gradients. fwd+bwd: both.
    """
    size = element_size(dtype)
    fwd = sum(2 * _numel(stage) * size for stage in shape)
    bwd = sum(2 * _numel(stage) * size + 4 * _map_numel(stage) for stage in shape)
    return by_pass(fwd, bwd, pass_)


SPECS = (
    OpSpec(
        name="attention_map",
        family="at",
        reference=reference.attention_map,
        fused=functional.attention_map,
        make_inputs=attention_map_inputs,
        bytes_moved=attention_map_bytes,
        shapes=SINGLE_STAGE,
    ),
    OpSpec(
        name="at_loss",
        family="at",
        reference=reference_at_loss,
        fused=functional.at_loss,
        make_inputs=at_loss_inputs,
        bytes_moved=at_loss_bytes,
        shapes={name: SINGLE_STAGE[name] + NETWORKS[name] for name in SINGLE_STAGE},
    ),
)
