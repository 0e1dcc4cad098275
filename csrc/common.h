// Helpers shared by the CPU and CUDA kernels of every op: argument checks and the element
// transforms. Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
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

}  // namespace kdfast
