"""SoKD's DAM: a CenterNet head shared by both networks and the area of mutual interest M.

As ../shared/METHODS.md (SoKD) describes the code of the first author's DFKD distiller. The head
maps a (B, C, H, W) feature to ``K + 4`` maps at the same resolution, three branches each
``conv1x1(relu(conv3x3(f)))``::

    head(f) = cat[sigmoid(heat(f)), wh(f), offset(f)]     (K heatmap channels, one per class; 2; 2)

``L_D = MSE(head(phi(fs)), head(s(ft)))``. The regions come from the **student's** output
(:func:`mutual_interest_mask`): 3x3 max-pool peak suppression of the heatmap
(``peak = heat where maxpool3x3(heat) == heat``, else 0), the top ``k`` peaks over all classes
and positions, and at a peak in cell (y, x)::

    centre = (x + off_x, y + off_y),  box = [centre - |wh| / 2, centre + |wh| / 2]   (cell units)

(``|wh|``: the head's size branch is unbounded, and a negative size, which an untrained head
gives, spans its magnitude rather than nothing.)

M (B, H, W) is the **sum** of the k box masks, a box covering the cells (y, x) with
``x0 <= x <= x1`` and ``y0 <= y <= y1``, so a cell in two boxes counts 2. It is built with
broadcast comparisons on the device (no host sync) and carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DAMHead", "box_mask", "mutual_interest_mask", "peak_boxes"]

HEAT_PRIOR_BIAS = -2.19  # CenterNet: sigmoid(-2.19) = 0.1


def _branch(channels: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, out, 1))


class DAMHead(nn.Module):
    """(B, C, H, W) -> (B, K + 4, H, W): ``[sigmoid(heat), wh, offset]`` (module docstring)."""

    def __init__(self, channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"DAM head width must be an integer >= 1, got {width!r}")
        self.heat = _branch(channels, width, num_classes)
        self.wh = _branch(channels, width, 2)
        self.offset = _branch(channels, width, 2)
        with torch.no_grad():
            self.heat[-1].bias.fill_(HEAT_PRIOR_BIAS)

    def forward(self, f: Tensor) -> Tensor:
        return torch.cat([torch.sigmoid(self.heat(f)), self.wh(f), self.offset(f)], 1)


@torch.no_grad()
def peak_boxes(out: Tensor, k: int) -> Tensor:
    """(B, k', 4) boxes ``(x0, y0, x1, y1)`` in cell units around the top-k' peaks (over classes
    and positions) of the head output `out` (B, K + 4, H, W), k' = min(k, K H W)."""
    b, c, h, w = out.shape
    heat = out[:, : c - 4]
    peaks = torch.where(F.max_pool2d(heat, 3, stride=1, padding=1) == heat, heat, torch.zeros_like(heat))
    position = peaks.flatten(1).topk(min(k, peaks[0].numel()), dim=1).indices % (h * w)  # (B, k')
    wh_w, wh_h, off_x, off_y = (out[:, c - 4 + i].flatten(1).gather(1, position) for i in range(4))
    wh_w, wh_h = wh_w.abs(), wh_h.abs()  # an untrained head's negative size spans its magnitude
    cx = (position % w).to(out.dtype) + off_x
    cy = torch.div(position, w, rounding_mode="floor").to(out.dtype) + off_y
    return torch.stack([cx - wh_w / 2, cy - wh_h / 2, cx + wh_w / 2, cy + wh_h / 2], -1)


@torch.no_grad()
def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, H, W): how many of the (B, k, 4) boxes contain each cell (y, x) (``x0 <= x <= x1``, ``y0 <= y <= y1``)."""
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # (B, k, 1)
    in_y = (ys >= y0) & (ys <= y1)  # (B, k, H)
    in_x = (xs >= x0) & (xs <= x1)  # (B, k, W)
    return (in_y.unsqueeze(-1) & in_x.unsqueeze(-2)).to(boxes.dtype).sum(1)


@torch.no_grad()
def mutual_interest_mask(out_s: Tensor, k: int = 8) -> Tensor:
    """M (B, H, W), no gradient: the sum of the boxes of the top-k peaks of the student's head output."""
    out = out_s.float()
    return box_mask(peak_boxes(out, k), out.shape[2], out.shape[3])
