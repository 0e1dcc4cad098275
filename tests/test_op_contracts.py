"""The contract every fused op keeps, on every backend and device: one test per property, over
every op declared in kdfast/ops (kdfast.ops.spec.all_specs) and its samples (OpSpec.samples).

* opcheck of every kernel call the samples make (schema, fake kernel, autograd registration,
  AOT dispatch; map_distance also calls AT's kernels), and the samples reach every kernel of the
  op;
* torch.compile(fullgraph=True) gives the eager values and gradients;
* gradcheck in float64 (fast mode: random projections of the Jacobian, every input involved);
* the standard bad inputs: an integer tensor or one with an extra dim as the first tensor of a
  forward kernel is refused with an error (not a crash, not a result).

The op test files (tests/test_<op>.py) keep what is specific to their op: values and gradients
against the float64 reference in every dtype and layout, the launchers' limits, the functional
layer's messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import device_backends
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from kdfast.ops.spec import OpSpec, Sample, all_specs

SPECS = all_specs()


def cases() -> list:
    """(op, device, backend) for every op and each of its (device, backend) params."""
    params = []
    for op in SPECS:
        for p in device_backends(op):
            params.append(pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}"))
    return params


def inputs(sample: Sample, dtype: torch.dtype, device: str) -> tuple[Tensor, ...]:
    """Fresh leaves: the sample's floating inputs cast to `dtype`, all moved to `device`."""
    return tuple(
        t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).requires_grad_(t.requires_grad)
        for t in sample.inputs
    )


def differentiable(xs: tuple[Tensor, ...]) -> list[Tensor]:
    return [x for x in xs if x.requires_grad]


def scalar(out: Tensor) -> Tensor:
    """A fixed, non-uniform weighting of an op's output (so every output entry matters)."""
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    return (out * weights).sum()


class Recorder(TorchDispatchMode):
    """Records the calls of one torch.ops namespace (below autograd), with copies of their args."""

    def __init__(self, namespace: str, differentiable_kernels: set[str]):
        super().__init__()
        self.namespace = namespace
        self.differentiable = differentiable_kernels
        self.calls: list[tuple[torch._ops.OpOverload, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == self.namespace:
            keep_grad = func._opname in self.differentiable

            def copy(x):
                if isinstance(x, Tensor):
                    y = x.detach().clone()
                    return y.requires_grad_(keep_grad and x.requires_grad and y.is_floating_point())
                return x

            self.calls.append((func, tree_map(copy, args)))
        return func(*args, **(kwargs or {}))


def namespace_of(backend: str) -> str:
    return {"triton": "kdfast_triton", "cuda_emu": "kdfast_emu"}.get(backend, "kdfast")


def record(spec: OpSpec, sample: Sample, device: str, backend: str) -> list[tuple[torch._ops.OpOverload, tuple]]:
    """The kernel calls of one forward and backward of `sample` in float32."""
    xs = inputs(sample, torch.float32, device)
    recorder = Recorder(namespace_of(backend), {a.forward for a in spec.autograd})
    with recorder:
        out = sample.run(*xs, backend=backend)
        torch.autograd.grad(scalar(out), differentiable(xs))
    return recorder.calls


def each_call(op: str, device: str, backend: str) -> Iterator[tuple[Sample, torch._ops.OpOverload, tuple]]:
    spec = SPECS[op]
    for sample in spec.samples():
        for func, args in record(spec, sample, device, backend):
            yield sample, func, args


def flags(args: tuple) -> str:
    """The non-tensor arguments of a call (its strings, flags and numbers)."""
    return repr([a for a in args if not isinstance(a, (Tensor, list))])


@pytest.mark.parametrize("op,device,backend", cases())
def test_opcheck(op, device, backend):
    """opcheck of each kernel once per distinct set of non-tensor arguments the samples use."""
    called, checked = set(), set()
    for sample, func, args in each_call(op, device, backend):
        called.add(func._opname)
        key = (func._opname, flags(args))
        if sample.repeatable_backward and key not in checked:
            checked.add(key)
            torch.library.opcheck(func, args)
    assert called >= set(SPECS[op].kernel_names), "the samples must call every kernel of the op"


@pytest.mark.parametrize("op,device,backend", cases())
def test_gradcheck_float64(op, device, backend):
    for sample in SPECS[op].samples():
        if not sample.repeatable_backward:
            continue  # gradcheck runs the backward twice; the op's test file checks this gradient
        xs = inputs(sample, torch.float64, device)
        leaves = differentiable(xs)
        positions = [i for i, x in enumerate(xs) if x.requires_grad]

        def fn(*diff: Tensor, sample: Sample = sample, xs: tuple = xs, positions: list = positions) -> Tensor:
            merged = list(xs)
            for i, d in zip(positions, diff, strict=True):
                merged[i] = d
            return sample.run(*merged, backend=backend)

        assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=True), sample.label


@pytest.mark.parametrize("op,device,backend", cases())
def test_compile_fullgraph(op, device, backend):
    """All the op's samples in one compiled function: the eager values and gradients."""
    samples = SPECS[op].samples()
    xs = [inputs(sample, torch.float32, device) for sample in samples]
    leaves = [x for sample_inputs in xs for x in differentiable(sample_inputs)]

    def step(*flat: Tensor) -> Tensor:
        it = iter(flat)
        outs = [sample.run(*[next(it) for _ in sample_inputs], backend=backend) for sample, sample_inputs in zip(samples, xs)]
        return torch.stack([scalar(out) for out in outs])

    flat = [x for sample_inputs in xs for x in sample_inputs]
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(*flat)
    grads = torch.autograd.grad(out.sum(), leaves)
    eager = step(*flat)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)


BAD_FIRST_TENSOR: dict[str, Callable[[Tensor], Tensor]] = {
    "integer": lambda t: t.to(torch.int32),
    "extra dim": lambda t: t.unsqueeze(0),
}


def replace_first_tensor(args: tuple, change: Callable[[Tensor], Tensor]) -> tuple:
    """`args` with its first tensor (the first element of a first tensor list) changed."""
    items = list(args)
    for i, a in enumerate(items):
        if isinstance(a, Tensor):
            items[i] = change(a.detach())
            return tuple(items)
        if isinstance(a, list) and a and isinstance(a[0], Tensor):
            items[i] = [change(a[0].detach()), *a[1:]]
            return tuple(items)
    raise AssertionError("no tensor argument")


@pytest.mark.parametrize("bad", BAD_FIRST_TENSOR)
@pytest.mark.parametrize("op,device,backend", cases())
def test_bad_first_tensor_refused(op, device, backend, bad):
    forwards = {a.forward for a in SPECS[op].autograd}
    checked = set()
    for _, func, args in each_call(op, device, backend):
        if func._opname not in forwards or func._opname in checked:
            continue
        checked.add(func._opname)
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            func(*replace_first_tensor(args, BAD_FIRST_TENSOR[bad]))
    assert checked == forwards
