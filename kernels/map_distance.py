"""Triton kernels of the map-distance op (AFD/RTK); op contract in kdfast/ops/map_distance.py,
formulas in kdfast/reference/map_distance.py.

Per size group u (N = N_u positions, T_u teacher maps starting at index t0 of att's T axis)::

    dist[b, t0 + i, s] = sum_n (v_s[u][b, s, n] - v_t[u][b, i, n])^2 / N
    loss               = sum_{b,t,s} att[b, t, s] dist[b, t, s] / B
    grad_v_s[u][b, s, n] = 2 g / (B N) sum_i att[b, t0 + i, s] (v_s[u][b, s, n] - v_t[u][b, i, n])
    grad_att           = g dist / B                                  (g: the upstream gradient)

Launch design. ONE forward launch over every (sample, teacher map) and ONE backward launch over
every (group, sample, block of BLOCK_N positions), per alignment class of groups (see below; one
class, hence one launch each, whenever the groups' sizes agree, as AFD's CIFAR blocks do) and per
_common.MAX_STAGES groups. Nothing is staged on the host: the groups' tensors and integers (first
program id, t0, T_u, N_u, position blocks, batch and row strides of v_s[u] and v_t[u]) are kernel
arguments, tuples that a program selects from with a static loop over the groups, so a launch
captured in a CUDA graph replays with the same arguments. The groups of a launch share ALIGN, the
largest power of two <= 16 elements that the launcher proves divides their data pointers, strides
and N_u (restated with ``tl.multiple_of``, so the position loads vectorise); groups of different
ALIGN go to different launches, so that a 7x7 group does not make a 56x56 one read scalars.
Groups are ordered by decreasing N_u (longest programs first). All v_s and v_t share one dtype
(a constexpr); their positions must have unit stride (the launchers copy other tensors), the
other strides are free; att is read in place through its strides, in its own dtype.

Forward program (b, t): for each block of BLOCK_S students it accumulates the [BLOCK_S, BLOCK_N]
squared differences over the positions (v_t's block loaded once per student block), writes the
dist row and adds ``sum_s att * dist`` to its own partial (B*T of them, summed by torch in a fixed
order: deterministic). Backward program (u, b, j): ``acc[s, n] += att[b, t0 + i, s] *
(v_s - v_t[i])`` over the group's teachers i for its position block, stored scaled; the programs
of block j == 0 also write grad_att for their (sample, group). Loads are converted to the
accumulation dtype (float32; float64 for float64 values) before any arithmetic; no atomics.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast.kernels._common import TL_DTYPES, acc_dtype, alignment, chunks, on_device, pick, pick_field, pick_int, stage_of

_BLOCK_S_MAX = 16
_BLOCK_N_MIN = 16
_BLOCK_N_MAX = 128
_NUM_WARPS = 4


# Integer columns of a group (kernel argument ``groups[u]``).
_T0 = tl.constexpr(0)  # index of the group's first teacher along att's T axis
_T_COUNT = tl.constexpr(1)
_N = tl.constexpr(2)
_N_BLOCKS = tl.constexpr(3)  # position blocks (backward programs per sample)
_VS = tl.constexpr(4)  # v_s[u]: batch and student strides
_VT = tl.constexpr(6)  # v_t[u]: batch and teacher strides


@triton.jit
def _rows(ptrs, groups, u, COL: tl.constexpr, b, ALIGN: tl.constexpr):
    """Pointer to sample ``b`` of group u's (B, rows, N) tensor ``ptrs[u]`` and its row stride,
    with the launch's alignment (``ALIGN`` elements) restated for the compiler."""
    ptr = pick(ptrs, u)
    ptr = tl.multiple_of(ptr, ALIGN * (ptr.dtype.element_ty.primitive_bitwidth // 8))  # in bytes
    stride_b = tl.multiple_of(pick_field(groups, u, COL, tl.int64), ALIGN)
    return ptr + b.to(tl.int64) * stride_b, tl.multiple_of(pick_field(groups, u, COL + 1, tl.int64), ALIGN)


@triton.jit
def _group_program(firsts):
    """This program's group u (whose programs are ``firsts[u] .. firsts[u + 1] - 1``) and its
    index among them."""
    pid = tl.program_id(0)
    u = stage_of(pid, firsts)
    return u, pid - pick_int(firsts, u, tl.int32)


@triton.jit
def _group_rows(vs, vt, groups, u, b, ALIGN: tl.constexpr):
    """N_u and sample ``b`` of group u's student and teacher maps: (n, v_s rows, student stride,
    v_t rows, teacher stride), see :func:`_rows`."""
    n = tl.multiple_of(pick_field(groups, u, _N, tl.int32), ALIGN)
    vs, stride_s = _rows(vs, groups, u, _VS, b, ALIGN)
    vt, stride_t = _rows(vt, groups, u, _VT, b, ALIGN)
    return n, vs, stride_s, vt, stride_t


@triton.jit
def _student_tile(vs, stride_s, offs_s, offs_n, n_students, n, ACC: tl.constexpr):
    """v_s[offs_s, offs_n] of one sample as [BLOCK_S, BLOCK_N], 0 outside."""
    mask = (offs_s < n_students)[:, None] & (offs_n < n)[None, :]
    return tl.load(vs + offs_s[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _forward_kernel(
    vs,
    vt,
    firsts,
    groups,
    att,
    dist,
    partials,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dist[b, t, :] and partials[b, t] = sum_s att[b, t, s] dist[b, t, s] of one (sample, teacher):
    group u's programs are ``firsts[u] .. firsts[u + 1] - 1``."""
    att, n_teachers, n_students, att_sb, att_st, att_ss = att
    u, local = _group_program(firsts)
    t_count = pick_field(groups, u, _T_COUNT, tl.int32)
    b = local // t_count
    i = local % t_count
    t = pick_field(groups, u, _T0, tl.int32) + i
    n, vs, stride_s, vt, stride_t = _group_rows(vs, vt, groups, u, b, ALIGN)
    vt += i * stride_t
    bt = b.to(tl.int64) * n_teachers + t
    att_row = att + b.to(tl.int64) * att_sb + t * att_st
    weighted = tl.zeros([BLOCK_S], ACC)
    for s0 in range(0, n_students, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        acc = tl.zeros([BLOCK_S, BLOCK_N], ACC)
        for n0 in range(0, n, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x_t = tl.load(vt + offs_n, mask=offs_n < n, other=0.0).to(ACC)
            d = _student_tile(vs, stride_s, offs_s, offs_n, n_students, n, ACC) - x_t[None, :]
            acc += d * d
        d_row = tl.sum(acc, axis=1) / n.to(ACC)
        s_mask = offs_s < n_students
        tl.store(dist + bt * n_students + offs_s, d_row, mask=s_mask)
        a = tl.load(att_row + offs_s * att_ss, mask=s_mask, other=0.0).to(ACC)
        weighted += a * d_row
    tl.store(partials + bt, tl.sum(weighted, axis=0))


@triton.jit
def _backward_kernel(
    vs,
    vt,
    gvs,
    firsts,
    groups,
    grad_loss,
    att,
    dist,
    grad_att,
    batch,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """grad_v_s[u][b, :, block j] of one (group, sample, position block); grad_att[b, group's t, :]
    where j == 0 (programs as in :func:`_forward_kernel`)."""
    att, n_teachers, n_students, att_sb, att_st, att_ss = att
    u, local = _group_program(firsts)
    n_blocks = pick_field(groups, u, _N_BLOCKS, tl.int32)
    b = local // n_blocks
    j = local % n_blocks
    t0 = pick_field(groups, u, _T0, tl.int32)
    t_count = pick_field(groups, u, _T_COUNT, tl.int32)
    n, vs, stride_s, vt, stride_t = _group_rows(vs, vt, groups, u, b, ALIGN)
    gvs = pick(gvs, u)
    gvs = tl.multiple_of(gvs, ALIGN * (gvs.dtype.element_ty.primitive_bitwidth // 8)) + b.to(tl.int64) * n_students * n
    g = tl.load(grad_loss).to(ACC)
    scale = 2.0 * g / (batch * n)  # (batch is a constexpr where it is 1: no .to on it)
    att_b = att + b.to(tl.int64) * att_sb
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    for s0 in range(0, n_students, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < n_students
        x_s = _student_tile(vs, stride_s, offs_s, offs_n, n_students, n, ACC)
        acc = tl.zeros([BLOCK_S, BLOCK_N], ACC)
        for i in range(0, t_count):
            a = tl.load(att_b + (t0 + i) * att_st + offs_s * att_ss, mask=s_mask, other=0.0).to(ACC)
            x_t = tl.load(vt + i * stride_t + offs_n, mask=n_mask, other=0.0).to(ACC)
            acc += a[:, None] * (x_s - x_t[None, :])
        tl.store(
            gvs + offs_s[:, None] * n + offs_n[None, :],
            (scale * acc).to(gvs.dtype.element_ty),
            mask=s_mask[:, None] & n_mask[None, :],
        )
        if j == 0:
            for i in range(0, t_count):
                idx = (b.to(tl.int64) * n_teachers + t0 + i) * n_students + offs_s
                d = tl.load(dist + idx, mask=s_mask, other=0.0)
                tl.store(grad_att + idx, (g / batch * d).to(grad_att.dtype.element_ty), mask=s_mask)


# ----------------------------------------------------------------------------- host side


def _check(name: str, v_s: list[Tensor], v_t: list[Tensor], att: Tensor) -> None:
    """The op contract's checks (kdfast/ops/map_distance.py)."""
    if len(v_s) == 0 or len(v_s) != len(v_t):
        raise ValueError(f"{name}: v_s and v_t must hold equally many (>= 1) groups, got {len(v_s)} and {len(v_t)}")
    dtype, device = v_s[0].dtype, v_s[0].device
    if dtype not in TL_DTYPES:
        raise TypeError(f"{name}: v_s and v_t must be float16, bfloat16, float32 or float64, got {dtype}")
    batch = v_s[0].size(0) if v_s[0].dim() == 3 else -1
    students = v_s[0].size(1) if v_s[0].dim() == 3 else -1
    for u, (s, t) in enumerate(zip(v_s, v_t)):
        if s.dim() != 3 or t.dim() != 3 or s.size(0) != batch or t.size(0) != batch or s.size(1) != students:
            raise ValueError(
                f"{name}: v_s[{u}] must be (B, S, N) and v_t[{u}] (B, T_u, N) with one B and S for "
                f"all groups, got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        if s.size(2) != t.size(2) or s.numel() == 0 or t.numel() == 0:
            raise ValueError(f"{name}: v_s[{u}] {tuple(s.shape)} and v_t[{u}] {tuple(t.shape)} must be non-empty with one N")
        if s.dtype != dtype or t.dtype != dtype or s.device != device or t.device != device:
            raise ValueError(f"{name}: all v_s and v_t must share one dtype and device (group {u})")
    teachers = sum(t.size(1) for t in v_t)
    if tuple(att.shape) != (batch, teachers, students):
        raise ValueError(f"{name}: att must be (B, T, S) = {(batch, teachers, students)}, got {tuple(att.shape)}")
    if att.dtype not in TL_DTYPES or att.device != device:
        raise ValueError(f"{name}: att must be a floating tensor on {device}, got {att.dtype} on {att.device}")


def _att_view(att: Tensor) -> tuple:
    """The kernels' ``att`` argument: (att, T, S, its strides b, t, s)."""
    return (att, *att.shape[1:], *att.stride())


def _unit_n(v: Tensor) -> Tensor:
    return v if v.stride(2) == 1 or v.size(2) == 1 else v.contiguous()


def _block_s(students: int) -> int:
    return min(triton.next_power_of_2(students), _BLOCK_S_MAX)


def _block_n(v_s: list[Tensor]) -> int:
    return min(max(triton.next_power_of_2(max(v.size(2) for v in v_s)), _BLOCK_N_MIN), _BLOCK_N_MAX)


def _stride(t: Tensor, dim: int) -> int:
    """Stride of ``dim`` of ``t``, 0 where it has size 1 (never used: divisible by anything)."""
    return t.stride(dim) if t.size(dim) > 1 else 0


def _alignment(tensors: list[Tensor], n: int) -> int:
    """ALIGN of one group (:func:`_common.alignment`) of N_u and every data pointer (in elements),
    batch and row stride of its ``tensors``."""
    return alignment([n, *(v for t in tensors for v in (t.data_ptr() // t.element_size(), _stride(t, 0), _stride(t, 1)))])


def _launch(kernel, v_s: list[Tensor], v_t: list[Tensor], args: tuple, grads: list[Tensor] | None = None) -> None:
    """Launches ``kernel`` over every group: groups ordered by decreasing N_u, one launch per
    alignment class (and per _common.MAX_STAGES groups); the groups' tensors and integers are kernel
    arguments (nothing is staged on the host)."""
    batch, students = v_s[0].shape[:2]
    block_s, block_n = _block_s(students), _block_n(v_s)
    starts = [0]
    for v in v_t[:-1]:
        starts.append(starts[-1] + v.size(1))
    order = sorted(range(len(v_s)), key=lambda u: -v_s[u].size(2))
    aligns = {u: _alignment([v_s[u], v_t[u], *([grads[u]] if grads is not None else [])], v_s[u].size(2)) for u in order}
    with on_device(v_s[0].device):
        for align in dict.fromkeys(aligns[u] for u in order):
            for groups in chunks([u for u in order if aligns[u] == align]):
                s, t = [v_s[u] for u in groups], [v_t[u] for u in groups]
                n_blocks = [triton.cdiv(v.size(2), block_n) for v in s]
                firsts = [0]
                for v, blocks in zip(t, n_blocks):
                    firsts.append(firsts[-1] + batch * (blocks if grads is not None else v.size(1)))
                rows = tuple(
                    (
                        starts[u],
                        v_t[u].size(1),
                        v_s[u].size(2),
                        blocks,
                        _stride(v_s[u], 0),
                        _stride(v_s[u], 1),
                        _stride(v_t[u], 0),
                        _stride(v_t[u], 1),
                    )
                    for u, blocks in zip(groups, n_blocks)
                )
                outs = [tuple(grads[u] for u in groups)] if grads is not None else []
                kernel[(firsts[-1],)](
                    tuple(s),
                    tuple(t),
                    *outs,
                    tuple(firsts),
                    rows,
                    *args,
                    ACC=TL_DTYPES[acc_dtype(v_s[0].dtype)],
                    ALIGN=align,
                    BLOCK_S=block_s,
                    BLOCK_N=block_n,
                    num_warps=_NUM_WARPS,
                )


def map_distance_forward(v_s: list[Tensor], v_t: list[Tensor], att: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss 0-d, dist (B, T, S))`` in the accumulation dtype, one launch (plus torch's sum of the
    B*T partials). Contract: kdfast/ops/map_distance.py."""
    _check("map_distance_forward", v_s, v_t, att)
    v_s, v_t = [_unit_n(v) for v in v_s], [_unit_n(v) for v in v_t]
    batch, students = v_s[0].shape[:2]
    teachers = att.size(1)
    acc = acc_dtype(v_s[0].dtype)
    dist = torch.empty((batch, teachers, students), dtype=acc, device=att.device)
    partials = torch.empty((batch, teachers), dtype=acc, device=att.device)
    _launch(_forward_kernel, v_s, v_t, (_att_view(att), dist, partials))
    return partials.sum() / batch, dist


def map_distance_backward(
    grad_loss: Tensor, v_s: list[Tensor], v_t: list[Tensor], att: Tensor, dist: Tensor
) -> tuple[list[Tensor], Tensor]:
    """``(grad_v_s, grad_att)``, contiguous in the dtypes of v_s and att, one launch. ``dist``: the
    forward's. Contract: kdfast/ops/map_distance.py."""
    name = "map_distance_backward"
    _check(name, v_s, v_t, att)
    acc = acc_dtype(v_s[0].dtype)
    if grad_loss.dim() != 0 or grad_loss.dtype not in TL_DTYPES or grad_loss.device != att.device:
        raise ValueError(f"{name}: grad_loss must be a 0-d floating tensor on {att.device}")
    if dist.shape != att.shape or dist.dtype != acc or dist.device != att.device:
        raise ValueError(f"{name}: dist must be the forward's {tuple(att.shape)} {acc} tensor")
    v_s, v_t = [_unit_n(v) for v in v_s], [_unit_n(v) for v in v_t]
    batch = v_s[0].size(0)
    grads = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in v_s]
    grad_att = torch.empty(att.shape, dtype=att.dtype, device=att.device)
    _launch(
        _backward_kernel,
        v_s,
        v_t,
        (grad_loss, _att_view(att), dist.contiguous(), grad_att, batch),
        grads,
    )
    return grads, grad_att
