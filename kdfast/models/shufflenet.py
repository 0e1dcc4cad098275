"""CIFAR ShuffleNets of the published KD tables: mdistiller / RepDistiller ``models/cifar/ShuffleNetv1.py``
(``ShuffleV1``: groups 3) and ``ShuffleNetv2.py`` (``ShuffleV2``: net size 1).

Both have a 1x1 conv-BN-ReLU stem at full resolution (``conv1``, ``bn1``, 24 channels), three stages
``layer1..3`` that each halve the resolution, global pool and ``linear``. Features as in the public
code: stages ``[f0, f1, f2, f3]``, preacts ``[f0, pre1, pre2, pre3]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models.base import KDModel, SegmentSpec
from kdfast.models.layers import Block, channel_shuffle, conv_head, linear_head, relu_stem, residual_stage

__all__ = ["ShuffleV1Block", "ShuffleNetV1", "ShuffleV1", "ShuffleV2Block", "ShuffleV2DownBlock", "ShuffleNetV2", "ShuffleV2"]


def _dwconv3x3(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False)


class ShuffleV1Block(Block):
    """Grouped 1x1 (ungrouped on the 24-channel stem output)-BN-ReLU, channel shuffle, 3x3 depthwise
    (strided)-BN-ReLU, grouped 1x1-BN; added to the input, or, when strided, concatenated with its
    3x3/2 average pool; ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        mid_planes = out_planes // 4
        self.stride = stride
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = _dwconv3x3(mid_planes, stride)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def preact(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        return out + x


class ShuffleNetV1(KDModel):
    """ShuffleNet V1 for CIFAR; each stage starts with a strided block whose branch makes
    ``out - in`` channels (the rest is the pooled input)."""

    def __init__(
        self, out_planes: tuple[int, int, int], num_blocks: tuple[int, int, int], groups: int, num_classes: int = 100
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(24, out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[0], out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[1], out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.stage_channels = (24, *out_planes)

    @staticmethod
    def _make_layer(in_planes: int, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        first = ShuffleV1Block(in_planes, out_planes - in_planes, 2, groups)
        return nn.Sequential(first, *(ShuffleV1Block(out_planes, out_planes, 1, groups) for _ in range(1, num_blocks)))

    def _segments(self) -> list[SegmentSpec]:
        return [
            (relu_stem, (self.conv1, self.bn1)),
            (residual_stage, tuple(self.layer1)),
            (residual_stage, tuple(self.layer2)),
            (residual_stage, tuple(self.layer3)),
            (linear_head, (self.linear,)),
        ]


def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:
    """The tables' ShuffleV1: stage widths 240/480/960, 4/8/4 blocks, 3 groups."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)


class ShuffleV2Block(Block):
    """Split channels in halves; the second goes through 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN(-ReLU);
    concatenated back and shuffled (2 groups).

    Its preact is the concatenation before the ReLU and the shuffle, as in the public code (so a
    stage's preact is not channel-aligned with the stage output). The first half is the output of a
    ReLU, so ``shuffle(relu(preact))`` is exactly the public ``shuffle(cat(x1, relu(x2')))``.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        channels = in_channels // 2
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _dwconv3x3(channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def preact(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        return torch.cat([x1, self.bn3(self.conv3(out))], 1)

    def activate(self, pre: Tensor) -> Tensor:
        return channel_shuffle(F.relu(pre), 2)


class ShuffleV2DownBlock(Block):
    """Two strided branches, concatenated and shuffled: left 3x3 depthwise/2-BN, 1x1-BN-ReLU; right
    1x1-BN-ReLU, 3x3 depthwise/2-BN, 1x1-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = _dwconv3x3(in_channels, 2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _dwconv3x3(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def preact(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return torch.cat([left, right], 1)

    def activate(self, pre: Tensor) -> Tensor:
        return channel_shuffle(pre, 2)


class ShuffleNetV2(KDModel):
    """ShuffleNet V2 for CIFAR: stages of one down block and n basic blocks, then ``conv2``-``bn2``-ReLU
    (1x1 to the last width) before the pool."""

    def __init__(self, out_channels: tuple[int, int, int, int], num_blocks: tuple[int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(24, out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[0], out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[1], out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.stage_channels = (24, *out_channels[:3])

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
        down = ShuffleV2DownBlock(in_channels, out_channels)
        return nn.Sequential(down, *(ShuffleV2Block(out_channels) for _ in range(num_blocks)))

    def _segments(self) -> list[SegmentSpec]:
        return [
            (relu_stem, (self.conv1, self.bn1)),
            (residual_stage, tuple(self.layer1)),
            (residual_stage, tuple(self.layer2)),
            (residual_stage, tuple(self.layer3)),
            (conv_head, (self.conv2, self.bn2, self.linear)),
        ]


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    """The tables' ShuffleV2 (net size 1): widths 116/232/464, 1024 before the pool, 3/7/3 blocks."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
