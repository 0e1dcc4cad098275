"""The CPU emulation of the CUDA kernels (csrc/emu/cuda_emu.h, the "cuda_emu" backend).

* Every op's CUDA kernels give bitwise the same values and gradients whatever the order of the
  blocks of a launch and of the threads of a block (forward, reverse, seeded shuffles): no result
  depends on block order, and no thread reads shared memory that another thread of its block
  writes in the same barrier interval (a missing __syncthreads changes the result between thread
  orders, as the first negative control shows).
* Negative controls, small kernels compiled here against the same header: the emulation reports a
  missing __syncthreads (as a schedule-dependent result), a __syncthreads in divergent code and a
  warp shuffle after a lane of its mask exited, each as a clear error.

The correctness of the emulated kernels against the float64 references runs in the per-op test
files, through the ("cpu", "cuda_emu") parameter of conftest.device_backends.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from kdfast import _extension
from kdfast import functional as F

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    _extension.EMU_LOAD_ERROR is not None, reason=f"kdfast._C_emu is not loaded ({_extension.EMU_LOAD_ERROR})"
)

# (block order, thread order, seed) of each compared run; the first is the default.
SCHEDULES = [("forward", "forward", 0), ("reverse", "reverse", 0), ("shuffle", "shuffle", 1), ("shuffle", "forward", 2)]

CONTROLS = r"""
// Negative controls of the emulation: small kernels with the bugs it must report.
#include "cuda_emu.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

#include "cuda/launch.cuh"

namespace {

constexpr int kThreads = 64;

// Each thread writes its slot of shared memory, then reads its neighbour's; without `sync` nothing
// orders the write of the neighbour before the read (a missing __syncthreads).
__global__ void neighbour_kernel(float* out, bool sync) {
  __shared__ float slots[kThreads];
  const int t = threadIdx.x;
  slots[t] = static_cast<float>((t + 1) * (blockIdx.x + 1));
  if (sync) __syncthreads();
  out[blockIdx.x * kThreads + t] = slots[(t + 1) % kThreads];
}

// The first half of the block waits at a barrier that the other half skips: it exits ("exit") or
// waits at another barrier ("other").
__global__ void divergent_barrier_kernel(float* out, bool other) {
  const int t = threadIdx.x;
  out[t] = static_cast<float>(t);
  if (t < kThreads / 2) {
    __syncthreads();
  } else if (other) {
    __syncthreads();
  }
}

// Lanes 16..31 of each warp exit before the full-warp shuffle of lanes 0..15.
__global__ void shuffle_after_exit_kernel(float* out) {
  const int t = threadIdx.x;
  if (t % 32 >= 16) return;
  out[t] = __shfl_xor_sync(0xffffffffu, static_cast<float>(t), 1);
}

at::Tensor neighbour(int64_t blocks, bool sync) {
  at::Tensor out = at::zeros({blocks * kThreads});
  kdfast::gpu::launch_kernel(neighbour_kernel, static_cast<unsigned>(blocks), kThreads, 0, nullptr,
                             out.mutable_data_ptr<float>(), sync);
  return out;
}

at::Tensor divergent_barrier(bool other) {
  at::Tensor out = at::zeros({kThreads});
  kdfast::gpu::launch_kernel(divergent_barrier_kernel, 1, kThreads, 0, nullptr, out.mutable_data_ptr<float>(), other);
  return out;
}

at::Tensor shuffle_after_exit() {
  at::Tensor out = at::zeros({kThreads});
  kdfast::gpu::launch_kernel(shuffle_after_exit_kernel, 1, kThreads, 0, nullptr, out.mutable_data_ptr<float>());
  return out;
}

void set_schedule(std::string blocks, std::string threads, int64_t seed) {
  cuda_emu::set_schedule(cuda_emu::parse_order(blocks), cuda_emu::parse_order(threads), static_cast<uint64_t>(seed));
}

}  // namespace

TORCH_LIBRARY(kdfast_emu_controls, m) {
  m.def("neighbour", &neighbour);
  m.def("divergent_barrier", &divergent_barrier);
  m.def("shuffle_after_exit", &shuffle_after_exit);
  m.def("set_schedule", &set_schedule);
}
"""


@pytest.fixture(scope="module")
def controls():
    """torch.ops.kdfast_emu_controls: the negative-control kernels, built once into build/ (cached)."""
    from torch.utils.cpp_extension import load

    build = ROOT / "build" / "emu_controls"
    build.mkdir(parents=True, exist_ok=True)
    source = build / "controls.cpp"
    if not source.exists() or source.read_text() != CONTROLS:
        source.write_text(CONTROLS)
    load(
        "kdfast_emu_controls",
        [str(source)],
        extra_cflags=["-O1", "-g0"],
        build_directory=str(build),
        extra_include_paths=[str(ROOT / "csrc" / "emu"), str(ROOT / "csrc")],
        is_python_module=False,
    )
    return torch.ops.kdfast_emu_controls


@contextlib.contextmanager
def schedule(blocks: str, threads: str, seed: int, set_schedule):
    set_schedule(blocks, threads, seed)
    try:
        yield
    finally:
        set_schedule("forward", "forward", 0)


def schedule_dependence(run, set_schedule) -> str | None:
    """None if `run()` returns bitwise equal tensors (NaN equal to NaN) under every schedule of
    SCHEDULES, else which schedules differ."""
    results = []
    for s in SCHEDULES:
        with schedule(*s, set_schedule):
            results.append([t.detach().clone() for t in run()])
    for s, result in zip(SCHEDULES[1:], results[1:], strict=True):
        for i, (a, b) in enumerate(zip(results[0], result, strict=True)):
            if not torch.equal(torch.nan_to_num(a, nan=1.5e38), torch.nan_to_num(b, nan=1.5e38)):
                return f"output {i} differs between the schedules {SCHEDULES[0]} and {s}: the result depends on order"
    return None


def _emu_schedule(blocks: str, threads: str, seed: int) -> None:
    from kdfast import _C_emu

    _C_emu.set_schedule(blocks, threads, seed)


def _with_grads(loss_fn, inputs):
    def run():
        loss = loss_fn()
        return [loss, *torch.autograd.grad(loss, inputs)]

    return run


def _randn(*shape, seed, grad=False, channels_last=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _cases():
    """op name -> run(): forward and backward on the "cuda_emu" backend, small shapes."""
    b = "cuda_emu"
    at_s = [_randn(2, 8, 8, 8, seed=0, grad=True), _randn(2, 16, 4, 4, seed=1, grad=True, channels_last=True)]
    at_t = [_randn(2, 8, 8, 8, seed=2), _randn(2, 16, 4, 4, seed=3)]
    warp_s, warp_t = _randn(37, 50, seed=4, grad=True), _randn(37, 50, seed=5)  # warp-per-row kernel
    block_s, block_t = _randn(3, 2000, seed=6, grad=True), _randn(3, 2000, seed=7)  # block-per-row kernel
    target_warp, target_block = torch.arange(37) % 50, torch.tensor([0, 1999, 7])
    lcc_s, lcc_t = _randn(2, 6, 8, 8, seed=8, grad=True), _randn(2, 5, 8, 8, seed=9)
    rel_s, rel_t = _randn(70, 33, seed=10, grad=True), _randn(70, 21, seed=11)
    mse_x, mse_y = _randn(2, 4, 5, 5, seed=12, grad=True), _randn(2, 4, 5, 5, seed=13)
    mask = (_randn(2, 5, 5, seed=14) > 0).float()
    ba_f, ba_h = _randn(2, 4, 8, 8, seed=15, grad=True), _randn(2, 4, 8, 8, seed=16, grad=True)
    ba_t = _randn(2, 4, 8, 8, seed=17)
    md_s = [_randn(2, 4, 6, 6, seed=18, grad=True), _randn(2, 5, 3, 3, seed=19, grad=True)]
    md_t = [_randn(2, 3, 6, 6, seed=20), _randn(2, 2, 3, 3, seed=21)]
    att = _randn(2, 2, 2, seed=22).softmax(-1).requires_grad_()
    hcl_s = [_randn(2, 5, 7, 6, seed=23, grad=True), _randn(2, 9, 4, 4, seed=24, grad=True, channels_last=True)]
    hcl_t = [_randn(2, 5, 7, 6, seed=25), _randn(2, 9, 4, 4, seed=26)]
    crd_e, crd_bank = _randn(3, 40, seed=27, grad=True), _randn(50, 40, seed=28)  # 700 columns: 2 blocks per row
    crd_wide, crd_wide_bank = _randn(2, 200, seed=29, grad=True), _randn(9, 200, seed=30)  # D > 128: 32 chunks per lane
    crd_idx = torch.randint(0, 50, (3, 700), generator=torch.Generator().manual_seed(31))
    crd_wide_idx = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(32))
    return {
        "at": _with_grads(lambda: F.at_loss(at_s, at_t, backend=b), at_s),
        "kd_warp": _with_grads(lambda: F.kd_loss(warp_s, warp_t, backend=b), [warp_s]),
        "kd_block": _with_grads(lambda: F.kd_loss(block_s, block_t, reduction="sum", backend=b), [block_s]),
        "dkd_warp": _with_grads(lambda: F.dkd_loss(warp_s, warp_t, target_warp, backend=b), [warp_s]),
        "dkd_block": _with_grads(lambda: F.dkd_loss(block_s, block_t, target_block, backend=b), [block_s]),
        "lcc": _with_grads(lambda: F.local_correlation_loss(lcc_s, lcc_t, grid=2, backend=b), [lcc_s]),
        "sp": _with_grads(lambda: F.sp_loss(rel_s, rel_t, backend=b), [rel_s]),
        "rkd": _with_grads(lambda: F.rkd_loss(rel_s[:9], rel_t[:9], backend=b), [rel_s]),
        "masked_mse": _with_grads(lambda: F.masked_mse(mse_x, mse_y, mask, backend=b), [mse_x]),
        "block_attention_ndam": _with_grads(lambda: F.ndam_loss(ba_f, ba_h, ba_t, grid=2, backend=b), [ba_f, ba_h]),
        "block_attention_aft": _with_grads(lambda: F.aft_loss(ba_f, ba_h, ba_t, grid=2, backend=b), [ba_f, ba_h]),
        "map_distance": _with_grads(lambda: F.map_distance_loss(md_s, md_t, att, backend=b), [*md_s, att]),
        "hcl": _with_grads(lambda: F.hcl_loss(hcl_s, hcl_t, backend=b), hcl_s),
        "crd": _with_grads(lambda: F.crd_loss(crd_e, crd_bank, crd_idx, 30.0, 0.5, backend=b), [crd_e]),
        "crd_wide": _with_grads(lambda: F.crd_loss(crd_wide, crd_wide_bank, crd_wide_idx, 3.0, 2.0, backend=b), [crd_wide]),
    }


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES)
def test_results_do_not_depend_on_block_or_thread_order(case):
    assert schedule_dependence(_cases()[case], _emu_schedule) is None


def test_missing_syncthreads_is_reported(controls):
    """The read-after-write race on shared memory changes the result between thread orders; with
    the barrier every order gives the same, right result."""
    report = schedule_dependence(lambda: [controls.neighbour(3, False)], controls.set_schedule)
    assert report is not None and "depends on order" in report
    assert schedule_dependence(lambda: [controls.neighbour(3, True)], controls.set_schedule) is None
    expected = torch.tensor([((t + 1) % 64 + 1) * (b + 1) for b in range(3) for t in range(64)], dtype=torch.float32)
    assert torch.equal(controls.neighbour(3, True), expected)


@pytest.mark.parametrize("other", [False, True], ids=["others-exit", "other-barrier"])
@pytest.mark.parametrize("threads", ["forward", "reverse"])
def test_divergent_syncthreads_is_reported(controls, other, threads):
    with (
        schedule("forward", threads, 0, controls.set_schedule),
        pytest.raises(RuntimeError, match="__syncthreads in divergent code"),
    ):
        controls.divergent_barrier(other)


@pytest.mark.parametrize("threads", ["forward", "reverse", "shuffle"])
def test_shuffle_after_a_lane_exited_is_reported(controls, threads):
    exited = r"warp operation at .*controls.cpp.*lane 1\d of .*mask is exited"
    with schedule("forward", threads, 3, controls.set_schedule), pytest.raises(RuntimeError, match=exited):
        controls.shuffle_after_exit()


def test_emulation_recovers_after_an_error(controls):
    """A reported kernel leaves the emulation usable: the next launch runs normally."""
    with pytest.raises(RuntimeError):
        controls.shuffle_after_exit()
    assert schedule_dependence(lambda: [controls.neighbour(2, True)], controls.set_schedule) is None
