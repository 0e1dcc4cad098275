"""DKD (Zhao et al. 2022): ``CE + min(epoch / warmup, 1) * DKD(alpha=1, beta=8, T=4)`` as mdistiller."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdfast import functional
from kdfast.distillers.base import Distiller, Params
from kdfast.models import Features

__all__ = ["DKD", "DKDParams"]


@dataclass
class DKDParams(Params):
    ce_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup: int = 20  # epochs of the linear ramp of the DKD weight from 0 (mdistiller: epoch / warmup)


class DKD(Distiller):
    """``{"ce": ..., "dkd": min(epoch / warmup, 1) * dkd_loss(...)}`` (epoch counts from 1)."""

    params_class = DKDParams
    params: DKDParams

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        ramp = min(epoch / p.warmup, 1.0) if p.warmup > 0 else 1.0
        loss = functional.dkd_loss(student.logits, teacher.logits, labels, p.alpha, p.beta, p.temperature)
        return {"dkd": ramp * loss}
