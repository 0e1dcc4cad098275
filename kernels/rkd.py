"""Triton kernels of the relational KD loss (RKD); formulas in kdfast/reference/rkd.py.

Everything is computed from the two B x B matrices of squared distances
``R[a, b] = ||e_a - e_b||^2`` (B is the batch, so B x B is small), never from the B x B x D
difference tensor of the public implementations. With ``eps = 1e-12``, for an anchor i and rows
j, k::

    inv_ij  = 1 / max(sqrt(R_ij), eps)                         (F.normalize's clamp)
    w_ijk   = ((R_ij + R_ik) - R_jk) / 2                        = <e_j - e_i, e_k - e_i>
    cos_ijk = w_ijk inv_ij inv_ik,  0 where sqrt(R_ij) < eps or sqrt(R_ik) < eps (n = 0)
    d_ij    = sqrt(max(R_ij, eps)) for i != j, d_ii = 0         (mdistiller's _pdist)

R is computed from the differences themselves (``relational.pair_kernel``, every entry summed in
one order), not as ``|e_a|^2 + |e_b|^2 - 2 <e_a, e_b>``: it is bitwise symmetric and exactly 0 for
duplicated rows, so that duplicates give exactly d = 1e-6 (clamped, no gradient), w = 0 and
cos = 0 as in the reference, and cos_ijk == cos_ikj bitwise. It is also free of the
cancellation of the Gram form (the law of cosines above only cancels at the scale of the
distances, not of the norms).

Forward (:func:`rkd_forward` -> ``(terms, sq_dist, stats)``):

* ``relational.pair_kernel``: sq_dist = (2, B, B) ``[R_s, R_t]``, one launch for both networks:
  upper-triangular [BLOCK, BLOCK] tiles (stored twice), split over D when the tiles alone cannot
  fill the device (about 2 programs per SM: 43 splits of 48 columns at B = 64, D = 2048), the
  split partials then added in order by ``_sum_splits_kernel`` (a program per row and network).
* ``_distance_kernel`` (one program per row i), twice: first the positive-distance sums and
  counts of both networks (``scale = count / sum`` normalises ``x = d * scale``; 0 without a
  positive distance), then ``sum_k smooth_l1(x_s - x_t)`` and ``sum_k smooth_l1'(x_s - x_t) x_s``.
* ``_angle_kernel`` (one program per anchor i, [BLOCK, BLOCK] tiles of (j, k)):
  ``sum_jk smooth_l1(cos_s - cos_t)``.
* terms = ``[L_dist, L_angle]`` (B^2 and B^3 means); stats = ``[scale_s, scale_t, mean_gx]`` with
  ``mean_gx = sum_ij smooth_l1'(x_s - x_t)_ij x_s_ij / count_s`` (the mean's part of the gradient).

Backward (:func:`rkd_backward`), with ``gd = grad_terms[0] / B^2``, ``ga = grad_terms[1] / B^3``,
``c_ijk = ga smooth_l1'(cos_s - cos_t)_ijk`` and ``A_ijk = c_ijk inv_ij inv_ik`` (student; 0 where
n_ij and n_ik are both 0: there cos_ijk = <0, 0> has no gradient), using the symmetry
``A_ijk = A_ikj``, writes ``dR = d loss / d R_s`` (B x B, each entry taken as independent):

* ``_triplet_backward_kernel`` (an upper-triangular [BLOCK, BLOCK] tile of (j, k), stored twice,
  and a range of anchors i: split so that about 2 programs per SM run, 32 splits of 2 anchors at
  B = 64): the split partials of ``T_jk = sum_i A_ijk`` (R_jk in w_ijk).
* ``_anchor_backward_kernel`` (row i): ``dR_ik = sum_j A_ijk`` (R_ik in w_ijk and w_ikj, 1/2 each)
  ``- inv_ik^2 sum_j c_ijk cos_ijk`` (through inv_ik, where sqrt(R_ik) >= eps)
  ``+ gd scale_s (smooth_l1'(x_s - x_t)_ik - [d_ik > 0] mean_gx) / (2 d_ik)`` (the distance
  term, where R_ik >= eps and k != i) ``- T_ik / 2`` (the partials added in split order).
* ``_grad_kernel``: ``dE_i = 2 sum_j (dR_ij + dR_ji) (e_i - e_j)``.

Work: the forward and both backward kernels visit the B^3 triplets once each (the triplet
backward half of them, by symmetry); R (half of it, by symmetry) and the gradient cost B^2 D.
All sums are deterministic (no atomics, every split added in a fixed order). Memory: the B x B
matrices R_s and R_t (saved for the backward), dR and the (splits, B, B) triplet partials, plus
(2, splits, B, B) distance partials when D is split (each about 2 * 264 * 32^2 floats = 2.2 MB
at most when split, on 132 SMs); nothing of size B x B x D.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels import _common
from kdfast.kernels import relational as rel
from kdfast.kernels._common import check_rows, sqrt_rn

_EPS = tl.constexpr(1e-12)
BLOCK = 32  # side of the (i, j) and (j, k) tiles
BLOCK_D = 8  # columns per step of the [BLOCK, BLOCK, BLOCK_D] difference tiles
BLOCK_ROW = 256  # entries per step of ``_sum_splits_kernel``
MIN_ANCHORS = 2  # anchors per program of ``_triplet_backward_kernel`` at least


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _smooth_l1(z):
    az = tl.abs(z)
    return tl.where(az < 1.0, 0.5 * z * z, az - 0.5)


@triton.jit
def _smooth_l1_grad(z):
    """d smooth_l1 / dz as torch: z clamped to [-1, 1] (NaN stays NaN)."""
    return tl.where(z < -1.0, -1.0, tl.where(z > 1.0, 1.0, z))


@triton.jit
def _pairs(r, n, i, idx, ok):
    """Anchor i against the rows idx: ``R[i, idx]``, inv and whether n_{i, idx} = 0 (length
    below eps, or idx masked)."""
    r2 = tl.load(r + i * n + idx, mask=ok, other=0.0)
    length = sqrt_rn(r2)
    return r2, 1.0 / tl.where(length < _EPS, _EPS, length), (length < _EPS) | ~ok


@triton.jit
def _cosines(r_jk, r_ij, inv_ij, zero_ij, r_ik, inv_ik, zero_ik):
    """[BLOCK_J, BLOCK_K] ``cos_ijk``; 0 where n_ij or n_ik is 0 (NaN propagates)."""
    w = ((r_ij[:, None] + r_ik[None, :]) - r_jk) * 0.5
    w = tl.where(zero_ij[:, None] | zero_ik[None, :], 0.0, w)
    return w * (inv_ij[:, None] * inv_ik[None, :])


@triton.jit
def _pair_weight(c, zero_ij, zero_ik):
    """c where at most one of n_ij, n_ik is 0 (A_ijk is 0 where both are)."""
    return tl.where(zero_ij[:, None] & zero_ik[None, :], 0.0, c)


@triton.jit
def _distance(r2, keep):
    """``sqrt(max(r2, eps))`` where keep (off the diagonal, in range), else 0."""
    return tl.where(keep, sqrt_rn(tl.where(r2 < _EPS, _EPS, r2)), 0.0)


@triton.jit
def _nets(sq_dist, n):
    """Pointers to R_s and R_t, and n as int64."""
    nn = rel.as_dtype(n, tl.int64)
    return sq_dist, sq_dist + nn * nn, nn


@triton.jit
def _triplet_tile(rs, rt, n, i, js, ok_j, ks, ok_k, r_ik_s, inv_ik_s, zero_ik_s, r_ik_t, inv_ik_t, zero_ik_t):
    """cos_s, cos_t of the anchor i and the (js, ks) tile, and the student's j-side inv and zero."""
    r_ij_s, inv_ij_s, zero_ij_s = _pairs(rs, n, i, js, ok_j)
    r_ij_t, inv_ij_t, zero_ij_t = _pairs(rt, n, i, js, ok_j)
    tile = js[:, None] * n + ks[None, :]
    mask = ok_j[:, None] & ok_k[None, :]
    cos_s = _cosines(tl.load(rs + tile, mask=mask, other=0.0), r_ij_s, inv_ij_s, zero_ij_s, r_ik_s, inv_ik_s, zero_ik_s)
    cos_t = _cosines(tl.load(rt + tile, mask=mask, other=0.0), r_ij_t, inv_ij_t, zero_ij_t, r_ik_t, inv_ik_t, zero_ik_t)
    return cos_s, cos_t, inv_ij_s, zero_ij_s


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _sum_splits_kernel(partials, sq_dist, n, splits, BLOCK: tl.constexpr):
    """Row program_id(0) of R_s (program_id(1) == 0) or R_t (== 1): the sum of its split
    partials, in split order."""
    i = tl.program_id(0).to(tl.int64)
    net = tl.program_id(1)
    nn = rel.as_dtype(n, tl.int64)
    for k0 in range(0, n, BLOCK):
        ks, ok = rel.span(k0, n, BLOCK)
        tl.store(sq_dist + (net * nn + i) * nn + ks, rel.summed(partials, net, splits, nn, i, ks, ok), mask=ok)


@triton.jit
def _distance_kernel(sq_dist, scales, out, n, LOSS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Row i of the distance term. LOSS False: out[i] = [sum_pos d_s, count_s, sum_pos d_t,
    count_t]; LOSS True: out[i] = [sum_k smooth_l1(x_s - x_t), sum_k smooth_l1'(x_s - x_t) x_s]."""
    i = tl.program_id(0).to(tl.int64)
    rs, rt, nn = _nets(sq_dist, n)
    if LOSS:
        scale_s = tl.load(scales)
        scale_t = tl.load(scales + 1)
    a0 = tl.zeros([BLOCK], ACC)
    a1 = tl.zeros([BLOCK], ACC)
    a2 = tl.zeros([BLOCK], ACC)
    a3 = tl.zeros([BLOCK], ACC)
    for k0 in range(0, n, BLOCK):
        ks, ok = rel.span(k0, n, BLOCK)
        keep = ok & (ks != i)
        d_s = _distance(tl.load(rs + i * nn + ks, mask=ok, other=0.0), keep)
        d_t = _distance(tl.load(rt + i * nn + ks, mask=ok, other=0.0), keep)
        if LOSS:
            x = d_s * scale_s
            z = x - d_t * scale_t  # 0 off keep
            a0 += _smooth_l1(z)
            a1 += _smooth_l1_grad(z) * x
        else:
            pos_s = d_s > 0.0
            pos_t = d_t > 0.0
            a0 += tl.where(pos_s, d_s, 0.0)
            a1 += pos_s.to(ACC)
            a2 += tl.where(pos_t, d_t, 0.0)
            a3 += pos_t.to(ACC)
    if LOSS:
        tl.store(out + i * 2, tl.sum(a0, axis=0))
        tl.store(out + i * 2 + 1, tl.sum(a1, axis=0))
    else:
        tl.store(out + i * 4, tl.sum(a0, axis=0))
        tl.store(out + i * 4 + 1, tl.sum(a1, axis=0))
        tl.store(out + i * 4 + 2, tl.sum(a2, axis=0))
        tl.store(out + i * 4 + 3, tl.sum(a3, axis=0))


@triton.jit
def _angle_kernel(sq_dist, out, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_jk smooth_l1(cos_s - cos_t)_ijk for the anchor i."""
    i = tl.program_id(0).to(tl.int64)
    rs, rt, nn = _nets(sq_dist, n)
    acc = tl.zeros([BLOCK, BLOCK], ACC)
    for k0 in range(0, n, BLOCK):
        ks, ok_k = rel.span(k0, n, BLOCK)
        r_ik_s, inv_ik_s, zero_ik_s = _pairs(rs, nn, i, ks, ok_k)
        r_ik_t, inv_ik_t, zero_ik_t = _pairs(rt, nn, i, ks, ok_k)
        for j0 in range(0, n, BLOCK):
            js, ok_j = rel.span(j0, n, BLOCK)
            cos_s, cos_t, _, _ = _triplet_tile(
                rs, rt, nn, i, js, ok_j, ks, ok_k, r_ik_s, inv_ik_s, zero_ik_s, r_ik_t, inv_ik_t, zero_ik_t
            )
            acc += _smooth_l1(cos_s - cos_t)  # 0 - 0 on the masked lanes
    tl.store(out + i, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _anchor_backward_kernel(sq_dist, grad_terms, stats, triplets, dr, n, splits, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Row i of dR (see the module docstring); ``triplets``: the split partials of
    ``sum_i A_ijk`` from ``_triplet_backward_kernel``."""
    i = tl.program_id(0).to(tl.int64)
    rs, rt, nn = _nets(sq_dist, n)
    size = rel.as_dtype(n, ACC)
    gd = tl.load(grad_terms).to(ACC) / (size * size)
    ga = tl.load(grad_terms + 1).to(ACC) / (size * size * size)
    scale_s = tl.load(stats)
    scale_t = tl.load(stats + 1)
    mean_gx = tl.load(stats + 2)
    for k0 in range(0, n, BLOCK):
        ks, ok_k = rel.span(k0, n, BLOCK)
        keep = ok_k & (ks != i)
        r_ik_s, inv_ik_s, zero_ik_s = _pairs(rs, nn, i, ks, ok_k)
        r_ik_t, inv_ik_t, zero_ik_t = _pairs(rt, nn, i, ks, ok_k)
        a = tl.zeros([BLOCK], ACC)  # sum_j A_ijk / inv_ik
        p = tl.zeros([BLOCK], ACC)  # sum_j c_ijk cos_ijk
        for j0 in range(0, n, BLOCK):
            js, ok_j = rel.span(j0, n, BLOCK)
            cos_s, cos_t, inv_ij_s, zero_ij_s = _triplet_tile(
                rs, rt, nn, i, js, ok_j, ks, ok_k, r_ik_s, inv_ik_s, zero_ik_s, r_ik_t, inv_ik_t, zero_ik_t
            )
            c = ga * _smooth_l1_grad(cos_s - cos_t)  # 0 on the masked lanes
            a += tl.sum(_pair_weight(c, zero_ij_s, zero_ik_s) * inv_ij_s[:, None], axis=0)
            p += tl.sum(c * cos_s, axis=0)
        angle = a * inv_ik_s - tl.where(zero_ik_s, 0.0, p * inv_ik_s * inv_ik_s)
        d_s = _distance(r_ik_s, keep)
        x_s = d_s * scale_s
        dd = gd * scale_s * (_smooth_l1_grad(x_s - _distance(r_ik_t, keep) * scale_t) - tl.where(d_s > 0.0, mean_gx, 0.0))
        distance = tl.where(keep & (r_ik_s >= _EPS), dd * 0.5 / tl.where(keep, d_s, 1.0), 0.0)
        triplet = rel.summed(triplets, 0, splits, nn, i, ks, ok_k)
        tl.store(dr + i * nn + ks, angle + distance - 0.5 * triplet, mask=ok_k)


@triton.jit
def _triplet_backward_kernel(sq_dist, grad_terms, triplets, n, per, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (tiles^2, splits): ``triplets[split, j, k] = sum_i A_ijk`` over the anchors
    ``split * per + [0, per)`` for the tile (tj, tk) = divmod(program_id(0), tiles), tj <= tk
    (A_ijk = A_ikj: the tile is also stored transposed into (tk, tj))."""
    tiles = tl.cdiv(n, BLOCK)
    tj = tl.program_id(0) // tiles
    tk = tl.program_id(0) % tiles
    if tj <= tk:
        js, ok_j = rel.span(tj * BLOCK, n, BLOCK)
        ks, ok_k = rel.span(tk * BLOCK, n, BLOCK)
        rs, rt, nn = _nets(sq_dist, n)
        size = rel.as_dtype(n, ACC)
        ga = tl.load(grad_terms + 1).to(ACC) / (size * size * size)
        acc = tl.zeros([BLOCK, BLOCK], ACC)
        i0 = tl.program_id(1) * per
        for i in range(i0, tl.minimum(i0 + per, n)):  # offsets via int64 nn (the interpreter's i is an int)
            r_ik_s, inv_ik_s, zero_ik_s = _pairs(rs, nn, i, ks, ok_k)
            r_ik_t, inv_ik_t, zero_ik_t = _pairs(rt, nn, i, ks, ok_k)
            cos_s, cos_t, inv_ij_s, zero_ij_s = _triplet_tile(
                rs, rt, nn, i, js, ok_j, ks, ok_k, r_ik_s, inv_ik_s, zero_ik_s, r_ik_t, inv_ik_t, zero_ik_t
            )
            c = _pair_weight(ga * _smooth_l1_grad(cos_s - cos_t), zero_ij_s, zero_ik_s)
            acc += c * (inv_ij_s[:, None] * inv_ik_s[None, :])
        plane = triplets + tl.program_id(1) * nn * nn
        tl.store(plane + js[:, None] * nn + ks[None, :], acc, mask=ok_j[:, None] & ok_k[None, :])
        if tj != tk:
            tl.store(plane + ks[:, None] * nn + js[None, :], tl.trans(acc), mask=ok_k[:, None] & ok_j[None, :])


@triton.jit
def _grad_kernel(dr, e, out, n, d, sb, sd, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [BLOCK, BLOCK_D] tile of ``dE_i = 2 sum_j (dR_ij + dR_ji) (e_i - e_j)``."""
    rows, ok_r = rel.span(tl.program_id(0) * BLOCK, n, BLOCK)
    d0 = tl.program_id(1) * BLOCK_D
    e_i = rel.load_rows(e, sb, sd, rows, ok_r, d0, d, BLOCK_D).to(ACC)
    acc = tl.zeros([BLOCK, BLOCK_D], ACC)
    for j0 in range(0, n, BLOCK):
        js, ok_j = rel.span(j0, n, BLOCK)
        mask = ok_r[:, None] & ok_j[None, :]
        m = tl.load(dr + rows[:, None] * n + js[None, :], mask=mask, other=0.0) + tl.load(
            dr + js[None, :] * n + rows[:, None], mask=mask, other=0.0
        )
        e_j = rel.load_rows(e, sb, sd, js, ok_j, d0, d, BLOCK_D).to(ACC)
        acc += tl.sum(m[:, :, None] * (e_i[:, None, :] - e_j[None, :, :]), axis=1)
    offs = d0 + tl.arange(0, BLOCK_D)
    tl.store(
        out + rows[:, None] * d + offs[None, :], (2.0 * acc).to(out.dtype.element_ty), mask=ok_r[:, None] & (offs < d)[None, :]
    )


# ----------------------------------------------------------------------------- launchers


def _constexprs(dtype: torch.dtype) -> dict[str, object]:
    return dict(ACC=_common.TL_DTYPES[_common.acc_dtype(dtype)], BLOCK=BLOCK, num_warps=rel.NUM_WARPS)


@functools.cache
def _triplet_warps(device: torch.device) -> int:
    """Warps of ``_triplet_backward_kernel``: 4 (rel.NUM_WARPS), 8 on CUDA GPUs before sm_90.
    Measured with ptxas (benchmarks/triton_compile.py): on sm_80 the 4-warp kernel spills 8 bytes
    at 96 registers, on 8 warps none at 72; on sm_90 8 warps spill with triton 3.6 (8 bytes at 64
    registers), 4 warps none (96-111 registers at B = 64)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return 2 * rel.NUM_WARPS
    return rel.NUM_WARPS


def _anchors_per_split(n: int, device: torch.device) -> int:
    """Anchors per program of ``_triplet_backward_kernel``: about target_programs(device)
    programs over the upper-triangular tiles, at least MIN_ANCHORS anchors each."""
    tiles = triton.cdiv(n, BLOCK)
    wanted = triton.cdiv(rel.target_programs(device), tiles * (tiles + 1) // 2)
    return triton.cdiv(n, max(1, min(wanted, n // MIN_ANCHORS)))


def rkd_forward(e_s: Tensor, e_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RKD terms of the (B, Ds) student and (B, Dt) teacher embeddings (any strides and floating
    dtypes): ``terms`` (2,) ``[L_dist, L_angle]`` (unweighted), ``sq_dist`` (2, B, B) ``[R_s, R_t]``
    and ``stats`` (3,) ``[scale_s, scale_t, mean_gx]``; all float32 (float64 for a float64
    student)."""
    rel.check_pair("rkd_forward", e_s, e_t)
    n = e_s.size(0)
    acc = _common.acc_dtype(e_s.dtype)
    device = e_s.device
    kw = _constexprs(e_s.dtype)
    sq_dist = torch.empty((2, n, n), dtype=acc, device=device)
    partials = rel.pairs(e_s, e_t, False, BLOCK, BLOCK_D, out=sq_dist)
    partial = torch.empty((n, 4), dtype=acc, device=device)
    rows = torch.empty((n, 2), dtype=acc, device=device)
    angle = torch.empty(n, dtype=acc, device=device)
    with _common.on_device(device):
        if partials.size(1) > 1:
            _sum_splits_kernel[(n, 2)](partials, sq_dist, n, partials.size(1), BLOCK=BLOCK_ROW, num_warps=rel.NUM_WARPS)
        _distance_kernel[(n,)](sq_dist, sq_dist, partial, n, LOSS=False, **kw)  # (scales unused)
        sums = partial.sum(0)
        totals, counts = sums[0::2], sums[1::2]
        scales = torch.where(counts > 0, counts / torch.where(counts > 0, totals, 1.0), 0.0)
        _distance_kernel[(n,)](sq_dist, scales, rows, n, LOSS=True, **kw)
        _angle_kernel[(n,)](sq_dist, angle, n, **kw)
    distance, gx = rows.sum(0)
    terms = torch.stack((distance / (n * n), angle.sum() / (n * n * n)))
    stats = torch.cat((scales, (gx / counts[0].clamp(min=1.0)).reshape(1)))
    return terms, sq_dist, stats


def rkd_backward(grad_terms: Tensor, e_s: Tensor, sq_dist: Tensor, stats: Tensor) -> Tensor:
    """Gradient of ``<grad_terms, terms>`` w.r.t. e_s: contiguous (B, Ds) in e_s's dtype.
    ``grad_terms``: (2,) (read on the device); ``sq_dist``, ``stats``: from :func:`rkd_forward`."""
    name = "rkd_backward"
    rel.check_pair(name, e_s, e_s)
    n, d = e_s.shape
    acc = _common.acc_dtype(e_s.dtype)
    device = e_s.device
    check_rows(name, "grad_terms", grad_terms, (2,), _common.TL_DTYPES, device)
    check_rows(name, "sq_dist", sq_dist, (2, n, n), (acc,), device)
    check_rows(name, "stats", stats, (3,), (acc,), device)
    grad_terms, sq_dist, stats = grad_terms.contiguous(), sq_dist.contiguous(), stats.contiguous()
    per = _anchors_per_split(n, device)
    splits = triton.cdiv(n, per)
    triplets = torch.empty((splits, n, n), dtype=acc, device=device)
    dr = torch.empty((n, n), dtype=acc, device=device)
    grad = torch.empty((n, d), dtype=e_s.dtype, device=device)
    kw = _constexprs(e_s.dtype)
    tiles = triton.cdiv(n, BLOCK)
    with _common.on_device(device):
        _triplet_backward_kernel[(tiles * tiles, splits)](
            sq_dist, grad_terms, triplets, n, per, **{**kw, "num_warps": _triplet_warps(device)}
        )
        _anchor_backward_kernel[(n,)](sq_dist, grad_terms, stats, triplets, dr, n, splits, **kw)
        _grad_kernel[(tiles, triton.cdiv(d, BLOCK_D))](dr, e_s, grad, n, d, *e_s.stride(), BLOCK_D=BLOCK_D, **kw)
    return grad
