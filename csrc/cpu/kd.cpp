// C++ CPU kernels of the KD logit loss (Hinton et al. 2015); formulas in kdfast/reference/kd.py.
//
// kd_forward:  per row, one pass computes lse_s, lse_t and T^2 KL(pt || ps) online; with_grad, a
//              second pass writes T (ps - pt)
// kd_backward: grad_loss[b] T (exp(zs - lse_s) - exp(zt - lse_t)) from the forward's stats
//
// The row algorithm, shared with DKD and with csrc/cuda/kd.cu, is in csrc/softmax.h (KdRule).
#include <torch/library.h>

#include "../softmax.h"

namespace kdfast {

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_forward", &logits::kd_forward<logits::CpuRows>);
  m.impl("kd_backward", &logits::kd_backward<logits::CpuRows>);
}

}  // namespace kdfast
