"""Training checks the distiller tests share: the engine's step on one batch, the teacher left
alone, the gradients of the summed losses.

Not a test module (no ``test_`` prefix): the distiller test files import it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from kdfast.distillers.base import Distiller


def sgd_totals(d: Distiller, x: Tensor, y: Tensor, feats, lr: float, seed: int | None = None, steps: int = 6) -> list[float]:
    """The summed losses of `steps` engine steps on one batch (epoch 1): forward (torch reseeded
    with `seed` first, if given: the same random draws every step), backward of the sum, SGD (lr,
    momentum 0.9) on ``d.sgd_parameters()``, ``d.after_step(1)``. Every loss is asserted a finite
    scalar."""
    opt = torch.optim.SGD(d.sgd_parameters(), lr=lr, momentum=0.9)
    totals = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        _, losses = d(x, y, feats, 1)
        loss = sum(losses.values())
        assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d.after_step(1)
        totals.append(loss.item())
    return totals


@contextmanager
def teacher_spared(teacher: nn.Module) -> Iterator[None]:
    """Asserts, after the block, that no teacher parameter has a gradient and that the teacher's
    state (parameters and buffers) is the one it had before."""
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    yield
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())


def assert_gradients_reach_student_only(d: nn.Module, losses: Mapping[str, Tensor], teacher: nn.Module) -> None:
    """The backward of the summed `losses` (after ``d.zero_grad()``) gives every parameter of `d` a
    gradient and none of the teacher's."""
    d.zero_grad()
    total: Tensor = sum(losses.values(), torch.zeros(()))
    total.backward()
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None for p in teacher.parameters())
