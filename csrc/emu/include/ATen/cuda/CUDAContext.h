// Stand-in of ATen/cuda/CUDAContext.h for the CPU emulation of the CUDA kernels (csrc/emu/cuda_emu.h):
// the device properties of an H200 (sm_90, 132 SMs), so that launchers size their grids as there.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include "../../../cuda_emu.h"

namespace at {
namespace cuda {

inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp properties = cuda_emu::h200_properties();
  return &properties;
}

inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) { return getCurrentDeviceProperties(); }

}  // namespace cuda
}  // namespace at
