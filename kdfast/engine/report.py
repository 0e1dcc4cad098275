"""What runs report: one student's :class:`Summary`, and the table of a multi-student run.

A multi-student run (``runs:`` in a config, or ``kdfast train --seeds``) ends with one row per
label (the seeds of one method): the number of students, the mean and the sample standard
deviation (n - 1) over its seeds of the best and of the last test top-1. It is printed,
written as ``summary.json`` and drawn, every student a line, in ``curves.png``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Summary", "StudentResult", "Row", "StudentsReport", "table", "format_table", "write", "plot_students"]


@dataclass
class Summary:
    """What a run (one student) reports at its end (also written to its ``summary.json``)."""

    best_top1: float
    best_epoch: int
    last_top1: float
    epochs: int
    wall_s: float
    images_per_s: float
    peak_gpu_mem_bytes: int | None
    out_dir: str
    stopped: str | None = None  # why a student of a multi-student run stopped early (diverged)


@dataclass
class StudentResult:
    """One student of a multi-student run: its label (table row), name, seed, method, model, summary and history."""

    label: str
    name: str
    seed: int
    method: str
    model: str
    summary: Summary
    history: list[dict[str, Any]]


@dataclass
class Row:
    """One label's students: mean and sample std (None for one student) of best and last top-1."""

    label: str
    method: str
    model: str
    seeds: list[int]
    best_mean: float
    best_std: float | None
    last_mean: float
    last_std: float | None
    stopped: int  # students of this label that diverged (left out of the statistics)


@dataclass
class StudentsReport:
    students: list[StudentResult]
    rows: list[Row]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    if not values:
        return float("nan"), None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def table(students: list[StudentResult]) -> list[Row]:
    """One :class:`Row` per label, in the order labels first appear; diverged students are counted
    in ``stopped`` and left out of the means."""
    rows = []
    for label in dict.fromkeys(s.label for s in students):
        group = [s for s in students if s.label == label]
        done = [s for s in group if s.summary.stopped is None]
        best = _mean_std([s.summary.best_top1 for s in done])
        last = _mean_std([s.summary.last_top1 for s in done])
        rows.append(Row(label, group[0].method, group[0].model, [s.seed for s in group], *best, *last, len(group) - len(done)))
    return rows


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:6.2f} ± {std:4.2f}" if std is not None else f"{mean:6.2f}       "


def format_table(rows: list[Row]) -> str:
    """The rows as a text table: label, method, model, n, best and last top-1 as mean ± std."""
    lines = [f"{'label':<14} {'method':<8} {'model':<10} {'n':>2} {'best top-1':>14} {'last top-1':>14}"]
    for row in rows:
        stopped = f"  ({row.stopped} diverged)" if row.stopped else ""
        lines.append(
            f"{row.label:<14} {row.method:<8} {row.model:<10} {len(row.seeds) - row.stopped:>2} "
            f"{_cell(row.best_mean, row.best_std):>14} {_cell(row.last_mean, row.last_std):>14}{stopped}"
        )
    return "\n".join(lines)


def write(report: StudentsReport, out_dir: Path) -> None:
    """``summary.json`` (rows and students, without histories) and ``curves.png`` under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    students = [{key: value for key, value in asdict(s).items() if key != "history"} for s in report.students]
    (out_dir / "summary.json").write_text(
        json.dumps({"rows": [asdict(r) for r in report.rows], "students": students}, indent=2) + "\n"
    )
    plot_students(report.students, out_dir / "curves.png")


def plot_students(students: list[StudentResult], path: Path) -> None:
    """PNG of every student's training loss and test top-1 per epoch (a colour per label, a line
    style per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(s.label for s in students))}
    styles = ("-", "--", ":", "-.")
    for s in students:
        epochs = [row["epoch"] for row in s.history]
        style = dict(
            color=colours[s.label], linestyle=styles[[t.name for t in students if t.label == s.label].index(s.name) % len(styles)]
        )
        ax_loss.plot(epochs, [row["loss"] for row in s.history], label=s.name, **style)
        ax_acc.plot(epochs, [row["test.top1"] for row in s.history], label=s.name, **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)")
    ax_acc.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
