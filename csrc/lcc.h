// Local correlation consistency (LCC, Li et al. 2020): the region descriptors of a feature map, the
// class of a pair of them, the normalisation and the argument checks shared by csrc/cpu/lcc.cpp and
// csrc/cuda/lcc.cu. The op contract is in kdfast/ops/lcc.py, the formulas in kdfast/reference/lcc.py.
// Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "tiles.h"

namespace kdfast {

// The regions of `t`, a (B, C, H, W) tensor of the shape of `order`'s map, in `order`'s element order.
inline Regions regions_like(const Regions& order, const at::Tensor& t) {
  Regions r = order;
  r.stride_b = t.stride(0), r.stride_c = t.stride(1), r.stride_h = t.stride(2), r.stride_w = t.stride(3);
  return r;
}

// The regions of `f` (D < 2^31: checked by check_lcc_maps).
inline Regions regions(const at::Tensor& f, int64_t grid) {
  const int k = static_cast<int>(grid);
  const int rh = static_cast<int>(f.size(2) / grid), rw = static_cast<int>(f.size(3) / grid);
  const int channels = static_cast<int>(f.size(1));
  const Regions order{k, k * k, channels, rh, rw, channels * rh * rw, 0, 0, 0, 0, f.stride(1) < f.stride(3)};
  return regions_like(order, f);
}

// Class of the ordered pair (n, m): 0 intra (same sample), 1 inter (other sample, same position),
// 2 cross (other sample, other position).
KDFAST_HOST_DEVICE int lcc_pair_class(int n, int m, int positions) {
  if (n / positions == m / positions) return 0;
  return n % positions == m % positions ? 1 : 2;
}

// 1 / max(||x||, kNormEps) from ||x||^2.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t lcc_inv_norm(acc_t sum_squares) {
  return inv_clamped(std::sqrt(sum_squares));
}

// Whether lcc_inv_norm clamped the norm (then d u / d x = I * inv_norm, else (I - u u^T) * inv_norm).
template <typename acc_t>
KDFAST_HOST_DEVICE bool lcc_norm_clamped(acc_t inv_norm) {
  return !(inv_norm < acc_t(1) / static_cast<acc_t>(kNormEps));
}

// The maps of an lcc_forward / lcc_backward call, checked.
struct LccMaps {
  Regions s, t;
  int rows;            // N = B k^2
  at::ScalarType acc;  // float64 for a float64 f_s, else float32: sums, inverse norms, accumulation
};

inline LccMaps check_lcc_maps(const char* op, const at::Tensor& f_s, const at::Tensor& f_t, int64_t grid) {
  TORCH_CHECK(f_s.dim() == 4 && f_t.dim() == 4, op, ": f_s and f_t must be 4-D (B, C, H, W), got shapes ",
              f_s.sizes(), " and ", f_t.sizes());
  TORCH_CHECK(f_t.size(0) == f_s.size(0) && f_t.size(2) == f_s.size(2) && f_t.size(3) == f_s.size(3), op,
              ": f_s ", f_s.sizes(), " and f_t ", f_t.sizes(), " must share B, H and W");
  TORCH_CHECK(f_s.numel() > 0 && f_t.numel() > 0, op, ": empty feature map");
  TORCH_CHECK(is_float_dtype(f_s.scalar_type()) && is_float_dtype(f_t.scalar_type()), op,
              ": f_s and f_t must be float16, bfloat16, float32 or float64, got ", f_s.scalar_type(), " and ",
              f_t.scalar_type());
  TORCH_CHECK(f_t.device() == f_s.device(), op, ": f_t must be on the device of f_s (", f_s.device(), "), got ",
              f_t.device());
  TORCH_CHECK(grid >= 1 && f_s.size(2) % grid == 0 && f_s.size(3) % grid == 0, op, ": grid ", grid,
              " must be >= 1 and divide H = ", f_s.size(2), " and W = ", f_s.size(3));
  constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();
  const int64_t area = f_s.size(2) / grid * (f_s.size(3) / grid);
  TORCH_CHECK(f_s.size(0) * grid * grid <= kMaxIndex && std::max(f_s.size(1), f_t.size(1)) * area <= kMaxIndex, op,
              ": too many regions or too large regions (B k^2 and C H W / k^2 must be below 2^31)");
  return {regions(f_s, grid), regions(f_t, grid), static_cast<int>(f_s.size(0) * grid * grid),
          acc_dtype(f_s.scalar_type())};
}

// The inputs of lcc_backward, checked: the (3,) and (N,) vectors in the accumulation dtype, on the
// maps' device, contiguous.
struct LccBackwardInputs {
  LccMaps maps;
  at::Tensor grad_sums, inv_norm_s, inv_norm_t;
};

inline LccBackwardInputs check_lcc_backward(const at::Tensor& grad_sums, const at::Tensor& f_s, const at::Tensor& f_t,
                                            const at::Tensor& inv_norm_s, const at::Tensor& inv_norm_t,
                                            int64_t grid) {
  const char* op = "lcc_backward";
  const LccMaps maps = check_lcc_maps(op, f_s, f_t, grid);
  auto vector = [&](const char* name, const at::Tensor& v, int64_t size) {
    return check_saved(op, name, v, {size}, maps.acc, f_s, "f_s");
  };
  return {maps, vector("grad_sums", grad_sums, 3), vector("inv_norm_s", inv_norm_s, maps.rows),
          vector("inv_norm_t", inv_norm_t, maps.rows)};
}

}  // namespace kdfast
