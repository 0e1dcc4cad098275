// C++ CPU kernels of the KD logit loss (Hinton et al. 2015); formulas in kdfast/reference/kd.py.
//
// kd_forward:  per row, one pass computes lse_s, lse_t and T^2 KL(pt || ps) online; with_grad, a
//              second pass writes T (ps - pt)
// kd_backward: grad_loss[b] T (exp(zs - lse_s) - exp(zt - lse_t)) from the forward's stats
//
// The row algorithm, shared with DKD and with csrc/cuda/kd.cu, is in csrc/softmax.h (KdRule).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "../softmax.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& z_s, const at::Tensor& z_t,
                                                              double temperature, bool with_grad) {
  const logits::Logits in = logits::check_logits("kd_forward", z_s, z_t, temperature, 1);
  return logits::forward_rows<logits::KdRule, logits::CpuRows>(in, at::Tensor(), {temperature}, with_grad);
}

at::Tensor kd_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& z_s, const at::Tensor& z_t,
                           const at::Tensor& stats, double temperature) {
  const logits::Logits in = logits::check_logits("kd_backward", z_s, z_t, temperature, 1);
  return logits::backward_rows<logits::KdRule, logits::CpuRows>("kd_backward", grad_loss, in, at::Tensor(), stats,
                                                                {temperature});
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_forward", &kd_forward_cpu);
  m.impl("kd_backward", &kd_backward_cpu);
}

}  // namespace kdfast
