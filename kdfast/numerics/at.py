"""Attention transfer: the map modes, losses and the map normalisation.

Ground floor (kdfast/numerics): used by the eager references and by the fused path alike."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdfast.numerics.common import EPS

MAP_MODES = ("mean", "sum")


LOSSES = ("mse", "l2")


# An at_loss mode is a (map mode, loss) pair.
AT_MODES = {"code": ("mean", "mse"), "paper": ("sum", "l2")}


def normalize_map(m: Tensor) -> Tensor:
    """``m / max(||m||_2, 1e-12)`` along the last dim (``torch.nn.functional.normalize``)."""
    return F.normalize(m, p=2.0, dim=-1, eps=EPS)
