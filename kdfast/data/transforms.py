"""Batch transforms run on the device: normalization of uint8 images and the CIFAR crop + flip.

Both are whole-batch tensor ops (no per-image Python loop) and run on CPU tensors as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class Normalize:
    """uint8 (B, C, H, W) images in [0, 255] -> ``(x / 255 - mean) / std`` as float, on one device.

    Computed as ``x * scale + bias`` in float32 (scale = 1 / (255 std), bias = -mean / std), then
    cast to `dtype` (e.g. ``torch.bfloat16``); ``channels_last`` returns NHWC-strided tensors.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}")
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.scale = (1 / (255 * std_t)).float().to(device)
        self.bias = (-mean_t / std_t).float().to(device)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != self.scale.shape[1]:
            raise ValueError(f"expected uint8 (B, {self.scale.shape[1]}, H, W) images, got {images.dtype} {tuple(images.shape)}")
        x = images.to(torch.float32, memory_format=self.memory_format)
        return x.mul_(self.scale).add_(self.bias).to(self.dtype)


def pad_crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Zero-pad each image by `padding` pixels, cut the H x W window whose corner is at
    (top[i], left[i]) of the padded image, and mirror it left-right where flip[i] is set.

    With top/left uniform in [0, 2 * padding] and flip a fair coin this is torchvision's
    ``RandomCrop(H, padding=padding)`` (zero fill) followed by ``RandomHorizontalFlip()``, for
    the whole batch in one gather. images: (B, C, H, W) of any dtype; top, left: (B,) integers;
    flip: (B,) bool, all on the images' device.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    arange_h = torch.arange(h, device=images.device)
    arange_w = torch.arange(w, device=images.device)
    rows = top[:, None] + arange_h  # (B, H)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - arange_w, arange_w)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
