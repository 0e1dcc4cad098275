"""`kdfast demo`: the AT loss through every backend available here.

Runs the three-stage AT loss of a CIFAR resnet32x4 -> resnet8x4 pair (stage shapes
(64, 32, 32), (128, 16, 16), (256, 8, 8), synthetic features) forward and backward on each
backend, and prints the loss, its agreement with the float64 eager reference (loss and student
gradients) and the median time of a forward+backward.
"""

from __future__ import annotations

import statistics

import torch

from kdfast import backends, functional
from kdfast.engine.timing import wall_times
from kdfast.reference import at as reference

STAGES = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]


def _features(batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen).relu().to(device, dtype) for shape in STAGES]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run(batch: int = 64, device: str | None = None, dtype: str = "float32", repeats: int = 5) -> list[dict]:
    """Run the demo and return one result row per backend (also printed as a table)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    f_s = [f.requires_grad_() for f in _features(batch, dev, dt, seed=0)]
    f_t = _features(batch, dev, dt, seed=1)
    s64 = [f.detach().double().cpu().requires_grad_() for f in f_s]
    expected = reference.at_stage_losses(s64, [f.detach().double().cpu() for f in f_t]).sum()
    expected_grads = torch.autograd.grad(expected, s64)

    print(f"kdfast AT loss demo: resnet32x4 -> resnet8x4 stages {STAGES}, batch {batch}, {dtype}, device {dev}")
    print(f"float64 reference loss: {expected.item():.10f}\n")
    print(f"{'backend':<8} {'loss':>14} {'loss rel.err':>13} {'grad rel.err':>13} {'fwd+bwd ms':>11}")
    rows = []
    for name in backends.BACKENDS[1:]:
        reason = backends.unavailable_reason("at", name, dev)
        if reason is not None:
            print(f"{name:<8} unavailable: {reason}")
            continue

        def step(name: str = name) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            loss = functional.at_loss(f_s, f_t, backend=name)
            return loss, torch.autograd.grad(loss, f_s)

        loss, grads = step()
        row = {
            "backend": name,
            "loss": loss.item(),
            "loss_rel_err": _relative_error(loss, expected),
            "grad_rel_err": max(_relative_error(g, e) for g, e in zip(grads, expected_grads)),
            "ms": statistics.median(wall_times(step, dev, repeats, warmup=1)),  # the warm-up: compilation, caches
        }
        rows.append(row)
        print(f"{name:<8} {row['loss']:>14.10f} {row['loss_rel_err']:>13.2e} {row['grad_rel_err']:>13.2e} {row['ms']:>11.3f}")
    print("\nTimings are one machine's wall clock; benchmarks/ holds the measured results per device.")
    return rows
