"""CRD's contrastive (NCE) loss against a memory bank (crd): every fused backend against the float64
eager reference.

Values and gradients of the embeddings (non-unit upstream gradient) in every dtype; the partition
sums the peers' normalisation constant comes from; layouts (strided embeddings, bank and indices,
read in place); B = 1, D = 1, D = 1024, K = 0; the columns split over several programs / chunks /
blocks; invalid indices (NaN, nothing read out of bounds); determinism; no (B, K+1) or (B, K+1, D)
allocation; the reference against the peers' formula written out; the functional layer's errors
(opcheck, compile, gradcheck and the standard bad inputs: test_op_contracts.py). Shapes stay
small: the Triton kernels run in the interpreter here.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _compare import LargestTensor, as_float64, assert_deterministic, check_against_reference
from conftest import DTYPES, TOL, assert_close_scaled, backends_with_torch, device_backends, triton_backends
from torch import Tensor

from kdfast import functional as F
from kdfast import nn as knn
from kdfast.kernels import crd as kernels
from kdfast.reference import crd as ref

FUSED = device_backends("crd")
TRITON = triton_backends("crd")
WITH_TORCH = backends_with_torch("crd")
T = 0.07  # the peers' temperature: scores up to 1 / 0.07 ~ 14


def unit_rows(rows: int, dim: int, dtype=torch.float32, device="cpu", seed=0) -> Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(dtype).to(device)


def indices(batch: int, columns: int, rows: int, device="cpu", seed=0) -> Tensor:
    return torch.randint(0, rows, (batch, columns), generator=torch.Generator().manual_seed(seed)).to(device)


def check(backend, emb, bank, idx, z, loss_tol, grad_tol, temperature=T, upstream=1.0):
    """The loss and the gradient of emb against the float64 reference on the same (rounded) inputs."""
    loss, (grad,) = check_against_reference(
        lambda e, b, i: F.crd_loss(e, b, i, z, temperature, backend=backend),
        lambda e, b, i: ref.crd_loss(e, b, i, torch.as_tensor(as_float64(z), dtype=torch.float64), temperature, b.shape[0]),
        (emb, bank, idx),
        loss_tol,
        grad_tol,
        upstream=upstream,
    )
    assert loss.shape == ()
    return loss, grad


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, backend, dtype):
    emb = unit_rows(5, 12, dtype, device, seed=1).requires_grad_()
    bank = unit_rows(40, 12, dtype, device, seed=2)
    z = torch.tensor(3.5, device=device)
    check(backend, emb, bank, indices(5, 9, 40, device, seed=3), z, *TOL[dtype], upstream=-2.5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_partition_sums(device, backend, dtype):
    """expsum: the per-row sums of exp(s) (no gradient), from which the peers' z is set."""
    emb = unit_rows(4, 7, dtype, device, seed=4).requires_grad_()
    bank = unit_rows(30, 7, dtype, device, seed=5)
    idx = indices(4, 11, 30, device, seed=6)
    sums = F.crd_partition(emb, bank, idx, 0.1, backend=backend)
    expected = ref.partition_sums(emb.detach().double().cpu(), bank.double().cpu(), idx.cpu(), 0.1)
    assert sums.shape == (4,) and not sums.requires_grad
    assert_close_scaled(sums, expected, TOL[dtype][0], "expsum")


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_layouts(device, backend):
    """Every tensor read in place through its strides: a transposed embedding, a bank slice of a
    wider buffer (row stride != D) and a transposed one, transposed indices."""
    emb = unit_rows(5, 5, device=device, seed=7).t().requires_grad_()  # strides (1, 5)
    wide = unit_rows(20, 12, device=device, seed=8)
    banks = (wide[:, 3:8], unit_rows(5, 20, device=device, seed=9).t())
    idx = indices(7, 5, 20, device, seed=10).t()  # (5, 7) with strides (1, 5)
    for bank in banks:
        check(backend, emb, bank, idx, 2.0, 2e-5, 2e-5, temperature=0.2, upstream=0.5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
@pytest.mark.parametrize("batch,dim,columns,rows", [(1, 1, 3, 2), (3, 1024, 4, 6), (2, 128, 1, 5), (3, 33, 7, 1)], ids=str)
def test_shapes(device, backend, batch, dim, columns, rows):
    """B = 1 and D = 1, the largest D, K = 0 (positives only: c = 0), a bank of one row."""
    emb = unit_rows(batch, dim, device=device, seed=11).requires_grad_()
    bank = unit_rows(rows, dim, device=device, seed=12)
    check(backend, emb, bank, indices(batch, columns, rows, device, seed=13), 1.5, 2e-5, 2e-5, temperature=0.5)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_many_columns(device, backend, monkeypatch):
    """Enough columns that every fused backend splits them: the C++ CPU kernel into chunks of 1024,
    the CUDA kernel over blocks (B < 1024, columns >= 2 x 256), Triton (told to want more programs)
    over programs and tiles; the partial sums add up."""
    monkeypatch.setattr(kernels, "_min_programs", lambda device: 8)
    monkeypatch.setattr(kernels, "_MIN_SPLIT_ROWS", 64)
    plan = kernels._plan(2, 2100, 16, torch.device(device))
    assert plan.splits > 1 and plan.rows_per_program > plan.block_k
    emb = unit_rows(2, 16, device=device, seed=14).requires_grad_()
    bank = unit_rows(3000, 16, device=device, seed=15)
    check(backend, emb, bank, indices(2, 2100, 3000, device, seed=16), 2.0, 2e-5, 2e-5, temperature=0.1, upstream=3.0)


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_invalid_indices_give_nan(device, backend):
    """An index outside [0, N) is never read: the loss, its row's gradient and expsum are NaN, the
    other rows' gradients stay finite."""
    emb = unit_rows(3, 8, device=device, seed=17).requires_grad_()
    bank = unit_rows(10, 8, device=device, seed=18)
    for bad in (-1, 10, 2**40):
        idx = indices(3, 4, 10, device, seed=19)
        idx[1, 2] = bad
        loss = F.crd_loss(emb, bank, idx, 2.0, backend=backend)
        (grad,) = torch.autograd.grad(loss, emb)
        assert torch.isnan(loss)
        assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()
        sums = F.crd_partition(emb, bank, idx, backend=backend)
        assert torch.isnan(sums[1]) and torch.isfinite(sums[[0, 2]]).all()


@pytest.mark.parametrize("device,backend", FUSED)
def test_deterministic(device, backend):
    """Bitwise the same loss and gradient on every call, whatever the thread count."""
    emb = unit_rows(5, 24, device=device, seed=20).requires_grad_()
    bank = unit_rows(500, 24, device=device, seed=21)
    idx = indices(5, 1500, 500, device, seed=22)
    assert_deterministic(lambda: F.crd_loss(emb, bank, idx, 4.0, backend=backend), [emb])


@pytest.mark.parametrize("device,backend", FUSED)
def test_backward_runs_twice(device, backend):
    """The backward scales the forward's gradient out of place: a second backward through the same
    graph gives the same gradient (retain_graph)."""
    emb = unit_rows(3, 8, device=device, seed=23).requires_grad_()
    loss = F.crd_loss(emb, unit_rows(9, 8, device=device, seed=24), indices(3, 5, 9, device, seed=25), 2.0, backend=backend)
    first = torch.autograd.grad(loss, emb, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, emb)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", WITH_TORCH)
def test_inference_mode_bank_and_no_gradient_to_the_bank(device, backend):
    """A bank made under inference_mode works; the bank and z get no gradient."""
    with torch.inference_mode():
        frozen = unit_rows(9, 8, device=device, seed=26)
    bank = unit_rows(9, 8, device=device, seed=26).requires_grad_()
    z = torch.tensor(2.0, device=device, requires_grad=True)
    emb = unit_rows(3, 8, device=device, seed=27).requires_grad_()
    idx = indices(3, 5, 9, device, seed=28)
    grads = [torch.autograd.grad(F.crd_loss(emb, b, idx, z, backend=backend), emb)[0] for b in (frozen, bank)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    F.crd_loss(emb, bank, idx, z, backend=backend).backward()
    assert bank.grad is None and z.grad is None and emb.grad is not None


@pytest.mark.parametrize("device,backend", TRITON)
def test_triton_allocates_no_scores(device, backend):
    """The Triton launcher never stores the (B, K+1) scores nor the (B, K+1, D) rows: its largest
    buffer is O(B splits D) (the C++ kernels allocate their partials below the dispatcher)."""
    batch, columns, dim = 4, 600, 8
    emb = unit_rows(batch, dim, device=device, seed=29).requires_grad_()
    bank = unit_rows(50, dim, device=device, seed=30)
    idx = indices(batch, columns, 50, device, seed=31)
    with LargestTensor() as mode:
        loss = F.crd_loss(emb, bank, idx, 2.0, backend=backend)
        loss.backward()
    assert mode.largest_new <= batch * dim * kernels._plan(batch, columns, dim, torch.device(device)).splits
    assert mode.largest_new < batch * columns


def test_reference_is_the_peers_formula():
    """The reference equals RepDistiller's ContrastMemory scores and ContrastLoss written out
    (bmm of the gathered rows, exp / Z, the NCE terms with m = K, Pn = 1 / N, eps = 1e-7)."""
    emb, bank = unit_rows(4, 6, torch.float64, seed=32), unit_rows(15, 6, torch.float64, seed=33)
    idx = indices(4, 8, 15, seed=34)
    z = torch.tensor(7.0, dtype=torch.float64)
    out = torch.exp(torch.bmm(bank[idx.view(-1)].view(4, 8, 6), emb.view(4, 6, 1)).squeeze(2) / T) / 7.0
    m, pn = 7, 1 / 15
    log_d1 = torch.log(out[:, 0] / (out[:, 0] + m * pn + 1e-7))
    log_d0 = torch.log(torch.full_like(out[:, 1:], m * pn) / (out[:, 1:] + m * pn + 1e-7))
    expected = -(log_d1.sum() + log_d0.sum()) / 4
    torch.testing.assert_close(ref.crd_loss(emb, bank, idx, z, T, 15), expected, rtol=1e-14, atol=0)
    z_peers = out.mul(7.0).mean() * 15  # the peers' first-batch Z: mean of exp(s) times N
    torch.testing.assert_close(ref.partition_sums(emb, bank, idx, T).sum() / idx.numel() * 15, z_peers)


def test_reference_refuses_bad_indices():
    with pytest.raises(IndexError, match=r"idx must be in \[0, 5\)"):
        ref.crd_loss(unit_rows(2, 3), unit_rows(5, 3), torch.tensor([[0, 5], [1, 2]]), torch.tensor(1.0), T, 5)


def test_module_matches_functional():
    emb, bank, idx = unit_rows(3, 4, seed=35), unit_rows(8, 4, seed=36), indices(3, 5, 8, seed=37)
    module = knn.CRDLoss(temperature=0.2, backend="torch")
    assert module(emb, bank, idx, 2.0).item() == pytest.approx(F.crd_loss(emb, bank, idx, 2.0, 0.2, backend="torch").item())
    assert "temperature=0.2, backend='torch'" in repr(module)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(emb=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "emb and bank must share one floating dtype"),
        (dict(bank=torch.zeros(8, 4, dtype=torch.float64)), TypeError, "emb and bank must share one floating dtype"),
        (dict(emb=torch.zeros(3, 4, 1)), ValueError, "emb must be 2-D"),
        (dict(emb=torch.zeros(3, 1025), bank=torch.zeros(8, 1025)), ValueError, "1 <= D <= 1024"),
        (dict(bank=torch.zeros(8, 5)), ValueError, "bank must be"),
        (dict(idx=torch.zeros(3, 5, dtype=torch.int32)), ValueError, "idx must be int64"),
        (dict(idx=torch.zeros(2, 5, dtype=torch.int64)), ValueError, "idx must be int64"),
        (dict(idx=torch.zeros(3, 0, dtype=torch.int64)), ValueError, "idx must be int64"),
        (dict(z=torch.ones(1)), ValueError, "z must be a number or a 0-d"),
        (dict(z=-1.0), ValueError, "z must be a finite number > 0"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be a finite number > 0"),
        (dict(emb=[0.0]), TypeError, "emb must be a torch.Tensor"),
    ],
)
def test_functional_errors(change, error, message):
    args: dict[str, Any] = dict(
        emb=torch.zeros(3, 4), bank=torch.zeros(8, 4), idx=torch.zeros(3, 5, dtype=torch.int64), z=1.0, temperature=T
    )
    args.update(change)
    with pytest.raises(error, match=message):
        F.crd_loss(args["emb"], args["bank"], args["idx"], args["z"], args["temperature"], backend="torch")


@pytest.mark.parametrize("device,backend", FUSED)
def test_kernel_errors(device, backend):
    """The kernels check what the functional layer checks (a direct call of the op)."""
    from kdfast.ops import namespace

    emb, bank, idx, z = torch.zeros(3, 4), torch.zeros(8, 4), torch.zeros(3, 5, dtype=torch.int64), torch.tensor(1.0)
    op = namespace(backend).crd_forward
    for args in (
        (emb, bank.double(), idx, z, T),
        (emb, bank, idx.int(), z, T),
        (emb, bank, idx, z, 0.0),
        (emb, bank, idx, z[None], T),
    ):
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            op(*args)
