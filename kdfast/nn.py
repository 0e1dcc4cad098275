"""nn.Module forms of the fused losses in :mod:`kdfast.functional`, and LCC's :class:`ClassAwareAttention`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional
from kdfast.numerics.lcc import TERMS as LCC_TERMS

__all__ = [
    "ATLoss",
    "KDLoss",
    "DKDLoss",
    "LocalCorrelationLoss",
    "ClassAwareAttention",
    "SPLoss",
    "RKDLoss",
    "NDAMLoss",
    "AFTLoss",
    "MaskedMSELoss",
    "HCLLoss",
    "MapDistanceLoss",
    "CRDLoss",
]


class _FusedLoss(nn.Module):
    """A loss of :mod:`kdfast.functional` as a module: its options are attributes fixed at
    construction (``_options`` names them, in the function's order), its inputs go to ``forward``."""

    _options: ClassVar[tuple[str, ...]] = ()

    def extra_repr(self) -> str:
        """``name=value`` of every option, string (and None) values quoted as by ``repr``."""
        return ", ".join(f"{name}={_option_text(getattr(self, name))}" for name in self._options)


def _option_text(value: object) -> str:
    return repr(value) if value is None or isinstance(value, str) else str(value)


class ATLoss(_FusedLoss):
    """Attention-transfer loss; see :func:`kdfast.functional.at_loss` for the formula.

    ``ATLoss(p=2, mode="code")(f_s, f_t)`` with one (B, C, H, W) pair or lists of stage pairs.
    """

    _options = ("p", "mode", "reduction", "backend")

    def __init__(self, p: float = 2, mode: str = "code", reduction: str = "sum", backend: str | None = None) -> None:
        super().__init__()
        self.p, self.mode, self.reduction, self.backend = p, mode, reduction, backend

    def forward(self, f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]) -> Tensor:
        return functional.at_loss(f_s, f_t, self.p, self.mode, self.reduction, self.backend)


class KDLoss(_FusedLoss):
    """Hinton's KD loss ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``; see :func:`kdfast.functional.kd_loss`."""

    _options = ("temperature", "reduction", "backend")

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean", backend: str | None = None) -> None:
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        return functional.kd_loss(z_s, z_t, self.temperature, self.reduction, self.backend)


class DKDLoss(_FusedLoss):
    """Decoupled KD loss ``T^2 (alpha TCKD + beta NCKD)``; see :func:`kdfast.functional.dkd_loss`."""

    _options = ("alpha", "beta", "temperature", "reduction", "backend")

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        reduction: str = "batchmean",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature, self.reduction, self.backend = alpha, beta, temperature, reduction, backend

    def forward(self, z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
        return functional.dkd_loss(z_s, z_t, target, self.alpha, self.beta, self.temperature, self.reduction, self.backend)


class LocalCorrelationLoss(_FusedLoss):
    """Local correlation consistency (LCC) loss; see :func:`kdfast.functional.local_correlation_loss`.

    ``LocalCorrelationLoss(grid=4)(f_s, f_t, mask=None)`` with (B, C, H, W) maps and an optional
    (B, 1, h, w) spatial mask (e.g. from :class:`ClassAwareAttention`).
    """

    _options = ("grid", "terms", "weights", "reduction", "backend")

    def __init__(
        self,
        grid: int = 4,
        terms: Sequence[str] = LCC_TERMS,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        reduction: str = "sum",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.grid, self.terms, self.weights = grid, tuple(terms), tuple(weights)
        self.reduction, self.backend = reduction, backend

    def forward(self, f_s: Tensor, f_t: Tensor, mask: Tensor | None = None) -> Tensor:
        return functional.local_correlation_loss(
            f_s, f_t, self.grid, self.terms, self.weights, mask, self.reduction, self.backend
        )


class ClassAwareAttention(nn.Module):
    """LCC's class-aware attention **(reading of a secondary summary)**: a spatial mask of the
    class-relevant regions of a teacher feature map.

    ``mask, ce = ClassAwareAttention(C, K)(f_t, labels)``: a mask generator on ``f_t`` (B, C, H, W)
    (``layers`` conv-BN-ReLU layers of ``width`` channels and a ``kernel_size`` square kernel, then
    a 1-channel 1x1 conv and a sigmoid) gives ``m`` (B, 1, H, W); an auxiliary linear classifier
    on ``GAP(m * f_t)`` gives ``ce = cross_entropy(classifier(GAP(m * f_t)), labels)``, which
    trains the generator to highlight the regions that identify the class. The returned mask is
    ``m`` with values below ``threshold`` set to 0 (``threshold=0`` keeps every value), detached:
    it weights the LCC descriptors of both networks and learns only through ``ce`` (the auxiliary
    classifier sees the soft, unthresholded ``m``).

    The LCC paper's text was not available: the architecture above is the project's reading of a
    summary, and every knob (depth, width, kernel size, threshold) is a constructor argument.
    ``width=None`` means ``max(in_channels // 4, 16)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        layers: int = 2,
        width: int | None = None,
        kernel_size: int = 3,
        threshold: float = 0.0,
    ) -> None:
        super().__init__()
        width = max(in_channels // 4, 16) if width is None else width
        if in_channels < 1 or num_classes < 2 or layers < 0 or width < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"ClassAwareAttention needs in_channels >= 1, num_classes >= 2, layers >= 0, width >= 1 "
                f"and an odd kernel_size, got in_channels={in_channels}, num_classes={num_classes}, "
                f"layers={layers}, width={width}, kernel_size={kernel_size}"
            )
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(layers):
            blocks += [
                nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        blocks.append(nn.Conv2d(channels, 1, kernel_size=1))
        self.generator = nn.Sequential(*blocks)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.threshold = threshold

    def forward(self, f_t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The detached (B, 1, H, W) mask and the auxiliary classifier's cross-entropy (a scalar)."""
        m = torch.sigmoid(self.generator(f_t))
        ce = F.cross_entropy(self.classifier((m * f_t).mean(dim=(2, 3))), labels)
        mask = m.detach()
        if self.threshold > 0:
            mask = mask.masked_fill(mask < self.threshold, 0.0)
        return mask, ce

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class SPLoss(_FusedLoss):
    """Similarity-preserving loss ``||G_s - G_t||_F^2 / B^2``; see :func:`kdfast.functional.sp_loss`."""

    _options = ("backend",)

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return functional.sp_loss(f_s, f_t, self.backend)


class RKDLoss(_FusedLoss):
    """Relational KD loss ``distance_weight * L_dist + angle_weight * L_angle``; see
    :func:`kdfast.functional.rkd_loss`."""

    _options = ("distance_weight", "angle_weight", "reduction", "backend")

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, reduction: str = "sum", backend: str | None = None
    ) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight, self.reduction, self.backend = distance_weight, angle_weight, reduction, backend

    def forward(self, e_s: Tensor, e_t: Tensor) -> Tensor:
        return functional.rkd_loss(e_s, e_t, self.distance_weight, self.angle_weight, self.reduction, self.backend)


class NDAMLoss(_FusedLoss):
    """LAKD's local loss ``feature_weight * feat_l + map_weight * map_l`` per module (feature MSE of
    the connector output, NDAM distance); see :func:`kdfast.functional.ndam_loss`.

    ``NDAMLoss(grid=4)(f_s, h_s, f_t)`` with one module's maps or lists of them.
    """

    _options = ("grid", "feature_weight", "map_weight", "weighting", "reduction", "backend")

    def __init__(
        self,
        grid: int = 4,
        feature_weight: float = 1.0,
        map_weight: float = 1.0,
        weighting: str = "none",
        reduction: str = "sum",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.grid, self.feature_weight, self.map_weight = grid, feature_weight, map_weight
        self.weighting, self.reduction, self.backend = weighting, reduction, backend

    def forward(self, f_s: Tensor | Sequence[Tensor], h_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]) -> Tensor:
        return functional.ndam_loss(
            f_s, h_s, f_t, self.grid, self.feature_weight, self.map_weight, self.weighting, self.reduction, self.backend
        )


class AFTLoss(_FusedLoss):
    """AFT-KD's loss ``attention_weight * MSE(attention blocks) + feature_weight * MSE(feature blocks)``
    per stage; see :func:`kdfast.functional.aft_loss`.

    ``AFTLoss(grid=4)(f_s, h_s, f_t)`` with one stage's maps or lists of them.
    """

    _options = ("grid", "attention_weight", "feature_weight", "reduction", "backend")

    def __init__(
        self,
        grid: int = 4,
        attention_weight: float = 1.0,
        feature_weight: float = 1.0,
        reduction: str = "sum",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.grid, self.attention_weight, self.feature_weight = grid, attention_weight, feature_weight
        self.reduction, self.backend = reduction, backend

    def forward(self, f_s: Tensor | Sequence[Tensor], h_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]) -> Tensor:
        return functional.aft_loss(
            f_s, h_s, f_t, self.grid, self.attention_weight, self.feature_weight, self.reduction, self.backend
        )


class MaskedMSELoss(_FusedLoss):
    """SoKD's masked feature loss ``sum (m * (x - y))^2 / denom``; see :func:`kdfast.functional.masked_mse`.

    ``MaskedMSELoss(reduction="mean")(x, y, mask)``.
    """

    _options = ("reduction", "backend")

    def __init__(self, reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        return functional.masked_mse(x, y, mask, self.reduction, self.backend)


class HCLLoss(_FusedLoss):
    """ReviewKD's hierarchical context loss; see :func:`kdfast.functional.hcl_loss`.

    ``HCLLoss(levels=(4, 2, 1))(f_s, f_t)`` with one (B, C, H, W) pair or lists of stage pairs.
    """

    _options = ("levels", "reduction", "backend")

    def __init__(self, levels: Sequence[int] = (4, 2, 1), reduction: str = "sum", backend: str | None = None) -> None:
        super().__init__()
        self.levels, self.reduction, self.backend = tuple(levels), reduction, backend

    def forward(self, f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]) -> Tensor:
        return functional.hcl_loss(f_s, f_t, self.levels, self.reduction, self.backend)


class MapDistanceLoss(_FusedLoss):
    """AFD's / RTK's attention-weighted map distances ``(1/B) sum_{b,t,s} att * dist``; see
    :func:`kdfast.functional.map_distance_loss`.

    ``MapDistanceLoss(pool="map")(f_s, f_t, att)`` with the lists of student and teacher maps and the
    (B, T, S) attention weights (the attention heads are the distiller's, not part of this module).
    """

    _options = ("pool", "backend")

    def __init__(self, pool: str = "map", backend: str | None = None) -> None:
        super().__init__()
        self.pool, self.backend = pool, backend

    def forward(self, f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor], att: Tensor) -> Tensor:
        return functional.map_distance_loss(f_s, f_t, att, self.pool, self.backend)


class CRDLoss(_FusedLoss):
    """CRD's contrastive (NCE) loss of embeddings against a memory bank; see :func:`kdfast.functional.crd_loss`.

    ``CRDLoss(temperature=0.07)(emb, bank, idx, z)``: one side (the memory banks, their update and
    ``z`` are the caller's: :class:`kdfast.distillers.crd.CRD` holds them).
    """

    _options = ("temperature", "backend")

    def __init__(self, temperature: float = 0.07, backend: str | None = None) -> None:
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor | float) -> Tensor:
        return functional.crd_loss(emb, bank, idx, z, self.temperature, self.backend)
