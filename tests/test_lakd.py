"""LAKD: the separation-decoupling wrapper (kdfast.distillers.local), the distiller, its configs and engine runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kdfast import distillers, functional, models
from kdfast.distillers.base import sum_losses
from kdfast.distillers.lakd import LAKD, LAKDParams
from kdfast.distillers.local import LocalModules, stage_boundaries
from kdfast.engine import ConfigError, load_config, train
from kdfast.engine.assembly import image_size
from kdfast.engine.results import LiveTensorBytes
from kdfast.reference import block_attention as ref_ba
from kdfast.reference import kd as ref_kd

PAIRS = ("resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "resnet56_resnet20", "vgg13_vgg8")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_lakd(pair, **params) -> LAKD:
    """A LAKD distiller around a fresh resnet8 (seeded: equal weights on every call)."""
    teacher = pair[0]
    torch.manual_seed(3)
    d = distillers.create("lakd", models.create("resnet8", 10), teacher, params)
    assert isinstance(d, LAKD)
    return d


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """A copy of the gradient of `p`, which must have one."""
    assert p.grad is not None
    return p.grad.clone()


def step(d: LAKD, pair, epoch: int = 3) -> dict[str, torch.Tensor]:
    """One training step's gradients (forward, then the engine's backward unless done); returns the losses."""
    _, _, x, y, feats = pair
    d.zero_grad(set_to_none=True)
    _, losses = d(x, y, feats, epoch)
    if not d.backward_done:
        sum(losses.values()).backward()
    return losses


def module_parameters(d: LAKD) -> list[list[torch.nn.Parameter]]:
    """The parameters of every local module: its segments' and its connector's."""
    return [
        [p for seg in segs for p in seg.parameters()] + list(conn.parameters())
        for segs, conn in zip(d.local.segments, d.local.connectors)
    ]


# The wrapper


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet18"])
def test_modules_reproduce_the_model(name):
    """Run end to end, the modules give the model's logits and Features.stages at their boundaries."""
    torch.manual_seed(0)
    model = models.create(name, 10).eval()
    local = LocalModules(model, [8] * (len(model.stage_channels) - 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []

    def record(outs):
        seen.extend(outs)
        return {}

    logits, losses = local(x, record, "end_to_end")
    assert losses == {}
    feats = model.features(x)
    torch.testing.assert_close(logits, feats.logits)
    assert [o.index for o in seen] == list(range(len(local.boundaries))) and [o.last for o in seen][-1]
    for out, b in zip(seen, local.boundaries):
        torch.testing.assert_close(out.feature, feats.stages[b])
        assert out.hint.shape == (2, 8, *feats.stages[b].shape[2:])
    # the model is not registered in the wrapper: only the connectors are
    assert all(k.startswith("connectors.") for k in local.state_dict())


def test_boundaries():
    model = models.create("vgg8", 10)  # stages 0..4
    assert stage_boundaries(model) == [1, 2, 3, 4]
    local = LocalModules(model, [4, 4, 4], [0, 2, 4])
    assert [len(s) for s in local.segments] == [1, 2, 3]  # [stem], [stage 1, 2], [stage 3, 4, head]
    convs = [c[0] for c in local.connectors]  # type: ignore[index]  # torch types a ModuleList's items as plain Modules
    assert [c.in_channels for c in convs] == [model.stage_channels[b] for b in (0, 2, 4)]
    bads: list[Any] = [[], [2, 1, 4], [1, 1, 4], [1, 3], [-1, 4], [1, 5], [1.0, 4], "1,4"]
    for bad in bads:
        with pytest.raises(ValueError, match="boundaries must"):
            stage_boundaries(model, bad)
    with pytest.raises(ValueError, match="one channel count per module"):
        LocalModules(model, [4, 4])
    with pytest.raises(ValueError, match="mode must be one of local, joint, end_to_end"):
        local(torch.randn(1, 3, 32, 32), lambda outs: {}, "global")
    with pytest.raises(ValueError, match="no loss for module 0"):
        local(torch.randn(1, 3, 32, 32), lambda outs: {}, "local")


def test_generic_local_loss_modes_agree():
    """The wrapper with a plain (non-LAKD) local loss: 'local' and 'joint' give equal gradients."""
    grads = {}
    for mode in ("local", "joint"):
        torch.manual_seed(0)
        model = models.create("resnet8", 10)
        local = LocalModules(model, [4, 4, 4])
        x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

        def loss_fn(outs, y=y):
            losses = {f"m{o.index}": o.hint.pow(2).mean() for o in outs}
            if outs[-1].last:
                losses["ce"] = F.cross_entropy(outs[-1].output, y)
            return losses

        _, losses = local(x, loss_fn, mode)
        if mode == "joint":
            sum(losses.values()).backward()
        grads[mode] = [grad_of(p) for p in [*model.parameters(), *local.parameters()]]
    for a, b in zip(grads["local"], grads["joint"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# The distiller


@pytest.mark.parametrize("weighting", ["none", "teacher"])
def test_local_and_joint_modes_give_equal_updates(pair, weighting):
    params = {"warmup_epochs": 4, "weighting": weighting}
    results = {}
    for mode in ("local", "joint"):
        d = make_lakd(pair, mode=mode, **params)
        assert d.backward_done == (mode == "local")
        losses = step(d, pair)
        assert all(v.requires_grad != d.backward_done for v in losses.values())
        results[mode] = (
            losses,
            {n: grad_of(p) for n, p in d.named_parameters()},
            {n: b.clone() for n, b in d.named_buffers()},
        )
    (loss_l, grad_l, buf_l), (loss_j, grad_j, buf_j) = results["local"], results["joint"]
    assert list(loss_l) == list(loss_j) == ["lakd.module1", "lakd.module2", "lakd.module3", "ce", "kd"]
    for name in loss_l:
        torch.testing.assert_close(loss_l[name], loss_j[name].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sum_losses(loss_l.values()), sum_losses(loss_j.values()).detach(), rtol=1e-6, atol=1e-7)
    assert grad_l.keys() == grad_j.keys() and len(grad_l) == len(list(make_lakd(pair).parameters()))
    for name in grad_l:
        torch.testing.assert_close(grad_l[name], grad_j[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in buf_l:  # BN statistics: the same forward
        torch.testing.assert_close(buf_l[name], buf_j[name], msg=name)


def test_no_gradient_crosses_a_module_boundary(pair):
    d = make_lakd(pair, mode="joint")
    _, _, x, y, feats = pair
    losses = d(x, y, feats, 30)[1]
    per_module = module_parameters(d)
    for m in range(len(per_module)):
        earlier = [p for k in range(m) for p in per_module[k]]
        own = per_module[m]
        names = [f"lakd.module{m + 1}"] + (["ce", "kd"] if m == len(per_module) - 1 else [])
        for name in names:
            grads = torch.autograd.grad(losses[name], earlier + own, retain_graph=True, allow_unused=True)
            # None, or exact zeros where one fused ndam_loss call covers every module
            assert all(g is None or not g.any() for g in grads[: len(earlier)]), (name, m)
            assert any(g is not None and g.abs().sum() > 0 for g in grads[len(earlier) :]), (name, m)
    # end to end (no detach) the same losses do reach the modules before them
    e2e = make_lakd(pair, mode="end_to_end")
    loss = e2e(x, y, feats, 30)[1]["ce"]
    first = module_parameters(e2e)[0]
    assert any(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(loss, first, allow_unused=True))


def test_end_to_end_has_the_same_losses(pair):
    joint = step(make_lakd(pair, mode="joint"), pair)
    e2e = step(make_lakd(pair, mode="end_to_end"), pair)
    for name in joint:
        torch.testing.assert_close(joint[name], e2e[name])


def test_losses_follow_the_formula(pair):
    teacher, _, x, y, feats = pair
    d = make_lakd(
        pair,
        mode="joint",
        alpha=0.8,
        warmup_epochs=4,
        beta=2.0,
        map_scale=500.0,
        kd_weight=0.5,
        temperature=2.0,
        ce_weight=1.5,
        grid=2,
        weighting="teacher",
    )
    losses = d(x, y, feats, 3)[1]
    alpha = 0.8 * 2 / 4
    s = d.student.features(x)  # train-mode BN: a second forward gives the same features
    stages = [s.stages[b] for b in (1, 2, 3)]
    hints = [c(f) for c, f in zip(d.local.connectors, stages)]
    terms = ref_ba.block_attention_terms(stages, hints, [feats.stages[b].clone() for b in (1, 2, 3)], 2, 1.0, 0, True)
    for m in range(3):
        expected = 2.0 * terms[m, 0] + (1 - alpha) * 500.0 * terms[m, 1]
        torch.testing.assert_close(losses[f"lakd.module{m + 1}"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["ce"], 1.5 * alpha * F.cross_entropy(s.logits, y), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["kd"], 0.5 * ref_kd.kd_loss(s.logits, feats.logits.clone(), 2.0), rtol=1e-4, atol=1e-6)
    no_kd = distillers.make_params("lakd", {"kd_weight": 0.0})
    assert isinstance(no_kd, LAKDParams)
    assert "kd" not in d.__class__(d.student, teacher, no_kd)(x, y, feats, 3)[1]


def test_alpha_schedule(pair):
    p = distillers.make_params("lakd", {"alpha": 0.8, "warmup_epochs": 4})
    assert isinstance(p, LAKDParams)
    assert [p.alpha_at(e) for e in range(1, 8)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    p = distillers.make_params("lakd", {"alpha": 0.7, "warmup_epochs": 0})
    assert isinstance(p, LAKDParams) and p.alpha_at(1) == pytest.approx(0.7)
    defaults = distillers.make_params("lakd", {})
    assert isinstance(defaults, LAKDParams)
    assert (defaults.alpha, defaults.warmup_epochs, defaults.beta, defaults.map_scale, defaults.grid, defaults.mode) == (
        0.9,
        20,
        1.0,
        1000.0,
        4,
        "local",
    )
    # epoch 1: alpha 0, so no CE and the full NDAM weight; the map weight falls as alpha rises
    d = make_lakd(pair, mode="joint", alpha=1.0, warmup_epochs=2)
    _, _, x, y, feats = pair
    assert d(x, y, feats, 1)[1]["ce"].item() == 0.0
    first, later = (d(x, y, feats, e)[1]["lakd.module1"] for e in (1, 3))
    assert later < first  # alpha 1: only the feature term is left


@pytest.mark.parametrize(
    "values, message",
    [
        ({"alpha": 1.5}, "alpha must be a number in"),
        ({"alpha": -0.1}, "alpha must be a number in"),
        ({"warmup_epochs": -1}, "warmup_epochs must be an integer"),
        ({"warmup_epochs": 2.5}, "warmup_epochs must be an integer"),
        ({"beta": -1.0}, "beta must be a finite number"),
        ({"map_scale": float("inf")}, "map_scale must be a finite number"),
        ({"kd_weight": "one"}, "kd_weight must be a finite number"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"grid": 0}, "grid must be an integer >= 1"),
        ({"weighting": "student"}, "weighting must be one of none, teacher"),
        ({"mode": "global"}, "mode must be one of local, joint, end_to_end"),
        ({"boundaries": 3}, "boundaries must be a list"),
    ],
)
def test_bad_params(values, message):
    with pytest.raises(ValueError, match=message):
        distillers.make_params("lakd", values)


def test_bad_boundaries_for_the_pair(pair):
    teacher = pair[0]  # resnet14: stages 0..3
    with pytest.raises(ValueError, match="end at the last stage 3"):
        distillers.create("lakd", models.create("resnet8", 10), teacher, {"boundaries": [1, 2]})
    with pytest.raises(ValueError, match=r"has stages 0..3, the student's modules end at \[1, 2, 3, 4\]"):
        distillers.create("lakd", models.create("vgg8", 10), teacher)


def test_loss_decreases_on_a_fixed_batch(pair):
    d = make_lakd(pair, mode="local", warmup_epochs=0)
    opt = torch.optim.SGD(d.sgd_parameters(), lr=0.02, momentum=0.9)
    totals = []
    for _ in range(6):
        losses = step(d, pair)
        opt.step()
        totals.append(sum_losses(losses.values()).item())
    assert all(torch.isfinite(torch.tensor(totals)))
    assert totals[-1] < totals[0], totals
    assert all(p.grad is None for p in pair[0].parameters())


def test_local_mode_keeps_less_memory(pair):
    """The point of the local mode: peak live tensor bytes of a step below the joint mode's."""
    peaks = {}
    for mode in ("local", "joint", "end_to_end"):
        d = make_lakd(pair, mode=mode)
        with LiveTensorBytes() as tracker:
            step(d, pair)
        peaks[mode] = tracker.peak
    assert peaks["local"] < peaks["joint"] and peaks["local"] < peaks["end_to_end"], peaks


def test_inspect_gives_ndam_maps_per_module(pair):
    _, _, x, y, feats = pair
    d = make_lakd(pair, grid=2).eval()
    maps = d.inspect(x, y, feats)
    assert list(maps) == [f"{net} module {m}" for net in ("teacher", "student") for m in (1, 2, 3)]
    assert all(m.shape == (x.shape[0], 2, 2) for m in maps.values())
    torch.testing.assert_close(maps["teacher module 2"], functional.ndam_map(feats.stages[2], 2).reshape(-1, 2, 2))
    torch.testing.assert_close(maps["student module 3"].flatten(1).norm(dim=1), torch.ones(x.shape[0]))


# Configs and engine


def test_lakd_configs_are_shipped_and_build():
    for pair_name in PAIRS:
        cfg = load_config(f"cifar100/lakd/{pair_name}", check_files=False)
        assert cfg.method.name == "lakd" and f"{cfg.model.teacher}_{cfg.model.student}" == pair_name
        assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.lr, cfg.optim.milestones) == (240, 64, 0.05, [150, 180, 210])
        teacher, student = models.create(cfg.model.teacher), models.create(cfg.model.student)
        d = distillers.create("lakd", student, teacher, cfg.method.params, image_size(cfg.data.dataset))
        assert isinstance(d, LAKD)
        assert d.params.mode == "local" and d.local.num_modules == len(student.stage_channels) - 1
    cfg = load_config("imagenet/lakd/ResNet34_ResNet18", check_files=False)
    assert (cfg.method.params["mode"], cfg.train.epochs, cfg.optim.lr) == ("joint", 100, 0.2)
    d = distillers.create("lakd", models.create(cfg.model.student), models.create(cfg.model.teacher), cfg.method.params)
    assert isinstance(d, LAKD)
    convs = [c[0] for c in d.local.connectors]  # type: ignore[index]  # torch types a ModuleList's items as plain Modules
    assert d.local.num_modules == 4 and [c.out_channels for c in convs] == [64, 128, 256, 512]


def lakd_config(out: Path, teacher_ckpt: Path, *extra: str):
    return load_config(
        "digits/kd",
        [
            "method.name=lakd",
            "model.teacher=resnet8",
            f"model.teacher_checkpoint={teacher_ckpt}",
            "method.warmup_epochs=1",
            "data.batch_size=16",
            "train.max_train_batches=3",
            "train.max_eval_batches=1",
            "train.progress=false",
            "train.epochs=2",
            f"train.out_dir={out}",
            "train.deterministic=true",
            *extra,
        ],
    )


def test_engine_runs_both_modes_alike(tmp_path, teacher_ckpt):
    rows = {}
    for mode in ("local", "joint"):
        summary = train(lakd_config(tmp_path / mode, teacher_ckpt, f"method.mode={mode}"))
        assert summary.epochs == 2
        rows[mode] = [json.loads(line) for line in (Path(summary.out_dir) / "metrics.jsonl").read_text().splitlines()]
    keys = {"loss", "loss.ce", "loss.kd", "loss.lakd.module1", "loss.lakd.module2", "loss.lakd.module3"}
    for mode, run in rows.items():
        assert keys <= set(run[0]), mode
        assert run[0]["loss.ce"] == 0.0 and run[1]["loss.ce"] > 0  # alpha ramps from 0 in epoch 1
    for a, b in zip(rows["local"], rows["joint"]):
        for key in keys | {"test.top1"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_local_mode_refuses_compile(tmp_path, teacher_ckpt):
    with pytest.raises(ConfigError, match="backward inside forward.*method.mode=joint"):
        train(lakd_config(tmp_path, teacher_ckpt, "train.compile=true"))


def test_two_process_ddp_runs_joint_mode_and_refuses_local(tmp_path, teacher_ckpt, torchrun_cli):
    sets = [
        "method.name=lakd",
        "model.teacher=resnet8",
        f"model.teacher_checkpoint={teacher_ckpt}",
        "data.batch_size=16",
        "train.max_train_batches=3",
        "train.max_eval_batches=1",
        "train.progress=false",
        "model.student=resnet8",
    ]
    for mode, port in (("joint", 29541), ("local", 29542)):
        args = ["--out-dir", str(tmp_path / mode), "--epochs", "1"]
        overrides = [arg for item in [*sets, f"method.mode={mode}"] for arg in ("--set", item)]
        proc = torchrun_cli(port, "train", "digits/kd", *args, *overrides, timeout=180)
        if mode == "joint":
            assert proc.returncode == 0, proc.stderr[-3000:]
            row = json.loads((tmp_path / mode / "metrics.jsonl").read_text().splitlines()[0])
            assert {"loss.lakd.module1", "loss.lakd.module3", "loss.kd"} <= set(row)
        else:
            assert proc.returncode != 0 and "backward inside forward" in proc.stderr, proc.stderr[-3000:]


def test_joint_mode_compiles(tmp_path, teacher_ckpt):
    """train.compile=true runs LAKD's joint mode (its fused op re-reads the teacher's features in the
    backward: the engine computes them under no_grad rather than inference_mode when compiling)."""
    eager = train(lakd_config(tmp_path / "eager", teacher_ckpt, "method.mode=joint", "train.epochs=1"))
    compiled = train(
        lakd_config(tmp_path / "compiled", teacher_ckpt, "method.mode=joint", "train.epochs=1", "train.compile=true")
    )
    rows = [json.loads((Path(s.out_dir) / "metrics.jsonl").read_text().splitlines()[0]) for s in (eager, compiled)]
    for key in ("loss", "loss.lakd.module1", "loss.lakd.module3"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-3), key
