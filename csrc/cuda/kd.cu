// CUDA kernels of the KD logit loss (Hinton et al. 2015); formulas in kdfast/reference/kd.py.
//
// kd_forward:  per row, one pass computes lse_s, lse_t and T^2 KL(pt || ps) online; with_grad, a
//              second pass writes T (ps - pt)
// kd_backward: grad_loss[b] T (exp(zs - lse_s) - exp(zt - lse_t)) from the forward's stats
//
// The row algorithm, shared with DKD and with csrc/cpu/kd.cpp, is in csrc/softmax.h (KdRule,
// process_row); CudaRows runs it with a warp per row for small K and a block per row for large K.
#include <torch/library.h>

#include "../softmax.h"

namespace kdfast {

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("kd_forward", &logits::kd_forward<logits::CudaRows>);
  m.impl("kd_backward", &logits::kd_backward<logits::CudaRows>);
}

}  // namespace kdfast
