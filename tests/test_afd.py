"""AFD and RTK distillers: attention shapes, top-r masks, RTK(r=all) == AFD, gradients, training, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _distill import sgd_totals

from kdfast import distillers, models
from kdfast.distillers.afd import AFD, RTK, RTKParams, top_r_mask
from kdfast.engine import checkpoint, load_config, train
from kdfast.engine.config import CONFIG_DIR
from kdfast.reference import map_distance as ref

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
T_BLOCKS, S_BLOCKS = 9, 3  # resnet20 -> resnet8


@pytest.fixture(scope="module")
def batch():
    """A frozen resnet20 teacher, a batch of 4 16x16 images, labels and the teacher's features."""
    torch.manual_seed(0)
    teacher = models.create("resnet20", 10).eval().requires_grad_(False)
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.tensor([0, 3, 5, 9])
    with torch.inference_mode():
        feats = teacher.features(x)
    return teacher, x, y, feats


def make(method: str, teacher, params=None, seed: int = 1):
    """A distiller around a fresh resnet8 student; the same seed gives the same parameters."""
    torch.manual_seed(seed)
    return distillers.create(method, models.create("resnet8", 10), teacher, params or {}, image_size=SIZE)


def test_attention_shape_rows_and_loss_match_reference(batch):
    teacher, x, y, feats = batch
    d = make("afd", teacher)
    _, losses = d(x, y, feats, 1)
    assert set(losses) == {"ce", "afd"}
    s = d.student.features(x)
    att = d.attention_weights(s.blocks, feats.blocks)
    assert att.shape == (4, T_BLOCKS, S_BLOCKS) and att.dtype == torch.float32 and (att >= 0).all()
    torch.testing.assert_close(att.sum(-1), torch.ones(4, T_BLOCKS))
    expected = 200 * ref.map_distance_loss(s.blocks, [f.clone() for f in feats.blocks], att)
    torch.testing.assert_close(losses["afd"], expected, rtol=1e-4, atol=1e-6)


PUBLIC = {"kd_weight": 0.9, "bilinear": True}  # AFD's public objective: CE + 0.9 KD(T=4) + 200 L_AFD, bilinear keys


def test_public_objective_step_by_step(batch):
    """CE + 0.9 KD(T=4) + 200 L_AFD with keys through the bilinear layer and the positional term inside
    the logit, written out from the distiller's own parameters (BN in training mode: batch statistics)."""
    teacher, x, y, feats = batch
    d = make("afd", teacher, PUBLIC)
    _, losses = d(x, y, feats, 1)
    assert set(losses) == {"ce", "kd", "afd"}
    s = d.student.features(x)
    a, dim = d.attention, 128

    def bn(h, layer):  # BatchNorm1d in training mode
        return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + layer.eps) * layer.weight + layer.bias

    q = torch.stack([bn(lin(f.mean((2, 3))), norm) for (lin, norm), f in zip(a.query, feats.blocks, strict=True)], 1)
    k = torch.stack([bn(lin(f.mean((2, 3))), norm).relu() for (lin, norm, _), f in zip(a.key, s.blocks, strict=True)], 1)
    lin, norm = a.bilinear
    pair = bn(lin(k.reshape(-1, dim)), norm).reshape(4, S_BLOCKS, T_BLOCKS, dim)  # K_s[t]
    logits = torch.empty(4, T_BLOCKS, S_BLOCKS)
    for t in range(T_BLOCKS):
        for j in range(S_BLOCKS):
            logits[:, t, j] = ((q[:, t] * pair[:, j, t]).sum(-1) + a.p_t[t] @ a.p_s[j]) / math.sqrt(dim)
    att = logits.softmax(-1)
    afd = torch.zeros(())
    for t, ft in enumerate(feats.blocks):
        v_t = F.normalize(ft.pow(2).mean(1).flatten(1), dim=1)
        for j, fs in enumerate(s.blocks):
            v_s = F.normalize(F.adaptive_avg_pool2d(fs.pow(2).mean(1, keepdim=True), ft.shape[2:]).flatten(1), dim=1)
            afd = afd + (att[:, t, j] * (v_s - v_t).pow(2).mean(1)).sum() / 4
    kl = F.kl_div(F.log_softmax(s.logits / 4, 1), F.softmax(feats.logits / 4, 1), reduction="batchmean") * 16
    torch.testing.assert_close(losses["afd"], 200 * afd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["kd"], 0.9 * kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["ce"], F.cross_entropy(s.logits, y))


def _loss_and_grads(d, x, y, feats):
    _, losses = d(x, y, feats, 1)
    loss = sum(losses.values())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in d.named_parameters()}


@pytest.mark.parametrize(
    "r, select", [(None, "teacher"), ("all", "student"), (S_BLOCKS, "student"), (T_BLOCKS, "teacher"), (50, "teacher")]
)
@pytest.mark.parametrize("objective", [{}, PUBLIC], ids=["ce+afd", "public"])
def test_rtk_with_every_key_is_afd_bit_for_bit(batch, r, select, objective):
    teacher, x, y, feats = batch
    afd_loss, afd_grads = _loss_and_grads(make("afd", teacher, objective), x, y, feats)
    rtk_loss, rtk_grads = _loss_and_grads(make("rtk", teacher, {"r": r, "select": select, **objective}), x, y, feats)
    assert torch.equal(afd_loss, rtk_loss)
    assert afd_grads.keys() == rtk_grads.keys()
    for name, grad in afd_grads.items():
        assert torch.equal(grad, rtk_grads[name]), name


def rtk_top_r(batch, r: int, select: str, dim: int):
    """An RTK distiller selecting by `select`, its top-r mask of the attention logits and its
    attention weights: asserted, the mask keeps r entries along `dim`, none smaller than an entry it
    drops, and the weights are positive exactly where it keeps."""
    teacher, x, _, feats = batch
    d = make("rtk", teacher, {"r": r, "select": select})
    s = d.student.features(x)
    logits = d.attention(s.blocks, feats.blocks)
    keep = top_r_mask(logits, r, select)
    assert keep is not None
    assert (keep.sum(dim) == r).all()
    kept_min = logits.masked_fill(~keep, math.inf).amin(dim)
    dropped_max = logits.masked_fill(keep, -math.inf).amax(dim)
    assert (kept_min >= dropped_max).all()
    att = d.attention_weights(s.blocks, feats.blocks)
    assert ((att > 0) == keep).all()
    return d, keep, att


@pytest.mark.parametrize("r", [1, 2])
def test_select_student_keeps_top_r_keys_per_teacher_row(batch, r):
    _, keep, att = rtk_top_r(batch, r, "student", dim=-1)
    torch.testing.assert_close(att.sum(-1), torch.ones(4, T_BLOCKS))


@pytest.mark.parametrize("r", [1, 4])
def test_select_teacher_keeps_top_r_teacher_blocks_per_student_column(batch, r):
    _, x, y, feats = batch
    d, keep, att = rtk_top_r(batch, r, "teacher", dim=1)
    rows = keep.any(-1)
    if r == 1:
        assert (~rows).any()  # at most 3 of 9 teacher rows kept: the others get zero attention, not NaN
    torch.testing.assert_close(att.sum(-1), rows.float())
    _, grads = _loss_and_grads(d, x, y, feats)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize(
    "method, params",
    [("afd", {}), ("afd", {"bilinear": True, "kd_weight": 0.9}), ("rtk", {}), ("rtk", {"r": 2, "select": "student"})],
)
def test_gradients_reach_attention_and_student_never_teacher(method, params):
    torch.manual_seed(0)
    teacher = models.create("resnet20", 10).train()  # trainable, features with grad: must still get none
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([1, 2, 3, 4])
    feats = teacher.features(x)
    d = make(method, teacher.eval(), params)
    _, losses = d(x, y, feats, 1)
    assert ("kd" in losses) == bool(params.get("kd_weight"))
    sum(losses.values()).backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    attention = d.attention
    for group in ([attention.p_t], [attention.p_s], attention.query.parameters(), attention.key.parameters()):
        assert sum(p.grad.abs().sum() for p in group) > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("method", ["afd", "rtk"])
def test_loss_decreases_on_a_fixed_batch(batch, method):
    teacher, x, y, feats = batch
    totals = sgd_totals(make(method, teacher), x, y, feats, lr=0.02)
    assert totals[-1] < totals[0]


def test_inspect_returns_attention_and_value_maps(batch):
    teacher, x, y, feats = batch
    d = make("rtk", teacher).eval()
    maps = d.inspect(x, y, feats)
    assert maps["attention"].shape == (4, T_BLOCKS, S_BLOCKS)
    torch.testing.assert_close(maps["attention"], d.attention_weights(d.student.features(x).blocks, feats.blocks))
    values = {k: v.shape for k, v in maps.items() if k != "attention"}
    assert values == {
        "teacher block 2 value": (4, 16, 16),
        "teacher block 5 value": (4, 8, 8),
        "teacher block 8 value": (4, 4, 4),
        "student block 0 value": (4, 16, 16),
        "student block 1 value": (4, 8, 8),
        "student block 2 value": (4, 4, 4),
    }
    torch.testing.assert_close(maps["teacher block 8 value"].flatten(1).norm(dim=1), torch.ones(4))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"qk_dim": 0}, "qk_dim must be an integer >= 1"),
        ({"r": 0}, "r must be an integer >= 1, 'all' or null"),
        ({"r": "some"}, "r must be an integer"),
        ({"r": True}, "r must be an integer"),
        ({"select": "both"}, "select must be one of teacher, student"),
        ({"pool": "max"}, "pool must be one of map, feature"),
        ({"bilinear": "yes"}, "bilinear must be true or false"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"k": 3}, "unknown key.*'rtk': k"),
    ],
)
def test_bad_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        distillers.make_params("rtk", params)


def test_afd_has_no_r():
    with pytest.raises(ValueError, match="unknown key.*'afd': r"):
        distillers.make_params("afd", {"r": 2})
    params = distillers.make_params("rtk", {"r": "all"})
    assert isinstance(params, RTKParams) and params.r is None


SHIPPED = sorted(str(p.relative_to(CONFIG_DIR)) for m in ("afd", "rtk") for p in (CONFIG_DIR / "cifar100" / m).glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_builds(name):
    cfg = load_config(name, check_files=False)
    teacher = models.create(cfg.model.teacher, 100, dataset="cifar100").eval()
    d = distillers.create(cfg.method.name, models.create(cfg.model.student, 100, dataset="cifar100"), teacher, cfg.method.params)
    assert isinstance(d, AFD)
    t, s = len(d.attention.query), len(d.attention.key)
    assert (d.params.afd_weight, d.params.qk_dim, d.attention.p_t.shape, d.attention.p_s.shape) == (
        200.0,
        128,
        (t, 128),
        (s, 128),
    )
    assert (d.params.ce_weight, d.params.kd_weight, d.params.temperature, d.params.bilinear) == (1.0, 0.9, 4.0, True)
    if cfg.method.name == "rtk":
        assert isinstance(d, RTK)
        assert (d.params.r, d.params.select) == (math.ceil(t / s), "teacher")


@pytest.mark.parametrize("method", ["afd", "rtk"])
def test_short_engine_run(tmp_path, method):
    torch.manual_seed(1)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": models.create("resnet8", 10).state_dict()}, ckpt)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"base: {CONFIG_DIR / 'digits/base.yaml'}\nmodel:\n  student: resnet8\n  teacher: resnet8\n"
        f"  teacher_checkpoint: {ckpt}\nmethod:\n  name: {method}\n"
    )
    out = tmp_path / "run"
    overrides = [
        "data.batch_size=8",
        "train.epochs=1",
        "train.max_train_batches=2",
        "train.max_eval_batches=1",
        "train.progress=false",
        f"train.out_dir={out}",
    ] + (["method.r=1"] if method == "rtk" else [])
    train(load_config(config, overrides))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row[f"loss.{method}"]) and row[f"loss.{method}"] > 0
    assert any(k.startswith("attention.") for k in checkpoint.load(out / "last.pt")["distiller"])
