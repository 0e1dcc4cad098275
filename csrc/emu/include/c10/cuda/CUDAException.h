// Stand-in of c10/cuda/CUDAException.h for the CPU emulation of the CUDA kernels (csrc/emu/cuda_emu.h):
// emulated launches throw their errors themselves.
#pragma once

#include "../../../cuda_emu.h"

#define C10_CUDA_CHECK(expr) (void)(expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
