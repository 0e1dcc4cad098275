"""Teacher training and distillation: ``train(cfg)`` runs a :class:`Config` to the end.

One loop serves both: a teacher is a student trained with method ``vanilla``. The frozen teacher
runs in eval mode under ``torch.inference_mode()``; the distiller (student + its connectors),
wrapped in DistributedDataParallel when several processes run, computes the named losses, which
are summed for backward. bf16 autocast, channels_last and torch.compile are switches of
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
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from kdfast import distillers, models
from kdfast.data import build_loaders
from kdfast.engine import checkpoint, distributed
from kdfast.engine.config import Config, ConfigError, to_dict
from kdfast.engine.distributed import Dist, all_reduce_sum
from kdfast.engine.guard import Diverged, NonFiniteGuard
from kdfast.engine.metrics import MetricsLogger, plot_curves

__all__ = ["Diverged", "Interrupted", "Summary", "train", "evaluate", "frozen_teacher", "image_size", "autocast",
           "seed_everything", "set_deterministic"]

LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"
# Config keys a resumed checkpoint must share with the run (anything else may change, e.g. epochs).
_IDENTITY = (("model", "student"), ("model", "teacher"), ("method", "name"), ("data", "dataset"))
_SYNC_EVERY = 10  # steps between the host reads of the progress bar, the divergence guard and (DDP) signals


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run after writing a checkpoint; ``signum`` is the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class Summary:
    """What a run reports at its end (also written to ``summary.json``)."""

    best_top1: float
    best_epoch: int
    last_top1: float
    epochs: int
    wall_s: float
    images_per_s: float
    peak_gpu_mem_bytes: int | None
    out_dir: str


def image_size(dataset: str) -> int:
    """Training resolution of a dataset."""
    return 224 if dataset == "imagenet" else 32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def frozen_teacher(cfg: Config, num_classes: int, device: torch.device, memory_format: torch.memory_format) -> models.KDModel | None:
    """The config's teacher with its checkpoint, in eval mode without gradients; None when the method needs none."""
    if cfg.model.teacher is None or not distillers.get(cfg.method.name).needs_teacher:
        return None
    teacher = models.create(cfg.model.teacher, num_classes, weights=cfg.model.teacher_checkpoint)
    teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    return teacher


def _identity_mismatches(saved: dict, cfg: Config) -> list[str]:
    current = to_dict(cfg)
    return [f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, config {current[section][key]!r}"
            for section, key in _IDENTITY if saved.get(section, {}).get(key) != current[section][key]]


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
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Run:
    """The state of one training run (built from a config, optionally restored from ``last.pt``)."""

    def __init__(self, cfg: Config, dist: Dist, resume: bool) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.train.out_dir)
        set_deterministic(cfg.train.deterministic)
        seed_everything(cfg.train.seed)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        data = cfg.data
        self.loaders = build_loaders(data.dataset, data.root, data.batch_size, dist.device,
                                     eval_batch_size=data.eval_batch_size, seed=cfg.train.seed,
                                     channels_last=cfg.train.channels_last)
        size = image_size(data.dataset)
        self.teacher = frozen_teacher(cfg, self.loaders.num_classes, dist.device, memory_format)
        student = models.create(cfg.model.student, self.loaders.num_classes)
        self.distiller = distillers.create(cfg.method.name, student, self.teacher, cfg.method.params, size)
        self.distiller.to(dist.device, memory_format=memory_format)
        if self.distiller.backward_done and (dist.enabled or cfg.train.compile):
            raise ConfigError(f"method {cfg.method.name!r} runs its backward inside forward (LAKD's mode 'local'), which "
                              "DistributedDataParallel and torch.compile cannot run; use a mode with one backward "
                              "(LAKD: --set method.mode=joint)")
        opt = cfg.optim
        skip = cfg.train.on_nonfinite == "skip"  # the fused step drops an update on the device (found_inf)
        self.optimizer = torch.optim.SGD(self.distiller.sgd_parameters(), lr=opt.lr, momentum=opt.momentum,
                                         weight_decay=opt.weight_decay, nesterov=opt.nesterov, fused=skip or None)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, opt.milestones, opt.gamma)
        self.guard = NonFiniteGuard(dist.device, cfg.train.on_nonfinite, cfg.train.max_nonfinite)
        self.signals = _StopSignals()
        self.epoch, self.history, self.best = 0, [], (-1.0, 0)
        self.partial: dict | None = None  # the sums of an epoch interrupted mid-way
        if resume:
            self._restore(load_resume_state(cfg))
        step_module: nn.Module = self.distiller
        if dist.enabled:  # batches are already on this process's device: no device_ids, no input scatter
            step_module = nn.parallel.DistributedDataParallel(step_module)
        self.step_module = torch.compile(step_module) if cfg.train.compile else step_module

    def _restore(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loaders.train.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], tuple(state["best"])
        self.partial = state.get("partial")
        self.guard.bad_steps.fill_(state.get("nonfinite_steps", 0))

    def _save(self, improved: bool = False, partial: dict | None = None) -> None:
        """Checkpoints after `self.epoch` complete epochs (plus, with `partial`, the sums of the
        epoch in progress, whose loader position the loader state holds)."""
        student = self.distiller.student.state_dict()
        if improved:
            checkpoint.save_atomic({"model": student, "epoch": self.epoch, "best_acc": self.best[0]}, self.out / BEST)
        checkpoint.save_rotating({
            "model": student, "distiller": self.distiller.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": None, "epoch": self.epoch,
            "loader": self.loaders.train.state_dict(), "rng": checkpoint.rng_state(), "history": self.history,
            "best": list(self.best), "config": to_dict(self.cfg), "partial": partial,
            "nonfinite_steps": int(self.guard.bad_steps),
        }, self.out / LAST, self.out / PREV)

    def _stop_requested(self, step: int) -> int:
        """The signal to stop on at this step boundary (0: go on). Under DDP every process must
        stop at the same step: the flags are all-reduced every ``_SYNC_EVERY`` steps."""
        if not self.dist.enabled:
            return self.signals.signum
        if step % _SYNC_EVERY:
            return 0
        flag = torch.tensor(float(self.signals.signum), dtype=torch.float64, device=self.dist.device)
        return int(all_reduce_sum(flag).item() > 0) * (self.signals.signum or signal.SIGTERM)

    def _teacher_features(self, images: Tensor) -> models.Features | None:
        if self.teacher is None:
            return None
        # A compiled step cannot save inference tensors for its backward (the ops that re-read the
        # teacher's features do), and compiled code cannot test for them: no_grad there instead.
        with torch.no_grad() if self.cfg.train.compile else torch.inference_mode():
            return self.teacher.features(images)

    def train_epoch(self) -> dict[str, float]:
        """One epoch of training (or the rest of one interrupted mid-way); returns the mean losses,
        train top-1 and images/s. Raises Diverged or Interrupted (after checkpointing)."""
        cfg, device, loader = self.cfg, self.dist.device, self.loaders.train
        partial, self.partial = self.partial, None
        if partial is None:
            loader.set_epoch(self.epoch - 1)
            partial = {"sums": {}, "correct": 0.0, "seen": 0, "steps": 0, "elapsed": 0.0}
        self.distiller.train()
        self.guard.new_epoch()
        sums = {name: torch.tensor(value, dtype=torch.float64, device=device) for name, value in partial["sums"].items()}
        correct = torch.tensor(partial["correct"], dtype=torch.float64, device=device)
        seen, done = partial["seen"], partial["steps"]
        limit = cfg.train.max_train_batches
        total = min(len(loader), limit or len(loader))
        show_bar = cfg.train.progress and self.dist.is_main and sys.stderr.isatty()  # no bar in logs and files
        bar = tqdm(total=total, initial=done, desc=f"epoch {self.epoch}/{cfg.train.epochs}", leave=False,
                   dynamic_ncols=True, disable=not show_bar)
        start = time.perf_counter() - partial["elapsed"]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for step, (images, labels) in enumerate(_batches(loader, None if limit is None else limit - done), start=done):
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(device, cfg.train.amp):
                teacher = self._teacher_features(images)
                logits, losses = self.step_module(images, labels, teacher, self.epoch)
            loss = sum(losses.values())
            if not self.distiller.backward_done:
                loss.backward()
            found_inf = self.guard.observe(loss, params, step)
            if cfg.train.on_nonfinite == "skip":
                self.optimizer.found_inf = found_inf  # read by the fused SGD step: a bad step changes nothing
            self.optimizer.step()
            self.distiller.after_step(self.epoch)
            for name, value in (("loss", loss), *((f"loss.{k}", v) for k, v in losses.items())):
                sums[name] = sums.get(name, 0.0) + value.detach().double() * labels.numel()
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.numel()
            bar.update()
            if step % _SYNC_EVERY == 0:
                self.guard.check(self.epoch)
                if bar.n and show_bar:
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                                    img_s=f"{seen * self.dist.world_size / (time.perf_counter() - start):.0f}")
            signum = self._stop_requested(step)
            if signum:
                bar.close()
                self._interrupt(signum, step, {
                    "sums": {name: value.item() for name, value in sums.items()}, "correct": correct.item(),
                    "seen": seen, "steps": step + 1, "elapsed": time.perf_counter() - start})
        bar.close()
        self.guard.check(self.epoch)
        totals = all_reduce_sum(torch.stack([*sums.values(), correct, torch.tensor(seen, dtype=torch.float64, device=device)]))
        elapsed = time.perf_counter() - start
        n = totals[-1].item()
        stats = {name: value.item() / n for name, value in zip(sums, totals)}
        stats.update({"train.top1": 100.0 * totals[-2].item() / n, "images_per_s": n / elapsed, "epoch_s": elapsed})
        return stats

    def _interrupt(self, signum: int, step: int, partial: dict) -> None:
        """Checkpoints the epoch in progress after `step` and raises Interrupted."""
        self.epoch -= 1  # epochs completed; the checkpoint's "partial" holds the one in progress
        if self.dist.is_main:
            self._save(partial=partial)
        name = signal.Signals(signum).name
        raise Interrupted(signum, f"{name}: stopped after epoch {self.epoch + 1} step {step}; checkpoint written to "
                                  f"{self.out / LAST}; continue with --resume")

    def fit(self) -> Summary:
        logger = MetricsLogger(self.out, self.dist.is_main, resume_epoch=self.epoch)
        try:
            with self.signals:
                return self._fit(logger)
        finally:
            logger.close()

    def _fit(self, logger: MetricsLogger) -> Summary:
        cfg = self.cfg
        start = time.perf_counter()
        if self.dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dist.device)
        while self.epoch < cfg.train.epochs:
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": self.epoch, "lr": lr, **self.train_epoch()}
            self.scheduler.step()
            row["test.top1"] = evaluate(self.distiller.student, self.loaders.test, self.dist.device, cfg.train.amp,
                                        cfg.train.max_eval_batches)
            improved = row["test.top1"] > self.best[0]
            if improved:
                self.best = (row["test.top1"], self.epoch)
            self.history.append(row)
            logger.log(row)
            if self.dist.is_main:
                self._save(improved)
                print(f"epoch {self.epoch}/{cfg.train.epochs}: loss {row['loss']:.4f}, train top-1 {row['train.top1']:.2f}, "
                      f"test top-1 {row['test.top1']:.2f}, {row['images_per_s']:.0f} img/s", flush=True)
        return self._summary(time.perf_counter() - start)

    def _summary(self, wall_s: float) -> Summary:
        device = self.dist.device
        rows = self.history
        summary = Summary(
            best_top1=self.best[0], best_epoch=self.best[1], last_top1=rows[-1]["test.top1"], epochs=len(rows),
            wall_s=wall_s, images_per_s=float(np.mean([r["images_per_s"] for r in rows])),
            peak_gpu_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            out_dir=str(self.out))
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
            plot_curves(rows, self.out / "curves.png", f"{self.cfg.method.name}: {self.cfg.model.student}")
        return summary


def train(cfg: Config, resume: bool = False) -> Summary:
    """Train by `cfg` (resume: continue ``<out_dir>/last.pt``); joins torchrun's process group if any.

    Under DDP every process reads ``last.pt`` on resume (a shared file system across nodes) and
    restores rank 0's saved RNG states; only rank 0 writes checkpoints and logs.
    """
    out = Path(cfg.train.out_dir)
    if resume and not ((out / LAST).is_file() or (out / PREV).is_file()):
        raise ConfigError(f"cannot resume: {out / LAST} not found")
    dist = distributed.setup(cfg.train.device)
    return _Run(cfg, dist, resume).fit()
