"""SoKD's DAFA: the teacher's hint feature refined by a learnable policy of feature-space ops.

As ../shared/METHODS.md (SoKD) describes the code of the first author's DFKD distiller.

**Ops** (``OP_RANGES``): a magnitude ``m`` in [0, 1] maps to ``v = low + m (high - low)``:

* ``shear_x`` / ``shear_y``: shear factor v in [-0.3, 0.3]; ``translate_x`` / ``translate_y``:
  v in [-0.45, 0.45] times the map's width / height; ``rotate``: v in [-30, 30] degrees; each an
  affine warp (``affine_grid`` + bilinear ``grid_sample``, zeros outside, ``align_corners=False``);
* ``cutout``: a rectangle of ``round(v H) x round(v W)`` cells, v in [0, 0.2], at a random centre
  (per sample), set to 0;
* ``noise``: ``F + v N(0, 1)``, v in [0, 0.1];
* ``channel_shuffle``: a random permutation of the channels (per sample; no magnitude);
* ``channel_drop``: ``round(v C)`` random channels (per sample) set to 0, v in [0, 0.5].

**Sub-policies**: the unordered pairs of the 9 ops in ``OPS`` order, 36 of them; METHODS.md keeps
35 without naming the one dropped, so this module drops the last pair, (channel_shuffle,
channel_drop): the only pair of two channel-identity ops (neither moves nor rescales a spatial
position, and their composition is again a random channel drop up to the permutation).

**Parameters**: apply-probabilities ``p`` (35, 2), init 0.5, clamped to [0, 1]; sub-policy
weights ``alpha`` (35,), init 1e-3; magnitudes ``m`` (35, 2), init 0.5, clamped to [0, 1].

**Sampling** (:meth:`DAFA.sample`, once per batch), with ``u``, ``u_k`` ~ U(0, 1), ``G`` Gumbel
noise, tau = 0.5::

    b_i = 1[logit(p_ki) + log u_i - log(1 - u_i) > 0]          (relaxed: sigmoid(z_i / tau))
    k   = argmax(log softmax(alpha) + G)                         (relaxed: softmax(. / tau))

**Forward** on the chosen sub-policy ``(o_1, o_2)`` of ``k``::

    y_0 = F,  y_i = y_{i-1} + b_i (o_i(y_{i-1}, m_ki) - y_{i-1})
    s(F) = h_k ((y_2 - sum_i m_ki).detach() + sum_i m_ki)

with ``b_i`` and ``h_k`` the hard samples carrying their relaxations' gradients (straight-through)
and the magnitudes straight-through (each element of s(F) has derivative 1 to ``m_k1`` and
``m_k2``). The values are the hard augmentation; the straight-through gradients to ``p`` and
``alpha`` are the first-order option's (SoKD's second-order step estimates those two with RELAX
from :meth:`DAFA.log_prob`). In eval mode DAFA is the identity.

``k`` never leaves the device: each slot computes all nine ops and keeps ``o_i`` through a 0/1
weight (:meth:`DAFA.forward`), so the step reads no tensor value on the host (at the cost of nine
cheap ops per slot on the hint-size teacher map instead of one).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DAFA", "Draw", "OPS", "OP_RANGES", "SUB_POLICIES", "apply_op", "op_value"]

OP_RANGES: dict[str, tuple[float, float]] = {
    "shear_x": (-0.3, 0.3),
    "shear_y": (-0.3, 0.3),
    "translate_x": (-0.45, 0.45),  # fraction of the width
    "translate_y": (-0.45, 0.45),  # fraction of the height
    "rotate": (-30.0, 30.0),  # degrees
    "cutout": (0.0, 0.2),  # fraction of H and of W
    "noise": (0.0, 0.1),  # sigma
    "channel_shuffle": (0.0, 0.0),  # no magnitude
    "channel_drop": (0.0, 0.5),  # fraction of the channels
}
OPS: tuple[str, ...] = tuple(OP_RANGES)
SUB_POLICIES: tuple[tuple[str, str], ...] = tuple(itertools.combinations(OPS, 2))[:-1]  # 35: without the last pair
AFFINE_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
EPS = 1e-6


def op_value(name: str, magnitude: Tensor) -> Tensor:
    """``low + m (high - low)`` of op `name`'s range."""
    low, high = OP_RANGES[name]
    return low + magnitude * (high - low)


def _affine(f: Tensor, name: str, v: Tensor) -> Tensor:
    """Warp every sample by op `name`'s affine map of amount `v` (0-d) in normalized coordinates."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "rotate":
        rad = v * (math.pi / 180.0)
        rows = ((rad.cos(), -rad.sin(), zero), (rad.sin(), rad.cos(), zero))
    else:
        rows = {
            "shear_x": ((one, v, zero), (zero, one, zero)),
            "shear_y": ((one, zero, zero), (v, one, zero)),
            "translate_x": ((one, zero, 2 * v), (zero, one, zero)),  # normalized coordinates span 2
            "translate_y": ((one, zero, zero), (zero, one, 2 * v)),
        }[name]
    theta = torch.stack([torch.stack(row) for row in rows]).expand(f.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(f.shape), align_corners=False)
    return F.grid_sample(f, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout(f: Tensor, v: Tensor) -> Tensor:
    b, _, h, w = f.shape
    side_h, side_w = torch.round(v * h), torch.round(v * w)
    y0 = torch.randint(0, h, (b, 1, 1), device=f.device) - torch.div(side_h, 2, rounding_mode="floor")
    x0 = torch.randint(0, w, (b, 1, 1), device=f.device) - torch.div(side_w, 2, rounding_mode="floor")
    ys = torch.arange(h, device=f.device).view(1, h, 1)
    xs = torch.arange(w, device=f.device).view(1, 1, w)
    inside = (ys >= y0) & (ys < y0 + side_h) & (xs >= x0) & (xs < x0 + side_w)
    return f * (~inside).unsqueeze(1).to(f.dtype)


def _noise(f: Tensor, v: Tensor) -> Tensor:
    return f + v * torch.randn_like(f)


def _channel_shuffle(f: Tensor, v: Tensor) -> Tensor:
    b, c = f.shape[:2]
    index = torch.rand(b, c, device=f.device).argsort(1)
    return f.gather(1, index.view(b, c, 1, 1).expand_as(f))


def _channel_drop(f: Tensor, v: Tensor) -> Tensor:
    b, c = f.shape[:2]
    rank = torch.rand(b, c, device=f.device).argsort(1).argsort(1)
    keep = (rank >= torch.round(v * c)).to(f.dtype)
    return f * keep.view(b, c, 1, 1)


def _affine_op(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Op `name` of the affine family as ``(f, v) -> f'``."""

    def op(f: Tensor, v: Tensor) -> Tensor:
        return _affine(f, name, v)

    return op


_OP_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    **{name: _affine_op(name) for name in AFFINE_OPS},
    "cutout": _cutout,
    "noise": _noise,
    "channel_shuffle": _channel_shuffle,
    "channel_drop": _channel_drop,
}


def apply_op(f: Tensor, name: str, magnitude: Tensor) -> Tensor:
    """Op `name` on `f` (B, C, H, W) at ``op_value(name, magnitude)`` (magnitude 0-d, detached here)."""
    return _OP_FUNCTIONS[name](f, op_value(name, magnitude.detach().to(f.dtype)))


@dataclass
class Draw:
    """One batch's sample: sub-policy ``k`` (0-d long), its hard gates ``b`` (2,) and the
    straight-through gates and weight (hard values, relaxed gradients)."""

    k: Tensor
    b: Tensor
    gates: Tensor
    weight: Tensor

    def detached(self) -> Draw:
        """The same draw without the straight-through gradients (hard gates, weight 1)."""
        return Draw(self.k, self.b, self.b, torch.ones_like(self.weight.detach()))


class DAFA(nn.Module):
    """``s(F)`` (module docstring); :meth:`sample` draws, :meth:`forward` applies a draw."""

    policy_ops: Tensor  # (35, 2) buffer: each sub-policy's op indices

    def __init__(
        self, temperature: float = 0.5, lr: float = 3e-4, betas: Sequence[float] = (0.5, 0.999), weight_decay: float = 1e-3
    ) -> None:
        super().__init__()
        count = len(SUB_POLICIES)
        self.temperature = float(temperature)
        self.probabilities = nn.Parameter(torch.full((count, 2), 0.5))
        self.weights = nn.Parameter(torch.full((count,), 1e-3))
        self.magnitudes = nn.Parameter(torch.full((count, 2), 0.5))
        table = torch.tensor([[OPS.index(a), OPS.index(b)] for a, b in SUB_POLICIES])
        self.register_buffer("policy_ops", table, persistent=False)  # (35, 2): each sub-policy's op indices
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=(betas[0], betas[1]), weight_decay=weight_decay)

    def sample(self, u: Tensor | None = None, gumbel: Tensor | None = None) -> Draw:
        """A draw from uniform noise `u` (2,) and Gumbel noise `gumbel` (35,) (fresh when None)::

        k = argmax(log_softmax(alpha) + G),  h = softmax((log_softmax(alpha) + G) / tau)
        z = logit(p_k) + log u - log(1 - u),  b = 1[z > 0],  b~ = sigmoid(z / tau)
        """
        if u is None:
            u = torch.rand(2, device=self.probabilities.device).clamp(EPS, 1 - EPS)
        if gumbel is None:
            gumbel = -torch.empty_like(self.weights).exponential_().log()
        scores = self.weights.log_softmax(0) + gumbel
        k = scores.detach().argmax()
        index = k.view(1)  # index_select / gather: indexing with a 0-d device tensor would read it on the host
        soft_h = (scores / self.temperature).softmax(0).gather(0, index)[0]
        z = torch.logit(self.probabilities.index_select(0, index)[0], eps=EPS) + u.log() - (-u).log1p()
        b = (z.detach() > 0).to(z.dtype)
        soft_b = torch.sigmoid(z / self.temperature)
        return Draw(k, b, b + (soft_b - soft_b.detach()), 1 + (soft_h - soft_h.detach()))

    def log_prob(self, draw: Draw) -> Tensor:
        """``log softmax(alpha)_k + sum_i [b_i log p_ki + (1 - b_i) log(1 - p_ki)]``, the score of RELAX."""
        index = draw.k.view(1)
        p = self.probabilities.index_select(0, index)[0].clamp(EPS, 1 - EPS)
        return self.weights.log_softmax(0).gather(0, index)[0] + (draw.b * p.log() + (1 - draw.b) * (-p).log1p()).sum()

    def forward(self, f: Tensor, draw: Draw | None = None) -> Tensor:
        """``s(f)`` under `draw` (a fresh one when None) in training mode, ``f`` in eval mode.

        The sub-policy index stays on the device: each of the two slots evaluates all nine ops on
        its input and keeps the chosen one through a one-hot (0 or 1) weight, so no Python branch
        depends on ``k`` and the step reads nothing back to the host. The values are exactly those
        of applying the two chosen ops (the other terms are exact zeros); every op draws its random
        numbers on every call, so the RNG advances the same way whatever ``k`` is."""
        if not self.training:
            return f
        draw = self.sample() if draw is None else draw
        k = draw.k.view(1)
        m = self.magnitudes.index_select(0, k)[0].to(f.dtype)  # (2,)
        chosen = self.policy_ops.index_select(0, k)[0]  # (2,) op indices into OPS
        y = f
        ops = torch.arange(len(OPS), device=f.device)
        for i in range(2):
            onehot = (ops == chosen[i]).to(f.dtype)  # (9,); F.one_hot would check the index on the host (CPU)
            out = sum(onehot[j] * apply_op(y, name, m[i]) for j, name in enumerate(OPS))
            y = y + draw.gates[i].to(f.dtype) * (out - y)
        # the value of (y - sum m).detach() + sum m, without detaching y: the gates' straight-through
        # gradients (first-order search) flow through y, which a detached y would cut off
        return draw.weight.to(f.dtype) * (y + (m.sum() - m.sum().detach()))

    def step(self, update: bool) -> None:
        """One Adam step on the parameters' gradients (when `update`; p and m clamped to [0, 1]
        after it), then clear them."""
        if update:
            self.optimizer.step()
            with torch.no_grad():
                self.probabilities.clamp_(0, 1)
                self.magnitudes.clamp_(0, 1)
        self.optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # a deep copy: a state_dict loaded in memory must not share its moment tensors with this Adam
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
