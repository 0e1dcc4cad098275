"""LAKD, local attention KD (Zhang et al. 2024, arXiv 2408.11478), as ../shared/METHODS.md reads it.

The paper's full text was not available: separation-decoupling, the non-directional activation map
(NDAM) and the progressive schedule below are the project's **reading** of its abstract and of
public summaries. Every knob is a config key; the defaults are the project's choice.

The student is split into L local modules at its stage boundaries (:class:`LocalModules`, module l
ending at ``Features.stages[boundaries[l]]``, the head in the last one); module l receives its
predecessor's output detached and learns only from its local loss::

    loss_l = beta * feat_l + (1 - alpha_e) * map_scale * map_l          (functional.ndam_loss)
    feat_l = MSE(c_l(fs_l), ft_l)      c_l = 1x1 conv + BN to the teacher's channels, optionally
                                       weighted per position by the teacher's NDAM (weighting="teacher")
    map_l  = mean (A(fs_l) - A(ft_l))^2,   A(f) = normalize(flatten(pool_g(mean_c |f|)))  (NDAM)

with ``ft_l = teacher.stages[boundaries[l]]``; the last module adds
``ce_weight * alpha_e * CE(zs, y) + kd_weight * KD(zs, zt, T)``. Progressive training from simple to
complex: ``alpha_e = alpha * min((e - 1) / warmup_epochs, 1)`` at epoch e (counted from 1) ramps
linearly from 0 in the first epoch to ``alpha`` from epoch ``warmup_epochs + 1`` on (``alpha`` from
the start when ``warmup_epochs`` is 0), so the modules first follow the teacher's attention maps,
then the labels.

Losses (each logged and plotted by the engine): ``"ce"``, ``"kd"`` (unless ``kd_weight`` is 0) and
``"lakd.module1"`` ... ``"lakd.module<L>"`` (``loss_l`` above). ``mode`` chooses the execution
(:mod:`kdfast.distillers.local`, same gradients): ``"local"`` backpropagates each module's losses
as soon as they are known (one ``ndam_loss`` call per module), freeing the module's activations
before the next one runs: the memory saving the paper reports. Forward then returns detached
losses and :attr:`backward_done` is True, so the engine refuses it under DistributedDataParallel
and torch.compile. ``"joint"`` returns the losses of all modules, computed in one fused
``ndam_loss`` call, for the engine's single backward (DDP works); ``"end_to_end"`` is the same
without the detach between modules (ordinary distillation with LAKD's losses, for comparison).

Defaults (the project's choice; the paper's values were not available):

* ``boundaries=None``: one module per stage after the stem (the stem joins the first module), i.e.
  three modules on the CIFAR ResNets and WRNs, four on VGG and the ImageNet ResNets;
* ``grid=4`` (METHODS.md), ``weighting="none"`` (the MSE of METHODS.md's formula);
* ``alpha=0.9``, ``warmup_epochs=20``: the CE weight ends at 0.9 (KD's 0.1 CE + 0.9 KD split the
  other way round: the labels dominate at the end, as the schedule intends) and the map keeps a
  tenth of its weight instead of vanishing; the 20-epoch ramp is the project's DKD warm-up (the
  ImageNet config ramps over 10 of its 100 epochs);
* ``beta=1``, ``map_scale=1000``: with BN-normalised random networks the feature MSE of a module is
  about 1.5 to 9 on the shipped pairs (the scale of CE on 100 classes, about 4.6) and the NDAM
  distance about 2e-4 to 1e-3, so 1000 (AT's weight for its own normalised maps) starts the map term
  near 0.2 to 1;
* ``kd_weight=1``, ``temperature=4`` (the formula's ``+ KD`` at CIFAR's temperature; the ImageNet
  config uses T=1 like the project's ImageNet KD config), ``ce_weight=1`` (the formula's
  ``alpha_e * CE``);
* ``mode="local"`` (the method as published; the ImageNet config, meant for torchrun, uses "joint").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast import functional
from kdfast.distillers.base import Distiller, Params
from kdfast.distillers.local import MODES, LocalModules, ModuleOutput, stage_boundaries
from kdfast.models import Features, KDModel

__all__ = ["LAKD", "LAKDParams", "WEIGHTINGS"]

WEIGHTINGS = ("none", "teacher")


@dataclass
class LAKDParams(Params):
    ce_weight: float = 1.0  # multiplies alpha_e * CE (1: the formula)
    alpha: float = 0.9  # final alpha, in [0, 1]
    warmup_epochs: int = 20  # E_warm: alpha ramps from 0 over these epochs (0: alpha from the start)
    beta: float = 1.0  # weight of every module's connector-feature MSE
    map_scale: float = 1000.0  # the NDAM term's weight is (1 - alpha_e) * map_scale
    kd_weight: float = 1.0  # 0 drops the KD term
    temperature: float = 4.0
    grid: int = 4  # g: NDAM maps are g x g
    weighting: str = "none"  # "none" or "teacher" (feature MSE weighted by the teacher's NDAM)
    boundaries: list[int] | None = None  # indices into Features.stages ending the modules; None: every stage after the stem
    mode: str = "local"  # "local", "joint" or "end_to_end"

    def __post_init__(self) -> None:
        for name in ("ce_weight", "beta", "map_scale", "kd_weight"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < math.inf, name, "a finite number >= 0", value)
        _require(_is_number(self.alpha) and 0 <= self.alpha <= 1, "alpha", "a number in [0, 1]", self.alpha)
        _require(
            _is_number(self.warmup_epochs, integer=True) and self.warmup_epochs >= 0,
            "warmup_epochs",
            "an integer >= 0",
            self.warmup_epochs,
        )
        _require(
            _is_number(self.temperature) and 0 < self.temperature < math.inf,
            "temperature",
            "a finite number > 0",
            self.temperature,
        )
        _require(_is_number(self.grid, integer=True) and self.grid >= 1, "grid", "an integer >= 1", self.grid)
        _require(self.weighting in WEIGHTINGS, "weighting", f"one of {', '.join(WEIGHTINGS)}", self.weighting)
        _require(self.mode in MODES, "mode", f"one of {', '.join(MODES)}", self.mode)
        _require(
            self.boundaries is None or isinstance(self.boundaries, (list, tuple)),
            "boundaries",
            "a list of stage indices or null",
            self.boundaries,
        )

    def alpha_at(self, epoch: int) -> float:
        """``alpha_e = alpha * min((epoch - 1) / warmup_epochs, 1)`` (epoch counts from 1)."""
        if self.warmup_epochs == 0:
            return float(self.alpha)
        return float(self.alpha) * min(max(epoch - 1, 0) / self.warmup_epochs, 1.0)


class LAKD(Distiller):
    """``{"ce", "kd", "lakd.module1", ..., "lakd.module<L>"}``; owns the :class:`LocalModules`
    (one connector per module) around the student."""

    params_class = LAKDParams
    params: LAKDParams

    def __init__(self, student: KDModel, teacher: KDModel, params: LAKDParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        self.local = LocalModules(student, _teacher_channels(student, teacher, params.boundaries), params.boundaries)

    @property
    def backward_done(self) -> bool:
        return self.params.mode == "local"

    def forward(self, images: Tensor, labels: Tensor, teacher: Features | None, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.require_teacher(teacher)

        def loss_fn(outputs: Sequence[ModuleOutput]) -> dict[str, Tensor]:
            return self.module_losses(outputs, features, labels, epoch)

        return self.local(images, loss_fn, self.params.mode)

    def module_losses(self, outputs: Sequence[ModuleOutput], teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """The named losses of the given modules: ``lakd.module<l>`` of each (one fused
        ``ndam_loss`` call for all of them), plus ``ce`` and ``kd`` if the last module is among them."""
        p = self.params
        alpha = p.alpha_at(epoch)
        targets = [teacher.stages[self.local.boundaries[out.index]] for out in outputs]
        local = functional.ndam_loss(
            [out.feature for out in outputs],
            [out.hint for out in outputs],
            targets,
            p.grid,
            feature_weight=p.beta,
            map_weight=(1.0 - alpha) * p.map_scale,
            weighting=p.weighting,
            reduction="none",
        )
        # modules first, then ce and kd: one order in every mode, so that the logged totals agree
        losses = {f"lakd.module{out.index + 1}": loss for out, loss in zip(outputs, local.unbind())}
        if outputs[-1].last:
            logits = outputs[-1].output
            losses["ce"] = p.ce_weight * alpha * F.cross_entropy(logits, labels)
            if p.kd_weight:
                losses["kd"] = p.kd_weight * functional.kd_loss(logits, teacher.logits, p.temperature)
        return losses

    @torch.no_grad()
    def inspect(self, images: Tensor, labels: Tensor, teacher: Features | None) -> dict[str, Tensor]:
        """The NDAM maps (``functional.ndam_map`` as (N, g, g)) of teacher and student at every
        module's boundary: ``"teacher module 1"``, ``"student module 1"``, ..."""
        g = self.params.grid
        nets = {"teacher": teacher, "student": self.student.features(images)}
        return {
            f"{name} module {i + 1}": functional.ndam_map(feats.stages[b], g).reshape(-1, g, g).float()
            for name, feats in nets.items()
            if feats is not None
            for i, b in enumerate(self.local.boundaries)
        }


def _teacher_channels(student: KDModel, teacher: KDModel, boundaries: list[int] | None) -> list[int]:
    """The teacher's channels at the student's module boundaries (the same stage indices)."""
    cuts = stage_boundaries(student, boundaries)
    if cuts[-1] >= len(teacher.stage_channels):
        raise ValueError(
            f"LAKD pairs module l with the teacher's stage boundaries[l]: {type(teacher).__name__} has "
            f"stages 0..{len(teacher.stage_channels) - 1}, the student's modules end at {cuts}"
        )
    return [teacher.stage_channels[b] for b in cuts]


def _is_number(value: object, integer: bool = False) -> bool:
    return not isinstance(value, bool) and isinstance(value, int if integer else (int, float))


def _require(ok: bool, name: str, what: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")
