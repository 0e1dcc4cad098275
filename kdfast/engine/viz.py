"""What a method transfers, drawn for a few test images: ``Distiller.inspect`` maps as a PNG grid."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from kdfast.distillers import Distiller
from kdfast.models import KDModel

__all__ = ["draw_maps", "inspect_grid"]

ANNOTATE_CELLS = 36  # maps of at most this many cells (block maps, small matrices) get their values written in


def draw_maps(images: Tensor, labels: Tensor, maps: Mapping[str, Tensor], out: Path) -> Path:
    """Write a PNG grid, one row per image of `images` (N, 3, H, W) with its label: the image
    (stretched to [0, 1]), then one panel per named map, titled with its name. Every map is
    (N, h, w): a spatial map (an attention map, a mask) or a matrix such as AFD's (N, T, S)
    attention weights (rows t, columns s); each is drawn cell by cell in its own colour scale,
    with tick labels and its values written in when it has at most ``ANNOTATE_CELLS`` cells.
    Returns `out`."""
    count = len(images)
    for name, m in maps.items():
        if m.ndim != 3 or m.shape[0] != count:
            raise ValueError(f"map {name!r} must have shape (N, h, w) with N = {count} images, got {tuple(m.shape)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + len(maps)
    fig, axes = plt.subplots(count, columns, figsize=(2 * columns, 2 * count), squeeze=False)
    shown = images.detach().float().cpu()
    low, high = shown.amin((1, 2, 3), keepdim=True), shown.amax((1, 2, 3), keepdim=True)
    shown = (shown - low) / (high - low).clamp_min(1e-12)  # each image stretched to [0, 1] for display
    panels = {name: m.detach().float().cpu() for name, m in maps.items()}
    for i in range(count):
        axes[i, 0].imshow(shown[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_title(f"label {labels[i].item()}", fontsize=8)
        axes[i, 0].axis("off")
        for ax, (name, m) in zip(axes[i, 1:], panels.items()):
            _draw_panel(ax, m[i], name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _draw_panel(ax, m: Tensor, name: str) -> None:
    """One (h, w) map on `ax`: cells in "inferno", values and ticks when it is small."""
    ax.imshow(m.numpy(), cmap="inferno", interpolation="nearest")
    ax.set_title(name, fontsize=8)
    rows, cols = m.shape
    if rows * cols > ANNOTATE_CELLS:
        ax.axis("off")
        return
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=6, length=0)
    middle = (m.max() + m.min()).item() / 2
    for r in range(rows):
        for c in range(cols):
            value = m[r, c].item()
            ax.text(c, r, f"{value:.2g}", ha="center", va="center", fontsize=5, color="black" if value > middle else "white")


@torch.inference_mode()
def inspect_grid(distiller: Distiller, teacher: KDModel | None, images: Tensor, labels: Tensor, out: Path) -> Path:
    """Run the frozen `teacher` (or none) and ``distiller.inspect`` on a batch in eval mode, and
    draw the maps with :func:`draw_maps`. With a plain :class:`Distiller` around the student these
    are the teacher's and the student's attention maps of every stage after the stem."""
    distiller.eval()
    features = teacher.eval().features(images) if teacher is not None else None
    return draw_maps(images, labels, distiller.inspect(images, labels, features), out)
