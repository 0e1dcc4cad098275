"""CRD (Tian et al., ICLR 2020): ``CE + 0.8 (L_s + L_t)``, contrastive representation distillation
with two memory banks, as RepDistiller and mdistiller run it.

* Embeddings: the student's and the teacher's pooled features (mdistiller's ``pooled_feat``,
  :attr:`Features.pooled`), each through its own trainable ``Linear(dim, 128)`` (``embed_s``,
  ``embed_t``: the teacher's head is trained too, the teacher network is not), L2-normalised.
* Memory banks: ``memory_s`` and ``memory_t`` (N, 128), one row per training image (N: the
  training set's size), initialised uniform in ``[-1/sqrt(128/3), 1/sqrt(128/3)]``; after each
  batch the rows of its images move to ``normalize(0.5 row + 0.5 embedding)`` (momentum 0.5).
* Contrast: per sample, its own row (the positive, mode "exact"; "relax": a random image of its
  class) and ``nce_k`` = 16384 negatives drawn uniformly from the images of the other classes,
  distinct per sample (with replacement only where a class has fewer other images than
  ``nce_k``, as the peers' datasets do; ``replace: true`` always draws with replacement: O(B K)
  instead of O(B N) work per step, for ImageNet-size sets). ``L_s``: the student's embeddings
  against the teacher's bank, ``L_t``: the teacher's embeddings against the student's bank, each
  the NCE loss of :func:`kdfast.functional.crd_loss` at temperature 0.07 with its own constant
  ``Z``, set on the first batch to ``mean exp(s) * N`` and kept (the peers' rule).
* Objective: ``ce_weight * CE + feat_weight * (L_s + L_t)`` (1 and 0.8: mdistiller's CRD config,
  RepDistiller's ``-r 1 -a 0 -b 0.8``), plus ``kd_weight * KD(T = kd_temperature)`` (0 by default;
  RepDistiller's CRD+KD is ``kd_weight: 1``).

The peers draw the negatives in their Dataset (numpy, per image, in the loader workers) and hand
``(index, contrast_index)`` with every batch. Here the engine hands the batch's sample indices
(``forward(..., indices=)``, the loaders' ``yield_indices``) and the distiller draws the negatives
on the device, from a generator seeded from (its seed, step, rank): every process draws its own,
and a resumed run draws the same ones. ``contrast_indices=`` (B, K+1) uses given indices instead.

The banks and ``Z`` are buffers on the training device, saved in the distiller's ``state_dict``
(checkpointed and resumed exactly); DistributedDataParallel does not broadcast them
(``_ddp_params_and_buffers_to_ignore``): under DDP every process holds the whole of both banks
(each sample's negatives may be any training image) and applies every process's batch to them,
all-gathered once per step, so the replicas stay identical; ``Z`` is computed from the first
batches of every process (all-reduced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional
from kdfast._dist import all_reduce_sum
from kdfast.data.schedule import mix_seed
from kdfast.distillers.base import Distiller, Params, check_int
from kdfast.models import Features, KDModel

__all__ = ["CRD", "CRDParams", "Contrast", "Embed"]

MODES = ("exact", "relax")


@dataclass
class CRDParams(Params):
    ce_weight: float = 1.0
    feat_weight: float = 0.8  # the weight of L_s + L_t
    kd_weight: float = 0.0  # RepDistiller's CRD+KD: 1.0
    kd_temperature: float = 4.0
    feat_dim: int = 128
    nce_k: int = 16384  # negatives per sample
    nce_temperature: float = 0.07
    nce_momentum: float = 0.5
    mode: str = "exact"  # "exact": the positive is the sample's own row; "relax": a random row of its class
    replace: bool = False  # draw the negatives with replacement (O(B K) per step instead of O(B N))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("feat_dim", "nce_k"):
            check_int(name, getattr(self, name), 1 if name == "feat_dim" else 0)
        if not 0.0 <= self.nce_momentum < 1.0:
            raise ValueError(f"nce_momentum must be in [0, 1), got {self.nce_momentum!r}")
        for name in ("nce_temperature", "kd_temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")


class Embed(nn.Module):
    """``normalize(linear(x))``: the peers' ``Embed`` (module ``linear``, so the state_dict keys match)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x.flatten(1))
        return F.normalize(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y, dim=1)


@torch.no_grad()
def pooled_dim(model: KDModel, image_size: int) -> int:
    """The width of ``model.features(x).pooled`` for a square input of `image_size`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dim = model.features(torch.zeros(2, 3, image_size, image_size, device=device)).pooled.flatten(1).shape[1]
    model.train(was_training)
    return dim


class Contrast(nn.Module):
    """CRD's state: the embedding heads ``embed_s`` / ``embed_t``, the memory banks ``memory_s`` /
    ``memory_t`` (N, feat_dim) and the constants ``z`` = [Z_s, Z_t] (buffers), the training
    labels (for the negatives) and the sampling seed and step count (``get_extra_state``).

    The banks have 0 rows until :meth:`bind` (or a ``state_dict`` that holds them) gives them N."""

    memory_s: Tensor  # buffers (registered in __init__)
    memory_t: Tensor
    z: Tensor

    def __init__(self, dim_s: int, dim_t: int, feat_dim: int = 128) -> None:
        super().__init__()
        self.embed_s = Embed(dim_s, feat_dim)
        self.embed_t = Embed(dim_t, feat_dim)
        self.register_buffer("memory_s", torch.zeros(0, feat_dim))
        self.register_buffer("memory_t", torch.zeros(0, feat_dim))
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))  # [Z_s, Z_t]; set on the first batch
        self.z_set = False
        self.steps = 0  # batches seen: part of the sampling seed
        self.seed = int(torch.randint(0, 2**62, (1,)).item())  # from the run's seeded global RNG
        self.labels: Tensor | None = None
        self._order: Tensor | None = None  # the training images sorted by class
        self._starts: Tensor | None = None  # each class's first position in _order, and its count
        self._counts: Tensor | None = None
        self._others_min = 0  # the fewest images of other classes of any class

    @property
    def num_data(self) -> int:
        """N, the rows of each memory bank."""
        return self.memory_s.shape[0]

    def bind(self, labels: Tensor) -> None:
        """Banks of one row per training image (initialised as the peers': uniform in
        ``[-1/sqrt(D/3), 1/sqrt(D/3)]``, from the global RNG) and the (N,) training labels."""
        if labels.dim() != 1 or labels.numel() < 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        n, dim = labels.numel(), self.memory_s.shape[1]
        stdv = 1.0 / math.sqrt(dim / 3)
        device, dtype = self.z.device, self.memory_s.dtype
        self.memory_s = torch.rand(n, dim, device=device, dtype=dtype).mul_(2 * stdv).add_(-stdv)
        self.memory_t = torch.rand(n, dim, device=device, dtype=dtype).mul_(2 * stdv).add_(-stdv)
        self.labels = labels.to(self.z.device, torch.int64)
        self._order = torch.argsort(self.labels, stable=True)
        self._counts = torch.bincount(self.labels, minlength=int(self.labels.max()) + 1)
        self._starts = torch.cumsum(self._counts, 0) - self._counts
        self._others_min = n - int(self._counts.max())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("labels", "_order", "_counts", "_starts"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.z.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Unbound banks (0 rows) take the saved banks' shape (``kdfast viz``, the e2e peer)."""
        for name in ("memory_s", "memory_t"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and current.shape[0] == 0 and saved.shape != current.shape:
                setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {"z_set": self.z_set, "steps": self.steps, "seed": self.seed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.z_set, self.steps, self.seed = bool(state["z_set"]), int(state["steps"]), int(state["seed"])

    def check_bound(self) -> None:
        if self.labels is None or self.num_data == 0:
            raise RuntimeError(
                "crd: no training set bound (bind_training_set(labels) creates the memory banks; the engine calls it)"
            )

    @torch.no_grad()
    def sample(self, indices: Tensor, labels: Tensor, negatives: int, mode: str = "exact", replace: bool = False) -> Tensor:
        """(B, 1 + negatives) int64: column 0 the positive (the sample's own row, or with mode
        "relax" a random image of its class), then images of other classes, distinct per sample
        unless `replace` or a class has fewer other images than `negatives`; drawn from a
        generator seeded from (seed, steps, rank)."""
        self.check_bound()
        assert self.labels is not None and self._order is not None and self._counts is not None and self._starts is not None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        device = self.z.device
        gen = torch.Generator(device=device).manual_seed(mix_seed(self.seed, self.steps, rank))
        indices, labels = indices.to(device), labels.to(device)
        batch, n = indices.shape[0], self.num_data
        counts, starts = self._counts[labels], self._starts[labels]
        if mode == "exact":
            positive = indices
        else:
            draw = torch.rand(batch, device=device, generator=gen, dtype=torch.float64)
            positive = self._order[starts + (draw * counts).long().clamp_max(counts - 1)]
        if negatives == 0:
            return positive[:, None]
        if replace or negatives > self._others_min:
            # a position among the N - n_y images of the other classes in class order, skipping the own class
            others = (n - counts)[:, None]
            draw = torch.rand(batch, negatives, device=device, generator=gen, dtype=torch.float64)
            pos = (draw * others).long().clamp_max(others - 1)
            pos += (pos >= starts[:, None]).long() * counts[:, None]
            rows = self._order[pos]
        else:  # the `negatives` largest of N random keys, the own class excluded: distinct
            keys = torch.rand(batch, n, device=device, generator=gen)
            keys.masked_fill_(self.labels[None, :] == labels[:, None], -1.0)
            rows = keys.topk(negatives, dim=1, sorted=False).indices
        return torch.cat([positive[:, None], rows], dim=1)

    @torch.compiler.disable
    @torch.no_grad()
    def set_z(self, v_s: Tensor, v_t: Tensor, idx: Tensor, temperature: float) -> None:
        """The peers' constants from the first batch (of every process): N mean exp(s) per side."""
        sums = torch.stack(
            [
                functional.crd_partition(v_s, self.memory_t, idx, temperature).double().sum(),
                functional.crd_partition(v_t, self.memory_s, idx, temperature).double().sum(),
                torch.tensor(float(idx.numel()), dtype=torch.float64, device=idx.device),
            ]
        )
        sums = all_reduce_sum(sums)
        self.z.copy_(sums[:2] / sums[2] * self.num_data)
        self.z_set = True

    @torch.compiler.disable
    @torch.no_grad()
    def update(self, indices: Tensor, v_s: Tensor, v_t: Tensor, momentum: float) -> None:
        """The rows of the batch (of every process) -> normalize(m row + (1 - m) embedding)."""
        dim = self.memory_s.shape[1]
        rows = torch.cat([v_s.detach(), v_t.detach()], dim=1).to(self.memory_s.dtype)
        indices = indices.to(self.memory_s.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            all_rows = [torch.empty_like(rows) for _ in range(world)]
            all_indices = [torch.empty_like(indices) for _ in range(world)]
            dist.all_gather(all_rows, rows.contiguous())
            dist.all_gather(all_indices, indices.contiguous())
            rows, indices = torch.cat(all_rows), torch.cat(all_indices)
        for bank, new in ((self.memory_s, rows[:, :dim]), (self.memory_t, rows[:, dim:])):
            mixed = bank.index_select(0, indices).mul_(momentum).add_(new, alpha=1 - momentum)
            bank.index_copy_(0, indices, F.normalize(mixed, dim=1))
        self.steps += 1


class CRD(Distiller):
    """``{"ce": ..., "crd": feat_weight * (L_s + L_t)}`` (plus ``"kd"`` where ``kd_weight`` > 0);
    owns ``contrast`` (:class:`Contrast`: the embedding heads, the banks once
    :meth:`bind_training_set` has run, Z)."""

    params_class = CRDParams
    params: CRDParams
    uses_sample_indices = True

    def __init__(self, student: KDModel, teacher: KDModel, params: CRDParams, image_size: int = 32) -> None:
        super().__init__(student, teacher, params, image_size)
        self.contrast = Contrast(pooled_dim(student, image_size), pooled_dim(teacher, image_size), params.feat_dim)
        # DDP keeps these per process: Contrast.update keeps the replicas equal (no broadcast).
        self._ddp_params_and_buffers_to_ignore = [f"contrast.{name}" for name in ("memory_s", "memory_t", "z")]

    def bind_training_set(self, labels: Tensor) -> None:
        """Creates the memory banks, one row per training image, on the distiller's device, and
        keeps the (N,) training labels (for the negatives of other classes). Called by the engine
        before training (before a checkpoint is loaded into the distiller)."""
        self.contrast.bind(labels)

    @torch.no_grad()
    def sample(self, indices: Tensor, labels: Tensor) -> Tensor:
        """(B, K+1) contrast indices of a batch: its positives and ``nce_k`` negatives each."""
        p = self.params
        return self.contrast.sample(indices, labels, p.nce_k, p.mode, p.replace)

    def forward(
        self,
        images: Tensor,
        labels: Tensor,
        teacher: Features | None,
        epoch: int,
        indices: Tensor | None = None,
        contrast_indices: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits and the named, weighted losses; `indices` (B,): the batch's positions in
        the training set (handed over by the engine); `contrast_indices` (B, K+1): given contrast
        rows instead of drawn ones. Updates the memory banks."""
        if indices is None:
            raise ValueError("crd needs the batch's sample indices (forward(..., indices=...)): the engine hands them over")
        teacher = self.require_teacher(teacher)
        c, p = self.contrast, self.params
        c.check_bound()
        student = self.student.features(images)
        losses = {"ce": p.ce_weight * F.cross_entropy(student.logits, labels)}
        dtype = c.memory_s.dtype
        v_s = c.embed_s(student.pooled).to(dtype)
        v_t = c.embed_t(teacher.pooled.clone()).to(dtype)  # clone: the teacher's inference tensors cannot be saved
        idx = self.sample(indices, labels) if contrast_indices is None else contrast_indices
        if not c.z_set:
            c.set_z(v_s, v_t, idx, p.nce_temperature)
        loss_s = functional.crd_loss(v_s, c.memory_t, idx, c.z[0], p.nce_temperature)
        loss_t = functional.crd_loss(v_t, c.memory_s, idx, c.z[1], p.nce_temperature)
        losses["crd"] = p.feat_weight * (loss_s + loss_t)
        if p.kd_weight:
            losses["kd"] = p.kd_weight * functional.kd_loss(student.logits, teacher.logits, p.kd_temperature)
        # The fused losses computed their gradients from the banks already: updating them is safe.
        c.update(indices, v_s, v_t, p.nce_momentum)
        return student.logits, losses
