"""AFD (Ji et al., AAAI 2021) and RTK (Yang, Kao & Huang 2022, a **reading**) over every block output.

Both use every residual-block output of both networks (:attr:`Features.blocks`, T teacher and S
student maps). AFD, as METHODS.md and its public code (clovaai/attention-feature-distillation)::

    q_t = BN(W_q,t GAP(ft_t))                      one Linear + BN1d per teacher block, qk_dim wide
    k_s = ReLU(BN(W_k,s GAP(fs_s)))                one Linear + BN1d + ReLU per student block
    logit[b, t, s] = (q_t . k_s + p_t . p_s) / sqrt(qk_dim)     p_t (T, d), p_s (S, d): learned positions
    att[b, t, s] = softmax_s(logit[b, t, :])
    loss = afd_weight * map_distance_loss(blocks_s, blocks_t, att)

where :func:`kdfast.functional.map_distance_loss` computes the values ``v = normalize(mean_c f^2)``
(student values pooled to each teacher map's size: ``pool="map"`` pools ``mean_c f^2`` as the
public code does, ``"feature"`` pools the feature map first) and
``(1/B) sum_{b,t,s} att[b,t,s] * mean_n (v_s - v_t)^2`` in one fused launch. The losses are
``{"ce": ce_weight * CE, "afd": ...}``, plus ``"kd": kd_weight * kd_loss(zs, zt, temperature)``
when ``kd_weight != 0``.

The Params defaults are METHODS.md's first formula (qk_dim 128, weight 200, CE + AFD only). Two
knobs give the objective AFD's public code trains with, which the published AFD numbers come from
and the shipped AFD/RTK configs use: its ``main.py`` adds Hinton KD at ``--alpha 0.9``, T=4
(``kd_weight=0.9``), and it passes each key through one more Linear + BN1d from d to T*d, giving a
key per (s, t) pair, the positional term staying inside the logit (``bilinear=True``)::

    total = CE + 0.9 * KD(T=4) + 200 * L_AFD,   logit[b,t,s] = (q_t . K_s[t] + p_t . p_s) / sqrt(d)

RTK is this project's **reading** of "representative teacher keys": AFD's attention with only the r
most representative entries kept in the softmax, the others masked out (the selection is top-r by
logit, computed without gradient; the softmax of the kept logits keeps its gradient). ``select``
says which entries are kept:

* ``"teacher"`` (default): for each student block s, only its r best-scoring teacher blocks t
  keep their (t, s) entry; the softmax over s of every teacher row then runs over the kept entries,
  and a teacher row left with none gets zero attention (that teacher block is filtered out for the
  sample). It is the default because it is the only one of the two readings that selects
  *teacher* information, as the method's name and METHODS.md ("filtering teacher information that
  does not match the student") say; with "student" every teacher block is still distilled.
* ``"student"``: for each teacher query t, only its r best-scoring student keys enter the softmax
  over s (top-r sparse attention of AFD's own queries and keys); every teacher row keeps weight 1.

``r=None`` (or ``"all"``), or r at least the number of candidates (T for "teacher", S for
"student"), is AFD exactly. The shipped RTK configs use ``r = ceil(T / S)`` (the teacher/student
block ratio, rounded up): with select "teacher" that is the smallest r with which the kept entries can cover every
teacher block once; it is the project's choice, not the paper's (the Params default is r=3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional
from kdfast.distillers.base import Distiller, Params, check_int, feature_shapes, is_int
from kdfast.models import Features, KDModel
from kdfast.numerics.map_distance import POOLS

__all__ = ["AFD", "AFDParams", "RTK", "RTKParams", "LayerAttention", "top_r_mask"]

SELECT = ("teacher", "student")


@dataclass
class AFDParams(Params):
    ce_weight: float = 1.0
    afd_weight: float = 200.0
    qk_dim: int = 128  # d: width of queries, keys and positional terms
    kd_weight: float = 0.0  # Hinton KD on the logits (the public code's main.py: 0.9); 0 drops it
    temperature: float = 4.0
    bilinear: bool = False  # the public code's extra key layer: one key per (student, teacher) block pair
    pool: str = "map"  # student values: "map" pools mean_c f^2 (the public code), "feature" pools f first

    def __post_init__(self) -> None:
        check_int("qk_dim", self.qk_dim)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.bilinear, bool):
            raise ValueError(f"bilinear must be true or false, got {self.bilinear!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")


@dataclass
class RTKParams(AFDParams):
    r: int | str | None = 3  # entries kept per selection; None or "all": every one (AFD)
    select: str = (
        "teacher"  # "teacher": top-r teacher blocks per student block; "student": top-r student blocks per teacher block
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r == "all":
            self.r = None
        if self.r is not None and (not is_int(self.r) or self.r < 1):
            raise ValueError(f"r must be an integer >= 1, 'all' or null, got {self.r!r}")
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")


class LayerAttention(nn.Module):
    """AFD's meta-network: ``logits(blocks_s, blocks_t) -> (B, T, S)`` pre-softmax attention logits."""

    def __init__(self, t_channels: list[int], s_channels: list[int], qk_dim: int, bilinear: bool = False) -> None:
        super().__init__()
        self.qk_dim = qk_dim
        self.query = nn.ModuleList(nn.Sequential(nn.Linear(c, qk_dim), nn.BatchNorm1d(qk_dim)) for c in t_channels)
        self.key = nn.ModuleList(nn.Sequential(nn.Linear(c, qk_dim), nn.BatchNorm1d(qk_dim), nn.ReLU()) for c in s_channels)
        t = len(t_channels)
        self.bilinear = nn.Sequential(nn.Linear(qk_dim, qk_dim * t), nn.BatchNorm1d(qk_dim * t)) if bilinear else None
        self.p_t = nn.Parameter(torch.empty(t, qk_dim))
        self.p_s = nn.Parameter(torch.empty(len(s_channels), qk_dim))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)

    def forward(self, blocks_s: list[Tensor], blocks_t: list[Tensor]) -> Tensor:
        """``(q_t . k_s + p_t . p_s) / sqrt(d)`` for every sample, as float32 (B, T, S); the teacher's
        maps are detached (the teacher is never trained)."""
        query = torch.stack([layer(f.detach().mean((2, 3))) for layer, f in zip(self.query, blocks_t)], 1).float()  # B, T, d
        key = torch.stack([layer(f.mean((2, 3))) for layer, f in zip(self.key, blocks_s)], 1)  # B, S, d
        if self.bilinear is None:
            logits = query @ key.float().transpose(1, 2)
        else:
            b, s, d = key.shape
            pair_keys = self.bilinear(key.reshape(b * s, d)).reshape(b, s, -1, d).float()  # B, S, T, d
            logits = torch.einsum("bstd,btd->bts", pair_keys, query)
        return (logits + self.p_t.float() @ self.p_s.float().T) / math.sqrt(self.qk_dim)


@torch.no_grad()
def top_r_mask(logits: Tensor, r: int | None, select: str) -> Tensor | None:
    """Boolean (B, T, S) mask of the kept entries, or None when every entry is kept.

    select "student": the r largest logits of every teacher row (over s); "teacher": the r largest
    of every student column (over t). Exactly r entries per row / column (ties broken by topk).
    """
    dim = 1 if select == "teacher" else 2
    if r is None or r >= logits.shape[dim]:
        return None
    keep = torch.zeros_like(logits, dtype=torch.bool)
    return keep.scatter_(dim, logits.topk(r, dim=dim).indices, True)


def masked_softmax(logits: Tensor, keep: Tensor | None) -> Tensor:
    """``softmax_s`` over the kept entries; masked entries and rows with nothing kept get 0 (no NaN)."""
    if keep is None:
        return F.softmax(logits, dim=-1)
    empty = ~keep.any(-1, keepdim=True)
    masked = logits.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    return F.softmax(masked, dim=-1).masked_fill(~keep, 0.0)


class AFD(Distiller):
    """``{"ce", "afd", "kd"}``; owns the :class:`LayerAttention` (queries, keys, positions)."""

    params_class = AFDParams
    params: AFDParams
    loss_name: ClassVar[str] = "afd"

    def __init__(self, student: KDModel, teacher: KDModel, params: AFDParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        channels = {}
        for role, model in (("student", student), ("teacher", teacher)):
            shapes = feature_shapes(model, image_size, "blocks")
            if not shapes:
                raise ValueError(f"{type(self).__name__} needs block outputs: the {role} {type(model).__name__} records none")
            channels[role] = [shape[0] for shape in shapes]
        self.attention = LayerAttention(channels["teacher"], channels["student"], params.qk_dim, params.bilinear)

    def keep_mask(self, logits: Tensor) -> Tensor | None:
        """The entries of the attention that enter the softmax (None: all, as AFD)."""
        return None

    def attention_weights(self, blocks_s: list[Tensor], blocks_t: list[Tensor]) -> Tensor:
        """att (B, T, S): softmax over student blocks of the (kept) logits."""
        logits = self.attention(blocks_s, blocks_t)
        return masked_softmax(logits, self.keep_mask(logits))

    def distill_losses(self, student: Features, teacher: Features, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        p = self.params
        att = self.attention_weights(student.blocks, teacher.blocks)
        losses = {self.loss_name: p.afd_weight * functional.map_distance_loss(student.blocks, teacher.blocks, att, p.pool)}
        if p.kd_weight:
            losses["kd"] = p.kd_weight * functional.kd_loss(student.logits, teacher.logits, p.temperature)
        return losses

    @torch.no_grad()
    def inspect(self, images: Tensor, labels: Tensor, teacher: Features | None) -> dict[str, Tensor]:
        """``"attention"``: att (N, T, S), teacher blocks down, student blocks across; and the value
        maps ``normalize(mean_c f^2)`` (N, H, W) (``functional.attention_map``, p=2, the values' own
        formula) of the last block of every resolution of both networks (student maps at their own size)."""
        teacher = self.require_teacher(teacher)
        student = self.student.features(images)
        maps = {"attention": self.attention_weights(student.blocks, teacher.blocks).float()}
        for name, blocks in (("teacher", teacher.blocks), ("student", student.blocks)):
            for i, f in enumerate(blocks):
                if i + 1 == len(blocks) or blocks[i + 1].shape[2:] != f.shape[2:]:
                    maps[f"{name} block {i} value"] = functional.attention_map(f).reshape(f.shape[0], *f.shape[2:]).float()
        return maps


class RTK(AFD):
    """AFD with only the top-r entries of the attention kept (``r``, ``select``: a reading, see the module)."""

    params_class = RTKParams
    params: RTKParams
    loss_name = "rtk"

    def keep_mask(self, logits: Tensor) -> Tensor | None:
        r = self.params.r
        assert not isinstance(r, str), r  # RTKParams.__post_init__ turned "all" into None
        return top_r_mask(logits, r, self.params.select)
