"""The `kdfast` command line: help texts, config errors, eval, viz, bench --e2e."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses

import pytest
import torch

from kdfast import cli, distillers, models
from kdfast.distillers.crd import CRD
from kdfast.engine import bench

SUBCOMMANDS = ("demo", "train", "eval", "bench", "viz", "quickstart")


pytestmark = pytest.mark.usefixtures("one_thread")


def exit_output(capsys, argv: list[str], code: int) -> tuple[str, str]:
    """(stdout, stderr) of ``kdfast <argv>``, which must exit with status `code`."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == code
    output = capsys.readouterr()
    return output.out, output.err


def help_text(capsys, argv) -> str:
    return exit_output(capsys, argv, 0)[0]


def test_main_help_lists_subcommands(capsys):
    text = help_text(capsys, ["--help"])
    assert all(name in text for name in SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_lists_every_option(capsys, command):
    text = help_text(capsys, [command, "--help"])
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(commands, argparse._SubParsersAction)
    sub = commands.choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text, (command, flag)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "digits/kd", "--set", "method.name=nope"], "unknown method 'nope'"),
        (["train", "digits/kd", "--set", "model.student=nope"], "unknown model.student 'nope'"),
        (["train", "digits/kd", "--set", "train.epoch=1"], "unknown key(s) in section 'train': epoch"),
        (["train", "digits/kd", "--set", "data.dataset=cifar10", "--data-root", "/nonexistent"], "missing data for 'cifar10'"),
        (["train", "no/such/config"], "config file 'no/such/config' not found"),
        (["eval", "--model", "resnet8", "--checkpoint", "/nope.pt"], "checkpoint '/nope.pt' not found"),
    ],
)
def test_bad_configs_fail_before_training(capsys, argv, message):
    assert message in exit_output(capsys, argv, 2)[1]


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
    assert (
        cli.main(
            [
                "viz",
                "--teacher",
                "resnet14",
                "--teacher-checkpoint",
                str(checkpoints / "resnet14.pth"),
                "--student",
                "resnet8",
                "--student-checkpoint",
                str(checkpoints / "resnet8.pth"),
                "--images",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_viz_config_mode_draws_the_distillers_maps(tmp_path, checkpoints, capsys):
    """--config: the distiller of a training config with its saved state; here AFT's block maps."""
    teacher = models.create("resnet14", 10)
    teacher.load_state_dict(torch.load(checkpoints / "resnet14.pth")["model"])
    distiller = distillers.create("aft", models.create("resnet8", 10), teacher.eval())
    torch.save({"distiller": distiller.state_dict()}, tmp_path / "run.pt")
    out = tmp_path / "aft.png"
    assert (
        cli.main(
            [
                "viz",
                "--config",
                "digits/kd",
                "--set",
                "method.name=aft",
                "--set",
                "method.kd_weight=0",
                "--set",
                f"model.teacher_checkpoint={checkpoints / 'resnet14.pth'}",
                "--checkpoint",
                str(tmp_path / "run.pt"),
                "--images",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "AFT maps written" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["viz", "--teacher", "resnet14"], "missing: --teacher-checkpoint, --student, --student-checkpoint"),
        (["viz", "--config", "digits/student", "--checkpoint", "/nope.pt"], "checkpoint '/nope.pt' not found"),
        (["viz", "--config", "digits/student", "--student", "resnet8"], "drop --student"),
    ],
)
def test_viz_bad_arguments(capsys, argv, message):
    assert message in exit_output(capsys, argv, 2)[1]


def test_viz_needs_a_distiller_state(tmp_path, checkpoints, capsys):
    argv = ["viz", "--config", "digits/student", "--checkpoint", str(checkpoints / "resnet8.pth")]
    assert "has no 'distiller' state" in exit_output(capsys, argv, 2)[1]


def test_e2e_bench_rows(tmp_path, capsys):
    out = tmp_path / "e2e.csv"
    methods = ("kd", "at", "lakd", "afd")
    bench.run_e2e(torch.device("cpu"), methods, batch=2, iters=1, warmup=0, teacher="resnet14", student="resnet8", out=out)
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["backend"]) for r in rows} == {(f"e2e_{m}", b) for m in methods for b in ("eager-fp32", "kdfast")}
    assert all(float(r["median_ms"]) > 0 and r["pass"] == "train_step" for r in rows)
    assert "images/s" in capsys.readouterr().out


def test_e2e_bench_imagenet_pair(tmp_path):
    """--pair imagenet: 224 x 224 synthetic images through the ImageNet zoo's models."""
    out = tmp_path / "e2e.csv"
    rows = bench.run_e2e(torch.device("cpu"), ("kd",), batch=1, iters=1, warmup=0, pair="imagenet", out=out)
    assert {r["shape"] for r in rows} == {"1x3x224x224"} and len(rows) == 2
    with pytest.raises(ValueError, match="AFD peer"):
        bench.run_e2e(torch.device("cpu"), ("afd",), batch=1, iters=1, pair="imagenet", out=out)


def test_students_bench_rows(tmp_path, capsys):
    out = tmp_path / "students.csv"
    bench.run_students_e2e(
        torch.device("cpu"), ("kd",), (1, 2), batch=2, iters=1, warmup=0, teacher="resnet14", student="resnet8", out=out
    )
    rows = list(csv.DictReader(out.open()))
    assert [(r["op"], r["backend"]) for r in rows] == [
        ("e2e_students_kd", f"kdfast-{kind}-{n}") for n in (1, 2) for kind in ("separate", "shared")
    ]
    assert all(float(r["median_ms"]) > 0 for r in rows) and "img/s/student" in capsys.readouterr().out


def test_e2e_kdfast_side_is_the_training_assembly():
    """kdfast's side of ``bench --e2e`` is build_run of a training config: ``--students 2`` are the
    seeds 0 and 1 on one teacher, SGD as the peers' (lr 0.05, momentum 0.9, weight decay 5e-4),
    CRD bound to a CIFAR-100-size training set; its step trains every student."""
    pair = dataclasses.replace(bench.PAIRS["cifar100"], teacher="resnet14", student="resnet8")
    data = bench.synthetic_batches(pair, 2, 1)
    step, run = bench.kdfast_step(bench.step_config(pair, "crd", students=2), torch.device("cpu"), data, 2, pair.classes)
    assert run.teacher is not None and not run.teacher.training
    assert [student.cfg.train.seed for student in run.students] == [0, 1]
    first, second = ([p.detach().clone() for p in student.distiller.student.parameters()] for student in run.students)
    assert not torch.equal(first[0], second[0])
    for student in run.students:
        assert isinstance(student.distiller, CRD) and student.distiller.contrast.num_data == bench.E2E_TRAINING_SET
        assert {k: student.optimizer.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
        }
    step()
    for student, before in zip(run.students, (first, second), strict=True):
        assert not torch.equal(next(student.distiller.student.parameters()), before[0])


# The distiller's sub-module that holds the trainable extras of the method's eager peer (same structure).
PEER_EXTRAS = {
    "lcc": lambda d: d.attention[0],
    "lakd": lambda d: d.local,
    "afd": lambda d: d.attention,
    "reviewkd": lambda d: d.abfs,
    "crd": lambda d: d.contrast,
}


@pytest.mark.parametrize("method", bench.METHODS)
def test_e2e_peer_matches_distiller(method):
    """Same weights, same float64 batch: the eager peer's loss is the sum of the distiller's losses
    (with bench's parameters, past every warm-up), and its backward gives the same gradients."""
    torch.manual_seed(0)
    teacher = models.create("resnet14", bench.PAIRS["cifar100"].classes).eval().requires_grad_(False)
    student = models.create("resnet8", bench.PAIRS["cifar100"].classes)
    twin = copy.deepcopy(student)
    distiller = distillers.create(method, student, teacher, bench.DISTILLER_PARAMS.get(method))
    peer_loss, extras = bench.REFERENCE_METHODS[method](twin, teacher)
    for module in (teacher, twin, distiller, extras):  # in place: the distiller and the peer keep their views
        module.double()
    if method in PEER_EXTRAS:
        extras.load_state_dict(PEER_EXTRAS[method](distiller).state_dict())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, bench.PAIRS["cifar100"].classes, (4,))
    with torch.no_grad():
        feats = teacher.features(x)
    kwargs: dict[str, torch.Tensor] = {}
    peer_args: tuple[torch.Tensor, ...] = ()
    if distiller.uses_sample_indices:  # CRD: a training set whose first 4 images are the batch, one contrast draw
        assert isinstance(distiller, CRD)
        distiller.bind_training_set(bench.training_labels(y, bench.PAIRS["cifar100"].classes))
        extras.load_state_dict(PEER_EXTRAS[method](distiller).state_dict())  # the banks and Z too
        index = torch.arange(4)
        kwargs = {"indices": index, "contrast_indices": distiller.sample(index, y)}
        peer_args = (index, kwargs["contrast_indices"])

    _, losses = distiller(x, y, feats, bench.STEP_EPOCH, **kwargs)
    total = sum(losses.values())
    if not distiller.backward_done:
        total.backward()
    expected = peer_loss(x, feats, y, *peer_args)
    expected.backward()

    torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-10, atol=0)
    ours = [*student.parameters(), *(PEER_EXTRAS[method](distiller).parameters() if method in PEER_EXTRAS else [])]
    theirs = [*twin.parameters(), *extras.parameters()]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)


def test_help_imports_no_torch():
    """``kdfast --help`` and ``kdfast bench --e2e --help`` load neither torch, the models nor the distillers."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom kdfast import cli\nfor argv in (['--help'], ['bench', '--e2e', '--help'], ['train', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in sys.modules if m == 'torch' or m.startswith(('kdfast.models', 'kdfast.distillers'))]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--students" in run.stdout and "--seeds" in run.stdout
