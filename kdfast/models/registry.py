"""Models by name, per dataset (the names of the peers' separate CIFAR and ImageNet model dicts),
and checkpoint loading from local files.

The CIFAR zoo (``digits``, ``cifar10``, ``cifar100``) and the ImageNet zoo share two names: CIFAR's
"ResNet18"/"ResNet50" are mdistiller / RepDistiller's ``resnetv2`` models (3x3 stem, no max-pool),
ImageNet's are torchvision's. ``create(name, dataset=...)`` picks the dataset's zoo; without a
dataset, the names resolve as before datasets were known: the CIFAR zoo plus the ImageNet models,
which take the shared names.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable, Mapping
from typing import TypeVar

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
from kdfast.models.resnetv2 import cifar_resnet18, cifar_resnet50
from kdfast.models.shufflenet import ShuffleV1, ShuffleV2
from kdfast.models.vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from kdfast.models.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = ["create", "names", "load_checkpoint", "zoo_of"]

M = TypeVar("M", bound=nn.Module)

Factory = Callable[..., KDModel]

# CIFAR models (default 100 classes), as the peers' cifar_model_dict.
_CIFAR: dict[str, Factory] = {
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
    "ResNet18": cifar_resnet18,
    "ResNet50": cifar_resnet50,
}

# ImageNet models (default 1000 classes), as the peers' imagenet_model_dict.
_IMAGENET: dict[str, Factory] = {
    "ResNet18": resnet18,
    "ResNet34": resnet34,
    "ResNet50": resnet50,
    "MobileNetV1": MobileNetV1,
}

_ZOOS: dict[str, dict[str, Factory]] = {"cifar": _CIFAR, "imagenet": _IMAGENET}
# kdfast.data.DATASETS -> its zoo (digits are resized to 32x32: the CIFAR models).
_DATASET_ZOO = {"digits": "cifar", "cifar10": "cifar", "cifar100": "cifar", "imagenet": "imagenet"}
# dataset=None: the CIFAR-only models, then the ImageNet ones (which keep the shared names)
_ANY = {**{name: f for name, f in _CIFAR.items() if name not in _IMAGENET}, **_IMAGENET}


def zoo_of(dataset: str) -> str:
    """``"cifar"`` or ``"imagenet"``: the zoo whose models a dataset takes; ValueError for an unknown dataset."""
    if dataset not in _DATASET_ZOO:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(_DATASET_ZOO)}")
    return _DATASET_ZOO[dataset]


def _models(dataset: str | None) -> dict[str, Factory]:
    return _ANY if dataset is None else _ZOOS[zoo_of(dataset)]


def names(dataset: str | None = None) -> list[str]:
    """Every model name :func:`create` accepts for `dataset` (None: the CIFAR zoo, then the ImageNet models)."""
    return list(_models(dataset))


def create(
    name: str, num_classes: int | None = None, *, weights: str | os.PathLike[str] | None = None, dataset: str | None = None
) -> KDModel:
    """A model of the zoo by name, e.g. ``create("resnet32x4")``, ``create("ResNet50", dataset="cifar100")``
    (the peers' CIFAR ResNet50) or ``create("ResNet34", weights=path)``.

    ``dataset`` (one of ``kdfast.data.DATASETS``) chooses the zoo: ImageNet for ``"imagenet"``, CIFAR
    otherwise; a name of the other zoo only raises a ValueError saying so. Without it the CIFAR zoo
    and the ImageNet models are one namespace in which "ResNet18"/"ResNet50" are the ImageNet ones.
    ``num_classes`` defaults to 100 for the CIFAR models and 1000 for the ImageNet ones. ``weights``
    is a local checkpoint file, read by :func:`load_checkpoint` (nothing is ever downloaded).
    """
    known = _models(dataset)
    if name not in known:
        if dataset is not None and name in _ANY:  # (without a dataset, known is _ANY)
            other = "ImageNet" if zoo_of(dataset) == "cifar" else "CIFAR"
            raise ValueError(
                f"model {name!r} is a{'n' if other == 'ImageNet' else ''} {other} model, not one for dataset "
                f"{dataset!r}; its models: {', '.join(known)}"
            )
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(known)}")
    factory = known[name]
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
    dicts (torchvision's files). The file is read with ``torch.load(weights_only=True)``, which also
    accepts the ``argparse.Namespace`` that RepDistiller's ``*_last.pth`` and ``*_best.pth`` pickle
    under ``"opt"``; a file pickling any other Python object raises a ValueError naming the file and
    the way out (re-save its state_dict from a trusted copy). Raises ValueError naming the missing
    and unexpected keys if the checkpoint does not match the model (``num_batches_tracked`` may be
    absent, as in old files).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message: the line naming the refused global (else its last line)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[-1] if lines else type(error).__name__)
        reason = reason.removeprefix("WeightsUnpickler error: ").split(". Please use")[0]
        resave = f"torch.save({{'model': torch.load({str(path)!r}, weights_only=False)['model']}}, 'weights.pth')"
        raise ValueError(
            f"{path}: the checkpoint pickles Python objects besides tensors, which kdfast does not unpickle "
            f"({reason}). If you trust the file, re-save its weights and load that file: {resave}"
        ) from None
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
