"""Engine safety: typed configs, the divergence guard, rotating checksummed checkpoints, resume
fall-back and refusal, SIGTERM/SIGINT checkpoints, progress output in logs."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, set_args, tiny

from kdfast import cli
from kdfast._coerce import coerce
from kdfast.distillers.vanilla import Vanilla
from kdfast.engine import ConfigError, checkpoint, load_config, train
from kdfast.engine.guard import Diverged, NonFiniteGuard
from kdfast.engine.trainer import LAST, PREV

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- typed configs


@pytest.mark.parametrize("raw, value", [("1e4", 1e4), ("1e-3", 1e-3), (".5", 0.5), ("2", 2.0), ("0.25", 0.25)])
def test_float_values_in_every_yaml_spelling(raw, value):
    cfg = load_config("digits/student", [f"optim.lr={raw}"], check_files=False)
    assert cfg.optim.lr == value and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=abc", r"train\.epochs: expected int, got 'abc' \(str\)"),
        ("train.epochs=2.5", r"train\.epochs: expected int, got 2\.5 \(float\)"),
        ("optim.lr=fast", r"optim\.lr: expected float, got 'fast'"),
        ("train.compile=maybe", r"train\.compile: expected bool, got 'maybe'"),
        ("optim.milestones=[1,x]", r"optim\.milestones\[1\]: expected int, got 'x'"),
        ("optim.milestones=3", r"optim\.milestones: expected list\[int\], got 3"),
        ("data.eval_batch_size=none", r"data\.eval_batch_size: expected int \| None, got 'none'"),
        ("method.temperature=hot", r"method\.temperature: expected float, got 'hot'"),
        ("train.epochs=-1", r"train\.epochs must be >= 1, got -1"),
        ("optim.lr=0", r"optim\.lr must be > 0"),
        ("optim.lr=-1e-3", r"optim\.lr must be > 0"),
        ("optim.milestones=[3,2]", r"milestones must be strictly increasing"),
        ("optim.momentum=1.5", r"optim\.momentum must be in \[0, 1\)"),
        ("train.amp=fp8", r"train\.amp must be auto, bf16 or none"),
        ("train.on_nonfinite=ignore", r"train\.on_nonfinite must be stop or skip"),
    ],
)
def test_bad_values_are_named(override, message):
    name = "digits/kd" if override.startswith("method.") else "digits/student"
    with pytest.raises(ConfigError, match=message):
        load_config(name, [override], check_files=False)


def test_cli_exits_2_without_traceback(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "digits/student", "--set", "train.epochs=abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "train.epochs: expected int, got 'abc'" in err and "Traceback" not in err


def test_coerce_never_mixes_bool_and_numbers():
    with pytest.raises(TypeError):
        coerce("k", int, True)
    with pytest.raises(TypeError):
        coerce("k", bool, 1)
    assert coerce("k", float, 3) == 3.0 and coerce("k", int | None, None) is None


# ----------------------------------------------------------------------------- divergence guard


def test_guard_counts_on_the_device_and_names_the_first_bad_step():
    guard = NonFiniteGuard(torch.device("cpu"), "stop", 10)
    w = torch.ones(3, requires_grad=True)
    w.grad = torch.ones(3)
    guard.observe(torch.tensor(1.0), [w], 0)
    assert guard.check(1) == 0
    w.grad = torch.tensor([1.0, math.inf, 0.0])  # finite loss, non-finite gradient
    assert guard.observe(torch.tensor(1.0), [w], 7).item() == 1.0
    guard.observe(torch.tensor(math.nan), [], 8)
    with pytest.raises(Diverged, match="epoch 3, step 7"):
        guard.check(3)


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward = Vanilla.forward
    calls = 0

    def poisoned(self, images, labels, teacher, epoch):  # the loss turns NaN from epoch 3's second step on
        nonlocal calls
        logits, losses = forward(self, images, labels, teacher, epoch)
        calls += 1
        return logits, {k: v * math.nan if calls > 7 else v for k, v in losses.items()}

    monkeypatch.setattr(Vanilla, "forward", poisoned)
    with pytest.raises(Diverged, match=r"epoch 3, step 1 "):
        train(load_config("digits/student", tiny(tmp_path, "train.epochs=5")))
    kept = checkpoint.load_verified(tmp_path / LAST)
    assert kept["epoch"] == 2 and all(math.isfinite(row["loss"]) for row in kept["history"])
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_skip_drops_bad_updates_and_stops_after_max(tmp_path, amp):
    cfg = load_config(
        "digits/student",
        tiny(
            tmp_path,
            "train.epochs=2",
            "optim.lr=1e4",
            "train.on_nonfinite=skip",
            "train.max_nonfinite=4",
            f"train.amp={amp}",
            "train.max_train_batches=12",
        ),
    )
    with pytest.raises(Diverged, match=r"4 steps .* were skipped|\d+ steps .* were skipped"):
        train(cfg)


def test_skip_leaves_parameters_and_momentum_untouched():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    guard = NonFiniteGuard(torch.device("cpu"), "skip", 10)
    params = list(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.found_inf = guard.observe(torch.tensor(1.0), params, 0)  # type: ignore[attr-defined]  # read by torch's SGD step (getattr), not in its stubs
    opt.step()  # a good step: momentum buffers exist now
    before = [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]
    grad = params[0].grad
    assert grad is not None
    grad.fill_(math.nan)
    opt.found_inf = guard.observe(torch.tensor(1.0), params, 1)  # type: ignore[attr-defined]  # read by torch's SGD step (getattr), not in its stubs
    opt.step()
    after = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert guard.check(1) == 1


# ----------------------------------------------------------------------------- checkpoints


def test_rotation_keeps_prev_with_checksums(tmp_path):
    cfg = load_config("digits/student", tiny(tmp_path, "train.epochs=2"))
    train(cfg)
    last, prev = checkpoint.load_verified(tmp_path / LAST), checkpoint.load_verified(tmp_path / PREV)
    assert (last["epoch"], prev["epoch"]) == (2, 1)
    assert (tmp_path / f"{LAST}.sha256").is_file() and (tmp_path / f"{PREV}.sha256").is_file()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_falls_back_to_prev_on_a_truncated_last(tmp_path):
    train(load_config("digits/student", tiny(tmp_path, "train.epochs=2")))
    _truncate(tmp_path / LAST)
    with pytest.raises(checkpoint.CheckpointError, match=f"{LAST}: checksum mismatch"):
        checkpoint.load_verified(tmp_path / LAST)
    with pytest.warns(RuntimeWarning, match="resuming from the previous checkpoint"):
        summary = train(load_config("digits/student", tiny(tmp_path, "train.epochs=3")), resume=True)
    assert summary.epochs == 3


def test_resume_fails_clearly_when_nothing_is_usable(tmp_path, capsys):
    train(load_config("digits/student", tiny(tmp_path, "train.epochs=2")))
    _truncate(tmp_path / LAST)
    (tmp_path / PREV).write_bytes(b"not a checkpoint")
    (tmp_path / f"{PREV}.sha256").unlink()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "digits/student", "--resume", *set_args(tiny(tmp_path, "train.epochs=3"))])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no usable checkpoint" in err and LAST in err and PREV in err
    assert "Traceback" not in err


def test_resume_refuses_another_run(tmp_path):
    train(load_config("digits/student", tiny(tmp_path, "train.epochs=1")))
    other = load_config("digits/student", tiny(tmp_path, "train.epochs=2", "model.student=resnet14"))
    with pytest.raises(ConfigError, match=r"model\.student: checkpoint 'resnet8', config 'resnet14'"):
        train(other, resume=True)


# ----------------------------------------------------------------------------- signals


_SIGNAL_RUN = """
import os, signal, sys
from kdfast import cli
from kdfast.engine import trainer
original = trainer._Run.train_epoch
def train_epoch(self):
    if self.epoch == 2 and self.partial is None:
        os.kill(os.getpid(), signal.{sig})  # arrives mid-step; the run stops at the next boundary
    return original(self)
trainer._Run.train_epoch = train_epoch
sys.exit(cli.main(["train", "digits/student", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, sig):
    overrides = [*TINY, "train.epochs=3", "train.max_train_batches=4"]
    sets = lambda out: set_args([*overrides, f"train.out_dir={out}"])  # noqa: E731
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _SIGNAL_RUN.replace("{sig}", sig), *sets(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 128 + getattr(signal, sig), run.stderr
    assert "checkpoint written" in run.stderr and "Traceback" not in run.stderr
    state = checkpoint.load_verified(tmp_path / "a" / LAST)
    assert state["epoch"] == 1 and state["partial"]["steps"] == 1
    resumed = subprocess.run(
        [sys.executable, "-m", "kdfast.cli", "train", "digits/student", "--resume", *sets(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(
        [sys.executable, "-m", "kdfast.cli", "train", "digits/student", *sets(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr
    a, b = (checkpoint.load_verified(tmp_path / d / LAST) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["history"][-1]["loss"] == pytest.approx(b["history"][-1]["loss"], rel=1e-12)


# ----------------------------------------------------------------------------- progress output


def test_no_carriage_returns_when_output_is_not_a_terminal(tmp_path):
    overrides = tiny(tmp_path, "train.epochs=2", "train.progress=true")
    run = subprocess.run(
        [sys.executable, "-m", "kdfast.cli", "train", "digits/student", *set_args(overrides)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stdout + run.stderr
    assert [line.split(":")[0] for line in run.stdout.splitlines() if line.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
