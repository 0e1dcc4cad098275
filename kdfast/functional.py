"""Fused distillation losses, functional form.

Every function takes ``backend=None`` (then ``$KDFAST_BACKEND``, then "auto"), or one of
"auto", "triton", "cuda", "cpu", "torch" (see :mod:`kdfast.backends`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdfast import _checks, backends
from kdfast.numerics import at as at_numerics
from kdfast.numerics import block_attention as block_attention_numerics
from kdfast.numerics.hcl import REDUCTIONS as HCL_REDUCTIONS
from kdfast.numerics.hcl import check_levels as check_hcl_levels
from kdfast.numerics.kd import REDUCTIONS, reduce_rows
from kdfast.numerics.lcc import TERMS as LCC_TERMS
from kdfast.numerics.lcc import weigh_terms
from kdfast.numerics.map_distance import POOLS as MAP_DISTANCE_POOLS
from kdfast.numerics.masked_mse import REDUCTIONS as MASKED_MSE_REDUCTIONS
from kdfast.numerics.rkd import REDUCTIONS as RKD_REDUCTIONS
from kdfast.numerics.rkd import weigh as weigh_rkd
from kdfast.ops import at as at_ops
from kdfast.ops import block_attention as block_attention_ops
from kdfast.ops import crd as crd_ops
from kdfast.ops import dkd as dkd_ops
from kdfast.ops import hcl as hcl_ops
from kdfast.ops import kd as kd_ops
from kdfast.ops import lcc as lcc_ops
from kdfast.ops import map_distance as map_distance_ops
from kdfast.ops import masked_mse as masked_mse_ops
from kdfast.ops import rkd as rkd_ops
from kdfast.ops import sp as sp_ops

__all__ = [
    "attention_map",
    "at_loss",
    "kd_loss",
    "dkd_loss",
    "local_correlation_loss",
    "sp_loss",
    "rkd_loss",
    "ndam_map",
    "ndam_loss",
    "aft_loss",
    "masked_mse",
    "hcl_loss",
    "map_distance_loss",
    "map_distances",
    "crd_loss",
    "crd_partition",
]


def attention_map(feat: Tensor, p: float = 2, mode: str = "mean", normalize: bool = True, backend: str | None = None) -> Tensor:
    """Attention map of a feature map (Zagoruyko & Komodakis 2017), (B, C, H, W) -> (B, H*W).

    ``mode="mean"``: ``m = mean_c f**p`` (the published code; integer p, sign kept for odd p);
    ``mode="sum"``: ``m = sum_c |f|**p`` (the paper). With ``normalize``, ``m / max(||m||_2, 1e-12)``
    per sample. Computed in float32 (float64 for float64 input), returned in ``feat``'s dtype.
    A zero map gives zeros; NaN/Inf in ``feat`` give NaN/Inf in the map.
    """
    _checks.check_feature("feat", feat)
    _checks.check_choice("mode", mode, at_numerics.MAP_MODES)
    _checks.check_power(p, mode)
    return at_ops.attention_map(feat, float(p), mode, normalize, backends.resolve("at", backend, feat.device))


def at_loss(
    f_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    p: float = 2,
    mode: str = "code",
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """Attention-transfer loss between student and teacher feature maps (one stage or a list).

    With ``u = normalize(flatten(a(f)))`` per sample and stage:

    * ``mode="code"`` (default; the published tables): ``a(f) = mean_c f**p`` and the stage loss
      is ``mean_{b,hw} (u_s - u_t)**2``;
    * ``mode="paper"``: ``a(f) = sum_c |f|**p`` and the stage loss is ``mean_b ||u_s - u_t||_2``.

    Where a stage's spatial sizes differ, the larger map is adaptive-average-pooled to the smaller.
    Channel counts may differ. ``reduction="sum"`` returns the sum over stages (a scalar),
    ``"none"`` the (L,) vector of stage losses. The result is float32 (float64 for float64
    students). The teacher never receives a gradient. All stages run in one launch per kernel.
    NaN/Inf in any feature map give a NaN loss (values are not checked, which would sync the GPU).
    The usual loss weight (1000 for "code", beta/2 = 500 for "paper") is applied by the caller.
    """
    students = _checks.as_tensor_list("f_s", f_s)
    teachers = _checks.as_tensor_list("f_t", f_t)
    if len(students) != len(teachers):
        raise ValueError(f"f_s and f_t must have as many stages, got {len(students)} and {len(teachers)}")
    for i, (s, t) in enumerate(zip(students, teachers)):
        _checks.check_feature(f"f_s[{i}]", s)
        _checks.check_feature(f"f_t[{i}]", t)
        if s.shape[0] != t.shape[0] or s.shape[0] != students[0].shape[0]:
            raise ValueError(
                f"batch sizes differ: f_s[{i}] has {s.shape[0]}, f_t[{i}] has {t.shape[0]}, f_s[0] has {students[0].shape[0]}"
            )
    _checks.check_same("f_s and f_t", students + teachers, "device")
    _checks.check_same("f_s", students, "dtype")
    _checks.check_same("f_t", teachers, "dtype")
    _checks.check_choice("mode", mode, tuple(at_numerics.AT_MODES))
    _checks.check_choice("reduction", reduction, ("sum", "none"))
    _checks.check_power(p, at_numerics.AT_MODES[mode][0])
    device = students[0].device
    losses = at_ops.at_stage_losses(students, teachers, float(p), mode, backends.resolve("at", backend, device))
    return losses.sum() if reduction == "sum" else losses


def _grad_in_forward(z_s: Tensor, reduction: str) -> bool:
    """Whether the fused forward should compute the gradient (scaled later in the backward)."""
    return reduction != "none" and z_s.requires_grad and torch.is_grad_enabled()


def kd_loss(
    z_s: Tensor, z_t: Tensor, temperature: float = 4.0, reduction: str = "batchmean", backend: str | None = None
) -> Tensor:
    """Knowledge-distillation loss of Hinton et al. (2015) between student and teacher logits (B, K).

    ``loss_b = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``; ``reduction`` "batchmean"
    (``sum_b loss_b / B``, the default), "sum" or "none" ((B,) per row). The teacher never gets a
    gradient and may have another dtype than the student (e.g. precomputed bf16 logits). Computed in
    float32 (float64 for float64 students) with a streaming softmax: finite for logits of any
    magnitude. The fused kernels write no B x K tensor but the gradient: with a reduced loss the
    forward computes it and the backward only scales it in place (so a second backward through the
    same graph raises an error); with "none" the backward computes it.
    """
    _checks.check_logit_pair(z_s, z_t)
    _checks.check_positive("temperature", temperature)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    backend = backends.resolve("kd", backend, z_s.device)
    rows = kd_ops.kd_rows(z_s, z_t, float(temperature), _grad_in_forward(z_s, reduction), backend)
    return reduce_rows(rows, reduction)


def dkd_loss(
    z_s: Tensor,
    z_t: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    backend: str | None = None,
) -> Tensor:
    """Decoupled KD loss of Zhao et al. (2022), exactly as mdistiller computes it.

    With ``g = target``: ``loss_b = T^2 * (alpha * TCKD_b + beta * NCKD_b)``, where TCKD is the KL
    between the teacher's and student's binary [p_g, 1 - p_g] splits and NCKD the KL between
    ``softmax(z / T - 1000 * onehot(g))`` of teacher and student (kdfast/reference/dkd.py).
    ``reduction`` as in :func:`kd_loss` ("batchmean" is mdistiller's). Targets must be int64 in
    [0, K) (checked, which syncs a GPU once per call outside torch.compile). The warm-up of the
    loss weight over the first epochs is the caller's (the DKD distiller's).
    """
    _checks.check_logit_pair(z_s, z_t)
    _checks.check_target(target, z_s)
    _checks.check_finite("alpha", alpha)
    _checks.check_finite("beta", beta)
    _checks.check_positive("temperature", temperature)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    backend = backends.resolve("dkd", backend, z_s.device)
    with_grad = _grad_in_forward(z_s, reduction)
    rows = dkd_ops.dkd_rows(z_s, z_t, target, float(alpha), float(beta), float(temperature), with_grad, backend)
    return reduce_rows(rows, reduction)


def _check_lcc_mask(mask: Tensor, f_s: Tensor) -> None:
    """A non-empty (B, 1, h, w) floating-point mask on the maps' device."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"mask must be float16, bfloat16, float32 or float64, got {mask.dtype}")
    if mask.dim() != 4 or mask.shape[0] != f_s.shape[0] or mask.shape[1] != 1 or mask.numel() == 0:
        raise ValueError(f"mask must be (B, 1, h, w) with B = {f_s.shape[0]} and h, w > 0, got shape {tuple(mask.shape)}")
    _checks.check_same("mask and f_s", [mask, f_s], "device")


def local_correlation_loss(
    f_s: Tensor,
    f_t: Tensor,
    grid: int = 4,
    terms: Sequence[str] = LCC_TERMS,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    mask: Tensor | None = None,
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """Local correlation consistency loss of Li et al. (ECCV 2020) between feature maps (B, C, H, W).

    The maps are aligned (the larger adaptive-average-pooled to the smaller), multiplied by the
    detached spatial ``mask`` (B, 1, h, w; pooled to the aligned size) if given, and pooled to
    ``grid * max(1, H // grid)`` x ``grid * max(1, W // grid)`` where ``grid`` does not divide
    them. Each of the k x k regions p of sample i (k = ``grid``) gives a descriptor, row
    ``n = i * k^2 + p`` of N = B k^2 rows::

        u[n] = flatten(f[i, :, region p]) / max(||.||_2, 1e-12)
        S[n, m] = <u[n], u[m]>                       (within each network: Cs != Ct is fine)
        L_intra = mean over i == j                       of (S_s - S_t)^2   (B k^4 entries)
        L_inter = mean over i != j, same position        of (S_s - S_t)^2   (k^2 B (B - 1))
        L_cross = mean over i != j, different positions  of (S_s - S_t)^2   (B (B - 1) k^2 (k^2 - 1))

    (a term without entries, i.e. inter and cross for B = 1, is 0). ``reduction="sum"`` returns
    ``sum over terms of weight * L_term`` (``terms``: a non-empty subset of ("intra", "inter",
    "cross"); ``weights``: the three weights in that order), ``"none"`` the (3,) vector of weighted
    terms with 0 for terms not selected. The result is float32 (float64 for float64 students); the
    teacher (any floating dtype) never receives a gradient. The fused backends never build the
    N x N matrices: tiles are recomputed in the backward, extra memory O(N) plus an N x D
    accumulator. NaN/Inf in a map give a NaN loss (values are not checked).
    """
    _checks.check_feature("f_s", f_s)
    _checks.check_feature("f_t", f_t)
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"f_s and f_t must have one batch size, got {f_s.shape[0]} and {f_t.shape[0]}")
    _checks.check_same("f_s and f_t", [f_s, f_t], "device")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be an int >= 1, got {grid!r}")
    if isinstance(terms, str) or not isinstance(terms, Sequence):
        raise TypeError(f"terms must be a sequence of term names from {LCC_TERMS}, got {terms!r}")
    if not terms or not set(terms) <= set(LCC_TERMS):
        raise ValueError(f"terms must be a non-empty subset of {LCC_TERMS}, got {tuple(terms)!r}")
    if isinstance(weights, str) or not isinstance(weights, Sequence) or len(weights) != 3:
        raise ValueError(f"weights must be 3 numbers (intra, inter, cross), got {weights!r}")
    for name, w in zip(LCC_TERMS, weights):
        _checks.check_finite(f"weights ({name})", w)
    if mask is not None:
        _check_lcc_mask(mask, f_s)
    _checks.check_choice("reduction", reduction, ("sum", "none"))
    losses = lcc_ops.lcc_terms(f_s, f_t, grid, mask, backends.resolve("lcc", backend, f_s.device))
    w_intra, w_inter, w_cross = (float(w) for w in weights)
    return weigh_terms(losses, tuple(terms), (w_intra, w_inter, w_cross), reduction)


def sp_loss(f_s: Tensor, f_t: Tensor, backend: str | None = None) -> Tensor:
    """Similarity-preserving loss of Tung & Mori (2019), as mdistiller computes it.

    With ``X = flatten(f)`` (B, D) per network (any rank >= 2, flattened from dim 1; a
    channels_last map is read in memory order, which the result does not depend on) and
    ``G = normalize(X X^T)`` row-wise (``F.normalize``, eps 1e-12)::

        loss = ||G_s - G_t||_F^2 / B^2

    The student and teacher need one batch size B; their D (and dtypes) may differ. Returns a
    0-d float32 tensor (float64 for float64 students); the teacher never gets a gradient. The
    fused backends never store a B x B matrix: the Gram tiles are recomputed from X (extra memory
    O(B), plus a float32 B x D gradient accumulator for float16/bfloat16 students). NaN/Inf give
    a NaN loss (values are not checked). The usual weight (3000 on CIFAR) is the caller's.
    """
    _checks.check_batched_pair(f_s, f_t, ("f_s", "f_t"))
    return sp_ops.sp_loss(f_s, f_t, backends.resolve("sp", backend, f_s.device))


def rkd_loss(
    e_s: Tensor,
    e_t: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """Relational KD loss of Park et al. (2019) on embeddings, as mdistiller computes it.

    ``e = flatten(f)`` (B, D) per network (any rank >= 2, flattened from dim 1). Distance term:
    ``d_ij = sqrt(max(||e_i - e_j||^2, 1e-12))`` off the diagonal (0 on it), divided by the mean
    positive distance, ``L_dist = mean_ij smooth_l1(x_s - x_t)`` over the B^2 pairs. Angle term:
    ``cos_ijk = <normalize(e_j - e_i), normalize(e_k - e_i)>`` (eps 1e-12; 0 for j == i and for
    duplicated embeddings), ``L_angle = mean_ijk smooth_l1(cos_s - cos_t)`` over the B^3 triplets;
    smooth-L1 with beta 1. ``reduction="sum"`` returns
    ``distance_weight * L_dist + angle_weight * L_angle``, ``"none"`` the (2,) vector
    ``[distance_weight * L_dist, angle_weight * L_angle]``.

    B = 1 gives 0 (mdistiller: NaN; see kdfast/reference/rkd.py). Float32 result (float64 for
    float64 students); the teacher (any floating dtype, another D) never gets a gradient. The
    fused backends compute every distance and cosine from the two B x B matrices of squared
    distances (exact for duplicated embeddings) and never build the B x B x D difference tensor.
    NaN/Inf give a NaN loss (values are not checked).
    """
    _checks.check_batched_pair(e_s, e_t, ("e_s", "e_t"))
    _checks.check_finite("distance_weight", distance_weight)
    _checks.check_finite("angle_weight", angle_weight)
    _checks.check_choice("reduction", reduction, RKD_REDUCTIONS)
    terms = rkd_ops.rkd_terms(e_s, e_t, backends.resolve("rkd", backend, e_s.device))
    return weigh_rkd(terms, float(distance_weight), float(angle_weight), reduction)


def _check_grid(name: str, grid: int) -> None:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"{name} must be an int >= 1, got {grid!r}")


def _module_lists(
    f_s: Tensor | Sequence[Tensor], h_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The (student map, connector output, teacher map) lists of the block-attention losses, checked."""
    students = _checks.as_tensor_list("f_s", f_s)
    connectors = _checks.as_tensor_list("h_s", h_s)
    teachers = _checks.as_tensor_list("f_t", f_t)
    if not len(students) == len(connectors) == len(teachers):
        raise ValueError(
            f"f_s, h_s and f_t must have as many modules, got {len(students)}, {len(connectors)} and {len(teachers)}"
        )
    for i, (s, h, t) in enumerate(zip(students, connectors, teachers)):
        for name, f in ((f"f_s[{i}]", s), (f"h_s[{i}]", h), (f"f_t[{i}]", t)):
            _checks.check_feature(name, f)
            if f.shape[0] != students[0].shape[0]:
                raise ValueError(f"batch sizes differ: {name} has {f.shape[0]}, f_s[0] has {students[0].shape[0]}")
        if h.shape[1] != t.shape[1]:
            raise ValueError(f"h_s[{i}] and f_t[{i}] must have one channel count, got {h.shape[1]} and {t.shape[1]}")
    _checks.check_same("f_s, h_s and f_t", students + connectors + teachers, "device")
    _checks.check_same("f_s and h_s", students + connectors, "dtype")
    _checks.check_same("f_t", teachers, "dtype")
    return students, connectors, teachers


def _block_attention_loss(
    f_s: Tensor | Sequence[Tensor],
    h_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    grid: int,
    power: float,
    feature_grid: int,
    weighting: str,
    feature_weight: tuple[str, float],
    map_weight: tuple[str, float],
    reduction: str,
    backend: str | None,
) -> Tensor:
    """The block-attention losses of every module (:func:`ndam_loss`, :func:`aft_loss`): the inputs
    checked, the (L, 2) ``[feat_l, map_l]`` terms of one fused launch (``power`` and ``feature_grid``
    as in ``kdfast.ops.block_attention.block_attention_terms``; ``weighting`` as in :func:`ndam_loss`) reduced
    to ``feature_weight * feat_l + map_weight * map_l`` by ``reduction``. The two weights come with
    their public names, for their errors."""
    students, connectors, teachers = _module_lists(f_s, h_s, f_t)
    _check_grid("grid", grid)
    for name, weight in (feature_weight, map_weight):
        _checks.check_finite(name, weight)
    _checks.check_choice("weighting", weighting, block_attention_numerics.WEIGHTINGS)
    _checks.check_choice("reduction", reduction, block_attention_numerics.REDUCTIONS)
    device_backend = backends.resolve("block_attention", backend, students[0].device)
    terms = block_attention_ops.block_attention_terms(
        students, connectors, teachers, grid, power, feature_grid, weighting == "teacher", device_backend
    )
    return block_attention_numerics.weigh(terms, float(feature_weight[1]), float(map_weight[1]), reduction)


def ndam_map(f: Tensor, grid: int = 4) -> Tensor:
    """LAKD's non-directional activation map (NDAM) of a feature map, (B, C, H, W) -> (B, grid^2).

    ``normalize(flatten(adaptive_avg_pool2d(mean_c |f|, (grid, grid))))`` (F.normalize, eps
    1e-12), computed in float32 (float64 for float64 input), returned in ``f``'s dtype. Eager
    (for inspection and plots); :func:`ndam_loss` computes it inside the fused kernels.
    """
    _checks.check_feature("f", f)
    _check_grid("grid", grid)
    return block_attention_numerics.block_map(f, grid, 1.0).to(f.dtype)


def ndam_loss(
    f_s: Tensor | Sequence[Tensor],
    h_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    grid: int = 4,
    feature_weight: float = 1.0,
    map_weight: float = 1.0,
    weighting: str = "none",
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """LAKD's local loss of every module: feature MSE of the connector output plus NDAM distance.

    Per module l, with ``f_s[l]`` the module's raw output (B, Cs, Hs, Ws), ``h_s[l]`` its
    connector output and ``f_t[l]`` the teacher map (both Ct channels; where their H x W differ,
    the larger is adaptive-average-pooled to the smaller), ``A(f) = ndam_map(f, grid)``::

        map_l  = mean_{b,k} (A(f_s[l]) - A(f_t[l]))^2
        feat_l = mean_{b,c,y,x} w[b,y,x] (h_s[l] - f_t[l])^2
        loss_l = feature_weight * feat_l + map_weight * map_l

    ``weighting="none"``: ``w = 1``; ``"teacher"``: ``w`` is the teacher's NDAM map as a (B, g, g)
    grid, nearest-upsampled to H x W (cell ``(floor(y g / H), floor(x g / W))``) and scaled to
    spatial mean 1 (a constant). ``reduction="sum"`` returns ``sum_l loss_l`` (0-d), ``"none"``
    the (L,) losses, ``"terms"`` the (L, 2) unweighted ``[feat_l, map_l]``. Float32 (float64 for
    float64 students). Gradients flow to f_s and h_s, never to f_t. All modules in one fused
    launch. NaN/Inf in a map give a NaN loss (values are not checked).
    """
    feature, ndam = ("feature_weight", feature_weight), ("map_weight", map_weight)
    return _block_attention_loss(f_s, h_s, f_t, grid, 1.0, 0, weighting, feature, ndam, reduction, backend)


def aft_loss(
    f_s: Tensor | Sequence[Tensor],
    h_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    grid: int = 4,
    attention_weight: float = 1.0,
    feature_weight: float = 1.0,
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """AFT-KD's loss of every stage: MSE of attention blocks plus MSE of feature blocks.

    Per stage l, with ``f_s[l]`` the student map, ``h_s[l]`` its connector output ``c(f_s[l])`` and
    ``f_t[l]`` the teacher map (both Ct channels; where their H x W differ, the larger is
    adaptive-average-pooled to the smaller), ``pool_b`` the adaptive average pooling to
    (b, b) with ``b = grid`` and ``A(f) = normalize(flatten(pool_b(mean_c f^2)))``::

        attention_l = mean_{b,k} (A(f_s[l]) - A(f_t[l]))^2
        feature_l   = mean_{b,c,i,j} (pool_b(h_s[l]) - pool_b(f_t[l]))^2
        loss_l      = attention_weight * attention_l + feature_weight * feature_l

    ``reduction``: ``"sum"`` (0-d), ``"none"`` ((L,) losses; the adaptive per-stage weights of
    AFT-KD are the caller's) or ``"terms"`` ((L, 2) unweighted ``[feature_l, attention_l]``).
    Float32 (float64 for float64 students); gradients flow to f_s and h_s, never to f_t. All
    stages in one fused launch. NaN/Inf in a map give a NaN loss (values are not checked).
    """
    feature, attention = ("feature_weight", feature_weight), ("attention_weight", attention_weight)
    return _block_attention_loss(f_s, h_s, f_t, grid, 2.0, grid, "none", feature, attention, reduction, backend)


def masked_mse(x: Tensor, y: Tensor, mask: Tensor, reduction: str = "mean", backend: str | None = None) -> Tensor:
    """SoKD's masked feature loss (Shen et al. 2024): the MSE of two feature maps restricted to a
    spatial mask, ``sum_{b,c,h,w} (m[b,h,w] * (x - y))^2 / denom``.

    ``x``, ``y``: (B, C, H, W) of one shape (the student's connector output and the refined teacher
    feature; different dtypes are converted to their promoted dtype). ``mask``: (B, 1, H, W) or
    (B, H, W), floating (soft) or bool, broadcast over the channels (never expanded), detached: it
    gets no gradient. ``reduction``: "mean" (denom ``B*C*H*W``, the MSE of the masked maps),
    "masked_mean" (denom ``C * sum m^2``, the mean over the masked-in area; the loss is 0 where that
    is 0) or "sum" (denom 1). Returns a 0-d float32 tensor (float64 for float64 inputs); gradients
    flow to x and y (``y`` may be a trainable function of the teacher's features), only to those
    that need them, both from one fused backward pass. Deterministic. NaN/Inf give a NaN loss
    (values are not checked). The loss weight (1000 in the paper) is the caller's.
    """
    _checks.check_feature("x", x)
    _checks.check_feature("y", y)
    if y.shape != x.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in _checks.FLOAT_DTYPES and mask.dtype != torch.bool:
        raise TypeError(f"mask must be float16, bfloat16, float32, float64 or bool, got {mask.dtype}")
    batch, _, height, width = x.shape
    if tuple(mask.shape) not in ((batch, 1, height, width), (batch, height, width)):
        raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W) = {(batch, height, width)} of x, got shape {tuple(mask.shape)}")
    _checks.check_same("x, y and mask", [x, y, mask], "device")
    _checks.check_choice("reduction", reduction, MASKED_MSE_REDUCTIONS)
    return masked_mse_ops.masked_mse(x, y, mask, reduction, backends.resolve("masked_mse", backend, x.device))


def hcl_loss(
    f_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    levels: Sequence[int] = (4, 2, 1),
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """ReviewKD's hierarchical context loss (Chen et al. 2021), as its code and mdistiller compute it.

    Per stage pair (``f_s[i]``, ``f_t[i]``), both (B, C, H, W) of one shape (the student's fused
    feature and the teacher's), with the levels ``l < H`` of ``levels`` (in order) weighted
    ``1/2, 1/4, ...``::

        loss_i = (MSE(f_s, f_t) + sum_j w_j MSE(pool_l(f_s), pool_l(f_t))) / (1 + sum_j w_j)

    (``pool_l``: adaptive average pooling to (l, l)). ``levels``: at most 4 ints >= 1 of at most 32
    bins together (sum l^2). ``reduction="sum"`` returns the sum over stages (0-d), ``"none"`` the
    (L,) stage losses; float32 (float64 for float64 students). The teacher gets no gradient. All
    stages and levels in one fused launch each way; deterministic. NaN/Inf give a NaN loss (values
    are not checked). The loss weight and warm-up are the caller's.
    """
    students = _checks.as_tensor_list("f_s", f_s)
    teachers = _checks.as_tensor_list("f_t", f_t)
    if len(students) != len(teachers):
        raise ValueError(f"f_s and f_t must have as many stages, got {len(students)} and {len(teachers)}")
    for i, (s, t) in enumerate(zip(students, teachers)):
        _checks.check_feature(f"f_s[{i}]", s)
        _checks.check_feature(f"f_t[{i}]", t)
        if s.shape != t.shape:
            raise ValueError(f"f_s[{i}] and f_t[{i}] must have one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
        if s.shape[0] != students[0].shape[0]:
            raise ValueError(f"batch sizes differ: f_s[{i}] has {s.shape[0]}, f_s[0] has {students[0].shape[0]}")
    _checks.check_same("f_s and f_t", students + teachers, "device")
    _checks.check_same("f_s", students, "dtype")
    _checks.check_same("f_t", teachers, "dtype")
    _checks.check_choice("reduction", reduction, HCL_REDUCTIONS)
    levels = check_hcl_levels(levels)
    losses = hcl_ops.hcl_stage_losses(students, teachers, levels, backends.resolve("hcl", backend, students[0].device))
    return losses.sum() if reduction == "sum" else losses


def _map_lists(f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor], pool: str) -> tuple[list[Tensor], list[Tensor]]:
    """The (student maps, teacher maps) of the map-distance functions, checked."""
    students = _checks.as_tensor_list("f_s", f_s)
    teachers = _checks.as_tensor_list("f_t", f_t)
    for name, maps in (("f_s", students), ("f_t", teachers)):
        for i, f in enumerate(maps):
            _checks.check_feature(f"{name}[{i}]", f)
            if f.shape[0] != students[0].shape[0]:
                raise ValueError(f"batch sizes differ: {name}[{i}] has {f.shape[0]}, f_s[0] has {students[0].shape[0]}")
    _checks.check_same("f_s and f_t", students + teachers, "device")
    _checks.check_same("f_s", students, "dtype")
    _checks.check_same("f_t", teachers, "dtype")
    _checks.check_choice("pool", pool, MAP_DISTANCE_POOLS)
    return students, teachers


def map_distance_loss(
    f_s: Tensor | Sequence[Tensor],
    f_t: Tensor | Sequence[Tensor],
    att: Tensor,
    pool: str = "map",
    backend: str | None = None,
) -> Tensor:
    """AFD's / RTK's attention-weighted map distances between every teacher and student map.

    With S student maps ``f_s[s]`` (B, C_s, H_s, W_s), T teacher maps ``f_t[t]`` (B, C_t, H_t, W_t)
    (channels and sizes free) and ``normalize`` the L2 normalisation (eps 1e-12)::

        v_t[t]        = normalize(flatten(mean_c f_t[t]^2))
        v_s[s @ t]    = normalize(flatten(pool_t(mean_c f_s[s]^2)))     pool="map" (AFD's code)
                      = normalize(flatten(mean_c pool_t(f_s[s])^2))     pool="feature"
        dist[b, t, s] = mean_n (v_s[s @ t][b, n] - v_t[t][b, n])^2
        loss          = (1/B) sum_{b,t,s} att[b, t, s] dist[b, t, s]

    ``pool_t``: adaptive average pooling to (H_t, W_t) (it upsamples a smaller student map).
    ``att``: (B, T, S) attention weights, any floating dtype (AFD: softmax over s of the
    query-key scores; RTK: the same restricted to the top-r keys). Returns a 0-d float32 tensor
    (float64 for float64 students). Gradients flow to f_s and att, never to f_t. Values come from
    the fused AT op (one launch per network); all T x S distances from one fused launch, forward
    and backward (deterministic). AFD's loss weight (200) is the caller's. NaN/Inf give a NaN loss
    (values are not checked).
    """
    students, teachers = _map_lists(f_s, f_t, pool)
    shape = (students[0].shape[0], len(teachers), len(students))
    if not isinstance(att, Tensor):
        raise TypeError(f"att must be a torch.Tensor, got {type(att).__name__}")
    if att.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"att must be float16, bfloat16, float32 or float64, got {att.dtype}")
    if tuple(att.shape) != shape:
        raise ValueError(f"att must be (B, T, S) = {shape}, got shape {tuple(att.shape)}")
    _checks.check_same("att and f_s", [att, students[0]], "device")
    backend = backends.resolve("map_distance", backend, students[0].device)
    return map_distance_ops.map_distance_loss(students, teachers, att, pool, backend)


def map_distances(
    f_s: Tensor | Sequence[Tensor], f_t: Tensor | Sequence[Tensor], pool: str = "map", backend: str | None = None
) -> Tensor:
    """The (B, T, S) distances ``dist[b, t, s]`` of :func:`map_distance_loss` (for inspection: no
    gradient), float32 (float64 for float64 students), from the same fused launch."""
    students, teachers = _map_lists(f_s, f_t, pool)
    return map_distance_ops.map_distances(students, teachers, pool, backends.resolve("map_distance", backend, students[0].device))


def _check_crd(emb: Tensor, bank: Tensor, idx: Tensor) -> None:
    for name, t in (("emb", emb), ("bank", bank), ("idx", idx)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if emb.dtype not in _checks.FLOAT_DTYPES or bank.dtype != emb.dtype:
        raise TypeError(f"emb and bank must share one floating dtype, got {emb.dtype} and {bank.dtype}")
    if emb.dim() != 2 or emb.shape[0] < 1 or not 1 <= emb.shape[1] <= crd_ops.MAX_DIM:
        raise ValueError(f"emb must be 2-D (B >= 1, 1 <= D <= {crd_ops.MAX_DIM}), got shape {tuple(emb.shape)}")
    if bank.dim() != 2 or bank.shape[0] < 1 or bank.shape[1] != emb.shape[1]:
        raise ValueError(f"bank must be (N >= 1, D = {emb.shape[1]}) like emb, got shape {tuple(bank.shape)}")
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != emb.shape[0] or idx.shape[1] < 1:
        raise ValueError(f"idx must be int64 (B = {emb.shape[0]}, K + 1 >= 1), got {idx.dtype} of shape {tuple(idx.shape)}")
    _checks.check_same("emb, bank and idx", [emb, bank, idx], "device")


def crd_loss(
    emb: Tensor, bank: Tensor, idx: Tensor, z: Tensor | float, temperature: float = 0.07, backend: str | None = None
) -> Tensor:
    """CRD's contrastive (NCE) loss of one network's embeddings against the other network's memory
    bank (Tian et al. 2020), as RepDistiller and mdistiller compute it (``ContrastMemory`` +
    ``ContrastLoss``).

    ``emb`` (B, D), 1 <= D <= 1024: the embeddings (L2-normalised by the caller); ``bank`` (N, D) of
    emb's dtype: one row per training image; ``idx`` (B, K+1) int64: the rows scored against each
    embedding, column 0 the positive (the sample's own row), columns 1..K the negatives; ``z``: the
    normalisation constant (a 0-d tensor, read on the device, or a number). With
    ``s_bk = <bank[idx_bk], emb_b> / T``, ``P_bk = exp(s_bk) / z``, ``c = K / N``, ``eps = 1e-7``::

        loss = -(1/B) sum_b [log(P_b0 / (P_b0 + c + eps)) + sum_{k>=1} log(c / (P_bk + c + eps))]

    Returns a 0-d float32 tensor (float64 for float64 emb); only ``emb`` gets a gradient (computed
    by the forward from the rows it gathers). The fused backends gather the bank rows inside the
    kernel: neither the (B, K+1, D) rows nor the (B, K+1) scores are ever stored (extra memory
    O(B D) per split of the columns). An index outside [0, N) gives a NaN loss (values are not
    checked). CRD sums this loss over its two sides (student embeddings against the teacher's
    bank and back) and weighs it (0.8); ``z`` is set once from :func:`crd_partition`.
    """
    _check_crd(emb, bank, idx)
    _checks.check_positive("temperature", temperature)
    if not isinstance(z, Tensor):
        _checks.check_positive("z", z)
        z = torch.tensor(float(z), dtype=torch.float64, device=emb.device)
    elif z.dim() != 0 or z.dtype not in _checks.FLOAT_DTYPES or z.device != emb.device:
        raise ValueError(
            f"z must be a number or a 0-d floating tensor on {emb.device}, got {z.dtype} {tuple(z.shape)} on {z.device}"
        )
    return crd_ops.crd_loss(emb, bank, idx, z, float(temperature), backends.resolve("crd", backend, emb.device))


def crd_partition(emb: Tensor, bank: Tensor, idx: Tensor, temperature: float = 0.07, backend: str | None = None) -> Tensor:
    """``sum_k exp(<bank[idx_bk], emb_b> / T)`` (B,), without gradient, in the loss dtype: the peers
    set CRD's normalisation constant on their first batch to ``z = mean_{b,k} exp(s_bk) * N``, i.e.
    ``crd_partition(...).sum() / idx.numel() * N``. Arguments as :func:`crd_loss`; one pass of the
    same fused kernel."""
    _check_crd(emb, bank, idx)
    _checks.check_positive("temperature", temperature)
    return crd_ops.crd_partition(emb, bank, idx, float(temperature), backends.resolve("crd", backend, emb.device))
