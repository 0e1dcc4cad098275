"""SP (Tung & Mori 2019): ``CE + 3000 * sp_loss(fs, ft)`` on the last stage, as mdistiller.

mdistiller's choice of feature: ``feats[-1]``, the output of the last stage after its activation
(:attr:`Features.stages` ``[-1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdfast import functional
from kdfast.distillers.base import Distiller, Params
from kdfast.models import Features

__all__ = ["SP", "SPParams"]


@dataclass
class SPParams(Params):
    ce_weight: float = 1.0
    feat_weight: float = 3000.0


class SP(Distiller):
    """``{"ce": ..., "sp": feat_weight * sp_loss(stages[-1], stages[-1])}``."""

    params_class = SPParams
    params: SPParams

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        return {"sp": self.params.feat_weight * functional.sp_loss(student.stages[-1], teacher.stages[-1])}
