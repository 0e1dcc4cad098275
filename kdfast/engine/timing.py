"""Measuring a step on the host clock: wall times, their median and quantiles, peak memory.

Used by ``kdfast bench --e2e`` (:mod:`kdfast.engine.bench`), ``kdfast demo``,
``benchmarks/bench_lakd.py`` and ``benchmarks/bench_loader.py`` (``benchmarks/common.py``'s
``summarize`` is :func:`quantiles`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from kdfast.engine.results import LiveTensorBytes

__all__ = ["measure_step", "peak_bytes", "quantiles", "wall_times"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(step: Callable[[], object], device: torch.device, iters: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of `iters` calls of `step`, after `warmup` untimed calls; on CUDA the
    device is synchronised before and after each timed call (the clock reads finished work)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of `times`, interpolated linearly between the
    values (numpy's default); a single value is all three."""
    if len(times) < 2:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), cuts[0], cuts[3]


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of one step above what was allocated before it: on CUDA
    ``max_memory_allocated - memory_allocated``; on the CPU the peak of the tensor storages created
    during the step and still alive (:class:`~kdfast.engine.results.LiveTensorBytes`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def measure_step(step: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[list[float], int]:
    """A training step's benchmark: `warmup` untimed steps, one step for :func:`peak_bytes`, then
    the milliseconds of `iters` steps (:func:`wall_times`). Returns (times, peak bytes)."""
    for _ in range(warmup):
        step()
    peak = peak_bytes(step, device)
    return wall_times(step, device, iters), peak
