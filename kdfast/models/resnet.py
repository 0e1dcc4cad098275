"""ResNets: the CIFAR family of the published KD tables and torchvision's ImageNet ResNet-18/34/50.

Both families use the same blocks, with torchvision's parameter names (``conv1``, ``bn1``, ...,
``downsample.0`` / ``downsample.1``), which are also those of mdistiller / RepDistiller's CIFAR
``resnet.py``; so checkpoints of either load with ``strict=True``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models.base import KDModel, Recorder, SegmentSpec
from kdfast.models.layers import Block, kaiming_init, linear_head, relu_stem, relu_stem_bn_preact, residual_stage

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CIFARResNet",
    "ImageNetResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "resnet18",
    "resnet34",
    "resnet50",
]


def conv3x3(inp: int, oup: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, oup, kernel_size=3, stride=stride, padding=1, bias=False)


class ResidualBlock(Block):
    """A residual block: ``preact(x) = branch(x) + skip(x)``, the skip an identity or its ``downsample``."""

    downsample: nn.Module | None

    def skip(self, x: Tensor) -> Tensor:
        """The shortcut path: ``x`` or ``downsample(x)``."""
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(ResidualBlock):
    """Two 3x3 conv-BN, identity or ``downsample`` shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def preact(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += self.skip(x)
        return out


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride: torchvision's "ResNet v1.5"), 1x1 expand x4; ReLU after the sum."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.skip(x)
        return out


def make_layer(block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """``blocks`` blocks; the first one strides and gets a ``Sequential(1x1 conv, BN)`` shortcut if the shape changes."""
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(outplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class CIFARResNet(KDModel):
    """mdistiller / RepDistiller's CIFAR ResNet (``mdistiller/models/cifar/resnet.py``, basic blocks).

    3x3 conv-BN-ReLU stem (``conv1``, ``bn1``), three stages ``layer1..3`` of ``(depth - 2) / 6``
    basic blocks with ``num_filters[1:]`` channels (strides 1, 2, 2), global pool, ``fc``.
    Features as in the public code: stages ``[f0, f1, f2, f3]``; preacts ``[f0, pre1, pre2, pre3]``
    (the stem's post-ReLU map stands for its own preact).
    """

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet's depth is 6n + 2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = make_layer(BasicBlock, num_filters[0], num_filters[1], n)
        self.layer2 = make_layer(BasicBlock, num_filters[1], num_filters[2], n, stride=2)
        self.layer3 = make_layer(BasicBlock, num_filters[2], num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3], num_classes)
        self.stage_channels = tuple(num_filters)
        kaiming_init(self)

    def _segments(self) -> list[SegmentSpec]:
        return [
            (relu_stem, (self.conv1, self.bn1)),
            (residual_stage, tuple(self.layer1)),
            (residual_stage, tuple(self.layer2)),
            (residual_stage, tuple(self.layer3)),
            (linear_head, (self.fc,)),
        ]


def _resnet_stem(x: Tensor, rec: Recorder | None, conv: nn.Module, bn: nn.Module) -> Tensor:
    """7x7/2 conv-BN-ReLU (recorded before the max-pool, as mdistiller's ImageNet ResNet does), 3x3/2 max-pool."""
    return F.max_pool2d(relu_stem_bn_preact(x, rec, conv, bn), kernel_size=3, stride=2, padding=1)


class ImageNetResNet(KDModel):
    """torchvision's ImageNet ResNet (``torchvision/models/resnet.py``), with its parameter names.

    Features as mdistiller's ImageNet ResNet: stages ``[relu(stem), s1, s2, s3, s4]`` (the stem taken
    before the max-pool) and preacts ``[stem BN output, pre1, ..., pre4]``.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        e = block.expansion
        self.layer1 = make_layer(block, 64, 64, layers[0])
        self.layer2 = make_layer(block, 64 * e, 128, layers[1], stride=2)
        self.layer3 = make_layer(block, 128 * e, 256, layers[2], stride=2)
        self.layer4 = make_layer(block, 256 * e, 512, layers[3], stride=2)
        self.fc = nn.Linear(512 * e, num_classes)
        self.stage_channels = (64, 64 * e, 128 * e, 256 * e, 512 * e)
        kaiming_init(self)

    def _segments(self) -> list[SegmentSpec]:
        return [
            (_resnet_stem, (self.conv1, self.bn1)),
            (residual_stage, tuple(self.layer1)),
            (residual_stage, tuple(self.layer2)),
            (residual_stage, tuple(self.layer3)),
            (residual_stage, tuple(self.layer4)),
            (linear_head, (self.fc,)),
        ]


_CIFAR_WIDTHS = (16, 16, 32, 64)
_CIFAR_WIDTHS_X4 = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(8, _CIFAR_WIDTHS, num_classes)


def resnet14(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(14, _CIFAR_WIDTHS, num_classes)


def resnet20(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(20, _CIFAR_WIDTHS, num_classes)


def resnet32(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(32, _CIFAR_WIDTHS, num_classes)


def resnet44(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(44, _CIFAR_WIDTHS, num_classes)


def resnet56(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(56, _CIFAR_WIDTHS, num_classes)


def resnet110(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(110, _CIFAR_WIDTHS, num_classes)


def resnet8x4(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(8, _CIFAR_WIDTHS_X4, num_classes)


def resnet32x4(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(32, _CIFAR_WIDTHS_X4, num_classes)


def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes)
