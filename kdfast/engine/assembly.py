"""Run assembly: what a training config determines before the first step, built in one place.

:func:`build_run` turns a :class:`~kdfast.engine.config.Config` into its frozen teacher and, for
each of its students (:func:`~kdfast.engine.config.students`: one, or one per entry of ``runs``),
the distiller, the SGD optimizer and the MultiStepLR schedule. ``kdfast train`` (the trainer),
``kdfast viz --config``, ``kdfast bench --e2e`` (its kdfast side) and ``benchmarks/bench_lakd.py``
all build through it, so that what they run is what the config says.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdfast import distillers, models
from kdfast.engine import checkpoint
from kdfast.engine.config import Config
from kdfast.engine.config import students as config_students

__all__ = [
    "RunParts",
    "StudentParts",
    "build_distiller",
    "build_run",
    "frozen_teacher",
    "image_size",
    "memory_format",
    "seed_everything",
]


@dataclass
class StudentParts:
    """One student as its single-run config builds it: the distiller (on the run's device, in the
    config's memory format), its SGD optimizer and schedule, and the random state it starts
    training from (python, numpy, torch; :func:`kdfast.engine.checkpoint.rng_state`, read right
    after it was built from ``seed_everything(cfg.train.seed)``)."""

    label: str  # the report's row (config.students)
    name: str  # "" for a config without runs, else "<label>-s<seed>"
    cfg: Config  # this student's single-run config
    distiller: distillers.Distiller
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    rng_state: dict[str, Any]


@dataclass
class RunParts:
    """A config's frozen teacher (None when no student's method needs one) and its students."""

    teacher: models.KDModel | None
    students: list[StudentParts]


def image_size(dataset: str) -> int:
    """Training resolution of a dataset."""
    return 224 if dataset == "imagenet" else 32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def memory_format(cfg: Config) -> torch.memory_format:
    """channels_last when ``train.channels_last``, else contiguous."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def frozen_teacher(
    cfg: Config, num_classes: int, device: torch.device, memory_format: torch.memory_format
) -> models.KDModel | None:
    """The config's teacher with its checkpoint, in eval mode without gradients; None when the method needs none."""
    if cfg.model.teacher is None or not distillers.get(cfg.method.name).needs_teacher:
        return None
    teacher = models.create(cfg.model.teacher, num_classes, weights=cfg.model.teacher_checkpoint, dataset=cfg.data.dataset)
    teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)  # type: ignore[call-overload]  # torch's Module.to overloads omit (device, memory_format=)
    return teacher


def build_distiller(cfg: Config, num_classes: int, teacher: models.KDModel | None) -> distillers.Distiller:
    """The student of `cfg` (from its dataset's model zoo, freshly initialised) inside its method's
    distiller; `teacher` is passed on only to a method that needs one."""
    student = models.create(cfg.model.student, num_classes, dataset=cfg.data.dataset)
    needs_teacher = distillers.get(cfg.method.name).needs_teacher
    return distillers.create(
        cfg.method.name, student, teacher if needs_teacher else None, cfg.method.params, image_size(cfg.data.dataset)
    )


def build_run(cfg: Config, device: torch.device, num_classes: int, train_labels: Tensor | None = None) -> RunParts:
    """The teacher and students of `cfg` on `device`, in the memory format of ``train.channels_last``.

    The teacher is the one of the first student whose method needs one (students share it),
    initialised from that student's ``train.seed`` before its checkpoint, if any, loads. Each
    student in turn: ``seed_everything(cfg.train.seed)``, its distiller (:func:`build_distiller`),
    moved to `device`; for a method that ``uses_sample_indices`` (CRD) the training set's labels
    `train_labels` bound (None: left unbound, e.g. to load a saved state); then
    ``SGD(distiller.sgd_parameters(), lr, momentum, weight_decay, nesterov)`` of ``cfg.optim``
    (the fused kernel where ``train.on_nonfinite`` is "skip": it drops a bad update on the
    device) and ``MultiStepLR(milestones, gamma)``."""
    entries = config_students(cfg)
    layout = memory_format(entries[0][2])  # the students share train.*
    teacher_cfg = next((c for _, _, c in entries if distillers.get(c.method.name).needs_teacher), None)
    teacher = None
    if teacher_cfg is not None:
        seed_everything(teacher_cfg.train.seed)
        teacher = frozen_teacher(teacher_cfg, num_classes, device, layout)
    students = [_build_student(label, name, c, device, num_classes, teacher, layout, train_labels) for label, name, c in entries]
    return RunParts(teacher, students)


def _build_student(
    label: str,
    name: str,
    cfg: Config,
    device: torch.device,
    num_classes: int,
    teacher: models.KDModel | None,
    layout: torch.memory_format,
    train_labels: Tensor | None,
) -> StudentParts:
    seed_everything(cfg.train.seed)
    distiller = build_distiller(cfg, num_classes, teacher)
    distiller.to(device, memory_format=layout)  # type: ignore[call-overload]  # torch's Module.to overloads omit (device, memory_format=)
    if distiller.uses_sample_indices and train_labels is not None:  # per-image state (CRD's memory banks)
        distiller.bind_training_set(train_labels)
    opt = cfg.optim
    optimizer = torch.optim.SGD(
        distiller.sgd_parameters(),
        lr=opt.lr,
        momentum=opt.momentum,
        weight_decay=opt.weight_decay,
        nesterov=opt.nesterov,
        fused=cfg.train.on_nonfinite == "skip" or None,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, opt.milestones, opt.gamma)
    return StudentParts(label, name, cfg, distiller, optimizer, scheduler, checkpoint.rng_state())
