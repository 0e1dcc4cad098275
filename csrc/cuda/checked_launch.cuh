// Checked launches of kdfast's CUDA kernels on the current stream (the ops' host code): the grid
// size checked against one launch's limit, the launch's error raised. Built on launch.cuh, which
// stays free of c10's CUDA headers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include "launch.cuh"

namespace kdfast {
namespace gpu {

// kernel<<<blocks, threads, shared_bytes>>>(args...) on the current stream, then the launch's error
// check. `op` names the op in the error when `blocks` exceeds one launch's grid (2^31 - 1 blocks).
template <typename... Params, typename... Args>
void launch_checked(const char* op, void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_bytes,
                    Args&&... args) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many blocks for one launch (", blocks, ")");
  launch_kernel(kernel, static_cast<unsigned int>(blocks), threads, shared_bytes, c10::cuda::getCurrentCUDAStream(),
                std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// launch_checked, or nothing for zero blocks (an empty input).
template <typename... Params, typename... Args>
void launch_unless_empty(const char* op, void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_bytes,
                         Args&&... args) {
  if (blocks > 0) launch_checked(op, kernel, blocks, threads, shared_bytes, std::forward<Args>(args)...);
}

}  // namespace gpu
}  // namespace kdfast
