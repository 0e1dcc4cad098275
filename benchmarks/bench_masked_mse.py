"""Benchmarks of SoKD's masked feature loss: ``masked_mse``.

It runs with its default reduction ("mean") on SoKD-like hint pairs: the student's connector
output x and the refined teacher feature y (both require grad: y is a trainable function of the
teacher's features), one shape, and a binary (B, 1, H, W) mask of the maps' dtype (about half
the positions in). Shapes: the last CIFAR stage of resnet32x4 -> resnet8x4 (64x256x8x8, the
pair of the paper's loss weight 1000), a middle CIFAR stage (64x128x16x16) and an ImageNet-like
stage (32x512x28x28).

The op is memory-bound: the fused forward reads x, y and the mask once (the eager reference
also writes and re-reads the masked difference and its square), the fused backward reads them
once more and writes both gradients in the same pass.
"""

from __future__ import annotations

import torch

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional
from kdfast.reference import masked_mse as reference

CIFAR_LAST = (64, 256, 8, 8)  # resnet32x4 -> resnet8x4 hint
CIFAR_MIDDLE = (64, 128, 16, 16)
IMAGENET = (32, 512, 28, 28)

SHAPES = {
    "cuda": [(CIFAR_LAST,), (CIFAR_MIDDLE,), (IMAGENET,), ((256, 256, 8, 8),)],
    "cuda-quick": [(CIFAR_LAST,), (IMAGENET,)],
    "cpu": [(CIFAR_LAST,), (CIFAR_MIDDLE,), (IMAGENET,)],
    "cpu-quick": [(CIFAR_LAST,)],
    "tiny": [((4, 16, 4, 4),)],
}


def masked_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    (stage,) = shape
    b, _, h, w = stage
    x = torch.randn(stage, dtype=dtype, device=device, requires_grad=True)
    y = torch.randn(stage, dtype=dtype, device=device, requires_grad=True)
    mask = (torch.rand((b, 1, h, w), device=device) > 0.5).to(dtype)
    return Inputs((x, y, mask), (x, y))


def masked_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model: fwd reads x, y and the mask once; bwd reads them and writes grad_x and grad_y."""
    (stage,) = shape
    b, c, h, w = stage
    feature, mask = element_size(dtype) * b * c * h * w, element_size(dtype) * b * h * w
    return by_pass(2 * feature + mask, 4 * feature + mask, pass_)


SPECS = (
    OpSpec(
        name="masked_mse",
        family="masked_mse",
        reference=reference.masked_mse,
        fused=functional.masked_mse,
        make_inputs=masked_inputs,
        bytes_moved=masked_bytes,
        shapes=SHAPES,
    ),
)
