"""Pieces shared by several model families: the block protocol, segment functions, helpers."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models.base import Recorder

__all__ = [
    "Block",
    "conv_bn",
    "channel_shuffle",
    "kaiming_init",
    "relu_stem",
    "relu_stem_bn_preact",
    "residual_stage",
    "linear_head",
    "conv_head",
]


class Block(nn.Module, ABC):
    """A block whose output is ``activate(preact(x))``.

    A stage records the ``preact`` of its last block as its pre-activation feature (the public
    code's ``is_last`` blocks returning ``(out, preact)``) without a second implementation of the block.
    """

    @abstractmethod
    def preact(self, x: Tensor) -> Tensor:
        """The block's output before its final activation."""

    def activate(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.preact(x))


def conv_bn(inp: int, oup: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``Sequential(conv (no bias, 'same' padding), BN)``: keys ``0.weight``, ``1.running_mean``, ..."""
    conv = nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(oup))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: (N, g*c, H, W) -> view (N, g, c, H, W) -> swap g, c -> flatten."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def kaiming_init(model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """The public CIFAR init: convs ``N(0, 2 / (k*k*out))`` (Kaiming, fan-out) with zero bias; BN is
    already (1, 0); linear weights ``N(0, linear_std)`` if given, biases zeroed if asked."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if zero_linear_bias:
                nn.init.zeros_(m.bias)


# Segment functions: fn(x, rec, *modules) -> Tensor (see kdfast.models.base).


def relu_stem(x: Tensor, rec: Recorder | None, conv: nn.Module, bn: nn.Module) -> Tensor:
    """``relu(bn(conv(x)))``; records it as both the stage and its preact (the CIFAR models' ``f0``)."""
    x = F.relu(bn(conv(x)))
    if rec is not None:
        rec.add_stage(x, x)
    return x


def relu_stem_bn_preact(x: Tensor, rec: Recorder | None, conv: nn.Module, bn: nn.Module) -> Tensor:
    """``relu(bn(conv(x)))``, recording the BN output as the preact (the ImageNet models' stem)."""
    pre = bn(conv(x))
    x = F.relu(pre)
    if rec is not None:
        rec.add_stage(x, pre)
    return x


def residual_stage(x: Tensor, rec: Recorder | None, *blocks: Block) -> Tensor:
    """Runs :class:`Block` s in order; records each output, then the stage (last output, last preact)."""
    pre = x
    for block in blocks:
        pre = block.preact(x)
        x = block.activate(pre)
        if rec is not None:
            rec.blocks.append(x)
    if rec is not None:
        rec.add_stage(x, pre)
    return x


def linear_head(x: Tensor, rec: Recorder | None, fc: nn.Module) -> Tensor:
    """Global average pool (the public fixed-size pools at their native input size), then ``fc``."""
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    if rec is not None:
        rec.pooled = pooled
    return fc(pooled)


def conv_head(x: Tensor, rec: Recorder | None, conv: nn.Module, bn: nn.Module, fc: nn.Module) -> Tensor:
    """``relu(bn(conv(x)))`` (a 1x1 expansion), then :func:`linear_head`."""
    return linear_head(F.relu(bn(conv(x))), rec, fc)
