"""SoKD's masked feature loss: the reductions.

Ground floor (kdfast/numerics): used by the eager references and by the fused path alike."""

from __future__ import annotations

REDUCTIONS = ("mean", "masked_mean", "sum")
