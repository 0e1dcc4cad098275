"""Run outputs: JSON-lines metrics, TensorBoard scalars, the PNG of training curves, the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "loss_keys", "plot_curves"]


class MetricsLogger:
    """Writes one JSON line per epoch to ``metrics.jsonl`` and the same scalars to TensorBoard.

    Only the main process writes. The JSON file is appended, so a resumed run continues it; rows
    of epochs past the resume point (from an interrupted run) are dropped first.
    """

    def __init__(self, out_dir: Path, enabled: bool = True, resume_epoch: int = 0) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_jsonl(self.path) if row["epoch"] <= resume_epoch] if resume_epoch else []
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_epoch + 1)

    def log(self, row: dict[str, Any]) -> None:
        """One epoch's metrics: a dict with "epoch" and numeric values."""
        if self._writer is None:  # not enabled
            return
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(key.replace(".", "/"), value, row["epoch"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Every logged loss key of any row, sorted: "loss" (the total) and each "loss.<name>" a method
    returned (LAKD's per-module, AFT's per-stage losses, ...), also those that only some epochs log."""
    return sorted({key for row in rows for key in row if key == "loss" or key.startswith("loss.")})


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """PNG of every logged loss (:func:`loss_keys`; a log scale, gaps where an epoch lacks one) and
    of train/test top-1 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in loss_keys(rows):
        ax_loss.plot(epochs, [row.get(key, float("nan")) for row in rows], label=key, marker=".")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax_loss.legend(fontsize="small")
    for key in ("train.top1", "test.top1"):
        ax_acc.plot(epochs, [row[key] for row in rows], label=key)
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
