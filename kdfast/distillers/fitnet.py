"""FitNet (Romero et al. 2015): ``CE + 100 * MSE(connector(fs), ft)`` on the hint stage, as mdistiller.

The connector is mdistiller's ``ConvReg``: a conv to the teacher's channels (1x1 when the spatial
sizes match, ``1 + Hs - Ht`` wide when the student's map is larger), BatchNorm and ReLU.
"""

from __future__ import annotations

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


class ConvReg(nn.Sequential):
    """Conv + BN + ReLU from a student map (Cs, Hs, Ws) to a teacher map (Ct, Ht, Wt), Hs >= Ht."""

    def __init__(self, s_shape: tuple[int, int, int], t_shape: tuple[int, int, int]) -> None:
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if s_h < t_h or s_w < t_w:
            raise ValueError(f"FitNet connector needs a student map at least as large as the teacher's, got {s_shape} -> {t_shape}")
        super().__init__(nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w)), nn.BatchNorm2d(t_c), nn.ReLU(inplace=True))


class FitNet(Distiller):
    """``{"ce": ..., "fitnet": feat_weight * MSE(connector(fs[hint]), ft[hint])}``; owns the connector."""

    params_class = FitNetParams

    def __init__(self, student: KDModel, teacher: KDModel, params: FitNetParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        hint = params.hint_layer
        self.connector = ConvReg(tuple(feature_shapes(student, image_size)[hint]), tuple(feature_shapes(teacher, image_size)[hint]))

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        hint = self.connector(student.stages[p.hint_layer])
        # F.mse_loss saves its target for backward, which an inference tensor refuses: clone it.
        target = teacher.stages[p.hint_layer].clone()
        return {"fitnet": p.feat_weight * F.mse_loss(hint.float(), target.float())}
