// Host and device helpers of the masked_mse op shared by csrc/cpu/masked_mse.cpp and
// csrc/cuda/masked_mse.cu (op contract in kdfast/ops/masked_mse.py): argument checks, the launch
// views, the dtype dispatch and the reduction's scale.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <string>
#include <utility>

#include "common.h"

namespace kdfast {

enum class MaskedMseReduction { kMean, kMaskedMean, kSum };

inline MaskedMseReduction parse_masked_mse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return MaskedMseReduction::kMean;
  if (reduction == "masked_mean") return MaskedMseReduction::kMaskedMean;
  if (reduction == "sum") return MaskedMseReduction::kSum;
  TORCH_CHECK(false, "masked_mse_forward: reduction must be 'mean', 'masked_mean' or 'sum', got '",
              std::string(reduction), "'");
}

// The inputs of a masked_mse call in their launch views: x, y and the mask (as (B, 1, H, W)) with h
// and w flattened into one strided dim (a contiguous copy of a tensor where they do not flatten).
struct MaskedMseInputs {
  at::Tensor x, y, mask;
  Bchw dx, dy, dm;     // dm: batch = B, channels = 1
  at::ScalarType acc;  // float64 for float64 x, else float32: outputs and accumulation
};

inline MaskedMseInputs check_masked_mse(const char* op, const at::Tensor& x, const at::Tensor& y,
                                        const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 4 && x.sizes() == y.sizes() && x.numel() > 0, op,
              ": x and y must be non-empty (B, C, H, W) tensors of one shape, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == x.size(0) && mask.size(1) == x.size(2) && mask.size(2) == x.size(3),
              op, ": mask must be (B, H, W) = (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ", mask.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()) && y.scalar_type() == x.scalar_type() &&
                  is_float_dtype(mask.scalar_type()),
              op, ": x and y must share one floating dtype and mask be floating, got ", x.scalar_type(), ", ",
              y.scalar_type(), " and ", mask.scalar_type());
  TORCH_CHECK(y.device() == x.device() && mask.device() == x.device(), op, ": x, y and mask must be on one device");
  MaskedMseInputs in{hw_flattenable_view(x), hw_flattenable_view(y), hw_flattenable_view(mask.unsqueeze(1))};
  in.dx = bchw(in.x), in.dy = bchw(in.y), in.dm = bchw(in.mask);
  in.acc = acc_dtype(x.scalar_type());
  return in;
}

// The gradient buffer of a launch view `t`: empty_like(t), or an empty (0,) tensor where not needed.
inline at::Tensor masked_mse_grad_buffer(const at::Tensor& t, bool needed) {
  return needed ? at::empty_like(t) : at::empty({0}, t.options());
}

// The inputs of masked_mse_backward, checked: those of the forward, and in the accumulation dtype
// on x's device, the upstream gradient and the saved scale (both 0-d).
struct MaskedMseBackwardInputs {
  MaskedMseInputs in;
  at::Tensor grad_loss, scale;
};

inline MaskedMseBackwardInputs check_masked_mse_backward(const at::Tensor& grad_loss, const at::Tensor& x,
                                                         const at::Tensor& y, const at::Tensor& mask,
                                                         const at::Tensor& scale) {
  const char* op = "masked_mse_backward";
  MaskedMseInputs in = check_masked_mse(op, x, y, mask);
  at::Tensor g = upstream_grad(op, "grad_loss", grad_loss, {}, in.acc, in.x);
  at::Tensor s = check_saved(op, "scale", scale, {}, in.acc, in.x, "x");
  return {std::move(in), std::move(g), std::move(s)};
}

// fn(x_tag, mask_tag) with value-initialised tags of the element types of x (and y) and of the mask.
template <typename Fn>
void dispatch_masked_mse(const MaskedMseInputs& in, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "masked_mse", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.mask.scalar_type(), "masked_mse",
                                    [&] { fn(x_t{}, scalar_t{}); });
  });
}

// 1 / denom of the reduction from sum_{b,hw} m^2: B C HW ("mean"), C sum m^2 ("masked_mean"; 0 where
// that is not > 0) or 1 ("sum").
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t masked_mse_scale(MaskedMseReduction reduction, acc_t mask_sq_sum, int64_t numel,
                                          int64_t channels) {
  if (reduction == MaskedMseReduction::kMean) return acc_t(1) / static_cast<acc_t>(numel);
  if (reduction == MaskedMseReduction::kSum) return acc_t(1);
  const acc_t denom = static_cast<acc_t>(channels) * mask_sq_sum;
  return denom > acc_t(0) ? acc_t(1) / denom : acc_t(0);
}

}  // namespace kdfast
