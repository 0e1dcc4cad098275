// Kernel launches of kdfast's CUDA kernels: the real launch under nvcc, the CPU emulation of
// csrc/emu/cuda_emu.h when the .cu files are compiled as host C++ (the kdfast._C_emu extension).
#pragma once

#include <cstddef>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
#include "../emu/cuda_emu.h"
#endif

namespace kdfast {
namespace gpu {

// kernel<<<grid, block, shared_bytes, stream>>>(args...).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#else
  (void)stream;
  ::cuda_emu::launch(kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
#endif
}

}  // namespace gpu
}  // namespace kdfast

// `extern __shared__ type name[]`: the launch's dynamic shared memory, in device code.
#if defined(__CUDACC__)
#define KDFAST_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#define KDFAST_DYNAMIC_SHARED(type, name) type* const name = ::cuda_emu::dynamic_shared<type>()
#endif
