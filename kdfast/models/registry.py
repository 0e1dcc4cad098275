"""Models by name (the names of mdistiller's model dicts) and checkpoint loading from local files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

from kdfast.models.base import KDModel
from kdfast.models.mobilenet import MobileNetV1, mobile_half
from kdfast.models.resnet import (
    resnet8,
    resnet8x4,
    resnet14,
    resnet18,
    resnet20,
    resnet32,
    resnet32x4,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet110,
)
from kdfast.models.shufflenet import ShuffleV1, ShuffleV2
from kdfast.models.vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from kdfast.models.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = ["create", "names", "load_checkpoint"]

M = TypeVar("M", bound=nn.Module)

# CIFAR models (default 100 classes), then ImageNet models (default 1000 classes).
_MODELS: dict[str, Callable[..., KDModel]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    "ResNet18": resnet18,
    "ResNet34": resnet34,
    "ResNet50": resnet50,
    "MobileNetV1": MobileNetV1,
}


def names() -> list[str]:
    """Every model name :func:`create` accepts: the CIFAR zoo, then the ImageNet models."""
    return list(_MODELS)


def create(name: str, num_classes: int | None = None, *, weights: str | os.PathLike[str] | None = None) -> KDModel:
    """A model of the zoo by name, e.g. ``create("resnet32x4")`` or ``create("ResNet34", weights=path)``.

    ``num_classes`` defaults to 100 for the CIFAR models and 1000 for the ImageNet ones. ``weights``
    is a local checkpoint file, read by :func:`load_checkpoint` (nothing is ever downloaded).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_MODELS)}")
    factory = _MODELS[name]
    model = factory() if num_classes is None else factory(num_classes)
    if weights is not None:
        load_checkpoint(model, weights)
    return model


def _keys_message(label: str, keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{label} ({len(keys)}): {shown}"


def load_checkpoint(model: M, path: str | os.PathLike[str]) -> M:
    """Loads a local checkpoint into ``model`` with strict key matching; returns the model.

    Accepts mdistiller / RepDistiller checkpoints (``{"model": state_dict, ...}``) and bare state
    dicts (torchvision's files). Raises ValueError naming the missing and unexpected keys if the
    checkpoint does not match the model (``num_batches_tracked`` may be absent, as in old files).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        state_dict = checkpoint["model"]
    elif isinstance(checkpoint, Mapping) and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        top = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{path}: neither a state_dict nor a {{'model': state_dict}} checkpoint (found {top})")
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        problems = [_keys_message(label, keys) for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError(f"{path} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model
