"""The `kdfast` command line: help texts, config errors, eval, viz, bench --e2e."""

from __future__ import annotations

import csv

import pytest
import torch

from kdfast import cli, distillers, models
from kdfast.engine import bench

SUBCOMMANDS = ("demo", "train", "eval", "bench", "viz", "quickstart")


pytestmark = pytest.mark.usefixtures("one_thread")


def help_text(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_main_help_lists_subcommands(capsys):
    text = help_text(capsys, ["--help"])
    assert all(name in text for name in SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_lists_every_option(capsys, command):
    text = help_text(capsys, [command, "--help"])
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text, (command, flag)


@pytest.mark.parametrize("argv, message", [
    (["train", "digits/kd", "--set", "method.name=nope"], "unknown method 'nope'"),
    (["train", "digits/kd", "--set", "model.student=nope"], "unknown model.student 'nope'"),
    (["train", "digits/kd", "--set", "train.epoch=1"], "unknown key(s) in section 'train': epoch"),
    (["train", "digits/kd", "--set", "data.dataset=cifar10", "--data-root", "/nonexistent"], "missing data for 'cifar10'"),
    (["train", "no/such/config"], "config file 'no/such/config' not found"),
    (["eval", "--model", "resnet8", "--checkpoint", "/nope.pt"], "checkpoint '/nope.pt' not found"),
])
def test_bad_configs_fail_before_training(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    for name in ("resnet14", "resnet8"):
        torch.save({"model": models.create(name, 10).state_dict()}, folder / f"{name}.pth")
    return folder


def test_eval_mdistiller_checkpoint(capsys, checkpoints):
    assert cli.main(["eval", "--model", "resnet8", "--checkpoint", str(checkpoints / "resnet8.pth"), "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_viz_writes_png(tmp_path, checkpoints):
    out = tmp_path / "att.png"
    assert cli.main(["viz", "--teacher", "resnet14", "--teacher-checkpoint", str(checkpoints / "resnet14.pth"),
                     "--student", "resnet8", "--student-checkpoint", str(checkpoints / "resnet8.pth"),
                     "--images", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_viz_config_mode_draws_the_distillers_maps(tmp_path, checkpoints, capsys):
    """--config: the distiller of a training config with its saved state; here AFT's block maps."""
    teacher = models.create("resnet14", 10)
    teacher.load_state_dict(torch.load(checkpoints / "resnet14.pth")["model"])
    distiller = distillers.create("aft", models.create("resnet8", 10), teacher.eval())
    torch.save({"distiller": distiller.state_dict()}, tmp_path / "run.pt")
    out = tmp_path / "aft.png"
    assert cli.main(["viz", "--config", "digits/kd", "--set", "method.name=aft", "--set", "method.kd_weight=0",
                     "--set", f"model.teacher_checkpoint={checkpoints / 'resnet14.pth'}",
                     "--checkpoint", str(tmp_path / "run.pt"), "--images", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "AFT maps written" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["viz", "--teacher", "resnet14"], "missing: --teacher-checkpoint, --student, --student-checkpoint"),
    (["viz", "--config", "digits/student", "--checkpoint", "/nope.pt"], "checkpoint '/nope.pt' not found"),
    (["viz", "--config", "digits/student", "--student", "resnet8"], "drop --student"),
])
def test_viz_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_viz_needs_a_distiller_state(tmp_path, checkpoints, capsys):
    with pytest.raises(SystemExit):
        cli.main(["viz", "--config", "digits/student", "--checkpoint", str(checkpoints / "resnet8.pth")])
    assert "has no 'distiller' state" in capsys.readouterr().err


def test_e2e_bench_rows(tmp_path, capsys):
    out = tmp_path / "e2e.csv"
    bench.run_e2e(torch.device("cpu"), ["kd", "at"], batch=2, iters=1, warmup=0, teacher="resnet14", student="resnet8", out=out)
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["backend"]) for r in rows} == {(f"e2e_{m}", b) for m in ("kd", "at") for b in ("eager-fp32", "kdfast")}
    assert all(float(r["median_ms"]) > 0 and r["pass"] == "train_step" for r in rows)
    assert "images/s" in capsys.readouterr().out

