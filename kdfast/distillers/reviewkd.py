"""ReviewKD (Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review"), as its authors'
code (dvlab-research/ReviewKD) and mdistiller run it::

    CE + reviewkd_weight * min(epoch / warmup, 1) * HCL(ABF fusion of the student's levels, teacher's levels)

Levels. The student's levels are its stages after the stem (``Features.stages[1:]``; the
pre-activation ones with ``student_preact``, mdistiller's ImageNet setting) and, last, its pooled
embedding as a (D, 1, 1) map; the teacher's are its pre-activation stages after the stem and its
pooled embedding (mdistiller's ``preact_feats[1:] + [pooled_feat]``). Both networks must have as
many levels. Channels and sizes come from the two models, which gives exactly the tables the
peers write out per pair (``build_review_kd``: e.g. resnet8x4 in [64, 128, 256, 256], shapes
[1, 8, 16, 32]; MobileNetV2 in [12, 16, 48, 160, 1280], shapes [1, 2, 4, 8, 16] with out shapes
[1, 4, 8, 16, 32] under a ResNet50 teacher; ResNet18 [64, 128, 256, 512, 512], [1, 7, 14, 28, 56]).

Attention-based fusion (ABF), from deep to shallow, one module per level, ``mid =
min(max_mid_channels, C_last)`` channels (512 at most, as the peers): the level's map through a 1x1
conv + BN to ``mid``; below the deepest level, the residual of the level above, nearest-upsampled to
this level's size, is fused with it by a 2-channel 1x1 conv + sigmoid gate (``x * a_0 + r * a_1``);
the result (resized by nearest interpolation to the teacher's size where they differ) is the next
residual, and a 3x3 conv + BN of it to the teacher's channels is the level's output. The modules
keep the peers' parameter names (``abfs.<i>.conv1.0.weight``, ...; ``abfs.0`` is the deepest), with
their init (Kaiming-uniform, a = 1, for both convs).

HCL: ``kdfast.functional.hcl_loss`` over the levels (the fused ``hcl`` op: every level and stage in
one launch), MSE at the full map and at adaptive-average-pooled 4x4, 2x2, 1x1 (the levels smaller
than the map), weights halving from 1, summed over the levels.

Weights: mdistiller's defaults are ``reviewkd_weight`` 1.0 and 20 warm-up epochs (CIFAR), the ramp
``min(epoch / warmup, 1)`` with epochs counted from 1. The peers' per-pair runs change the weight
(mdistiller's CIFAR config 5.0 for resnet32x4 -> resnet8x4; the authors' script 5.0, 8.0 for
ShuffleV2, 0.6 for resnet56 -> resnet20, 1.0 for resnet110 -> resnet32): the shipped configs say
which they use. ImageNet (mdistiller's ResNet34 -> ResNet18): weight 1.0, warm-up 1 epoch,
``student_preact: true``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional
from kdfast.distillers.base import Distiller, Params, check_int
from kdfast.models import Features, KDModel
from kdfast.numerics.hcl import check_levels

__all__ = ["ABF", "ReviewKD", "ReviewKDParams", "build_fusion", "fuse_levels", "level_maps"]


@dataclass
class ReviewKDParams(Params):
    ce_weight: float = 1.0
    reviewkd_weight: float = 1.0
    warmup: int = 20  # epochs of the linear ramp of the ReviewKD weight from 0 (mdistiller: epoch / warmup)
    levels: list[int] = field(default_factory=lambda: [4, 2, 1])  # HCL's pooled levels
    max_mid_channels: int = 512  # ABF's middle channels: min(this, channels of the deepest student level)
    student_preact: bool = False  # the student's pre-activation stages (mdistiller's ImageNet setting)
    teacher_preact: bool = True  # the teacher's pre-activation stages (mdistiller)

    def __post_init__(self) -> None:
        check_int("warmup", self.warmup, 0)
        check_int("max_mid_channels", self.max_mid_channels)
        self.levels = list(check_levels(self.levels))


class ABF(nn.Module):
    """Attention-based fusion of one level (see the module docstring): ``forward(x, residual, size,
    out_size) -> (output, fused)``; ``fused`` is the residual of the next, shallower level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        reduce = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.conv1 = nn.Sequential(reduce, nn.BatchNorm2d(mid_channels))
        expand = nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Sequential(expand, nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        # after every module is built, as the peers do (the same random draws for a seed)
        nn.init.kaiming_uniform_(reduce.weight, a=1)
        nn.init.kaiming_uniform_(expand.weight, a=1)

    def forward(
        self, x: Tensor, residual: Tensor | None, size: tuple[int, int], out_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        fused = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the residual of the level above")
            above = F.interpolate(residual, size, mode="nearest")
            gates = self.att_conv(torch.cat([fused, above], dim=1))
            fused = fused * gates[:, 0:1] + above * gates[:, 1:2]
        if tuple(fused.shape[-2:]) != tuple(out_size):
            fused = F.interpolate(fused, out_size, mode="nearest")
        return self.conv2(fused), fused


def level_maps(features: Features, preact: bool) -> list[Tensor]:
    """The levels ReviewKD reads, shallow to deep: the stages after the stem (pre-activation ones
    with `preact`) and the pooled embedding as a (B, D, 1, 1) map."""
    stages = features.preact_stages if preact else features.stages
    return [*stages[1:], features.pooled[:, :, None, None]]


@torch.no_grad()
def _level_shapes(model: KDModel, image_size: int, preact: bool) -> list[tuple[int, ...]]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    maps = level_maps(model.features(torch.zeros(2, 3, image_size, image_size, device=device)), preact)
    model.train(was_training)
    return [tuple(m.shape[1:]) for m in maps]


def build_fusion(
    student: KDModel, teacher: KDModel, image_size: int, params: ReviewKDParams
) -> tuple[nn.ModuleList, list[tuple[int, int]], list[tuple[int, int]]]:
    """The ABF modules of a pair (deepest first, fresh), the student's level sizes and the teacher's
    (deepest first), from one forward of each model on `image_size` images."""
    s_shapes = _level_shapes(student, image_size, params.student_preact)
    t_shapes = _level_shapes(teacher, image_size, params.teacher_preact)
    if len(s_shapes) != len(t_shapes):
        raise ValueError(
            f"ReviewKD: the student has {len(s_shapes)} levels {s_shapes} and the teacher {len(t_shapes)} "
            f"{t_shapes} (stages after the stem and the pooled embedding): they must have as many"
        )
    in_channels = [shape[0] for shape in s_shapes]
    mid = min(params.max_mid_channels, in_channels[-1])
    last = len(s_shapes) - 1
    abfs = nn.ModuleList(ABF(in_channels[i], mid, t_shapes[i][0], fuse=i < last) for i in reversed(range(len(s_shapes))))
    return abfs, [(shape[1], shape[2]) for shape in reversed(s_shapes)], [(shape[1], shape[2]) for shape in reversed(t_shapes)]


def fuse_levels(
    abfs: nn.ModuleList, maps: list[Tensor], sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]]
) -> list[Tensor]:
    """ABF from deep to shallow: the outputs of every level, shallow to deep. ``abfs``, ``sizes``
    (the student's (H, W)) and ``out_sizes`` (the teacher's) are deepest first; ``maps`` shallow to deep."""
    deep_first = maps[::-1]
    output, residual = abfs[0](deep_first[0], None, sizes[0], out_sizes[0])
    outputs = [output]
    for x, abf, size, out_size in zip(deep_first[1:], abfs[1:], sizes[1:], out_sizes[1:], strict=True):
        output, residual = abf(x, residual, size, out_size)
        outputs.append(output)
    return outputs[::-1]


class ReviewKD(Distiller):
    """``{"ce": ..., "reviewkd": reviewkd_weight * ramp * hcl_loss(ABF(student levels), teacher levels)}``;
    owns the ABF modules (``abfs``, deepest first)."""

    params_class = ReviewKDParams
    params: ReviewKDParams

    def __init__(self, student: KDModel, teacher: KDModel, params: ReviewKDParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        self.abfs, self.sizes, self.out_sizes = build_fusion(student, teacher, image_size, params)

    def fused(self, student: Features) -> list[Tensor]:
        """The ABF outputs of every level, shallow to deep (the student side of the HCL)."""
        return fuse_levels(self.abfs, level_maps(student, self.params.student_preact), self.sizes, self.out_sizes)

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        targets = level_maps(teacher, p.teacher_preact)
        targets = [t if t.dtype == targets[0].dtype else t.to(targets[0].dtype) for t in targets]
        ramp = min(epoch / p.warmup, 1.0) if p.warmup > 0 else 1.0
        return {"reviewkd": p.reviewkd_weight * ramp * functional.hcl_loss(self.fused(student), targets, p.levels)}
