"""One declaration per fused op, and the one registrar that turns it into torch ops.

An op (``at``, ``kd``, ``sp``, ...) is a few *kernels* (``sp_forward``, ``sp_backward``), each with
one schema. :func:`register` defines every kernel, from that one schema string, in the three
libraries that implement it:

* ``kdfast``: the C++ CPU and CUDA kernels of kdfast._C, which only implement them
  (``TORCH_LIBRARY_IMPL(kdfast, CPU|CUDA, m)`` in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the
  dispatcher checks each C++ signature against the schema defined here, whichever comes first);
* ``kdfast_emu``: the same CUDA C++ kernels run on CPU tensors through csrc/emu/cuda_emu.h
  (kdfast._C_emu, the "cuda_emu" test backend);
* ``kdfast_triton``: the Triton launcher of the same name in ``kdfast.kernels.<op>`` (imported on
  first call: triton is optional), for CUDA tensors and, under ``TRITON_INTERPRET=1``, CPU ones.

and registers, for all three, each kernel's fake (meta) function and the op's autograd formulas,
written once against the namespace (``ops.sp_backward(...)``). So every op works with
``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` on every backend, and
:mod:`kdfast.backends` derives its op table from :data:`SPECS`.

Adding an op: see CONTRIBUTING.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

LIBRARIES = ("kdfast", "kdfast_emu", "kdfast_triton")
TRITON_LIBRARY = "kdfast_triton"

# One FRAGMENT per namespace (the C++ extensions define no schema: they only implement them).
_LIBRARY_OBJECTS = {name: torch.library.Library(name, "FRAGMENT") for name in LIBRARIES}


@dataclass(frozen=True)
class Kernel:
    """One torch op of a fused op: ``name`` with ``schema`` (the argument list and results, e.g.
    ``"(Tensor x, float p) -> Tensor"``) and ``fake``, its meta function (output shapes and dtypes
    from the inputs' metadata, never their values)."""

    name: str
    schema: str
    fake: Callable[..., Any]


@dataclass(frozen=True)
class Autograd:
    """The autograd formula of the kernel ``forward``: ``setup(ctx, inputs, output)`` saves what
    the backward needs, ``backward(ops, ctx, *grad_outputs)`` returns one gradient (or None) per
    input, calling the op's backward kernel through ``ops`` (the namespace being registered)."""

    forward: str
    setup: Callable[..., None]
    backward: Callable[..., Any]


@dataclass(frozen=True)
class Sample:
    """One small call of an op for the contract tests (tests/test_op_contracts.py).

    ``run(*inputs, backend)`` calls the op module's dispatch on a concrete backend and returns a
    tensor; ``inputs`` are float64 CPU tensors, those with ``requires_grad`` the differentiable ones
    (the tests cast and move copies). Together, an op's samples call every kernel of the op and
    every value of its string and flag arguments. ``repeatable_backward=False`` for a call whose
    backward may run only once per forward (the logit losses' in-forward gradient, scaled in
    place): the contract tests skip its opcheck and gradcheck (both run the backward again); the
    op's own tests check that gradient against the reference.
    """

    label: str
    run: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]
    repeatable_backward: bool = True


def sample_tensor(*shape: int, seed: int, requires_grad: bool = False, positive: bool = False) -> Tensor:
    """A float64 CPU tensor of standard normals (their absolute values if `positive`) for a Sample."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (t.abs() if positive else t).requires_grad_(requires_grad)


@dataclass(frozen=True)
class OpSpec:
    """Everything that defines a fused op once: its ``name`` (also the name of its Triton module
    ``kdfast.kernels.<name>`` and of its C++ sources), its ``kernels``, their ``autograd``, and
    ``samples`` (built on demand: the contract tests' calls)."""

    name: str
    kernels: tuple[Kernel, ...]
    autograd: tuple[Autograd, ...] = field(default=())
    samples: Callable[[], tuple[Sample, ...]] = field(default=tuple)

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.kernels)

    def triton_launcher(self, kernel: str) -> Callable[..., Any]:
        """The Triton launcher of `kernel` (kdfast.kernels.<op>.<kernel>), imported on first use."""

        def launch(*args: Any) -> Any:
            module = importlib.import_module(f"kdfast.kernels.{self.name}")
            return getattr(module, kernel)(*args)

        launch.__name__ = launch.__qualname__ = f"{self.name}.{kernel}"
        return launch


SPECS: dict[str, OpSpec] = {}


def contract(condition: Any, message: str) -> None:
    """Assert a term of an op's contract in a fake kernel (``torch._check``: evaluated on the
    inputs' metadata, also symbolically under ``torch.compile``)."""
    torch._check(condition, lambda: message)


def check_rows(name: str, *tensors: Tensor, dims: int) -> None:
    """The contract every op's tensors share: `dims`-D, floating, one batch size (dim 0)."""
    for t in tensors:
        contract(t.dim() == dims, f"{name}: expected {dims}-D tensors, got shape {tuple(t.shape)}")
        contract(t.is_floating_point(), f"{name}: expected floating tensors, got {t.dtype}")
        contract(t.shape[0] == tensors[0].shape[0], f"{name}: all tensors must share one batch size")


def register(spec: OpSpec) -> OpSpec:
    """Define `spec`'s kernels in every kdfast library, with their fakes, the Triton launchers and
    the autograd formulas; record it in :data:`SPECS`. Called once, by the op's module."""
    if spec.name in SPECS:
        raise RuntimeError(f"op {spec.name!r} is registered twice")
    names = set(spec.kernel_names)
    for formula in spec.autograd:
        if formula.forward not in names:
            raise ValueError(f"{spec.name}: autograd for unknown kernel {formula.forward!r}")
    for library, lib in _LIBRARY_OBJECTS.items():
        for kernel in spec.kernels:
            lib.define(kernel.name + kernel.schema)
            qualname = f"{library}::{kernel.name}"
            if library == TRITON_LIBRARY:
                launcher = spec.triton_launcher(kernel.name)
                for key in ("CPU", "CUDA"):
                    lib.impl(kernel.name, launcher, key)
            torch.library.register_fake(qualname, kernel.fake, lib=lib)
        for formula in spec.autograd:
            torch.library.register_autograd(
                f"{library}::{formula.forward}",
                _bind(formula.backward, getattr(torch.ops, library)),
                setup_context=formula.setup,
                lib=lib,
            )
    SPECS[spec.name] = spec
    return spec


def _bind(backward: Callable[..., Any], ops: Any) -> Callable[..., Any]:
    def bound(ctx: Any, *grads: Any) -> Any:
        return backward(ops, ctx, *grads)

    return bound


def all_specs() -> dict[str, OpSpec]:
    """Every op of the package: imports each public module of kdfast.ops (each registers its spec)."""
    package = importlib.import_module("kdfast.ops")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "spec":
            importlib.import_module(f"kdfast.ops.{module.name}")
    return SPECS
