"""SoKD (Shen et al., ACM MM 2024): student-oriented KD as a wrapper around a feature method.

As ../shared/METHODS.md (SoKD) describes the code of the first author's DFKD distiller (FitNet as
the base is exactly that code; around AT and LCC the base's loss is restricted to M). On the hint
stage, with ``fs``, ``ft`` the student's and the teacher's maps, ``phi`` = ConvReg (the FitNet
base's connector, else SoKD's own) then two 3x3 conv-BN-ReLU, ``s`` DAFA (:mod:`.dafa`)::

    h_s, h_t = head(phi(fs)), head(s(ft))          (DAM's shared head, :mod:`.dam`)
    M    = sum of the top-k peak boxes of h_s       (the student's heatmap; no gradient)
    L_D  = MSE(h_s, h_t)
    L_DA = the base's feature loss restricted to M   (FitNet: MSE(phi(fs) M, s(ft) M), :mod:`.bases`)
    losses = {"ce": ce_weight CE, <the base's logit terms>, "sokd_d": d_weight L_D, "sokd_da": da_weight L_DA}

(``d_weight = da_weight = 1000``.) The head, ``phi`` and the base's extras are trained by the
engine's SGD with the student; DAFA's parameters by their own Adam (lr 3e-4, betas (0.5, 0.999),
weight decay 1e-3) while ``epoch <= aug_epochs``, then frozen (DAFA keeps augmenting with them).

**Second-order search** (``search_order: 2``, the code's): one outer step per batch inside
:meth:`SoKD.forward`, before the student's losses. With ``theta`` the SGD-trained parameters,
``L(theta, d)`` the total student loss on the batch under the DAFA draw ``d`` and ``L_0`` the same
loss without augmentation (``s`` = identity)::

    theta' = theta - lr (mu buf + grad_theta L(theta, d) + wd theta)        (DARTS' virtual step)
    v      = grad_theta' L_0(theta'),   r = 0.01 / ||v||,   theta+- = theta +- r v
    grad_m     = -lr (grad_m L(theta+, d) - grad_m L(theta-, d)) / (2 r)     (autograd)
    grad_(p,a) = -lr (L(theta+, d) - L(theta-, d)) / (2 r) grad_(p,a) log P(d | p, alpha)

The last line is RELAX's estimate ``(f(b) - c(z~)) grad log P(b) + grad c(z) - grad c(z~)``
applied to the finite difference: both points share the draw and the ops' random numbers
(common random numbers, without which the difference of two estimates divided by 2r would be
noise), so every control-variate term cancels exactly and only the score term remains. ``L_0``
does not depend on DAFA, so the virtual step's gradient is the whole of DARTS' outer gradient.
``lr``, ``mu`` and ``wd`` are the student's SGD recipe (``virtual_lr``, ``virtual_momentum``,
``virtual_weight_decay``: the config's ``optim`` values, which the distiller does not see); ``lr
buf`` is read from the parameters' change since the previous batch (``theta_prev - theta``,
exactly ``lr buf`` for SGD at a constant lr, which the search epochs have), kept in the state_dict
for an exact resume. The extra forwards leave the buffers (BatchNorm statistics) as they found
them. Under torch.distributed the outer gradients are averaged over processes.

**First-order search** (``search_order: 1``): DAFA receives the gradient of the student
objective itself through the straight-through samples and magnitudes, and :meth:`SoKD.after_step`
steps its Adam.

One sub-policy is drawn per batch, and reading its index is one host sync per forward; M is
computed on the device without host syncs. The student module is shared with the wrapped base
distiller (``self.base``), so it appears under both ``student.`` and ``base.student.`` in the
state_dict (``torch.save`` stores its tensors once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.distillers.base import Distiller, Params, feature_shapes
from kdfast.distillers.fitnet import ConvReg
from kdfast.distillers.sokd.bases import BASES
from kdfast.distillers.sokd.dafa import DAFA, Draw
from kdfast.distillers.sokd.dam import DAMHead, mutual_interest_mask
from kdfast.models import Features, KDModel
from kdfast.reference.masked_mse import REDUCTIONS

__all__ = ["SoKD", "SoKDParams"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SoKDParams(Params):
    ce_weight: float = 1.0
    base: str = "fitnet"  # the wrapped method: fitnet, at or lcc
    base_params: dict[str, Any] = field(default_factory=dict)  # the base method's own params (not its ce/feature weights)
    stage: int | None = None  # hint stage of a base without one (AT; None: -1); FitNet/LCC take theirs from base_params
    d_weight: float = 1000.0  # w_D
    da_weight: float = 1000.0  # w_DA
    da_reduction: str = "mean"  # masked_mse denominator (FitNet, AT): mean, masked_mean or sum
    temperature: float = 0.5  # of DAFA's relaxed Bernoulli and Gumbel-softmax
    aug_lr: float = 3e-4
    aug_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    aug_weight_decay: float = 1e-3
    aug_epochs: int = 50  # DAFA searched while epoch <= aug_epochs, frozen after
    search_order: int = 2  # 2: DARTS second-order outer step (the code's); 1: first-order
    virtual_lr: float = 0.05  # the student's SGD recipe, for the virtual step (optim.lr, momentum, weight_decay)
    virtual_momentum: float = 0.9
    virtual_weight_decay: float = 5e-4
    hvp_r: float = 0.01  # finite-difference step r = hvp_r / ||v||
    dam_width: int = 64  # channels of each DAM branch's 3x3 conv
    top_k: int = 8  # peaks (boxes) per image

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
        for name in ("ce_weight", "d_weight", "da_weight", "virtual_momentum", "virtual_weight_decay", "aug_weight_decay"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"SoKD {name} must be a finite number, got {getattr(self, name)!r}")
        for name in ("temperature", "aug_lr", "virtual_lr", "hvp_r"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"SoKD {name} must be a number > 0, got {getattr(self, name)!r}")
        if self.da_reduction not in REDUCTIONS:
            raise ValueError(f"SoKD da_reduction must be one of {REDUCTIONS}, got {self.da_reduction!r}")
        if self.search_order not in (1, 2) or not _is_int(self.search_order):
            raise ValueError(f"SoKD search_order must be 1 or 2, got {self.search_order!r}")
        for name in ("top_k", "dam_width"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"SoKD {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not _is_int(self.aug_epochs) or self.aug_epochs < 0:
            raise ValueError(f"SoKD aug_epochs must be an integer >= 0, got {self.aug_epochs!r}")
        if len(self.aug_betas) != 2 or not all(0 <= b < 1 for b in self.aug_betas):
            raise ValueError(f"SoKD aug_betas must be two numbers in [0, 1), got {self.aug_betas!r}")


def _conv_bn_relu(channels: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class SoKD(Distiller):
    """``{"ce", <base logit terms>, "sokd_d", "sokd_da"}``; owns the base distiller, ``phi``, DAFA and the DAM head."""

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
        # phi = ConvReg (the base's connector, else SoKD's own) then two 3x3 conv-BN-ReLU
        self.own_connector = ConvReg(s_shape, t_shape) if self.adapter.connector(self.base) is None else None
        self.refine = nn.Sequential(*_conv_bn_relu(t_shape[0]), *_conv_bn_relu(t_shape[0]))
        self.dafa = DAFA(params.temperature, params.aug_lr, params.aug_betas, params.aug_weight_decay)
        with torch.no_grad():
            was_training = student.training
            num_classes = student.eval().features(torch.zeros(1, 3, image_size, image_size)).logits.shape[1]
            student.train(was_training)
        self.dam = DAMHead(t_shape[0], num_classes, params.dam_width)
        self.previous: list[Tensor] = []  # the SGD-trained parameters at the previous outer step

    def phi(self, f_s: Tensor) -> Tensor:
        """``phi(fs)``: ConvReg, then two 3x3 conv-BN-ReLU."""
        connector = self.adapter.connector(self.base)
        connector = self.own_connector if connector is None else connector
        return self.refine(connector(f_s))

    def _heads(self, student: Features, teacher: Features, draw: Draw | None, augment: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(phi(fs), s(ft) (ft when not `augment`), [head(phi(fs)); head(s(ft))])."""
        hint = self.phi(student.stages[self.stage])
        # the teacher's features are inference tensors, which autograd cannot save: clone
        refined = teacher.stages[self.stage].float().clone()
        if augment:
            refined = self.dafa(refined, draw)
        return hint, refined, self.dam(torch.cat([hint, refined.to(hint.dtype)]))

    def _losses(
        self, student: Features, teacher: Features, labels: Tensor, draw: Draw | None = None, augment: bool = True
    ) -> dict[str, Tensor]:
        p = self.params
        hint, refined, heads = self._heads(student, teacher, draw, augment)
        out_s, out_t = heads.float().chunk(2)
        mask = mutual_interest_mask(out_s, p.top_k)
        l_da, extra = self.adapter.losses(self.base, self.stage, student, teacher, hint, refined, mask, labels, p.da_reduction)
        return {**extra, "sokd_d": p.d_weight * F.mse_loss(out_s, out_t), "sokd_da": p.da_weight * l_da}

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        return self._losses(student, teacher, labels)

    def forward(self, images: Tensor, labels: Tensor, teacher: Features | None, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The second-order outer step first (training, ``epoch <= aug_epochs``), then the student's losses."""
        if self.training and self.params.search_order == 2 and epoch <= self.params.aug_epochs:
            self.outer_step(images, labels, teacher)
        return super().forward(images, labels, teacher, epoch)

    def _total(self, images: Tensor, labels: Tensor, teacher: Features, draw: Draw | None, augment: bool) -> Tensor:
        """The total student loss ``CE + sum of distill losses`` on the batch, at the current parameters."""
        student = self.student.features(images)
        losses = self._losses(student, teacher, labels, draw, augment)
        return self.params.ce_weight * F.cross_entropy(student.logits, labels) + sum(losses.values())

    def _augmented(self, images: Tensor, labels: Tensor, teacher: Features, draw: Draw) -> Tensor:
        """``L(theta, draw)`` with the random numbers of the ops fixed (every call sees the same)."""
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._total(images, labels, teacher, draw, augment=True)

    def outer_gradients(self, images: Tensor, labels: Tensor, teacher: Features, draw: Draw) -> tuple[Tensor, Tensor, Tensor]:
        """The second-order outer gradients (module docstring) to DAFA's (p, alpha, m) under `draw`;
        the parameters and buffers are left as they were, ``previous`` set to theta."""
        p = self.params
        theta = self.sgd_parameters()
        buffers = [b.clone() for b in self.buffers()]
        grads = torch.autograd.grad(self._augmented(images, labels, teacher, draw), theta, allow_unused=True)
        with torch.no_grad():
            saved = [t.detach().clone() for t in theta]
            previous = self.previous or saved  # no previous step: a zero momentum buffer
            for t, g, before in zip(theta, grads, previous, strict=True):
                step = p.virtual_lr * ((0 if g is None else g) + p.virtual_weight_decay * t)
                t.sub_(p.virtual_momentum * (before - t) + step)
        v = torch.autograd.grad(self._total(images, labels, teacher, None, augment=False), theta, allow_unused=True)
        v = [torch.zeros_like(t) if g is None else g for t, g in zip(theta, v, strict=True)]
        r = p.hvp_r / torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in v])).clamp_min(1e-12)
        values, magnitude_grads = [], []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for t, s, g in zip(theta, saved, v, strict=True):
                    t.copy_(s + sign * r * g)
            loss = self._augmented(images, labels, teacher, draw)
            values.append(loss.detach())
            magnitude_grads.append(torch.autograd.grad(loss, self.dafa.magnitudes)[0])
        with torch.no_grad():
            for t, s in zip(theta, saved, strict=True):
                t.copy_(s)
            for b, s in zip(self.buffers(), buffers, strict=True):
                b.copy_(s)
        self.previous = saved
        scale = -p.virtual_lr / (2 * r)
        score = torch.autograd.grad(self.dafa.log_prob(draw), [self.dafa.probabilities, self.dafa.weights])
        difference = values[0] - values[1]
        return (
            scale * difference * score[0],
            scale * difference * score[1],
            scale * (magnitude_grads[0] - magnitude_grads[1]),
        )

    def outer_step(self, images: Tensor, labels: Tensor, teacher: Features) -> None:
        """One second-order step of DAFA's Adam on a fresh draw (averaged over processes under torch.distributed)."""
        draw = self.dafa.sample().detached()
        grads = self.outer_gradients(images, labels, teacher, draw)
        self.dafa.optimizer.zero_grad(set_to_none=True)
        for q, g in zip((self.dafa.probabilities, self.dafa.weights, self.dafa.magnitudes), grads, strict=True):
            if torch_dist.is_available() and torch_dist.is_initialized():
                torch_dist.all_reduce(g)
                g /= torch_dist.get_world_size()
            q.grad = g
        self.dafa.step(update=True)

    def sgd_parameters(self) -> list[nn.Parameter]:
        """Every parameter but DAFA's (trained by its own Adam)."""
        own = {id(q) for q in self.dafa.parameters()}
        return [q for q in self.parameters() if id(q) not in own]

    def after_step(self, epoch: int) -> None:
        """First-order search: step DAFA's Adam while ``epoch <= aug_epochs``; clear its gradients every step."""
        self.dafa.step(update=self.params.search_order == 1 and epoch <= self.params.aug_epochs)

    def get_extra_state(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.previous = [t.clone() for t in state["previous"]]

    @torch.no_grad()
    def inspect(self, images: Tensor, labels: Tensor, teacher: Features | None) -> dict[str, Tensor]:
        """The area of mutual interest M and the DAM heatmaps (max over classes) of both networks, each (N, H, W)."""
        _, _, heads = self._heads(self.student.features(images), teacher, None, augment=True)
        out_s, out_t = heads.float().chunk(2)
        classes = out_s.shape[1] - 4
        return {
            "mutual interest M": mutual_interest_mask(out_s, self.params.top_k),
            "student heatmap": out_s[:, :classes].amax(1),
            "teacher heatmap": out_t[:, :classes].amax(1),
        }
