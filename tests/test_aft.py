"""AFT-KD: parameters, losses against the reference, adaptive loss-rate weights (exact values,
resume, 2-process gloo), a short engine run, the shipped configs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _distill import assert_gradients_reach_student_only

from kdfast import distillers, models
from kdfast.distillers.adaptive import LossRateWeights
from kdfast.distillers.aft import AFT, AFTParams
from kdfast.engine import checkpoint, load_config, train
from kdfast.reference import block_attention as ref

PAIRS = ("resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "resnet56_resnet20", "vgg13_vgg8")
TINY = [
    "data.batch_size=16",
    "train.max_train_batches=3",
    "train.max_eval_batches=1",
    "train.progress=false",
    "train.deterministic=true",
    "model.student=resnet8",
    "model.teacher=resnet8",
    "method.name=aft",
    "method.kd_weight=0.0",
    "optim.milestones=[5]",
]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- LossRateWeights ---------------------------------------------------------------------------


def feed(rates: LossRateWeights, epochs: dict[int, list[tuple[list[float], int]]]) -> dict[int, torch.Tensor]:
    """Feed (losses, samples) batches per epoch; the weights returned by each epoch's first batch."""
    seen: dict[int, torch.Tensor] = {}
    for epoch, batches in epochs.items():
        for losses, samples in batches:
            w = rates(torch.tensor(losses, dtype=torch.float64), epoch, samples)
            seen.setdefault(epoch, w)
            assert torch.equal(w, seen[epoch])
    return seen


SEQUENCE = {
    1: [([4.0, 2.0], 2), ([1.0, 8.0], 6)],  # sample-weighted means (1.75, 6.5)
    2: [([1.5, 5.2], 4)],  # (1.5, 5.2)
    3: [([0.6, 5.0], 1), ([0.9, 5.0], 2)],  # (0.8, 5.0)
    4: [([0.1, 0.1], 3)],
}


def expected_weights(old: tuple[float, float], new: tuple[float, float], tau: float = 2.0) -> list[float]:
    r = [n / o for n, o in zip(new, old)]
    z = [math.exp(x / tau) for x in r]
    return [2 * e / sum(z) for e in z]


def test_loss_rate_weights_exact_values():
    rates = LossRateWeights(2, tau=2.0)
    seen = feed(rates, SEQUENCE)
    assert seen[1].tolist() == seen[2].tolist() == [1.0, 1.0]  # w = 1 in epochs 1 and 2
    torch.testing.assert_close(seen[3].double(), torch.tensor(expected_weights((1.75, 6.5), (1.5, 5.2)), dtype=torch.float64))
    torch.testing.assert_close(
        rates.weights, torch.tensor(expected_weights((1.5, 5.2), (0.8, 5.0)), dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert float(rates.weights.sum()) == pytest.approx(2.0, rel=1e-12)
    assert rates(torch.ones(2), 4).dtype == torch.float32  # the losses' dtype
    torch.testing.assert_close(rates.epoch_means, torch.tensor([[1.5, 5.2], [0.8, 5.0]], dtype=torch.float64))
    # the slower loss (rate 1 vs 0.5) gets the larger weight
    assert rates.weights[1] > rates.weights[0]


@pytest.mark.parametrize("split", [(1, 1), (2, 0), (3, 1)])
def test_loss_rate_weights_resume_is_exact(split):
    """A state saved after `split` = (epoch, batches of it) and loaded into a fresh module continues
    with exactly the weights of the uninterrupted sequence."""
    full = feed(LossRateWeights(2), SEQUENCE)
    epoch, batches = split
    first = {e: b for e, b in SEQUENCE.items() if e < epoch} | {epoch: SEQUENCE[epoch][:batches]}
    rest = {epoch: SEQUENCE[epoch][batches:]} | {e: b for e, b in SEQUENCE.items() if e > epoch}
    owner = torch.nn.Module()
    owner.rates = LossRateWeights(2)
    feed(owner.rates, {e: b for e, b in first.items() if b})
    state = owner.state_dict()
    assert set(state) == {"rates._extra_state"}
    restored = torch.nn.Module()
    restored.rates = LossRateWeights(2)
    restored.load_state_dict(state)
    seen = feed(restored.rates, {e: b for e, b in rest.items() if b})
    for e, w in seen.items():
        assert torch.equal(w, full[e]), e


def test_loss_rate_weights_errors():
    rates = LossRateWeights(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        rates(torch.ones(2), 1)
    with pytest.raises(ValueError, match="epoch must be >= 1"):
        rates(torch.ones(3), 0)
    rates(torch.ones(3), 2)
    with pytest.raises(ValueError, match="epoch must be >= 2"):
        rates(torch.ones(3), 1)
    with pytest.raises(ValueError, match="tau must be > 0"):
        LossRateWeights(3, tau=0.0)
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        LossRateWeights(0)


def _ddp_worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        rates = LossRateWeights(2)
        # batch k of every epoch on rank k; a rank with no batch left feeds an empty one (0 samples)
        feed(rates, {e: [b[rank] if rank < len(b) else ([0.0, 0.0], 0)] for e, b in SEQUENCE.items()})
        torch.save(rates.weights, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_loss_rate_weights_average_over_processes(tmp_path):
    """Two gloo processes, each with part of every epoch's batches, get the weights of the whole."""
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2)
    weights = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    assert torch.equal(weights[0], weights[1])
    torch.testing.assert_close(
        weights[0], torch.tensor(expected_weights((1.5, 5.2), (0.8, 5.0)), dtype=torch.float64), rtol=1e-12, atol=1e-12
    )


# ---- the distiller -----------------------------------------------------------------------------


def test_params_defaults_and_errors():
    p = distillers.make_params("aft", {})
    assert isinstance(p, AFTParams)
    assert (
        p.ce_weight,
        p.kd_weight,
        p.grid,
        p.attention_weight,
        p.feature_weight,
        p.tau,
        p.stages,
        p.adaptive,
        p.connector_bn,
    ) == (1.0, 0.0, 4, 1000.0, 1.0, 2.0, None, True, False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"grid": 0}, "grid must be"),
        ({"stages": []}, "stages must be"),
        ({"stages": [1.5]}, "stages must be"),
        ({"tau": -1.0}, "tau must be"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            AFTParams(**bad)
    with pytest.raises(ValueError, match="unknown key.*alpha"):
        distillers.make_params("aft", {"alpha": 1})


def test_stages_and_connectors(pair):
    teacher, student, *_ = pair
    d = distillers.create("aft", student, teacher)
    assert isinstance(d, AFT)
    assert d.stage_indices == [1, 2, 3]  # every stage after the stem
    convs = [c[0] for c in d.connectors]  # type: ignore[index]  # torch types a ModuleList's items as plain Modules
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (s, t, (1, 1)) for s, t in zip(student.stage_channels[1:], teacher.stage_channels[1:])
    ]
    d = distillers.create("aft", student, teacher, {"stages": [-1, 1], "connector_bn": True, "adaptive": False})
    assert isinstance(d, AFT)
    bn = d.connectors[0][1]  # type: ignore[index]  # torch types a ModuleList's items as plain Modules
    assert d.stage_indices == [3, 1] and isinstance(bn, torch.nn.BatchNorm2d) and d.stage_weights is None
    with pytest.raises(ValueError, match="out of range"):
        distillers.create("aft", student, teacher, {"stages": [4]})
    with pytest.raises(ValueError, match="distinct stages"):
        distillers.create("aft", student, teacher, {"stages": [3, -1]})


@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_losses_match_reference(pair, kd_weight):
    teacher, student, x, y, feats = pair
    d = distillers.create("aft", student, teacher, {"kd_weight": kd_weight})
    assert isinstance(d, AFT)
    _, losses = d(x, y, feats, 1)
    assert sorted(losses) == sorted(["ce", "aft_stage1", "aft_stage2", "aft_stage3"] + (["kd"] if kd_weight else []))
    s = student.features(x)
    f_s = s.stages[1:]
    h_s = [c(f) for c, f in zip(d.connectors, f_s)]
    terms = ref.block_attention_terms(f_s, h_s, [f.clone() for f in feats.stages[1:]], grid=4, power=2.0, feature_grid=4)
    expected = terms[:, 0] + 1000.0 * terms[:, 1]  # w = 1 in epoch 1
    for i, value in enumerate(expected, start=1):
        torch.testing.assert_close(losses[f"aft_stage{i}"], value, rtol=1e-4, atol=1e-6)
    assert_gradients_reach_student_only(d, losses, teacher)


def test_loss_decreases_on_a_fixed_batch(pair):
    teacher, _, x, y, feats = pair
    torch.manual_seed(0)
    d = distillers.create("aft", models.create("resnet8", 10), teacher, {"adaptive": False})
    optimizer = torch.optim.SGD(d.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(6):
        optimizer.zero_grad()
        _, losses = d(x, y, feats, 1)
        distill = sum(v for k, v in losses.items() if k.startswith("aft_stage"))
        (distill + losses["ce"]).backward()
        optimizer.step()
        history.append(distill.item())
    assert history[-1] < 0.7 * history[0], history


def test_inspect_maps(pair):
    teacher, student, x, y, feats = pair
    maps = distillers.create("aft", student, teacher).inspect(x, y, feats)
    assert len(maps) == 9 and all(m.shape == (8, 4, 4) for m in maps.values())
    torch.testing.assert_close(maps["stage 1 teacher attention"].flatten(1).norm(dim=1), torch.ones(8))


# ---- engine and configs ------------------------------------------------------------------------


def _config(out: Path, teacher_ckpt: Path, epochs: int):
    return load_config(
        "digits/kd", [*TINY, f"train.epochs={epochs}", f"train.out_dir={out}", f"model.teacher_checkpoint={teacher_ckpt}"]
    )


def _weights_state(path: Path) -> dict:
    return checkpoint.load(path)["distiller"]["stage_weights._extra_state"]


def test_engine_run_weights_change_after_epoch_two_and_resume(tmp_path, teacher_ckpt):
    train(_config(tmp_path / "full", teacher_ckpt, 3))
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    stages = [f"loss.aft_stage{i}" for i in (1, 2, 3)]
    assert all(set(stages) <= set(row) for row in rows)
    state = _weights_state(tmp_path / "full" / "last.pt")
    assert state["epoch"] == 3
    # the closed means are the logged per-stage epoch means of epochs 1 and 2 (weights 1 there)
    torch.testing.assert_close(
        state["means"], torch.tensor([[r[k] for k in stages] for r in rows[:2]], dtype=torch.float64), rtol=1e-9, atol=0.0
    )
    d = distillers.create("aft", models.create("resnet8", 10), models.create("resnet8", 10))
    assert isinstance(d, AFT) and d.stage_weights is not None
    d.stage_weights.set_extra_state(state)
    weights = d.stage_weights.weights
    assert not torch.equal(weights, torch.ones(3)) and float(weights.sum()) == pytest.approx(3.0)
    torch.testing.assert_close(weights, 3 * torch.softmax(state["means"][1] / state["means"][0] / 2.0, 0))
    # interrupted after epoch 2 and resumed: the same adaptive state, the same model
    train(_config(tmp_path / "split", teacher_ckpt, 2))
    train(_config(tmp_path / "split", teacher_ckpt, 3), resume=True)
    a, b = (checkpoint.load(tmp_path / run / "last.pt")["distiller"] for run in ("full", "split"))
    for key, value in a.items():
        if key.endswith("_extra_state"):
            assert value["epoch"] == b[key]["epoch"] and torch.equal(value["means"], b[key]["means"])
            assert torch.equal(value["sums"], b[key]["sums"])
        else:
            assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("pair_name", PAIRS)
def test_shipped_config_builds(pair_name):
    cfg = load_config(f"cifar100/aft/{pair_name}.yaml", check_files=False)
    assert cfg.method.name == "aft" and (cfg.train.epochs, cfg.optim.lr) == (240, 0.05)
    torch.manual_seed(0)
    teacher = models.create(cfg.model.teacher, 100).eval().requires_grad_(False)
    student = models.create(cfg.model.student, 100)
    d = distillers.create("aft", student, teacher, cfg.method.params)
    assert isinstance(d, AFT) and d.stage_indices == list(range(1, len(teacher.stage_channels)))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 97])
    with torch.inference_mode():
        feats = teacher.features(x)
    _, losses = d(x, y, feats, 1)
    assert len(losses) == 1 + len(d.stage_indices) and all(torch.isfinite(v) for v in losses.values())
