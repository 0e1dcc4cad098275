"""Wide ResNets of the published KD tables (mdistiller / RepDistiller ``models/cifar/wrn.py``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models.base import KDModel, Recorder, SegmentSpec
from kdfast.models.layers import kaiming_init, linear_head

__all__ = ["WideBasicBlock", "NetworkBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``bn1``-ReLU, ``conv1`` (strided), ``bn2``-ReLU, ``conv2``, plus the shortcut.

    The shortcut is the identity, or, when the width changes, ``convShortcut`` (1x1, strided) applied
    to the block's pre-activated input, as in the public code. Dropout is left out (the public
    factories use a rate of 0).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut = (
            None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        )

    def forward_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, ``bn1(x)``): the second is the pre-activation of the feature this block consumes."""
        pre = self.bn1(x)
        act = F.relu(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act)), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_parts(x)[0]


class NetworkBlock(nn.Module):
    """One stage: ``layer``, a Sequential of ``WideBasicBlock``; the first one strides and widens."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(nb_layers))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _conv_stem(x: Tensor, rec: Recorder | None, conv: nn.Module) -> Tensor:
    x = conv(x)
    if rec is not None:
        rec.add_stage(x, x)
    return x


def _stage(x: Tensor, rec: Recorder | None, *blocks: WideBasicBlock) -> Tensor:
    for block in blocks:
        x, _ = block.forward_parts(x)
        if rec is not None:
            rec.blocks.append(x)
    if rec is not None:
        rec.stages.append(x)  # its preact is recorded by the next segment (its first BN)
    return x


def _stage_after_stage(x: Tensor, rec: Recorder | None, first: WideBasicBlock, *blocks: WideBasicBlock) -> Tensor:
    """A stage fed by a stage: its first block's ``bn1`` output is that previous stage's preact."""
    x, pre = first.forward_parts(x)
    if rec is not None:
        rec.preact_stages.append(pre)
        rec.blocks.append(x)
    return _stage(x, rec, *blocks)


def _head(x: Tensor, rec: Recorder | None, bn: nn.Module, fc: nn.Module) -> Tensor:
    pre = bn(x)
    if rec is not None:
        rec.preact_stages.append(pre)
    return linear_head(F.relu(pre), rec, fc)


class WideResNet(KDModel):
    """WRN-depth-k: ``conv1`` (16 ch), ``block1..3`` of ``(depth - 4) / 6`` blocks with 16k, 32k, 64k
    channels (strides 1, 2, 2), final ``bn1``-ReLU, global pool, ``fc``.

    Features as in the public code: stages ``[f0, f1, f2, f3]`` are the raw stage outputs (this is a
    pre-activation network); preacts are ``[f0, bn(f1), bn(f2), bn(f3)]``, where ``bn`` is the BN
    that consumes the feature next (the next stage's first ``bn1``, then the final ``bn1``). They are
    taken from the forward itself, so in training mode those BNs update their statistics once per
    batch (the public code runs them a second time to get them).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a WRN's depth is 6n + 4 (10, 16, 22, ...), got {depth}")
        n = (depth - 4) // 6
        channels = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self.stage_channels = channels
        kaiming_init(self, zero_linear_bias=True)

    def _segments(self) -> list[SegmentSpec]:
        return [
            (_conv_stem, (self.conv1,)),
            (_stage, tuple(self.block1.layer)),
            (_stage_after_stage, tuple(self.block2.layer)),
            (_stage_after_stage, tuple(self.block3.layer)),
            (_head, (self.bn1, self.fc)),
        ]


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
