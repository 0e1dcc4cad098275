"""Benchmarks of ReviewKD's hierarchical context loss: ``hcl_loss``, every level of a network in one
call (as in training), levels 4, 2, 1, reduction "sum".

A level is a student map (the ABF output, a leaf that gets the gradient) and a teacher map of the
same (B, C, H, W), standard normal, one dtype; a shape lists the levels' maps joined by "+". The
eager reference is the peers' formula (mdistiller's / the authors' ``hcl``: per level an MSE and
three adaptive poolings of each map with their MSEs, about a dozen kernels per level and as many
temporaries each way), so the "eager" rows are the peers' version.

Shapes: ReviewKD's levels for resnet32x4 -> resnet8x4 (64x32x32, 128x16x16, 256x8x8 and the pooled
256x1x1) and for ImageNet ResNet34 -> ResNet18 (64x56x56, 128x28x28, 256x14x14, 512x7x7, 512x1x1).
The GPU sweep takes CIFAR at B = 64 and 256 and ImageNet at B = 256; the CPU sweep CIFAR at B = 64
and ImageNet at B = 16; "tiny" ones are for the Triton interpreter.
"""

from __future__ import annotations

import math

import torch

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional
from kdfast.reference import hcl as reference

CIFAR_RESNET8X4 = ((64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1))
IMAGENET_RESNET18 = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512, 1, 1))
TINY = ((8, 8, 8), (16, 4, 4), (16, 1, 1))


def _levels(batch: int, net: tuple[tuple[int, int, int], ...]) -> Shape:
    return tuple((batch, *chw) for chw in net)


SHAPES = {
    "cuda": [_levels(64, CIFAR_RESNET8X4), _levels(256, CIFAR_RESNET8X4), _levels(256, IMAGENET_RESNET18)],
    "cuda-quick": [_levels(64, CIFAR_RESNET8X4), _levels(256, IMAGENET_RESNET18)],
    "cpu": [_levels(64, CIFAR_RESNET8X4), _levels(16, IMAGENET_RESNET18)],
    "cpu-quick": [_levels(64, CIFAR_RESNET8X4)],
    "tiny": [_levels(2, TINY)],
}


def level_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    f_s = [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shape]
    f_t = [torch.randn(s, dtype=dtype, device=device) for s in shape]
    return Inputs((f_s, f_t), tuple(f_s))


def level_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model: fwd reads f_s and f_t once; bwd reads them and writes the gradient of f_s (the
    cells, B C 21 values per level, are not counted)."""
    maps = sum(math.prod(s) for s in shape) * element_size(dtype)
    return by_pass(2 * maps, 3 * maps, pass_)


def reference_hcl(f_s, f_t):
    """The peers' HCL (eager), levels 4, 2, 1, summed over the levels."""
    return reference.hcl_loss(f_s, f_t)


SPECS = (
    OpSpec(
        name="hcl_loss",
        family="hcl",
        reference=reference_hcl,
        fused=functional.hcl_loss,
        make_inputs=level_inputs,
        bytes_moved=level_bytes,
        shapes=SHAPES,
    ),
)
