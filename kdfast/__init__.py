"""kdfast: fused Triton and CUDA C++ kernels for knowledge distillation of vision models.

``kdfast.functional`` and ``kdfast.nn`` hold the losses; ``kdfast.backends`` says which
backends can run here. They load on first use (PEP 562), so ``import kdfast`` and the
``kdfast --help`` of the command line import neither torch nor the extension; importing an op
(``kdfast.functional``, ``kdfast.ops``) loads ``kdfast._C`` and warns once if it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"
__all__ = ["backends", "functional", "nn", "__version__"]
_LAZY = ("backends", "functional", "nn")


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        return importlib.import_module(f"kdfast.{name}")
    raise AttributeError(f"module 'kdfast' has no attribute {name!r}")
