"""Benchmarks of the logit losses: ``kd_loss`` and ``dkd_loss``.

Both run with their defaults (T = 4, reduction "batchmean"; DKD: alpha = 1, beta = 8) on a
student/teacher pair of (B, K) logits of one dtype (standard normal), DKD with uniform random
targets. The student requires grad, so the fused backends take their training path: the forward
also computes the gradient, the backward scales it in place and can therefore run only once per
forward (``backward_once``: the "bwd" pass rebuilds the loss, untimed, before every call).

Shapes (B, K): CIFAR-100 (K = 100) at B = 64, 512; ImageNet-1k at B = 256, 1024; ImageNet-21k
(K = 21843) at B = 256. The GPU sweep takes all five; the CPU sweep three (one of each K) that a
2-core machine finishes in a few minutes (benchmarks/README.md); "tiny" ones are for the Triton
interpreter, one of them wider than a Triton block of classes (4096), so that rows stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional
from kdfast.reference import dkd as dkd_reference
from kdfast.reference import kd as kd_reference

LOGITS = {
    "cuda": [((64, 100),), ((512, 100),), ((256, 1000),), ((1024, 1000),), ((256, 21843),)],
    "cuda-quick": [((512, 100),), ((256, 21843),)],
    "cpu": [((64, 100),), ((256, 1000),), ((256, 21843),)],
    "cpu-quick": [((64, 100),)],
    "tiny": [((4, 100),), ((2, 5000),)],
}
LOSS_BYTES = 4  # the per-row losses (and the fused ops' per-row statistics) are float32
TARGET_BYTES = 8  # int64
KD_STATS, DKD_STATS = 2, 6  # per-row statistics the fused forward writes (kdfast/ops/kd.py, dkd.py)


def _pair(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    ((batch, classes),) = shape
    z_s = torch.randn(batch, classes, dtype=dtype, device=device, requires_grad=True)
    return z_s, torch.randn(batch, classes, dtype=dtype, device=device)


def kd_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    z_s, z_t = _pair(shape, dtype, device)
    return Inputs((z_s, z_t), (z_s,))


def dkd_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    z_s, z_t = _pair(shape, dtype, device)
    target = torch.randint(0, z_s.shape[1], (z_s.shape[0],), device=device)
    return Inputs((z_s, z_t, target), (z_s,))


def _reference_bytes(shape: Shape, dtype: torch.dtype, pass_: str, row_input_bytes: int) -> int:
    """Reference byte model; `row_input_bytes`: bytes per row read besides the logits (target).

    fwd: read z_s and z_t, write the B float32 losses. bwd: read z_s and z_t (the softmaxes are
    recomputed from them; eager saves float32 copies instead), write the B x K gradient (z_s's
    dtype). Both passes read the per-row inputs. fwd+bwd: both.
    """
    ((batch, classes),) = shape
    logits = batch * classes * element_size(dtype)
    rows = batch * row_input_bytes
    return by_pass(2 * logits + rows + batch * LOSS_BYTES, 3 * logits + rows, pass_)


def _fused_bytes(shape: Shape, dtype: torch.dtype, pass_: str, row_input_bytes: int, stats: int) -> int:
    """Fused byte model of a reduced loss (the gradient is computed in the forward).

    fwd: read z_s, z_t and the per-row inputs, write the B x K gradient (z_s's dtype), the B
    float32 losses and the B x `stats` float32 statistics. bwd: read and write the gradient (the
    in-place scaling by the upstream gradient; the few bytes of that scalar are not counted).
    fwd+bwd: both. The logits are counted once: a ONE_BLOCK Triton launch (K <= 4096 in
    float32) reads them once, a longer Triton row and the C++ kernels read them again for the
    gradient, and that second read is not counted.
    """
    ((batch, classes),) = shape
    logits = batch * classes * element_size(dtype)
    rows = batch * (row_input_bytes + (1 + stats) * LOSS_BYTES)
    return by_pass(3 * logits + rows, 2 * logits, pass_)


def kd_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of ``kd_loss`` (eager, compiled): :func:`_reference_bytes`, no per-row inputs."""
    return _reference_bytes(shape, dtype, pass_, 0)


def kd_fused_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of the fused ``kd_loss``: :func:`_fused_bytes` with 2 statistics per row."""
    return _fused_bytes(shape, dtype, pass_, 0, KD_STATS)


def dkd_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of ``dkd_loss`` (eager, compiled): :func:`_reference_bytes`, plus the int64
    targets in both passes."""
    return _reference_bytes(shape, dtype, pass_, TARGET_BYTES)


def dkd_fused_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte model of the fused ``dkd_loss``: :func:`_fused_bytes`, the int64 targets read in the
    forward, 6 statistics per row."""
    return _fused_bytes(shape, dtype, pass_, TARGET_BYTES, DKD_STATS)


def _logit_spec(name: str, reference, fused, make_inputs, bytes_moved, fused_bytes_moved) -> OpSpec:
    """A logit loss's spec: op key = name without "_loss", the LOGITS shapes, one backward per
    forward (module docstring)."""
    return OpSpec(
        name=name,
        family=name.removesuffix("_loss"),
        reference=reference,
        fused=fused,
        make_inputs=make_inputs,
        bytes_moved=bytes_moved,
        shapes=LOGITS,
        fused_bytes_moved=fused_bytes_moved,
        backward_once=True,
    )


SPECS = (
    _logit_spec("kd_loss", kd_reference.kd_loss, functional.kd_loss, kd_inputs, kd_bytes, kd_fused_bytes),
    _logit_spec("dkd_loss", dkd_reference.dkd_loss, functional.dkd_loss, dkd_inputs, dkd_bytes, dkd_fused_bytes),
)
