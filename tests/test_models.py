"""Model zoo: shapes, the features interface, stage modules, parameter counts, checkpoint interop.

The architectures reproduce mdistiller / RepDistiller's CIFAR models and torchvision's ImageNet
ResNets; parameter counts and state_dict names are checked against those public definitions.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdfast import models
from kdfast.models.layers import channel_shuffle


class Spec(NamedTuple):
    channels: tuple[int, ...]  # stage_channels
    sizes: tuple[int, ...]  # spatial size of every stage for the test input
    blocks: int  # number of entries of Features.blocks
    params: int  # exact parameter count (100 classes for CIFAR, 1000 for ImageNet)


_R, _RX4, _SR = (16, 16, 32, 64), (32, 64, 128, 256), (32, 32, 16, 8)
_VGG, _SVGG = (64, 128, 256, 512, 512), (32, 16, 8, 4, 4)
CIFAR = {
    "resnet8": Spec(_R, _SR, 3, 83_892),
    "resnet14": Spec(_R, _SR, 6, 181_108),
    "resnet20": Spec(_R, _SR, 9, 278_324),
    "resnet32": Spec(_R, _SR, 15, 472_756),
    "resnet44": Spec(_R, _SR, 21, 667_188),
    "resnet56": Spec(_R, _SR, 27, 861_620),
    "resnet110": Spec(_R, _SR, 54, 1_736_564),
    "resnet8x4": Spec(_RX4, _SR, 3, 1_233_540),
    "resnet32x4": Spec(_RX4, _SR, 15, 7_433_860),
    "wrn_16_1": Spec((16, 16, 32, 64), _SR, 6, 180_916),
    "wrn_16_2": Spec((16, 32, 64, 128), _SR, 6, 703_284),
    "wrn_40_1": Spec((16, 16, 32, 64), _SR, 18, 569_780),
    "wrn_40_2": Spec((16, 32, 64, 128), _SR, 18, 2_255_156),
    "vgg8": Spec(_VGG, _SVGG, 5, 3_965_028),
    "vgg11": Spec(_VGG, _SVGG, 8, 9_277_284),
    "vgg13": Spec(_VGG, _SVGG, 10, 9_462_180),
    "vgg16": Spec(_VGG, _SVGG, 13, 14_774_436),
    "vgg19": Spec(_VGG, _SVGG, 16, 20_086_692),
    "MobileNetV2": Spec((16, 12, 16, 48, 160), (16, 16, 8, 4, 2), 17, 812_836),
    "ShuffleV1": Spec((24, 240, 480, 960), (32, 16, 8, 4), 16, 949_258),
    "ShuffleV2": Spec((24, 116, 232, 464), (32, 16, 8, 4), 16, 1_355_528),
}
# 64x64 inputs; counts equal torchvision's resnet18/34/50 and the usual MobileNetV1 (4.23M).
IMAGENET = {
    "ResNet18": Spec((64, 64, 128, 256, 512), (32, 16, 8, 4, 2), 8, 11_689_512),
    "ResNet34": Spec((64, 64, 128, 256, 512), (32, 16, 8, 4, 2), 16, 21_797_672),
    "ResNet50": Spec((64, 256, 512, 1024, 2048), (32, 16, 8, 4, 2), 16, 25_557_032),
    "MobileNetV1": Spec((32, 128, 256, 512, 1024), (32, 16, 8, 4, 2), 13, 4_231_976),
}
ALL = {**CIFAR, **IMAGENET}
# Millions of parameters as printed in the published tables (CRD / RepDistiller, CIFAR-100), to two
# decimals (rounded or truncated: vgg8 has 3,965,028 and is printed 3.96M).
PUBLISHED_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "MobileNetV2": 0.81,
    "ShuffleV1": 0.95,
    "ShuffleV2": 1.36,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches here are tiny: one thread avoids OpenMP spinning on busy shared cores (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = 32 if name in CIFAR else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that eval outputs depend on every buffer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


def _classifier_width(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features


def test_registry():
    assert models.names() == list(ALL)
    assert isinstance(models.create("resnet8"), models.KDModel)
    fc = models.create("resnet8").fc
    assert isinstance(fc, nn.Linear) and fc.out_features == 100
    fc = models.create("resnet8", num_classes=10).fc
    assert isinstance(fc, nn.Linear) and fc.out_features == 10
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*resnet8, resnet14.*MobileNetV1"):
        models.create("resnet9")


@pytest.mark.parametrize("name", list(ALL))
def test_interface(name):
    spec = ALL[name]
    model = models.create(name).eval()
    x = _input(name)
    with torch.no_grad():
        logits = model(x)
        f = model.features(x)
        staged = x
        for segment in model.stage_modules():
            staged = segment(staged)
    assert logits.shape == (2, 100 if name in CIFAR else 1000)
    assert torch.equal(f.logits, logits)
    assert torch.equal(staged, logits)
    assert model.stage_channels == spec.channels
    assert [t.shape[1:] for t in f.stages] == [(c, s, s) for c, s in zip(spec.channels, spec.sizes)]
    assert [t.shape for t in f.preact_stages] == [t.shape for t in f.stages]
    assert len(f.blocks) == spec.blocks
    assert torch.equal(f.blocks[-1], f.stages[-1])
    assert f.pooled.shape == (2, _classifier_width(model))
    assert sum(p.numel() for p in model.parameters()) == spec.params


def test_stage_modules_are_views():
    model = models.create("MobileNetV2")
    segments = model.stage_modules()
    assert len(segments) == len(model.stage_channels) + 1  # stem, stages, head
    shared = {id(p) for s in segments for p in s.parameters()}
    assert shared == {id(p) for p in model.parameters()}
    assert sum(p.numel() for s in segments for p in s.parameters()) == CIFAR["MobileNetV2"].params


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_published_parameter_counts(name):
    params = sum(p.numel() for p in models.create(name).parameters())
    assert abs(params / 1e6 - PUBLISHED_M[name]) < 0.01


@pytest.mark.parametrize("name", ["resnet20", "vgg8", "ShuffleV1", "ResNet18", "MobileNetV1"])
def test_preact_is_before_the_stage_relu(name):
    model = models.create(name).eval()
    _randomize_bn(model)
    with torch.no_grad():
        f = model.features(_input(name))
    for post, pre in zip(f.stages, f.preact_stages):
        assert torch.equal(post, F.relu(pre))
    assert (f.preact_stages[-1] < 0).any()


def test_preact_definitions_of_wrn_shufflev2_mobilenetv2():
    """The public code's own definitions for the models whose stage outputs are not relu(preact)."""
    wrn = models.create("wrn_16_2").eval()
    _randomize_bn(wrn)
    with torch.no_grad():
        f = wrn.features(_input("wrn_16_2"))
        consumers = [wrn.get_submodule(name) for name in ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")]
        assert torch.equal(f.preact_stages[0], f.stages[0])
        for k, bn in enumerate(consumers, start=1):
            torch.testing.assert_close(f.preact_stages[k], bn(f.stages[k]))
    shuffle = models.create("ShuffleV2").eval()
    with torch.no_grad():
        f = shuffle.features(_input("ShuffleV2"))
    assert torch.equal(f.preact_stages[0], f.stages[0])
    for post, pre in zip(f.stages[1:], f.preact_stages[1:]):
        assert torch.equal(post, channel_shuffle(F.relu(pre), 2))
    mobile = models.create("MobileNetV2").eval()
    with torch.no_grad():
        f = mobile.features(_input("MobileNetV2"))
    assert all(post is pre for post, pre in zip(f.stages, f.preact_stages))


# One model of each family (and block type).
FAMILIES = ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]


@pytest.mark.parametrize("name", FAMILIES + ["ResNet18", "MobileNetV1"])
def test_train_mode_backward_through_features(name):
    model = models.create(name).train()
    f = model.features(_input(name))
    loss = f.logits.logsumexp(1).mean() + f.pooled.mean()
    loss = loss + sum(t.square().mean() for t in f.stages + f.preact_stages + f.blocks)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", FAMILIES + ["ResNet18", "MobileNetV1"])
def test_channels_last(name):
    """Same results in channels_last (compared in float64, where layout-dependent rounding is negligible)."""
    model = models.create(name).eval()
    x = _input(name)
    with torch.no_grad():
        assert torch.isfinite(model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))).all()
        model = model.double()
        expected = model.to(memory_format=torch.contiguous_format)(x.double())
        f = model.to(memory_format=torch.channels_last).features(x.double().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(f.logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_vgg_pools_before_block4_only_for_64px_inputs():
    """As the public code: 32x32 inputs reach block4 at 4x4 unpooled, 64x64 ones are pooled from 8x8."""
    model = models.create("vgg8").eval()
    with torch.no_grad():
        f32 = model.features(torch.randn(1, 3, 32, 32))
        f64 = model.features(torch.randn(1, 3, 64, 64))
    assert [t.shape[-1] for t in f32.stages] == [32, 16, 8, 4, 4]
    assert [t.shape[-1] for t in f64.stages] == [64, 32, 16, 8, 4]


def test_compile_fullgraph():
    """Dynamo captures the forward and the features as single graphs (aot_eager: no C++ compile here)."""
    torch._dynamo.reset()
    model = models.create("resnet8").eval()
    x = _input("resnet8")
    with torch.no_grad():
        logits = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        f = torch.compile(model.features, fullgraph=True, backend="aot_eager")(x)
        expected = model.features(x)
    torch.testing.assert_close(logits, expected.logits)
    torch.testing.assert_close(f.logits, expected.logits)
    for got, want in zip(f.stages + f.preact_stages + f.blocks, expected.stages + expected.preact_stages + expected.blocks):
        torch.testing.assert_close(got, want)


# (key, shape) pairs from the public definitions (mdistiller/RepDistiller CIFAR models, torchvision).
PUBLIC_KEYS = {
    "resnet20": [
        ("conv1.weight", (16, 3, 3, 3)),
        ("bn1.running_mean", (16,)),
        ("layer1.2.conv2.weight", (16, 16, 3, 3)),
        ("layer2.0.downsample.0.weight", (32, 16, 1, 1)),
        ("layer2.0.downsample.1.running_var", (32,)),
        ("fc.weight", (100, 64)),
    ],
    "resnet8x4": [
        ("layer1.0.downsample.0.weight", (64, 32, 1, 1)),
        ("layer3.0.bn2.num_batches_tracked", ()),
        ("fc.bias", (100,)),
    ],
    "wrn_40_2": [
        ("block1.layer.0.bn1.weight", (16,)),
        ("block1.layer.0.convShortcut.weight", (32, 16, 1, 1)),
        ("block2.layer.0.convShortcut.weight", (64, 32, 1, 1)),
        ("block3.layer.5.conv2.weight", (128, 128, 3, 3)),
        ("bn1.running_var", (128,)),
        ("fc.weight", (100, 128)),
    ],
    "vgg13": [
        ("block0.0.weight", (64, 3, 3, 3)),
        ("block0.0.bias", (64,)),
        ("block0.1.running_mean", (64,)),
        ("block0.3.weight", (64, 64, 3, 3)),
        ("block4.4.running_var", (512,)),
        ("classifier.weight", (100, 512)),
    ],
    "MobileNetV2": [
        ("conv1.0.weight", (16, 3, 3, 3)),
        ("conv1.1.running_mean", (16,)),
        ("blocks.0.0.conv.0.weight", (16, 16, 1, 1)),
        ("blocks.1.0.conv.3.weight", (48, 1, 3, 3)),
        ("blocks.6.0.conv.7.running_var", (160,)),
        ("conv2.0.weight", (1280, 160, 1, 1)),
        ("classifier.0.weight", (100, 1280)),
    ],
    "ShuffleV1": [
        ("conv1.weight", (24, 3, 1, 1)),
        ("layer1.0.conv1.weight", (54, 24, 1, 1)),
        ("layer1.0.conv3.weight", (216, 18, 1, 1)),
        ("layer2.1.conv1.weight", (120, 160, 1, 1)),
        ("layer3.3.bn3.running_mean", (960,)),
        ("linear.weight", (100, 960)),
    ],
    "ShuffleV2": [
        ("layer1.0.conv1.weight", (24, 1, 3, 3)),
        ("layer1.0.conv5.weight", (58, 58, 1, 1)),
        ("layer1.1.conv2.weight", (58, 1, 3, 3)),
        ("layer2.7.bn3.running_var", (116,)),
        ("conv2.weight", (1024, 464, 1, 1)),
        ("linear.weight", (100, 1024)),
    ],
    "ResNet18": [
        ("conv1.weight", (64, 3, 7, 7)),
        ("bn1.running_mean", (64,)),
        ("layer1.0.conv1.weight", (64, 64, 3, 3)),
        ("layer2.0.downsample.0.weight", (128, 64, 1, 1)),
        ("layer2.0.downsample.1.num_batches_tracked", ()),
        ("layer4.1.bn2.weight", (512,)),
        ("fc.weight", (1000, 512)),
    ],
    "ResNet50": [
        ("layer1.0.conv3.weight", (256, 64, 1, 1)),
        ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
        ("layer3.5.bn3.running_var", (1024,)),
        ("layer4.0.conv2.weight", (512, 512, 3, 3)),
        ("fc.weight", (1000, 2048)),
    ],
    "MobileNetV1": [
        ("model.0.0.weight", (32, 3, 3, 3)),
        ("model.1.0.weight", (32, 1, 3, 3)),
        ("model.1.3.weight", (64, 32, 1, 1)),
        ("model.13.4.running_var", (1024,)),
        ("fc.weight", (1000, 1024)),
    ],
}


@pytest.mark.parametrize("name", list(PUBLIC_KEYS))
def test_public_state_dict_names(name):
    state = models.create(name).state_dict()
    for key, shape in PUBLIC_KEYS[name]:
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


def test_torchvision_resnet18_key_layout():
    """Every key of torchvision's resnet18 naming, and nothing else."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{b}" for b in bn)}
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
            keys |= {f"{prefix}.bn{i}.{b}" for i in (1, 2) for b in bn}
            if layer > 1 and block == 0:
                keys |= {f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{b}" for b in bn)}
    assert set(models.create("ResNet18").state_dict()) == keys


@pytest.mark.parametrize("name", FAMILIES)
def test_mdistiller_checkpoint_round_trip(name, tmp_path):
    teacher = models.create(name)
    _randomize_bn(teacher)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 240, "best_acc": 79.42}, path)
    loaded = models.create(name, weights=path).eval()
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(loaded(x), teacher.eval()(x))


def test_bare_state_dict_without_num_batches_tracked(tmp_path):
    """torchvision's files are bare state dicts, the older ones without BN's num_batches_tracked."""
    model = models.create("ResNet18")
    _randomize_bn(model)
    path = tmp_path / "resnet18.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded = models.load_checkpoint(models.create("ResNet18"), path).eval()
    x = _input("ResNet18", batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_checkpoint_mismatch_names_the_keys(tmp_path):
    path = tmp_path / "resnet8.pth"
    torch.save({"model": models.create("resnet8").state_dict()}, path)
    with pytest.raises(ValueError, match=r"does not match CIFARResNet: missing \(\d+\): layer1\.1\.conv1\.weight"):
        models.load_checkpoint(models.create("resnet14"), path)
    path14 = tmp_path / "resnet14.pth"
    torch.save(models.create("resnet14").state_dict(), path14)
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): layer1\.1\.conv1\.weight"):
        models.load_checkpoint(models.create("resnet8"), path14)
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 3}, bad)
    with pytest.raises(ValueError, match=r"neither a state_dict nor"):
        models.load_checkpoint(models.create("resnet8"), bad)


@pytest.mark.parametrize("name", ["ResNet18", "ResNet50"])
def test_imagenet_resnet_equals_torchvision(name):
    """torchvision's weights load strictly and give torchvision's outputs (eval mode)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name.lower())(weights=None).eval()
    _randomize_bn(reference)
    ours = models.create(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


# The peers' CIFAR ResNet18/ResNet50 (mdistiller / RepDistiller resnetv2.py): blocks per stage,
# bottleneck, parameters (100 classes).
CIFAR_V2 = {"ResNet18": ((2, 2, 2, 2), False, 11_220_132), "ResNet50": ((3, 4, 6, 3), True, 23_705_252)}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _peer_v2_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Every (key, shape) of the peers' CIFAR ResNet: conv1/bn1, layerL.i.{conv,bn}k, layerL.i.shortcut.{0,1}, linear."""
    num_blocks, bottleneck, _ = CIFAR_V2[name]
    e = 4 if bottleneck else 1
    keys = {"conv1.weight": (64, 3, 3, 3), **{f"bn1.{b}": (64,) for b in _BN}}
    inplanes = 64
    for layer, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2), strict=True), start=1):
        for i in range(blocks):
            p, cin = f"layer{layer}.{i}", inplanes if i == 0 else planes * e
            convs = (
                [(cin, planes, 1), (planes, planes, 3), (planes, planes * e, 1)]
                if bottleneck
                else [(cin, planes, 3), (planes, planes, 3)]
            )
            for k, (c_in, c_out, size) in enumerate(convs, start=1):
                keys[f"{p}.conv{k}.weight"] = (c_out, c_in, size, size)
                keys |= {f"{p}.bn{k}.{b}": (c_out,) for b in _BN}
            if i == 0 and (stride != 1 or cin != planes * e):
                keys[f"{p}.shortcut.0.weight"] = (planes * e, cin, 1, 1)
                keys |= {f"{p}.shortcut.1.{b}": (planes * e,) for b in _BN}
        inplanes = planes * e
    keys |= {"linear.weight": (100, 512 * e), "linear.bias": (100,)}
    return {k: () if k.endswith("num_batches_tracked") else v for k, v in keys.items()}


def _peer_v2_forward(state: dict[str, torch.Tensor], x: torch.Tensor, bottleneck: bool) -> torch.Tensor:
    """The peers' CIFAR ResNet forward (eval mode) written out from a state_dict."""

    def bn(h, p):
        return F.batch_norm(h, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"], state[f"{p}.bias"])

    out = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for layer, stride0 in zip(range(1, 5), (1, 2, 2, 2), strict=True):
        i = 0
        while f"layer{layer}.{i}.conv1.weight" in state:
            p, s = f"layer{layer}.{i}", stride0 if i == 0 else 1
            if bottleneck:
                h = F.relu(bn(F.conv2d(out, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
                h = F.relu(bn(F.conv2d(h, state[f"{p}.conv2.weight"], stride=s, padding=1), f"{p}.bn2"))
                h = bn(F.conv2d(h, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                h = F.relu(bn(F.conv2d(out, state[f"{p}.conv1.weight"], stride=s, padding=1), f"{p}.bn1"))
                h = bn(F.conv2d(h, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            shortcut = (
                bn(F.conv2d(out, state[f"{p}.shortcut.0.weight"], stride=s), f"{p}.shortcut.1")
                if f"{p}.shortcut.0.weight" in state
                else out
            )
            out = F.relu(h + shortcut)
            i += 1
    return F.linear(out.mean((2, 3)), state["linear.weight"], state["linear.bias"])


@pytest.mark.parametrize("name", list(CIFAR_V2))
def test_cifar_resnet_v2_loads_peer_checkpoint_strictly_with_the_same_outputs(name, tmp_path):
    num_blocks, bottleneck, params = CIFAR_V2[name]
    model = models.create(name, dataset="cifar100")
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _peer_v2_keys(name)
    assert sum(p.numel() for p in model.parameters()) == params
    gen = torch.Generator().manual_seed(1)
    peer = {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in _peer_v2_keys(name).items() if "num_batches" not in k}
    peer |= {k: torch.rand(v.shape, generator=gen) + 0.5 for k, v in peer.items() if k.endswith(("running_var", "bn1.weight"))}
    path = tmp_path / f"{name}_last.pth"
    torch.save({"model": peer, "epoch": 240}, path)  # peers' format, without num_batches_tracked (as old files)
    loaded = models.create(name, 100, weights=path, dataset="cifar100").eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        f = loaded.features(x)
        torch.testing.assert_close(loaded(x), _peer_v2_forward(peer, x, bottleneck), rtol=1e-4, atol=1e-4)
    e = 4 if bottleneck else 1
    assert loaded.stage_channels == (64, 64 * e, 128 * e, 256 * e, 512 * e)
    assert [t.shape[1:] for t in f.stages] == [(c, s, s) for c, s in zip(loaded.stage_channels, (32, 32, 16, 8, 4), strict=True)]
    assert len(f.blocks) == sum(num_blocks) and torch.equal(f.blocks[-1], f.stages[-1]) and f.pooled.shape == (2, 512 * e)


def test_names_resolve_per_dataset():
    for dataset in ("cifar100", "cifar10", "digits"):
        assert type(models.create("ResNet50", dataset=dataset)).__name__ == "CIFARResNetV2"
        assert "MobileNetV1" not in models.names(dataset) and "ResNet18" in models.names(dataset)
    assert type(models.create("ResNet50", dataset="imagenet")).__name__ == "ImageNetResNet"
    assert type(models.create("ResNet50")).__name__ == "ImageNetResNet"  # no dataset: as before
    assert models.names("imagenet") == ["ResNet18", "ResNet34", "ResNet50", "MobileNetV1"]
    with pytest.raises(ValueError, match="'ResNet34' is an ImageNet model, not one for dataset 'cifar100'"):
        models.create("ResNet34", dataset="cifar100")
    with pytest.raises(ValueError, match="'resnet32x4' is a CIFAR model, not one for dataset 'imagenet'"):
        models.create("resnet32x4", dataset="imagenet")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        models.create("resnet8", dataset="mnist")


def test_repdistiller_last_checkpoint_with_namespace(tmp_path):
    """RepDistiller's *_last.pth pickles its argparse options: the weights load; another object is a clear error."""
    import argparse
    import fractions

    model = models.create("resnet8")
    _randomize_bn(model)
    path = tmp_path / "resnet8_last.pth"
    torch.save(
        {
            "opt": argparse.Namespace(model_s="resnet8", learning_rate=0.05, lr_decay_epochs=[150, 180, 210]),
            "model": model.state_dict(),
        },
        path,
    )
    loaded = models.create("resnet8", weights=path).eval()
    x = _input("resnet8")
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    odd = tmp_path / "odd_last.pth"
    torch.save({"opt": fractions.Fraction(1, 2), "model": model.state_dict()}, odd)
    with pytest.raises(ValueError, match=r"odd_last\.pth: the checkpoint pickles .*fractions\.Fraction.*weights_only=False"):
        models.create("resnet8", weights=odd)
