"""MobileNets: the CIFAR MobileNetV2 of the published KD tables and the ImageNet MobileNetV1.

* :class:`MobileNetV2` / :func:`mobile_half` reproduce mdistiller / RepDistiller
  ``models/cifar/mobilenetv2.py`` (the tables' "MobileNetV2" is ``mobile_half``: T=6, width 0.5).
* :class:`MobileNetV1` reproduces the common public definition mdistiller uses
  (``models/imagenet/mobilenetv1.py``): ``model`` (a Sequential of conv-BN-ReLU and depthwise-separable
  units) and ``fc``.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from kdfast.models.base import KDModel, SegmentSpec
from kdfast.models.layers import (
    Block,
    conv_bn,
    conv_head,
    kaiming_init,
    linear_head,
    relu_stem,
    relu_stem_bn_preact,
    residual_stage,
)

__all__ = ["InvertedResidual", "MobileNetV2", "mobile_half", "DepthwiseSeparable", "MobileNetV1"]


class InvertedResidual(Block):
    """``conv``: 1x1 expand-BN-ReLU, 3x3 depthwise (strided)-BN-ReLU, 1x1 project-BN (linear); the
    input is added when the shape is kept. The output has no activation."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def preact(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)

    def activate(self, pre: Tensor) -> Tensor:
        return pre


class MobileNetV2(KDModel):
    """CIFAR MobileNetV2: ``conv1`` (3x3/2 conv, BN; then ReLU), ``blocks`` (a ModuleList of 7 Sequentials of
    inverted residuals, settings (t, c, n, s) = (1,16,1,1), (T,24,2,1), (T,32,3,2), (T,64,4,2),
    (T,96,3,1), (T,160,3,2), (T,320,1,1), widths scaled by ``width_mult``), ``conv2`` (1x1 conv to
    1280, BN; then ReLU), global pool, ``classifier`` (Sequential(Linear)). The ReLUs after ``conv1`` and
    ``conv2`` are applied by the forward (they hold no state; the indices of the public code are kept).

    Stages as in the public code: ``[f0, after blocks[1], blocks[2], blocks[4], blocks[6]]``. Block
    outputs are linear (no final ReLU), so ``preact_stages`` equals ``stages`` (the public code has no
    separate preacts for this model).
    """

    # blocks[i] for i in _STAGE_GROUPS[k] form stage k + 1.
    _STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))

    def __init__(self, expansion: int, width_mult: float, num_classes: int = 100) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 3, stride=2)
        settings: tuple[tuple[int, int, int, int], ...]
        settings = ((1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2), (expansion, 64, 4, 2))
        settings += ((expansion, 96, 3, 1), (expansion, 160, 3, 2), (expansion, 320, 1, 1))
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:  # expansion, channels, blocks, first stride
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn(input_channel, last_channel, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        self.stage_channels = tuple(int(c * width_mult) for c in (32, 24, 32, 96, 320))
        kaiming_init(self, linear_std=0.01, zero_linear_bias=True)

    def _segments(self) -> list[SegmentSpec]:
        # blocks[i] are the Sequentials of __init__ (a ModuleList's items are typed as plain Modules)
        stages = [tuple(block for i in group for block in cast(nn.Sequential, self.blocks[i])) for group in self._STAGE_GROUPS]
        return [
            (relu_stem, (self.conv1[0], self.conv1[1])),
            *((residual_stage, blocks) for blocks in stages),
            (conv_head, (self.conv2[0], self.conv2[1], self.classifier)),
        ]


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """The tables' "MobileNetV2": expansion T=6, width 0.5."""
    return MobileNetV2(6, 0.5, num_classes)


class DepthwiseSeparable(Block, nn.Sequential):
    """3x3 depthwise conv-BN-ReLU then 1x1 conv-BN (indices 0, 1, 3, 4), followed by a ReLU."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        dw, pw = conv_bn(inp, inp, 3, stride, groups=inp), conv_bn(inp, oup, 1)
        super().__init__(dw[0], dw[1], nn.ReLU(inplace=True), pw[0], pw[1])

    def preact(self, x: Tensor) -> Tensor:
        return nn.Sequential.forward(self, x)


class MobileNetV1(KDModel):
    """ImageNet MobileNetV1 (width 1.0): ``model`` = [conv-BN 32/2 (+ReLU), 13 depthwise-separable units]
    and ``fc``; stages: the stem (32 ch, /2) and the outputs of units 3, 5, 11, 13 (128/4, 256/8,
    512/16, 1024/32), preacts taken before their ReLU (mdistiller's ``feats`` are the last four).
    """

    # (output channels, stride) of model[1..13]
    _UNITS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *((512, 1),) * 5, (1024, 2), (1024, 1))
    _STAGE_ENDS = (1, 4, 6, 12, 14)  # stage k is model[_STAGE_ENDS[k-1] : _STAGE_ENDS[k]]

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        units: list[nn.Module] = [conv_bn(3, 32, 3, stride=2)]
        inp = 32
        for oup, stride in self._UNITS:
            units.append(DepthwiseSeparable(inp, oup, stride))
            inp = oup
        self.model = nn.Sequential(*units)
        self.fc = nn.Linear(1024, num_classes)
        self.stage_channels = (32, 128, 256, 512, 1024)

    def _segments(self) -> list[SegmentSpec]:
        units = tuple(self.model)
        stem = cast(nn.Sequential, units[0])  # conv_bn's Sequential (the items of a Sequential are typed as Modules)
        ends = self._STAGE_ENDS
        return [
            (relu_stem_bn_preact, (stem[0], stem[1])),
            *((residual_stage, units[a:b]) for a, b in zip(ends, ends[1:])),
            (linear_head, (self.fc,)),
        ]
