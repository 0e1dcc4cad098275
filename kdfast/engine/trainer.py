"""Teacher training and distillation: ``train(cfg)`` runs a :class:`Config` to the end.

One loop serves both: a teacher is a student trained with method ``vanilla``. What the config
determines (teacher, students' distillers, optimizers, schedules) is built by
:func:`~kdfast.engine.assembly.build_run`, as ``kdfast viz --config`` and the benchmarks build it;
each step is :func:`distill_step`, as the benchmarks step it. The frozen teacher runs in eval
mode under ``torch.inference_mode()``; the distiller (student + its connectors), wrapped in
DistributedDataParallel when several processes run, computes the named losses, which are summed
for backward. bf16 autocast, channels_last and torch.compile are switches of
``train``. Every epoch ends with an evaluation and an atomic, checksummed checkpoint
(``last.pt``, the one before it kept as ``prev.pt``, plus ``best.pt`` in mdistiller's
``{"model": state_dict}`` format); ``resume`` continues from ``last.pt`` exactly (model,
optimizer, scheduler, loader position, RNG states, metrics), falling back to ``prev.pt`` when
``last.pt`` is damaged, and refuses a checkpoint of another model, method or dataset.

SIGTERM and SIGINT (how clusters preempt jobs) make the run write a checkpoint at the next step
boundary, mid-epoch included, and return :class:`Interrupted`; a resume continues from that step.
Non-finite losses or gradients stop the run (or skip those updates) through
:class:`~kdfast.engine.guard.NonFiniteGuard`, without a host sync per step.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from kdfast import distillers, models
from kdfast.data import build_loaders
from kdfast.distillers.base import sum_losses
from kdfast.engine import checkpoint, distributed, report
from kdfast.engine.assembly import StudentParts, build_run
from kdfast.engine.config import Config, ConfigError, to_dict
from kdfast.engine.config import students as config_students
from kdfast.engine.distributed import Dist, all_reduce_sum, process_share
from kdfast.engine.guard import Diverged, NonFiniteGuard
from kdfast.engine.metrics import MetricsLogger, plot_curves
from kdfast.engine.report import Summary

__all__ = [
    "Diverged",
    "Interrupted",
    "Summary",
    "train",
    "train_students",
    "evaluate",
    "autocast",
    "distill_step",
    "teacher_features",
    "set_deterministic",
]

LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"
# Config keys a resumed checkpoint must share with the run (anything else may change, e.g. epochs).
_IDENTITY = (("model", "student"), ("model", "teacher"), ("method", "name"), ("data", "dataset"))
_SYNC_EVERY = 10  # steps between the host reads of the progress bar, the divergence guard and (DDP) signals


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run after writing a checkpoint; ``signum`` is the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms only (and no cuDNN autotuning) when `enabled`."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for amp "bf16" (and "auto" on GPU), else nothing."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def teacher_features(
    teacher: models.KDModel | None, images: Tensor, device: torch.device, amp: str, compiled: bool = False
) -> models.Features | None:
    """The frozen teacher's features of `images` under :func:`autocast` (None without a teacher),
    computed once per batch for every student. Under ``torch.inference_mode``, or ``no_grad`` for
    a compiled step (`compiled`): a compiled step cannot save inference tensors for its backward
    (the ops that re-read the teacher's features do), and compiled code cannot test for them."""
    if teacher is None:
        return None
    with autocast(device, amp), torch.no_grad() if compiled else torch.inference_mode():
        return teacher.features(images)


def distill_step(
    module: Callable[..., tuple[Tensor, dict[str, Tensor]]],
    distiller: distillers.Distiller,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor],
    teacher: models.Features | None,
    epoch: int,
    device: torch.device,
    amp: str,
    before_update: Callable[[Tensor], None] | None = None,
    **extra: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """One optimisation step of a distiller, the one the trainer, ``kdfast bench --e2e`` and
    ``benchmarks/bench_lakd.py`` run:
    zero the gradients, ``module(images, labels, teacher, epoch, **extra)`` under autocast
    (`module`: the distiller or its compiled form), backward of the summed losses unless the method
    ran its own, ``before_update(loss)`` (the divergence guard), the optimizer step, the method's
    ``after_step``. Returns (logits, losses, loss)."""
    images, labels = batch
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits, losses = module(images, labels, teacher, epoch, **extra)
    loss = sum_losses(losses.values())
    if not distiller.backward_done:
        loss.backward()
    if before_update is not None:
        before_update(loss)
    optimizer.step()
    distiller.after_step(epoch)
    return logits, losses, loss


def _batches(loader: Iterable, limit: int | None) -> Iterable:
    return itertools.islice(loader, limit) if limit is not None else loader


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "auto", max_batches: int | None = None) -> float:
    """Top-1 accuracy (%) of `model` on `loader`, counts summed over every process."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    loader.set_epoch(0)
    with autocast(device, amp):
        for images, labels in _batches(loader, max_batches):
            counts[0] += (model(images).argmax(1) == labels).sum()
            counts[1] += labels.numel()
    model.train(was_training)
    correct, total = all_reduce_sum(counts).tolist()
    return 100.0 * correct / max(total, 1.0)


def _identity_mismatches(saved: dict, cfg: Config) -> list[str]:
    current = to_dict(cfg)
    return [
        f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, config {current[section][key]!r}"
        for section, key in _IDENTITY
        if saved.get(section, {}).get(key) != current[section][key]
    ]


def load_resume_state(cfg: Config) -> dict:
    """The checkpoint a resume of `cfg` continues (``last.pt``, else ``prev.pt`` with a warning);
    ConfigError when neither is usable or the checkpoint belongs to another model/method/dataset."""
    out = Path(cfg.train.out_dir)
    try:
        state = checkpoint.load_latest(out / LAST, out / PREV)
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"cannot resume: {error}") from None
    mismatches = _identity_mismatches(state.get("config", {}), cfg)
    if mismatches:
        raise ConfigError(f"cannot resume from {out}: the checkpoint belongs to another run ({'; '.join(mismatches)})")
    return state


class _StopSignals:
    """Records SIGTERM/SIGINT instead of dying, while installed (main thread only)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _RngSlot:
    """One student's own random-number generators (python, numpy, torch CPU and CUDA), swapped in
    around its steps so that each student draws exactly as if it trained alone. A run of one
    student (`swap` False) leaves them global: nothing to copy per step."""

    def __init__(self, swap: bool, state: dict[str, Any]) -> None:
        self.swap = swap
        self._state: dict[str, Any] = state if swap else {}  # read only when swapping

    @property
    def state(self) -> dict:
        return self._state if self.swap else checkpoint.rng_state()

    @state.setter
    def state(self, value: dict) -> None:
        if self.swap:
            self._state = value
        else:
            checkpoint.set_rng_state(value)

    @contextlib.contextmanager
    def active(self):
        if not self.swap:
            yield
            return
        checkpoint.set_rng_state(self._state)
        try:
            yield
        finally:
            self._state = checkpoint.rng_state()


class _Student:
    """One student of a run: its distiller, optimizer, scheduler (:func:`build_run`'s parts), guard,
    random state, history and outputs (``cfg.train.out_dir``)."""

    def __init__(self, parts: StudentParts, dist: Dist, swap_rng: bool) -> None:
        self.label, self.name, self.cfg, self.dist = parts.label, parts.name, parts.cfg, dist
        cfg = parts.cfg
        self.out = Path(cfg.train.out_dir)
        self.distiller, self.optimizer, self.scheduler = parts.distiller, parts.optimizer, parts.scheduler
        if self.distiller.backward_done and (dist.enabled or cfg.train.compile):
            raise ConfigError(
                f"method {cfg.method.name!r} runs its backward inside forward (LAKD's mode 'local'), which "
                "DistributedDataParallel and torch.compile cannot run; use a mode with one backward "
                "(LAKD: --set method.mode=joint)"
            )
        self.skip = cfg.train.on_nonfinite == "skip"  # the fused step drops an update on the device (found_inf)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.guard = NonFiniteGuard(dist.device, cfg.train.on_nonfinite, cfg.train.max_nonfinite)
        self.rng = _RngSlot(swap_rng, parts.rng_state)
        self.history: list[dict[str, Any]]
        self.epoch, self.history, self.best = 0, [], (-1.0, 0)
        self.stopped: str | None = None  # why the student stopped before the run's end (diverged)
        self.partial: dict | None = None  # this student's sums of an epoch interrupted mid-way
        self.logger: MetricsLogger | None = None
        step_module: nn.Module = self.distiller
        if dist.enabled:  # batches are already on this process's device: no device_ids, no input scatter
            step_module = nn.parallel.DistributedDataParallel(step_module)
        self.step_module = torch.compile(step_module) if cfg.train.compile else step_module

    def restore(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.state = state["rng"]
        self.epoch, self.history, self.best = state["epoch"], state["history"], tuple(state["best"])
        self.partial = state.get("partial")
        self.guard.bad_steps.fill_(state.get("nonfinite_steps", 0))

    def save(self, loader_state: dict, improved: bool = False, partial: dict | None = None) -> None:
        """Checkpoints after `self.epoch` complete epochs (plus, with `partial`, the sums of the
        epoch in progress, whose loader position `loader_state` holds)."""
        student = self.distiller.student.state_dict()
        if improved:
            checkpoint.save_atomic({"model": student, "epoch": self.epoch, "best_acc": self.best[0]}, self.out / BEST)
        checkpoint.save_rotating(
            {
                "model": student,
                "distiller": self.distiller.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": None,
                "epoch": self.epoch,
                "loader": loader_state,
                "rng": self.rng.state,
                "history": self.history,
                "best": list(self.best),
                "config": to_dict(self.cfg),
                "partial": partial,
                "nonfinite_steps": int(self.guard.bad_steps),
            },
            self.out / LAST,
            self.out / PREV,
        )

    def new_epoch(self, device: torch.device) -> None:
        """Starts this student's sums of an epoch (or of the rest of one interrupted mid-way)."""
        partial, self.partial = self.partial or {"sums": {}, "correct": 0.0, "seen": 0}, None
        self.sums = {name: torch.tensor(value, dtype=torch.float64, device=device) for name, value in partial["sums"].items()}
        self.correct = torch.tensor(partial["correct"], dtype=torch.float64, device=device)
        self.seen = partial["seen"]
        self.distiller.train()
        self.guard.new_epoch()

    def step(
        self,
        images: Tensor,
        labels: Tensor,
        teacher: models.Features | None,
        epoch: int,
        step: int,
        indices: Tensor | None = None,
    ) -> Tensor:
        """One optimisation step on a batch of `epoch` (counted from 1), with this student's random
        state; returns the loss. `indices`: the batch's positions in the training set, passed on
        to a method that uses them (``uses_sample_indices``)."""
        extra = {"indices": indices} if self.distiller.uses_sample_indices else {}

        def guard(loss: Tensor) -> None:
            found_inf = self.guard.observe(loss, self.params, step)
            if self.skip:
                # read by the fused SGD step (getattr; not in torch's stubs): a bad step changes nothing
                self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]

        with self.rng.active():
            logits, losses, loss = distill_step(
                self.step_module,
                self.distiller,
                self.optimizer,
                (images, labels),
                teacher,
                epoch,
                self.dist.device,
                self.cfg.train.amp,
                guard,
                **extra,
            )
        for key, value in (("loss", loss), *((f"loss.{k}", v) for k, v in losses.items())):
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().double() * labels.numel()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += labels.numel()
        return loss

    def partial_state(self) -> dict:
        return {
            "sums": {key: value.item() for key, value in self.sums.items()},
            "correct": self.correct.item(),
            "seen": self.seen,
        }

    def epoch_stats(self, elapsed: float) -> dict[str, float]:
        """The epoch's mean losses and train top-1 over every process, and images/s."""
        device = self.dist.device
        totals = all_reduce_sum(
            torch.stack([*self.sums.values(), self.correct, torch.tensor(self.seen, dtype=torch.float64, device=device)])
        )
        n = totals[-1].item()
        stats = {key: value.item() / n for key, value in zip(self.sums, totals[:-2], strict=True)}
        stats.update({"train.top1": 100.0 * totals[-2].item() / n, "images_per_s": n / elapsed, "epoch_s": elapsed})
        return stats

    def summary(self, wall_s: float) -> Summary:
        device, rows = self.dist.device, self.history
        summary = Summary(
            best_top1=self.best[0],
            best_epoch=self.best[1],
            last_top1=rows[-1]["test.top1"] if rows else float("nan"),
            epochs=len(rows),
            wall_s=wall_s,
            images_per_s=float(np.mean([r["images_per_s"] for r in rows])) if rows else float("nan"),
            peak_gpu_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            out_dir=str(self.out),
            stopped=self.stopped,
        )
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
            if rows:
                plot_curves(rows, self.out / "curves.png", f"{self.cfg.method.name}: {self.cfg.model.student}")
        return summary


class _Run:
    """A training run: one data order and (optionally) one frozen teacher, shared by its students.

    Each batch the teacher's features are computed once, under ``torch.inference_mode``, and each
    student in turn takes its step on them (one student's activations alive at a time); a
    student's own RNG state is swapped in around its step, so it trains exactly as it would alone.
    """

    def __init__(self, cfg: Config, dist: Dist, resume: bool) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.train.out_dir)
        set_deterministic(cfg.train.deterministic)
        entries = config_students(cfg)
        train_cfg = entries[0][2].train  # what the students share: data, teacher, epochs, device, amp, ...
        data = cfg.data
        data_seed = train_cfg.seed if train_cfg.data_seed is None else train_cfg.data_seed
        self.loaders = build_loaders(
            data.dataset,
            data.root,
            process_share(data.batch_size, dist.world_size, "data.batch_size"),
            dist.device,
            eval_batch_size=data.eval_batch_size and process_share(data.eval_batch_size, dist.world_size, "data.eval_batch_size"),
            seed=data_seed,
            channels_last=train_cfg.channels_last,
            train_per_class=data.train_per_class,
            workers=data.workers,
            decode=data.decode,
        )
        indexed = any(distillers.get(c.method.name).uses_sample_indices for _, _, c in entries)
        self.loaders.train.yield_indices = indexed  # batches (images, labels, indices)
        parts = build_run(cfg, dist.device, self.loaders.num_classes, self.loaders.train.labels if indexed else None)
        self.teacher = parts.teacher
        self.students = [_Student(student, dist, len(parts.students) > 1) for student in parts.students]
        self.signals = _StopSignals()
        self.epoch = 0
        self.partial: dict | None = None  # the position of an epoch interrupted mid-way
        if resume:
            self._restore([_resume_state(student.cfg) for student in self.students])

    def _restore(self, states: list[dict | None]) -> None:
        """Each student from its checkpoint; the run continues from the furthest position, and a
        student that is behind it or has none (it stopped earlier: diverged) stays stopped."""
        position = [
            (-1, 0) if state is None else (state["epoch"], (state.get("partial") or {}).get("steps", 0)) for state in states
        ]
        lead = states[position.index(max(position))]
        if lead is None:
            raise ConfigError(f"cannot resume {self.out}: every student stopped (diverged) in an earlier session")
        self.loaders.train.load_state_dict(lead["loader"])
        self.epoch = lead["epoch"]
        partial = lead.get("partial")
        self.partial = None if partial is None else {"steps": partial["steps"], "elapsed": partial["elapsed"]}
        for student, state, where in zip(self.students, states, position, strict=True):
            if state is not None:
                student.restore(state)
            if where != max(position):
                student.stopped = _stopped_before(student.out) or f"stopped at epoch {where[0]} in an earlier session"

    @property
    def active(self) -> list[_Student]:
        return [student for student in self.students if student.stopped is None]

    def _stop_requested(self, step: int) -> int:
        """The signal to stop on at this step boundary (0: go on). Under DDP every process must
        stop at the same step: the flags are all-reduced every ``_SYNC_EVERY`` steps."""
        if not self.dist.enabled:
            return self.signals.signum
        if step % _SYNC_EVERY:
            return 0
        flag = torch.tensor(float(self.signals.signum), dtype=torch.float64, device=self.dist.device)
        return int(all_reduce_sum(flag).item() > 0) * (self.signals.signum or signal.SIGTERM)

    def _check_guards(self) -> None:
        """Reads each active student's divergence guard (one host sync each). A diverged student
        stops (its last good checkpoint kept) while the others go on; Diverged when none is left."""
        for student in self.active:
            try:
                student.guard.check(self.epoch)
            except Diverged as error:
                if len(self.students) == 1:
                    raise
                student.stopped = f"diverged: {error}"
                print(f"student {student.name} stopped, {error}", file=sys.stderr, flush=True)
                student.summary(0.0)
        if not self.active:
            raise Diverged("every student diverged (see the messages above)")

    def train_epoch(self) -> dict[str, dict[str, float]]:
        """One epoch of training (or the rest of one interrupted mid-way) of every active student;
        returns {student name: mean losses, train top-1 and images/s}. Raises Diverged or
        Interrupted (after checkpointing)."""
        cfg, device, loader = self.cfg, self.dist.device, self.loaders.train
        partial, self.partial = self.partial, None
        if partial is None:
            loader.set_epoch(self.epoch - 1)
            partial = {"steps": 0, "elapsed": 0.0}
        for student in self.active:
            student.new_epoch(device)
        done, limit = partial["steps"], cfg.train.max_train_batches
        total = min(len(loader), limit or len(loader))
        show_bar = cfg.train.progress and self.dist.is_main and sys.stderr.isatty()  # no bar in logs and files
        bar = tqdm(
            total=total,
            initial=done,
            desc=f"epoch {self.epoch}/{cfg.train.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not show_bar,
        )
        start = time.perf_counter() - partial["elapsed"]
        for step, (images, labels, *indices) in enumerate(_batches(loader, None if limit is None else limit - done), start=done):
            teacher = teacher_features(self.teacher, images, device, cfg.train.amp, cfg.train.compile)
            losses = [student.step(images, labels, teacher, self.epoch, step, *indices) for student in self.active]
            bar.update()
            if step % _SYNC_EVERY == 0:
                self._check_guards()
                if bar.n and show_bar:
                    first = self.active[0]
                    bar.set_postfix(
                        loss=f"{losses[0].item():.3f}",
                        acc=f"{100 * first.correct.item() / first.seen:.1f}",
                        img_s=f"{first.seen * self.dist.world_size / (time.perf_counter() - start):.0f}",
                    )
            signum = self._stop_requested(step)
            if signum:
                bar.close()
                self._interrupt(signum, step, {"steps": step + 1, "elapsed": time.perf_counter() - start})
        bar.close()
        self._check_guards()
        elapsed = time.perf_counter() - start
        return {student.name: student.epoch_stats(elapsed) for student in self.active}

    def _interrupt(self, signum: int, step: int, position: dict) -> None:
        """Checkpoints every active student's epoch in progress after `step`; raises Interrupted."""
        for student in self.active:  # student.epoch: epochs completed; "partial" holds the one in progress
            if self.dist.is_main:
                student.save(self.loaders.train.state_dict(), partial={**student.partial_state(), **position})
        name = signal.Signals(signum).name
        where = self.out / LAST if len(self.students) == 1 else self.out / f"*/{LAST}"
        raise Interrupted(
            signum, f"{name}: stopped after epoch {self.epoch} step {step}; checkpoint written to {where}; continue with --resume"
        )

    def fit(self) -> list[Summary]:
        for student in self.students:
            student.logger = MetricsLogger(student.out, self.dist.is_main, resume_epoch=student.epoch)
        try:
            with self.signals:
                return self._fit()
        finally:
            for student in self.students:
                if student.logger is not None:
                    student.logger.close()

    def _fit(self) -> list[Summary]:
        cfg, device = self.cfg, self.dist.device
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        while self.epoch < cfg.train.epochs and self.active:
            self.epoch += 1
            lrs = {student.name: student.optimizer.param_groups[0]["lr"] for student in self.active}
            stats = self.train_epoch()
            for student in self.active:
                student.epoch = self.epoch
                student.scheduler.step()
                row = {"epoch": self.epoch, "lr": lrs[student.name], **stats[student.name]}
                row["test.top1"] = evaluate(
                    student.distiller.student, self.loaders.test, device, cfg.train.amp, cfg.train.max_eval_batches
                )
                improved = row["test.top1"] > student.best[0]
                if improved:
                    student.best = (row["test.top1"], self.epoch)
                student.history.append(row)
                assert student.logger is not None  # made by fit()
                student.logger.log(row)
                if self.dist.is_main:
                    student.save(self.loaders.train.state_dict(), improved)
                    who = f" {student.name}" if len(self.students) > 1 else ""
                    print(
                        f"epoch {self.epoch}/{cfg.train.epochs}{who}: loss {row['loss']:.4f}, train top-1 "
                        f"{row['train.top1']:.2f}, test top-1 {row['test.top1']:.2f}, {row['images_per_s']:.0f} img/s",
                        flush=True,
                    )
        wall_s = time.perf_counter() - start
        return [student.summary(wall_s) for student in self.students]


def _stopped_before(out: Path) -> str | None:
    """Why the student writing to `out` stopped early in an earlier session (its summary.json), if it did."""
    try:
        return json.loads((out / "summary.json").read_text()).get("stopped")
    except (OSError, ValueError):
        return None


def _resume_state(cfg: Config) -> dict | None:
    """The checkpoint a student resumes from; None for one that diverged before its first checkpoint."""
    out = Path(cfg.train.out_dir)
    if not ((out / LAST).is_file() or (out / PREV).is_file()) and _stopped_before(out):
        return None
    return load_resume_state(cfg)


def _start(cfg: Config, resume: bool) -> _Run:
    if resume:  # before any set-up: fail fast when a student has nothing to resume from
        for _, _, student in config_students(cfg):
            out = Path(student.train.out_dir)
            if not ((out / LAST).is_file() or (out / PREV).is_file() or _stopped_before(out)):
                raise ConfigError(f"cannot resume: {out / LAST} not found")
    return _Run(cfg, distributed.setup(cfg.train.device), resume)


def train(cfg: Config, resume: bool = False) -> Summary:
    """Train by `cfg` (resume: continue ``<out_dir>/last.pt``); joins torchrun's process group if any.

    Under DDP every process reads ``last.pt`` on resume (a shared file system across nodes) and
    restores rank 0's saved RNG states; only rank 0 writes checkpoints and logs. A config with
    ``runs`` trains several students: see :func:`train_students`.
    """
    if cfg.runs:
        raise ConfigError("this config trains several students (runs:): use train_students")
    return _start(cfg, resume).fit()[0]


def train_students(cfg: Config, resume: bool = False) -> report.StudentsReport:
    """Train every student of `cfg` (its ``runs``, or its one student) on one teacher forward per
    batch and one data order; each writes its own run under ``<out_dir>/<name>/`` as if it had
    trained alone. Writes ``<out_dir>/summary.json`` and ``<out_dir>/curves.png`` (every student)
    and returns the report, whose table has mean and std over seeds per label.
    """
    run = _start(cfg, resume)
    summaries = run.fit()
    students = [
        report.StudentResult(s.label, s.name, s.cfg.train.seed, s.cfg.method.name, s.cfg.model.student, summary, s.history)
        for s, summary in zip(run.students, summaries, strict=True)
    ]
    result = report.StudentsReport(students, report.table(students))
    if run.dist.is_main:
        report.write(result, Path(cfg.train.out_dir))
    return result
