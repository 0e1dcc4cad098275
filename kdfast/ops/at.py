"""torch.library registration and backend dispatch of the attention-transfer (AT) op family.

Three ops, the same schemas on every fused backend (formulas in kdfast/reference/at.py):

* ``at_maps(feats, p, mode) -> maps``: raw attention maps of a list of feature maps, one launch.
* ``at_maps_backward(grad_maps, feats, p, mode) -> grads``: their backward, one launch.
* ``at_map_loss(maps_s, maps_t, loss) -> (losses, grad_maps_s)``: normalisation, per-sample
  loss (L, B) and its gradient w.r.t. the student maps, one launch.

The C++ kernels (kdfast._C) define them as ``torch.ops.kdfast.*`` (CPU and CUDA dispatch keys);
the Triton kernels (kdfast.kernels.at) as ``torch.ops.kdfast_triton.*``. This module registers,
for both namespaces, the fake (meta) kernels and the autograd formulas, so that the ops work with
``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``. Backend "torch" calls the eager
reference directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _extension
from kdfast.ops import namespace
from kdfast.reference import at as reference

TRITON_NS = "kdfast_triton"


def map_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.compute_dtype(dtype)


def hw_flattenable(f: Tensor) -> bool:
    """Whether h and w of a (B, C, H, W) tensor flatten into one strided dim (contiguous, channels_last)."""
    return f.shape[2] == 1 or f.shape[3] == 1 or f.stride(2) == f.shape[3] * f.stride(3)


# --- Triton ops: plain launchers wrapped as custom ops (kernels imported lazily: triton is optional).


@torch.library.custom_op(f"{TRITON_NS}::at_maps", mutates_args=())
def _at_maps_triton(feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    from kdfast.kernels import at as kernels

    return kernels.at_maps(feats, p, mode)


@torch.library.custom_op(f"{TRITON_NS}::at_maps_backward", mutates_args=())
def _at_maps_backward_triton(grad_maps: list[Tensor], feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    from kdfast.kernels import at as kernels

    return kernels.at_maps_backward(grad_maps, feats, p, mode)


@torch.library.custom_op(f"{TRITON_NS}::at_map_loss", mutates_args=())
def _at_map_loss_triton(maps_s: list[Tensor], maps_t: list[Tensor], loss: str) -> tuple[Tensor, list[Tensor]]:
    from kdfast.kernels import at as kernels

    return kernels.at_map_loss(maps_s, maps_t, loss)


# --- Fake kernels and autograd, shared by both namespaces.


def _at_maps_fake(feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    return [f.new_empty((f.shape[0], f.shape[2] * f.shape[3]), dtype=map_dtype(f.dtype)) for f in feats]


def _at_maps_backward_fake(grad_maps: list[Tensor], feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    return [torch.empty_like(f if hw_flattenable(f) else f.contiguous()) for f in feats]


def _at_map_loss_fake(maps_s: list[Tensor], maps_t: list[Tensor], loss: str) -> tuple[Tensor, list[Tensor]]:
    losses = maps_s[0].new_empty((len(maps_s), maps_s[0].shape[0]))
    return losses, [torch.empty_like(m, memory_format=torch.contiguous_format) for m in maps_s]


def _register(ns: str) -> None:
    ops = getattr(torch.ops, ns)

    def maps_setup(ctx, inputs, output):
        feats, ctx.p, ctx.mode = inputs
        ctx.save_for_backward(*feats)

    def maps_backward(ctx, grad_maps):
        feats = list(ctx.saved_tensors)
        grad_maps = [
            torch.zeros((f.shape[0], f.shape[2] * f.shape[3]), dtype=map_dtype(f.dtype), device=f.device) if g is None else g
            for g, f in zip(grad_maps, feats)
        ]
        return ops.at_maps_backward(grad_maps, feats, ctx.p, ctx.mode), None, None

    def loss_setup(ctx, inputs, output):
        ctx.save_for_backward(*output[1])

    def loss_backward(ctx, grad_losses, _unused):
        # d(sum_b w[l, b] * loss[l, b]) / d m_s[l] = w[l, b] * grad_maps_s[l][b]
        grads = [g * grad_losses[i].unsqueeze(1) for i, g in enumerate(ctx.saved_tensors)]
        return grads, [None] * len(grads), None

    torch.library.register_fake(f"{ns}::at_maps", _at_maps_fake)
    torch.library.register_fake(f"{ns}::at_maps_backward", _at_maps_backward_fake)
    torch.library.register_fake(f"{ns}::at_map_loss", _at_map_loss_fake)
    torch.library.register_autograd(f"{ns}::at_maps", maps_backward, setup_context=maps_setup)
    torch.library.register_autograd(f"{ns}::at_map_loss", loss_backward, setup_context=loss_setup)


_register(TRITON_NS)
for library in _extension.cpp_libraries("at_maps"):
    _register(library)


# --- Dispatch from a concrete backend name (kdfast.backends.resolve) to the ops.


def _flattenable(f: Tensor) -> Tensor:
    return f if hw_flattenable(f) else f.contiguous()


def attention_map(feat: Tensor, p: float, mode: str, normalize: bool, backend: str) -> Tensor:
    """(B, C, H, W) -> (B, H*W) attention map in ``feat``'s dtype (see reference.attention_map)."""
    if backend == "torch":
        return reference.attention_map(feat, p, mode, normalize)
    m = namespace(backend).at_maps([_flattenable(feat)], p, mode)[0]
    if normalize:
        m = reference.normalize_map(m)
    return m.to(feat.dtype)


def at_stage_losses(f_s: list[Tensor], f_t: list[Tensor], p: float, mode: str, backend: str) -> Tensor:
    """AT loss of each (student, teacher) stage, shape (L,), float32 (float64 for float64 students).

    Forward: two ``at_maps`` launches (student, teacher) and one ``at_map_loss`` launch for all
    stages; backward: one ``at_maps_backward`` launch.
    """
    if backend == "torch":
        return reference.at_stage_losses(f_s, f_t, p, mode)
    map_mode, loss = reference.AT_MODES[mode]
    pairs = [reference.align_spatial(s, t.detach()) for s, t in zip(f_s, f_t)]
    ops = namespace(backend)
    maps_s = ops.at_maps([_flattenable(s) for s, _ in pairs], p, map_mode)
    maps_t = ops.at_maps([_flattenable(t) for _, t in pairs], p, map_mode)  # detached: no graph
    maps_t = [m.to(maps_s[0].dtype) for m in maps_t]
    losses, _ = ops.at_map_loss(maps_s, maps_t, loss)
    return losses.sum(1)
