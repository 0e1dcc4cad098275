// Stand-in of cuda_runtime.h for the CPU emulation of the CUDA kernels.
#pragma once

#include "../cuda_emu.h"
