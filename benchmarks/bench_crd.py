"""Benchmarks of CRD's contrastive (NCE) loss against a memory bank: ``crd_loss``.

One side of CRD as the peers run it: B unit-norm 128-d embeddings scored against K + 1 rows of an
(N, 128) memory bank each (the positive and K negatives), temperature 0.07, a fixed ``z``. A shape
is ``B x (K+1) x D + N x D``: CIFAR-100 (N = 50,000) with the peers' 16384 negatives at their
batch 64 (and 4096 negatives), and on the GPU also batch 256 and an ImageNet-size bank
(N = 1,281,167) with 4096 negatives.

The eager reference (``kdfast.reference.crd``) is RepDistiller's / mdistiller's computation:
``index_select`` of the B (K+1) bank rows into a (B, K+1, D) tensor, ``bmm`` with the embeddings,
``exp``, the NCE terms on the (B, K+1) scores; autograd keeps the gathered rows for the backward.
Its memory grows as B (K+1) D (RepDistiller's issue #40: "memory explodes"): 537 MB of gathered
float32 rows alone at B = 64, K = 16384, D = 128, per side. The fused kernels gather each row
inside the kernel and keep only O(B D) partial sums; their backward scales the gradient that the
forward computed from the rows it had loaded.

Byte model (the least traffic): the forward reads the indices, the B (K+1) gathered rows and the
embeddings and writes the (B, D) gradient; the backward reads it and writes the embeddings'
gradient. The reference moves much more (it writes and re-reads the gathered copy). On the CPU,
the peak of the C++ kernels' internal partial sums (std::vector, O(B D) per chunk of 1024
columns) is not seen by the tensor tracker; everything they return is.
"""

from __future__ import annotations

import torch

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional
from kdfast.reference import crd as reference

TEMPERATURE = 0.07
CIFAR_N, IMAGENET_N = 50_000, 1_281_167


def _shape(batch: int, negatives: int, rows: int, dim: int = 128) -> Shape:
    return ((batch, negatives + 1, dim), (rows, dim))


SHAPES = {
    "cuda": [
        _shape(64, 16384, CIFAR_N),
        _shape(64, 4096, CIFAR_N),
        _shape(256, 16384, CIFAR_N),
        _shape(256, 4096, IMAGENET_N),
    ],
    "cuda-quick": [_shape(64, 16384, CIFAR_N), _shape(256, 4096, IMAGENET_N)],
    "cpu": [_shape(64, 16384, CIFAR_N), _shape(64, 4096, CIFAR_N)],
    "cpu-quick": [_shape(64, 16384, CIFAR_N)],
    "tiny": [_shape(4, 32, 100, 16)],
}


def crd_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    (batch, columns, dim), (rows, _) = shape
    emb = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=1).to(dtype).requires_grad_()
    bank = torch.nn.functional.normalize(torch.randn(rows, dim, device=device), dim=1).to(dtype)
    idx = torch.randint(0, rows, (batch, columns), device=device)
    z = torch.tensor(float(rows), device=device)  # about N mean exp(s) for scores near 0
    return Inputs((emb, bank, idx, z, TEMPERATURE), (emb,))


def crd_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """fwd: indices, gathered rows and embeddings read, the float32 gradient written; bwd: that
    gradient read, the embeddings' gradient written."""
    (batch, columns, dim), _ = shape
    size = element_size(dtype)
    forward = 8 * batch * columns + size * batch * columns * dim + size * batch * dim + 4 * batch * dim
    return by_pass(forward, (4 + size) * batch * dim, pass_)


def crd_reference_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Estimated peak of the eager reference: the gathered (B, K+1, D) rows in the compute dtype
    (float32), kept for the backward, about twice at the forward's peak (the gather and the copy to
    the compute dtype of a bfloat16 bank), plus the (B, K+1) scores and their terms."""
    (batch, columns, dim), _ = shape
    return 2 * 4 * batch * columns * dim + 8 * 4 * batch * columns


def crd_reference(emb, bank, idx, z, temperature):
    """The reference with the bank's rows as N (the signature of the fused function)."""
    return reference.crd_loss(emb, bank, idx, z, temperature, bank.shape[0])


SPECS = (
    OpSpec(
        name="crd_loss",
        family="crd",
        reference=crd_reference,
        fused=functional.crd_loss,
        make_inputs=crd_inputs,
        bytes_moved=crd_bytes,
        shapes=SHAPES,
        reference_bytes=crd_reference_bytes,
    ),
)
