"""Input checks shared by the public functions: clear TypeError/ValueError naming the argument.

Checks look at metadata only (shape, dtype, device), never at values, so they cost no GPU sync
and stay traceable by torch.compile. NaN/Inf values are not checked: they propagate to the
result (see the docs of each function).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor_list(name: str, value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A tensor or a non-empty sequence of tensors, as a list."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a tensor or a non-empty list/tuple of tensors, got {type(value).__name__}")


def check_feature(name: str, f: Tensor) -> None:
    """A non-empty 4-D (B, C, H, W) floating-point feature map."""
    if not isinstance(f, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
    if f.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {f.dtype}")
    if f.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(f.shape)}): B, C, H and W must all be > 0")


def check_batched_pair(x_s: Tensor, x_t: Tensor, names: tuple[str, str]) -> None:
    """Student and teacher tensors of rank >= 2 (B, ...), floating, non-empty, with one batch
    size B and device (the other dims are free: they are flattened)."""
    for name, x in zip(names, (x_s, x_t)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (B, ...), got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): every dim must be > 0")
    if x_s.shape[0] != x_t.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have one batch size, got {x_s.shape[0]} and {x_t.shape[0]}")
    check_same(f"{names[0]} and {names[1]}", [x_s, x_t], "device")


def check_same(name: str, tensors: Sequence[Tensor], attr: str) -> None:
    """All tensors share `attr` ("device" or "dtype")."""
    values = {getattr(t, attr) for t in tensors}
    if len(values) > 1:
        raise ValueError(f"{name}: all tensors must share one {attr}, got {sorted(map(str, values))}")


def check_power(p: float, mode: str) -> None:
    """p >= 1 and finite; mode "mean" computes f^p as the published code does, so p must be an integer."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 1:
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    if mode == "mean" and p != int(p):
        raise ValueError(
            f"mode 'mean' computes f**p (signed, as the published code) and needs an integer p, got {p}; use mode 'sum' (|f|**p)"
        )


def check_logits(name: str, z: Tensor) -> None:
    """A (B, K) floating-point logit matrix with B >= 1 and K >= 2."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {z.dtype}")
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] < 2:
        raise ValueError(f"{name} must be (B, K) logits with B >= 1 and K >= 2 classes, got shape {tuple(z.shape)}")


def check_logit_pair(z_s: Tensor, z_t: Tensor) -> None:
    check_logits("z_s", z_s)
    check_logits("z_t", z_t)
    if z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must have one shape, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    check_same("z_s and z_t", [z_s, z_t], "device")


def check_target(target: Tensor, logits: Tensor) -> None:
    """(B,) int64 class indices in [0, K). The range check reads the values (a GPU sync); it is
    skipped inside torch.compile, where an out-of-range target gives a NaN loss row instead."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 (torch.long) class indices, got {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},) to match the logits, got {tuple(target.shape)}")
    check_same("target and logits", [target, logits], "device")
    if not torch.compiler.is_compiling() and bool(((target < 0) | (target >= logits.shape[1])).any()):
        raise ValueError(f"target has class indices outside [0, {logits.shape[1]})")


def check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
