"""Machinery shared by every op's benchmark: cases, passes, timing, peak memory, bytes, CSV rows.

An op family's module ``bench_<family>.py`` only describes its ops, as a tuple ``SPECS`` of
:class:`OpSpec` (reference and fused functions, inputs, byte model, shapes). This module turns
specs into :class:`Case` objects (op x shape x dtype x backend x pass), runs one case's pass
(:func:`prepare`), measures its peak memory (:func:`peak_memory_bytes`), times it on the GPU
(:func:`cuda_times`; the CPU is timed by pytest-benchmark in cpu_timing.py) and writes
:class:`Row` objects into the device's CSV (:func:`merge_csv`).

This module does not import kdfast at import time (:func:`kdfast_backends`): kdfast reads
``TRITON_INTERPRET`` when it is imported, which ``benchmarks.run`` sets after parsing its options.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import platform
import re
import statistics
import weakref
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch._functorch.config as functorch_config
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

PASSES = ("fwd", "bwd", "fwd+bwd")
REFERENCE_BACKENDS = ("eager", "compiled")
FUSED_BACKENDS = ("cpu", "cuda", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "bfloat16", "float16")}
WARMUP_CALLS = 2  # before memory and timing; the first call of a "compiled" case compiles
CUDA_WARMUP_MS = 25  # triton.testing.do_bench's warmup and rep are milliseconds of GPU time
CUDA_REP_MS = 100
RESULTS_DIR = Path(__file__).parent / "results"
CSV_COLUMNS = (
    "op", "backend", "pass", "dtype", "shape", "median_ms", "p20_ms", "p80_ms",
    "peak_mem_bytes", "gbps", "device", "torch", "triton", "timestamp",
)  # fmt: skip
KEY_COLUMNS = ("op", "backend", "pass", "dtype", "shape")

Stage = tuple[int, int, int, int]  # (B, C, H, W) of one feature map
Shape = tuple[Stage, ...]  # the feature maps of one call (one stage, or the stages of a network)


@dataclass(frozen=True)
class Inputs:
    """Arguments of one call of an op, and what its gradient is taken of."""

    args: tuple[Any, ...]
    grad_inputs: tuple[Tensor, ...]  # the tensors that receive a gradient (the student side)
    grad_output: Tensor | None = None  # upstream gradient; None for a scalar output


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op, as an op family's module describes it."""

    name: str  # the public name, e.g. "at_loss"
    family: str  # the kdfast.backends op key, e.g. "at"
    reference: Callable[..., Tensor]  # eager reference (kdfast/reference), called as reference(*args)
    fused: Callable[..., Tensor]  # public kdfast function, called as fused(*args, backend=name)
    make_inputs: Callable[[Shape, torch.dtype, torch.device], Inputs]
    bytes_moved: Callable[[Shape, torch.dtype, str], int]  # (shape, dtype, pass) -> bytes
    shapes: Mapping[str, Sequence[Shape]]  # shape set name (see shape_set_name) -> shapes


@dataclass(frozen=True)
class Case:
    """One measurement: an op on one shape, dtype, backend and pass."""

    spec: OpSpec
    backend: str  # "eager", "compiled" or a fused kdfast backend
    pass_: str  # one of PASSES
    dtype: torch.dtype
    shape: Shape
    device: torch.device

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """The CSV key (KEY_COLUMNS): a re-run replaces the row with the same key."""
        return (self.spec.name, self.backend, self.pass_, dtype_name(self.dtype), shape_label(self.shape))

    @property
    def id(self) -> str:
        return "/".join(self.key)

    @property
    def bytes_moved(self) -> int:
        return self.spec.bytes_moved(self.shape, self.dtype, self.pass_)


@dataclass(frozen=True)
class Row:
    """One line of a results CSV (CSV_COLUMNS, with ``pass_`` written as "pass")."""

    op: str
    backend: str
    pass_: str
    dtype: str
    shape: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_bytes: int | None  # None where it cannot be measured (see peak_memory_bytes)
    gbps: float
    device: str
    torch: str
    triton: str
    timestamp: str

    def as_csv(self) -> dict[str, str]:
        values = {("pass" if k == "pass_" else k): v for k, v in asdict(self).items()}
        return {k: _csv_value(v) for k, v in values.items()}


# --- Names.


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_label(shape: Shape) -> str:
    """"64x16x32x32" for one feature map, stages joined by "+" for several."""
    return "+".join("x".join(map(str, stage)) for stage in shape)


def shape_set_name(device: torch.device, quick: bool, interpreted: bool) -> str:
    """Key of OpSpec.shapes: "tiny" under the Triton interpreter, else "cpu", "cuda", "cpu-quick", ..."""
    if interpreted:
        return "tiny"
    return device.type + ("-quick" if quick else "")


# --- The case matrix.


def kdfast_backends() -> ModuleType:
    """The module kdfast.backends, imported on first use (see the module docstring)."""
    from kdfast import backends

    return backends


def default_backends(spec: OpSpec, device: torch.device) -> list[str]:
    """The references and every fused backend available on `device` (Triton on the CPU, i.e.
    the interpreter, only when asked for explicitly)."""
    fused = [b for b in kdfast_backends().available(spec.family, device) if b in FUSED_BACKENDS]
    if device.type == "cpu":
        fused = [b for b in fused if b != "triton"]
    return [*REFERENCE_BACKENDS, *fused]


def unavailable_reason(spec: OpSpec, backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `spec` on `device`, or None if it can."""
    if backend in REFERENCE_BACKENDS:
        return None
    return kdfast_backends().unavailable_reason(spec.family, backend, device)


def make_cases(
    specs: Iterable[OpSpec],
    device: torch.device,
    shape_set: str,
    backend_names: Sequence[str] | None,
    dtype_names: Sequence[str],
    passes: Sequence[str],
    shape_filter: str = "",
) -> list[Case]:
    """Every (op, shape, dtype, backend, pass) case; `backend_names` None means default_backends."""
    return [
        Case(spec, backend, pass_, DTYPES[dtype], shape, device)
        for spec in specs
        for shape in spec.shapes[shape_set]
        if shape_filter in shape_label(shape)
        for dtype in dtype_names
        for backend in (backend_names or default_backends(spec, device))
        for pass_ in passes
    ]


# --- Running one case.


def implementation(spec: OpSpec, backend: str) -> Callable[..., Tensor]:
    """The function a backend runs: the reference, torch.compile of it, or kdfast's fused op.

    "compiled" resets Dynamo first, so every case compiles its own static-shape graph
    (Inductor's on-disk cache makes the passes of one op/shape/dtype cheap to recompile) and no
    case runs into the recompilation limit or into automatic dynamic shapes.
    """
    if backend == "eager":
        return spec.reference
    if backend == "compiled":
        torch._dynamo.reset()
        return torch.compile(spec.reference, dynamic=False)
    return functools.partial(spec.fused, backend=backend)


def pass_callable(op: Callable[..., Tensor], inputs: Inputs, pass_: str) -> Callable[[], object]:
    """What one timed call of `pass_` runs.

    * "fwd": the op, with autograd recording as in training (the student inputs require grad).
    * "bwd": ``torch.autograd.grad`` of an output computed once here, outside the timed region,
      with the graph retained so that the call can repeat; no ``.grad`` is accumulated.
    * "fwd+bwd": the op, then ``torch.autograd.grad`` (the graph is freed).
    """

    def forward() -> Tensor:
        return op(*inputs.args)

    def backward(output: Tensor, retain: bool) -> tuple[Tensor, ...]:
        return torch.autograd.grad(output, inputs.grad_inputs, inputs.grad_output, retain_graph=retain)

    if pass_ == "fwd":
        return forward
    if pass_ == "fwd+bwd":
        return lambda: backward(forward(), retain=False)
    return functools.partial(backward, forward(), retain=True)


def prepare(case: Case) -> Callable[[], object]:
    """The callable to time for `case`: inputs built (seeded), warmed up (compiled if needed).

    A compiled backward that donates saved buffers refuses ``retain_graph=True``, so the "bwd"
    pass compiles without buffer donation (``torch._functorch.config.donated_buffer``); the
    other passes keep the default.
    """
    torch.manual_seed(0)
    inputs = case.spec.make_inputs(case.shape, case.dtype, case.device)
    donation = functorch_config.patch(donated_buffer=False) if case.pass_ == "bwd" else contextlib.nullcontext()
    with donation:
        fn = pass_callable(implementation(case.spec, case.backend), inputs, case.pass_)
        for _ in range(WARMUP_CALLS):
            fn()
    return fn


# --- Bytes.


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def by_pass(fwd_bytes: int, bwd_bytes: int, pass_: str) -> int:
    """Bytes of a pass from the forward and backward byte models (fwd+bwd moves both)."""
    return {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[pass_]


def gbps(bytes_moved: int, milliseconds: float) -> float:
    return bytes_moved / (milliseconds * 1e6)


# --- Peak memory.


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    Every op that goes through the dispatcher passes here (aten ops, kdfast's C++ and Triton
    custom ops, autograd's backward ops); a storage that one of its outputs owns and that no
    input owned (i.e. not a view, not an in-place or ``out=`` result) counts with its nbytes
    from its creation until it is freed (a weakref finalizer on the untyped storage). Not
    counted: allocator slack and caching, scratch memory a kernel allocates and frees inside
    one op, and storages resized after their creation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storages seen (or counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in _tensors((args, kwargs)):
            self._known.setdefault(tensor.untyped_storage(), False)
        out = func(*args, **(kwargs or {}))
        for tensor in _tensors(out):
            self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._known:
            return
        self._known[storage] = True
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


def _tensors(tree: object) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


def peak_memory_bytes(fn: Callable[[], object], case: Case) -> int | None:
    """Peak bytes allocated during one call of `fn`, above what was allocated before it.

    CUDA: the caching allocator's peak (``max_memory_allocated`` after
    ``reset_peak_memory_stats``) minus ``memory_allocated`` before the call. CPU: the peak of
    :class:`LiveTensorBytes`; None for "compiled" there, because under a dispatch mode Dynamo
    does not run the compiled graph but the function eagerly.
    """
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        before = torch.cuda.memory_allocated(case.device)
        fn()
        torch.cuda.synchronize(case.device)
        return torch.cuda.max_memory_allocated(case.device) - before
    if case.backend == "compiled":
        return None
    with LiveTensorBytes() as mode:
        fn()
    return mode.peak


# --- Timing.


def summarize(times_ms: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile), linear interpolation (as numpy's default)."""
    cuts = statistics.quantiles(times_ms, n=5, method="inclusive")
    return statistics.median(times_ms), cuts[0], cuts[3]


def cuda_times(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(median, p20, p80) in ms from ``triton.testing.do_bench`` (L2 flushed before every call)."""
    from triton.testing import do_bench  # triton is optional: only the GPU path needs it

    median, p20, p80 = do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


# --- Rows and CSV files.


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_row(case: Case, times_ms: tuple[float, float, float], peak: int | None, timestamp: str) -> Row:
    median, p20, p80 = times_ms
    speed = gbps(case.bytes_moved, median)
    return Row(*case.key, median, p20, p80, peak, speed, timestamp=timestamp, **environment(case.device))


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+", ...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_model(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(device: torch.device) -> dict[str, str]:
    """The device, torch and triton columns of the rows measured on `device` (on the CPU, the
    device includes torch's thread count)."""
    name = device_model(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        name += f" ({threads} thread{'' if threads == 1 else 's'})"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"device": name, "torch": torch.__version__, "triton": triton_version}


def default_results_path(device: torch.device) -> Path:
    """benchmarks/results/<device type>-<device column, sanitised>.csv, e.g.
    cpu-amd-epyc-2-threads.csv, cuda-nvidia-h100-80gb-hbm3.csv."""
    name = re.sub(r"\((r|tm)\)", "", environment(device)["device"], flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return RESULTS_DIR / f"{device.type}-{slug}.csv"


def merge_csv(path: Path, rows: Iterable[Row]) -> None:
    """Write `rows` into the CSV at `path`, replacing rows with the same key (KEY_COLUMNS)."""
    merged: dict[tuple[str, ...], dict[str, str]] = {}
    if path.exists():
        with path.open(newline="") as file:
            for line in csv.DictReader(file):
                merged[tuple(line[k] for k in KEY_COLUMNS)] = line
    for row in rows:
        line = row.as_csv()
        merged[tuple(line[k] for k in KEY_COLUMNS)] = line
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
    os.replace(partial, path)


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
