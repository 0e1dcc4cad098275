// CUDA kernels of the DKD logit loss (Zhao et al. 2022, mdistiller's formula); formulas in
// kdfast/reference/dkd.py.
//
// dkd_forward:  per row, one pass over the non-target classes computes their log-sum-exps and KL
//               online; the full and masked log-sum-exps, TCKD and NCKD follow from them and z[g];
//               with_grad, a second pass writes the gradient
// dkd_backward: grad_loss[b] times that gradient, from the forward's stats
//
// The row algorithm, shared with KD and with csrc/cpu/dkd.cpp, is in csrc/softmax.h (DkdRule,
// process_row); CudaRows runs it with a warp per row for small K and a block per row for large K.
#include <torch/library.h>

#include "../softmax.h"

namespace kdfast {

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("dkd_forward", &logits::dkd_forward<logits::CudaRows>);
  m.impl("dkd_backward", &logits::dkd_backward<logits::CudaRows>);
}

}  // namespace kdfast
