"""ReviewKD: the levels and ABF shapes of every shipped pair against the peers' per-pair tables, the
loss against mdistiller's formula transcribed here (float64), the warm-up ramp, the configs, and
training in the engine (the loss decreases)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _distill import sgd_totals, teacher_spared
from torch import Tensor

from kdfast import distillers, models
from kdfast.distillers.reviewkd import ReviewKDParams
from kdfast.engine import checkpoint, load_config, train
from kdfast.engine.assembly import image_size

pytestmark = pytest.mark.usefixtures("one_thread")

# The authors' build_review_kd (dvlab-research/ReviewKD, CIFAR-100/model/reviewkd.py) and mdistiller's
# ImageNet config, per (teacher, student): student in_channels (shallow to deep), shapes (deep to
# shallow, the student's sizes), out_channels (the teacher's), out_shapes (the teacher's sizes).
RESNET_X4 = ([64, 128, 256, 256], [1, 8, 16, 32], [64, 128, 256, 256], [1, 8, 16, 32])
RESNET = ([16, 32, 64, 64], [1, 8, 16, 32], [16, 32, 64, 64], [1, 8, 16, 32])
VGG8 = ([128, 256, 512, 512, 512], [1, 4, 4, 8, 16])
MOBILE = ([12, 16, 48, 160, 1280], [1, 2, 4, 8, 16])
FROM_VGG13 = ([128, 256, 512, 512, 512], [1, 4, 4, 8, 16])
FROM_RESNET50 = ([256, 512, 1024, 2048, 2048], [1, 4, 8, 16, 32])
PEER_TABLES = {
    ("resnet32x4", "resnet8x4"): RESNET_X4,
    ("resnet56", "resnet20"): RESNET,
    ("resnet110", "resnet20"): RESNET,
    ("resnet110", "resnet32"): RESNET,
    ("wrn_40_2", "wrn_16_2"): ([32, 64, 128, 128], [1, 8, 16, 32], [32, 64, 128, 128], [1, 8, 16, 32]),
    ("wrn_40_2", "wrn_40_1"): ([16, 32, 64, 64], [1, 8, 16, 32], [32, 64, 128, 128], [1, 8, 16, 32]),
    ("vgg13", "vgg8"): (*VGG8, *FROM_VGG13),
    ("ResNet50", "vgg8"): (*VGG8, *FROM_RESNET50),
    ("vgg13", "MobileNetV2"): (*MOBILE, *FROM_VGG13),
    ("ResNet50", "MobileNetV2"): (*MOBILE, *FROM_RESNET50),
    ("resnet32x4", "ShuffleV1"): ([240, 480, 960, 960], [1, 4, 8, 16], [64, 128, 256, 256], [1, 8, 16, 32]),
    ("wrn_40_2", "ShuffleV1"): ([240, 480, 960, 960], [1, 4, 8, 16], [32, 64, 128, 128], [1, 8, 16, 32]),
    ("resnet32x4", "ShuffleV2"): ([116, 232, 464, 1024], [1, 4, 8, 16], [64, 128, 256, 256], [1, 8, 16, 32]),
}
IMAGENET_TABLE = ([64, 128, 256, 512, 512], [1, 7, 14, 28, 56], [64, 128, 256, 512, 512], [1, 7, 14, 28, 56])
# The loss weights of the peers' CIFAR runs (mdistiller's configs/cifar100/reviewkd.yaml; the authors'
# CIFAR-100/script/reviewKD.sh), else mdistiller's default 1.0.
PEER_WEIGHTS = {
    ("resnet32x4", "resnet8x4"): 5.0,
    ("wrn_40_2", "wrn_16_2"): 5.0,
    ("wrn_40_2", "wrn_40_1"): 5.0,
    ("wrn_40_2", "ShuffleV1"): 5.0,
    ("resnet32x4", "ShuffleV1"): 5.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("resnet56", "resnet20"): 0.6,
    ("resnet110", "resnet32"): 1.0,
}


def build(teacher: str, student: str, dataset: str = "cifar100", **params):
    torch.manual_seed(0)
    t = models.create(teacher, dataset=dataset).eval().requires_grad_(False)
    s = models.create(student, dataset=dataset)
    return distillers.create("reviewkd", s, t, params, image_size(dataset)), s, t


def abf_table(d) -> tuple[list[int], list[int], list[int], list[int]]:
    """(in_channels shallow to deep, shapes deep to shallow, out_channels shallow to deep, out_shapes deep to shallow)."""
    abfs = list(d.abfs)[::-1]
    return (
        [abf.conv1[0].in_channels for abf in abfs],
        [h for h, _ in d.sizes],
        [abf.conv2[0].out_channels for abf in abfs],
        [h for h, _ in d.out_sizes],
    )


@pytest.mark.parametrize("teacher,student", list(PEER_TABLES), ids=lambda v: str(v))
def test_levels_are_the_peers_per_pair(teacher, student):
    d, _, _ = build(teacher, student)
    assert abf_table(d) == PEER_TABLES[(teacher, student)]
    mid = min(512, PEER_TABLES[(teacher, student)][0][-1])
    assert all(abf.conv1[0].out_channels == mid for abf in d.abfs)
    assert d.abfs[0].att_conv is None and all(abf.att_conv is not None for abf in list(d.abfs)[1:])


def test_imagenet_levels():
    d, _, _ = build("ResNet34", "ResNet18", "imagenet", student_preact=True)
    assert abf_table(d) == IMAGENET_TABLE
    assert all(abf.conv1[0].out_channels == 512 for abf in d.abfs)


def test_parameter_names_are_the_peers():
    d, _, _ = build("resnet32x4", "resnet8x4")
    keys = {k for k in d.state_dict() if k.startswith("abfs.")}
    assert {"abfs.0.conv1.0.weight", "abfs.0.conv1.1.running_mean", "abfs.0.conv2.0.weight", "abfs.3.att_conv.0.bias"} <= keys
    assert not any(k.startswith("abfs.0.att_conv") for k in keys)


# --- mdistiller's forward_train, transcribed (the feature side; CE is the base class's)


def peer_abf(abf: Any, x: Tensor, y: Any, shape: Any, out_shape: int) -> tuple[Tensor, Tensor]:
    n, _, h, w = x.shape
    x = abf.conv1(x)
    if abf.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = abf.att_conv(torch.cat([x, y], dim=1))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return abf.conv2(x), x


def peer_hcl(fstudent: list[Tensor], fteacher: list[Tensor]) -> Tensor:
    total = fstudent[0].new_zeros(())
    for fs, ft in zip(fstudent, fteacher):
        stage = F.mse_loss(fs, ft, reduction="mean")
        weight, norm = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[2]:
                continue
            weight /= 2.0
            stage += F.mse_loss(F.adaptive_avg_pool2d(fs, (level, level)), F.adaptive_avg_pool2d(ft, (level, level))) * weight
            norm += weight
        total = total + stage / norm
    return total


def peer_reviewkd(d, images: Tensor, teacher_feats, shapes, out_shapes, weight, warmup, epoch, preact=False) -> Tensor:
    """mdistiller: the student's feats (stem included) + pooled, reversed; ABFs deepest first with
    zip truncation (the stem drops out); the teacher's preact_feats[1:] + pooled; HCL with the ramp."""
    feats = d.student.features(images)
    x = (feats.preact_stages if preact else feats.stages) + [feats.pooled.unsqueeze(-1).unsqueeze(-1)]
    x = x[::-1]
    out, res = peer_abf(d.abfs[0], x[0], None, None, out_shapes[0])
    results = [out]
    for f, abf, shape, out_shape in zip(x[1:], d.abfs[1:], shapes[1:], out_shapes[1:]):
        out, res = peer_abf(abf, f, res, shape, out_shape)
        results.insert(0, out)
    targets = teacher_feats.preact_stages[1:] + [teacher_feats.pooled.unsqueeze(-1).unsqueeze(-1)]
    return weight * min(epoch / warmup, 1.0) * peer_hcl(results, targets)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("epoch", [5, 30])
def test_loss_is_mdistillers_in_float64(backend, epoch, monkeypatch):
    """resnet32x4 -> resnet8x4 with mdistiller's CIFAR config (weight 5, warm-up 20): the loss and the
    gradients of every student and ABF parameter equal mdistiller's, transcribed, to float64 rounding."""
    monkeypatch.setenv("KDFAST_BACKEND", backend)
    d, s, t = build("resnet32x4", "resnet8x4", reviewkd_weight=5.0)
    d.double()
    t.double()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 5, 7, 99])
    with torch.inference_mode():
        teacher_feats = t.features(images)
    params = [p for p in d.parameters() if p.requires_grad]
    bn_state = {k: v.clone() for k, v in d.state_dict().items()}
    _, losses = d(images, labels, teacher_feats, epoch)
    grads = torch.autograd.grad(losses["reviewkd"], params, allow_unused=True)
    d.load_state_dict(bn_state)  # the same BN running statistics for the second forward
    with torch.no_grad():
        peer_t = t.features(images)
    expected = peer_reviewkd(d, images, peer_t, [1, 8, 16, 32], [1, 8, 16, 32], 5.0, 20, epoch)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    assert losses["reviewkd"].dtype == torch.float64
    torch.testing.assert_close(losses["reviewkd"], expected, rtol=1e-12, atol=0)
    for g, e in zip(grads, expected_grads, strict=True):
        if e is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-14 * max(e.abs().max().item(), 1.0))


def test_imagenet_student_preact_is_mdistillers():
    """ImageNet's ``student_preact`` reads the student's pre-activation stages (mdistiller's STU_PREACT)."""
    d, s, t = build("ResNet34", "ResNet18", "imagenet", student_preact=True, warmup=1)
    d.double()
    t.double()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        tf = t.features(images)
        sf = s.features(images)
    d.sizes = [tuple(f.shape[2:]) for f in [sf.pooled[:, :, None, None], *sf.preact_stages[1:][::-1]]]
    d.out_sizes = [tuple(f.shape[2:]) for f in [tf.pooled[:, :, None, None], *tf.preact_stages[1:][::-1]]]
    _, losses = d(images, torch.tensor([1, 2]), tf, 3)
    shapes = [h for h, _ in d.sizes]
    expected = peer_reviewkd(d, images, tf, shapes, [h for h, _ in d.out_sizes], 1.0, 1, 3, preact=True)
    torch.testing.assert_close(losses["reviewkd"], expected, rtol=1e-12, atol=0)


def test_warmup_ramp(pair):
    teacher, _, x, y, feats = pair
    d = distillers.create("reviewkd", models.create("resnet8", 10), teacher, {"warmup": 20})
    d.eval()  # BN in eval mode: the two forwards see the same statistics
    full = d(x, y, feats, 40)[1]["reviewkd"]
    torch.testing.assert_close(d(x, y, feats, 5)[1]["reviewkd"], 0.25 * full)
    no_ramp = distillers.create("reviewkd", models.create("resnet8", 10), teacher, {"warmup": 0})
    assert no_ramp(x, y, feats, 1)[1]["reviewkd"] > 0


def test_params_errors():
    with pytest.raises(ValueError, match="warmup must be"):
        distillers.make_params("reviewkd", {"warmup": -1})
    with pytest.raises(ValueError, match="levels"):
        distillers.make_params("reviewkd", {"levels": [8, 1]})
    with pytest.raises(ValueError, match="max_mid_channels"):
        distillers.make_params("reviewkd", {"max_mid_channels": 0})


def test_levels_must_match():
    teacher = models.create("vgg13", 10)
    with pytest.raises(ValueError, match="as many"):
        distillers.create("reviewkd", models.create("resnet8", 10), teacher)


def test_optimizer_steps_decrease_loss_and_spare_teacher(pair):
    teacher, _, x, y, feats = pair
    torch.manual_seed(0)
    d = distillers.create("reviewkd", models.create("resnet8", 10), teacher, {"warmup": 0})
    with teacher_spared(teacher):
        totals = sgd_totals(d, x, y, feats, lr=0.02)
    assert totals[-1] < totals[0], totals


# --- configs and the engine


def shipped() -> list[str]:
    from kdfast.engine.config import CONFIG_DIR

    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in (CONFIG_DIR / "cifar100" / "reviewkd").glob("*.yaml"))


def test_configs_are_shipped_with_the_peers_weights():
    names = shipped()
    assert len(names) == 13
    for name in names:
        cfg = load_config(name, check_files=False)
        key = (cfg.model.teacher, cfg.model.student)
        assert key in PEER_TABLES, name
        params = distillers.make_params("reviewkd", cfg.method.params)
        assert isinstance(params, ReviewKDParams)
        assert params.reviewkd_weight == PEER_WEIGHTS.get(key, 1.0), name
        assert (params.warmup, params.levels, params.ce_weight) == (20, [4, 2, 1], 1.0), name
        assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.milestones) == (240, 64, [150, 180, 210])
    cfg = load_config("imagenet/reviewkd/ResNet34_ResNet18", check_files=False)
    params = distillers.make_params("reviewkd", cfg.method.params)
    assert isinstance(params, ReviewKDParams)
    assert (params.reviewkd_weight, params.warmup, params.student_preact, params.teacher_preact) == (1.0, 1, True, True)
    assert (cfg.model.teacher, cfg.model.student, cfg.train.epochs) == ("ResNet34", "ResNet18", 100)


def test_engine_trains_and_the_loss_decreases(tmp_path, teacher_ckpt):
    """A short CPU run on the digits: three epochs of four batches, the training loss (CE + ReviewKD,
    no warm-up) falls from the first epoch to the last; the ABFs are checkpointed with the student."""
    cfg = load_config(
        "digits/student",
        [
            "method.name=reviewkd",
            "method.warmup=0",
            "model.teacher=resnet8",
            f"model.teacher_checkpoint={teacher_ckpt}",
            "data.batch_size=16",
            "optim.lr=0.02",
            "train.max_train_batches=4",
            "train.max_eval_batches=1",
            "train.progress=false",
            "train.epochs=3",
            "train.deterministic=true",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    summary = train(cfg)
    assert summary.epochs == 3
    rows = [json.loads(line) for line in (Path(summary.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss.ce", "loss.reviewkd"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["loss.reviewkd"] < rows[0]["loss.reviewkd"], [r["loss.reviewkd"] for r in rows]
    state = checkpoint.load(Path(summary.out_dir) / "last.pt")["distiller"]
    assert any(k.startswith("abfs.3.att_conv.") for k in state)
