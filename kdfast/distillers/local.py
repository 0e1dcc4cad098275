"""Separation-decoupling (LAKD, ../shared/METHODS.md): a model split into local modules that learn
only from their own local losses.

:class:`LocalModules` cuts any model of the zoo at its stage boundaries (``model.stage_modules()``:
stem, stages, head). Module ``l`` runs the segments after boundary ``l - 1`` up to boundary ``l``
(the last module also runs the head, so its output is the logits) and receives ``stopgrad(x_{l-1})``,
the previous module's output detached: no gradient crosses a boundary. Each module's *feature* is
``model.features(x).stages[boundary]`` of the same forward, and a connector per module (1x1 conv +
BN, :class:`Connector`) maps it to the channels of its target (the teacher's map); the connector
keeps the student's H x W, the local loss aligns the spatial sizes (the kdfast losses pool the
larger map to the smaller, as METHODS.md says).

The caller's local loss ``loss_fn(outputs) -> {name: loss}`` gets the :class:`ModuleOutput` of
some modules and returns their named losses. Three execution modes, the same losses:

* ``"local"``: module by module; each module's losses are backpropagated as soon as they are
  known (``sum(loss_fn([out])).backward()``), which frees that module's activations before the
  next module runs. ``forward`` then returns detached logits and losses (for logging).
* ``"joint"``: every module first (detached inputs), then ``loss_fn(all outputs)`` once; the
  caller runs one backward of the summed losses. Gradients equal ``"local"``'s (every parameter
  gets gradient from its own module's losses only), and ``loss_fn`` can batch all modules into one
  fused call.
* ``"end_to_end"``: as ``"joint"`` without the detach between modules: ordinary distillation with
  the same losses (each loss then also trains the modules before it).

The model itself is not a registered sub-module (its owner, e.g. a distiller's ``student``, trains,
moves and checkpoints it, so its weights are stored once); only the connectors are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdfast.distillers.base import is_int, sum_losses
from kdfast.models import KDModel, Recorder, Segment

__all__ = ["MODES", "Connector", "LocalLoss", "LocalModules", "ModuleOutput", "stage_boundaries"]

MODES = ("local", "joint", "end_to_end")


@dataclass
class ModuleOutput:
    """What one local module computed for a batch."""

    index: int  # 0-based position of the module
    last: bool  # the last module: its output is the logits
    feature: Tensor  # the module's feature map, ``model.features(x).stages[boundary]``
    hint: Tensor  # connector(feature): the target's channels, the feature's H x W
    output: Tensor  # what the next module receives (detached there); the logits for the last module


LocalLoss = Callable[[Sequence[ModuleOutput]], dict[str, Tensor]]
"""``loss_fn(outputs) -> {name: loss}``: the named local losses of the given modules (one module in
mode "local", all of them otherwise); 0-d tensors, summed for backward."""


class Connector(nn.Sequential):
    """``BN(conv1x1(f))``: a (B, Cs, H, W) student feature to (B, Ct, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels))


def stage_boundaries(model: KDModel, boundaries: Sequence[int] | None = None) -> list[int]:
    """Checked boundaries: strictly increasing indices into ``Features.stages`` (0 is the stem),
    the last one the last stage; None gives one module per stage after the stem, ``[1, ..., n]``
    (the stem joins the first module)."""
    last = len(model.stage_channels) - 1
    if boundaries is None:
        return list(range(1, last + 1)) if last >= 1 else [0]
    values = list(boundaries)
    if not values or not all(is_int(b) for b in values) or any(b >= c for b, c in zip(values, values[1:])):
        raise ValueError(f"boundaries must be a non-empty, strictly increasing list of stage indices, got {boundaries!r}")
    if values[0] < 0 or values[-1] != last:
        raise ValueError(
            f"boundaries must lie in 0..{last} and end at the last stage {last} of {type(model).__name__} "
            f"(its head joins the last module), got {values}"
        )
    return values


class LocalModules(nn.Module):
    """`model` split into ``len(boundaries)`` local modules, each with a connector to ``hint_channels[l]``.

    ``forward(x, loss_fn, mode)`` returns ``(logits, {name: loss})`` (see the module docstring for
    the modes); the losses are ``loss_fn``'s, detached in mode "local" (whose backward has run).
    """

    def __init__(self, model: KDModel, hint_channels: Sequence[int], boundaries: Sequence[int] | None = None) -> None:
        super().__init__()
        self.boundaries = stage_boundaries(model, boundaries)
        if len(hint_channels) != len(self.boundaries):
            raise ValueError(
                f"hint_channels must give one channel count per module ({len(self.boundaries)}), got {list(hint_channels)}"
            )
        segments = model.stage_modules()  # [stem, stage 1, ..., stage n, head]: segment k records stages[k]
        starts = [0, *(b + 1 for b in self.boundaries[:-1])]
        ends = [*(b + 1 for b in self.boundaries[:-1]), len(segments)]
        # Views over the model's sub-modules, kept in a plain list: not registered here (see above).
        self.segments: list[list[Segment]] = [segments[a:b] for a, b in zip(starts, ends)]
        self.connectors = nn.ModuleList(Connector(model.stage_channels[b], c) for b, c in zip(self.boundaries, hint_channels))

    @property
    def num_modules(self) -> int:
        return len(self.boundaries)

    def run_module(self, index: int, x: Tensor) -> ModuleOutput:
        """Module `index` on its input `x` (detaching it is the caller's)."""
        rec = Recorder()
        for segment in self.segments[index]:
            x = segment(x, rec)
        feature = rec.stages[-1]
        return ModuleOutput(index, index == self.num_modules - 1, feature, self.connectors[index](feature), x)

    def forward(self, x: Tensor, loss_fn: LocalLoss, mode: str = "joint") -> tuple[Tensor, dict[str, Tensor]]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "local":
            losses: dict[str, Tensor] = {}
            for index in range(self.num_modules):
                x = self._local_step(index, x, loss_fn, losses)
            return x, losses
        outputs = []
        for index in range(self.num_modules):
            outputs.append(self.run_module(index, x.detach() if mode == "joint" else x))
            x = outputs[-1].output
        return x, loss_fn(outputs)

    def _local_step(self, index: int, x: Tensor, loss_fn: LocalLoss, logged: dict[str, Tensor]) -> Tensor:
        """Module `index`'s forward and the backward of its losses; adds them, detached, to `logged`
        and returns the module's detached output (the graph and activations die with this frame)."""
        out = self.run_module(index, x.detach())
        losses = loss_fn([out])
        if not losses:
            raise ValueError(f"loss_fn returned no loss for module {index}: in mode 'local' every module needs one")
        # autocast wraps forward passes only: the backward runs in the dtypes the forward recorded
        with torch.autocast(x.device.type, enabled=False):
            sum_losses(losses.values()).backward()
        logged.update((name, loss.detach()) for name, loss in losses.items())
        return out.output.detach()
