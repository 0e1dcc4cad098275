"""Machinery shared by every op's benchmark: cases, passes, timing, peak memory, bytes, CSV rows.

An op family's module ``bench_<family>.py`` only describes its ops, as a tuple ``SPECS`` of
:class:`OpSpec` (reference and fused functions, inputs, byte model, shapes). This module turns
specs into :class:`Case` objects (op x shape x dtype x backend x pass), builds one case's pass
(:func:`prepare`, a :class:`Timed`), measures its peak memory (:func:`peak_memory_bytes`), times
it on the GPU (:func:`cuda_times`; the CPU is timed by pytest-benchmark in cpu_timing.py) and
writes :class:`Row` objects into the device's CSV (:func:`merge_csv`). Rows, result files,
environment columns and :class:`LiveTensorBytes` live in the package (``kdfast.engine.results``,
re-exported here), so that ``kdfast bench --e2e`` writes the same files from a wheel; so do the
quantiles of a list of times (``summarize``) and the peak memory of one call
(``kdfast.engine.timing``).

This module imports no kdfast op at import time (:func:`kdfast_backends`): kdfast reads
``TRITON_INTERPRET`` when its ops are imported, which ``benchmarks.run`` sets after parsing its
options (``kdfast.engine.results`` imports torch only).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch._functorch.config as functorch_config
from torch import Tensor

from kdfast.engine.results import (  # noqa: F401  (re-exported: the op benchmarks' rows and files)
    CSV_COLUMNS,
    KEY_COLUMNS,
    RESULTS_DIR,
    LiveTensorBytes,
    Row,
    cpu_model,
    default_results_path,
    device_model,
    environment,
    measured_row,
    merge_csv,
    now,
    results_path,
)
from kdfast.engine.timing import peak_bytes
from kdfast.engine.timing import quantiles as summarize  # noqa: F401  (re-exported: the (median, p20, p80) of cpu_timing, cuda_times)

PASSES = ("fwd", "bwd", "fwd+bwd")
REFERENCE_BACKENDS = ("eager", "compiled")
FUSED_BACKENDS = ("cpu", "cuda", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "bfloat16", "float16")}
WARMUP_CALLS = 2  # before memory and timing; the first call of a "compiled" case compiles
CUDA_WARMUP_MS = 25  # triton.testing.do_bench's warmup and rep are milliseconds of GPU time
CUDA_REP_MS = 100
CUDA_FLUSH_BYTES = 256 << 20  # zeroed before every call of a setup-timed pass (do_bench flushes as much)
# Reference cases ("eager", "compiled") whose OpSpec.reference_bytes estimate exceeds this are
# not run but recorded (unmeasured_row): NaN times, the estimate as peak memory, the reason.
REFERENCE_MEMORY_LIMIT = 8 << 30

# The shape of one input tensor of a call: a (B, C, H, W) feature map (AT ops) or (B, K) logits
# (KD, DKD: the student's; the teacher's is the same).
Stage = tuple[int, ...]
Shape = tuple[Stage, ...]  # the tensors of one call (one stage, the stages of a network, one logit pair)


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
    # The fused backends' byte model where their work is split differently between the passes
    # (KD, DKD: the forward of a reduced loss also writes the gradient); None: bytes_moved.
    fused_bytes_moved: Callable[[Shape, torch.dtype, str], int] | None = None
    # The output's backward can run only once per forward (kdfast's reduced logit losses scale
    # their forward-computed gradient in place): "bwd" then rebuilds the output, untimed, before
    # every timed call instead of retaining the graph (see pass_callable).
    backward_once: bool = False
    # Estimated peak bytes of the reference backends, for ops whose reference can need more
    # than a device holds (LCC's N x N matrices): see REFERENCE_MEMORY_LIMIT. None: always run.
    reference_bytes: Callable[[Shape, torch.dtype, str], int] | None = None


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
        model = self.spec.bytes_moved
        if self.backend in FUSED_BACKENDS and self.spec.fused_bytes_moved is not None:
            model = self.spec.fused_bytes_moved
        return model(self.shape, self.dtype, self.pass_)

    @property
    def skip_reason(self) -> str | None:
        """Why the case is recorded without being run (unmeasured_row), or None to run it."""
        model = self.spec.reference_bytes
        if self.backend not in REFERENCE_BACKENDS or model is None:
            return None
        need = model(self.shape, self.dtype, self.pass_)
        if need <= REFERENCE_MEMORY_LIMIT:
            return None
        return f"not run: the reference needs about {need / 2**30:.3g} GiB (limit {REFERENCE_MEMORY_LIMIT / 2**30:g} GiB)"


# --- Names.


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_label(shape: Shape) -> str:
    """ "64x16x32x32" for one feature map, stages joined by "+" for several; "256x1000" for logits."""
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


@dataclass(frozen=True)
class Timed:
    """One pass of a case: ``run()`` is the timed call; ``setup()``, where given, runs untimed
    before every call (it builds the fresh graph of a backward that can run only once)."""

    run: Callable[[], object]
    setup: Callable[[], object] | None = None

    def __call__(self) -> object:
        """One untimed call (warm-up): setup, then run."""
        if self.setup is not None:
            self.setup()
        return self.run()


def pass_callable(op: Callable[..., Tensor], inputs: Inputs, pass_: str, backward_once: bool = False) -> Timed:
    """What one timed call of `pass_` runs.

    * "fwd": the op, with autograd recording as in training (the student inputs require grad).
    * "bwd": ``torch.autograd.grad`` of an output computed outside the timed region; no
      ``.grad`` is accumulated. The output is computed once, with the graph retained so that the
      call can repeat, or, with `backward_once`, anew by ``setup`` before every call (graph freed).
    * "fwd+bwd": the op, then ``torch.autograd.grad`` (the graph is freed).
    """

    def forward() -> Tensor:
        return op(*inputs.args)

    def backward(output: Tensor, retain: bool) -> tuple[Tensor, ...]:
        return torch.autograd.grad(output, inputs.grad_inputs, inputs.grad_output, retain_graph=retain)

    if pass_ == "fwd":
        return Timed(forward)
    if pass_ == "fwd+bwd":
        return Timed(lambda: backward(forward(), retain=False))
    if backward_once:
        outputs: list[Tensor] = []  # the output that setup built for the next call
        return Timed(lambda: backward(outputs.pop(), retain=False), lambda: outputs.append(forward()))
    return Timed(functools.partial(backward, forward(), retain=True))


def prepare(case: Case) -> Timed:
    """The pass to time for `case`: inputs built (seeded), warmed up (compiled if needed).

    A compiled backward that donates saved buffers refuses ``retain_graph=True``, so the "bwd"
    pass compiles without buffer donation (``torch._functorch.config.donated_buffer``); the
    other passes keep the default.
    """
    torch.manual_seed(0)
    inputs = case.spec.make_inputs(case.shape, case.dtype, case.device)
    donation = functorch_config.patch(donated_buffer=False) if case.pass_ == "bwd" else contextlib.nullcontext()
    with donation:
        timed = pass_callable(implementation(case.spec, case.backend), inputs, case.pass_, case.spec.backward_once)
        for _ in range(WARMUP_CALLS):
            timed()
    return timed


# --- Bytes.


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def by_pass(fwd_bytes: int, bwd_bytes: int, pass_: str) -> int:
    """Bytes of a pass from the forward and backward byte models (fwd+bwd moves both)."""
    return {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[pass_]


def gbps(bytes_moved: int, milliseconds: float) -> float:
    return bytes_moved / (milliseconds * 1e6)


# --- Peak memory.


def peak_memory_bytes(timed: Timed, case: Case) -> int | None:
    """Peak bytes allocated during one timed call (``timed.run``, after an unmeasured
    ``timed.setup`` if any), above what was allocated before it.

    ``kdfast.engine.timing.peak_bytes``: on CUDA the caching allocator's peak
    (``max_memory_allocated`` after ``reset_peak_memory_stats``) minus ``memory_allocated`` before
    the call; on the CPU the peak of :class:`LiveTensorBytes`, None for "compiled" there, because under a dispatch mode Dynamo
    does not run the compiled graph but the function eagerly.
    """
    if case.backend == "compiled" and case.device.type == "cpu":
        return None
    if timed.setup is not None:
        timed.setup()
    return peak_bytes(timed.run, case.device)


# --- Timing.


def cuda_times(timed: Timed) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of ``timed.run``, L2 flushed before every call.

    ``triton.testing.do_bench`` where the call repeats by itself. With a ``setup`` (which
    do_bench cannot run between calls) the same procedure by hand: calls for about
    CUDA_WARMUP_MS, then for about CUDA_REP_MS, each preceded by the setup and by zeroing
    CUDA_FLUSH_BYTES (the L2 flush of do_bench) and timed alone with CUDA events.
    """
    if timed.setup is None:
        from triton.testing import do_bench  # triton is optional: only the GPU path needs it

        median, p20, p80 = do_bench(timed.run, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    setup = timed.setup
    flush = torch.empty(CUDA_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def call_times(calls: int) -> list[float]:
        events = []
        for _ in range(calls):
            setup()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            timed.run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    estimate = max(statistics.median(call_times(5)), 1e-3)
    call_times(max(1, round(CUDA_WARMUP_MS / estimate)))
    return summarize(call_times(max(1, round(CUDA_REP_MS / estimate))))


# --- Rows and CSV files.


def make_row(case: Case, times_ms: tuple[float, float, float], peak: int | None, timestamp: str) -> Row:
    median, p20, p80 = times_ms
    speed = gbps(case.bytes_moved, median)
    return Row(*case.key, median, p20, p80, peak, speed, timestamp=timestamp, **environment(case.device))


def unmeasured_row(case: Case) -> Row:
    """The row of a case that is not run (Case.skip_reason): NaN times and GB/s, the estimated
    peak memory (OpSpec.reference_bytes) and the reason in ``note``."""
    model, reason = case.spec.reference_bytes, case.skip_reason
    if model is None or reason is None:
        raise ValueError(f"{case.id} is not a skipped case")
    nan = float("nan")
    peak = model(case.shape, case.dtype, case.pass_)
    return Row(*case.key, nan, nan, nan, peak, nan, timestamp=now(), note=reason, **environment(case.device))
