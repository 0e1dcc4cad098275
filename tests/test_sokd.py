"""SoKD around FitNet, AT and LCC: DAFA (ops, Gumbel / straight-through gradients, own Adam, eval
identity, state_dict), DAM (peaks, boxes, mask), losses, training steps, configs, engine resume."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from kdfast import distillers, functional, models
from kdfast.distillers.sokd.dafa import DAFA, OPS, apply_op
from kdfast.distillers.sokd.dam import DAMHead, box_mask, mutual_interest_mask, peak_boxes
from kdfast.engine import checkpoint, load_config, train
from kdfast.engine.trainer import image_size

BASES = ("fitnet", "at", "lcc")


pytestmark = pytest.mark.usefixtures("one_thread")


def _sokd(pair, base: str, **params) -> distillers.SoKD:
    teacher, *_ = pair
    torch.manual_seed(0)
    return distillers.create("sokd", models.create("resnet8", 10), teacher, {"base": base, **params})


def _dafa_params(d) -> list[torch.Tensor]:
    return [p.detach().clone() for p in d.dafa.parameters()]


# DAFA


@pytest.mark.parametrize("name", OPS)
def test_op_at_zero_magnitude_is_identity(name):
    torch.manual_seed(0)
    f = torch.randn(3, 6, 5, 7)
    torch.testing.assert_close(apply_op(f, name, torch.tensor(0.0), 1.0), f, atol=1e-6, rtol=0)


def test_ops_at_full_magnitude():
    torch.manual_seed(0)
    f = torch.randn(4, 8, 8, 8)
    drop = apply_op(f, "channel_drop", torch.tensor(1.0), 0.5)
    dropped = (drop == 0).flatten(2).all(2)
    assert dropped.sum(1).tolist() == [4] * 4
    torch.testing.assert_close(drop[~dropped], f[~dropped])
    shuffled = apply_op(f, "channel_shuffle", torch.tensor(1.0), 0.5)
    for b in range(4):  # a permutation of the channels, about half of them moved
        moved = [c for c in range(8) if not torch.equal(shuffled[b, c], f[b, c])]
        assert len(moved) <= 4
        assert sorted(shuffled[b].flatten(1).sum(1).tolist()) == pytest.approx(sorted(f[b].flatten(1).sum(1).tolist()))
    cut = apply_op(torch.ones(4, 2, 8, 8), "cutout", torch.tensor(1.0), 0.5)
    zeros = (cut == 0).all(1).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 16)).all()  # a 4x4 square, clipped at the border
    shifted = apply_op(f, "translate_x", torch.tensor(1.0), 0.5)  # half the width: 4 columns
    for b in range(4):
        left, right = shifted[b, :, :, 4:], shifted[b, :, :, :4]
        assert torch.allclose(left, f[b, :, :, :4], atol=1e-5) or torch.allclose(right, f[b, :, :, 4:], atol=1e-5)


def test_magnitude_is_straight_through():
    f = torch.randn(2, 4, 6, 6)
    m = torch.tensor(0.5, requires_grad=True)
    apply_op(f, "channel_drop", m, 0.5).sum().backward()
    assert m.grad.item() == pytest.approx(f.numel())


def test_gumbel_straight_through_gives_every_mixture_logit_a_gradient():
    torch.manual_seed(0)
    dafa = DAFA(ops=("rotate", "noise", "channel_drop"))
    assert dafa.sub_policies == [("rotate", "noise"), ("rotate", "channel_drop"), ("noise", "channel_drop")]
    f = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = dafa(f)
    (out * torch.randn_like(out)).sum().backward()
    assert (dafa.mixture_logits.grad != 0).all()  # softmax in the backward: every logit
    drawn = dafa.magnitude_logits.grad.abs().sum(1) != 0  # only the drawn sub-policy's op parameters
    assert drawn.sum() == 1 and (dafa.probability_logits.grad.abs().sum(1) != 0).equal(drawn)
    assert f.grad is not None


def test_dafa_eval_mode_is_identity():
    dafa = DAFA().eval()
    f = torch.randn(2, 4, 6, 6)
    assert dafa(f) is f


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ops": ["rotate"]}, "at least 2 distinct ops"),
        ({"ops": ["rotate", "zoom"]}, "unknown DAFA op.*zoom"),
        ({"op_ranges": {"zoom": 1.0}}, "unknown DAFA op.*zoom"),
        ({"gumbel_temperature": 0.0}, "gumbel_temperature must be a number > 0"),
    ],
)
def test_dafa_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DAFA(**kwargs)


# DAM


def _head_output(h: int, w: int, peaks: dict[tuple[int, int], tuple[float, float, float, float, float]]) -> torch.Tensor:
    out = torch.zeros(1, 5, h, w)
    for (y, x), values in peaks.items():
        out[0, :, y, x] = torch.tensor(values)
    return out


def test_peaks_nms_and_boxes():
    # (heat, size w, size h, offset x, offset y); (2, 3) is suppressed by its larger neighbour (2, 2)
    out = _head_output(8, 8, {(2, 2): (0.9, 0.25, 0.5, 0.5, 0.5), (2, 3): (0.8, 1, 1, 0, 0), (6, 6): (0.5, 0.0, 0.0, 0.25, 0.75)})
    boxes = peak_boxes(out, 2)
    torch.testing.assert_close(boxes[0], torch.tensor([[1.5, 0.5, 3.5, 4.5], [6.25, 6.75, 6.25, 6.75]]))
    mask = box_mask(boxes, 8, 8)
    expected = torch.zeros(1, 8, 8)
    expected[0, 0:5, 1:4] = 1  # cells overlapping [1.5, 3.5] x [0.5, 4.5]
    expected[0, 6, 6] = 1  # a zero-size box still marks its peak's cell
    torch.testing.assert_close(mask, expected)


def test_mask_is_binary_without_grad_and_the_union_of_k_boxes():
    torch.manual_seed(0)
    head = DAMHead(6, width=8)
    out_s, out_t = head(torch.randn(3, 6, 7, 9)), head(torch.randn(3, 6, 7, 9))
    mask = mutual_interest_mask(out_s, out_t, k=4)
    assert mask.shape == (3, 7, 9) and not mask.requires_grad
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and (mask.flatten(1).sum(1) >= 1).all()
    boxes = peak_boxes(((out_s + out_t) / 2).detach(), 4)
    assert boxes.shape == (3, 4, 4)
    for b in range(3):  # the union, cell by cell
        for y in range(7):
            for x in range(9):
                inside = any(x < x1 and x + 1 > x0 and y < y1 and y + 1 > y0 for x0, y0, x1, y1 in boxes[b].tolist())
                assert mask[b, y, x].item() == float(inside)
    torch.testing.assert_close(
        mutual_interest_mask(out_s, out_t, k=4, peaks_from="teacher"), box_mask(peak_boxes(out_t.detach(), 4), 7, 9)
    )
    assert mutual_interest_mask(out_s, out_t, k=1000).flatten(1).sum(1).tolist() == [63.0] * 3  # k > H*W: every cell


# Params


def test_registry_and_defaults():
    assert "sokd" in distillers.names() and distillers.get("sokd") is distillers.SoKD
    p = distillers.make_params("sokd", {})
    assert (p.base, p.d_weight, p.da_weight, p.aug_lr, p.aug_epochs, p.top_k, p.gumbel_temperature) == (
        "fitnet",
        1000.0,
        1000.0,
        3e-4,
        50,
        8,
        0.5,
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"base": "kd"}, "SoKD base must be one of fitnet, at, lcc"),
        ({"base_params": [1]}, "base_params must be a mapping"),
        ({"base_params": {"feat_weight": 1.0}}, "must not set feat_weight"),
        ({"base": "lcc", "base_params": {"ce_weight": 1.0}}, "must not set ce_weight"),
        ({"base_params": {"hint": 1}}, "unknown key.*'fitnet': hint"),
        ({"base": "lcc", "base_params": {"grid": 0}}, "grid must be an integer >= 1"),
        ({"stage": 2}, "stage is only for the AT base"),
        ({"base": "at", "stage": 1.5}, "stage is only for the AT base"),
        ({"da_reduction": "max"}, "da_reduction must be one of"),
        ({"peaks_from": "both"}, "peaks_from must be one of"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"aug_epochs": -1}, "aug_epochs must be an integer >= 0"),
        ({"aug_betas": [0.9]}, "aug_betas must be two numbers"),
        ({"d_weight": float("nan")}, "d_weight must be a finite number"),
    ],
)
def test_bad_params(values, message):
    with pytest.raises((ValueError, TypeError), match=message):
        distillers.make_params("sokd", values)


def test_bad_stages(pair):
    teacher, student, *_ = pair
    with pytest.raises(ValueError, match="stages must hold one index"):
        distillers.create("sokd", student, teacher, {"base": "lcc", "base_params": {"stages": [1, 2]}})
    with pytest.raises(ValueError, match="hint stage 7 out of range"):
        distillers.create("sokd", student, teacher, {"base": "at", "stage": 7})


# Losses


def test_fitnet_losses_follow_the_formulas(pair):
    teacher, _, x, y, feats = pair
    d = _sokd(pair, "fitnet", ce_weight=0.5, d_weight=2.0, da_weight=3.0).eval()  # eval: s(ft) = ft
    _, losses = d(x, y, feats, 1)
    assert set(losses) == {"ce", "sokd_d", "sokd_da"}
    s = d.student.features(x)
    hint, ft = d.base.connector(s.stages[2]), feats.stages[2].clone()
    out_s, out_t = d.dam(hint), d.dam(ft)
    mask = mutual_interest_mask(out_s, out_t)
    torch.testing.assert_close(losses["ce"], 0.5 * torch.nn.functional.cross_entropy(s.logits, y))
    torch.testing.assert_close(losses["sokd_d"], 2.0 * ((out_s - out_t) ** 2).mean())
    torch.testing.assert_close(losses["sokd_da"], 3.0 * ((mask[:, None] * (hint - ft)) ** 2).mean())
    assert d.dam.trunk[0].in_channels == teacher.stage_channels[2]


def test_at_and_lcc_losses(pair):
    _, _, x, y, feats = pair
    d = _sokd(pair, "at", stage=2, base_params={"p": 2.0, "mode": "code"}).eval()
    _, losses = d(x, y, feats, 1)
    s = d.student.features(x)
    ft = feats.stages[2].clone()
    mask = mutual_interest_mask(d.dam(s.stages[2]), d.dam(ft))
    maps = [functional.attention_map(f).view(8, 1, 16, 16) for f in (s.stages[2], ft)]
    torch.testing.assert_close(losses["sokd_da"], 1000 * ((mask[:, None] * (maps[0] - maps[1])) ** 2).mean())
    assert d.dam_connector is None  # resnet8 and resnet14 share their stage shapes: phi is the identity
    d = _sokd(pair, "lcc").eval()  # LCC's defaults: attention on, KD kept
    _, losses = d(x, y, feats, 1)
    assert set(losses) == {"ce", "kd", "lcc_attention", "sokd_d", "sokd_da"}
    s = d.student.features(x)
    ft = feats.stages[-1].clone()
    mask = mutual_interest_mask(d.dam(s.stages[-1]), d.dam(ft))
    class_mask, _ = d.base.attention[0](ft, y)
    expected = functional.local_correlation_loss(s.stages[-1], ft, 4, mask=mask[:, None] * class_mask, backend="torch")
    torch.testing.assert_close(losses["sokd_da"], 1000 * expected, rtol=1e-4, atol=1e-5)


# Training


@pytest.mark.parametrize("base", BASES)
def test_each_base_trains_with_decreasing_loss(pair, base):
    teacher, _, x, y, feats = pair
    d = _sokd(pair, base, base_params={"attention": False} if base == "lcc" else {})
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(d.sgd_parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(6):
        torch.manual_seed(1)  # the same augmentation draws every step
        _, losses = d(x, y, feats, 1)
        loss = sum(losses.values())
        assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d.after_step(1)
        totals.append(loss.item())
    assert totals[-1] < totals[0], totals
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())


def test_dafa_stepped_by_its_adam_only_while_epoch_le_aug_epochs(pair):
    _, _, x, y, feats = pair
    d = _sokd(pair, "fitnet", aug_epochs=1)
    own = {id(p) for p in d.dafa.parameters()}
    sgd = d.sgd_parameters()
    assert not own & {id(p) for p in sgd} and len(sgd) + len(own) == len(list(d.parameters()))
    opt = torch.optim.SGD(sgd, lr=0.01)
    for epoch, trained in ((1, True), (2, False)):
        before = _dafa_params(d)
        _, losses = d(x, y, feats, epoch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        assert all(p.grad is not None for p in d.dafa.parameters()) and d.dafa.mixture_logits.grad.abs().sum() > 0
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, _dafa_params(d)))  # SGD leaves them alone
        d.after_step(epoch)
        changed = [not torch.equal(a, b) for a, b in zip(before, _dafa_params(d))]
        assert all(changed) if trained else not any(changed)
        assert all(p.grad is None for p in d.dafa.parameters())
    assert d.dafa.optimizer.state[d.dafa.mixture_logits]["step"].item() == 1


def test_state_dict_roundtrip_restores_adam(pair):
    _, _, x, y, feats = pair
    d = _sokd(pair, "at")
    for _ in range(2):
        _, losses = d(x, y, feats, 1)
        sum(losses.values()).backward()
        d.after_step(1)
    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    buffer.seek(0)
    restored = _sokd(pair, "at")
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    for p, q in zip(d.dafa.parameters(), restored.dafa.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key, value in d.dafa.optimizer.state[p].items():
            torch.testing.assert_close(value, restored.dafa.optimizer.state[q][key], rtol=0, atol=0)
    for net in (d, restored):  # one more identical step: the same parameters
        torch.manual_seed(3)
        _, losses = net(x, y, feats, 1)
        sum(losses.values()).backward()
        net.after_step(1)
    for p, q in zip(d.dafa.parameters(), restored.dafa.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_inspect_returns_mask_and_heatmaps(pair):
    _, _, x, y, feats = pair
    maps = _sokd(pair, "fitnet").eval().inspect(x, y, feats)
    assert set(maps) == {"mutual interest M", "student heatmap", "teacher heatmap"}
    assert all(m.shape == (8, 16, 16) and not m.requires_grad for m in maps.values())
    assert set(maps["mutual interest M"].unique().tolist()) <= {0.0, 1.0}


# Configs and engine


@pytest.mark.parametrize("base", BASES)
def test_configs_are_shipped_and_build(base):
    cfg = load_config(f"cifar100/sokd/{base}_resnet32x4_resnet8x4", check_files=False)
    assert cfg.method.name == "sokd" and cfg.method.params["base"] == base
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.lr) == (240, 64, 0.05)
    assert (cfg.method.params["d_weight"], cfg.method.params["da_weight"], cfg.method.params["aug_epochs"]) == (
        1000.0,
        1000.0,
        50,
    )
    d = distillers.create(
        "sokd",
        models.create(cfg.model.student, 100),
        models.create(cfg.model.teacher, 100),
        cfg.method.params,
        image_size(cfg.data.dataset),
    )
    assert d.base.__class__.__name__.lower() == base


def _engine_config(out: Path, teacher_ckpt: Path, epochs: int, base: str = "fitnet"):
    return load_config(
        "digits/student",
        [
            "method.name=sokd",
            f"method.base={base}",
            "method.aug_epochs=2",
            "model.teacher=resnet8",
            f"model.teacher_checkpoint={teacher_ckpt}",
            "data.batch_size=16",
            "train.max_train_batches=2",
            "train.max_eval_batches=1",
            "train.progress=false",
            "train.deterministic=true",
            f"train.epochs={epochs}",
            f"train.out_dir={out}",
        ],
    )


def test_engine_resume_is_exact(tmp_path):
    torch.manual_seed(1)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": models.create("resnet8", 10).state_dict()}, ckpt)
    train(_engine_config(tmp_path / "full", ckpt, 2))
    train(_engine_config(tmp_path / "split", ckpt, 1))
    train(_engine_config(tmp_path / "split", ckpt, 2), resume=True)
    row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss.ce", "loss.sokd_d", "loss.sokd_da"} <= set(row)
    a, b = (checkpoint.load(tmp_path / run / "last.pt")["distiller"] for run in ("full", "split"))
    assert a.keys() == b.keys() and "dafa._extra_state" in a
    for key, value in a.items():
        if key != "dafa._extra_state":
            assert torch.equal(value, b[key]), key
    adam_a, adam_b = a["dafa._extra_state"]["optimizer"]["state"], b["dafa._extra_state"]["optimizer"]["state"]
    assert adam_a[0]["step"].item() == 4  # 2 epochs x 2 batches, all within aug_epochs
    for index, state in adam_a.items():
        for key, value in state.items():
            assert torch.equal(value, adam_b[index][key]), (index, key)


@pytest.mark.parametrize("base", ["at", "lcc"])
def test_engine_runs_every_base(tmp_path, base):
    torch.manual_seed(1)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": models.create("resnet8", 10).state_dict()}, ckpt)
    summary = train(_engine_config(tmp_path / base, ckpt, 1, base))
    row = json.loads((Path(summary.out_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss.ce", "loss.sokd_d", "loss.sokd_da"} <= set(row)
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss"))
