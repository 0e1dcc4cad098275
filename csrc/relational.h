// The relational ops SP (similarity-preserving) and RKD (relational KD): a (B, Ds) student and a
// (B, Dt) teacher compared row pair by row pair. The argument checks and the per-row and per-pair
// math shared by csrc/cpu/sp.cpp, csrc/cuda/sp.cu, csrc/cpu/rkd.cpp and csrc/cuda/rkd.cu. The op
// contracts are in kdfast/ops/sp.py and kdfast/ops/rkd.py, the formulas in kdfast/reference/sp.py
// and kdfast/reference/rkd.py. Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "tiles.h"

namespace kdfast {

// The rows of a (B, D) matrix as the descriptors of a grid of 1 (the (B, D, 1, 1) map), so that the
// tiles of row pairs (csrc/cpu/tiles.h, csrc/cuda/tiles.cuh) read them through their strides.
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
          acc_dtype(x_s.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// SP
// ---------------------------------------------------------------------------------------------

constexpr int kSpStats = 3;  // columns of sp_forward's stats (B, 3): inv_s, inv_t, proj

// The inputs of sp_backward, checked: the rows, and in the accumulation dtype, contiguous, the
// upstream gradient (0-d) and the saved stats.
struct SpBackwardInputs {
  RowPair rows;
  at::Tensor grad_loss, stats;
};

inline SpBackwardInputs check_sp_backward(const at::Tensor& grad_loss, const at::Tensor& x_s, const at::Tensor& x_t,
                                          const at::Tensor& stats) {
  const char* op = "sp_backward";
  const RowPair in = check_row_pair(op, x_s, x_t, "x_s", "x_t");
  return {in, upstream_grad(op, "grad_loss", grad_loss, {}, in.acc, x_s),
          check_saved(op, "stats", stats, {in.rows, kSpStats}, in.acc, x_s, "x_s")};
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

// ---------------------------------------------------------------------------------------------
// RKD
// ---------------------------------------------------------------------------------------------

// The inputs of rkd_backward, checked: the rows of e_s, and in the accumulation dtype, contiguous,
// the upstream gradient of the terms (2,) and the saved sq_dist (2, B, B) and stats (3,).
struct RkdBackwardInputs {
  RowPair rows;
  at::Tensor grad_terms, sq_dist, stats;
};

inline RkdBackwardInputs check_rkd_backward(const at::Tensor& grad_terms, const at::Tensor& e_s,
                                            const at::Tensor& sq_dist, const at::Tensor& stats) {
  const char* op = "rkd_backward";
  const RowPair in = check_row_pair(op, e_s, e_s, "e_s", "e_s");
  return {in, upstream_grad(op, "grad_terms", grad_terms, {2}, in.acc, e_s),
          check_saved(op, "sq_dist", sq_dist, {2, in.rows, in.rows}, in.acc, e_s, "e_s"),
          check_saved(op, "stats", stats, {3}, in.acc, e_s, "e_s")};
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
