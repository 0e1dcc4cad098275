// Stand-in of c10/cuda/CUDAStream.h for the CPU emulation of the CUDA kernels (csrc/emu/cuda_emu.h).
#pragma once

#include <c10/core/Device.h>

#include "../../../cuda_emu.h"

namespace c10 {
namespace cuda {

// The one (null) stream of the emulation: launches run synchronously.
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
  void synchronize() const {}
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
