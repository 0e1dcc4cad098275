"""RKD (Park et al. 2019): ``CE + rkd_loss(es, et)`` on the pooled embeddings, as mdistiller.

mdistiller's values: distance weight 25, angle weight 50, loss weight 1, on ``pooled_feat`` (the
globally pooled embedding the classifier sees, :attr:`Features.pooled`), Euclidean (not squared)
distances.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdfast import functional
from kdfast.distillers.base import Distiller, Params
from kdfast.models import Features

__all__ = ["RKD", "RKDParams"]


@dataclass
class RKDParams(Params):
    ce_weight: float = 1.0
    feat_weight: float = 1.0
    distance_weight: float = 25.0
    angle_weight: float = 50.0


class RKD(Distiller):
    """``{"ce": ..., "rkd": feat_weight * rkd_loss(pooled, pooled, distance_weight, angle_weight)}``."""

    params_class = RKDParams
    params: RKDParams

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        loss = functional.rkd_loss(student.pooled, teacher.pooled, distance_weight=p.distance_weight, angle_weight=p.angle_weight)
        return {"rkd": p.feat_weight * loss}
