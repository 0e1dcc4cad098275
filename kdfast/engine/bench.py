"""End-to-end benchmark: images/s of one distillation training step, kdfast vs an eager fp32 peer.

One step = teacher forward + student forward/backward + losses + SGD update, for a CIFAR pair
(default resnet32x4 -> resnet8x4, 100 classes, synthetic 32 x 32 images). Both sides run in the
same process:

* ``kdfast``: the training config of the pair and method (:func:`step_config`) assembled as
  ``kdfast train`` assembles it (:func:`~kdfast.engine.assembly.build_run`) and stepped as the
  trainer steps it (:func:`kdfast_step`): device-resident batches, channels_last, bf16 autocast
  on GPU (``amp="auto"``), the teacher under ``inference_mode``, the registered distiller (fused
  ``kdfast.functional`` losses);
* ``eager-fp32``: what the peers' code does (mdistiller / RepDistiller): a ``DataLoader`` over a
  CPU ``TensorDataset`` copied to the device every step, fp32, no compile, the teacher under
  ``no_grad``, the unfused losses of ``kdfast.reference`` (and the same trainable extras as the
  distiller: LCC's class-aware attention, LAKD's connectors, AFD's queries and keys, ReviewKD's
  ABFs), summed for one backward.

Every method runs with its distiller's default parameters, which the reference losses repeat,
except where :data:`DISTILLER_PARAMS` says otherwise (AFD: the objective of its public code).
LAKD's peer is a straightforward eager implementation of the method in an mdistiller-style
trainer: the student's local modules with a detach at each boundary (kdfast's
:class:`~kdfast.distillers.local.LocalModules`, mode "joint"), every module's loss summed and one
backward; the distiller runs its default mode "local" (a backward per module). Both give the same
gradients (``tests/test_cli.py`` checks losses and gradients of every method against its peer).

Rows use the columns of ``kdfast.engine.results`` (op ``e2e_<method>``, pass ``train_step``,
shape ``BxCxHxW`` of the batch, so images/s = B * 1000 / median_ms; ``peak_mem_bytes`` of one
step after the warm-up, see :func:`kdfast.engine.timing.peak_bytes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast import distillers, models
from kdfast.distillers.afd import LayerAttention
from kdfast.distillers.base import feature_shapes
from kdfast.distillers.crd import Contrast, CRDParams, pooled_dim
from kdfast.distillers.local import LocalModules, ModuleOutput, stage_boundaries
from kdfast.distillers.reviewkd import ReviewKDParams, build_fusion, fuse_levels, level_maps
from kdfast.engine import results
from kdfast.engine.assembly import RunParts, build_run, memory_format
from kdfast.engine.config import Config, DataConfig, MethodConfig, ModelConfig, OptimConfig, with_seeds
from kdfast.engine.e2e_methods import METHODS
from kdfast.engine.timing import measure_step, quantiles
from kdfast.engine.trainer import distill_step, teacher_features
from kdfast.models import Features, KDModel
from kdfast.models.mobilenet import MobileNetV1
from kdfast.models.resnet import ImageNetResNet
from kdfast.nn import ClassAwareAttention
from kdfast.numerics.block_attention import weigh as weigh_blocks
from kdfast.reference import at as ref_at
from kdfast.reference import block_attention as ref_ndam
from kdfast.reference import crd as ref_crd
from kdfast.reference import dkd as ref_dkd
from kdfast.reference import hcl as ref_hcl
from kdfast.reference import kd as ref_kd
from kdfast.reference import lcc as ref_lcc
from kdfast.reference import map_distance as ref_afd
from kdfast.reference import rkd as ref_rkd
from kdfast.reference import sp as ref_sp

__all__ = [
    "DISTILLER_PARAMS",
    "METHODS",
    "REFERENCE_METHODS",
    "kdfast_step",
    "run_e2e",
    "run_students_e2e",
    "step_config",
    "synthetic_batches",
]


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair and the synthetic batch it trains on."""

    teacher: str
    student: str
    dataset: str  # the model zoo (kdfast.models.create's dataset)
    size: int  # image side
    classes: int

    def shape(self, batch: int) -> str:
        return f"{batch}x3x{self.size}x{self.size}"


PAIRS = {
    "cifar100": Pair("resnet32x4", "resnet8x4", "cifar100", 32, 100),
    "imagenet": Pair("ResNet34", "ResNet18", "imagenet", 224, 1000),
}
FeatureLoss = Callable[[Features, Features, Tensor], Tensor]
"""(student features, teacher features, labels) -> the total loss of one batch, unfused."""
ExtrasLoss = Callable[[Features, Features, Tensor, nn.Module], Tensor]
"""A :data:`FeatureLoss` that also uses the method's trainable extras (last argument)."""
PeerLoss = Callable[[Tensor, Features, Tensor], Tensor]
"""(images, teacher features, labels) -> the total loss of one batch, unfused, student forward included."""
Peer = Callable[[KDModel, KDModel], tuple[PeerLoss, nn.Module]]
"""f(student, teacher) = (the peer's loss, the trainable extras it uses)."""


def _on_features(loss: FeatureLoss) -> Peer:
    """A method without trainable extras whose loss needs the student's ordinary features."""
    return lambda student, teacher: ((lambda x, t, y: loss(student.features(x), t, y)), nn.Module())


def _with_extras(loss: ExtrasLoss, extras: Callable[[KDModel, KDModel], nn.Module]) -> Peer:
    """A method on the student's ordinary features with trainable extras ``extras(student, teacher)``."""

    def peer(student: KDModel, teacher: KDModel) -> tuple[PeerLoss, nn.Module]:
        module = extras(student, teacher)
        return (lambda x, t, y: loss(student.features(x), t, y, module)), module

    return peer


def _lcc_loss(s: Features, t: Features, y: Tensor, attention: nn.Module) -> Tensor:
    """LCC's defaults: 0.1 CE + 0.9 KD (T=4) + 3 LCC (last stage, grid 4, mask of a class-aware attention)."""
    mask, attention_ce = attention(t.stages[-1], y)
    lcc = ref_lcc.local_correlation_loss(s.stages[-1], t.stages[-1], 4, mask=mask)
    return 0.1 * F.cross_entropy(s.logits, y) + 0.9 * ref_kd.kd_loss(s.logits, t.logits, 4.0) + 3.0 * lcc + attention_ce


def _afd_loss(s: Features, t: Features, y: Tensor, attention: nn.Module) -> Tensor:
    """AFD's public code (clovaai/attention-feature-distillation, main.py defaults): CE + 0.9 KD (T=4)
    + 200 * sum_t mean_b sum_s softmax_s(logit)[b,t,s] * mean_n (v_s - v_t)^2 over every block output,
    logit = (bilinear key . query + p_t . p_s) / sqrt(128), student values ``pool_t(mean_c f^2)``."""
    att = F.softmax(attention(s.blocks, t.blocks), dim=2)
    afd = ref_afd.map_distance_loss(s.blocks, t.blocks, att, "map")
    return F.cross_entropy(s.logits, y) + 0.9 * ref_kd.kd_loss(s.logits, t.logits, 4.0) + 200.0 * afd


def _afd_attention(student: KDModel, teacher: KDModel) -> nn.Module:
    """AFD's queries (teacher blocks), keys (student blocks), bilinear key layer and positions, qk_dim 128."""
    t_channels, s_channels = ([shape[0] for shape in feature_shapes(m, 32, "blocks")] for m in (teacher, student))
    return LayerAttention(t_channels, s_channels, qk_dim=128, bilinear=True)


def _lakd_peer(student: KDModel, teacher: KDModel) -> tuple[PeerLoss, nn.Module]:
    """LAKD's defaults past the warm-up (alpha_e = 0.9), one local module per stage after the stem,
    each on its predecessor's detached output: ``sum_l [MSE(c_l(fs_l), ft_l) + 0.1 * 1000 * NDAM_l]
    + 0.9 CE + KD (T=4)`` (NDAM grid 4, ``c_l`` a 1x1 conv + BN), one backward of the sum."""
    cuts = stage_boundaries(student)
    local = LocalModules(student, [teacher.stage_channels[b] for b in cuts], cuts)

    def loss(x: Tensor, t: Features, y: Tensor) -> Tensor:
        def module_losses(outputs: Sequence[ModuleOutput]) -> dict[str, Tensor]:
            terms = ref_ndam.block_attention_terms(
                [o.feature for o in outputs], [o.hint for o in outputs], [t.stages[b] for b in cuts], grid=4, power=1.0
            )
            logits = outputs[-1].output
            local_losses = weigh_blocks(terms, 1.0, 0.1 * 1000.0, "sum")
            return {"total": local_losses + 0.9 * F.cross_entropy(logits, y) + ref_kd.kd_loss(logits, t.logits, 4.0)}

        return local(x, module_losses, "joint")[1]["total"]

    return loss, local


def _reviewkd_peer(student: KDModel, teacher: KDModel) -> tuple[PeerLoss, nn.Module]:
    """mdistiller's ReviewKD past its warm-up, the HCL unfused (its hcl_loss, kdfast.reference.hcl):
    ``CE + 5 * HCL(ABF(student levels), teacher levels)`` (its resnet32x4 -> resnet8x4 weight), the
    ABFs built as the distiller builds them."""
    params = distillers.make_params("reviewkd", DISTILLER_PARAMS["reviewkd"])
    assert isinstance(params, ReviewKDParams)
    size = 224 if isinstance(teacher, (ImageNetResNet, MobileNetV1)) else 32
    abfs, sizes, out_sizes = build_fusion(student, teacher, size, params)

    def loss(x: Tensor, t: Features, y: Tensor) -> Tensor:
        s = student.features(x)
        fused = fuse_levels(abfs, level_maps(s, params.student_preact), sizes, out_sizes)
        hcl = ref_hcl.hcl_loss(fused, level_maps(t, params.teacher_preact), params.levels)
        return F.cross_entropy(s.logits, y) + params.reviewkd_weight * hcl

    return loss, abfs


E2E_TRAINING_SET = 50_000  # CRD's memory banks: a CIFAR-100-size training set


def training_labels(labels: Tensor, classes: int) -> Tensor:
    """The training set that a method with per-image state (CRD) is bound to: the synthetic images
    are its first rows, the rest of a CIFAR-100-size set (labels cycling over the classes) only
    gives the memory banks their size."""
    return torch.cat([labels, torch.arange(E2E_TRAINING_SET - len(labels)) % classes])


def peer_contrast_indices(labels: Tensor, count: int, negatives: int, seed: int = 0) -> Tensor:
    """(count, 1 + negatives) int64: the peers' dataset-side draw (RepDistiller's and mdistiller's
    ``CIFAR100InstanceSample``, mode "exact") for the first `count` images of the training set
    `labels`: the image's own row, then `negatives` images of other classes, numpy's choice without
    replacement (with, where a class has fewer other images)."""
    rng, values = np.random.RandomState(seed), labels.numpy()
    rows = []
    for i in range(count):
        others = np.flatnonzero(values != values[i])
        rows.append(np.concatenate([[i], rng.choice(others, negatives, replace=negatives > len(others))]))
    return torch.from_numpy(np.stack(rows)).long()


def _crd_peer(student: KDModel, teacher: KDModel) -> tuple[Callable[..., Tensor], nn.Module]:
    """RepDistiller's CRD (``CRDLoss`` + ``ContrastMemory``), eager: the (B, K+1, 128) bank rows
    gathered with ``index_select``, ``bmm``, exp / Z, the NCE terms (kdfast.reference.crd), Z set
    on the first batch, the momentum update of the batch's rows; ``CE + 0.8 (L_s + L_t)``. Its
    extras are a :class:`~kdfast.distillers.crd.Contrast` (the embedding heads, banks and Z; bound
    by the caller), whose own methods it does not use. Takes ``(x, t, y, index, contrast_index)``."""
    params = distillers.make_params("crd", DISTILLER_PARAMS.get("crd", {}))
    assert isinstance(params, CRDParams)
    contrast = Contrast(pooled_dim(student, 32), pooled_dim(teacher, 32), params.feat_dim)

    def normalize(v: Tensor) -> Tensor:  # the peers' Normalize
        return v.div(v.pow(2).sum(1, keepdim=True).pow(0.5))

    def loss(x: Tensor, t: Features, y: Tensor, index: Tensor, contrast_index: Tensor) -> Tensor:
        s = student.features(x)
        v_s, v_t = normalize(contrast.embed_s.linear(s.pooled)), normalize(contrast.embed_t.linear(t.pooled))
        temperature, n = params.nce_temperature, contrast.num_data
        if not contrast.z_set:
            for side, (v, bank) in enumerate(((v_s, contrast.memory_t), (v_t, contrast.memory_s))):
                expsum = ref_crd.partition_sums(v, bank, contrast_index, temperature)
                contrast.z[side] = (expsum.sum() / contrast_index.numel() * n).item()
            contrast.z_set = True
        loss_s = ref_crd.crd_loss(v_s, contrast.memory_t, contrast_index, contrast.z[0], temperature, n)
        loss_t = ref_crd.crd_loss(v_t, contrast.memory_s, contrast_index, contrast.z[1], temperature, n)
        with torch.no_grad():
            m = params.nce_momentum
            for bank, v in ((contrast.memory_s, v_s), (contrast.memory_t, v_t)):
                rows = torch.index_select(bank, 0, index).mul_(m).add_(torch.mul(v, 1 - m))
                bank.index_copy_(0, index, normalize(rows))
        return F.cross_entropy(s.logits, y) + params.feat_weight * (loss_s + loss_t)

    return loss, contrast


REFERENCE_METHODS: dict[str, Peer] = {
    "kd": _on_features(lambda s, t, y: 0.1 * F.cross_entropy(s.logits, y) + 0.9 * ref_kd.kd_loss(s.logits, t.logits, 4.0)),
    "at": _on_features(
        lambda s, t, y: F.cross_entropy(s.logits, y) + 1000 * ref_at.at_stage_losses(s.stages[1:], t.stages[1:]).sum()
    ),
    "dkd": _on_features(lambda s, t, y: F.cross_entropy(s.logits, y) + ref_dkd.dkd_loss(s.logits, t.logits, y, 1.0, 8.0, 4.0)),
    "sp": _on_features(lambda s, t, y: F.cross_entropy(s.logits, y) + 3000 * ref_sp.sp_loss(s.stages[-1], t.stages[-1])),
    "rkd": _on_features(lambda s, t, y: F.cross_entropy(s.logits, y) + ref_rkd.rkd_loss(s.pooled, t.pooled, 25.0, 50.0)),
    "lcc": _with_extras(_lcc_loss, lambda student, teacher: ClassAwareAttention(teacher.stage_channels[-1], _classes(teacher))),
    "lakd": _lakd_peer,
    "afd": _with_extras(_afd_loss, _afd_attention),
    "reviewkd": _reviewkd_peer,
    "crd": _crd_peer,  # its loss also takes the batch's indices
}
"""method -> its eager peer, f(student, teacher) = (loss, trainable extras)."""
if tuple(REFERENCE_METHODS) != METHODS:
    raise ImportError(f"kdfast.engine.e2e_methods.METHODS {METHODS} must list the peers {tuple(REFERENCE_METHODS)}")
DISTILLER_PARAMS: dict[str, dict[str, object]] = {
    "afd": {"bilinear": True, "kd_weight": 0.9},
    "reviewkd": {"reviewkd_weight": 5.0},
}
"""kdfast's side: parameters other than the distiller's defaults (AFD: what its public code trains;
ReviewKD: mdistiller's weight for resnet32x4 -> resnet8x4)."""
STEP_EPOCH = 10**6  # past every warm-up ramp (DKD): the full loss is timed


def _classes(model: nn.Module) -> int:
    """The number of classes of a zoo model (its last linear layer's outputs)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def synthetic_batches(pair: Pair, batch: int, batches: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`batches` batches of `batch` standard-normal images of the pair's size and random labels, seeded."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch * batches, 3, pair.size, pair.size, generator=gen)
    return images, torch.randint(0, pair.classes, (batch * batches,), generator=gen)


def _peer_models(pair: Pair, device: torch.device) -> tuple[KDModel, KDModel]:
    """The eager peer's teacher (frozen) and student, seeded, fp32 and contiguous as the peers' code builds them."""
    torch.manual_seed(0)
    t, s = (models.create(name, pair.classes, dataset=pair.dataset).to(device) for name in (pair.teacher, pair.student))
    t.eval().requires_grad_(False)
    return t, s


def step_config(pair: Pair, method: str, params: Mapping[str, object] | None = None, students: int = 1) -> Config:
    """kdfast's side as a training config, built by ``kdfast train``'s assembly: the pair's dataset
    (its model zoo and image size) and models, `method` with `params` (default: its
    :data:`DISTILLER_PARAMS`), SGD lr 0.05, momentum 0.9, weight decay 5e-4 (the peers'),
    channels_last and amp "auto"; `students` > 1: seeds 0 .. N-1, as ``kdfast train --seeds``."""
    cfg = Config(
        data=DataConfig(dataset=pair.dataset),
        model=ModelConfig(student=pair.student, teacher=pair.teacher),
        method=MethodConfig(method, dict(DISTILLER_PARAMS.get(method, {}) if params is None else params)),
        optim=OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    return with_seeds(cfg, range(students)) if students > 1 else cfg


def kdfast_step(
    cfg: Config, device: torch.device, data: tuple[Tensor, Tensor], batch: int, classes: int
) -> tuple[Callable[[], None], RunParts]:
    """One training step of every student of `cfg` (:func:`~kdfast.engine.assembly.build_run`) on
    one teacher forward, as ``kdfast train`` runs a batch: the next of the device-resident batches
    of `data` (in the config's memory format, cycling), the teacher's features
    (:func:`~kdfast.engine.trainer.teacher_features`), then each student's
    :func:`~kdfast.engine.trainer.distill_step` at epoch :data:`STEP_EPOCH`. A method with
    per-image state (CRD) is bound to :func:`training_labels`. Returns the step and the run."""
    run = build_run(cfg, device, classes, training_labels(data[1], classes).to(device))
    amp = run.students[0].cfg.train.amp
    images = data[0].to(device).contiguous(memory_format=memory_format(cfg))
    labels = data[1].to(device)
    indices = torch.arange(len(labels), device=device)
    batches = _cycle(list(zip(images.split(batch), labels.split(batch), indices.split(batch), strict=True)))

    def step() -> None:
        x, y, i = next(batches)
        feats = teacher_features(run.teacher, x, device, amp)
        for student in run.students:
            distiller = student.distiller
            extra = {"indices": i} if distiller.uses_sample_indices else {}
            distill_step(distiller, distiller, student.optimizer, (x, y), feats, STEP_EPOCH, device, amp, **extra)

    return step, run


def _kdfast_step(
    method: str, pair: Pair, device: torch.device, data: tuple[Tensor, Tensor], batch: int, students: int = 1
) -> Callable[[], None]:
    """kdfast's side of `method`: :func:`kdfast_step` of its :func:`step_config` with `students` students."""
    return kdfast_step(step_config(pair, method, students=students), device, data, batch, pair.classes)[0]


def _eager_step(method: str, pair: Pair, device: torch.device, data: tuple[Tensor, Tensor], batch: int) -> Callable[[], None]:
    t, s = _peer_models(pair, device)
    loss_fn, extras = REFERENCE_METHODS[method](s, t)
    extras.to(device)
    opt = torch.optim.SGD([*s.parameters(), *extras.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
    tensors: tuple[Tensor, ...] = data
    if distillers.get(method).uses_sample_indices:  # CRD: the peers' loader hands (index, contrast_index)
        labels = training_labels(data[1], pair.classes)
        params = distillers.make_params(method, DISTILLER_PARAMS.get(method, {}))
        assert isinstance(extras, Contrast) and isinstance(params, CRDParams)
        extras.bind(labels.to(device))
        negatives = params.nce_k
        tensors = (*data, torch.arange(len(data[1])), peer_contrast_indices(labels, len(data[1]), negatives))
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch, shuffle=True, drop_last=True)
    batches = _cycle(loader)

    def step() -> None:
        x, y, *indices = (v.to(device, non_blocking=True) for v in next(batches))
        with torch.no_grad():
            feats_t = t.features(x)
        loss = loss_fn(x, feats_t, y, *indices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _in_turn(steps: Sequence[Callable[[], None]]) -> Callable[[], None]:
    """One step of each of `steps`, one after another."""

    def step() -> None:
        for one in steps:
            one()

    return step


def _cycle(iterable) -> Iterator:
    while True:
        yield from iterable


def run_e2e(
    device: torch.device,
    methods: Sequence[str] = METHODS,
    batch: int = 64,
    iters: int = 20,
    warmup: int = 3,
    pair: str = "cifar100",
    teacher: str | None = None,
    student: str | None = None,
    out: Path | None = None,
    note: str = "",
) -> list[dict[str, str]]:
    """Measure every method both ways on the pair `pair` of PAIRS (`teacher`/`student`: other
    models of its zoo), print a table, merge each method's rows into the results CSV as soon as
    they are measured (a run cut short keeps them), with `note` in their note column; returns the rows."""
    p, data, env, amp_dtype = _setup(pair, teacher, student, batch, device)
    if p.size != 32 and "afd" in methods:
        raise ValueError("the AFD peer is built for 32 x 32 images: measure afd on the cifar100 pair")
    rows = []
    print(f"end-to-end distillation step, {p.teacher} -> {p.student}, batch {batch}, {device} ({env['device']})")
    print(f"{'method':<8} {'backend':<11} {'ms/step':>9} {'images/s':>9} {'speed-up':>9} {'peak MiB':>9}")
    for method in methods:
        base_ms = None
        for backend, build, dtype in (("eager-fp32", _eager_step, "float32"), ("kdfast", _kdfast_step, amp_dtype)):
            times, peak = measure_step(build(method, p, device, data, batch), device, warmup, iters)
            median = quantiles(times)[0]
            base_ms = base_ms or median
            mib = f"{peak / 2**20:.1f}"
            print(
                f"{method:<8} {backend:<11} {median:>9.2f} {batch * 1e3 / median:>9.1f} {base_ms / median:>8.2f}x {mib:>9}",
                flush=True,
            )
            rows.append(_row(f"e2e_{method}", backend, dtype, p.shape(batch), times, peak, device, note))
        path = _write(rows[-2:], device, out)
    print(f"rows written to {path}")
    return rows


def run_students_e2e(
    device: torch.device,
    methods: Sequence[str] = ("kd",),
    counts: Sequence[int] = (1, 2, 4),
    batch: int = 64,
    iters: int = 20,
    warmup: int = 3,
    pair: str = "cifar100",
    teacher: str | None = None,
    student: str | None = None,
    out: Path | None = None,
    note: str = "",
) -> list[dict[str, str]]:
    """Images/s per student of N students trained together on one teacher forward per batch
    ("kdfast-shared", as ``kdfast train --seeds``) against N separate runs (N kdfast steps, each
    with its own teacher forward), for each N of `counts`. One timed "step" is one batch for all N
    students, so per-student images/s = batch * 1000 / median_ms (op ``e2e_students_<method>``,
    backend ``kdfast-shared-N`` / ``kdfast-separate-N``). Rows merged into the results CSV."""
    p, data, env, amp_dtype = _setup(pair, teacher, student, batch, device)
    rows = []
    print(
        f"N students on one teacher forward vs N separate runs, {p.teacher} -> {p.student}, batch {batch}, {device} "
        f"({env['device']})"
    )
    print(f"{'method':<8} {'N':>2} {'backend':<11} {'ms/batch':>9} {'img/s/student':>14} {'speed-up':>9}")
    for method in methods:
        for n in counts:
            separate = [_kdfast_step(method, p, device, data, batch) for _ in range(n)]
            builds = (
                ("separate", _in_turn(separate)),
                ("shared", _kdfast_step(method, p, device, data, batch, students=n)),
            )
            base_ms = None
            for kind, step in builds:
                times, peak = measure_step(step, device, warmup, iters)
                median = quantiles(times)[0]
                base_ms = base_ms or median
                print(
                    f"{method:<8} {n:>2} {kind:<11} {median:>9.2f} {batch * 1e3 / median:>14.1f} {base_ms / median:>8.2f}x",
                    flush=True,
                )
                backend = f"kdfast-{kind}-{n}"
                rows.append(_row(f"e2e_students_{method}", backend, amp_dtype, p.shape(batch), times, peak, device, note))
            path = _write(rows[-2:], device, out)
    print(f"rows written to {path}")
    return rows


def _setup(
    name: str, teacher: str | None, student: str | None, batch: int, device: torch.device
) -> tuple[Pair, tuple[Tensor, Tensor], dict[str, str], str]:
    """The pair `name` of PAIRS (with other `teacher`/`student` models of its zoo), four synthetic
    batches, the environment columns and the autocast dtype of `device`."""
    if name not in PAIRS:
        raise ValueError(f"unknown pair {name!r}; valid: {', '.join(PAIRS)}")
    pair = dataclasses.replace(PAIRS[name], teacher=teacher or PAIRS[name].teacher, student=student or PAIRS[name].student)
    amp_dtype = "bfloat16" if device.type == "cuda" else "float32"
    return pair, synthetic_batches(pair, batch, 4), results.environment(device), amp_dtype


def _row(
    op: str, backend: str, dtype: str, shape: str, times: Sequence[float], peak: int, device: torch.device, note: str
) -> dict[str, str]:
    """A results row (``kdfast.engine.results.CSV_COLUMNS``) of one timed training step (pass
    ``train_step``, no GB/s)."""
    return results.measured_row(op, backend, "train_step", dtype, shape, quantiles(times), peak, device, note, gbps=None).as_csv()


def _write(rows: list[dict[str, str]], device: torch.device, out: Path | None) -> Path:
    """Merge `rows` into the results CSV (default: the device's, ``kdfast.engine.results``); returns its path."""
    path = out or results.default_results_path(device)
    results.merge_csv(path, rows)
    return path
