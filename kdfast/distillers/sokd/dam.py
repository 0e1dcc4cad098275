"""SoKD's DAM: a CenterNet-like head shared by both networks and the area of mutual interest M.

A **reading** of ../shared/METHODS.md (SoKD). The head maps a (B, C, H, W) hint feature to five
maps at the same resolution, each squashed to [0, 1]::

    head(f) = [heat, size_w, size_h, off_x, off_y]
            = sigmoid(conv1x1(relu(conv3x3(f))))      (no BatchNorm: the head is shared)

``heat`` is the centre heatmap (its bias starts at -2.19, CenterNet's prior 0.1), ``size`` the
box width and height as fractions of the map's, ``off`` the sub-cell offset of the centre.
The mask comes from the heads' outputs on both networks, ``peaks_from`` choosing the maps the
peaks and boxes are read from: ``"mean"`` (default: the mean of the student's and the teacher's
outputs, the areas both attend to), ``"teacher"`` or ``"student"``. The top-k peaks of the
heatmap after a 3x3 max-pool NMS (``peaks = heat where maxpool3x3(heat) == heat``) are box
centres ``(x + off_x, y + off_y)`` in cell units (cell (y, x) spans [x, x+1) x [y, y+1)), of
size ``(size_w * W, size_h * H)``; M (B, H, W) is 1 on every cell that overlaps one of the k
boxes (the peak's own cell always does), else 0. M is computed without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DAMHead", "PEAK_SOURCES", "peak_boxes", "box_mask", "mutual_interest_mask"]

PEAK_SOURCES = ("mean", "teacher", "student")
HEAT_PRIOR_BIAS = -2.19  # CenterNet: sigmoid(-2.19) = 0.1


class DAMHead(nn.Module):
    """``sigmoid(conv1x1(relu(conv3x3(f))))``: (B, C, H, W) -> (B, 5, H, W) [heat, size w/h, offset x/y]."""

    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"DAM head width must be an integer >= 1, got {width!r}")
        self.trunk = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(width, 5, 1)
        with torch.no_grad():
            self.out.bias[0].fill_(HEAT_PRIOR_BIAS)

    def forward(self, f: Tensor) -> Tensor:
        return torch.sigmoid(self.out(self.trunk(f)))


@torch.no_grad()
def peak_boxes(out: Tensor, k: int) -> Tensor:
    """(B, k', 4) boxes ``(x0, y0, x1, y1)`` in cell units around the top-k' heatmap peaks of the
    head output `out` (B, 5, H, W), k' = min(k, H * W)."""
    b, _, h, w = out.shape
    heat = out[:, :1]
    peaks = torch.where(F.max_pool2d(heat, 3, stride=1, padding=1) == heat, heat, torch.zeros_like(heat))
    index = peaks.flatten(1).topk(min(k, h * w), dim=1).indices  # (B, k')
    at = lambda c: out[:, c].flatten(1).gather(1, index)  # noqa: E731  (B, k') values of channel c at the peaks
    cx = (index % w).to(out.dtype) + at(3)
    cy = torch.div(index, w, rounding_mode="floor").to(out.dtype) + at(4)
    half_w, half_h = at(1) * (w / 2), at(2) * (h / 2)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)


@torch.no_grad()
def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, H, W) float: 1 on every cell [x, x+1) x [y, y+1) that overlaps one of the (B, k, 4) boxes."""
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # (B, k, 1)
    in_y = (ys < y1) & (ys + 1 > y0)  # (B, k, H)
    in_x = (xs < x1) & (xs + 1 > x0)  # (B, k, W)
    return (in_y.unsqueeze(-1) & in_x.unsqueeze(-2)).any(1).to(boxes.dtype)


@torch.no_grad()
def mutual_interest_mask(out_s: Tensor, out_t: Tensor, k: int = 8, peaks_from: str = "mean") -> Tensor:
    """M (B, H, W) in {0, 1}, no gradient: the union of the boxes of the top-k peaks of the head
    outputs chosen by `peaks_from` (``"mean"`` of both networks', ``"teacher"`` or ``"student"``)."""
    out = {"mean": lambda: (out_s + out_t) / 2, "teacher": lambda: out_t, "student": lambda: out_s}[peaks_from]()
    out = out.float()
    return box_mask(peak_boxes(out, k), out.shape[2], out.shape[3])
