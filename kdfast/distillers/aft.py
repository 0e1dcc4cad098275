"""AFT-KD (Yang et al., Sci. Rep. 13:18369, 2023): attention and feature blocks with adaptive weights.

The paper's full text was not available: this is the project's **reading** of its abstract and of
public summaries (``../shared/METHODS.md``); every knob is a config key. Per chosen stage ``i``
(an index into :attr:`Features.stages`, the same for both networks), with ``c_i`` a 1x1 conv to
the teacher's channels (optionally followed by BatchNorm)::

    L_i = attention_weight * mean (A(fs_i) - A(ft_i))^2                 attention blocks
        + feature_weight   * mean (pool_b(c_i(fs_i)) - pool_b(ft_i))^2   feature blocks
    A(f) = normalize(flatten(pool_b(mean_c f^2)))                        b = grid

(``functional.aft_loss``, all stages in one fused launch), and the losses
``{"ce": ce_weight * CE, "kd": kd_weight * kd_loss(zs, zt, T), "aft_stage<i>": w_i * L_i}`` ("kd"
only when ``kd_weight != 0``), one named loss per stage so that each is logged and plotted.
The adaptive weights ``w_i = n * softmax(r_i / tau)`` with ``r_i = L_i(e-1) / L_i(e-2)`` over
epoch means (``w_i = 1`` in epochs 1 and 2) come from :class:`LossRateWeights`; its state is in
this distiller's ``state_dict``, so a resumed run continues exactly.

Defaults (the project's choices; the paper's values were not available):

* ``stages=None``: every stage after the stem, the stages AT transfers (mdistiller's ``feats[1:]``);
* ``grid=4`` (b = 4 blocks per side, METHODS.md), ``tau=2``, adaptive weights on;
* ``ce_weight=1``, ``kd_weight=0``: the abstract presents AFT-KD as attention plus feature transfer,
  without a logit term; KD (``kd_weight``, ``temperature``) can be added;
* ``attention_weight=1000``: AT's weight for the same kind of normalised-map MSE; ``feature_weight=1``:
  on resnet32x4 -> resnet8x4 with untrained networks (random images, batch-statistics BatchNorm)
  CE, the weighted attention terms and the feature terms then start on one scale (about 4.7, 3.3
  and 7.1 over the three stages) and all fell steadily over 25 SGD steps at lr 0.05;
* ``connector_bn=False``: the connector is the 1x1 conv of METHODS.md. In the same probe a
  conv-only connector diverged with ``feature_weight=100``, while conv + BN trained: use
  ``connector_bn: true`` before raising ``feature_weight`` far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional
from kdfast.distillers.adaptive import LossRateWeights
from kdfast.distillers.base import Distiller, Params, check_int, is_stage_list
from kdfast.models import Features, KDModel
from kdfast.numerics.block_attention import block_map

__all__ = ["AFT", "AFTParams"]


@dataclass
class AFTParams(Params):
    ce_weight: float = 1.0
    kd_weight: float = 0.0  # 0 drops the KD term
    temperature: float = 4.0
    stages: list[int] | None = None  # indices into Features.stages (negative from the end); None: all after the stem
    grid: int = 4  # b: attention and feature maps are average-pooled to b x b blocks
    attention_weight: float = 1000.0
    feature_weight: float = 1.0
    connector_bn: bool = False  # BatchNorm after the connector's 1x1 conv
    adaptive: bool = True  # loss-rate weights w_i; False: w_i = 1 throughout
    tau: float = 2.0  # softmax temperature of the adaptive weights

    def __post_init__(self) -> None:
        if self.stages is not None and not is_stage_list(self.stages):
            raise ValueError(f"stages must be null or a non-empty list of stage indices, got {self.stages!r}")
        check_int("grid", self.grid)
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")


class AFT(Distiller):
    """``{"ce", "kd", "aft_stage<i>" per chosen stage}``; owns one connector per stage and the
    adaptive weights (``self.stage_weights``, None with ``adaptive=False``)."""

    params_class = AFTParams
    params: AFTParams

    def __init__(self, student: KDModel, teacher: KDModel, params: AFTParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        depth = min(len(student.stage_channels), len(teacher.stage_channels))
        chosen = params.stages if params.stages is not None else range(1, depth)
        bad = [s for s in chosen if not -depth <= s < depth]
        if bad:
            raise ValueError(
                f"AFT stages {bad} out of range: student and teacher have {depth} stages in common "
                f"(valid indices {-depth}..{depth - 1})"
            )
        self.stage_indices = [s % depth for s in chosen]
        if len(set(self.stage_indices)) != len(self.stage_indices):
            raise ValueError(f"AFT stages must name distinct stages, got {list(chosen)} ({depth} stages)")
        self.connectors = nn.ModuleList(
            _connector(student.stage_channels[s], teacher.stage_channels[s], params.connector_bn) for s in self.stage_indices
        )
        self.stage_weights = LossRateWeights(len(self.stage_indices), params.tau) if params.adaptive else None

    def _stage_maps(self, student: Features, teacher: Features) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Student maps, their connector outputs (in the student's dtype) and the teacher maps."""
        f_s = [student.stages[s] for s in self.stage_indices]
        h_s = [c(f).to(f.dtype) for c, f in zip(self.connectors, f_s)]
        return f_s, h_s, [teacher.stages[s] for s in self.stage_indices]

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        losses = {}
        if p.kd_weight:
            losses["kd"] = p.kd_weight * functional.kd_loss(student.logits, teacher.logits, p.temperature)
        stage_losses = functional.aft_loss(
            *self._stage_maps(student, teacher),
            grid=p.grid,
            attention_weight=p.attention_weight,
            feature_weight=p.feature_weight,
            reduction="none",
        )
        weights = (
            self.stage_weights(stage_losses, epoch, labels.numel())
            if self.stage_weights is not None
            else torch.ones_like(stage_losses)
        )
        losses.update({f"aft_stage{s}": w * loss for s, w, loss in zip(self.stage_indices, weights, stage_losses)})
        return losses

    @torch.no_grad()
    def inspect(self, images: Tensor, labels: Tensor, teacher: Features | None) -> dict[str, Tensor]:
        """Per chosen stage, (N, b, b) maps: the teacher's and the student's attention blocks
        ``A(f)`` and the feature-block error ``mean_c (pool_b(c(fs)) - pool_b(ft))^2``."""
        b = self.params.grid
        f_s, h_s, f_t = self._stage_maps(self.student.features(images), self.require_teacher(teacher))
        maps = {}
        for s, fs, hs, ft in zip(self.stage_indices, f_s, h_s, f_t):
            maps[f"stage {s} teacher attention"] = block_map(ft, b, 2.0).view(-1, b, b).float()
            maps[f"stage {s} student attention"] = block_map(fs, b, 2.0).view(-1, b, b).float()
            error = F.adaptive_avg_pool2d(hs.float(), b) - F.adaptive_avg_pool2d(ft.float(), b)
            maps[f"stage {s} feature-block error"] = error.pow(2).mean(1)
        return maps


def _connector(s_channels: int, t_channels: int, batch_norm: bool) -> nn.Sequential:
    """1x1 conv from the student's to the teacher's channels (bias-free when BatchNorm follows)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=not batch_norm)
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels)) if batch_norm else nn.Sequential(conv)
