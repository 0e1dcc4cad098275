// Helpers shared by the CPU and CUDA kernels of every op: argument checks and the element
// transforms. Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define KDFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDFAST_HOST_DEVICE inline
#endif

namespace kdfast {

constexpr double kNormEps = 1e-12;  // normalize(v) = v / max(||v||_2, kNormEps)

// A (B, C, H, W) feature map viewed as (B, C, HW): valid for contiguous and channels_last
// tensors (and any layout where h and w flatten into one strided dim).
struct Bchw {
  int64_t batch, channels, hw;
  int64_t stride_b, stride_c, stride_hw;
};

inline bool hw_flattenable(const at::Tensor& t) {
  return t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

// Returns `t`, or a contiguous copy when its h and w dims do not flatten into one.
inline at::Tensor hw_flattenable_view(const at::Tensor& t) {
  return hw_flattenable(t) ? t : t.contiguous();
}

inline Bchw bchw(const at::Tensor& t) {
  const int64_t stride_hw = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  return {t.size(0), t.size(1), t.size(2) * t.size(3), t.stride(0), t.stride(1), stride_hw};
}

inline void check_feature_list(const std::vector<at::Tensor>& feats, const char* name) {
  TORCH_CHECK(!feats.empty(), name, ": expected at least one tensor");
  for (const auto& f : feats) {
    TORCH_CHECK(f.dim() == 4, name, ": expected 4-D (B, C, H, W) tensors, got ", f.dim(), "-D");
    TORCH_CHECK(f.scalar_type() == feats[0].scalar_type(), name, ": all tensors must share one dtype");
    TORCH_CHECK(f.device() == feats[0].device(), name, ": all tensors must be on one device");
    TORCH_CHECK(f.numel() > 0, name, ": empty tensor of shape ", f.sizes());
  }
}

enum class MapMode { kMean, kSum };

inline MapMode parse_map_mode(c10::string_view mode) {
  if (mode == "mean") return MapMode::kMean;
  if (mode == "sum") return MapMode::kSum;
  TORCH_CHECK(false, "at_maps: mode must be 'mean' or 'sum', got '", std::string(mode), "'");
}

// g(x) = |x|^p, signed (x^p) when `odd_signed`; p >= 1.
struct Power {
  double p;
  bool odd_signed;  // mode "mean" with an odd integer p: g(x) = x^p keeps the sign of x
};

inline Power make_power(double p, MapMode mode) {
  TORCH_CHECK(std::isfinite(p) && p >= 1.0, "at_maps: p must be a finite number >= 1, got ", p);
  const bool integer = std::floor(p) == p;
  TORCH_CHECK(mode == MapMode::kSum || integer,
              "at_maps: mode 'mean' computes f^p and needs an integer p, got ", p);
  return {p, mode == MapMode::kMean && integer && std::fmod(p, 2.0) == 1.0};
}

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t sign_of(acc_t x) {
  return static_cast<acc_t>((x > acc_t(0)) - (x < acc_t(0)));
}

// g(x)
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t power_value(acc_t x, acc_t p, bool odd_signed) {
  if (p == acc_t(2)) return x * x;
  const acc_t ax = x < acc_t(0) ? -x : x;
  const acc_t r = p == acc_t(1) ? ax : (ax == acc_t(0) ? acc_t(0) : std::pow(ax, p));
  return odd_signed ? sign_of(x) * r : r;
}

// g'(x): p |x|^(p-1), times sign(x) unless odd_signed; 0^0 = 1 (p == 1).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t power_grad(acc_t x, acc_t p, bool odd_signed) {
  if (p == acc_t(2)) return acc_t(2) * x;
  const acc_t ax = x < acc_t(0) ? -x : x;
  const acc_t mag = p == acc_t(1) ? acc_t(1) : (ax == acc_t(0) ? acc_t(0) : p * std::pow(ax, p - acc_t(1)));
  return odd_signed ? mag : sign_of(x) * mag;
}

// ---------------------------------------------------------------------------------------------
// LCC: region descriptors of a feature map (kdfast/reference/lcc.py)
// ---------------------------------------------------------------------------------------------

// The descriptors of a (B, C, H, W) map cut into a k x k grid (k divides H and W), read in place
// through the map's strides: row n = i k^2 + py k + px (N = B k^2 rows) holds the D = C rh rw
// elements of region (py, px) of sample i. A row's elements are enumerated channel-major (c, y, x),
// or (y, x, c) when the channels are the map's fastest dim (channels_last), so that consecutive
// elements are close in memory: any fixed order gives the same dot products and norms.
struct Regions {
  // Sizes in int: N and D are below 2^31 (check_lcc_maps), so the index divisions are 32-bit.
  int grid, positions;  // k, k^2
  int channels, rh, rw, dim;
  int64_t stride_b, stride_c, stride_h, stride_w;
  bool channels_inner;  // (y, x, c) order

  KDFAST_HOST_DEVICE int64_t row_offset(int n) const {
    const int i = n / positions, p = n % positions;
    return i * stride_b + (p / grid) * rh * stride_h + (p % grid) * rw * stride_w;
  }
  KDFAST_HOST_DEVICE int64_t element_offset(int e) const {
    const int area = rh * rw;
    const int c = channels_inner ? e % channels : e / area;
    const int yx = channels_inner ? e / channels : e % area;
    return c * stride_c + (yx / rw) * stride_h + (yx % rw) * stride_w;
  }
};

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
  const acc_t norm = std::sqrt(sum_squares), eps = static_cast<acc_t>(kNormEps);
  return acc_t(1) / (norm < eps ? eps : norm);
}

// Whether lcc_inv_norm clamped the norm (then d u / d x = I * inv_norm, else (I - u u^T) * inv_norm).
template <typename acc_t>
KDFAST_HOST_DEVICE bool lcc_norm_clamped(acc_t inv_norm) {
  return !(inv_norm < acc_t(1) / static_cast<acc_t>(kNormEps));
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
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
          f_s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat};
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
    TORCH_CHECK(v.dim() == 1 && v.size(0) == size, op, ": ", name, " must have shape (", size, ",), got ",
                v.sizes());
    TORCH_CHECK(v.scalar_type() == maps.acc, op, ": ", name, " must be ", maps.acc, " for a ", f_s.scalar_type(),
                " f_s, got ", v.scalar_type());
    TORCH_CHECK(v.device() == f_s.device(), op, ": ", name, " must be on the device of f_s (", f_s.device(),
                "), got ", v.device());
    return v.contiguous();
  };
  return {maps, vector("grad_sums", grad_sums, 3), vector("inv_norm_s", inv_norm_s, maps.rows),
          vector("inv_norm_t", inv_norm_t, maps.rows)};
}

}  // namespace kdfast
