"""The shape catalogue of the Triton compile check: every op's launchers, forward and backward,
on the benchmark shapes (benchmarks/bench_*.py), the distillers' uses and edge shapes, in every
dtype and layout. One small table per op; :func:`cases` turns them into :class:`Case` objects
whose ``run()`` drives the op's public launchers (``kdfast.kernels.<op>``) on "meta" tensors.

Layouts: "contiguous" and "channels_last" for (B, C, H, W) maps; for matrices "contiguous" and
"strided" (rows of a wider buffer: a row stride that is not the width, as a column slice).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch

from benchmarks.triton_launches import kernel_module

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MAP_LAYOUTS = ("contiguous", "channels_last")
MATRIX_LAYOUTS = ("contiguous", "strided")

Stages = tuple[tuple[int, int, int], ...]  # (C, H, W) of a network's stages

CIFAR_RESNET56: Stages = ((16, 32, 32), (32, 16, 16), (64, 8, 8))
CIFAR_RESNET32X4: Stages = ((64, 32, 32), (128, 16, 16), (256, 8, 8))
CIFAR_RESNET8X4: Stages = ((64, 32, 32), (128, 16, 16), (256, 8, 8))
IMAGENET: Stages = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
EDGE_1X1: Stages = ((1, 1, 1),)
EDGE_ODD: Stages = ((3, 5, 7), (5, 3, 3))

# ----------------------------------------------------------------------------- tables
#
# Every row starts with the dtypes it runs in (the compile budget: distinct specialisations cost
# 0.2-4 s of CPU each): ALL for the main benchmark shape of an op, TRAINING (float32 and the
# autocast dtype) for the other benchmark shapes, EDGE (float32, float64) for the edge shapes,
# whose point is the specialisation of int arguments equal to 1 and odd sizes.

ALL = ("float32", "bfloat16", "float16", "float64")
TRAINING = ("float32", "bfloat16")
EDGE = ("float32", "float64")

# (dtypes, B, K) logits of KD and DKD: bench_kd.py, DKD's packed-row regime (B >= 2048, K <= 128),
# ImageNet-21k, a 32000-class vocabulary, edges.
LOGITS = (
    (ALL, 64, 100),
    (ALL, 4096, 100),
    (TRAINING, 1024, 1000),
    (TRAINING, 256, 21843),
    (TRAINING, 4096, 32000),
    (EDGE, 1, 1),
    (EDGE, 1, 100),
    (EDGE, 3, 7),
)

# AT: (dtypes, B, stages) of one launch; the p/mode variants on the first row only.
AT_NETWORKS = (
    (ALL, 64, CIFAR_RESNET32X4),
    (TRAINING, 64, CIFAR_RESNET56),
    (TRAINING, 256, IMAGENET),
    (TRAINING, 512, CIFAR_RESNET32X4[2:]),
    (EDGE, 1, EDGE_1X1),
    (EDGE, 5, EDGE_ODD),
)
AT_POWERS = ((2.0, "mean"), (3.0, "mean"), (2.5, "sum"))

# LCC: (dtypes, B, Cs, Ct, H, W, grid): bench_lcc.py's 8x8 maps at grid 4 (N = 16 B: 1024, 256
# and 16384 rows: the three tile sizes), edges.
LCC = (
    (ALL, 64, 64, 64, 8, 8, 4),
    (TRAINING, 16, 64, 64, 8, 8, 4),
    (TRAINING, 1024, 128, 256, 8, 8, 4),
    (EDGE, 1, 1, 1, 1, 1, 1),
    (EDGE, 3, 5, 7, 6, 6, 3),
)

# SP: (dtypes, B, Ds, Dt) flattened maps (bench_relational.py: CIFAR and ImageNet last stages), edges.
SP = (
    (ALL, 64, 4096, 4096),
    (TRAINING, 256, 16384, 16384),
    (TRAINING, 1024, 16384, 16384),
    (TRAINING, 256, 25088, 25088),
    (EDGE, 1, 1, 1),
    (EDGE, 1, 64, 64),
    (EDGE, 3, 5, 7),
)

# RKD: (dtypes, B, Ds, Dt) embeddings (bench_relational.py), edges.
RKD = (
    (ALL, 64, 64, 64),
    (TRAINING, 256, 256, 256),
    (TRAINING, 1024, 512, 512),
    (TRAINING, 256, 512, 2048),
    (EDGE, 1, 1, 1),
    (EDGE, 1, 64, 64),
    (EDGE, 33, 7, 9),
)

# masked MSE: (dtypes, (B, C, H, W)) (bench_masked_mse.py), edges; every reduction and gradient flags.
MASKED_MSE = (
    (ALL, (64, 256, 8, 8)),
    (TRAINING, (64, 128, 16, 16)),
    (TRAINING, (32, 512, 28, 28)),
    (TRAINING, (256, 256, 8, 8)),
    (EDGE, (1, 1, 1, 1)),
    (EDGE, (3, 5, 7, 9)),
)
MASKED_MSE_REDUCTIONS = ("mean", "masked_mean", "sum")
MASKED_MSE_GRADS = ((True, True), (True, False), (False, True))

# block attention: mode -> (power, feature grid (None: the grid), teacher weighting).
# LAKD's ndam_loss (power 1, no feature grid, weighting none or teacher) launches once per module
# in its local mode ("local": one module per launch) and once for all in its joint mode; AFT's
# aft_loss (power 2, feature grid = grid) once for all stages.
BLOCK_ATTENTION_MODES = {"ndam": (1.0, 0, False), "ndam-teacher": (1.0, 0, True), "aft": (2.0, None, False)}
# (dtypes, name, B, student stages, teacher stages, [(mode, grid, local)]); teacher and connector
# maps have the teacher's channels.
BLOCK_ATTENTION = (
    (ALL, "resnet32x4-resnet8x4", 64, CIFAR_RESNET8X4, CIFAR_RESNET32X4, (("ndam", 4, False), ("aft", 4, False))),
    (TRAINING, "resnet32x4-resnet8x4", 64, CIFAR_RESNET8X4, CIFAR_RESNET32X4, (("ndam", 4, True), ("ndam-teacher", 4, False))),
    (
        TRAINING,
        "wrn_40_2-wrn_16_2",
        256,
        ((32, 32, 32), (64, 16, 16), (128, 8, 8)),
        ((32, 32, 32), (64, 16, 16), (128, 8, 8)),
        (("aft", 4, False),),
    ),
    (TRAINING, "imagenet", 256, IMAGENET, IMAGENET, (("ndam", 4, False), ("aft", 4, False))),
    (EDGE, "edge-1x1", 1, EDGE_1X1, EDGE_1X1, (("ndam", 4, False), ("ndam-teacher", 4, False), ("aft", 4, False))),
    (
        EDGE,
        "edge-odd",
        3,
        ((3, 7, 7), (5, 9, 5)),
        ((4, 7, 7), (6, 9, 5)),
        (("ndam-teacher", 4, False), ("aft", 4, False), ("aft", 2, False)),
    ),
)

# map distance (AFD/RTK): (dtypes, name, B, S students, teacher groups (T_u, N_u)): bench_map_distance.py's
# WRN-16-2 -> WRN-40-2 (6 student blocks; 6 teacher blocks at 32x32, 16x16, 8x8), edges.
MAP_DISTANCE = (
    (ALL, "wrn_16_2-wrn_40_2", 64, 6, ((6, 1024), (6, 256), (6, 64))),
    (TRAINING, "wrn_16_2-wrn_40_2", 256, 6, ((6, 1024), (6, 256), (6, 64))),
    (TRAINING, "resnet8x4-resnet32x4", 64, 3, ((5, 1024), (5, 256), (5, 64))),
    (EDGE, "edge-1", 1, 1, ((1, 1),)),
    (EDGE, "edge-odd", 3, 5, ((2, 49), (3, 9))),
)


# HCL (ReviewKD): (dtypes, name, B, levels (C, H, W)) of one launch: the teacher-shaped maps of
# bench_hcl.py's pairs and of the cross-architecture pairs' deepest levels, edges. The levels
# variants on the first row only: the peers' (4, 2, 1), none, four levels (31 bins).
HCL = (
    (ALL, "resnet32x4-resnet8x4", 64, ((64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1))),
    (TRAINING, "resnet32x4-resnet8x4", 256, ((64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1))),
    (TRAINING, "resnet56-resnet20", 64, ((16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1))),
    (TRAINING, "vgg13-MobileNetV2", 64, ((128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512, 1, 1))),
    (TRAINING, "imagenet", 256, (*IMAGENET, (512, 1, 1))),
    (EDGE, "edge-1x1", 1, EDGE_1X1),
    (EDGE, "edge-odd", 3, (*EDGE_ODD, (2, 1, 1))),
)
HCL_LEVELS = ((4, 2, 1), (), (5, 2, 1, 1))

# CRD: (dtypes, B, K + 1, D, N) (bench_crd.py: the peers' 16384 negatives at batches 64 and 256,
# 4096 negatives with a CIFAR and an ImageNet-size bank), edges: B = D = N = 1 and K = 0, odd sizes,
# the largest D (1024).
CRD = (
    (ALL, 64, 16385, 128, 50000),
    (TRAINING, 64, 4097, 128, 50000),
    (TRAINING, 256, 16385, 128, 50000),
    (TRAINING, 256, 4097, 128, 1281167),
    (EDGE, 1, 1, 1, 1),
    (EDGE, 3, 7, 33, 5),
    (EDGE, 2, 5, 1024, 9),
)

# ----------------------------------------------------------------------------- tensors


def _empty(shape, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """A meta tensor of ``shape``: contiguous, channels_last (4-D) or "strided" (2-D rows of a
    buffer one element wider)."""
    if layout == "channels_last":
        return torch.empty(shape, dtype=dtype, device="meta", memory_format=torch.channels_last)
    if layout == "strided":
        rows, cols = shape
        return torch.empty((rows, cols + 1), dtype=dtype, device="meta")[:, :cols]
    return torch.empty(shape, dtype=dtype, device="meta")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _maps(batch: int, stages: Stages, dtype: torch.dtype, layout: str) -> list[torch.Tensor]:
    return [_empty((batch, *chw), dtype, layout) for chw in stages]


def _label(batch: int, stages: Stages) -> str:
    return f"B={batch} " + ",".join("x".join(map(str, chw)) for chw in stages)


# ----------------------------------------------------------------------------- drivers


def _kd(batch, classes, dtype):
    kd = kernel_module("kd")
    z_s, z_t = _empty((batch, classes), dtype), _empty((batch, classes), dtype)
    for with_grad in (True, False):
        _, stats, _ = kd.kd_forward(z_s, z_t, 4.0, with_grad)
    kd.kd_backward(_empty((batch,), _acc(dtype)), z_s, z_t, stats, 4.0)


def _dkd(batch, classes, dtype):
    dkd = kernel_module("dkd")
    z_s, z_t = _empty((batch, classes), dtype), _empty((batch, classes), dtype)
    target = _empty((batch,), torch.int64)
    for with_grad in (True, False):
        _, stats, _ = dkd.dkd_forward(z_s, z_t, target, 1.0, 8.0, 4.0, with_grad)
    dkd.dkd_backward(_empty((batch,), _acc(dtype)), z_s, z_t, target, stats, 1.0, 8.0, 4.0)


def _at(batch, stages, dtype, layout, powers):
    at = kernel_module("at")
    feats = _maps(batch, stages, dtype, layout)
    for p, mode in powers:
        maps = at.at_maps(feats, p, mode)
        at.at_maps_backward([torch.empty_like(m) for m in maps], feats, p, mode)
    for loss in ("mse", "l2"):
        at.at_map_loss(maps, [torch.empty_like(m) for m in maps], loss)


def _lcc(batch, cs, ct, h, w, grid, dtype, layout):
    f_s, f_t = _empty((batch, cs, h, w), dtype, layout), _empty((batch, ct, h, w), dtype, layout)
    _, inv_s, inv_t = kernel_module("lcc").lcc_forward(f_s, f_t, grid)
    kernel_module("lcc").lcc_backward(_empty((3,), _acc(dtype)), f_s, f_t, inv_s, inv_t, grid)


def _sp(batch, ds, dt, dtype, layout):
    x_s, x_t = _empty((batch, ds), dtype, layout), _empty((batch, dt), dtype, layout)
    _, stats = kernel_module("sp").sp_forward(x_s, x_t)
    kernel_module("sp").sp_backward(_empty((), _acc(dtype)), x_s, x_t, stats)


def _rkd(batch, ds, dt, dtype, layout):
    e_s, e_t = _empty((batch, ds), dtype, layout), _empty((batch, dt), dtype, layout)
    _, sq_dist, stats = kernel_module("rkd").rkd_forward(e_s, e_t)
    kernel_module("rkd").rkd_backward(_empty((2,), _acc(dtype)), e_s, sq_dist, stats)


def _masked_mse(shape, dtype, layout):
    mse = kernel_module("masked_mse")
    x, y = _empty(shape, dtype, layout), _empty(shape, dtype, layout)
    batch, _, h, w = shape
    mask = _empty((batch, 1, h, w), dtype, layout)[:, 0]  # the op's view of a (B, 1, H, W) mask
    for reduction in MASKED_MSE_REDUCTIONS:
        _, scale = mse.masked_mse_forward(x, y, mask, reduction)
    for x_grad, y_grad in MASKED_MSE_GRADS:
        mse.masked_mse_backward(_empty((), _acc(dtype)), x, y, mask, scale, x_grad, y_grad)


def _block_attention(batch, students, teachers, mode, grid, local, dtype, layout):
    ba = kernel_module("block_attention")
    power, feature_grid, weighting = BLOCK_ATTENTION_MODES[mode]
    feature_grid = grid if feature_grid is None else feature_grid
    f_s = _maps(batch, students, dtype, layout)
    h_s, f_t = _maps(batch, teachers, dtype, layout), _maps(batch, teachers, dtype, layout)
    step = 1 if local else len(f_s)
    for lo in range(0, len(f_s), step):
        parts = [x[lo : lo + step] for x in (f_s, h_s, f_t)]
        _, maps = ba.block_attention_forward(*parts, grid, power, feature_grid, weighting)
        ba.block_attention_backward(_empty((len(parts[0]), 2), _acc(dtype)), *parts, maps, grid, power, feature_grid, weighting)


def _hcl(batch, stages, dtype, layout, level_sets):
    hcl = kernel_module("hcl")
    f_s, f_t = _maps(batch, stages, dtype, layout), _maps(batch, stages, dtype, layout)
    for levels in level_sets:
        _, cells = hcl.hcl_forward(f_s, f_t, list(levels))
        hcl.hcl_backward(_empty((len(f_s),), _acc(dtype)), f_s, f_t, cells, list(levels))


def _crd(batch, columns, dim, rows, dtype, layout):
    crd = kernel_module("crd")
    emb, bank = _empty((batch, dim), dtype, layout), _empty((rows, dim), dtype, layout)
    idx = torch.empty((batch, columns), dtype=torch.int64, device="meta")
    crd.crd_forward(emb, bank, idx, _empty((), torch.float32), 0.07)


def _map_distance(batch, students, groups, dtype, att_layout):
    md = kernel_module("map_distance")
    acc = _acc(dtype)  # the values come from the AT op's maps: float32 (float64)
    v_s = [_empty((batch, students, n), acc) for _, n in groups]
    v_t = [_empty((batch, t, n), acc) for t, n in groups]
    teachers = sum(t for t, _ in groups)
    att = _empty((batch, teachers, students), dtype)
    if att_layout == "expanded":  # map_distances: zero weights expanded from a 0-d tensor
        att = _empty((), acc).expand(batch, teachers, students)
    _, dist = md.map_distance_forward(v_s, v_t, att)
    md.map_distance_backward(_empty((), acc), v_s, v_t, att, dist)


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    dtype: str
    case: str  # layout and shape
    run: Callable[[], None]


def _op_cases() -> Iterator[tuple[str, tuple[str, ...], str, Callable[[torch.dtype], None]]]:
    """(op, dtypes, case label, driver of a dtype) of every table row and layout."""
    # functools.partial binds a row's arguments; the case calls it with the dtype. dtypes and b
    # are declared once: every table's loop assigns them (with tuples of different lengths).
    dtypes: tuple[str, ...]
    b: int
    for dtypes, b, n in LOGITS:  # contiguous: a strided row only changes the stride's divisibility
        yield "kd", dtypes, f"B={b} K={n}", functools.partial(_kd, b, n)
        yield "dkd", dtypes, f"B={b} K={n}", functools.partial(_dkd, b, n)
    for layout in MATRIX_LAYOUTS:
        for op, table, matrix in (("sp", SP, _sp), ("rkd", RKD, _rkd)):
            for dtypes, b, ds, dt in table:
                yield op, dtypes, f"{layout} B={b} Ds={ds} Dt={dt}", functools.partial(matrix, b, ds, dt, layout=layout)
    for layout in MATRIX_LAYOUTS:  # emb and bank: contiguous, or rows of a wider buffer
        for dtypes, b, k1, d, n in CRD:
            yield "crd", dtypes, f"{layout} B={b} K+1={k1} D={d} N={n}", functools.partial(_crd, b, k1, d, n, layout=layout)
    for layout in MAP_LAYOUTS:
        for i, (dtypes, b, stages) in enumerate(AT_NETWORKS):
            powers = AT_POWERS if i == 0 else AT_POWERS[:1]
            yield "at", dtypes, f"{layout} {_label(b, stages)}", functools.partial(_at, b, stages, layout=layout, powers=powers)
        for dtypes, b, cs, ct, h, w, g in LCC:
            yield (
                "lcc",
                dtypes,
                f"{layout} B={b} Cs={cs} Ct={ct} {h}x{w} grid={g}",
                functools.partial(_lcc, b, cs, ct, h, w, g, layout=layout),
            )
        for dtypes, shape in MASKED_MSE:
            yield (
                "masked_mse",
                dtypes,
                f"{layout} {'x'.join(map(str, shape))}",
                functools.partial(_masked_mse, shape, layout=layout),
            )
        for dtypes, name, b, students, teachers, uses in BLOCK_ATTENTION:
            for mode, grid, local in uses:
                label = f"{layout} {mode} grid={grid} {'local' if local else 'joint'} {name} B={b}"
                yield (
                    "block_attention",
                    dtypes,
                    label,
                    functools.partial(_block_attention, b, students, teachers, mode, grid, local, layout=layout),
                )
        for i, (dtypes, name, b, stages) in enumerate(HCL):
            level_sets = HCL_LEVELS if i == 0 else HCL_LEVELS[:1]
            yield (
                "hcl",
                dtypes,
                f"{layout} {name} {_label(b, stages)}",
                functools.partial(_hcl, b, stages, layout=layout, level_sets=level_sets),
            )
    for dtypes, name, b, n_students, groups in MAP_DISTANCE:
        for att in ("contiguous", "expanded"):
            yield (
                "map_distance",
                dtypes,
                f"att {att} {name} B={b} S={n_students} groups={groups}",
                functools.partial(_map_distance, b, n_students, groups, att_layout=att),
            )


OPS = ("kd", "dkd", "at", "lcc", "sp", "rkd", "masked_mse", "block_attention", "map_distance", "hcl", "crd")


def cases(ops: tuple[str, ...] = OPS, main_only: bool = False) -> Iterator[Case]:
    """Every catalogue case of ``ops``; with ``main_only``, only the main benchmark shape of every
    op (the rows in ALL dtypes) in the TRAINING dtypes."""
    for op, dtypes, label, drive in _op_cases():
        if op in ops and (dtypes is ALL or not main_only):
            for name in TRAINING if main_only else dtypes:
                yield Case(op, name, label, functools.partial(drive, DTYPES[name]))
