"""The CIFAR "ResNet18" / "ResNet50" of the published KD tables (mdistiller / RepDistiller ``resnetv2.py``).

A torchvision-shaped ResNet (64-128-256-512 planes, basic or bottleneck blocks) with a CIFAR stem:
one 3x3 stride-1 conv-BN-ReLU (``conv1``, ``bn1``), no max-pool, four stages ``layer1..4`` (strides
1, 2, 2, 2: 32x32 -> 4x4), global average pool, ``linear``. Its parameter names are the peers':
each block's shortcut is ``shortcut`` (an empty ``Sequential`` for the identity, else ``Sequential(1x1
conv, BN)``), so their checkpoints load with ``strict=True``. Features as the public code: stages
``[f0, f1, f2, f3, f4]``, preacts ``[f0, pre1, pre2, pre3, pre4]``, pooled embedding before ``linear``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdfast.models.base import KDModel, SegmentSpec
from kdfast.models.layers import kaiming_init, linear_head, relu_stem, residual_stage
from kdfast.models.resnet import BasicBlock, Bottleneck

__all__ = ["BasicBlockV2", "BottleneckV2", "CIFARResNetV2", "cifar_resnet18", "cifar_resnet50"]


def shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Sequential:
    """The peers' shortcut: empty (identity, no parameters) or ``Sequential(1x1 conv, BN)`` when the shape changes."""
    if stride == 1 and inplanes == outplanes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(outplanes))


class BasicBlockV2(BasicBlock):
    """:class:`BasicBlock` with its shortcut as the module ``shortcut``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__(inplanes, planes, stride)
        self.shortcut = shortcut(inplanes, planes * self.expansion, stride)

    def skip(self, x: Tensor) -> Tensor:
        return self.shortcut(x)


class BottleneckV2(Bottleneck):
    """:class:`Bottleneck` (stride on the 3x3) with its shortcut as the module ``shortcut``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__(inplanes, planes, stride)
        self.shortcut = shortcut(inplanes, planes * self.expansion, stride)

    def skip(self, x: Tensor) -> Tensor:
        return self.shortcut(x)


class CIFARResNetV2(KDModel):
    """The peers' CIFAR ``ResNet(block, num_blocks)``; see the module docstring."""

    def __init__(
        self, block: type[BasicBlockV2 | BottleneckV2], num_blocks: tuple[int, int, int, int], num_classes: int = 100
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes, layers = 64, []
        for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2), strict=True):
            layers.append(
                nn.Sequential(
                    *(
                        block(inplanes if i == 0 else planes * block.expansion, planes, stride if i == 0 else 1)
                        for i in range(blocks)
                    )
                )
            )
            inplanes = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = (64, *(planes * block.expansion for planes in (64, 128, 256, 512)))
        kaiming_init(self)

    def _segments(self) -> list[SegmentSpec]:
        return [
            (relu_stem, (self.conv1, self.bn1)),
            (residual_stage, tuple(self.layer1)),
            (residual_stage, tuple(self.layer2)),
            (residual_stage, tuple(self.layer3)),
            (residual_stage, tuple(self.layer4)),
            (linear_head, (self.linear,)),
        ]


def cifar_resnet18(num_classes: int = 100) -> CIFARResNetV2:
    """The peers' CIFAR ``ResNet18``: basic blocks (2, 2, 2, 2)."""
    return CIFARResNetV2(BasicBlockV2, (2, 2, 2, 2), num_classes)


def cifar_resnet50(num_classes: int = 100) -> CIFARResNetV2:
    """The peers' CIFAR ``ResNet50``: bottleneck blocks (3, 4, 6, 3)."""
    return CIFARResNetV2(BottleneckV2, (3, 4, 6, 3), num_classes)
