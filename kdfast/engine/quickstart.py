"""``kdfast quickstart``: what distillation buys, measured on the embedded digits dataset.

1. The teacher: resnet14 on all 1437 training images (``configs/digits/teacher.yaml``).
2. The students, in one multi-student run on that teacher (``configs/digits/students.yaml``):
   resnet8 without a teacher, with fused KD and with fused AT, three seeds each, each trained on
   the same 30 images per class (300 of the 1437; ``data.train_per_class``). On the full training
   set a resnet8 alone already reaches the teacher's test accuracy (about 99%, where one of the 360
   test images is 0.28 points), so no method could show a difference there; with few labelled
   images per class the teacher's soft labels carry information the labels do not.
3. The table: the teacher's test top-1, then per method the mean ± sample std over the seeds of
   the best and the last test top-1, whatever comes out.
"""

from __future__ import annotations

import time
from pathlib import Path

from kdfast.engine.config import load_config
from kdfast.engine.report import StudentsReport, format_table
from kdfast.engine.trainer import train, train_students

__all__ = ["run"]


def run(out_dir: str | Path = "runs/quickstart", epochs: int | None = None, progress: bool = True) -> StudentsReport:
    """Train the teacher, then the students; print and return the students' report. `epochs`
    overrides both configs' (a smoke test)."""
    out = Path(out_dir)
    common = [f"train.progress={str(progress).lower()}"] + ([f"train.epochs={epochs}"] if epochs else [])
    start = time.perf_counter()
    teacher_cfg = load_config("digits/teacher", [*common, f"train.out_dir={out / 'teacher'}"])
    print(f"== teacher: {teacher_cfg.model.student} on all training images, {teacher_cfg.train.epochs} epochs", flush=True)
    teacher = train(teacher_cfg)
    cfg = load_config(
        "digits/students",
        [*common, f"train.out_dir={out / 'students'}", f"model.teacher_checkpoint={out / 'teacher' / 'best.pt'}"],
    )
    per_class = cfg.data.train_per_class
    print(
        f"\n== students: {cfg.model.student}, {len(cfg.runs)} runs on one teacher forward per batch, "
        f"{per_class} training images per class, {cfg.train.epochs} epochs",
        flush=True,
    )
    report = train_students(cfg)
    print(
        f"\nteacher {teacher_cfg.model.student} (all training images): best test top-1 {teacher.best_top1:.2f}, "
        f"last {teacher.last_top1:.2f}"
    )
    print(
        f"students {cfg.model.student} ({per_class} training images per class), test top-1 on 360 images "
        f"(one image = 0.28), mean ± sample std over seeds:"
    )
    print(format_table(report.rows))
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s; runs, metrics and curves under {out}/ "
        f"(every student's curve in {out / 'students' / 'curves.png'})"
    )
    return report
