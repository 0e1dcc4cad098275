"""Records the Triton launches that kdfast's launchers make, without a GPU and without launching.

The launchers (``kdfast.kernels.*``) are driven with tensors on the "meta" device while
:func:`recording` replaces ``JITFunction.run`` (what ``kernel[grid](...)`` calls) by a recorder
and makes the launchers' device queries answer as a CUDA device with ``sms`` multiprocessors.
A launch is stored as a :class:`Launch` of version-independent argument descriptors (a tensor
is its dtype and its data pointer modulo 16; ints, floats, bools and ``tl`` dtypes are their
values; a tuple is its elements'), which :func:`stand_in` turns back into arguments that any
installed Triton's binder specialises exactly as a GPU launch would (``MockTensor``-like objects
with ``data_ptr()`` and ``dtype``). A meta tensor's ``data_ptr()`` is its byte offset from a base at 0, so a fresh
allocation counts as 16-byte aligned, as the CUDA caching allocator's blocks are.

Import shim: :func:`import_kernels` maps ``kdfast.kernels`` to ``./kernels`` of this checkout
(and ``kdfast`` to ``./kdfast``) without running ``kdfast/__init__.py``, so the recorder and the
compile step run in an environment that has only torch, triton and numpy (no kdfast install,
no ``kdfast._C``). It must run before Triton reads ``TRITON_INTERPRET``: kernels defined under
the interpreter are not JITFunctions and cannot be compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# CUDA launch limits of every NVIDIA GPU since sm_30.
MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass(frozen=True)
class Device:
    """The GPU the launch heuristics are asked about, and the compile target."""

    name: str
    arch: int  # compute capability as 10 * major + minor
    sms: int
    shared_optin: int  # bytes of dynamic shared memory a block may opt in to
    main_only: bool  # checked on the main benchmark shape of every op only (the compile budget)


DEVICES = {
    "sm90": Device("NVIDIA H200", 90, 132, 232448, False),
    "sm80": Device("NVIDIA A100-SXM4-80GB", 80, 108, 166912, True),
}


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``, with the catalogue case that made it."""

    kernel: str  # "module:qualname" of the JITFunction
    grid: tuple[int, int, int]
    args: list[dict]
    kwargs: dict[str, dict]
    op: str
    dtype: str
    case: str  # layout and shape of the case


def import_kernels() -> None:
    """Makes ``kdfast.kernels.<name>`` import from this checkout (see the module docstring);
    refuses under TRITON_INTERPRET."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile check needs real JITFunctions: unset TRITON_INTERPRET")
    if "kdfast" not in sys.modules:
        for name, folder in (("kdfast", "kdfast"), ("kdfast.kernels", "kernels")):
            package = types.ModuleType(name)
            package.__path__ = [str(ROOT / folder)]
            sys.modules[name] = package
        setattr(sys.modules["kdfast"], "kernels", sys.modules["kdfast.kernels"])  # noqa: B010 (a module built here)


def kernel_module(name: str) -> types.ModuleType:
    """``kdfast.kernels.<name>`` of this checkout."""
    import_kernels()
    return importlib.import_module(f"kdfast.kernels.{name}")


# ----------------------------------------------------------------------------- descriptors


def describe(value: Any) -> dict:
    """A JSON-able descriptor of a kernel argument."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "offset": value.data_ptr() % 16}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if isinstance(value, tuple):  # a NamedTuple keeps its type: the kernel may read its fields
        named = f"{type(value).__module__}:{type(value).__qualname__}" if hasattr(value, "_fields") else None
        return {"tuple": [describe(v) for v in value], "type": named}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"no descriptor for a kernel argument of type {type(value).__name__}")


class _Pointer:
    """A tensor argument as Triton's binder sees it: a dtype and a data pointer."""

    def __init__(self, dtype, offset: int):
        self.dtype = dtype
        self._ptr = offset

    def data_ptr(self) -> int:
        return self._ptr


def stand_in(desc: dict) -> Any:
    """The argument that :func:`describe` described."""
    import torch
    import triton.language as tl

    if "tensor" in desc:
        return _Pointer(getattr(torch, desc["tensor"]), desc["offset"])
    if "tl" in desc:
        return tl.dtype(desc["tl"])
    if "tuple" in desc:
        items = [stand_in(v) for v in desc["tuple"]]
        if desc["type"] is None:
            return tuple(items)
        module, qualname = desc["type"].split(":")
        return getattr(importlib.import_module(module), qualname)(*items)
    return desc["value"]


# ----------------------------------------------------------------------------- recording


def _device_helpers() -> list[tuple[types.ModuleType, str, Callable]]:
    """The kernel modules' functions of one parameter named ``device`` (SM-count helpers such as
    ``_min_programs``, ``on_device``), as (module, attribute, function)."""
    found = []
    for module in sys.modules.copy().values():
        if not getattr(module, "__name__", "").startswith("kdfast.kernels."):
            continue
        for attr, fn in vars(module).items():
            if not callable(fn) or isinstance(fn, type):
                continue
            try:
                params = list(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            if params == ["device"]:
                found.append((module, attr, fn))
    return found


@contextlib.contextmanager
def recording(device: Device, sink: list[Launch], case: Callable[[], tuple[str, str, str]]) -> Iterator[list[str]]:
    """Within: every ``kernel[grid](...)`` appends a :class:`Launch` to ``sink`` (tagged with
    ``case()`` = (op, dtype, case)) instead of launching, and the kernel modules' device helpers
    are called with ``cuda:0`` against a ``device``-like ``torch.cuda`` (properties, capability,
    ``torch.cuda.device`` a no-op). Yields the patched helpers' names."""
    import torch
    from triton.runtime.jit import JITFunction

    cuda = torch.device("cuda", 0)
    props = types.SimpleNamespace(
        name=device.name,
        major=device.arch // 10,
        minor=device.arch % 10,
        multi_processor_count=device.sms,
        shared_memory_per_block_optin=device.shared_optin,
        warp_size=32,
        total_memory=80 << 30,
    )

    def run(kernel, *args, grid, warmup, **kwargs):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        op, dtype, label = case()
        sink.append(
            Launch(
                f"{kernel.fn.__module__}:{kernel.fn.__qualname__}",
                grid,
                [describe(a) for a in args],
                {k: describe(v) for k, v in kwargs.items()},
                op,
                dtype,
                label,
            )
        )

    def on_cuda(fn):
        inner = getattr(fn, "__wrapped__", fn)  # past an lru_cache: answers depend on `device`
        return lambda device: inner(cuda)

    helpers = _device_helpers()
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(_Patcher())
        patch(JITFunction, "run", run)
        patch(torch.cuda, "get_device_properties", lambda *a, **k: props)
        patch(torch.cuda, "get_device_capability", lambda *a, **k: (props.major, props.minor))
        patch(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
        for module, attr, fn in helpers:
            patch(module, attr, on_cuda(fn))
        yield [f"{module.__name__}.{attr}" for module, attr, _ in helpers]


class _Patcher:
    """setattr with undo on exit."""

    def __enter__(self):
        self._undo = []
        return self

    def __call__(self, obj, attr, value):
        self._undo.append((obj, attr, vars(obj).get(attr, dataclasses.MISSING)))
        setattr(obj, attr, value)

    def __exit__(self, *exc):
        for obj, attr, old in reversed(self._undo):
            if old is dataclasses.MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        return False


def grid_errors(launch: Launch) -> list[str]:
    """The launch's grid dimensions over the CUDA limits (x < 2^31, y and z <= 65535), or < 1."""
    return [
        f"grid {'xyz'[i]} = {g} outside [1, {limit}]"
        for i, (g, limit) in enumerate(zip(launch.grid, MAX_GRID, strict=True))
        if not 1 <= g <= limit
    ]
