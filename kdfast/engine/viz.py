"""Teacher vs student attention maps of a few test images, as a PNG grid."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kdfast import functional
from kdfast.models import KDModel

__all__ = ["attention_grid"]


@torch.inference_mode()
def attention_grid(teacher: KDModel, student: KDModel, x: Tensor, y: Tensor, out: Path) -> Path:
    """Write a PNG grid, one row per image of the batch `x` (labels `y`): the image, then the
    teacher's and the student's attention map (``kdfast.functional.attention_map``, p=2, mean
    over channels) of every stage after the stem. Returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = {"teacher": teacher.eval(), "student": student.eval()}
    maps = {name: [functional.attention_map(f).reshape(f.shape[0], *f.shape[2:]).float().cpu()
                   for f in net.features(x).stages[1:]] for name, net in nets.items()}
    stages = len(maps["teacher"])
    fig, axes = plt.subplots(len(x), 1 + 2 * stages, figsize=(2 * (1 + 2 * stages), 2 * len(x)), squeeze=False)
    shown = x.float().cpu()
    low, high = shown.amin((1, 2, 3), keepdim=True), shown.amax((1, 2, 3), keepdim=True)
    shown = (shown - low) / (high - low).clamp_min(1e-12)  # each image stretched to [0, 1] for display
    for i in range(len(x)):
        axes[i, 0].imshow(shown[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_title(f"label {y[i].item()}", fontsize=8)
        for s in range(stages):
            for j, name in enumerate(nets):
                ax = axes[i, 1 + 2 * s + j]
                ax.imshow(maps[name][s][i].numpy(), cmap="inferno")
                ax.set_title(f"{name} stage {s + 1}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
