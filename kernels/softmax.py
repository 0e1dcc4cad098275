"""Row-streaming softmax helpers shared by the fused logit-distillation kernels (kd.py, dkd.py).

Both ops compare, row by row, a student's and a teacher's (B, K) logits at a temperature ``T``:
``zs = z_s / T``, ``zt = z_t / T``, ``ps = softmax(zs)``, ``pt = softmax(zt)``. A program owns
ROWS rows and streams them in [ROWS, BLOCK_K] blocks of classes; no probability is ever written
to memory. Optionally one class per row (DKD's target ``g``) is left out of the stream: the
"kept" classes are then ``k != g`` and the excluded logit is gathered on its own.

Pass 1 (:func:`kl_step`, :func:`kl_stream`) keeps per row, over the kept classes (online
log-sum-exp with a running max: when a block raises the max from ``m`` to ``m'``, the sums are
rescaled by ``exp((m - m') / T)``)::

    m_s, m_t   running maxima of the RAW logits z_s, z_t (max(z / T) = max(z) / T, T > 0)
    l_s, l_t   sum_k exp((z_k - m) / T)                         (>= 1: the max itself adds 1)
    a          sum_k exp((z_t,k - m_t) / T) * (z_t,k - z_s,k)   (rescaled like l_t; a term whose
                                                               weight underflows to 0 adds 0)

from which (with ``p'`` the softmax over the kept classes)::

    lse     = m / T + log(l)                                  (natural log)
    KL(pt' || ps') = (a / l_t - (m_t - m_s)) / T + log(l_s / l_t)          (:func:`kl_rows`)

Pass 2 (:func:`grad_tile`, :func:`grad_stream`) writes, per row and class::

    grad_k = c_s * exp((z_s,k - shift_s) / T - off_s) - c_t * exp((z_t,k - shift_t) / T - off_t)

with per-row coefficients, and the excluded class (if any) set to a per-row value. After pass 1
``(shift, off) = (m, log l)`` gives ``exp(...) = p'_k`` without rounding the logits through
``z / T - lse``; a backward kernel that has only the saved ``lse`` uses ``(0, lse)``.

Numerics. Maxima and the differences ``z_t - z_s``, ``z - m``, ``m_t - m_s`` are taken in raw
logit units before scaling by ``1 / T``: the loaded logits are exact in the accumulation dtype
(a float64 teacher of a float32 student is rounded to float32, as the reference does), so with
logits of magnitude 1e4 and T = 0.5 the only large rounding left is the one the result itself
carries (a float32 ``lse`` of 2e4 has an ulp of 2e-3; :func:`kd_backward`-style kernels, which
start from the saved lse, inherit it). Every load is converted to the
accumulation dtype (float32, float64 for float64 students) right away. No libdevice: tl.exp and
tl.log only, plus log1p by Kahan's trick (:func:`_common.log1p`) for the per-row softplus terms.

Host side: the block choice (:func:`row_launch`), the kernels' decorator (``row_kernel``: the
batch size is not specialised), metadata checks, scalar passing and the
launchers of the two ops' kernels (:func:`launch_forward`, :func:`launch_backward`). TL_DTYPES,
acc_dtype and on_device (kernels/_common.py) are re-exported for the modules that use this one.
"""

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common
from kdfast.kernels._common import TL_DTYPES, acc_dtype, check_rows, log1p, on_device, split_scalar

# Block shapes, by accumulation dtype, measured by compiling every KD/DKD specialisation for sm_90
# (triton 3.6 and 3.8). A program owns ROWS rows and works on [ROWS, BLOCK_K] tiles with
# num_warps = tile / (32 * elements per thread), in [1, _MAX_WARPS]:
# * one row per program: _ROW_ELEMS_PER_THREAD elements per thread, so a block of MAX_BLOCK_K
#   classes runs on _MAX_WARPS warps (ImageNet-1k rows fit one block and stay in registers
#   between the passes, ImageNet-21k streams 11 blocks);
# * packed rows (ROWS > 1, short rows): every thread also carries the per-row algebra of its
#   rows (DKD's softplus/log terms), so packed tiles hold _PACKED_ELEMS_PER_THREAD elements per
#   thread and at most _MAX_PACKED_TILE elements. Measured: 2 elements per thread stay under
#   100 registers, 4 take 150-190, 8 spill (DKD at 16 rows x 128 classes spilled 936-2096 bytes).
MAX_BLOCK_K = {torch.float32: 2048, torch.float64: 2048}
_ROW_ELEMS_PER_THREAD = 8
_PACKED_ELEMS_PER_THREAD = 2
_MAX_WARPS = 8
_MAX_PACKED_TILE = 32 * _PACKED_ELEMS_PER_THREAD * _MAX_WARPS
# Packing stops before the launch has fewer than this many programs per SM.
_PROGRAMS_PER_SM = 1


# ----------------------------------------------------------------------------- device helpers

# Decorator of the ops' row kernels: ``batch`` is never specialised, so a batch of 1 (a last
# partial batch) runs the general code instead of a variant of its own with batch a constexpr
# (measured on triton 3.6: such variants spilled 8 bytes at 48-56 registers).
row_kernel = triton.jit(do_not_specialize=["batch"])


@triton.jit
def program_rows(batch, ROWS: tl.constexpr):
    """This program's ROWS row indices (int64) and which of them exist. Rows past the batch are
    clamped to the last row, so every row streams finite in-bounds data; nothing of theirs is
    stored (``row_ok``)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < batch
    return tl.minimum(rows, batch - 1).to(tl.int64), row_ok


@triton.jit
def load_block(zs_rows, zt_rows, k0, n, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Columns ``k0 + [0, BLOCK_K)`` ([1, BLOCK_K]), their mask, and the [ROWS, BLOCK_K] student
    and teacher logits there in ACC (0 past n). ``*_rows``: [ROWS, 1] row pointers."""
    cols = k0 + tl.arange(0, BLOCK_K)[None, :]
    valid = cols < n
    zs = tl.load(zs_rows + cols, mask=valid, other=0.0).to(ACC)
    zt = tl.load(zt_rows + cols, mask=valid, other=0.0).to(ACC)
    return cols, valid, zs, zt


@triton.jit
def gather(rows_ptr, col, n, ACC: tl.constexpr):
    """``z[row, col]`` per row in ACC, NaN where col is outside [0, n) (no access there)."""
    ok = (col >= 0) & (col < n)
    return tl.load(rows_ptr + col, mask=ok, other=float("nan")).to(ACC), ok


@triton.jit
def online_lse(m, total, z, keep, inv_t):
    """One block of the online log-sum-exp of ``z / T`` over the ``keep`` lanes. ``m``: running
    max of the raw logits, ``total``: running sum l; returns the new (m, l), the block's weights exp((z - m') / T) (0 off
    ``keep`` and for -inf logits) and the rescale factor exp((m - m') / T) of the old sums (0
    while m = -inf). As long as every kept logit so far is -inf, m' stays -inf and l 0: the
    shift is then 0, never -inf (exp(-inf - -inf) would be NaN)."""
    zk = tl.where(keep, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(zk, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp((m - shift) * inv_t)
    e = tl.exp((zk - shift[:, None]) * inv_t)
    return m_new, total * rescale + tl.sum(e, axis=1), e, rescale


@triton.jit
def kl_init(ROWS: tl.constexpr, ACC: tl.constexpr):
    """The pass-1 state (m_s, l_s, m_t, l_t, a) before the first block."""
    m = tl.full([ROWS], float("-inf"), ACC)
    zero = tl.zeros([ROWS], ACC)
    return m, zero, m, zero, zero


@triton.jit
def kl_step(m_s, l_s, m_t, l_t, a, cols, valid, zs, zt, exclude, inv_t, EXCLUDE: tl.constexpr):
    """Folds one block into the pass-1 state; with EXCLUDE, column ``exclude[row]`` is skipped."""
    keep = valid
    if EXCLUDE:
        keep = keep & (cols != exclude[:, None])
    m_s, l_s, _, _ = online_lse(m_s, l_s, zs, keep, inv_t)
    m_t, l_t, e_t, rescale_t = online_lse(m_t, l_t, zt, keep, inv_t)
    # weight 0 (an underflowed or -inf teacher logit, or a lane off `keep`) adds 0, never NaN
    a = a * rescale_t + tl.sum(tl.where(e_t > 0, e_t * (zt - zs), 0.0), axis=1)
    return m_s, l_s, m_t, l_t, a


@triton.jit
def kl_stream(
    zs_rows, zt_rows, n, exclude, inv_t, EXCLUDE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr
):
    """Pass 1 over whole rows: the final (m_s, l_s, m_t, l_t, a)."""
    m_s, l_s, m_t, l_t, a = kl_init(ROWS, ACC)
    for k0 in range(0, n, BLOCK_K):
        cols, valid, zs, zt = load_block(zs_rows, zt_rows, k0, n, BLOCK_K, ACC)
        m_s, l_s, m_t, l_t, a = kl_step(m_s, l_s, m_t, l_t, a, cols, valid, zs, zt, exclude, inv_t, EXCLUDE)
    return m_s, l_s, m_t, l_t, a


@triton.jit
def kl_rows(m_s, l_s, m_t, l_t, a, inv_t):
    """KL(pt' || ps') over the kept classes, from the pass-1 state."""
    return (a / l_t - (m_t - m_s)) * inv_t + tl.log(l_s / l_t)


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def kl_term(log_p, log_ratio):
    """``p * log_ratio`` with ``p = exp(log_p)``; 0 where p == 0 (the reference's convention), NaN
    where log_p or log_ratio is NaN."""
    p = tl.exp(log_p)
    return tl.where(p != 0, p * log_ratio, 0.0)


@triton.jit
def grad_tile(cols, valid, zs, zt, shift_s, off_s, c_s, shift_t, off_t, c_t, hit_col, hit_val, inv_t, HIT: tl.constexpr):
    """[ROWS, BLOCK_K] gradient: c_s exp((zs - shift_s)/T - off_s) - c_t exp((zt - shift_t)/T - off_t),
    and ``hit_val`` at column ``hit_col`` (with HIT). Lanes that are not computed (past n, the
    hit column) take exp(-inf) = 0: no overflow there; so do -inf logits (probability 0, also
    where shift or off is -inf: a row whose kept logits are all -inf). A row whose off_s or off_t
    is NaN (a NaN logit) is NaN throughout."""
    keep = valid
    if HIT:
        hit = cols == hit_col[:, None]
        keep = keep & ~hit
    keep_s = keep & (zs > float("-inf"))
    keep_t = keep & (zt > float("-inf"))
    xs = tl.where(keep_s, (zs - shift_s[:, None]) * inv_t - off_s[:, None], float("-inf"))
    xt = tl.where(keep_t, (zt - shift_t[:, None]) * inv_t - off_t[:, None], float("-inf"))
    g = c_s[:, None] * tl.exp(xs) - c_t[:, None] * tl.exp(xt)
    nan_row = (off_s != off_s) | (off_t != off_t)
    g = tl.where(nan_row[:, None], float("nan"), g)
    if HIT:
        g = tl.where(hit, hit_val[:, None], g)
    return g


@triton.jit
def store_grad(grad_rows, cols, valid, row_ok, g):
    """Stores a gradient tile (cast to the gradient's dtype) into the existing rows."""
    tl.store(grad_rows + cols, g.to(grad_rows.dtype.element_ty), mask=valid & row_ok[:, None])


@triton.jit
def grad_stream(
    grad_rows,
    zs_rows,
    zt_rows,
    n,
    row_ok,
    shift_s,
    off_s,
    c_s,
    shift_t,
    off_t,
    c_t,
    hit_col,
    hit_val,
    inv_t,
    HIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Pass 2 over whole rows: computes and stores every :func:`grad_tile`."""
    for k0 in range(0, n, BLOCK_K):
        cols, valid, zs, zt = load_block(zs_rows, zt_rows, k0, n, BLOCK_K, ACC)
        g = grad_tile(cols, valid, zs, zt, shift_s, off_s, c_s, shift_t, off_t, c_t, hit_col, hit_val, inv_t, HIT)
        store_grad(grad_rows, cols, valid, row_ok, g)


# ----------------------------------------------------------------------------- host helpers


def _min_programs(device: torch.device) -> int:
    """Programs a launch should keep: _PROGRAMS_PER_SM per SM of a CUDA device, 1 elsewhere (the
    interpreter)."""
    return _PROGRAMS_PER_SM * _common.sm_count(device) if device.type == "cuda" else 1


class RowLaunch(NamedTuple):
    grid: tuple[int]
    rows: int  # ROWS: rows per program
    block_k: int  # BLOCK_K
    one_block: bool  # ONE_BLOCK: K <= BLOCK_K, a row's logits stay in registers between passes
    num_warps: int


def row_launch(batch: int, classes: int, acc: torch.dtype, device: torch.device) -> RowLaunch:
    """BLOCK_K = next_power_of_2(K) up to MAX_BLOCK_K[acc]. Short rows are packed: ROWS (a power
    of two) doubles while the tile ROWS * BLOCK_K stays within _MAX_PACKED_TILE, ROWS <= B and the
    launch keeps :func:`_min_programs` programs (K = 100 on a 132-SM GPU: B = 256 keeps 1 row per
    program, as 2 would leave 128 programs; B = 4096 packs 4 rows on 8 warps, 1024 programs).
    num_warps gives each thread _ROW_ELEMS_PER_THREAD (one row) or _PACKED_ELEMS_PER_THREAD
    (packed rows) elements of a tile (see the constants)."""
    block_k = min(triton.next_power_of_2(classes), MAX_BLOCK_K[acc])
    rows = 1
    target = _min_programs(device)
    while rows * 2 * block_k <= _MAX_PACKED_TILE and rows < batch and triton.cdiv(batch, rows * 2) >= target:
        rows *= 2
    per_thread = _ROW_ELEMS_PER_THREAD if rows == 1 else _PACKED_ELEMS_PER_THREAD
    num_warps = max(1, min(rows * block_k // (32 * per_thread), _MAX_WARPS))
    return RowLaunch((triton.cdiv(batch, rows),), rows, block_k, classes <= block_k, num_warps)


def check_temperature(name: str, temperature: float) -> float:
    """A finite T > 0 (the kernels take max(z / T) as max(z) / T), as a Python float."""
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_logits(name: str, z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
    """Validates a (B, K >= 1) student/teacher pair (each of any floating dtype, one device);
    returns them with unit-stride rows (a copy only of a tensor whose rows are strided)."""
    for label, z in (("z_s", z_s), ("z_t", z_t)):
        if z.dim() != 2 or z.size(1) < 1 or z.dtype not in TL_DTYPES:
            raise ValueError(
                f"{name}: {label} must be 2-D (B, K >= 1) float16/bfloat16/float32/"
                f"float64, got {z.dtype} of shape {tuple(z.shape)}"
            )
    if z_s.shape != z_t.shape or z_s.device != z_t.device:
        raise ValueError(
            f"{name}: z_s and z_t must have one shape and device, got "
            f"{tuple(z_s.shape)} on {z_s.device} and {tuple(z_t.shape)} on {z_t.device}"
        )
    z_s, z_t = (z if z.size(1) == 1 or z.stride(1) == 1 else z.contiguous() for z in (z_s, z_t))
    return z_s, z_t


def _checked(
    name: str, z_s: Tensor, z_t: Tensor, row_inputs: tuple[Tensor, ...], temperature: float
) -> tuple[Tensor, Tensor, float]:
    """The checked logits (unit-stride rows) and temperature; `row_inputs` (the target) must be
    (B,) int64 on z_s's device."""
    temperature = check_temperature(name, temperature)
    z_s, z_t = check_logits(name, z_s, z_t)
    for row_input in row_inputs:
        check_rows(name, "target", row_input, (z_s.shape[0],), (torch.int64,), z_s.device)
    return z_s, z_t, temperature


def _tail_args(row_inputs: tuple[Tensor, ...], scalars: tuple[float, ...]) -> list:
    """The kernel arguments after the leading ones: row inputs with their strides, then scalars."""
    return [a for t in row_inputs for a in (t, t.stride(0))] + [x for v in scalars for x in split_scalar(v)]


def launch_forward(
    kernel: triton.JITFunction,
    name: str,
    z_s: Tensor,
    z_t: Tensor,
    row_inputs: tuple[Tensor, ...],
    temperature: float,
    scalars: tuple[float, ...],
    num_stats: int,
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Checks, allocates ``(loss (B,), stats (B, num_stats), grad)`` and runs a forward kernel;
    grad is (B, K) in z_s's dtype with `with_grad`, else an empty tensor. ``scalars``: the op's
    floats after the temperature."""
    z_s, z_t, temperature = _checked(name, z_s, z_t, row_inputs, temperature)
    batch, n = z_s.shape
    acc = acc_dtype(z_s.dtype)
    loss = torch.empty(batch, dtype=acc, device=z_s.device)
    stats = torch.empty((batch, num_stats), dtype=acc, device=z_s.device)
    grad = torch.empty((batch, n) if with_grad else 0, dtype=z_s.dtype, device=z_s.device)
    if batch > 0:
        launch = row_launch(batch, n, acc, z_s.device)
        with on_device(z_s.device):
            kernel[launch.grid](
                z_s,
                z_t,
                loss,
                stats,
                grad,
                batch,
                n,
                z_s.stride(0),
                z_t.stride(0),
                *_tail_args(row_inputs, (temperature, *scalars)),
                WITH_GRAD=bool(with_grad),
                ONE_BLOCK=launch.one_block,
                ROWS=launch.rows,
                BLOCK_K=launch.block_k,
                ACC=TL_DTYPES[acc],
                num_warps=launch.num_warps,
            )
    return loss, stats, grad


def launch_backward(
    kernel: triton.JITFunction,
    name: str,
    grad_loss: Tensor,
    z_s: Tensor,
    z_t: Tensor,
    row_inputs: tuple[Tensor, ...],
    stats: Tensor,
    temperature: float,
    scalars: tuple[float, ...],
    num_stats: int,
) -> Tensor:
    """Checks, allocates the (B, K) gradient (z_s's dtype) and runs a backward kernel;
    ``grad_loss``: (B,), ``stats``: (B, num_stats) of the forward."""
    z_s, z_t, temperature = _checked(name, z_s, z_t, row_inputs, temperature)
    batch, n = z_s.shape
    check_rows(name, "grad_loss", grad_loss, (batch,), TL_DTYPES, z_s.device)
    check_rows(name, "stats", stats, (batch, num_stats), TL_DTYPES, z_s.device)
    if stats.stride(1) != 1:
        stats = stats.contiguous()
    grad = torch.empty((batch, n), dtype=z_s.dtype, device=z_s.device)
    if batch > 0:
        acc = acc_dtype(z_s.dtype)
        launch = row_launch(batch, n, acc, z_s.device)
        with on_device(z_s.device):
            kernel[launch.grid](
                grad_loss,
                grad_loss.stride(0),
                z_s,
                z_t,
                stats,
                stats.stride(0),
                grad,
                batch,
                n,
                z_s.stride(0),
                z_t.stride(0),
                *_tail_args(row_inputs, (temperature, *scalars)),
                ROWS=launch.rows,
                BLOCK_K=launch.block_k,
                ACC=TL_DTYPES[acc],
                num_warps=launch.num_warps,
            )
    return grad
