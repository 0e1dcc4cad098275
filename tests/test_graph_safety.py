"""Graph-safe launches: a launch captured in a CUDA graph (``torch.cuda.graph``,
``torch.compile(mode="reduce-overhead")``) replays with the arguments of its capture, so a
launcher must not stage anything through a per-call host buffer (a pinned or pageable tensor
built from a Python list and copied to the device: the replay would read freed or stale memory).

* :func:`test_triton_launchers_stage_nothing_on_the_host` (CPU, the Triton interpreter): runs
  every op's forward and backward on the Triton backend and fails on any ``pin_memory`` and on
  any tensor built from Python data (``torch.tensor``, ``as_tensor``, ``from_numpy``) by code in
  ``kernels/``.
* :func:`test_cuda_launchers_stage_nothing_on_the_host` (CPU, the "cuda_emu" backend: the CUDA
  C++ launchers compiled as host C++): runs every op's forward and backward under
  ``torch.profiler``, which records every ATen op the C++ launchers call with its scalar
  arguments, and fails on any pinned allocation (``pin_memory=True``, ``pin_memory``) and any
  ``non_blocking=True`` copy. The CUDA launchers pass their tables by value as kernel parameters.
* :func:`test_graph_replay_matches_eager` (GPU): captures every op's forward and backward in a
  CUDA graph per backend of ``GRAPH_BACKENDS``, replays it on new input values and compares the
  loss and the gradients with an eager run on those values.

``CASES`` holds every op as ``name -> builder(device, dtype) -> (loss_fn, tensors, n_leaves)``:
``loss_fn(*tensors, backend=...)`` returns the 0-d loss and the first ``n_leaves`` tensors
receive gradients.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdfast import _extension
from kdfast import functional as KF

KERNELS_DIR = str(Path(__file__).resolve().parent.parent / "kernels")
GRAPH_BACKENDS = ("triton", "cuda")

Case = Callable[[torch.device, torch.dtype], tuple[Callable[..., torch.Tensor], list[torch.Tensor], int]]


def _randn(device: torch.device, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=dtype)


def _at(device, dtype):
    fs = [_randn(device, dtype, 2, 4, 8, 8), _randn(device, dtype, 2, 8, 4, 4)]
    ft = [_randn(device, dtype, 2, 6, 8, 8), _randn(device, dtype, 2, 8, 4, 4)]
    return lambda a, b, c, d, backend: KF.at_loss([a, b], [c, d], backend=backend), [*fs, *ft], 2


def _kd(device, dtype):
    return (
        lambda z_s, z_t, backend: KF.kd_loss(z_s, z_t, backend=backend),
        [_randn(device, dtype, 4, 10), _randn(device, dtype, 4, 10)],
        1,
    )


def _dkd(device, dtype):
    target = torch.randint(0, 10, (4,), device=device)
    return (
        lambda z_s, z_t, backend: KF.dkd_loss(z_s, z_t, target, backend=backend),
        [_randn(device, dtype, 4, 10), _randn(device, dtype, 4, 10)],
        1,
    )


def _lcc(device, dtype):
    return (
        lambda f_s, f_t, backend: KF.local_correlation_loss(f_s, f_t, grid=2, backend=backend),
        [_randn(device, dtype, 2, 4, 4, 4), _randn(device, dtype, 2, 6, 4, 4)],
        1,
    )


def _sp(device, dtype):
    return (
        lambda f_s, f_t, backend: KF.sp_loss(f_s, f_t, backend=backend),
        [_randn(device, dtype, 4, 3, 2, 2), _randn(device, dtype, 4, 5, 2, 2)],
        1,
    )


def _rkd(device, dtype):
    return (
        lambda e_s, e_t, backend: KF.rkd_loss(e_s, e_t, backend=backend),
        [_randn(device, dtype, 5, 6), _randn(device, dtype, 5, 8)],
        1,
    )


def _modules(device, dtype):
    fs = [_randn(device, dtype, 2, 4, 8, 8), _randn(device, dtype, 2, 8, 4, 4)]
    hs = [_randn(device, dtype, 2, 6, 8, 8), _randn(device, dtype, 2, 6, 4, 4)]
    ft = [_randn(device, dtype, 2, 6, 8, 8), _randn(device, dtype, 2, 6, 4, 4)]
    return [*fs, *hs, *ft], 4


def _ndam(weighting):
    def build(device, dtype):
        tensors, leaves = _modules(device, dtype)
        return (
            lambda a, b, c, d, e, f, backend: KF.ndam_loss([a, b], [c, d], [e, f], grid=2, weighting=weighting, backend=backend),
            tensors,
            leaves,
        )

    return build


def _aft(device, dtype):
    tensors, leaves = _modules(device, dtype)
    return lambda a, b, c, d, e, f, backend: KF.aft_loss([a, b], [c, d], [e, f], grid=2, backend=backend), tensors, leaves


def _masked_mse(device, dtype):
    return (
        lambda x, y, m, backend: KF.masked_mse(x, y, m, backend=backend),
        [_randn(device, dtype, 2, 3, 4, 4), _randn(device, dtype, 2, 3, 4, 4), torch.rand(2, 4, 4, device=device)],
        2,
    )


def _map_distance(device, dtype):
    fs = [_randn(device, dtype, 2, 3, 8, 8), _randn(device, dtype, 2, 4, 4, 4)]
    ft = [_randn(device, dtype, 2, 5, 8, 8), _randn(device, dtype, 2, 6, 4, 4), _randn(device, dtype, 2, 2, 4, 4)]
    att = torch.rand(2, 3, 2, device=device, dtype=dtype).softmax(-1)
    return (lambda a, b, att, c, d, e, backend: KF.map_distance_loss([a, b], [c, d, e], att, backend=backend), [*fs, att, *ft], 3)


CASES: dict[str, Case] = {
    "at": _at,
    "kd": _kd,
    "dkd": _dkd,
    "lcc": _lcc,
    "sp": _sp,
    "rkd": _rkd,
    "ndam": _ndam("none"),
    "ndam_teacher": _ndam("teacher"),
    "aft": _aft,
    "masked_mse": _masked_mse,
    "map_distance": _map_distance,
}


def _loss_and_grads(fn, tensors: list[torch.Tensor], n_leaves: int, backend: str) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() if i < n_leaves else t for i, t in enumerate(tensors)]
    loss = fn(*leaves, backend=backend)
    return [loss, *torch.autograd.grad(loss, leaves[:n_leaves])]


@contextlib.contextmanager
def _host_staging_recorded(calls: list[str]):
    """Within: ``pin_memory`` anywhere and tensors built from Python data by code in kernels/ are
    appended to ``calls``."""
    patches = []

    def wrap(owner, name, from_kernels_only):
        original = getattr(owner, name)

        def recorder(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not from_kernels_only or caller.startswith(KERNELS_DIR):
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, recorder)

    for name in ("tensor", "as_tensor", "from_numpy"):
        wrap(torch, name, True)
    wrap(torch.Tensor, "pin_memory", False)
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


@pytest.mark.parametrize("op", sorted(CASES))
def test_triton_launchers_stage_nothing_on_the_host(op):
    fn, tensors, n_leaves = CASES[op](torch.device("cpu"), torch.float32)
    calls: list[str] = []
    with _host_staging_recorded(calls):
        _loss_and_grads(fn, tensors, n_leaves, "triton")
    assert calls == [], f"{op}: per-call host staging in a Triton launcher: {calls}"


def test_host_staging_recorder_sees_a_staged_table():
    """Negative control: the recorder reports the pattern that broke graph replays."""
    calls: list[str] = []
    kernels_file = str(Path(KERNELS_DIR) / "staged.py")
    stage = compile("torch.tensor([[1, 2]], dtype=torch.int64).pin_memory()", kernels_file, "eval")
    with _host_staging_recorded(calls), contextlib.suppress(RuntimeError):  # pinning needs a CUDA driver
        eval(stage, {"torch": torch})
    assert calls and calls[0].startswith("tensor from " + kernels_file)


def _flag_arguments(op_name: str) -> set[tuple[int, int]]:
    """(argument count, position) of the ``pin_memory`` and ``non_blocking`` arguments over the
    overloads of the ATen op named ``aten::<name>`` (empty for other ops)."""
    packet = getattr(torch.ops.aten, op_name.removeprefix("aten::"), None) if op_name.startswith("aten::") else None
    found = set()
    for overload in packet.overloads() if packet is not None else ():
        arguments = getattr(packet, overload)._schema.arguments
        found |= {(len(arguments), i) for i, a in enumerate(arguments) if a.name in ("pin_memory", "non_blocking")}
    return found


def _host_staging_events(run: Callable[[], object]) -> list[str]:
    """The ATen ops that `run` calls (from Python or C++) that pin host memory or copy without
    blocking: what a per-call host staging buffer needs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    # pinning fails without a CUDA driver: the op is recorded before it runs
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof, contextlib.suppress(RuntimeError):
        run()
    staged = []
    for event in prof.events():
        values = list(getattr(event, "concrete_inputs", None) or [])
        flagged = "pin_memory" in event.name or any(
            count == len(values) and values[i] is True for count, i in _flag_arguments(event.name)
        )
        if flagged:
            staged.append(f"{event.name}{values}")
    return staged


@pytest.mark.skipif(_extension.EMU_LOAD_ERROR is not None, reason=f"kdfast._C_emu is not loaded ({_extension.EMU_LOAD_ERROR})")
@pytest.mark.parametrize("op", sorted(CASES))
def test_cuda_launchers_stage_nothing_on_the_host(op):
    fn, tensors, n_leaves = CASES[op](torch.device("cpu"), torch.float32)
    staged = _host_staging_events(lambda: _loss_and_grads(fn, tensors, n_leaves, "cuda_emu"))
    assert staged == [], f"{op}: per-call host staging in a CUDA launcher: {staged}"


def test_host_staging_events_see_pinning_and_async_copies():
    """Negative control: the profiler check reports a pinned allocation and a non-blocking copy."""
    staged = _host_staging_events(lambda: (torch.ones(3).to(torch.float64, non_blocking=True), torch.empty(4, pin_memory=True)))
    assert any(s.startswith("aten::to") for s in staged) and any("pin" in s or "empty" in s for s in staged[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("op", sorted(CASES))
def test_graph_replay_matches_eager(op, backend):
    device = torch.device("cuda")
    torch.manual_seed(0)
    fn, static, n_leaves = CASES[op](device, torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the caching allocator
        for _ in range(2):
            _loss_and_grads(fn, static, n_leaves, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _loss_and_grads(fn, static, n_leaves, backend)

    fresh = CASES[op](device, torch.float32)[1]  # new values, same shapes
    with torch.no_grad():
        for dst, src in zip(static, fresh):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = _loss_and_grads(fn, fresh, n_leaves, backend)
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
