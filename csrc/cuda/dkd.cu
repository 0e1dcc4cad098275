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
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../softmax.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_forward_cuda(const at::Tensor& z_s, const at::Tensor& z_t,
                                                                const at::Tensor& target, double alpha, double beta,
                                                                double temperature, bool with_grad) {
  const logits::Logits in = logits::check_logits("dkd_forward", z_s, z_t, temperature, 2);
  const c10::cuda::CUDAGuard guard(z_s.device());  // z_s, z_t (and the other tensors: checked) share it
  const at::Tensor g = logits::check_target("dkd_forward", target, in);
  return logits::forward_rows<logits::DkdRule, logits::CudaRows>(in, g, {temperature, alpha, beta}, with_grad);
}

at::Tensor dkd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& z_s, const at::Tensor& z_t,
                             const at::Tensor& target, const at::Tensor& stats, double alpha, double beta,
                             double temperature) {
  const logits::Logits in = logits::check_logits("dkd_backward", z_s, z_t, temperature, 2);
  const c10::cuda::CUDAGuard guard(z_s.device());  // z_s, z_t (and the other tensors: checked) share it
  const at::Tensor g = logits::check_target("dkd_backward", target, in);
  return logits::backward_rows<logits::DkdRule, logits::CudaRows>("dkd_backward", grad_loss, in, g, stats,
                                                                  {temperature, alpha, beta});
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("dkd_forward", &dkd_forward_cuda);
  m.impl("dkd_backward", &dkd_backward_cuda);
}

}  // namespace kdfast
