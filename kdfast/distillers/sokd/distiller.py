"""SoKD (Shen et al., ACM MM 2024): student-oriented KD as a wrapper around a feature method.

A **reading** of summaries and of code that is probably the authors' (../shared/METHODS.md), every
knob a config key. On the base method's hint stage, with ``fs``, ``ft`` the student's and the
teacher's maps, ``phi`` the base's connector and ``s`` the DAFA augmentation (:mod:`.dafa`)::

    h_s, h_t = head(phi(fs)), head(s(ft))             # DAM's shared head (:mod:`.dam`)
    M = union of the top-k peak boxes of (h_s + h_t) / 2   (no gradient)
    L_D  = mean (h_s - h_t)^2
    L_DA = the base's feature loss restricted to M      (:mod:`.bases`)
    losses = {"ce": ce_weight * CE, <the base's logit terms>, "sokd_d": d_weight * L_D,
              "sokd_da": da_weight * L_DA}

(``d_weight = da_weight = 1000`` for resnet32x4 -> resnet8x4.) ``phi`` is the base's connector
(FitNet), else the identity where the student's hint has the teacher's shape, else a ConvReg
(FitNet's connector class) SoKD adds for the DAM head; the head, that connector and the base's
extras are trained by the engine's SGD with the student.

DAFA's parameters are trained **first-order** (METHODS.md allows "one-step unrolled or
first-order"; this is the first-order choice): they receive the gradient of the same student
objective through ``s(ft)``, and :meth:`SoKD.after_step` steps their own Adam (``aug_lr``,
``aug_betas``) while ``epoch <= aug_epochs``, after which they are frozen (DAFA keeps augmenting
with them). :meth:`SoKD.sgd_parameters` excludes them; the Adam state travels in the distiller's
``state_dict``, so a resume is exact. DAFA stays in every graph even when frozen, so DDP always
sees its parameters used. One sub-policy is drawn per step, which reads the drawn index on the
host (one device sync per step).

The student module is shared with the wrapped base distiller (``self.base``), so it appears under
both ``student.`` and ``base.student.`` in the state_dict (PyTorch's usual layout of a shared
module; ``torch.save`` stores its tensors once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.distillers.base import Distiller, Params, feature_shapes
from kdfast.distillers.fitnet import ConvReg
from kdfast.distillers.sokd.bases import BASES
from kdfast.distillers.sokd.dafa import DAFA, OPS
from kdfast.distillers.sokd.dam import PEAK_SOURCES, DAMHead, mutual_interest_mask
from kdfast.models import Features, KDModel
from kdfast.reference.masked_mse import REDUCTIONS

__all__ = ["SoKD", "SoKDParams"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SoKDParams(Params):
    ce_weight: float = 1.0
    base: str = "fitnet"  # the wrapped method: fitnet, at or lcc
    base_params: dict[str, Any] = field(default_factory=dict)  # the base method's own params (not its ce/feature weights)
    stage: int | None = None  # hint stage of a base without one (AT; None: -1); FitNet/LCC take theirs from base_params
    d_weight: float = 1000.0  # w_D
    da_weight: float = 1000.0  # w_DA
    da_reduction: str = "mean"  # masked_mse denominator (FitNet, AT): mean, masked_mean or sum
    ops: list[str] = field(default_factory=lambda: list(OPS))  # DAFA ops; sub-policies = every pair
    op_ranges: dict[str, float] = field(default_factory=dict)  # overrides of dafa.OP_RANGES
    gumbel_temperature: float = 0.5
    bernoulli_temperature: float = 0.5
    aug_lr: float = 3e-4
    aug_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    aug_epochs: int = 50  # DAFA trained while epoch <= aug_epochs, frozen after
    dam_width: int = 64  # channels of the DAM head's 3x3 conv
    top_k: int = 8  # peaks (boxes) per image
    peaks_from: str = "mean"  # heatmap the peaks come from: mean (of both networks), teacher or student

    def __post_init__(self) -> None:
        from kdfast.distillers import make_params  # the registry imports this module

        if self.base not in BASES:
            raise ValueError(f"SoKD base must be one of {', '.join(BASES)}, got {self.base!r}")
        if not isinstance(self.base_params, Mapping):
            raise TypeError(f"SoKD base_params must be a mapping of {self.base}'s params, got {type(self.base_params).__name__}")
        adapter = BASES[self.base]
        replaced = sorted(set(self.base_params) & set(adapter.replaced_keys))
        if replaced:
            raise ValueError(f"SoKD base_params must not set {', '.join(replaced)}: SoKD's ce_weight and da_weight replace them")
        make_params(self.base, self.base_params)
        if self.stage is not None and (not adapter.uses_sokd_stage or not _is_int(self.stage)):
            raise ValueError(
                f"SoKD stage is only for the AT base (an int); {self.base}'s hint stage is in base_params, got {self.stage!r}"
            )
        for name in ("ce_weight", "d_weight", "da_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SoKD {name} must be a finite number, got {value!r}")
        if self.da_reduction not in REDUCTIONS:
            raise ValueError(f"SoKD da_reduction must be one of {REDUCTIONS}, got {self.da_reduction!r}")
        if self.peaks_from not in PEAK_SOURCES:
            raise ValueError(f"SoKD peaks_from must be one of {PEAK_SOURCES}, got {self.peaks_from!r}")
        for name in ("top_k", "dam_width"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"SoKD {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not _is_int(self.aug_epochs) or self.aug_epochs < 0:
            raise ValueError(f"SoKD aug_epochs must be an integer >= 0, got {self.aug_epochs!r}")
        if len(self.aug_betas) != 2 or not all(0 <= b < 1 for b in self.aug_betas):
            raise ValueError(f"SoKD aug_betas must be two numbers in [0, 1), got {self.aug_betas!r}")


class SoKD(Distiller):
    """``{"ce", <base logit terms>, "sokd_d", "sokd_da"}``; owns the base distiller, DAFA and the DAM head."""

    params_class = SoKDParams

    def __init__(self, student: KDModel, teacher: KDModel, params: SoKDParams, image_size: int = 32) -> None:
        from kdfast.distillers import make_params

        super().__init__(student, teacher, params, image_size)
        self.adapter = BASES[params.base]
        self.base = self.adapter.distiller(student, teacher, make_params(params.base, params.base_params), image_size)
        self.stage = self.adapter.stage(self.base, params.stage)
        s_shapes, t_shapes = feature_shapes(student, image_size), feature_shapes(teacher, image_size)
        depth = min(len(s_shapes), len(t_shapes))
        if not -depth <= self.stage < depth:
            raise ValueError(f"SoKD hint stage {self.stage} out of range: student and teacher have {depth} stages in common")
        s_shape, t_shape = tuple(s_shapes[self.stage]), tuple(t_shapes[self.stage])
        # phi: the base's connector; else SoKD's own (for the DAM head) where the shapes differ
        self.dam_connector = None
        if self.adapter.connector(self.base) is None and s_shape != t_shape:
            self.dam_connector = ConvReg(s_shape, t_shape)
        self.dafa = DAFA(
            params.ops, params.gumbel_temperature, params.bernoulli_temperature, params.aug_lr, params.aug_betas, params.op_ranges
        )
        self.dam = DAMHead(t_shape[0], params.dam_width)

    def _heads(self, student: Features, teacher: Features) -> tuple[Tensor, Tensor, Tensor]:
        """``phi(fs)``, ``s(ft)`` and the DAM head's outputs on both, stacked: (phi(fs), s(ft), [h_s; h_t])."""
        phi = self.adapter.connector(self.base)
        phi = self.dam_connector if phi is None else phi
        hint = student.stages[self.stage] if phi is None else phi(student.stages[self.stage])
        # the teacher's features are inference tensors, which autograd cannot save: clone
        refined = self.dafa(teacher.stages[self.stage].float().clone())
        return hint, refined, self.dam(torch.cat([hint, refined.to(hint.dtype)]))

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        hint, refined, heads = self._heads(student, teacher)
        out_s, out_t = heads.float().chunk(2)
        mask = mutual_interest_mask(out_s, out_t, p.top_k, p.peaks_from)
        l_da, extra = self.adapter.losses(self.base, self.stage, student, teacher, hint, refined, mask, labels, p.da_reduction)
        return {**extra, "sokd_d": p.d_weight * F.mse_loss(out_s, out_t), "sokd_da": p.da_weight * l_da}

    def sgd_parameters(self) -> list[nn.Parameter]:
        """Every parameter but DAFA's (trained by its own Adam in :meth:`after_step`)."""
        own = {id(q) for q in self.dafa.parameters()}
        return [q for q in self.parameters() if id(q) not in own]

    def after_step(self, epoch: int) -> None:
        """Step DAFA's Adam while ``epoch <= aug_epochs``; clear its gradients every step."""
        self.dafa.step(update=epoch <= self.params.aug_epochs)

    @torch.no_grad()
    def inspect(self, images: Tensor, labels: Tensor, teacher: Features | None) -> dict[str, Tensor]:
        """The area of mutual interest M and the DAM heatmaps of both networks, each (N, H, W)."""
        _, _, heads = self._heads(self.student.features(images), teacher)
        out_s, out_t = heads.float().chunk(2)
        return {
            "mutual interest M": mutual_interest_mask(out_s, out_t, self.params.top_k, self.params.peaks_from),
            "student heatmap": out_s[:, 0],
            "teacher heatmap": out_t[:, 0],
        }
