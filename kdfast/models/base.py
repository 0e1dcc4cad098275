"""The interface every model of the zoo gives the distillers.

A model is a :class:`KDModel`. Its forward is a fixed sequence of *segments* (stem, stage 1, ...,
stage n, head), each a plain function ``fn(x, rec, *modules) -> Tensor`` over some of the model's
sub-modules. The same sequence serves three uses, so they cannot drift apart:

* ``model(x)`` runs the segments with ``rec=None``: logits only, no bookkeeping;
* ``model.features(x)`` runs them with a :class:`Recorder`, which the segments fill in passing
  (no forward hooks): stage outputs before and after their last ReLU, block outputs, pooled embedding;
* ``model.stage_modules()`` wraps each segment in a :class:`Segment` view, so that a model can be
  split at its stage boundaries (LAKD's separation-decoupling).

Sub-modules keep the attribute names of the public definitions, so that published checkpoints load
with ``strict=True``; that is why stems and heads are views over the model's own modules rather than
registered containers of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["Features", "Recorder", "Segment", "SegmentFn", "SegmentSpec", "KDModel"]


@dataclass
class Features:
    """Everything :meth:`KDModel.features` returns for a batch.

    Attributes:
        logits: (B, num_classes), equal to ``model(x)``.
        stages: output of the stem and of every stage, after its last activation (mdistiller's
            ``feats``); ``model.stage_channels[i]`` is the channel count of ``stages[i]``.
        preact_stages: the same points before that activation (mdistiller's ``preact_feats``),
            defined per family exactly as in the public code (see each model's docstring).
        blocks: output of every residual / inverted-residual / shuffle block in forward order (for
            VGG: of every conv-BN-ReLU unit).
        pooled: the globally pooled (B, D) embedding the classifier sees (mdistiller's ``pooled_feat``).
    """

    logits: Tensor
    stages: list[Tensor]
    preact_stages: list[Tensor]
    blocks: list[Tensor]
    pooled: Tensor


class Recorder:
    """Collects features while a model runs its segments; created by :meth:`KDModel.features`."""

    def __init__(self) -> None:
        self.stages: list[Tensor] = []
        self.preact_stages: list[Tensor] = []
        self.blocks: list[Tensor] = []
        self.pooled: Tensor | None = None

    def add_stage(self, post: Tensor, pre: Tensor) -> None:
        self.stages.append(post)
        self.preact_stages.append(pre)

    def finish(self, logits: Tensor) -> Features:
        if self.pooled is None or len(self.stages) != len(self.preact_stages):
            raise RuntimeError("a model's segments recorded incomplete features")
        return Features(logits, self.stages, self.preact_stages, self.blocks, self.pooled)


SegmentFn = Callable[..., Tensor]
"""``fn(x, rec, *modules) -> Tensor``: one segment of a forward; records into ``rec`` unless it is None."""

SegmentSpec = tuple[SegmentFn, tuple[nn.Module, ...]]
"""A segment function and the model's sub-modules it runs on."""


class Segment(nn.Module):
    """One segment of a model's forward as a module: a view that shares the model's sub-modules."""

    def __init__(self, fn: SegmentFn, modules: tuple[nn.Module, ...]) -> None:
        super().__init__()
        self.fn = fn
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def forward(self, x: Tensor, rec: Recorder | None = None) -> Tensor:
        return self.fn(x, rec, *self._modules.values())

    def extra_repr(self) -> str:
        return f"fn={self.fn.__name__}"


class KDModel(nn.Module):
    """Base class of the zoo: ``model(x)``, ``model.features(x)``, ``stage_channels``, ``stage_modules()``.

    Subclasses set ``stage_channels`` and implement :meth:`_segments`.
    """

    stage_channels: tuple[int, ...]

    def _segments(self) -> list[SegmentSpec]:
        """The forward as (segment function, its modules): stem, every stage, head (in that order)."""
        raise NotImplementedError

    def _forward(self, x: Tensor, rec: Recorder | None) -> Tensor:
        for fn, modules in self._segments():
            x = fn(x, rec, *modules)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of images."""
        return self._forward(x, None)

    def features(self, x: Tensor) -> Features:
        """Logits plus the stage, pre-activation, block and pooled features of the same forward."""
        rec = Recorder()
        logits = self._forward(x, rec)
        return rec.finish(logits)

    def stage_modules(self) -> list[Segment]:
        """[stem, stage 1, ..., stage n, head]: applied in sequence they reproduce ``forward``.

        Each is a view sharing the model's parameters; the head maps the last stage's output to logits.
        Build the list after any change of the model's sub-modules (it holds the current ones).
        """
        return [Segment(fn, modules) for fn, modules in self._segments()]
