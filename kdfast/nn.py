"""nn.Module forms of the fused losses in :mod:`kdfast.functional`."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from kdfast import functional

__all__ = ["ATLoss", "KDLoss", "DKDLoss"]


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


class KDLoss(nn.Module):
    """Hinton's KD loss ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``; see :func:`kdfast.functional.kd_loss`."""

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean", backend: str | None = None) -> None:
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        return functional.kd_loss(z_s, z_t, self.temperature, self.reduction, self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"


class DKDLoss(nn.Module):
    """Decoupled KD loss ``T^2 (alpha TCKD + beta NCKD)``; see :func:`kdfast.functional.dkd_loss`."""

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, reduction: str = "batchmean", backend: str | None = None
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature, self.reduction, self.backend = alpha, beta, temperature, reduction, backend

    def forward(self, z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
        return functional.dkd_loss(z_s, z_t, target, self.alpha, self.beta, self.temperature, self.reduction, self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"
