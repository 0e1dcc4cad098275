"""Distillation methods by name: ``kdfast.distillers.create(name, student, teacher, params)``.

Registered: ``vanilla`` (cross-entropy only; trains teachers and undistilled students), ``kd``,
``dkd``, ``at``, ``fitnet``, ``sp``, ``rkd``, ``lcc``, ``lakd``, ``aft``, ``afd``, ``rtk``, ``reviewkd``, ``crd`` and
``sokd`` (a wrapper around ``fitnet``, ``at`` or ``lcc``). A new method is one module with a
:class:`Distiller` subclass and its :class:`Params` dataclass, added to ``_METHODS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kdfast._coerce import coerce_fields
from kdfast.distillers.afd import AFD, RTK
from kdfast.distillers.aft import AFT
from kdfast.distillers.at import AT
from kdfast.distillers.base import Distiller, Params, feature_shapes
from kdfast.distillers.crd import CRD
from kdfast.distillers.dkd import DKD
from kdfast.distillers.fitnet import FitNet
from kdfast.distillers.kd import KD
from kdfast.distillers.lakd import LAKD
from kdfast.distillers.lcc import LCC
from kdfast.distillers.reviewkd import ReviewKD
from kdfast.distillers.rkd import RKD
from kdfast.distillers.sokd import SoKD
from kdfast.distillers.sp import SP
from kdfast.distillers.vanilla import Vanilla
from kdfast.models import KDModel

__all__ = ["Distiller", "Params", "SoKD", "create", "feature_shapes", "get", "make_params", "names"]

_METHODS: dict[str, type[Distiller]] = {
    "vanilla": Vanilla,
    "kd": KD,
    "dkd": DKD,
    "at": AT,
    "fitnet": FitNet,
    "sp": SP,
    "rkd": RKD,
    "lcc": LCC,
    "afd": AFD,
    "rtk": RTK,
    "reviewkd": ReviewKD,
    "lakd": LAKD,
    "aft": AFT,
    "sokd": SoKD,
    "crd": CRD,
}


def names() -> list[str]:
    """Every registered method name."""
    return list(_METHODS)


def get(name: str) -> type[Distiller]:
    """The distiller class of method `name`; ValueError naming the valid ones otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def make_params(name: str, values: Mapping[str, Any]) -> Params:
    """Method `name`'s Params from a mapping, values converted to the fields' types where lossless
    (``"1e-3"`` -> 0.001). ValueError naming unknown keys and the valid ones; a value of the wrong
    type raises the method's own ValueError where it checks that field, else a TypeError naming
    the key, the expected type and the value."""
    cls = get(name).params_class
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) for method {name!r}: {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    try:
        coerced = coerce_fields(cls, values, "method")
    except TypeError as mismatch:
        cls(**values)  # the method's own check names the domain ("alpha must be a number in [0, 1]")
        raise mismatch from None
    return cls(**coerced)


def create(
    name: str, student: KDModel, teacher: KDModel | None, params: Mapping[str, Any] | Params | None = None, image_size: int = 32
) -> Distiller:
    """The distiller of method `name` around `student` (teacher: the frozen teacher, for shapes)."""
    if not isinstance(params, Params):
        params = make_params(name, params or {})
    return get(name)(student, teacher, params, image_size)
