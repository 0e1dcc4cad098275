"""Distillers SP, RKD and LCC (with kdfast.nn.ClassAwareAttention): losses, training steps, configs, engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _distill import sgd_totals, teacher_spared

from kdfast import distillers, functional, models
from kdfast.distillers.lcc import LCC, LCCParams
from kdfast.distillers.rkd import RKDParams
from kdfast.distillers.sp import SPParams
from kdfast.engine import bench, checkpoint, load_config, train
from kdfast.engine.assembly import image_size
from kdfast.nn import ClassAwareAttention
from kdfast.reference import kd as ref_kd
from kdfast.reference import lcc as ref_lcc

PAIRS = ("resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "resnet56_resnet20", "vgg13_vgg8")
NEW_METHODS = ("sp", "rkd", "lcc")


pytestmark = pytest.mark.usefixtures("one_thread")


# ClassAwareAttention


def test_attention_shapes_range_and_detached_mask():
    torch.manual_seed(0)
    module = ClassAwareAttention(24, 10, layers=3, width=8, kernel_size=1)
    convs = [m for m in module.generator if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (24, 8, (1, 1)),
        (8, 8, (1, 1)),
        (8, 8, (1, 1)),
        (8, 1, (1, 1)),
    ]
    f = torch.randn(4, 24, 6, 5)
    mask, ce = module(f, torch.tensor([0, 1, 2, 9]))
    assert mask.shape == (4, 1, 6, 5) and ce.shape == ()
    assert not mask.requires_grad and ((mask > 0) & (mask < 1)).all()
    assert ClassAwareAttention(256, 100).generator[0].out_channels == 64  # width None: max(C // 4, 16)
    assert ClassAwareAttention(32, 100, layers=0).generator[0].in_channels == 32  # the 1-channel conv only


def test_attention_threshold_zeroes_weak_values():
    torch.manual_seed(0)
    module = ClassAwareAttention(8, 5, threshold=0.0).eval()
    f, y = torch.randn(3, 8, 4, 4), torch.tensor([0, 1, 4])
    soft, ce_soft = module(f, y)
    cut = soft.median().item()
    module.threshold = cut
    hard, ce_hard = module(f, y)
    torch.testing.assert_close(hard, torch.where(soft < cut, 0.0, soft))
    assert (hard == 0).any() and (hard > 0).any()
    torch.testing.assert_close(ce_hard, ce_soft)  # the classifier sees the soft mask


def test_attention_ce_trains_generator_and_classifier():
    torch.manual_seed(0)
    module = ClassAwareAttention(8, 5)
    f, y = torch.randn(4, 8, 4, 4), torch.tensor([0, 1, 4, 2])
    _, ce = module(f, y)
    ce.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        _, ce = module(f, y)
        opt.zero_grad()
        ce.backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 1.0}, "threshold must be in"),
        ({"kernel_size": 2}, "odd kernel_size"),
        ({"layers": -1}, "layers >= 0"),
    ],
)
def test_attention_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassAwareAttention(8, 5, **kwargs)


# Registry and parameters


def test_registry_and_defaults():
    assert set(NEW_METHODS) <= set(distillers.names())
    sp, rkd, lcc = (distillers.make_params(m, {}) for m in NEW_METHODS)
    assert isinstance(sp, SPParams) and isinstance(rkd, RKDParams) and isinstance(lcc, LCCParams)
    assert (sp.ce_weight, sp.feat_weight) == (1.0, 3000.0)
    assert (rkd.ce_weight, rkd.feat_weight, rkd.distance_weight, rkd.angle_weight) == (1.0, 1.0, 25.0, 50.0)
    assert (lcc.grid, lcc.stages, lcc.terms, lcc.attention) == (4, [-1], ["intra", "inter", "cross"], True)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"grid": 0}, "grid must be an integer >= 1"),
        ({"terms": ["intra", "outer"]}, "terms must be distinct names"),
        ({"term_weights": [1.0, 1.0]}, "term_weights must hold 3 weights"),
        ({"stages": []}, "stages must be a non-empty list"),
        ({"stages": -1}, "stages must be a non-empty list"),
        ({"stages": [1, 1]}, "must not repeat"),
    ],
)
def test_lcc_bad_params(values, message):
    with pytest.raises(ValueError, match=message):
        distillers.make_params("lcc", values)


def test_lcc_stage_out_of_range(pair):
    teacher, student, *_ = pair
    with pytest.raises(ValueError, match=r"LCC stages \[4\] out of range.*-4..3"):
        distillers.create("lcc", student, teacher, {"stages": [4]})


# Losses against the formulas


def test_sp_on_last_stage(pair):
    teacher, student, x, y, feats = pair
    _, losses = distillers.create("sp", student, teacher)(x, y, feats, 1)
    s = student.features(x)
    assert set(losses) == {"ce", "sp"}
    torch.testing.assert_close(losses["ce"], F.cross_entropy(s.logits, y))
    expected = 3000 * functional.sp_loss(s.stages[-1], feats.stages[-1].clone(), backend="torch")
    torch.testing.assert_close(losses["sp"], expected, rtol=1e-4, atol=1e-6)


def test_rkd_on_pooled_embedding(pair):
    teacher, student, x, y, feats = pair
    _, losses = distillers.create("rkd", student, teacher, {"feat_weight": 2.0})(x, y, feats, 1)
    s = student.features(x)
    assert set(losses) == {"ce", "rkd"}
    expected = 2.0 * functional.rkd_loss(s.pooled, feats.pooled.clone(), distance_weight=25.0, angle_weight=50.0, backend="torch")
    torch.testing.assert_close(losses["rkd"], expected, rtol=1e-4, atol=1e-6)


def test_lcc_without_attention(pair):
    teacher, student, x, y, feats = pair
    params = {"attention": False, "stages": [2, 3], "grid": 2, "term_weights": [1.0, 0.5, 2.0], "terms": ["intra", "cross"]}
    d = distillers.create("lcc", student, teacher, params)
    assert d.attention is None
    _, losses = d(x, y, feats, 1)
    assert set(losses) == {"ce", "kd", "lcc"}
    s = student.features(x)
    torch.testing.assert_close(losses["ce"], 0.1 * F.cross_entropy(s.logits, y))
    torch.testing.assert_close(losses["kd"], 0.9 * ref_kd.kd_loss(s.logits, feats.logits.clone(), 4.0), rtol=1e-4, atol=1e-6)
    expected = 3.0 * sum(
        ref_lcc.local_correlation_loss(s.stages[i], feats.stages[i].clone(), 2, ("intra", "cross"), (1.0, 0.5, 2.0))
        for i in (2, 3)
    )
    torch.testing.assert_close(losses["lcc"], expected, rtol=1e-4, atol=1e-6)
    assert "kd" not in distillers.create("lcc", student, teacher, {**params, "kd_weight": 0.0})(x, y, feats, 1)[1]


def test_lcc_with_attention_masks_both_networks(pair):
    teacher, student, x, y, feats = pair
    torch.manual_seed(0)
    d = distillers.create("lcc", student, teacher, {"stages": [-1, 1], "attention_threshold": 0.3, "attention_weight": 0.5})
    assert isinstance(d, LCC) and d.attention is not None
    attention = list(d.attention)
    assert len(attention) == 2
    first, second = attention
    assert isinstance(first, ClassAwareAttention) and isinstance(second, ClassAwareAttention)
    assert second.classifier.out_features == 10
    assert first.generator[0].in_channels == teacher.stage_channels[-1]
    _, losses = d(x, y, feats, 1)
    assert set(losses) == {"ce", "kd", "lcc", "lcc_attention"}
    s = student.features(x)
    expected_lcc, expected_ce = torch.tensor(0.0), torch.tensor(0.0)
    for k, i in enumerate((-1, 1)):  # train-mode BN: a second call gives the same mask and CE
        mask, ce = attention[k](feats.stages[i].clone(), y)
        expected_lcc += ref_lcc.local_correlation_loss(s.stages[i], feats.stages[i].clone(), 4, mask=mask)
        expected_ce += ce
    torch.testing.assert_close(losses["lcc"], 3.0 * expected_lcc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["lcc_attention"], 0.5 * expected_ce, rtol=1e-5, atol=1e-6)
    # the mask is detached: the LCC loss trains the student only, the auxiliary CE the attention only
    d.zero_grad()
    losses["lcc"].backward(retain_graph=True)
    assert all(p.grad is None for p in d.attention.parameters())
    assert any(p.grad is not None for p in d.student.parameters())
    d.zero_grad()
    losses["lcc_attention"].backward()
    assert all(p.grad is None for p in d.student.parameters())
    assert all(p.grad is not None for p in d.attention.parameters())


# Training steps


@pytest.mark.parametrize("method", NEW_METHODS)
def test_optimizer_steps_decrease_loss_and_spare_teacher(pair, method):
    teacher, _, x, y, feats = pair
    torch.manual_seed(0)
    d = distillers.create(method, models.create("resnet8", 10), teacher)
    with teacher_spared(teacher):
        totals = sgd_totals(d, x, y, feats, lr=0.02)
    assert totals[-1] < totals[0], totals


# Configs and engine


def test_new_configs_are_shipped_and_build():
    for method in NEW_METHODS:
        for pair_name in PAIRS:
            cfg = load_config(f"cifar100/{method}/{pair_name}", check_files=False)
            assert cfg.method.name == method and f"{cfg.model.teacher}_{cfg.model.student}" == pair_name
            assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.lr, cfg.optim.milestones) == (240, 64, 0.05, [150, 180, 210])
            teacher, student = models.create(cfg.model.teacher), models.create(cfg.model.student)
            distillers.create(method, student, teacher, cfg.method.params, image_size(cfg.data.dataset))
    cfg = load_config("imagenet/lcc/ResNet34_ResNet18", check_files=False)
    assert (cfg.method.params["grid"], cfg.train.epochs, cfg.optim.lr) == (3, 100, 0.2)


def test_lcc_engine_epoch(tmp_path):
    torch.manual_seed(1)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": models.create("resnet8", 10).state_dict()}, ckpt)
    cfg = load_config(
        "digits/kd",
        [
            "method.name=lcc",
            "model.teacher=resnet8",
            f"model.teacher_checkpoint={ckpt}",
            "data.batch_size=16",
            "train.max_train_batches=3",
            "train.max_eval_batches=1",
            "train.progress=false",
            "train.epochs=1",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    summary = train(cfg)
    assert summary.epochs == 1
    row = json.loads((Path(summary.out_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss.ce", "loss.kd", "loss.lcc", "loss.lcc_attention"} <= set(row)
    state = checkpoint.load(Path(summary.out_dir) / "last.pt")["distiller"]
    assert any(k.startswith("attention.0.generator.") for k in state)


def test_e2e_bench_measures_new_methods(tmp_path):
    rows = bench.run_e2e(
        torch.device("cpu"),
        list(NEW_METHODS),
        batch=2,
        iters=1,
        warmup=0,
        teacher="resnet14",
        student="resnet8",
        out=tmp_path / "e2e.csv",
    )
    assert {(r["op"], r["backend"]) for r in rows} == {(f"e2e_{m}", b) for m in NEW_METHODS for b in ("eager-fp32", "kdfast")}
    assert all(float(r["median_ms"]) > 0 for r in rows)
