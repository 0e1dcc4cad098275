"""Adaptive loss weights from loss-optimisation rates (AFT-KD, Yang et al., Sci. Rep. 2023) **(reading)**.

With ``m_i(e)`` the mean of loss ``i`` over epoch ``e`` (weighted by batch size, over every
process) and ``n`` losses::

    r_i(e) = m_i(e - 1) / m_i(e - 2)            the loss's optimisation rate
    w_i(e) = n * softmax_i(r_i(e) / tau)        tau = 2

and ``w_i = 1`` until two epochs have been completed (epochs 1 and 2). A loss that fell slowly
over the last epoch (rate near or above 1) gets a larger weight; the weights always sum to ``n``.
The rates use the two most recent epochs in which the weights were fed (``e - 1`` and ``e - 2``
under the engine, which trains every epoch). A zero mean in the denominator is clamped to 1e-12.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdfast._dist import all_reduce_sum
from kdfast.distillers.base import check_int

__all__ = ["LossRateWeights"]

_TINY = 1e-12


class LossRateWeights(nn.Module):
    """``w = n * softmax(r / tau)`` of `count` losses, fed once per batch with the detached losses.

    ``forward(losses, epoch, samples)`` records a batch's (n,) losses for ``epoch`` (counting from
    1; it must not decrease) and returns the (n,) weights of that epoch (constants, the dtype and
    device of ``losses``). The first batch of a new epoch closes the previous one: its means become
    the newest of the two kept. Under ``torch.distributed`` every batch's weighted losses and sample
    count are summed over the processes as they are recorded (one all-reduce of n + 1 numbers), so
    every process holds the same sums and the state saved by rank 0 resumes the run exactly.
    The state (epoch, open sums, the two last epoch means) is in the owner's ``state_dict``
    (``get_extra_state``), not in buffers, so that DistributedDataParallel does not broadcast it.
    """

    def __init__(self, count: int, tau: float = 2.0) -> None:
        super().__init__()
        check_int("count", count)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.count, self.tau = count, float(tau)
        self._epoch = 0  # the epoch whose sums are open (0: none yet)
        self._sums: Tensor | None = None  # (n + 1,) float64: sum of samples * loss_i, then the sample count
        self._means = torch.zeros(0, count, dtype=torch.float64)  # the last (up to) two closed epochs, oldest first
        self._weights = torch.ones(count, dtype=torch.float64)
        self._on_device: Tensor | None = None  # self._weights in the losses' device and dtype, cached

    @property
    def weights(self) -> Tensor:
        """The (n,) float64 weights of the open epoch (ones until two epochs are closed)."""
        return self._weights.clone()

    @property
    def epoch_means(self) -> Tensor:
        """(k, n) float64: the per-epoch mean losses of the last k <= 2 closed epochs, oldest first."""
        return self._means.clone()

    @torch.compiler.disable
    def forward(self, losses: Tensor, epoch: int, samples: int = 1) -> Tensor:
        """Record the (n,) `losses` of a batch of `samples` images in `epoch`; the epoch's (n,) weights."""
        if losses.shape != (self.count,):
            raise ValueError(f"losses must have shape ({self.count},), got {tuple(losses.shape)}")
        if epoch < max(self._epoch, 1):
            raise ValueError(f"epoch must be >= {max(self._epoch, 1)} (epochs count from 1 and never decrease), got {epoch}")
        if epoch != self._epoch:
            self._close_epoch()
            self._epoch = epoch
        batch = torch.cat([losses.detach().double() * samples, losses.new_tensor([samples], dtype=torch.float64)])
        batch = all_reduce_sum(batch)
        self._sums = batch if self._sums is None else self._sums.to(batch.device) + batch
        cached = self._on_device
        if cached is None or cached.device != losses.device or cached.dtype != losses.dtype:
            self._on_device = cached = self._weights.to(device=losses.device, dtype=losses.dtype)
        return cached

    def _close_epoch(self) -> None:
        """Turn the open sums into the epoch's means (one host sync per epoch) and update the weights."""
        if self._sums is None:
            return
        means = (self._sums[:-1] / self._sums[-1]).cpu()
        self._means = torch.cat([self._means, means[None]])[-2:]
        self._sums = None
        self._weights = self._rate_weights()
        self._on_device = None

    def _rate_weights(self) -> Tensor:
        if len(self._means) < 2:
            return torch.ones(self.count, dtype=torch.float64)
        rates = self._means[1] / self._means[0].clamp_min(_TINY)
        return self.count * torch.softmax(rates / self.tau, dim=0)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "sums": None if self._sums is None else self._sums.detach().cpu().clone(),
            "means": self._means.clone(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        means = state["means"].to(torch.float64)
        if means.ndim != 2 or means.shape[1] != self.count:
            raise ValueError(f"saved epoch means have shape {tuple(means.shape)}, expected (k, {self.count})")
        self._epoch, self._means = int(state["epoch"]), means.cpu().clone()
        self._sums = None if state["sums"] is None else state["sums"].to(torch.float64).clone()
        self._weights = self._rate_weights()
        self._on_device = None

    def extra_repr(self) -> str:
        return f"count={self.count}, tau={self.tau}"
