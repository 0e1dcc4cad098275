"""Fused distillation losses, functional form.

Every function takes ``backend=None`` (then ``$KDFAST_BACKEND``, then "auto"), or one of
"auto", "triton", "cuda", "cpu", "torch" (see :mod:`kdfast.backends`).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from kdfast import _checks, backends
from kdfast.ops import at as at_ops
from kdfast.reference import at as at_reference

__all__ = ["attention_map", "at_loss"]


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
