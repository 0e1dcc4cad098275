// C++ CPU kernels of the similarity-preserving loss (SP, Tung & Mori 2019): the op contract of
// kdfast/ops/sp.py with the algorithm of kernels/sp.py, flash-style in strips of rows instead of
// tiles. With S = X X^T per network, n_i = ||S[i]||, inv_i = 1 / max(n_i, eps) and G = diag(inv) S:
//
// sp_forward:  per strip of kStrip rows i, the S_s and S_t rows of the strip (kStrip x B, at::mm
//              of the strip's rows with all rows: BLAS), then per row the norms, the loss row
//              sum_j (G_s - G_t)_ij^2 and proj_i = sum_j G_s_ij (G_s - G_t)_ij (0 where n_s_i < eps);
//              loss = sum_i loss_i / B^2, stats[i] = [inv_s, inv_t, proj]
// sp_backward: per strip, the recomputed S rows give M_ij = (a_i + a_j) S_s_ij - (b_i + b_j) S_t_ij,
//              a = k inv_s^2 (1 - proj), b = k inv_s inv_t, k = 2 grad_loss / B^2, and
//              dX_s[strip] = M[strip] X_s (at::mm)
//
// No B x B matrix is ever stored: two kStrip x B strips, O(B) loss rows and coefficients, and the
// inputs in the accumulation dtype (float; double for a double x_s): a copy only for
// float16/bfloat16 inputs (or a float x_t beside a double x_s), read in place otherwise. The sums
// run in row order; the matrix products are at::mm's (BLAS, multi-threaded).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../relational.h"

namespace kdfast {
namespace {

constexpr int64_t kStrip = 64;  // rows of a strip

// For every strip of rows [r0, r0 + rows): its S_s and S_t rows s and t (rows x B, contiguous, by
// at::mm), then row(r0 + i, s[i], t[i]) for its rows in parallel, then strip(r0, s, t).
template <typename acc_t, typename Row, typename Strip>
void for_each_strip(const at::Tensor& xs, const at::Tensor& xt, Row&& row, Strip&& strip) {
  const int64_t n = xs.size(0);
  const at::Tensor strip_s = at::empty({std::min(kStrip, n), n}, xs.options()), strip_t = at::empty_like(strip_s);
  for (int64_t r0 = 0; r0 < n; r0 += kStrip) {
    const int64_t rows = std::min(kStrip, n - r0);
    at::Tensor s = strip_s.narrow(0, 0, rows), t = strip_t.narrow(0, 0, rows);
    at::mm_out(s, xs.narrow(0, r0, rows), xs.t());
    at::mm_out(t, xt.narrow(0, r0, rows), xt.t());
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row(r0 + i, s.mutable_data_ptr<acc_t>() + i * n, t.const_data_ptr<acc_t>() + i * n);
      }
    });
    strip(r0, s, t);
  }
}

template <typename acc_t>
acc_t forward_rows(const at::Tensor& xs, const at::Tensor& xt, acc_t* stats) {
  const int64_t n = xs.size(0);
  std::vector<acc_t> loss_rows(n);
  auto row = [&](int64_t r, const acc_t* s, const acc_t* t) {
    acc_t ss = 0, tt = 0;
    for (int64_t j = 0; j < n; ++j) {
      ss += s[j] * s[j];
      tt += t[j] * t[j];
    }
    const acc_t inv_s = inv_clamped(std::sqrt(ss)), inv_t = inv_clamped(std::sqrt(tt));
    acc_t loss = 0, proj = 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t g_s = s[j] * inv_s;
      const acc_t diff = g_s - t[j] * inv_t;
      loss += diff * diff;
      proj += g_s * diff;
    }
    sp_stats_row(ss, tt, proj, stats + r * kSpStats);
    loss_rows[r] = loss;
  };
  for_each_strip<acc_t>(xs, xt, row, [](int64_t, const at::Tensor&, const at::Tensor&) {});
  acc_t total = 0;
  for (const acc_t v : loss_rows) total += v;
  return total / static_cast<acc_t>(n * n);
}

template <typename acc_t>
void backward_rows(const at::Tensor& xs, const at::Tensor& xt, acc_t grad_loss, const acc_t* stats,
                   at::Tensor& grad) {
  const int64_t n = xs.size(0);
  const acc_t size = static_cast<acc_t>(n);
  const acc_t k = acc_t(2) * grad_loss / (size * size);
  std::vector<acc_t> alpha(n), beta(n);
  for (int64_t i = 0; i < n; ++i) sp_coefficients(stats + i * kSpStats, k, alpha[i], beta[i]);
  auto row = [&](int64_t r, acc_t* s, const acc_t* t) {  // s becomes M's row
    for (int64_t j = 0; j < n; ++j) s[j] = (alpha[r] + alpha[j]) * s[j] - (beta[r] + beta[j]) * t[j];
  };
  auto strip = [&](int64_t r0, const at::Tensor& m, const at::Tensor&) {
    at::Tensor out = grad.narrow(0, r0, m.size(0));
    if (grad.scalar_type() == xs.scalar_type()) {
      at::mm_out(out, m, xs);
    } else {
      out.copy_(at::mm(m, xs));
    }
  };
  for_each_strip<acc_t>(xs, xt, row, strip);
}

std::tuple<at::Tensor, at::Tensor> sp_forward_cpu(const at::Tensor& x_s, const at::Tensor& x_t) {
  const RowPair in = check_row_pair("sp_forward", x_s, x_t, "x_s", "x_t");
  const auto options = x_s.options().dtype(in.acc);
  at::Tensor loss = at::empty({}, options), stats = at::empty({in.rows, kSpStats}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_forward_cpu", [&] {
    *loss.mutable_data_ptr<scalar_t>() =
        forward_rows(x_s.to(in.acc), x_t.to(in.acc), stats.mutable_data_ptr<scalar_t>());
  });
  return {loss, stats};
}

at::Tensor sp_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x_s, const at::Tensor& x_t,
                           const at::Tensor& stats) {
  const SpBackwardInputs checked = check_sp_backward(grad_loss, x_s, x_t, stats);
  const RowPair& in = checked.rows;
  const at::Tensor &g = checked.grad_loss, &st = checked.stats;
  at::Tensor grad = at::empty(x_s.sizes(), x_s.options());
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_backward_cpu", [&] {
    backward_rows(x_s.to(in.acc), x_t.to(in.acc), *g.const_data_ptr<scalar_t>(), st.const_data_ptr<scalar_t>(),
                  grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("sp_forward", &sp_forward_cpu);
  m.impl("sp_backward", &sp_backward_cpu);
}

}  // namespace kdfast
