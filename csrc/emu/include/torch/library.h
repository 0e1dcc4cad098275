// torch/library.h for the CPU emulation of the CUDA kernels (csrc/emu/cuda_emu.h): the real header,
// with TORCH_LIBRARY_IMPL(ns, CUDA, m) in csrc/cuda/*.cu registering the emulated kernels as the CPU
// kernels of the namespace ns_emu (kdfast -> kdfast_emu), whose schemas csrc/emu/module.cpp defines.
#pragma once

#include_next <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns##_emu, CPU, m, C10_UID)
