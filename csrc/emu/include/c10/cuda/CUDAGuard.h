// Stand-in of c10/cuda/CUDAGuard.h for the CPU emulation of the CUDA kernels (csrc/emu/cuda_emu.h):
// the emulated kernels run on CPU tensors, there is no device to switch to.
#pragma once

#include <c10/core/Device.h>

#include "../../../cuda_emu.h"

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(c10::optional<c10::Device>) {}
};

}  // namespace cuda
}  // namespace c10
