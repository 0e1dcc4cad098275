"""Divergence guard: non-finite losses and gradients, detected on the device without a host sync
per step.

Each step :meth:`NonFiniteGuard.observe` folds ``not isfinite(loss) or not isfinite(||grad||)``
into device tensors (the count of bad steps and the index of the first one); the host reads them
only at :meth:`NonFiniteGuard.check`, which the trainer calls where it synchronises anyway (its
progress points and the end of each epoch).

* ``on_nonfinite="stop"``: the first check that sees a bad step raises :class:`Diverged`, naming
  the epoch and the first bad step; the trainer then keeps its last good checkpoint.
* ``on_nonfinite="skip"``: a bad step's update is dropped on the device (the fused SGD step reads
  the guard's ``found_inf`` flag, as under a gradient scaler: parameters and momenta stay as they
  were); the run stops once ``max_nonfinite`` steps were skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Diverged", "NonFiniteGuard"]


class Diverged(RuntimeError):
    """A run stopped by non-finite losses or gradients."""


class NonFiniteGuard:
    """Counts non-finite steps on `device`; see the module docstring."""

    def __init__(self, device: torch.device, mode: str, max_nonfinite: int) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {mode!r}")
        self.mode, self.max_nonfinite = mode, max_nonfinite
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)  # 1.0: skip this step's update

    def observe(self, loss: Tensor, params: Sequence[Tensor], step: int) -> Tensor:
        """Folds step `step`'s loss and the gradients of `params` into the counters; returns the
        step's flag (1.0 if anything was non-finite) as a device tensor."""
        grads = [p.grad for p in params if p.grad is not None]
        finite = torch.isfinite(loss.detach().float())
        if grads:
            finite &= torch.isfinite(torch.stack(torch._foreach_norm(grads)).float().sum())
        bad = (~finite).to(torch.int64)
        self.first_bad.copy_(torch.where((self.first_bad < 0) & (bad > 0), step, self.first_bad))
        self.bad_steps += bad
        self.found_inf.copy_(bad)
        return self.found_inf

    def check(self, epoch: int) -> int:
        """Raises :class:`Diverged` when the run must stop; returns the number of bad steps so far
        (skipped ones, in mode "skip"). One host sync."""
        bad, first = (int(v) for v in torch.stack([self.bad_steps, self.first_bad]).tolist())
        if bad and self.mode == "stop":
            raise Diverged(
                f"non-finite loss or gradients at epoch {epoch}, step {first} (train.on_nonfinite=stop); "
                "the last good checkpoint is kept. Lower optim.lr, or set train.on_nonfinite=skip"
            )
        if bad >= self.max_nonfinite:
            raise Diverged(
                f"{bad} steps with a non-finite loss or gradients were skipped (the first at epoch {epoch}, "
                f"step {first}), train.max_nonfinite={self.max_nonfinite}; the last good checkpoint is kept"
            )
        return bad

    def new_epoch(self) -> None:
        """Forgets where the first bad step was (the count of skipped steps carries on)."""
        self.first_bad.fill_(-1)
