"""Test set-up shared by every test module.

Without a CUDA GPU, Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET
must be set before any @triton.jit function is defined, i.e. before kdfast is imported.
Tests marked ``gpu`` are skipped without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kdfast.engine import Config

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kdfast  # noqa: E402,F401
from kdfast import backends, models  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
FUSED_BACKENDS = ("cpu", "cuda", "triton")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Relative tolerances (scaled by the reference's largest magnitude) of a loss and its gradient:
# losses accumulate in float32 (float64), gradients are rounded to the input dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-3),
    torch.bfloat16: (2e-5, 1.6e-2),
}


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    # torch.compile of a "cuda_emu" op runs the registration code of kdfast/ops that "cpu" runs (the
    # same fakes and autograd, per library; opcheck checks kdfast_emu's): 10-50 s each for nothing new.
    skip_emu_compile = pytest.mark.skip(reason="compile of the cuda_emu ops: the registration code of 'cpu'")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)
        if item.originalname == "test_compile_fullgraph" and "cuda_emu" in item.name:
            item.add_marker(skip_emu_compile)


def device_backends(op: str) -> list:
    """(device, backend) params: every fused backend on every device here, and ("cpu", "cuda_emu"):
    the CUDA C++ kernels run on the CPU through csrc/emu/cuda_emu.h. Unavailable ones are still
    listed, as skips that say why (so a missing backend is visible in the report)."""
    params = []
    for device in ("cpu", "cuda"):
        for backend in FUSED_BACKENDS:
            if (device == "cpu") != (backend == "cpu") and backend != "triton":
                continue  # "cpu" runs on CPU tensors only, "cuda" on CUDA tensors only
            marks = [pytest.mark.gpu] if device == "cuda" else []
            reason: str | None
            if device == "cuda" and not HAS_GPU:
                reason = "needs a CUDA GPU"
            else:
                reason = backends.unavailable_reason(op, backend, torch.device(device))
            if reason:
                marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    reason = backends.unavailable_reason(op, "cuda_emu", torch.device("cpu"))
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    params.append(pytest.param("cpu", "cuda_emu", marks=marks, id="cpu-cuda_emu"))
    return params


def triton_backends(op: str) -> list:
    """The Triton (device, backend) params of `op`."""
    return [p for p in device_backends(op) if p.values[1] == "triton"]


def backends_with_torch(op: str) -> list:
    """Every fused (device, backend) param of `op` and the reference on the CPU."""
    return device_backends(op) + [pytest.param("cpu", "torch", id="cpu-torch")]


def feature(shape, dtype=torch.float32, device="cpu", channels_last=False, requires_grad=False, seed=0):
    """A seeded standard-normal tensor drawn in float64, rounded to `dtype`, on `device`
    (channels_last if asked), a leaf requiring grad if asked."""
    f = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(device)
    if channels_last:
        f = f.contiguous(memory_format=torch.channels_last)
    return f.requires_grad_(requires_grad)


def assert_close_scaled(actual, expected, rtol, name="", floor=1e-30):
    """|actual - expected| <= rtol * (|expected| + max(max|expected|, floor)) elementwise.

    `floor` is the natural scale of the quantity where the exact value is ~0 (rounding noise).
    """
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module (tiny models: threads only add overhead on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    """A frozen resnet14 teacher, a resnet8 student, a batch of 8 CIFAR-shaped images with labels
    and the teacher's features."""
    torch.manual_seed(0)
    teacher = models.create("resnet14", 10).eval().requires_grad_(False)
    student = models.create("resnet8", 10)
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 3, 5, 9, 1, 1, 7, 2])
    with torch.inference_mode():
        feats = teacher.features(x)
    return teacher, student, x, y, feats


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A random resnet8 teacher (10 classes) in mdistiller's {"model": state_dict} format."""
    path = tmp_path_factory.mktemp("teacher") / "ckpt_epoch_240.pth"
    torch.manual_seed(1)
    torch.save({"model": models.create("resnet8", 10).state_dict(), "epoch": 240}, path)
    return path


REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.batch_size=16",
    "train.max_train_batches=3",
    "train.max_eval_batches=1",
    "train.progress=false",
    "model.student=resnet8",
]
"""The engine tests' runs: 3 training batches of 16 digits, 1 evaluation batch, a resnet8 student, no progress bar."""


def tiny(out: Path, *overrides: str) -> list[str]:
    """The overrides of a :data:`TINY` run writing to `out`, then `overrides`."""
    return [*TINY, f"train.out_dir={out}", *overrides]


def exact_config(name: str, out: Path, teacher_ckpt: Path, epochs: int, *overrides: str) -> Config:
    """The config `name` as a :data:`TINY` deterministic run of `epochs` epochs writing to `out`,
    its resnet8 teacher loaded from `teacher_ckpt`, lr milestones [2, 3], then `overrides`: what
    the resume tests run in one session and in two."""
    from kdfast.engine import load_config  # the configs import the distillers: only for the engine tests

    teacher = ["model.teacher=resnet8", f"model.teacher_checkpoint={teacher_ckpt}"]
    run = [f"train.epochs={epochs}", "train.deterministic=true", *teacher, "optim.milestones=[2, 3]"]
    return load_config(name, tiny(out, *run, *overrides))


def set_args(overrides: Iterable[str]) -> list[str]:
    """`overrides` as command-line options: ``--set item`` for each."""
    return [arg for item in overrides for arg in ("--set", item)]


def _torchrun_cli(port: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``kdfast <args>`` in two gloo processes under torchrun on the CPU (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    return subprocess.run([*launcher, "-m", "kdfast.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def torchrun_cli() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`_torchrun_cli`: run the command line in two DDP processes."""
    return _torchrun_cli
