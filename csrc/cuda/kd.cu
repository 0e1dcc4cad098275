// CUDA kernels of the KD logit loss (Hinton et al. 2015); formulas in kdfast/reference/kd.py.
//
// kd_forward:  per row, one pass computes lse_s, lse_t and T^2 KL(pt || ps) online; with_grad, a
//              second pass writes T (ps - pt)
// kd_backward: grad_loss[b] T (exp(zs - lse_s) - exp(zt - lse_t)) from the forward's stats
//
// The row algorithm, shared with DKD and with csrc/cpu/kd.cpp, is in csrc/softmax.h (KdRule,
// process_row); CudaRows runs it with a warp per row for small K and a block per row for large K.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../softmax.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward_cuda(const at::Tensor& z_s, const at::Tensor& z_t,
                                                               double temperature, bool with_grad) {
  const logits::Logits in = logits::check_logits("kd_forward", z_s, z_t, temperature, 1);
  const c10::cuda::CUDAGuard guard(z_s.device());  // z_s, z_t (and the other tensors: checked) share it
  return logits::forward_rows<logits::KdRule, logits::CudaRows>(in, at::Tensor(), {temperature}, with_grad);
}

at::Tensor kd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& z_s, const at::Tensor& z_t,
                            const at::Tensor& stats, double temperature) {
  const logits::Logits in = logits::check_logits("kd_backward", z_s, z_t, temperature, 1);
  const c10::cuda::CUDAGuard guard(z_s.device());  // z_s, z_t (and the other tensors: checked) share it
  return logits::backward_rows<logits::KdRule, logits::CudaRows>("kd_backward", grad_loss, in, at::Tensor(), stats,
                                                                 {temperature});
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("kd_forward", &kd_forward_cuda);
  m.impl("kd_backward", &kd_backward_cuda);
}

}  // namespace kdfast
