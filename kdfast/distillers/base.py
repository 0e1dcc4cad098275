"""The distiller interface: what a method adds to a student and how it combines its losses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models import Features, KDModel

__all__ = ["Distiller", "Params", "check_int", "feature_shapes", "is_int", "is_stage_list", "sum_losses"]


@dataclass
class Params:
    """A method's knobs (subclassed per method); every field is a config key under ``method:``."""

    ce_weight: float = 1.0


def is_int(value: object) -> TypeGuard[int]:
    """Whether `value` is an int option value (a bool is not, though Python makes it one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_stage_list(stages: object) -> bool:
    """Whether `stages` is a non-empty list (or tuple) of int indices into Features.stages."""
    return isinstance(stages, (list, tuple)) and bool(stages) and all(is_int(s) for s in stages)


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """An integer option (a grid side, channels, epochs) of at least `minimum`; else a ValueError naming it."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class Distiller(nn.Module):
    """Wraps a student: ``forward(images, labels, teacher, epoch) -> (logits, {name: weighted loss})``.

    The engine runs the frozen teacher itself (``teacher`` is its :class:`Features`, computed under
    ``torch.inference_mode``, or None for methods that need no teacher), sums the returned losses,
    logs each one and calls backward. A distiller owns its trainable extras (connectors), which are
    sub-modules next to ``self.student`` and therefore trained and checkpointed with it. It calls
    :mod:`kdfast.functional` and knows nothing of backends.
    """

    params_class: ClassVar[type[Params]] = Params
    needs_teacher: ClassVar[bool] = True
    # True for a method that needs each batch's positions in the training set (CRD's memory banks):
    # the engine then calls ``bind_training_set(labels)`` with the (N,) labels of every training
    # image before training and passes ``indices=`` (B,) to every training forward.
    uses_sample_indices: ClassVar[bool] = False

    def __init__(self, student: KDModel, teacher: KDModel | None, params: Params, image_size: int = 32) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {type(self).__name__} needs a teacher model")
        self.student = student
        self.params = params

    def forward(self, images: Tensor, labels: Tensor, teacher: Features | None, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits and the named, weighted losses of one batch (``epoch`` counts from 1)."""
        student = self.student.features(images)
        losses = {"ce": self.params.ce_weight * F.cross_entropy(student.logits, labels)}
        if teacher is not None or self.needs_teacher:
            losses.update(self.distill_losses(student, self.require_teacher(teacher), labels, epoch))
        return student.logits, losses

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """The method's own weighted losses (none for the plain student, which is given no teacher)."""
        return {}

    def require_teacher(self, teacher: Features | None) -> Features:
        """`teacher`, or a ValueError if a method that needs the teacher's features was given None."""
        if teacher is None:
            raise ValueError(f"method {type(self).__name__} needs the teacher's features, got None")
        return teacher

    # Engine hooks. The engine zeroes the gradients, calls forward, then runs
    # ``sum(losses).backward()`` unless :attr:`backward_done`, steps its SGD optimizer over
    # :meth:`sgd_parameters` and finally calls :meth:`after_step`.

    @property
    def backward_done(self) -> bool:
        """True when forward has already run the backward of every loss it returned (LAKD's
        module-by-module mode returns detached losses); the engine then skips its own backward."""
        return False

    def sgd_parameters(self) -> list[nn.Parameter]:
        """The parameters the engine's SGD optimizer trains: all of them, except those a method
        trains with an optimizer of its own in :meth:`after_step` (SoKD's augmentation policy)."""
        return list(self.parameters())

    def after_step(self, epoch: int) -> None:
        """Called after every optimizer step of the engine (``epoch`` counts from 1)."""

    def bind_training_set(self, labels: Tensor) -> None:
        """Called by the engine before training, for a method that :attr:`uses_sample_indices`, with
        the (N,) labels of every training image (CRD's memory banks); such a method defines it."""
        raise NotImplementedError(f"method {type(self).__name__} does not bind a training set")

    @torch.no_grad()
    def inspect(self, images: Tensor, labels: Tensor, teacher: Features | None) -> dict[str, Tensor]:
        """Named (N, h, w) maps that show what the method transfers for a batch, drawn by
        ``kdfast viz`` (kdfast.engine.viz): by default the teacher's and the student's attention
        maps (``functional.attention_map``) of every stage after the stem."""
        from kdfast import functional

        nets = {"teacher": teacher, "student": self.student.features(images)}
        return {
            f"{name} stage {s}": functional.attention_map(f).reshape(f.shape[0], *f.shape[2:]).float()
            for name, feats in nets.items()
            if feats is not None
            for s, f in enumerate(feats.stages[1:], start=1)
        }


@torch.no_grad()
def feature_shapes(model: KDModel, image_size: int, kind: str = "stages") -> list[torch.Size]:
    """Per-sample shapes (C, H, W) of ``model.features(x).<kind>`` (``"stages"`` or ``"blocks"``) for a
    square input of `image_size`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    maps = getattr(model.features(torch.zeros(2, 3, image_size, image_size, device=device)), kind)
    model.train(was_training)
    return [m.shape[1:] for m in maps]


def sum_losses(losses: Iterable[Tensor]) -> Tensor:
    """``sum(losses)`` (the builtin, same additions in the same order) of a non-empty iterable of
    tensors, typed as the Tensor it is (the builtin's type is ``Tensor | int``: 0 for no terms)."""
    total = sum(losses)
    if not isinstance(total, Tensor):
        raise ValueError("sum_losses: no loss to sum")
    return total
