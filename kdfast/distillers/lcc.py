"""LCC (Li et al., ECCV 2020): ``CE + KD + LCC loss on chosen stages + class-aware attention CE``.

Per chosen stage ``i`` (an index into :attr:`Features.stages`, the same for both networks)::

    mask_i, ce_i = attention_i(ft_i, y)                  # ClassAwareAttention on the teacher map
    lcc_i = local_correlation_loss(fs_i, ft_i, grid, terms, term_weights, mask=mask_i)

and the losses ``{"ce": ce_weight * CE, "kd": kd_weight * kd_loss(zs, zt, T),
"lcc": lcc_weight * sum_i lcc_i, "lcc_attention": attention_weight * sum_i ce_i}`` ("kd" only when
``kd_weight != 0``, "lcc_attention" only with ``attention``). The mask is detached: it weights the
descriptors of both networks and is trained only by its auxiliary CE (see
:class:`kdfast.nn.ClassAwareAttention`, a **reading** of a secondary summary).

The paper's hyper-parameters were not available; the defaults are the project's choice, every one
a config key:

* ``stages=[-1]``, the last stage: LCC extends correlation congruence (pooled embeddings) to the
  last map before pooling, and the paper's grids fit it (k=4 on CIFAR's 8x8 maps, k=3 on
  ImageNet's 7x7, pooled to 6x6);
* CE/KD as the project's KD recipe (mdistiller's weights: 0.1 CE + 0.9 KD at T=4 on CIFAR; the
  ImageNet config uses 0.5 + 0.5 at T=1);
* ``lcc_weight=3`` with unit term weights: with random weights on resnet32x4 -> resnet8x4 the
  unweighted last-stage loss is about 0.8, so the weighted loss starts on the scale of SP's
  (x3000) and AT's (x1000) on the same pair, about 2 to 3;
* attention on, 2 conv-BN-ReLU layers of ``max(Ct // 4, 16)`` channels, 3x3, no threshold, its CE
  at weight 1 (it trains only the attention module, so its weight acts as that module's
  learning-rate scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from kdfast import functional
from kdfast.distillers.base import Distiller, Params, check_int, is_stage_list, sum_losses
from kdfast.models import Features, KDModel
from kdfast.nn import ClassAwareAttention
from kdfast.numerics.lcc import TERMS

__all__ = ["LCC", "LCCParams"]


@dataclass
class LCCParams(Params):
    ce_weight: float = 0.1
    kd_weight: float = 0.9  # 0 drops the KD term
    temperature: float = 4.0
    lcc_weight: float = 3.0
    stages: list[int] = field(default_factory=lambda: [-1])  # indices into Features.stages (negative from the end)
    grid: int = 4  # k: a k x k grid of regions (4 for CIFAR, 3 for ImageNet)
    terms: list[str] = field(default_factory=lambda: list(TERMS))  # any of intra, inter, cross
    term_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # l1, l2, l3 of intra, inter, cross
    attention: bool = True  # class-aware attention masks (one module per stage)
    attention_layers: int = 2  # conv-BN-ReLU layers of the mask generator
    attention_width: int | None = None  # their channels; None: max(Ct // 4, 16)
    attention_kernel: int = 3
    attention_threshold: float = 0.0  # mask values below it are zeroed (0: off)
    attention_weight: float = 1.0  # weight of the auxiliary classifier's CE

    def __post_init__(self) -> None:
        if not is_stage_list(self.stages):
            raise ValueError(f"stages must be a non-empty list of stage indices, got {self.stages!r}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must not repeat an index, got {self.stages!r}")
        check_int("grid", self.grid)
        if not self.terms or not set(self.terms) <= set(TERMS) or len(set(self.terms)) != len(self.terms):
            raise ValueError(f"terms must be distinct names among {', '.join(TERMS)}, got {self.terms!r}")
        if len(self.term_weights) != len(TERMS):
            raise ValueError(f"term_weights must hold 3 weights (intra, inter, cross), got {self.term_weights!r}")


class LCC(Distiller):
    """``{"ce", "kd", "lcc", "lcc_attention"}``; owns one :class:`ClassAwareAttention` per chosen stage."""

    params_class = LCCParams
    params: LCCParams

    def __init__(self, student: KDModel, teacher: KDModel, params: LCCParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        depth = min(len(student.stage_channels), len(teacher.stage_channels))
        bad = [s for s in params.stages if not -depth <= s < depth]
        if bad:
            raise ValueError(
                f"LCC stages {bad} out of range: student and teacher have {depth} stages in common "
                f"(valid indices {-depth}..{depth - 1})"
            )
        self.attention: nn.ModuleList | None = None
        if params.attention:
            num_classes = _num_classes(teacher)
            self.attention = nn.ModuleList(
                ClassAwareAttention(
                    teacher.stage_channels[s],
                    num_classes,
                    params.attention_layers,
                    params.attention_width,
                    params.attention_kernel,
                    params.attention_threshold,
                )
                for s in params.stages
            )

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        losses = {}
        if p.kd_weight:
            losses["kd"] = p.kd_weight * functional.kd_loss(student.logits, teacher.logits, p.temperature)
        lcc, attention_ce = [], []
        for k, stage in enumerate(p.stages):
            f_s, f_t = student.stages[stage], teacher.stages[stage]
            mask = None
            if self.attention is not None:
                # the teacher's features are inference tensors, which a trained module cannot save for backward
                mask, ce = self.attention[k](f_t.clone(), labels)
                attention_ce.append(ce)
            lcc.append(
                functional.local_correlation_loss(
                    f_s, f_t, grid=p.grid, terms=tuple(p.terms), weights=tuple(p.term_weights), mask=mask
                )
            )
        losses["lcc"] = p.lcc_weight * sum_losses(lcc)
        if attention_ce:
            losses["lcc_attention"] = p.attention_weight * sum_losses(attention_ce)
        return losses


def _num_classes(model: KDModel) -> int:
    """Output size of the model's classifier: the last Linear of its head segment."""
    head = model.stage_modules()[-1]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"LCC's class-aware attention needs the number of classes: no Linear in the head of {type(model).__name__}"
        )
    return linears[-1].out_features
