"""AT (Zagoruyko & Komodakis 2017): ``CE + 1000 * sum over stages of the AT loss``.

mdistiller's choice of features: ``feats[1:]``, every stage output after its activation except the
stem's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdfast import functional
from kdfast.distillers.base import Distiller, Params
from kdfast.models import Features

__all__ = ["AT", "ATParams"]


@dataclass
class ATParams(Params):
    ce_weight: float = 1.0
    at_weight: float = 1000.0
    p: float = 2.0
    mode: str = "code"  # "code" (published tables) or "paper"


class AT(Distiller):
    """``{"ce": ..., "at": at_weight * at_loss(stages[1:], stages[1:])}``."""

    params_class = ATParams
    params: ATParams

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        return {"at": p.at_weight * functional.at_loss(student.stages[1:], teacher.stages[1:], p.p, p.mode)}
