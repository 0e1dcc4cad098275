"""SoKD's DAFA: the teacher's hint feature refined by a learnable mixture of augmentation sub-policies.

A **reading** of ../shared/METHODS.md (SoKD): with S sub-policies ``s_1 .. s_S``::

    s(F) = sum_s h_s * s_s(F),    h = gumbel_softmax(a, tau=gumbel_temperature, hard=True)

one sub-policy drawn per step (DADA's sampling): ``h`` is a one-hot vector in the forward and
``softmax((a + g) / tau)`` in the backward (straight-through), so only the drawn sub-policy runs
and every mixture logit ``a`` still gets a gradient. A sub-policy is an ordered pair of ops
(every unordered pair of distinct ``ops``, in list order); op ``i`` of sub-policy ``s`` is applied
to each sample with a relaxed-Bernoulli gate::

    b = sigmoid((logit(p) + log u - log(1 - u)) / bernoulli_temperature),  u ~ U(0, 1) per sample
    F' = b * op(F, m) + (1 - b) * F,    p = sigmoid(probability_logits[s, i]),
                                        m = sigmoid(magnitude_logits[s, i]) in [0, 1]

and the magnitude is straight-through: ``op(F, m)`` runs with ``m`` detached and
``d op / d m := 1`` per element (``op(F, m.detach()) + (m - m.detach())``, DADA / Faster
AutoAugment). The ops act on feature maps (B, C, H, W); each draws its own randomness per sample:

* ``shear_x``, ``shear_y``, ``translate_x``, ``translate_y``, ``rotate``: an affine warp of the
  map (``affine_grid`` + bilinear ``grid_sample``, zeros outside), random sign, amount
  ``m * range`` (shear factor, fraction of the map's side, degrees);
* ``cutout``: a square of side ``round(m * range * min(H, W))`` at a random centre set to 0;
* ``noise``: ``F + m * range * std(F) * N(0, 1)`` (std per sample, detached);
* ``channel_shuffle``: ``round(m * range * C)`` random channels permuted among themselves;
* ``channel_drop``: ``round(m * range * C)`` random channels set to 0.

The ranges (``OP_RANGES``: AutoAugment's shear 0.3, translate 0.45 and rotate 30 degrees; the
others the project's choice) can be overridden per op. In eval mode DAFA is the identity. The
parameters are trained by :meth:`DAFA.step` with their own Adam (state in the module's
``state_dict`` through ``get_extra_state``), never by the engine's SGD.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DAFA", "OPS", "OP_RANGES", "apply_op"]

OP_RANGES: dict[str, float] = {
    "shear_x": 0.3,
    "shear_y": 0.3,  # shear factor
    "translate_x": 0.45,
    "translate_y": 0.45,  # fraction of the map's side
    "rotate": 30.0,  # degrees
    "cutout": 0.5,  # side, fraction of min(H, W)
    "noise": 1.0,  # times the sample's std
    "channel_shuffle": 0.5,
    "channel_drop": 0.5,  # fraction of the channels
}
OPS: tuple[str, ...] = tuple(OP_RANGES)
AFFINE_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def _affine(f: Tensor, name: str, amount: Tensor) -> Tensor:
    """Warp each sample by the affine map of op `name` with a random sign."""
    b = f.shape[0]
    a = amount * (torch.randint(0, 2, (b,), device=f.device) * 2 - 1).to(f.dtype)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if name == "rotate":
        rad = a * (math.pi / 180.0)
        rows = ((rad.cos(), -rad.sin(), zero), (rad.sin(), rad.cos(), zero))
    else:
        rows = {
            "shear_x": ((one, a, zero), (zero, one, zero)),
            "shear_y": ((one, zero, zero), (a, one, zero)),
            "translate_x": ((one, zero, 2 * a), (zero, one, zero)),  # normalized coordinates span 2
            "translate_y": ((one, zero, zero), (zero, one, 2 * a)),
        }[name]
    theta = torch.stack([torch.stack(row, -1) for row in rows], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(f.shape), align_corners=False)
    return F.grid_sample(f, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout(f: Tensor, amount: Tensor) -> Tensor:
    b, _, h, w = f.shape
    side = torch.round(amount * min(h, w))
    low = torch.div(side, 2, rounding_mode="floor")
    y0 = torch.randint(0, h, (b, 1, 1), device=f.device) - low
    x0 = torch.randint(0, w, (b, 1, 1), device=f.device) - low
    ys = torch.arange(h, device=f.device).view(1, h, 1)
    xs = torch.arange(w, device=f.device).view(1, 1, w)
    inside = (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)
    return f * (~inside).unsqueeze(1).to(f.dtype)


def _noise(f: Tensor, amount: Tensor) -> Tensor:
    std = f.detach().flatten(1).std(1, unbiased=False).view(-1, 1, 1, 1)
    return f + amount * std * torch.randn_like(f)


def _random_channels(f: Tensor, fraction: Tensor) -> Tensor:
    """(B, C) bool: round(fraction * C) distinct random channels per sample."""
    b, c = f.shape[:2]
    rank = torch.rand(b, c, device=f.device).argsort(1).argsort(1)
    return rank < torch.round(fraction * c)


def _channel_shuffle(f: Tensor, amount: Tensor) -> Tensor:
    b, c = f.shape[:2]
    chosen = _random_channels(f, amount)
    channel = torch.arange(c, device=f.device).expand(b, c)
    # the chosen channels' positions, ascending, then the others; and the chosen channels in random order
    slots = torch.where(chosen, channel, channel + c).argsort(1)
    keys = torch.rand(b, c, device=f.device)
    sources = torch.where(chosen, keys, keys + 2).argsort(1)
    first = torch.arange(c, device=f.device) < chosen.sum(1, keepdim=True)
    index = channel.scatter(1, slots, torch.where(first, sources, slots))
    return f.gather(1, index.view(b, c, 1, 1).expand_as(f))


def _channel_drop(f: Tensor, amount: Tensor) -> Tensor:
    keep = (~_random_channels(f, amount)).to(f.dtype)
    return f * keep.view(*keep.shape, 1, 1)


_OP_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    **{name: (lambda f, amount, name=name: _affine(f, name, amount)) for name in AFFINE_OPS},
    "cutout": _cutout,
    "noise": _noise,
    "channel_shuffle": _channel_shuffle,
    "channel_drop": _channel_drop,
}


def apply_op(f: Tensor, name: str, magnitude: Tensor, value_range: float) -> Tensor:
    """Op `name` on `f` at ``magnitude`` (0-d, in [0, 1]) times `value_range`, the magnitude
    straight-through (its gradient is the sum of the output's gradient)."""
    m = magnitude.to(f.dtype)
    out = _OP_FUNCTIONS[name](f, m.detach() * value_range)
    return out + (m - m.detach())


def _relaxed_bernoulli(logit: Tensor, batch: int, temperature: float, like: Tensor) -> Tensor:
    """(B, 1, 1, 1) relaxed Bernoulli samples of probability sigmoid(logit)."""
    u = torch.rand(batch, 1, 1, 1, device=like.device, dtype=like.dtype).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logit.to(like.dtype) + u.log() - (-u).log1p()) / temperature)


class DAFA(nn.Module):
    """``s(F)``: a Gumbel-softmax mixture of sub-policies (pairs of feature ops); identity in eval mode.

    Parameters: ``mixture_logits`` (S,), ``probability_logits`` and ``magnitude_logits`` (S, 2),
    all 0 at the start (uniform mixture, p = m = 0.5). :meth:`step` runs their own Adam.
    """

    def __init__(
        self,
        ops: Sequence[str] = OPS,
        gumbel_temperature: float = 0.5,
        bernoulli_temperature: float = 0.5,
        lr: float = 3e-4,
        betas: Sequence[float] = (0.9, 0.999),
        op_ranges: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(ops) - set(OPS)) + sorted(set(op_ranges or {}) - set(OPS))
        if unknown:
            raise ValueError(f"unknown DAFA op(s) {', '.join(unknown)}; valid ops: {', '.join(OPS)}")
        if len(ops) < 2 or len(set(ops)) != len(ops):
            raise ValueError(f"DAFA needs at least 2 distinct ops (a sub-policy is a pair), got {list(ops)!r}")
        for name, value in (
            ("gumbel_temperature", gumbel_temperature),
            ("bernoulli_temperature", bernoulli_temperature),
            ("lr", lr),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"DAFA {name} must be a number > 0, got {value!r}")
        self.sub_policies = list(itertools.combinations(ops, 2))
        self.ranges = {**OP_RANGES, **(op_ranges or {})}
        self.gumbel_temperature, self.bernoulli_temperature = float(gumbel_temperature), float(bernoulli_temperature)
        count = len(self.sub_policies)
        self.mixture_logits = nn.Parameter(torch.zeros(count))
        self.probability_logits = nn.Parameter(torch.zeros(count, 2))
        self.magnitude_logits = nn.Parameter(torch.zeros(count, 2))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=tuple(betas))

    def forward(self, f: Tensor) -> Tensor:
        """``s(f)`` in training mode (one sub-policy drawn for the batch; reading its index is one
        host sync), ``f`` in eval mode."""
        if not self.training:
            return f
        weights = F.gumbel_softmax(self.mixture_logits, tau=self.gumbel_temperature, hard=True)
        k = int(weights.detach().argmax())
        out = f
        for i, name in enumerate(self.sub_policies[k]):
            gate = _relaxed_bernoulli(self.probability_logits[k, i], f.shape[0], self.bernoulli_temperature, f)
            augmented = apply_op(out, name, torch.sigmoid(self.magnitude_logits[k, i]), self.ranges[name])
            out = gate * augmented + (1 - gate) * out
        return weights[k].to(out.dtype) * out

    def step(self, update: bool) -> None:
        """One Adam step on the gradients the student objective left (when `update`), then clear them."""
        if update:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # a deep copy: a state_dict loaded in memory must not share its moment tensors with this Adam
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
