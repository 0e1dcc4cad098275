"""The model zoo: the CIFAR models of the published KD tables and ImageNet ResNet/MobileNetV1.

Definitions reproduce mdistiller / RepDistiller (CIFAR) and torchvision (ImageNet ResNet) with their
parameter names, so their checkpoints load with ``strict=True``. Every model is a :class:`KDModel`::

    model = kdfast.models.create("resnet32x4", weights="ckpt_epoch_240.pth")  # local file only
    logits = model(x)                       # plain forward
    f = model.features(x)                   # Features: logits, stages, preact_stages, blocks, pooled
    model.stage_channels                    # channels of f.stages
    stem, *stages, head = model.stage_modules()   # views that reproduce the forward in sequence
"""

from kdfast.models.base import Features, KDModel, Recorder, Segment
from kdfast.models.registry import create, load_checkpoint, names

__all__ = ["Features", "KDModel", "Recorder", "Segment", "create", "load_checkpoint", "names"]
