"""Every shipped config builds its distiller and takes one training step on CPU.

Random teacher weights, a synthetic batch of 2 at the dataset's training resolution, one SGD step
as the engine takes it (zero_grad, forward, backward unless the distiller ran it, step, after_step).
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from kdfast import distillers, models
from kdfast.distillers.dkd import DKDParams
from kdfast.engine import load_config
from kdfast.engine.assembly import build_distiller, image_size
from kdfast.engine.config import CONFIG_DIR, Config, ConfigError, students

pytestmark = pytest.mark.usefixtures("one_thread")  # batches of 2: threads only add overhead

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

# The CIFAR-100 pairs of the public tables (mdistiller / RepDistiller), teacher_student.
SAME_ARCH = [
    "resnet56_resnet20",
    "resnet110_resnet20",
    "resnet110_resnet32",
    "resnet32x4_resnet8x4",
    "wrn_40_2_wrn_16_2",
    "wrn_40_2_wrn_40_1",
    "vgg13_vgg8",
]
CROSS_ARCH = [
    "vgg13_MobileNetV2",
    "ResNet50_MobileNetV2",
    "ResNet50_vgg8",
    "resnet32x4_ShuffleV1",
    "resnet32x4_ShuffleV2",
    "wrn_40_2_ShuffleV1",
]
METHODS = ["kd", "at", "fitnet", "sp", "rkd", "dkd", "lcc", "lakd", "aft", "afd", "rtk", "reviewkd", "crd"]
# mdistiller's configs/cifar100/dkd/*.yaml (DKD.BETA, else its default 8.0; 8.0 also where it ships no config)
DKD_BETA = {
    "resnet56_resnet20": 2.0,
    "resnet110_resnet32": 2.0,
    "resnet32x4_resnet8x4": 8.0,
    "wrn_40_2_wrn_16_2": 6.0,
    "wrn_40_2_wrn_40_1": 6.0,
    "vgg13_vgg8": 6.0,
    "vgg13_MobileNetV2": 6.0,
    "ResNet50_MobileNetV2": 8.0,
    "resnet32x4_ShuffleV1": 8.0,
    "resnet32x4_ShuffleV2": 8.0,
    "wrn_40_2_ShuffleV1": 8.0,
    "resnet110_resnet20": 8.0,
    "ResNet50_vgg8": 8.0,
}


def shipped() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml") if p.name != "base.yaml")


def test_every_public_pair_is_shipped_with_every_method_and_teacher():
    names = set(shipped())
    for pair in SAME_ARCH + CROSS_ARCH:
        for method in METHODS:
            assert f"cifar100/{method}/{pair}.yaml" in names
    teachers = {pair.rsplit("_", 1)[0] if not pair.startswith("wrn") else "wrn_40_2" for pair in SAME_ARCH + CROSS_ARCH}
    assert teachers == {"resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50"}
    assert {f"cifar100/teacher/{t}.yaml" for t in teachers} <= names


@pytest.mark.parametrize("pair", SAME_ARCH + CROSS_ARCH)
def test_recipe_lr_and_dkd_beta_of_each_pair(pair):
    for method in METHODS:
        cfg = load_config(f"cifar100/{method}/{pair}", check_files=False)
        assert cfg.optim.lr == (0.01 if cfg.model.student in LOW_LR_STUDENTS else 0.05), (method, cfg.optim.lr)
        assert f"{cfg.model.teacher}_{cfg.model.student}" == pair
    params = distillers.make_params("dkd", load_config(f"cifar100/dkd/{pair}", check_files=False).method.params)
    assert isinstance(params, DKDParams) and params.beta == DKD_BETA[pair]


def one_step(cfg: Config) -> dict[str, float]:
    """Builds a random teacher and the config's distiller as training does, takes one SGD step; returns the losses."""
    dataset, size = cfg.data.dataset, image_size(cfg.data.dataset)
    classes = NUM_CLASSES[dataset]
    torch.manual_seed(0)
    method = distillers.get(cfg.method.name)
    teacher = None
    if method.needs_teacher:
        assert cfg.model.teacher is not None
        teacher = models.create(cfg.model.teacher, classes, dataset=dataset).eval().requires_grad_(False)
    distiller = build_distiller(cfg, classes, teacher)
    params = distiller.sgd_parameters()
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    images, labels = torch.randn(2, 3, size, size), torch.tensor([0, classes - 1])
    with torch.inference_mode():
        feats = teacher.features(images) if teacher is not None else None
    before = [p.detach().clone() for p in params]
    extra = {}
    if distiller.uses_sample_indices:  # CRD: a training set of the batch's two images, their indices
        distiller.bind_training_set(labels)
        extra = {"indices": torch.arange(2)}
    optimizer.zero_grad(set_to_none=True)
    _, losses = distiller(images, labels, feats, 1, **extra)
    if not distiller.backward_done:
        sum(losses.values()).backward()
    optimizer.step()
    distiller.after_step(1)
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True)), "the step changed no parameter"
    return {name: float(value.detach()) for name, value in losses.items()}


@pytest.mark.parametrize("name", shipped())
def test_shipped_config_builds_and_takes_a_step(name):
    cfg = load_config(name, check_files=False)
    for _, _, single in students(cfg):
        losses = one_step(single)
        assert losses and all(math.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("name", shipped())
def test_config_sets_only_what_differs_from_the_defaults(name, tmp_path):
    """Distiller defaults live in one place (the method's Params): a config file sets a method knob
    only where its value differs from what the config gets without it (the default or its base's)."""
    path = CONFIG_DIR / name
    own = yaml.safe_load(path.read_text()) or {}
    method = own.get("method")
    if not isinstance(method, dict):
        return
    if "base" in own:
        own["base"] = str((path.parent / own["base"]).resolve())
    cfg = load_config(path, check_files=False)
    params = distillers.make_params(cfg.method.name, cfg.method.params)
    for key in [k for k in method if k != "name"]:
        trial = tmp_path / f"without_{key}.yaml"
        trial.write_text(yaml.safe_dump({**own, "method": {k: v for k, v in method.items() if k != key}}))
        try:
            other = load_config(trial, check_files=False)
        except ConfigError:
            continue  # the config needs the key (e.g. SoKD's base method, which other keys belong to)
        assert distillers.make_params(other.method.name, other.method.params) != params, f"{name}: method.{key} repeats a default"
