"""Several students in one run (``runs:`` / ``--seeds``): one teacher forward per batch, each
student exactly as if it had trained alone, per-student divergence, resume and outputs, the table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, set_args

from kdfast import cli, models
from kdfast.engine import ConfigError, checkpoint, load_config, train, train_students
from kdfast.engine.config import RunConfig, from_dict, students, validate, with_seeds
from kdfast.engine.report import format_table

REPO = Path(__file__).resolve().parents[1]
STUDENTS = [*TINY, "model.teacher=resnet8", "train.data_seed=7"]  # a tiny run, one data order for every student

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(out: Path, teacher: Path, *overrides: str):
    return load_config("digits/kd", [*STUDENTS, f"train.out_dir={out}", f"model.teacher_checkpoint={teacher}", *overrides])


def _same_run(a: Path, b: Path) -> None:
    """Two runs' last.pt hold identical weights, optimizer state and loss history."""
    x, y = checkpoint.load(a / "last.pt"), checkpoint.load(b / "last.pt")
    assert x["distiller"].keys() == y["distiller"].keys()
    for key, value in x["distiller"].items():
        assert torch.equal(value, y["distiller"][key]), key
    for key, state in x["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], y["optimizer"]["state"][key]["momentum_buffer"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s")} for r in rows]  # noqa: E731
    assert strip(x["history"]) == strip(y["history"])
    assert x["loader"] == y["loader"]


def test_students_equal_single_runs(tmp_path, teacher_ckpt):
    """A run of three students (KD seed 0, KD seed 1, AT seed 0; AT draws no teacher-free
    randomness, KD's seeds differ in initialisation) equals three single runs with the same
    data order and seeds, bit for bit on CPU."""
    cfg = _config(tmp_path / "many", teacher_ckpt, "train.epochs=2")
    cfg = dataclasses.replace(cfg, runs=[RunConfig(seed=0), RunConfig(seed=1), RunConfig(method="at", seed=0)])
    report = train_students(cfg)
    assert [s.name for s in report.students] == ["kd-s0", "kd-s1", "at-s0"]
    for _, name, single in students(cfg):
        alone = dataclasses.replace(single, train=dataclasses.replace(single.train, out_dir=str(tmp_path / "alone" / name)))
        train(alone)
        _same_run(tmp_path / "many" / name, tmp_path / "alone" / name)
    first, second = (checkpoint.load(tmp_path / "many" / n / "last.pt")["model"] for n in ("kd-s0", "kd-s1"))
    assert not torch.equal(first["fc.weight"], second["fc.weight"])  # the seeds differ
    assert [r.label for r in report.rows] == ["kd", "at"] and report.rows[0].seeds == [0, 1]


def test_teacher_runs_once_per_batch(tmp_path, teacher_ckpt, monkeypatch):
    calls = []
    original = models.KDModel.features

    def counting(self, images):
        if not torch.is_grad_enabled():  # the frozen teacher (students run with gradients)
            calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(models.KDModel, "features", counting)
    cfg = with_seeds(_config(tmp_path, teacher_ckpt, "train.epochs=1"), [0, 1, 2])
    train_students(cfg)
    assert calls == [16, 16, 16]  # 3 training batches, one teacher forward each (evaluation calls forward)


def test_seeds_cli_prints_the_table(tmp_path, teacher_ckpt, capsys):
    args = [
        "train",
        "digits/kd",
        "--seeds",
        "0,1",
        "--teacher-checkpoint",
        str(teacher_ckpt),
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "1",
        *set_args(STUDENTS),
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "kd-s0" in out and "kd-s1" in out and "±" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["label"] == "kd" and row["seeds"] == [0, 1] and row["best_std"] is not None
    assert [s["name"] for s in summary["students"]] == ["kd-s0", "kd-s1"]
    assert (tmp_path / "curves.png").is_file()
    for name in ("kd-s0", "kd-s1"):
        for file in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png"):
            assert (tmp_path / name / file).is_file(), (name, file)


def test_a_diverged_student_stops_and_the_others_go_on(tmp_path, teacher_ckpt, capsys):
    cfg = _config(tmp_path, teacher_ckpt, "train.epochs=2")
    cfg = dataclasses.replace(cfg, runs=[RunConfig(seed=0), RunConfig(label="hot", seed=0, optim={"lr": 1e30})])
    report = train_students(cfg)
    good, hot = report.students
    assert good.summary.stopped is None and good.summary.epochs == 2
    assert hot.summary.stopped is not None and "diverged" in hot.summary.stopped and hot.summary.epochs == 0
    assert "student hot-s0 stopped" in capsys.readouterr().err
    assert [r.stopped for r in report.rows] == [0, 1]
    assert "(1 diverged)" in format_table(report.rows)
    # a resume goes on with the good student only (the diverged one is behind: stays stopped)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    resumed = train_students(longer, resume=True)
    assert resumed.students[0].summary.epochs == 3 and resumed.students[1].summary.stopped is not None


def test_every_student_diverged(tmp_path, teacher_ckpt):
    from kdfast.engine.trainer import Diverged

    cfg = with_seeds(_config(tmp_path, teacher_ckpt, "train.epochs=1", "optim.lr=1e30"), [0, 1])
    with pytest.raises(Diverged, match="every student diverged"):
        train_students(cfg)


def test_resume_per_student_equals_a_straight_run(tmp_path, teacher_ckpt):
    runs = [RunConfig(seed=0), RunConfig(method="at", seed=1)]
    straight = dataclasses.replace(_config(tmp_path / "straight", teacher_ckpt, "train.epochs=3"), runs=runs)
    train_students(straight)
    first = dataclasses.replace(_config(tmp_path / "split", teacher_ckpt, "train.epochs=1"), runs=runs)
    train_students(first)
    train_students(
        dataclasses.replace(straight, train=dataclasses.replace(straight.train, out_dir=str(tmp_path / "split"))), resume=True
    )
    for name in ("kd-s0", "at-s1"):
        _same_run(tmp_path / "straight" / name, tmp_path / "split" / name)


def test_runs_in_yaml_and_their_errors(tmp_path, teacher_ckpt):
    path = tmp_path / "many.yaml"
    path.write_text(
        f"base: {REPO / 'kdfast/configs/digits/kd.yaml'}\n"
        "runs:\n  - {seed: 0}\n  - {method: {name: dkd, beta: 4.0}, seed: 2, optim: {lr: 1e-2}}\n"
        "  - {label: at-long, method: at, student: resnet14}\n"
    )
    cfg = load_config(path, [f"model.teacher_checkpoint={teacher_ckpt}"])
    found = students(cfg)
    assert [name for _, name, _ in found] == ["kd-s0", "dkd-s2", "at-long-s0"]
    dkd = found[1][2]
    assert dkd.method.params["beta"] == 4.0 and dkd.optim.lr == 0.01 and dkd.train.seed == 2
    assert found[2][2].model.student == "resnet14" and all(c.train.data_seed == 0 for _, _, c in found)
    assert Path(dkd.train.out_dir) == Path(cfg.train.out_dir) / "dkd-s2" and not dkd.runs

    base = {"method": {"name": "kd"}, "model": {"teacher": "resnet8", "teacher_checkpoint": str(teacher_ckpt)}}
    for runs, message in (
        ([{"seed": 0}, {"seed": 0}], "two students are named 'kd-s0'"),
        ([{"sed": 1}], r"unknown key\(s\) in runs\[0\]: sed"),
        ([{"seed": "one"}], r"runs\[0\]\.seed: expected int \| None"),
        ([{"label": "a/b"}], "may only hold letters"),
        ("kd", "runs must be a list"),
    ):
        with pytest.raises(ConfigError, match=message):
            students(from_dict({**base, "runs": runs}))
    with pytest.raises(ConfigError, match=r"student dkd-s0: .*betta"):
        validate(from_dict({**base, "runs": [{"method": {"name": "dkd", "betta": 4.0}}]}))


def test_seeds_flag_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "digits/kd", "--seeds", "0,x"])
    assert exc.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


def test_two_process_gloo_ddp_students(tmp_path, teacher_ckpt, torchrun_cli):
    args = ["--seeds", "0,1", "--out-dir", str(tmp_path), "--epochs", "1", "--teacher-checkpoint", str(teacher_ckpt)]
    proc = torchrun_cli(29519, "train", "digits/kd", *args, *set_args(STUDENTS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert rows[0]["seeds"] == [0, 1] and proc.stdout.count("epoch 1/1 kd-s0") == 1


def test_quickstart_smoke(tmp_path, capsys):
    """The main job end to end at one epoch: teacher, then the nine students, then the table."""
    from kdfast.engine import quickstart

    report = quickstart.run(tmp_path, epochs=1, progress=False)
    assert [row.label for row in report.rows] == ["vanilla", "kd", "at"]
    assert all(row.seeds == [0, 1, 2] and row.best_std is not None for row in report.rows)
    out = capsys.readouterr().out
    assert "mean ± sample std over seeds" in out and "30 training images per class" in out
    assert (tmp_path / "teacher" / "best.pt").is_file() and (tmp_path / "students" / "summary.json").is_file()
