"""ReviewKD's hierarchical context loss (HCL): the levels, their weights and limits, the reductions.

Ground floor (kdfast/numerics): used by the eager reference and by the fused path alike."""

from __future__ import annotations

from collections.abc import Sequence

LEVELS = (4, 2, 1)  # the peers' pooled levels (mdistiller, dvlab-research/ReviewKD)
REDUCTIONS = ("sum", "none")
MAX_LEVELS = 4  # levels of a call (the fused kernels' limit)
MAX_CELLS = 32  # bins of all levels together, sum l^2 (the fused kernels' limit; 4, 2, 1 has 21)


def active_levels(height: int, levels: Sequence[int]) -> tuple[list[tuple[int, float]], float]:
    """``([(l, w), ...], tot)``: the levels a map of `height` rows uses (the peers skip a level
    ``l >= H``), with their weights halving from 1/2, and the normaliser ``tot = 1 + sum w``."""
    weight, total, active = 1.0, 1.0, []
    for level in levels:
        if level >= height:
            continue
        weight /= 2.0
        active.append((level, weight))
        total += weight
    return active, total


def cell_count(levels: Sequence[int]) -> int:
    """The bins of all levels together, sum l^2: the columns of the fused op's saved cells."""
    return sum(level * level for level in levels)


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """`levels` as a tuple of ints; ValueError unless it is a sequence of at most MAX_LEVELS ints
    >= 1 with at most MAX_CELLS bins together."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(f"levels must be a sequence of ints >= 1, got {levels!r}")
    if any(isinstance(level, bool) or not isinstance(level, int) or level < 1 for level in levels):
        raise ValueError(f"levels must be ints >= 1, got {list(levels)}")
    if len(levels) > MAX_LEVELS or cell_count(levels) > MAX_CELLS:
        raise ValueError(
            f"levels: at most {MAX_LEVELS} levels of at most {MAX_CELLS} bins together (sum l^2), got {list(levels)}"
        )
    return tuple(int(level) for level in levels)
