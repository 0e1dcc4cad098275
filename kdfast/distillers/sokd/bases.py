"""How SoKD wraps each base method: its hint stage, its connector ``phi`` and its feature loss
restricted to the area of mutual interest M (``L_DA``), plus the base's other terms it keeps.

* FitNet: stage ``hint_layer``, ``phi`` its ConvReg connector,
  ``L_DA = masked_mse(phi(fs), s(ft), M)``.
* AT: stage SoKD's ``stage`` (default -1, the last one), ``phi`` the identity,
  ``L_DA = masked_mse(a(fs), a(s(ft)), M)`` on the (B, 1, H, W) normalized attention maps
  ``a = functional.attention_map`` of AT's ``p`` and mode (the student map average-pooled to
  the teacher's size first where it is larger).
* LCC: its single stage (``stages`` must hold one index), ``phi`` the identity,
  ``L_DA = local_correlation_loss(fs, s(ft), grid, terms, term_weights, mask=M)`` (times LCC's
  class-aware mask when its ``attention`` is on); it keeps its ``kd`` and ``lcc_attention`` terms
  at their base weights. LCC's op never sends a gradient to the teacher side, so under LCC the
  augmentation is trained by ``L_D`` alone.

* ReviewKD: stage SoKD's ``stage`` (default -1, the last stage; a stage after the stem), ``phi``
  SoKD's own ConvReg, ``L_DA = hcl_loss(ABF levels, teacher levels)`` over all of ReviewKD's levels
  (its ``levels`` pooling) where the hint stage's level compares the ABF output and the refined
  teacher feature ``s(ft)``, both times M (the base restricted to the area of mutual interest, as
  around LCC). *(reading)*: the refined level is DAFA of the teacher's stage output, as SoKD refines
  it for every base (ReviewKD itself reads the teacher's pre-activation stages); ReviewKD's warm-up
  ramp is not applied (``da_weight`` weighs ``L_DA`` from the first epoch); ``da_reduction`` does
  not apply (the HCL's own means).

The base's ``ce_weight`` and feature-loss weight are SoKD's (``ce_weight``, ``da_weight``): setting
them in ``base_params`` is an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional
from kdfast.distillers.at import AT
from kdfast.distillers.base import Distiller
from kdfast.distillers.fitnet import FitNet
from kdfast.distillers.lcc import LCC
from kdfast.distillers.reviewkd import ReviewKD, level_maps
from kdfast.distillers.sokd.dam import widen
from kdfast.models import Features
from kdfast.numerics.at import AT_MODES

__all__ = ["BaseAdapter", "BASES"]


class BaseAdapter(ABC):
    """The base-specific part of SoKD (stateless; the base distiller holds the trainable parts)."""

    distiller: ClassVar[type[Distiller]]
    replaced_keys: ClassVar[tuple[str, ...]]  # base params SoKD's own weights replace
    uses_sokd_stage: ClassVar[bool] = False  # the hint stage is SoKD's `stage`, not a base param

    @abstractmethod
    def stage(self, base: Distiller, stage: int | None) -> int:
        """The hint stage (an index into Features.stages)."""

    def connector(self, base: Distiller) -> nn.Module | None:
        """``phi``, the base's own connector from the student's hint to the teacher's (None: identity)."""
        return None

    @abstractmethod
    def losses(
        self,
        base: Distiller,
        stage: int,
        student: Features,
        teacher: Features,
        hint: Tensor,
        refined: Tensor,
        mask: Tensor,
        labels: Tensor,
        reduction: str,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_DA`` (unweighted) and the base's other weighted terms that SoKD keeps."""


class FitNetAdapter(BaseAdapter):
    distiller = FitNet
    replaced_keys = ("ce_weight", "feat_weight")

    def stage(self, base: Distiller, stage: int | None) -> int:
        assert isinstance(base, FitNet)
        return base.params.hint_layer

    def connector(self, base: Distiller) -> nn.Module | None:
        assert isinstance(base, FitNet)
        return base.connector

    def losses(self, base, stage, student, teacher, hint, refined, mask, labels, reduction):
        return functional.masked_mse(widen(hint), widen(refined), mask, reduction), {}


class SoKDStageAdapter(BaseAdapter):
    """A base without a hint stage of its own: the hint stage is SoKD's ``stage`` (default -1, the last one)."""

    uses_sokd_stage = True

    def stage(self, base: Distiller, stage: int | None) -> int:
        return -1 if stage is None else stage


class ATAdapter(SoKDStageAdapter):
    distiller = AT
    replaced_keys = ("ce_weight", "at_weight")

    def losses(self, base, stage, student, teacher, hint, refined, mask, labels, reduction):
        p = base.params
        f_s = student.stages[stage]
        if f_s.shape[2:] != refined.shape[2:]:
            f_s = F.adaptive_avg_pool2d(f_s, refined.shape[2:])
        map_mode = AT_MODES[p.mode][0]
        maps = [widen(functional.attention_map(f, p.p, map_mode)).view(f.shape[0], 1, *f.shape[2:]) for f in (f_s, refined)]
        return functional.masked_mse(maps[0], maps[1], mask, reduction), {}


class LCCAdapter(BaseAdapter):
    distiller = LCC
    replaced_keys = ("ce_weight", "lcc_weight")

    def stage(self, base: Distiller, stage: int | None) -> int:
        assert isinstance(base, LCC)
        if len(base.params.stages) != 1:
            raise ValueError(
                f"SoKD refines one hint stage: LCC's base_params.stages must hold one index, got {base.params.stages!r}"
            )
        return base.params.stages[0]

    def losses(self, base, stage, student, teacher, hint, refined, mask, labels, reduction):
        p = base.params
        extra = {}
        if p.kd_weight:
            extra["kd"] = p.kd_weight * functional.kd_loss(student.logits, teacher.logits, p.temperature)
        mask = mask.unsqueeze(1)
        if base.attention is not None:
            # the teacher's features are inference tensors, which a trained module cannot save for backward
            class_mask, ce = base.attention[0](teacher.stages[stage].clone(), labels)
            mask = mask * class_mask
            extra["lcc_attention"] = p.attention_weight * ce
        loss = functional.local_correlation_loss(
            student.stages[stage], refined, grid=p.grid, terms=tuple(p.terms), weights=tuple(p.term_weights), mask=mask
        )
        return loss, extra


class ReviewKDAdapter(SoKDStageAdapter):
    distiller = ReviewKD
    replaced_keys = ("ce_weight", "reviewkd_weight")

    def losses(self, base, stage, student, teacher, hint, refined, mask, labels, reduction):
        p = base.params
        level = stage % len(student.stages) - 1  # ReviewKD's levels: the stages after the stem, then the embedding
        if level < 0:
            raise ValueError(f"SoKD around ReviewKD refines a stage after the stem (stage >= 1 or < 0), got {stage}")
        fused = base.fused(student)
        targets = level_maps(teacher, p.teacher_preact)
        targets = [t if t.dtype == targets[0].dtype else t.to(targets[0].dtype) for t in targets]
        m = mask.unsqueeze(1)
        fused[level] = fused[level] * m.to(fused[level].dtype)
        targets[level] = refined.to(targets[0].dtype) * m.to(targets[0].dtype)
        return functional.hcl_loss(fused, targets, p.levels), {}


BASES: dict[str, BaseAdapter] = {
    "fitnet": FitNetAdapter(),
    "at": ATAdapter(),
    "lcc": LCCAdapter(),
    "reviewkd": ReviewKDAdapter(),
}
