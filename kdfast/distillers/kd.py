"""KD (Hinton et al. 2015): ``0.1 * CE + 0.9 * T^2 KL`` at T=4 (mdistiller's CIFAR weights)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdfast import functional
from kdfast.distillers.base import Distiller, Params
from kdfast.models import Features

__all__ = ["KD", "KDParams"]


@dataclass
class KDParams(Params):
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    temperature: float = 4.0


class KD(Distiller):
    """``{"ce": ..., "kd": kd_weight * kd_loss(z_s, z_t, T)}``."""

    params_class = KDParams
    params: KDParams

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        return {"kd": p.kd_weight * functional.kd_loss(student.logits, teacher.logits, p.temperature)}
