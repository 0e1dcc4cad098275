"""Triton kernels of CRD's contrastive (NCE) loss against a memory bank; formulas in
kdfast/reference/crd.py, op contract in kdfast/ops/crd.py.

With ``v = emb[b]`` and the bank rows ``w_k = bank[idx[b, k]]`` (k = 0 the positive)::

    s_k = <w_k, v> / T,  P_k = exp(s_k) / z,  c = K / N
    loss  = (1/B) sum_b [ log1p((c + eps) / P_0) + sum_{k>=1} log1p((P_k + eps) / c) ]
    grad_b = (1 / (B T)) [ -(c + eps) / (P_0 + c + eps) w_0 + sum_{k>=1} P_k / (P_k + c + eps) w_k ]
    expsum_b = sum_k exp(s_k)

:func:`crd_forward` -> ``(loss, grad, expsum)`` in two launches:

* the tiles: program (b, split) loads its embedding once, then walks its range of the K+1 columns
  BLOCK_K at a time: it loads the BLOCK_K indices, gathers those bank rows ([BLOCK_K, BLOCK_D],
  masked: an index outside [0, N) is not read and makes the row NaN), computes their scores in
  registers and adds their loss terms, exp(s) and ``coefficient * w`` into its accumulators. It
  writes two partial sums (loss, expsum) and a (D,) partial gradient. Neither the gathered rows
  nor the scores ever reach memory.
* the finish: program b adds its row's partials in split order (grad, expsum); program 0 also
  adds every loss partial in order: deterministic, no atomics.

The K+1 columns of a row are split over programs only while the launch has fewer programs than
the device wants (_PROGRAMS_PER_SM per SM), each split keeping at least _MIN_SPLIT_ROWS columns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common
from kdfast.kernels._common import log1p, scalar, split_scalar

EPS = 1e-7  # the peers' constant in the NCE denominators
_EPS = tl.constexpr(EPS)
MAX_DIM = 1024  # D at most (the embedding and the gradient accumulator live in registers)
_TILE = 2048  # elements of a [BLOCK_K, BLOCK_D] tile of gathered rows, at most
_PROGRAMS_PER_SM = 4  # the columns are split until a launch has this many programs per SM
_MIN_SPLIT_ROWS = 256  # columns per program that a split keeps, at least
_NUM_WARPS = 4
_FINISH_BLOCK = 1024  # program 0 of the finish sums the loss partials this many at a time


@triton.jit(do_not_specialize=["columns", "rows_per_program", "splits"])
def _crd_forward_kernel(
    emb,
    bank,
    idx,
    z,
    partials,
    grad_partials,
    columns,
    dim,
    n_rows,
    rows_per_program,
    splits,
    seb,
    sed,
    sbn,
    sbd,
    sib,
    sik,
    inv_t_hi,
    inv_t_lo,
    inv_noise_hi,
    inv_noise_lo,
    noise_eps_hi,
    noise_eps_lo,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """partials[pid] = [sum of -(loss terms), sum of exp(s)] and grad_partials[pid] = sum of
    coefficient * w over the program's columns (the 1 / (B T) is applied by the finish)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // splits
    k_start = (pid % splits) * rows_per_program
    k_end = tl.minimum(k_start + rows_per_program, columns)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    v = tl.load(emb + b * seb + offs_d * sed, mask=d_ok, other=0.0).to(ACC)
    inv_t = scalar(inv_t_hi, inv_t_lo, ACC)
    inv_noise = scalar(inv_noise_hi, inv_noise_lo, ACC)
    noise_eps = scalar(noise_eps_hi, noise_eps_lo, ACC)
    zv = tl.load(z).to(ACC)
    inv_z = 1.0 / zv
    g = tl.zeros([BLOCK_D], ACC)
    neg_terms = tl.zeros([BLOCK_K], ACC)
    exps = tl.zeros([BLOCK_K], ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        rows = tl.load(idx + b * sib + offs_k.to(tl.int64) * sik, mask=k_ok, other=0)
        valid = (rows >= 0) & (rows < n_rows)
        w_ptr = bank + rows[:, None] * sbn + offs_d[None, :] * sbd
        w = tl.load(w_ptr, mask=(k_ok & valid)[:, None] & d_ok[None, :], other=0.0).to(ACC)
        s = tl.sum(w * v[None, :], axis=1) * inv_t
        s = tl.where(valid, s, float("nan"))
        e = tl.exp(s)
        p = e * inv_z
        positive = offs_k == 0
        # -(loss term): log1p((c + eps) / P_0) for the positive, log1p((P_k + eps) / c) for a negative
        neg_term = log1p(tl.where(positive, noise_eps / p, (p + _EPS) * inv_noise))
        coef = tl.where(positive, -noise_eps, p) / (p + noise_eps)
        neg_terms += tl.where(k_ok, neg_term, 0.0)
        exps += tl.where(k_ok, e, 0.0)
        g += tl.sum(tl.where(k_ok, coef, 0.0)[:, None] * w, axis=0)
    tl.store(partials + pid * 2, tl.sum(neg_terms, axis=0))
    tl.store(partials + pid * 2 + 1, tl.sum(exps, axis=0))
    tl.store(grad_partials + pid * dim + offs_d, g, mask=d_ok)


@triton.jit(do_not_specialize=["batch", "splits"])
def _crd_finish_kernel(
    partials,
    grad_partials,
    loss,
    grad,
    expsum,
    batch,
    dim,
    splits,
    grad_scale_hi,
    grad_scale_lo,
    inv_b_hi,
    inv_b_lo,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad[b] = grad_scale * sum of its splits' partial gradients, expsum[b] likewise; program 0:
    loss = inv_b * sum of every loss partial, in order."""
    b = tl.program_id(0).to(tl.int64)
    grad_scale = scalar(grad_scale_hi, grad_scale_lo, ACC)
    inv_b = scalar(inv_b_hi, inv_b_lo, ACC)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    g = tl.zeros([BLOCK_D], ACC)
    e = tl.zeros([], ACC)
    for split in range(0, splits):
        row = b * splits + split
        g += tl.load(grad_partials + row * dim + offs_d, mask=d_ok, other=0.0)
        e += tl.load(partials + row * 2 + 1)
    tl.store(grad + b * dim + offs_d, g * grad_scale, mask=d_ok)
    tl.store(expsum + b, e)
    if b == 0:
        total = tl.zeros([BLOCK], ACC)
        for i in range(0, batch * splits, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            total += tl.load(partials + offs * 2, mask=offs < batch * splits, other=0.0)
        tl.store(loss, tl.sum(total, axis=0) * inv_b)


# ----------------------------------------------------------------------------- host helpers


class _Plan(NamedTuple):
    """The tiles of one launch: BLOCK_K x BLOCK_D gathered rows, `splits` programs per row of
    idx, each over `rows_per_program` of its columns."""

    block_k: int
    block_d: int
    splits: int
    rows_per_program: int


def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: _PROGRAMS_PER_SM per SM (1 off CUDA)."""
    return _PROGRAMS_PER_SM * _common.sm_count(device) if device.type == "cuda" else 1


def _plan(batch: int, columns: int, dim: int, device: torch.device) -> _Plan:
    block_d = max(triton.next_power_of_2(dim), 16)
    block_k = max(_TILE // block_d, 1)
    splits = min(triton.cdiv(_min_programs(device), batch), max(columns // _MIN_SPLIT_ROWS, 1))
    rows_per_program = block_k * triton.cdiv(triton.cdiv(columns, block_k), splits)
    return _Plan(block_k, block_d, triton.cdiv(columns, rows_per_program), rows_per_program)


def _check(name: str, emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor, temperature: float) -> None:
    if emb.dim() != 2 or emb.shape[0] < 1 or not 1 <= emb.shape[1] <= MAX_DIM:
        raise ValueError(f"{name}: emb must be 2-D (B >= 1, 1 <= D <= {MAX_DIM}), got shape {tuple(emb.shape)}")
    if emb.dtype not in _common.TL_DTYPES or bank.dtype != emb.dtype:
        raise TypeError(f"{name}: emb and bank must share one floating dtype, got {emb.dtype} and {bank.dtype}")
    if bank.dim() != 2 or bank.shape[0] < 1 or bank.shape[1] != emb.shape[1]:
        raise ValueError(f"{name}: bank must be (N >= 1, D = {emb.shape[1]}), got shape {tuple(bank.shape)}")
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != emb.shape[0] or idx.shape[1] < 1:
        raise ValueError(
            f"{name}: idx must be int64 (B = {emb.shape[0]}, K + 1 >= 1), got {idx.dtype} of shape {tuple(idx.shape)}"
        )
    if z.dim() != 0 or z.dtype not in _common.TL_DTYPES:
        raise ValueError(f"{name}: z must be a 0-d floating tensor, got {z.dtype} of shape {tuple(z.shape)}")
    if not (bank.device == idx.device == z.device == emb.device):
        raise ValueError(f"{name}: emb, bank, idx and z must be on one device")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature}")


def _stride(t: Tensor, dim: int) -> int:
    """t.stride(dim), 0 for a dim of size 1 (so that a unit dim never blocks the stride-1 specialisation)."""
    return t.stride(dim) if t.shape[dim] > 1 else 0


# ----------------------------------------------------------------------------- launcher


def crd_forward(emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, grad, expsum)``: the NCE loss (0-d), its gradient to ``emb`` (B, D) and the per-row
    ``sum_k exp(s_bk)`` (B,), all in float32 (float64 for float64 emb). ``emb`` (B, D) and ``bank``
    (N, D) of one floating dtype, ``idx`` (B, K+1) int64, all any strides; ``z`` 0-d floating, read
    on the device. Two launches (module docstring)."""
    name = "crd_forward"
    _check(name, emb, bank, idx, z, temperature)
    batch, dim = emb.shape
    columns, n_rows = idx.shape[1], bank.shape[0]
    acc = _common.acc_dtype(emb.dtype)
    plan = _plan(batch, columns, dim, emb.device)
    grid = batch * plan.splits
    partials = torch.empty((grid, 2), dtype=acc, device=emb.device)
    grad_partials = torch.empty((grid, dim), dtype=acc, device=emb.device)
    loss = torch.empty((), dtype=acc, device=emb.device)
    grad = torch.empty((batch, dim), dtype=acc, device=emb.device)
    expsum = torch.empty((batch,), dtype=acc, device=emb.device)
    noise = (columns - 1) / n_rows
    tl_acc = _common.TL_DTYPES[acc]
    with _common.on_device(emb.device):
        _crd_forward_kernel[(grid,)](
            emb,
            bank,
            idx,
            z,
            partials,
            grad_partials,
            columns,
            dim,
            n_rows,
            plan.rows_per_program,
            plan.splits,
            _stride(emb, 0),
            _stride(emb, 1),
            _stride(bank, 0),
            _stride(bank, 1),
            _stride(idx, 0),
            _stride(idx, 1),
            *split_scalar(1.0 / temperature),
            *split_scalar(1.0 / noise if noise > 0 else 0.0),
            *split_scalar(noise + EPS),
            ACC=tl_acc,
            BLOCK_K=plan.block_k,
            BLOCK_D=plan.block_d,
            num_warps=_NUM_WARPS,
        )
        _crd_finish_kernel[(batch,)](
            partials,
            grad_partials,
            loss,
            grad,
            expsum,
            batch,
            dim,
            plan.splits,
            *split_scalar(1.0 / (batch * temperature)),
            *split_scalar(1.0 / batch),
            ACC=tl_acc,
            BLOCK_D=plan.block_d,
            BLOCK=min(triton.next_power_of_2(grid), _FINISH_BLOCK),
            num_warps=_NUM_WARPS,
        )
    return loss, grad, expsum
