"""torch.library registration and backend dispatch of the attention-transfer (AT) op family.

Three ops, the same schemas on every fused backend (formulas in kdfast/reference/at.py):

* ``at_maps(feats, p, mode) -> maps``: raw attention maps of a list of feature maps, one launch.
* ``at_maps_backward(grad_maps, feats, p, mode) -> grads``: their backward, one launch.
* ``at_map_loss(maps_s, maps_t, loss) -> (losses, grad_maps_s)``: normalisation, per-sample
  loss (L, B) and its gradient w.r.t. the student maps, one launch.

This module declares them once (``SPEC``: schemas, fake kernels, autograd formulas);
kdfast.ops.spec registers them as ``torch.ops.kdfast.*`` (C++ kernels of kdfast._C, CPU and CUDA
dispatch keys), ``torch.ops.kdfast_emu.*`` and ``torch.ops.kdfast_triton.*`` (kdfast.kernels.at),
so that the ops work with ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``. Backend
"torch" calls the eager implementation in kdfast/eager/at.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.eager import at as eager
from kdfast.numerics.at import AT_MODES, LOSSES, MAP_MODES, normalize_map
from kdfast.numerics.common import align_spatial, compute_dtype
from kdfast.ops import namespace
from kdfast.ops.spec import Autograd, Kernel, OpSpec, Sample, check_rows, contract, register, sample_tensor


def map_dtype(dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype)


def hw_flattenable(f: Tensor) -> bool:
    """Whether h and w of a (B, C, H, W) tensor flatten into one strided dim (contiguous, channels_last)."""
    return f.shape[2] == 1 or f.shape[3] == 1 or f.stride(2) == f.shape[3] * f.stride(3)


# --- Fake kernels and autograd formulas (kdfast.ops.spec registers them in every library).


def _at_maps_fake(feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    contract(len(feats) >= 1, "at_maps: expected at least one tensor")
    check_rows("at_maps", *feats, dims=4)
    contract(mode in MAP_MODES and p >= 1, f"at_maps: mode must be one of {MAP_MODES} and p >= 1")
    return [f.new_empty((f.shape[0], f.shape[2] * f.shape[3]), dtype=map_dtype(f.dtype)) for f in feats]


def _at_maps_backward_fake(grad_maps: list[Tensor], feats: list[Tensor], p: float, mode: str) -> list[Tensor]:
    return [torch.empty_like(f if hw_flattenable(f) else f.contiguous()) for f in feats]


def _at_map_loss_fake(maps_s: list[Tensor], maps_t: list[Tensor], loss: str) -> tuple[Tensor, list[Tensor]]:
    contract(len(maps_s) >= 1 and len(maps_s) == len(maps_t), "at_map_loss: expected equally many (>= 1) maps")
    check_rows("at_map_loss", *maps_s, *maps_t, dims=2)
    contract(all(s.shape == t.shape for s, t in zip(maps_s, maps_t)), "at_map_loss: maps of one stage must match")
    contract(loss in LOSSES, f"at_map_loss: loss must be one of {LOSSES}")
    losses = maps_s[0].new_empty((len(maps_s), maps_s[0].shape[0]))
    return losses, [torch.empty_like(m, memory_format=torch.contiguous_format) for m in maps_s]


def _maps_setup(ctx, inputs, output):
    feats, ctx.p, ctx.mode = inputs
    ctx.save_for_backward(*feats)


def _maps_backward(ops, ctx, grad_maps):
    feats = list(ctx.saved_tensors)
    grad_maps = [
        torch.zeros((f.shape[0], f.shape[2] * f.shape[3]), dtype=map_dtype(f.dtype), device=f.device) if g is None else g
        for g, f in zip(grad_maps, feats)
    ]
    return ops.at_maps_backward(grad_maps, feats, ctx.p, ctx.mode), None, None


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1])


def _loss_backward(ops, ctx, grad_losses, _unused):
    # d(sum_b w[l, b] * loss[l, b]) / d m_s[l] = w[l, b] * grad_maps_s[l][b]
    grads = [g * grad_losses[i].unsqueeze(1) for i, g in enumerate(ctx.saved_tensors)]
    return grads, [None] * len(grads), None


def _samples() -> tuple[Sample, ...]:
    f_s = (sample_tensor(2, 3, 4, 4, seed=1, requires_grad=True), sample_tensor(2, 2, 2, 3, seed=2, requires_grad=True))
    f_t = (sample_tensor(2, 5, 4, 4, seed=3), sample_tensor(2, 4, 2, 3, seed=4))

    def stages(mode: str, p: float):
        def run(s1: Tensor, s2: Tensor, t1: Tensor, t2: Tensor, backend: str) -> Tensor:
            return at_stage_losses([s1, s2], [t1, t2], p, mode, backend)

        return run

    samples = [Sample(f"stages {mode}", stages(mode, p), (*f_s, *f_t)) for mode, p in (("code", 2.0), ("paper", 3.0))]
    samples.append(Sample("map", lambda f, backend: attention_map(f, 3.0, "sum", True, backend), (f_s[0],)))
    return tuple(samples)


SPEC = register(
    OpSpec(
        "at",
        kernels=(
            Kernel("at_maps", "(Tensor[] feats, float p, str mode) -> Tensor[]", _at_maps_fake),
            Kernel(
                "at_maps_backward",
                "(Tensor[] grad_maps, Tensor[] feats, float p, str mode) -> Tensor[]",
                _at_maps_backward_fake,
            ),
            Kernel("at_map_loss", "(Tensor[] maps_s, Tensor[] maps_t, str loss) -> (Tensor, Tensor[])", _at_map_loss_fake),
        ),
        autograd=(
            Autograd("at_maps", _maps_setup, _maps_backward),
            Autograd("at_map_loss", _loss_setup, _loss_backward),
        ),
        samples=_samples,
    )
)


# --- Dispatch from a concrete backend name (kdfast.backends.resolve) to the ops.


def _flattenable(f: Tensor) -> Tensor:
    return f if hw_flattenable(f) else f.contiguous()


def attention_map(feat: Tensor, p: float, mode: str, normalize: bool, backend: str) -> Tensor:
    """(B, C, H, W) -> (B, H*W) attention map in ``feat``'s dtype (see kdfast.eager.at.attention_map)."""
    if backend == "torch":
        return eager.attention_map(feat, p, mode, normalize)
    m = namespace(backend).at_maps([_flattenable(feat)], p, mode)[0]
    if normalize:
        m = normalize_map(m)
    return m.to(feat.dtype)


def at_stage_losses(f_s: list[Tensor], f_t: list[Tensor], p: float, mode: str, backend: str) -> Tensor:
    """AT loss of each (student, teacher) stage, shape (L,), float32 (float64 for float64 students).

    Forward: two ``at_maps`` launches (student, teacher) and one ``at_map_loss`` launch for all
    stages; backward: one ``at_maps_backward`` launch.
    """
    if backend == "torch":
        return eager.at_stage_losses(f_s, f_t, p, mode)
    map_mode, loss = AT_MODES[mode]
    pairs = [align_spatial(s, t.detach()) for s, t in zip(f_s, f_t)]
    ops = namespace(backend)
    maps_s = ops.at_maps([_flattenable(s) for s, _ in pairs], p, map_mode)
    maps_t = ops.at_maps([_flattenable(t) for _, t in pairs], p, map_mode)  # detached: no graph
    maps_t = [m.to(maps_s[0].dtype) for m in maps_t]
    losses, _ = ops.at_map_loss(maps_s, maps_t, loss)
    return losses.sum(1)
