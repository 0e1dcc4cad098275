"""FitNet (Romero et al. 2015): ``CE + 100 * MSE(connector(fs), ft)`` on the hint stage, as mdistiller.

The connector is the peers' ``ConvReg`` (mdistiller / RepDistiller), chosen by the map heights:

* ``Hs == 2 Ht``: 3x3 conv, stride 2, padding 1;
* ``2 Hs == Ht``: 4x4 transposed conv, stride 2, padding 1;
* otherwise (``Hs >= Ht``): a ``(1 + Hs - Ht) x (1 + Ws - Wt)`` conv (1x1 when the sizes match);

each to the teacher's channels (with bias), then BatchNorm and ReLU, as modules ``conv``, ``bn``,
``relu``, so the connector's state_dict keys are the peers' (``conv.weight``, ``bn.running_mean``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.distillers.base import Distiller, Params, feature_shapes
from kdfast.models import Features, KDModel

__all__ = ["FitNet", "FitNetParams", "ConvReg"]


@dataclass
class FitNetParams(Params):
    ce_weight: float = 1.0
    feat_weight: float = 100.0
    hint_layer: int = 2  # index into Features.stages (mdistiller's CIFAR default)


class ConvReg(nn.Module):
    """``relu(bn(conv(x)))`` from a student map (Cs, Hs, Ws) to a teacher map (Ct, Ht, Wt): the module docstring's three cases."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        self.conv: nn.Module
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"FitNet connector: no ConvReg from a student map {tuple(s_shape)} to a teacher map "
                f"{tuple(t_shape)} (the student's map must be twice, half, or at least the teacher's size)"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class FitNet(Distiller):
    """``{"ce": ..., "fitnet": feat_weight * MSE(connector(fs[hint]), ft[hint])}``; owns the connector."""

    params_class = FitNetParams
    params: FitNetParams

    def __init__(self, student: KDModel, teacher: KDModel, params: FitNetParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        hint = params.hint_layer
        s_shape, t_shape = feature_shapes(student, image_size)[hint], feature_shapes(teacher, image_size)[hint]
        self.connector = ConvReg(tuple(s_shape), tuple(t_shape))

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        hint = self.connector(student.stages[p.hint_layer])
        # F.mse_loss saves its target for backward, which an inference tensor refuses: clone it.
        target = teacher.stages[p.hint_layer].clone()
        return {"fitnet": p.feat_weight * F.mse_loss(hint.float(), target.float())}
