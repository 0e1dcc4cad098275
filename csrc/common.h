// What the CPU and CUDA kernels of several op families share: the accumulation-type rule, the
// floating dtypes the ops take, the (B, C, HW) view of a feature map, the element power g(x) = |x|^p
// and the scalars of two maps normalised to unit length (AT, block_attention), the clamped inverse
// norm, and the checks of saved tensors and upstream gradients. Each op family's own helpers live in
// its header (csrc/at.h, csrc/lcc.h, csrc/relational.h, csrc/tiles.h, csrc/block_attention.h, ...).
// Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#define KDFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDFAST_HOST_DEVICE inline
#endif

namespace kdfast {

constexpr double kNormEps = 1e-12;  // normalize(v) = v / max(||v||_2, kNormEps)

// ---------------------------------------------------------------------------------------------
// Dtypes
// ---------------------------------------------------------------------------------------------

// The accumulation dtype of every op: float64 stays float64, everything else (float16, bfloat16,
// float32) accumulates in float32. The dtype of the ops' float outputs (losses, maps, statistics)
// and of the saved tensors a backward receives.
constexpr at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// acc_dtype as a C++ type, for the kernels templated on an element type: acc_type<c10::Half> is
// float, acc_type<double> double.
template <typename scalar_t>
using acc_type = std::conditional_t<acc_dtype(c10::CppTypeToScalarType<scalar_t>::value) == at::kDouble, double, float>;

// The rule is ATen's opmath type on the four dtypes the ops take (so that the kernels' arithmetic
// is what it was when they used at::opmath_type).
static_assert(std::is_same_v<acc_type<c10::Half>, at::opmath_type<c10::Half>> &&
                  std::is_same_v<acc_type<c10::BFloat16>, at::opmath_type<c10::BFloat16>> &&
                  std::is_same_v<acc_type<float>, at::opmath_type<float>> &&
                  std::is_same_v<acc_type<double>, at::opmath_type<double>>,
              "acc_type must agree with at::opmath_type on float16, bfloat16, float32 and float64");

// The floating dtypes the ops take.
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// ---------------------------------------------------------------------------------------------
// Feature maps as (B, C, HW)
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Element math
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t sign_of(acc_t x) {
  return static_cast<acc_t>((x > acc_t(0)) - (x < acc_t(0)));
}

// g(x) = |x|^p, signed (x^p) when `odd_signed`; p >= 1 (AT's maps, block_attention's NDAM).
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

// 1 / max(length, kNormEps) (NaN stays NaN): the scale of normalize(v) for ||v|| = length.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t inv_clamped(acc_t length) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return acc_t(1) / (length < eps ? eps : length);
}

// ---------------------------------------------------------------------------------------------
// Two maps normalised to unit length (AT's map loss, block_attention's map term)
// ---------------------------------------------------------------------------------------------

// The scalars of two maps m_s, m_t (n values each), normalised as u = m / max(||m||, eps), from
// their sums ss = sum m_s^2, tt = sum m_t^2, st = sum m_s m_t:
//   inv_s, inv_t: 1 / max(||m||, eps), so u = m inv;
//   proj = <u_s, u_s - u_t>, 0 where ||m_s|| < eps (the clamp cuts the norm out of the gradient).
template <typename acc_t>
struct MapScalars {
  acc_t inv_s, inv_t, proj;

  KDFAST_HOST_DEVICE MapScalars(acc_t ss, acc_t tt, acc_t st)
      : inv_s(inv_clamped(std::sqrt(ss))),
        inv_t(inv_clamped(std::sqrt(tt))),
        proj(std::sqrt(ss) >= static_cast<acc_t>(kNormEps) ? ss * inv_s * inv_s - st * inv_s * inv_t : acc_t(0)) {}

  // (u_s - u_t)[k] from ms = m_s[k], mt = m_t[k].
  KDFAST_HOST_DEVICE acc_t difference(acc_t ms, acc_t mt) const { return ms * inv_s - mt * inv_t; }

  // d loss / d m_s[k] for a loss with d loss / d u_s = k_map (u_s - u_t): d u_s / d m_s is
  // (I - u_s u_s^T) / ||m_s|| (I / eps where the norm is clamped), so the gradient is
  // k_map inv_s ((u_s - u_t)[k] - u_s[k] proj).
  KDFAST_HOST_DEVICE acc_t map_grad(acc_t ms, acc_t mt, acc_t k_map) const {
    const acc_t us = ms * inv_s;
    return k_map * inv_s * ((us - mt * inv_t) - us * proj);
  }
};

// MapScalars of m_s, m_t (n values each), the sums taken in index order (the CPU kernels).
template <typename acc_t, typename index_t>
MapScalars<acc_t> map_scalars(const acc_t* ms, const acc_t* mt, index_t n) {
  acc_t ss = 0, tt = 0, st = 0;
  for (index_t k = 0; k < n; ++k) {
    ss += ms[k] * ms[k];
    tt += mt[k] * mt[k];
    st += ms[k] * mt[k];
  }
  return MapScalars<acc_t>(ss, tt, st);
}

// ---------------------------------------------------------------------------------------------
// Ops templated on a device
// ---------------------------------------------------------------------------------------------

// Device::Guard of the CPU kernels in the ops that take their device as a template parameter
// (csrc/softmax.h, csrc/block_attention.h): nothing to switch. The CUDA kernels' Guard is
// c10::cuda::CUDAGuard, which makes the device of the inputs current.
struct CpuGuard {
  explicit CpuGuard(c10::Device) {}
};

// ---------------------------------------------------------------------------------------------
// Inputs of a backward
// ---------------------------------------------------------------------------------------------

// `t` (a saved output of a forward) checked against `sizes`, the accumulation dtype `acc` and the
// device of `x` (the op's first input, named `x_name`), as a contiguous tensor.
inline at::Tensor check_saved(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                              at::ScalarType acc, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " for a ", x.scalar_type(), " ", x_name,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of ", x_name, " (", x.device(),
              "), got ", t.device());
  return t.contiguous();
}

// An upstream gradient of shape `sizes` (any floating dtype, on the device of `x`) in `acc`,
// contiguous: converted on the device, never read on the host.
inline at::Tensor upstream_grad(const char* op, const char* name, const at::Tensor& g, at::IntArrayRef sizes,
                                at::ScalarType acc, const at::Tensor& x) {
  TORCH_CHECK(g.sizes() == sizes && is_float_dtype(g.scalar_type()) && g.device() == x.device(), op, ": ", name,
              " must be a floating tensor of shape ", sizes, " on ", x.device(), ", got ", g.scalar_type(), " ",
              g.sizes(), " on ", g.device());
  return g.to(acc).contiguous();
}

}  // namespace kdfast
