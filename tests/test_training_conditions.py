"""Every fused loss under the engine's training conditions, on the reference ("torch") and the C++
("cpu") backends: bf16 autocast (float32 result, equal to the result without autocast) and a
teacher run under torch.inference_mode (backward works and gives the same gradient)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kdfast import backends
from kdfast import functional as F


def _inputs():
    gen = torch.Generator().manual_seed(0)
    f_s, f_t = (torch.randn(4, 8, 8, 8, generator=gen) for _ in range(2))
    z_s, z_t = (torch.randn(4, 10, generator=gen) for _ in range(2))
    return f_s, f_t, z_s, z_t, torch.tensor([1, 0, 9, 3])


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "at": lambda f_s, f_t, z_s, z_t, y, b: F.at_loss(f_s, f_t, backend=b),
    "kd": lambda f_s, f_t, z_s, z_t, y, b: F.kd_loss(z_s, z_t, backend=b),
    "dkd": lambda f_s, f_t, z_s, z_t, y, b: F.dkd_loss(z_s, z_t, y, backend=b),
    "lcc": lambda f_s, f_t, z_s, z_t, y, b: F.local_correlation_loss(f_s, f_t, backend=b),
    "sp": lambda f_s, f_t, z_s, z_t, y, b: F.sp_loss(f_s, f_t, backend=b),
    "rkd": lambda f_s, f_t, z_s, z_t, y, b: F.rkd_loss(f_s.mean((2, 3)), f_t.mean((2, 3)), backend=b),
}


def _skip_unavailable(op, backend):
    reason = backends.unavailable_reason(op, backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("op", LOSSES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_loss_is_float32_and_unchanged_under_autocast(op, backend):
    _skip_unavailable(op, backend)
    args = _inputs()
    plain = LOSSES[op](*args, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LOSSES[op](*args, backend)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", LOSSES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_teacher_from_inference_mode(op, backend):
    _skip_unavailable(op, backend)
    f_s, f_t, z_s, z_t, y = _inputs()
    grads = []
    for inference in (False, True):
        with torch.inference_mode(inference):
            teacher = f_t.clone(), z_t.clone()
        student = f_s.clone().requires_grad_(), z_s.clone().requires_grad_()
        loss = LOSSES[op](student[0], teacher[0], student[1], teacher[1], y, backend)
        grads.append(torch.autograd.grad(loss, student, allow_unused=True, materialize_grads=True))
    for plain, inferred in zip(*grads):
        torch.testing.assert_close(inferred, plain)
