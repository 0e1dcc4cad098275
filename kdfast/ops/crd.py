"""torch.library registration and backend dispatch of CRD's contrastive (NCE) loss against a memory
bank (formulas in kdfast/reference/crd.py).

Op contract, the same on every fused backend (``torch.ops.kdfast_triton.*``: kdfast.kernels.crd;
``torch.ops.kdfast.*``: the C++ CPU/CUDA kernels of kdfast._C, implementing the schema declared here)::

    crd_forward(Tensor emb, Tensor bank, Tensor idx, Tensor z, float temperature)
        -> (Tensor loss, Tensor grad, Tensor expsum)

* ``emb`` (B, D): one network's embeddings (L2-normalised by the caller), B >= 1, 1 <= D <= 1024;
  ``bank`` (N, D): the other network's memory bank, N >= 1, the dtype of emb (float16, bfloat16,
  float32 or float64); both any strides (read in place).
* ``idx`` (B, K+1) int64, K >= 0, any strides: the bank rows scored against each embedding,
  column 0 the positive, columns 1..K the negatives. The kernels gather the rows from the bank
  themselves: no (B, K+1, D) copy and no (B, K+1) score matrix exists at any time. An index
  outside [0, N) is not read; it makes its row's loss, gradient and expsum NaN (values are never
  checked on the host: that would cost a GPU sync).
* ``z``: 0-d, any floating dtype, read on the device: the normalisation constant (> 0).
  ``temperature``: finite, > 0.
* ``loss``: 0-d, ``-(1/B) sum_b [log(P_b0 / (P_b0 + c + eps)) + sum_{k>=1} log(c / (P_bk + c + eps))]``,
  ``P_bk = exp(s_bk) / z``, ``s_bk = <bank[idx_bk], emb_b> / T``, ``c = K / N``, ``eps = 1e-7``,
  the terms computed as ``-log1p((c + eps) / P_b0)`` and ``-log1p((P_bk + eps) / c)`` (no
  cancellation of a log near 1).
* ``grad``: (B, D) contiguous, ``d loss / d emb``, computed by the forward from the rows it has
  loaded anyway (the backward only scales it: ``grad_loss * grad``, a new tensor, so the backward
  may run more than once). ``expsum``: (B,), ``sum_k exp(s_bk)``: the peers set ``z`` on their first
  batch to ``mean_{b,k} exp(s_bk) * N`` (:func:`crd_partition`); it carries no gradient.
  ``loss``, ``grad`` and ``expsum`` are float32 (float64 for float64 emb), the accumulation dtype.
* Memory: besides the outputs, partial sums per (row, split of the K+1 columns): O(B splits D)
  (Triton, CUDA) or O(B chunks D) (C++ CPU), never O(B K D); the only O(B K) tensor is ``idx``.
* Deterministic: the partition of the work depends on the shapes and the device only, partial sums
  are added in a fixed order (no atomics).

This module declares the op once (schema, fake kernel, autograd formula: the bank, the indices and
``z`` get no gradient; ``SPEC``, registered in every library by kdfast.ops.spec). Backend "torch"
calls the eager implementation in kdfast/eager/crd.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.eager import crd as eager
from kdfast.numerics.common import compute_dtype
from kdfast.ops import namespace
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, register, sample_tensor

MAX_DIM = 1024  # the largest embedding dimension D of the fused kernels


def _forward_fake(emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    acc = compute_dtype(emb.dtype)
    return emb.new_empty((), dtype=acc), emb.new_empty(emb.shape, dtype=acc), emb.new_empty((emb.shape[0],), dtype=acc)


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.emb_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward(ops, ctx, grad_loss, _grad_grad, _grad_expsum):
    if grad_loss is None:
        return None, None, None, None, None
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss.to(grad.dtype)).to(ctx.emb_dtype), None, None, None, None


def _sample_idx(batch: int, columns: int, rows: int, seed: int) -> Tensor:
    return torch.randint(0, rows, (batch, columns), generator=torch.Generator().manual_seed(seed))


def _samples() -> tuple[Sample, ...]:
    def unit(t: Tensor) -> Tensor:
        return (t / t.norm(dim=1, keepdim=True)).detach()

    emb = unit(sample_tensor(3, 5, seed=1)).requires_grad_(True)
    bank = unit(sample_tensor(7, 5, seed=2))
    z = torch.tensor(2.5, dtype=torch.float64)

    def run(temperature: float):
        return lambda e, m, i, zz, backend: crd_loss(e, m, i, zz, temperature, backend)

    return (
        Sample("negatives", run(0.5), (emb, bank, _sample_idx(3, 4, 7, 3), z)),
        Sample("positives only", run(0.2), (emb, bank, _sample_idx(3, 1, 7, 4), z)),
    )


SPEC = register(
    OpSpec(
        "crd",
        kernels=(
            Kernel(
                "crd_forward",
                "(Tensor emb, Tensor bank, Tensor idx, Tensor z, float temperature) -> (Tensor, Tensor, Tensor)",
                _forward_fake,
            ),
        ),
        autograd=(Autograd("crd_forward", _setup, _backward),),
        samples=_samples,
    )
)


def crd_loss(emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor, temperature: float, backend: str) -> Tensor:
    """The NCE loss of one side (0-d) on `backend`; the bank and `z` are detached."""
    if backend == "torch":
        return eager.crd_loss(emb, bank, idx, z, temperature, bank.shape[0])
    loss, _, _ = namespace(backend).crd_forward(emb, bank.detach(), idx, z.detach(), temperature)
    return loss


def crd_partition(emb: Tensor, bank: Tensor, idx: Tensor, temperature: float, backend: str) -> Tensor:
    """``sum_k exp(s_bk)`` (B,) on `backend`, without gradient."""
    emb, bank = emb.detach(), bank.detach()
    if backend == "torch":
        return eager.partition_sums(emb, bank, idx, temperature)
    _, _, expsum = namespace(backend).crd_forward(emb, bank, idx, emb.new_ones((), dtype=compute_dtype(emb.dtype)), temperature)
    return expsum
