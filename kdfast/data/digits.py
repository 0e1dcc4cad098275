"""The default dataset: scikit-learn's bundled handwritten digits, made CIFAR-shaped.

``sklearn.datasets.load_digits`` ships 1797 8 x 8 grayscale images (values 0..16, 10 classes)
inside the package, so it needs no download. Each image is upscaled 4x to 32 x 32 by bilinear
interpolation (``torch.nn.functional.interpolate``, ``align_corners=False``, edges clamped),
scaled to 0..255, rounded to uint8 and repeated over 3 channels: a real, tiny dataset served
like CIFAR. The split is fixed: 1437 training and 360 test images, stratified by class with
``random_state=0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 10
TEST_SIZE = 360
# Per-channel mean and std (in [0, 1] units) of the 1437 training images after the upscaling.
MEAN = (0.3054, 0.3054, 0.3054)
STD = (0.3237, 0.3237, 0.3237)


def load_digits32(train: bool = True) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of the training (1437) or test (360) split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, test_idx = train_test_split(range(len(digits.target)), test_size=TEST_SIZE, stratify=digits.target, random_state=0)
    idx = torch.tensor(train_idx if train else test_idx)
    small = torch.from_numpy(digits.images).float()[idx, None]  # (N, 1, 8, 8), values 0..16
    large = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = (large * (255 / 16)).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target)[idx].long()
