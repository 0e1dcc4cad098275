"""kdfast: fused Triton and CUDA C++ kernels for knowledge distillation of vision models.

``kdfast.functional`` and ``kdfast.nn`` hold the losses; ``kdfast.backends`` says which
backends can run here.
"""

from kdfast import _extension  # noqa: F401  (loads kdfast._C, warns once if it is missing)
from kdfast import backends, functional, nn

__version__ = "0.1.0"
__all__ = ["backends", "functional", "nn", "__version__"]
