"""Plain cross-entropy training (teachers and undistilled students)."""

from __future__ import annotations

from kdfast.distillers.base import Distiller, Params

__all__ = ["Vanilla"]


class Vanilla(Distiller):
    """Cross-entropy only: ``{"ce": ce_weight * CE}``; needs no teacher."""

    params_class = Params
    needs_teacher = False
