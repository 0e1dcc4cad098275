"""VGG of the published KD tables: mdistiller / RepDistiller ``models/cifar/vgg.py``, BN variants.

The tables' ``vgg8/11/13/16/19`` are the ``vgg*_bn`` factories of the public code (their model
dicts map ``"vgg13"`` to ``vgg13_bn``), so every factory here has BatchNorm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models.base import KDModel, Recorder, SegmentSpec
from kdfast.models.layers import kaiming_init, linear_head

__all__ = ["VGG", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

# Conv widths of block0..block4 (configurations "S", "A", "B", "D", "E").
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _conv_block(widths: tuple[int, ...], in_channels: int) -> nn.Sequential:
    """[conv3x3 (with bias), BN, ReLU] per width, without the last ReLU (applied by the forward)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


def _run_block(x: Tensor, rec: Recorder | None, block: nn.Sequential, stem: bool) -> Tensor:
    for layer in block:
        x = layer(x)
        if rec is not None and isinstance(layer, nn.ReLU):
            rec.blocks.append(x)
    out = F.relu(x)
    if rec is not None:
        rec.blocks.append(out)
        rec.add_stage(out, out if stem else x)  # the public code lists f0 itself as the stem's preact
    return out


def _stem(x: Tensor, rec: Recorder | None, block: nn.Sequential) -> Tensor:
    return _run_block(x, rec, block, stem=True)


def _stage(x: Tensor, rec: Recorder | None, block: nn.Sequential) -> Tensor:
    return _run_block(F.max_pool2d(x, 2), rec, block, stem=False)


def _last_stage(x: Tensor, rec: Recorder | None, block: nn.Sequential) -> Tensor:
    """The public code max-pools before ``block4`` only for 64x64 inputs (its input is then 8x8)."""
    if x.shape[-2] == 8:
        x = F.max_pool2d(x, 2)
    return _run_block(x, rec, block, stem=False)


class VGG(KDModel):
    """``block0..block4`` (conv-BN-ReLU units), 2x2 max-pools between blocks 0-1, 1-2, 2-3,
    global average pool, ``classifier`` (Linear 512 -> classes).

    Features as in the public code: stages ``[f0, ..., f4]`` (every block after its ReLU), preacts
    ``[f0, pre1, ..., pre4]``; ``blocks`` lists every conv-BN-ReLU unit's output.
    """

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = (3,) + tuple(widths[-1] for widths in config[:-1])
        self.block0 = _conv_block(config[0], in_channels[0])
        self.block1 = _conv_block(config[1], in_channels[1])
        self.block2 = _conv_block(config[2], in_channels[2])
        self.block3 = _conv_block(config[3], in_channels[3])
        self.block4 = _conv_block(config[4], in_channels[4])
        self.classifier = nn.Linear(config[4][-1], num_classes)
        self.stage_channels = tuple(widths[-1] for widths in config)
        kaiming_init(self, linear_std=0.01, zero_linear_bias=True)

    def _segments(self) -> list[SegmentSpec]:
        return [
            (_stem, (self.block0,)),
            (_stage, (self.block1,)),
            (_stage, (self.block2,)),
            (_stage, (self.block3,)),
            (_last_stage, (self.block4,)),
            (linear_head, (self.classifier,)),
        ]


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg19"], num_classes)
