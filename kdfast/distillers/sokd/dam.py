"""SoKD's DAM: a CenterNet-style head shared by both networks and the area of mutual interest M.

As ../shared/METHODS.md (SoKD) describes the code of the first author's DFKD distiller; the
details below that METHODS.md leaves open (the branch ends, the init, the box rounding) are read
from that code's area-detection module (``AreaDetection`` and ``extract_regions`` of its
``area_utils``). The head maps a (B, C, H, W) feature to ``K + 4`` maps at the same resolution,
three branches each ``conv3x3 -> ReLU -> conv1x1``, and in the code **each branch ends with a
ReLU** (``final_relu``, default True)::

    head(f) = cat[sigmoid(relu(heat(f))), relu(wh(f)), relu(offset(f))]   (K heatmap channels, one per class; 2; 2)

so the heatmap lies in [0.5, 1) and sizes and offsets are >= 0. The convolutions keep PyTorch's
default init (no CenterNet heatmap prior). ``final_relu: false`` drops the three ReLUs (plain
CenterNet ends; then a negative size spans its magnitude, see below): an option, not the code.

``L_D = MSE(head(phi(fs)), head(s(ft)))``. The regions come from the **student's** output
(:func:`mutual_interest_mask`): 3x3 max-pool peak suppression of the heatmap
(``peak = heat where maxpool3x3(heat) == heat``, else 0), the top ``k`` peaks over all classes
and positions (``topk`` of the flattened (K, H, W) map), and at a peak in cell (y, x)::

    cx = x + off_x,  cy = y + off_y
    x0 = trunc(max(cx - w/2, 0)),  x1 = trunc(min(cx + w/2, W - 1))      (likewise y0, y1 with h, H)

``w, h`` are the size branch's values (their magnitudes where ``final_relu`` is off), and trunc
rounds toward zero like the code's ``.int()``. The box covers the cells ``x0 <= x <= x1``,
``y0 <= y <= y1`` (the code's ``mask[y0:y1+1, x0:x1+1] = 1``). M (B, H, W) is the **sum** of the
k box masks, so a cell in two boxes counts 2. It is built with broadcast comparisons on the device
(no host sync, no Python loop over boxes) and carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.distillers.base import check_int

__all__ = ["DAMHead", "box_mask", "mutual_interest_mask", "peak_boxes", "widen"]


def widen(t: Tensor) -> Tensor:
    """`t` in float32, or float64 if it is float64 (SoKD's losses and M are computed in at least float32)."""
    return t if t.dtype == torch.float64 else t.float()


def _branch(channels: int, width: int, out: int, final_relu: bool) -> nn.Sequential:
    layers = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, out, 1)]
    return nn.Sequential(*layers, nn.ReLU()) if final_relu else nn.Sequential(*layers)


class DAMHead(nn.Module):
    """(B, C, H, W) -> (B, K + 4, H, W): ``[sigmoid(heat), wh, offset]`` (module docstring)."""

    def __init__(self, channels: int, num_classes: int, width: int = 64, final_relu: bool = True) -> None:
        super().__init__()
        check_int("DAM head width", width)
        self.final_relu = bool(final_relu)
        self.heat = _branch(channels, width, num_classes, self.final_relu)
        self.wh = _branch(channels, width, 2, self.final_relu)
        self.offset = _branch(channels, width, 2, self.final_relu)

    def forward(self, f: Tensor) -> Tensor:
        return torch.cat([torch.sigmoid(self.heat(f)), self.wh(f), self.offset(f)], 1)


@torch.no_grad()
def peak_boxes(out: Tensor, k: int) -> Tensor:
    """(B, k', 4) boxes ``(x0, y0, x1, y1)``, whole cell indices (module docstring), around the
    top-k' peaks (over classes and positions) of the head output `out` (B, K + 4, H, W),
    k' = min(k, K H W)."""
    b, c, h, w = out.shape
    heat = out[:, : c - 4]
    peaks = torch.where(F.max_pool2d(heat, 3, stride=1, padding=1) == heat, heat, torch.zeros_like(heat))
    position = peaks.flatten(1).topk(min(k, peaks[0].numel()), dim=1).indices % (h * w)  # (B, k')
    wh_w, wh_h, off_x, off_y = (out[:, c - 4 + i].flatten(1).gather(1, position) for i in range(4))
    wh_w, wh_h = wh_w.abs(), wh_h.abs()  # >= 0 already under the code's final ReLU
    cx = (position % w).to(out.dtype) + off_x
    cy = torch.div(position, w, rounding_mode="floor").to(out.dtype) + off_y
    x0, y0 = (cx - wh_w / 2).clamp(min=0).trunc(), (cy - wh_h / 2).clamp(min=0).trunc()
    x1, y1 = (cx + wh_w / 2).clamp(max=w - 1).trunc(), (cy + wh_h / 2).clamp(max=h - 1).trunc()
    return torch.stack([x0, y0, x1, y1], -1)


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
    out = widen(out_s)
    return box_mask(peak_boxes(out, k), out.shape[2], out.shape[3])
