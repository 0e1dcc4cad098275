"""nn.Module forms of the fused losses in :mod:`kdfast.functional`."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from kdfast import functional

__all__ = ["ATLoss"]


class ATLoss(nn.Module):
    """Attention-transfer loss; see :func:`kdfast.functional.at_loss` for the formula.

    ``ATLoss(p=2, mode="code")(f_s, f_t)`` with one (B, C, H, W) pair or lists of stage pairs.
    """

    def __init__(self, p: float = 2, mode: str = "code", reduction: str = "sum", backend: str | None = None) -> None:
        super().__init__()
        self.p, self.mode, self.reduction, self.backend = p, mode, reduction, backend

    def forward(self, f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]) -> Tensor:
        return functional.at_loss(f_s, f_t, self.p, self.mode, self.reduction, self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}, reduction={self.reduction!r}, backend={self.backend!r}"
