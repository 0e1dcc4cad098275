"""Comparisons the per-op tests share: a fused op's value and gradients against the float64
reference, the largest tensor an op allocates, the loss under bf16 autocast.

Not a test module (no ``test_`` prefix): the per-op test files import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from conftest import assert_close_scaled
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kdfast.numerics.common import compute_dtype

Upstream = float | Sequence[float] | Tensor


def as_float64(arg: Any) -> Any:
    """The reference's copy of one argument: a detached CPU copy of a tensor (float64 if it is
    floating), of each tensor of a list or tuple; anything else as it is."""
    if isinstance(arg, Tensor):
        copy = arg.detach().cpu()
        return copy.double() if copy.is_floating_point() else copy
    if isinstance(arg, list | tuple):
        return type(arg)(as_float64(a) for a in arg)
    return arg


def _differentiated(args: Sequence[Any], wrt: Sequence[int]) -> list[Tensor]:
    """The tensors at the positions `wrt` of `args` (a list argument gives all its tensors)."""
    return [t for i in wrt for t in tree_leaves(args[i]) if isinstance(t, Tensor)]


def check_against_reference(
    fused: Callable[..., Tensor],
    reference: Callable[..., Tensor],
    args: Sequence[Any],
    loss_tol: float,
    grad_tol: float,
    *,
    wrt: Sequence[int] = (0,),
    upstream: Upstream = 1.0,
    dtype: torch.dtype | None = None,
    floor: float = 1e-30,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``out = fused(*args)`` and its gradients against the float64 reference on the same (already
    rounded) inputs: ``expected = reference(*map(as_float64, args))``, the copies at `wrt` requiring grad.

    The gradients are those of ``sum(upstream * out)`` (upstream broadcast to out's shape, exact
    in float64 for the reference, rounded to out's dtype for the fused op) with respect to the
    tensors at the positions `wrt` (lists flattened). Asserted: out has `dtype` (default: the
    compute dtype of the first differentiated tensor) and the reference's shape; each gradient has
    its tensor's dtype and shape; out and the gradients are finite;
    ``|out - expected| <= loss_tol * (|expected| + max(max|expected|, floor))`` and likewise the
    gradients with grad_tol (:func:`conftest.assert_close_scaled`). Returns out and the gradients.
    """
    out = fused(*args)
    inputs = _differentiated(args, wrt)
    args64 = [as_float64(a) for a in args]
    inputs64 = [t.requires_grad_() for t in _differentiated(args64, wrt)]
    expected = reference(*args64)
    up64 = torch.broadcast_to(torch.as_tensor(upstream, dtype=torch.float64), expected.shape)
    grads = torch.autograd.grad(out, inputs, up64.to(out.dtype).to(out.device))
    expected_grads = torch.autograd.grad(expected, inputs64, up64)
    assert out.dtype == (dtype or compute_dtype(inputs[0].dtype)) and out.shape == expected.shape
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_scaled(out, expected, loss_tol, "loss", floor)
    for i, (x, g, e) in enumerate(zip(inputs, grads, expected_grads)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_scaled(g, e, grad_tol, f"grad {i}", floor)
    return out, grads


class LargestTensor(TorchDispatchMode):
    """While active, over the tensors the out-of-place ops return: `largest`, the most bytes of
    one, and `largest_new`, the most elements of one whose storage is none of its op's inputs' (not
    a view of them). In-place ops (named ``..._``, such as the Triton interpreter's ``set_`` of its
    views of the kernel arguments) allocate nothing: not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_new = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.overloadpacket.__name__.endswith("_"):
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
            returned = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
            new = [t.numel() for t in returned if t.untyped_storage().data_ptr() not in inputs]
            self.largest = max([self.largest, *(t.nbytes for t in returned)])
            self.largest_new = max([self.largest_new, *new])
        return out


def assert_float32_and_unchanged_under_autocast(loss: Callable[[], Tensor], device: str) -> None:
    """`loss()` under bf16 autocast on `device` is float32 and equal (rtol 1e-5, atol 1e-7) to
    `loss()` without it."""
    plain = loss()
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = loss()
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-7)


def assert_deterministic(loss: Callable[[], Tensor], wrt: Sequence[Tensor], threads: Sequence[int] = (1, 2, 1)) -> None:
    """``loss()`` and the gradients of its sum to `wrt` are bitwise the same on every call, one call
    per torch thread count in `threads` (the thread count is restored after)."""
    saved = torch.get_num_threads()
    results = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            out = loss()
            results.append((out, *torch.autograd.grad(out.sum(), wrt)))
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
