"""``kdfast quickstart``: a real distillation end to end on the embedded digits dataset.

Trains the teacher (``configs/digits/teacher.yaml``), distils the student with fused KD
(``configs/digits/kd.yaml``), trains the same student without a teacher
(``configs/digits/student.yaml``), evaluates all three on the test split and prints a table.
"""

from __future__ import annotations

import time
from pathlib import Path

from kdfast.engine.config import load_config
from kdfast.engine.trainer import train

__all__ = ["run"]


def run(out_dir: str | Path = "runs/quickstart", epochs: int | None = None, progress: bool = True) -> dict[str, float]:
    """Run the three trainings; returns {run name: best test top-1}. `epochs` overrides every config's."""
    out = Path(out_dir)
    common = [f"train.progress={str(progress).lower()}"] + ([f"train.epochs={epochs}"] if epochs else [])
    start = time.perf_counter()
    results, rows = {}, []
    teacher_ckpt = out / "teacher" / "best.pt"
    for name, run_dir, config, extra in (
        ("teacher", "teacher", "digits/teacher", []),
        ("student (no teacher)", "student", "digits/student", []),
        ("student + KD (fused)", "kd", "digits/kd", [f"model.teacher_checkpoint={teacher_ckpt}"]),
    ):
        overrides = [*common, f"train.out_dir={out / run_dir}", *extra]
        cfg = load_config(config, overrides)
        print(f"== {name}: {cfg.model.student}, method {cfg.method.name}, {cfg.train.epochs} epochs", flush=True)
        summary = train(cfg)
        results[name] = summary.best_top1
        rows.append((name, cfg.model.student, cfg.method.name, summary.best_top1, summary.last_top1, summary.wall_s))
    print(f"\n{'run':<22} {'model':<10} {'method':<8} {'best top-1':>10} {'last top-1':>10} {'time s':>7}")
    for name, model, method, best, last, wall in rows:
        print(f"{name:<22} {model:<10} {method:<8} {best:>10.2f} {last:>10.2f} {wall:>7.1f}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; runs, metrics and curves under {out}/")
    return results
