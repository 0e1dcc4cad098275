"""Fused distillation losses, functional form.

Every function takes ``backend=None`` (then ``$KDFAST_BACKEND``, then "auto"), or one of
"auto", "triton", "cuda", "cpu", "torch" (see :mod:`kdfast.backends`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from kdfast import _checks, backends
from kdfast.ops import at as at_ops, dkd as dkd_ops, kd as kd_ops
from kdfast.reference import at as at_reference
from kdfast.reference.kd import REDUCTIONS, reduce_rows

__all__ = ["attention_map", "at_loss", "kd_loss", "dkd_loss"]


def attention_map(
    feat: Tensor, p: float = 2, mode: str = "mean", normalize: bool = True, backend: str | None = None
) -> Tensor:
    """Attention map of a feature map (Zagoruyko & Komodakis 2017), (B, C, H, W) -> (B, H*W).

    ``mode="mean"``: ``m = mean_c f**p`` (the published code; integer p, sign kept for odd p);
    ``mode="sum"``: ``m = sum_c |f|**p`` (the paper). With ``normalize``, ``m / max(||m||_2, 1e-12)``
    per sample. Computed in float32 (float64 for float64 input), returned in ``feat``'s dtype.
    A zero map gives zeros; NaN/Inf in ``feat`` give NaN/Inf in the map.
    """
    _checks.check_feature("feat", feat)
    _checks.check_choice("mode", mode, at_reference.MAP_MODES)
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
    _checks.check_choice("mode", mode, tuple(at_reference.AT_MODES))
    _checks.check_choice("reduction", reduction, ("sum", "none"))
    _checks.check_power(p, at_reference.AT_MODES[mode][0])
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
