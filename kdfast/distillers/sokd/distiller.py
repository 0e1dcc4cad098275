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

(``d_weight = da_weight = 1000``, the code's ``DAM_AREA_WEIGHT`` and ``AUG_FEAT_WEIGHT``.) The head,
``phi`` and the base's extras are trained by the engine's SGD with the student; DAFA's parameters
by their own Adam (lr 3e-4, betas (0.5, 0.999), weight decay 1e-3) while ``epoch <= aug_epochs``,
then frozen (DAFA keeps augmenting with them).

**Stability at the spec weights.** The DAM head follows the code: each branch ends with a ReLU
(:mod:`.dam`, ``dam_final_relu``). With those ReLUs the objective trains at ``d_weight = 1000``
(finite, decreasing); without them the unbounded size/offset outputs make SGD diverge within two
steps. ``L_D`` is minimised by any head whose output does not depend on its input, and at weight
1000 the first SGD steps take the head there. In 60-step CPU runs (digits, a trained resnet14
teacher, second-order search, lr 0.05) the size and offset branches' final ReLUs were off after
the first step (every box shrinks to its peak's cell) and ``L_D`` fell below 1e-3 of its first
value; around AT and LCC the heatmap branch switched off too by the third step (heatmap 0.5
everywhere: M is then the 8 one-cell boxes that ``topk`` picks among equal scores). That is the
code's behaviour as far as it can be read; kdfast does not change it (no clamp, no rescaling of
``L_D``, no separate learning rate for the head).

**Second-order search** (``search_order: 2``, the code's): one outer step per batch inside
:meth:`SoKD.forward`, before the student's losses. With ``theta`` the SGD-trained parameters,
``L(theta, d)`` the total student loss on the batch under the DAFA draw ``d`` and ``L_0`` the same
loss without augmentation (``s`` = identity)::

    theta' = theta - eta (mu buf + grad_theta L(theta, d) + wd theta)      (DARTS' virtual step)
    v      = grad_theta' L_0(theta'),   r = hvp_r / ||v||,   theta+- = theta +- r v
    grad_m     = c (grad_m L(theta+, d) - grad_m L(theta-, d)) / (2 r)        (autograd)
    grad_(p,a) = c (L(theta+, d) - L(theta-, d)) / (2 r) grad_(p,a) log P(d | p, alpha)

with ``c = -1`` (``outer_scale: code``: the code's architect negates the finite difference without
DARTS' factor eta) or ``c = -eta`` (``outer_scale: darts``). The last line is RELAX's estimate
``(f(b) - c(z~)) grad log P(b) + grad c(z) - grad c(z~)`` applied to the finite difference: both
points share the draw and the ops' random numbers (common random numbers, without which the
difference of two estimates divided by 2r would be noise), so every control-variate term (the
code's learned ``QFunc``) cancels exactly and only the score term remains. ``L_0`` does not depend
on DAFA, so the virtual step's gradient is the whole of DARTS' outer gradient.

The virtual step's constants are the code's (its trainer calls the architect with ``eta = 0.01``;
``mu = 0.9`` and ``wd = 1e-4`` from its DFKD config): ``virtual_lr``, ``virtual_momentum``,
``virtual_weight_decay``. ``buf`` is the student's SGD momentum buffer, read from the parameters'
change since the previous batch, ``buf = (theta_prev - theta) / optim_lr`` (exact for SGD at a
constant lr, which the search epochs have; ``optim_lr`` must be the config's ``optim.lr``), zero
on the first batch; ``theta_prev`` is kept in the state_dict for an exact resume. The code
snapshot builds its "unrolled model" by loading theta' into the live model, so its finite
difference is taken around theta' and the student keeps theta' (an extra step per batch): a
defect kdfast does not reproduce (DARTS' formula, around theta, parameters restored).

M at ``theta+-``: recomputed from the student's heatmap at each point (``hvp_mask: recompute``,
what the code's repeated forward does) or the M of ``theta`` kept for both (``fixed``). M is
piecewise constant in theta: when a box edge or a peak changes between ``theta+`` and ``theta-``
the recomputed difference carries that jump divided by 2r on top of the derivative; ``fixed``
estimates the derivative itself (what the exact test checks). The extra forwards leave the buffers
(BatchNorm statistics) as they found them. Under torch.distributed the outer gradients are
averaged over processes.

**First-order search** (``search_order: 1``): DAFA receives the gradient of the student
objective itself through the straight-through samples and magnitudes, and :meth:`SoKD.after_step`
steps its Adam.

The step reads nothing back to the host: the sub-policy index stays on the device (:mod:`.dafa`),
M and the masked losses are device ops. The student module is shared with the wrapped base
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

from kdfast.distillers.base import Distiller, Params, feature_shapes, is_int
from kdfast.distillers.fitnet import ConvReg
from kdfast.distillers.sokd.bases import BASES
from kdfast.distillers.sokd.dafa import DAFA, Draw
from kdfast.distillers.sokd.dam import DAMHead, mutual_interest_mask, widen
from kdfast.models import Features, KDModel
from kdfast.numerics.masked_mse import REDUCTIONS

__all__ = ["SoKD", "SoKDParams"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SoKDParams(Params):
    ce_weight: float = 1.0
    base: str = "fitnet"  # the wrapped method: fitnet, at, lcc or reviewkd
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
    virtual_lr: float = 0.01  # eta of the virtual step (the code's trainer passes 0.01)
    virtual_momentum: float = 0.9  # mu (the code's DFKD.momentum)
    virtual_weight_decay: float = 1e-4  # wd (the code's DFKD.weight_decay)
    optim_lr: float = 0.05  # = optim.lr: reads the SGD momentum buffer from the parameters' change
    hvp_r: float = 0.01  # finite-difference step r = hvp_r / ||v||
    hvp_mask: str = "recompute"  # M at theta+-: recompute (the code) or fixed (M of theta)
    outer_scale: str = "code"  # the outer gradient's factor: code (-1) or darts (-virtual_lr)
    dam_width: int | None = None  # channels of each DAM branch's 3x3 conv (None: the hint's channels)
    dam_final_relu: bool = True  # each DAM branch ends with a ReLU (the code); false: plain conv ends
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
        if self.stage is not None and (not adapter.uses_sokd_stage or not is_int(self.stage)):
            raise ValueError(
                f"SoKD stage is only for the AT base (an int); {self.base}'s hint stage is in base_params, got {self.stage!r}"
            )
        for name in ("ce_weight", "d_weight", "da_weight", "virtual_momentum", "virtual_weight_decay", "aug_weight_decay"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"SoKD {name} must be a finite number, got {getattr(self, name)!r}")
        if not isinstance(self.dam_final_relu, bool):
            raise ValueError(f"SoKD dam_final_relu must be true or false, got {self.dam_final_relu!r}")
        for name in ("temperature", "aug_lr", "virtual_lr", "optim_lr", "hvp_r"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"SoKD {name} must be a number > 0, got {getattr(self, name)!r}")
        if self.da_reduction not in REDUCTIONS:
            raise ValueError(f"SoKD da_reduction must be one of {REDUCTIONS}, got {self.da_reduction!r}")
        if self.search_order not in (1, 2) or not is_int(self.search_order):
            raise ValueError(f"SoKD search_order must be 1 or 2, got {self.search_order!r}")
        if self.hvp_mask not in ("recompute", "fixed"):
            raise ValueError(f"SoKD hvp_mask must be 'recompute' or 'fixed', got {self.hvp_mask!r}")
        if self.outer_scale not in ("code", "darts"):
            raise ValueError(f"SoKD outer_scale must be 'code' or 'darts', got {self.outer_scale!r}")
        if not is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"SoKD top_k must be an integer >= 1, got {self.top_k!r}")
        if self.dam_width is not None and (not is_int(self.dam_width) or self.dam_width < 1):
            raise ValueError(f"SoKD dam_width must be an integer >= 1 or null, got {self.dam_width!r}")
        if not is_int(self.aug_epochs) or self.aug_epochs < 0:
            raise ValueError(f"SoKD aug_epochs must be an integer >= 0, got {self.aug_epochs!r}")
        if len(self.aug_betas) != 2 or not all(0 <= b < 1 for b in self.aug_betas):
            raise ValueError(f"SoKD aug_betas must be two numbers in [0, 1), got {self.aug_betas!r}")


def _conv_bn_relu(channels: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class SoKD(Distiller):
    """``{"ce", <base logit terms>, "sokd_d", "sokd_da"}``; owns the base distiller, ``phi``, DAFA and the DAM head."""

    params_class = SoKDParams
    params: SoKDParams

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
        self.dam = DAMHead(t_shape[0], num_classes, params.dam_width or t_shape[0], params.dam_final_relu)
        self.previous: list[Tensor] = []  # the SGD-trained parameters at the previous outer step

    def phi(self, f_s: Tensor) -> Tensor:
        """``phi(fs)``: ConvReg, then two 3x3 conv-BN-ReLU."""
        connector = self.adapter.connector(self.base)
        if connector is None:
            connector = self.own_connector
        assert connector is not None  # built in __init__ when the base has none
        return self.refine(connector(f_s))

    def _heads(self, student: Features, teacher: Features, draw: Draw | None, augment: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(phi(fs), s(ft) (ft when not `augment`), [head(phi(fs)); head(s(ft))])."""
        hint = self.phi(student.stages[self.stage])
        # the teacher's features are inference tensors, which autograd cannot save: clone
        refined = widen(teacher.stages[self.stage]).clone()
        if augment:
            refined = self.dafa(refined, draw)
        return hint, refined, self.dam(torch.cat([hint, refined.to(hint.dtype)]))

    def _losses(
        self,
        student: Features,
        teacher: Features,
        labels: Tensor,
        draw: Draw | None = None,
        augment: bool = True,
        mask: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The distillation losses and the M they used (`mask`, else the student's peaks now)."""
        p = self.params
        hint, refined, heads = self._heads(student, teacher, draw, augment)
        out_s, out_t = widen(heads).chunk(2)
        mask = mutual_interest_mask(out_s, p.top_k) if mask is None else mask
        l_da, extra = self.adapter.losses(self.base, self.stage, student, teacher, hint, refined, mask, labels, p.da_reduction)
        return {**extra, "sokd_d": p.d_weight * F.mse_loss(out_s, out_t), "sokd_da": p.da_weight * l_da}, mask

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        return self._losses(student, teacher, labels)[0]

    def forward(self, images: Tensor, labels: Tensor, teacher: Features | None, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The second-order outer step first (training, ``epoch <= aug_epochs``), then the student's losses."""
        if self.training and self.params.search_order == 2 and epoch <= self.params.aug_epochs:
            self.outer_step(images, labels, self.require_teacher(teacher))
        return super().forward(images, labels, teacher, epoch)

    def _total(
        self, images: Tensor, labels: Tensor, teacher: Features, draw: Draw | None, augment: bool, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The total student loss ``CE + sum of distill losses`` on the batch at the current parameters, and its M."""
        student = self.student.features(images)
        losses, mask = self._losses(student, teacher, labels, draw, augment, mask)
        return self.params.ce_weight * F.cross_entropy(student.logits, labels) + sum(losses.values()), mask

    def _augmented(
        self, images: Tensor, labels: Tensor, teacher: Features, draw: Draw, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``L(theta, draw)`` and its M, with the random numbers of the ops fixed (every call sees the same)."""
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._total(images, labels, teacher, draw, augment=True, mask=mask)

    def outer_gradients(self, images: Tensor, labels: Tensor, teacher: Features, draw: Draw) -> tuple[Tensor, Tensor, Tensor]:
        """The second-order outer gradients (module docstring) to DAFA's (p, alpha, m) under `draw`;
        the parameters and buffers are left as they were, ``previous`` set to theta."""
        p = self.params
        theta = self.sgd_parameters()
        buffers = [b.clone() for b in self.buffers()]
        loss, mask = self._augmented(images, labels, teacher, draw)
        grads = torch.autograd.grad(loss, theta, allow_unused=True)
        with torch.no_grad():
            saved = [t.detach().clone() for t in theta]
            previous = self.previous or saved  # no previous step: a zero momentum buffer
            momentum = p.virtual_momentum / p.optim_lr  # mu buf = mu (theta_prev - theta) / optim_lr
            for t, g, before in zip(theta, grads, previous, strict=True):
                t.sub_(p.virtual_lr * (momentum * (before - t) + (0 if g is None else g) + p.virtual_weight_decay * t))
        v_raw = torch.autograd.grad(self._total(images, labels, teacher, None, augment=False)[0], theta, allow_unused=True)
        v = [torch.zeros_like(t) if g is None else g for t, g in zip(theta, v_raw, strict=True)]
        r = p.hvp_r / torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in v])).clamp_min(1e-12)
        fixed = mask if p.hvp_mask == "fixed" else None
        values, magnitude_grads = [], []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for t, s, g in zip(theta, saved, v, strict=True):
                    t.copy_(s + sign * r * g)
            loss, _ = self._augmented(images, labels, teacher, draw, fixed)
            values.append(loss.detach())
            magnitude_grads.append(torch.autograd.grad(loss, self.dafa.magnitudes)[0])
        with torch.no_grad():
            for t, s in zip(theta, saved, strict=True):
                t.copy_(s)
            for b, s in zip(self.buffers(), buffers, strict=True):
                b.copy_(s)
        self.previous = saved
        scale = (-1.0 if p.outer_scale == "code" else -p.virtual_lr) / (2 * r)
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
        _, _, heads = self._heads(self.student.features(images), self.require_teacher(teacher), None, augment=True)
        out_s, out_t = widen(heads).chunk(2)
        classes = out_s.shape[1] - 4
        return {
            "mutual interest M": mutual_interest_mask(out_s, self.params.top_k),
            "student heatmap": out_s[:, :classes].amax(1),
            "teacher heatmap": out_t[:, :classes].amax(1),
        }
