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

// 1 / max(length, kNormEps) (NaN stays NaN): the scale of normalize(v) for ||v|| = length.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t inv_clamped(acc_t length) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return acc_t(1) / (length < eps ? eps : length);
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

// ---------------------------------------------------------------------------------------------
// Relational ops (SP, RKD): a (B, Ds) student and a (B, Dt) teacher, compared row pair by row pair
// ---------------------------------------------------------------------------------------------

// The combinations of two row elements that the tiles of row pairs sum over the elements
// (csrc/cpu/tiles.h, csrc/cuda/tiles.cuh): combine(a, b) == combine(b, a), bitwise.
struct Product {
  template <typename T>
  KDFAST_HOST_DEVICE T operator()(T a, T b) const {
    return a * b;
  }
};
struct SquaredDifference {
  template <typename T>
  KDFAST_HOST_DEVICE T operator()(T a, T b) const {
    const T d = a - b;
    return d * d;
  }
};

// The rows of a (B, D) matrix as the descriptors of a grid of 1 (the (B, D, 1, 1) map), so that the
// tiled correlation code of LCC reads them through their strides.
inline Regions matrix_rows(const at::Tensor& x) {
  const int dim = static_cast<int>(x.size(1));
  return {1, 1, dim, 1, 1, dim, x.stride(0), x.stride(1), 0, 0, false};
}

// The rows of an sp_* / rkd_* call, checked.
struct RowPair {
  Regions s, t;
  int rows;            // B
  at::ScalarType acc;  // float64 for a float64 student, else float32: outputs and accumulation
};

inline RowPair check_row_pair(const char* op, const at::Tensor& x_s, const at::Tensor& x_t, const char* name_s,
                              const char* name_t) {
  for (const auto* x : {&x_s, &x_t}) {
    const char* name = x == &x_s ? name_s : name_t;
    TORCH_CHECK(x->dim() == 2 && x->size(0) >= 1 && x->size(1) >= 1, op, ": ", name,
                " must be 2-D (B >= 1, D >= 1), got shape ", x->sizes());
    TORCH_CHECK(is_float_dtype(x->scalar_type()), op, ": ", name,
                " must be float16, bfloat16, float32 or float64, got ", x->scalar_type());
    constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();
    TORCH_CHECK(x->size(0) <= kMaxIndex && x->size(1) <= kMaxIndex, op, ": ", name, " ", x->sizes(),
                ": B and D must be below 2^31");
  }
  TORCH_CHECK(x_s.size(0) == x_t.size(0) && x_s.device() == x_t.device(), op, ": ", name_s, " and ", name_t,
              " must have one batch size and device, got ", x_s.sizes(), " on ", x_s.device(), " and ", x_t.sizes(),
              " on ", x_t.device());
  return {matrix_rows(x_s), matrix_rows(x_t), static_cast<int>(x_s.size(0)),
          x_s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat};
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

// SP stats of a row, [inv_s, inv_t, proj], from the sums of squares of its S_s and S_t rows and
// proj = sum_j G_s_ij (G_s - G_t)_ij: proj is 0 where ||S_s[i]|| < eps (the clamp cuts the norm out of
// the gradient).
template <typename acc_t>
KDFAST_HOST_DEVICE void sp_stats_row(acc_t sum_squares_s, acc_t sum_squares_t, acc_t proj, acc_t* row) {
  const acc_t norm_s = std::sqrt(sum_squares_s);
  row[0] = inv_clamped(norm_s);
  row[1] = inv_clamped(std::sqrt(sum_squares_t));
  row[2] = norm_s >= static_cast<acc_t>(kNormEps) ? proj : acc_t(0);
}

// SP backward coefficients of a row from its stats [inv_s, inv_t, proj] (sp_forward) and
// k = 2 grad_loss / B^2: alpha = k inv_s^2 (1 - proj), beta = k inv_s inv_t.
template <typename acc_t>
KDFAST_HOST_DEVICE void sp_coefficients(const acc_t* row, acc_t k, acc_t& alpha, acc_t& beta) {
  alpha = k * row[0] * row[0] * (acc_t(1) - row[2]);
  beta = k * row[0] * row[1];
}

// smooth_l1(z) with beta 1: z^2 / 2 where |z| < 1, else |z| - 1/2.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t smooth_l1(acc_t z) {
  const acc_t az = z < acc_t(0) ? -z : z;
  return az < acc_t(1) ? acc_t(0.5) * z * z : az - acc_t(0.5);
}

// d smooth_l1 / dz as torch: z clamped to [-1, 1] (NaN stays NaN).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t smooth_l1_grad(acc_t z) {
  return z < acc_t(-1) ? acc_t(-1) : (z > acc_t(1) ? acc_t(1) : z);
}

// RKD (kernels/rkd.py states the formulas): everything from the squared distances R[a][b] = ||e_a - e_b||^2
// (bitwise symmetric, exactly 0 for duplicated rows). For an anchor i and a row k, length_ik = sqrt(R_ik),
// inv_ik = inv_clamped(length_ik), and n_ik = normalize(e_k - e_i) is 0 where length_ik < eps.
template <typename acc_t>
KDFAST_HOST_DEVICE bool rkd_zero(acc_t length) {
  return length < static_cast<acc_t>(kNormEps);
}

// d_ik = sqrt(max(R_ik, eps)) where `keep` (k != i), else 0 (mdistiller's _pdist).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t rkd_distance(acc_t r2, bool keep) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return keep ? std::sqrt(r2 < eps ? eps : r2) : acc_t(0);
}

// One network's pairs, B x B row-major each: R, length = sqrt(R) and inv.
template <typename acc_t>
struct RkdPairs {
  const acc_t* r;
  const acc_t* length;
  const acc_t* inv;
};

// The (length, inv) of R[idx].
template <typename acc_t>
KDFAST_HOST_DEVICE void rkd_pair(const acc_t* r, int64_t idx, acc_t* length, acc_t* inv) {
  length[idx] = std::sqrt(r[idx]);
  inv[idx] = inv_clamped(length[idx]);
}

// One network's cos_ijk for an anchor i, a row j and any k: cos_ijk = <n_ij, n_ik> = w_ijk inv_ij inv_ik,
// w_ijk = ((R_ij + R_ik) - R_jk) / 2, 0 where n_ij or n_ik is 0 (NaN propagates); symmetric in j and k,
// bitwise.
template <typename acc_t>
struct RkdTriplets {
  const acc_t *r_i, *length_i, *inv_i, *r_j;  // rows i of the pairs, row j of R
  acc_t r_ij, length_ij, inv_ij;

  KDFAST_HOST_DEVICE RkdTriplets(const RkdPairs<acc_t>& p, int64_t n, int64_t i, int64_t j)
      : r_i(p.r + i * n),
        length_i(p.length + i * n),
        inv_i(p.inv + i * n),
        r_j(p.r + j * n),
        r_ij(r_i[j]),
        length_ij(length_i[j]),
        inv_ij(inv_i[j]) {}

  KDFAST_HOST_DEVICE acc_t cosine(int64_t k) const {
    const acc_t w = ((r_ij + r_i[k]) - r_j[k]) * acc_t(0.5);
    // | and & (not || and &&): no conditional load, so that the loops over k vectorise
    return (rkd_zero(length_ij) | rkd_zero(length_i[k]) ? acc_t(0) : w) * (inv_ij * inv_i[k]);
  }
  // c where at most one of n_ij, n_ik is 0 (A_ijk is 0 where both are).
  KDFAST_HOST_DEVICE acc_t pair_weight(acc_t c, int64_t k) const {
    return rkd_zero(length_ij) & rkd_zero(length_i[k]) ? acc_t(0) : c;
  }
};

// Forward, per (i, k): adds d_ik (and 1) to the positive-distance sum (and count) of each network.
template <typename acc_t>
KDFAST_HOST_DEVICE void rkd_add_positive(acc_t r_s, acc_t r_t, bool keep, acc_t* sums) {
  const acc_t d[2] = {rkd_distance(r_s, keep), rkd_distance(r_t, keep)};
  for (int net = 0; net < 2; ++net) {
    sums[2 * net] += d[net] > acc_t(0) ? d[net] : acc_t(0);
    sums[2 * net + 1] += d[net] > acc_t(0) ? acc_t(1) : acc_t(0);
  }
}

// scales[net] = count / sum of the positive distances (0 without any) from rkd_add_positive's sums.
template <typename acc_t>
KDFAST_HOST_DEVICE void rkd_scales(const acc_t* sums, acc_t* scales) {
  for (int net = 0; net < 2; ++net) {
    const acc_t count = sums[2 * net + 1];
    scales[net] = count > acc_t(0) ? count / sums[2 * net] : acc_t(0);
  }
}

// Forward, per (i, k): adds smooth_l1(x_s - x_t) to sums[0] and smooth_l1'(x_s - x_t) x_s to sums[1]
// (x = d scale).
template <typename acc_t>
KDFAST_HOST_DEVICE void rkd_add_distance(acc_t r_s, acc_t r_t, bool keep, const acc_t* scales, acc_t* sums) {
  const acc_t x = rkd_distance(r_s, keep) * scales[0];
  const acc_t z = x - rkd_distance(r_t, keep) * scales[1];
  sums[0] += smooth_l1(z);
  sums[1] += smooth_l1_grad(z) * x;
}

// terms = [L_dist, L_angle] and stats[2] = mean_gx from the sums over every row: positive (4, as
// rkd_add_positive), distance (2, as rkd_add_distance) and the angle term's sum over the triplets.
template <typename acc_t>
KDFAST_HOST_DEVICE void rkd_terms(const acc_t* positive, const acc_t* distance, acc_t angle, int64_t n,
                                  acc_t* terms, acc_t* stats) {
  terms[0] = distance[0] / static_cast<acc_t>(n * n);
  terms[1] = angle / static_cast<acc_t>(n * n * n);
  stats[2] = distance[1] / (positive[1] < acc_t(1) ? acc_t(1) : positive[1]);
}

// Backward: the upstream gradients of the terms over their counts, gd = g[0] / B^2, ga = g[1] / B^3.
template <typename acc_t>
struct RkdUpstream {
  acc_t gd, ga;

  KDFAST_HOST_DEVICE RkdUpstream(const acc_t* g, int64_t n) {
    const acc_t size = static_cast<acc_t>(n);
    gd = g[0] / (size * size);
    ga = g[1] / (size * size * size);
  }
};

// Backward, per (i, j, k) for the anchor i: adds A_ijk / inv_ik to a and c_ijk cos_ijk to q
// (c_ijk = ga smooth_l1'(cos_s - cos_t), A_ijk = c_ijk inv_ij inv_ik where not both n are 0).
template <typename acc_t>
KDFAST_HOST_DEVICE void rkd_add_anchor(const RkdTriplets<acc_t>& s, const RkdTriplets<acc_t>& t, int64_t k,
                                       acc_t ga, acc_t& a, acc_t& q) {
  const acc_t cos_s = s.cosine(k);
  const acc_t c = ga * smooth_l1_grad(cos_s - t.cosine(k));
  a += s.pair_weight(c, k) * s.inv_ij;
  q += c * cos_s;
}

// Backward: dR[i][k] (idx = i B + k) without the triplet part, from the anchor's sums a and q: the
// angle term through w (both places of R_ik) and through inv_ik, and the distance term (gd over B^2,
// stats = [scale_s, scale_t, mean_gx]; 0 where the distance is clamped and on the diagonal).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t rkd_anchor_grad(acc_t a, acc_t q, const RkdPairs<acc_t>& s, const RkdPairs<acc_t>& t,
                                         int64_t idx, bool keep, acc_t gd, const acc_t* stats) {
  const acc_t inv = s.inv[idx], r_s = s.r[idx];
  const acc_t angle = a * inv - (rkd_zero(s.length[idx]) ? acc_t(0) : q * inv * inv);
  const acc_t d_s = rkd_distance(r_s, keep), x_s = d_s * stats[0];
  const acc_t dd = gd * stats[0] * (smooth_l1_grad(x_s - rkd_distance(t.r[idx], keep) * stats[1]) -
                                    (d_s > acc_t(0) ? stats[2] : acc_t(0)));
  return angle + (keep && r_s >= static_cast<acc_t>(kNormEps) ? dd * acc_t(0.5) / d_s : acc_t(0));
}

// Backward, per (i, j, k): A_ijk, of which dR[j][k] loses the half (R_jk in w_ijk).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t rkd_triplet_weight(const RkdTriplets<acc_t>& s, const RkdTriplets<acc_t>& t, int64_t k,
                                            acc_t ga) {
  return s.pair_weight(ga * smooth_l1_grad(s.cosine(k) - t.cosine(k)), k) * (s.inv_ij * s.inv_i[k]);
}

}  // namespace kdfast
