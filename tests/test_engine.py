"""Engine: configs, checkpoints, exact resume, outputs, 2-process gloo DDP, real CIFAR-10 check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, exact_config, set_args

from kdfast import models
from kdfast.engine import ConfigError, checkpoint, load_config, train
from kdfast.engine.config import CONFIG_DIR

CIFAR_ROOT = Path("/work/shared/data")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml") if p.name != "base.yaml")


def test_every_pair_and_method_is_shipped():
    names = set(shipped_configs())
    for pair in ("resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "resnet56_resnet20", "vgg13_vgg8"):
        for method in ("kd", "at", "fitnet", "sp", "rkd", "dkd", "lcc"):
            assert f"cifar100/{method}/{pair}.yaml" in names
    assert {f"imagenet/{m}/ResNet34_ResNet18.yaml" for m in ("kd", "at", "dkd", "lcc")} <= names


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_is_valid(name):
    cfg = load_config(name, check_files=False)
    if name.startswith("cifar100/") and not name.startswith("cifar100/sokd/epoch480/"):  # SoKD code's 480-epoch recipe: test_sokd
        lr = 0.01 if cfg.model.student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05  # the peers' rates
        assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.lr, cfg.optim.milestones) == (240, 64, lr, [150, 180, 210])
    if name.startswith("imagenet/"):
        assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.milestones) == (100, 0.2, 1e-4, [30, 60, 90])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=2", "unknown key.*'train': epoch"),
        ("trian.epochs=2", "unknown section.*trian"),
        ("method.name=nope", "unknown method 'nope'"),
        ("model.student=nope", "unknown model.student 'nope'"),
        ("model.student=ResNet34", "unknown model.student 'ResNet34' for dataset 'digits'"),
        ("method.tau=2", "unknown key.*method 'kd': tau"),
        ("data.dataset=cifar10", "needs data.root"),
        ("data.root=/nonexistent", None),
        ("epochs=2", "bad override"),
    ],
)
def test_bad_config_names_the_problem(override, message, teacher_ckpt):
    overrides = [f"model.teacher_checkpoint={teacher_ckpt}", override]
    if message is None:
        overrides.append("data.dataset=cifar10")
        message = "data.root '/nonexistent' is not a folder"
    with pytest.raises(ConfigError, match=message):
        load_config("digits/kd", overrides)


def test_missing_teacher_checkpoint():
    with pytest.raises(ConfigError, match="teacher checkpoint '/nope.pt' not found"):
        load_config("digits/kd", ["model.teacher_checkpoint=/nope.pt"])


def test_overrides_parse_yaml_values(tmp_path, teacher_ckpt):
    (tmp_path / "c.yaml").write_text(f"base: {CONFIG_DIR / 'digits/kd.yaml'}\noptim:\n  lr: 0.1\n")
    cfg = load_config(
        tmp_path / "c.yaml", ["optim.milestones=[1, 2]", "method.temperature=2", f"model.teacher_checkpoint={teacher_ckpt}"]
    )
    assert (cfg.optim.lr, cfg.optim.milestones, cfg.method.params["temperature"], cfg.model.teacher) == (
        0.1,
        [1, 2],
        2,
        "resnet14",
    )


def test_atomic_save_and_rng_roundtrip(tmp_path):
    checkpoint.save_atomic({"a": 1}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    state = checkpoint.rng_state()
    first = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(first, torch.rand(3))


def test_resume_equals_uninterrupted_run(tmp_path, teacher_ckpt):
    full = train(exact_config("digits/kd", tmp_path / "full", teacher_ckpt, 4))
    train(exact_config("digits/kd", tmp_path / "split", teacher_ckpt, 2))
    resumed = train(exact_config("digits/kd", tmp_path / "split", teacher_ckpt, 4), resume=True)
    a, b = (checkpoint.load(tmp_path / run / "last.pt") for run in ("full", "split"))
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["distiller"].items():
        assert torch.equal(value, b["distiller"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["loader"] == b["loader"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s")} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert (full.best_top1, full.last_top1) == (resumed.best_top1, resumed.last_top1)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_compiled_step_trains_like_eager(tmp_path, teacher_ckpt):
    """train.compile=true (torch.compile of the step, fused kernels inside) gives the eager run's losses."""
    eager = exact_config("digits/kd", tmp_path / "eager", teacher_ckpt, 1)
    compiled = exact_config("digits/kd", tmp_path / "compiled", teacher_ckpt, 1, "train.compile=true")
    rows = []
    for cfg in (eager, compiled):
        train(cfg)
        rows.append(json.loads((Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()[0]))
    for key in ("loss", "loss.ce", "loss.kd"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-3), key


def test_run_outputs(tmp_path, teacher_ckpt):
    summary = train(exact_config("digits/kd", tmp_path, teacher_ckpt, 1))
    for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"epoch", "lr", "loss", "loss.ce", "loss.kd", "train.top1", "test.top1", "images_per_s"} <= set(row)
    assert json.loads((tmp_path / "summary.json").read_text())["best_top1"] == summary.best_top1
    # best.pt is an mdistiller-format checkpoint: it loads strictly into the model
    models.load_checkpoint(models.create("resnet8", 10), tmp_path / "best.pt")


def test_two_process_gloo_ddp(tmp_path, torchrun_cli):
    proc = torchrun_cli(
        29517, "train", "digits/student", "--out-dir", str(tmp_path), "--epochs", "2", *set_args(TINY), timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["images_per_s"] > 0 and proc.stdout.count("epoch 1/2") == 1


@pytest.mark.skipif(not (CIFAR_ROOT / "cifar-10-batches-py").is_dir(), reason="real CIFAR-10 not present")
def test_real_cifar10_teacher_then_kd_student(tmp_path):
    common = [
        f"data.root={CIFAR_ROOT}",
        "data.dataset=cifar10",
        "data.batch_size=64",
        "train.max_train_batches=15",
        "train.max_eval_batches=4",
        "data.eval_batch_size=250",
        "train.progress=false",
        "optim.lr=0.05",
    ]
    teacher = train(
        load_config("digits/teacher", [*common, "model.student=resnet8", "train.epochs=3", f"train.out_dir={tmp_path / 't'}"])
    )
    student = train(
        load_config(
            "digits/kd",
            [
                *common,
                "model.teacher=resnet8",
                "model.student=resnet8",
                f"model.teacher_checkpoint={tmp_path / 't' / 'best.pt'}",
                "train.epochs=2",
                f"train.out_dir={tmp_path / 's'}",
            ],
        )
    )
    for run, summary in (("t", teacher), ("s", student)):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["train.top1"] > rows[0]["train.top1"]
        assert summary.best_top1 > 15.0  # chance is 10%; 1000 test images


def test_batch_size_is_global():
    """The recipes' batch is that of all processes (issue 16 item 6): each process takes its share."""
    from kdfast.engine.distributed import process_share

    assert process_share(512, 8, "data.batch_size") == 64 and process_share(64, 1, "data.batch_size") == 64
    with pytest.raises(ConfigError, match="data.batch_size=64 is the batch of all processes together.*3 processes"):
        process_share(64, 3, "data.batch_size")
    assert load_config("imagenet/kd/ResNet34_ResNet18", check_files=False).data.batch_size == 512
